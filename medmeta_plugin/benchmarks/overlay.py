"""A picture of served masks on a scan: each structure's slice through its reference label, the served mask
and the reference outlined on the scan (``medmeta benchmark app --overlay``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

__all__ = ["plot_overlay"]


def _axial_slice(truth: np.ndarray) -> int:
    """The axial (third-axis) slice with the most reference voxels, shape (X, Y, Z) mask."""
    return int(np.argmax(truth.sum(axis=(0, 1))))


def plot_overlay(
    image: np.ndarray,
    truths: Mapping[str, np.ndarray],
    served: Mapping[str, np.ndarray],
    dice: Mapping[str, float],
    path: str | Path,
    title: str = "",
) -> Path:
    """One panel per structure: the scan's axial slice where the reference has most voxels, the served mask
    in red and the reference in green (outlines), Dice in the panel's title.

    Args:
        image: the scan, shape (X, Y, Z) (its first axis is drawn left to right, the second bottom to top).
        truths: ``{structure: reference mask}``, each shape (X, Y, Z), bool.
        served: ``{structure: served mask}``, same shapes; structures missing here are drawn without one.
        dice: ``{structure: Dice of served against reference}``.
        path: PNG to write.
        title: the figure's title (what was labelled where, the code version).

    Returns:
        ``path``.

    Raises:
        ValueError: if a mask's shape differs from the image's or ``truths`` is empty.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3:
        raise ValueError(f"image must have shape (X, Y, Z), got {image.shape}.")
    if not truths:
        raise ValueError("truths must name at least one structure.")
    for what, masks in (("truths", truths), ("served", served)):
        for name, mask in masks.items():
            if np.shape(mask) != image.shape:
                raise ValueError(f"{what}[{name!r}] has shape {np.shape(mask)}, the image {image.shape}.")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(truths)
    columns = min(3, len(names))
    rows = -(-len(names) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3.6 * rows), squeeze=False)
    low, high = np.percentile(image, [1, 99])
    for ax, name in zip(axes.ravel(), names):
        truth = np.asarray(truths[name], bool)
        k = _axial_slice(truth)
        ax.imshow(image[:, :, k].T, cmap="gray", origin="lower", vmin=low, vmax=high)
        ax.contour(truth[:, :, k].T, levels=[0.5], colors="lime", linewidths=1.0, origin="lower")
        if name in served and served[name][:, :, k].any():
            ax.contour(np.asarray(served[name][:, :, k], float).T, levels=[0.5], colors="red", linewidths=1.0)
        ax.set_title(f"{name}: Dice {dice.get(name, float('nan')):.3f} (slice {k})", fontsize=9)
        ax.set_axis_off()
    for ax in axes.ravel()[len(names) :]:
        ax.set_axis_off()
    fig.suptitle(
        title + ("\n" if title else "") + "green: reference label, red: what the server answered", fontsize=9
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
