"""The working grid: how a scan of any spacing and orientation reaches the backbone, and how results return.

One function brings images *and* labels to the working grid (RAS axes, the configured spacing, padded to the
backbone's size divisor) and one brings a label map back to the scan's own grid, so adaptation and inference
see exactly the same voxels and a result always lands on the geometry of the image it was computed for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medmeta_plugin.io import ImageMeta, declared_size, read_image, read_label, resample
from medmeta_plugin.transforms import normalize_intensity, pad_to_multiple

__all__ = [
    "NATIVE_FACTOR",
    "WorkingVolume",
    "check_size",
    "label_to_working",
    "load_working",
    "to_original_grid",
]

# A scan is read on its own grid before it is resampled: its own voxels may number this many times
# max_voxels (a 0.5 mm CT is ~8x its voxels at 1 mm), 4 x 512^3 float32 being 2 GiB.
NATIVE_FACTOR = 4

# Working axes: the backbone is not rotation invariant, so every scan is turned to one axis convention first
# (an exact permutation/flip, no interpolation). RAS is the NIfTI/MONAI convention the training data used.
WORKING_ORIENTATION = "RAS"


@dataclass
class WorkingVolume:
    """A scan on the working grid, ready for the backbone.

    Attributes:
        image: normalised intensities, shape (1, C, X', Y', Z') with X', Y', Z' multiples of the backbone's
            size divisor (edge-padded at the high end of each axis).
        shape: the working grid's shape before padding, (X, Y, Z).
        working: geometry of the unpadded working grid.
        original: geometry of the scan as read (results are returned on it).
    """

    image: torch.Tensor
    shape: tuple[int, int, int]
    working: ImageMeta
    original: ImageMeta

    def crop(self, tensor: torch.Tensor) -> torch.Tensor:
        """Remove the padding: (..., X', Y', Z') -> (..., X, Y, Z)."""
        x, y, z = self.shape
        return tensor[..., :x, :y, :z]


def _check_working(
    source: str,
    shape: tuple[int, ...],
    own: tuple[float, ...],
    spacing: tuple[float, float, float],
    limit: int,
) -> None:
    extent = np.asarray(shape, dtype=np.float64) * np.asarray(own, dtype=np.float64)
    working_voxels = int(np.prod(np.ceil(extent / np.asarray(spacing))))
    if working_voxels > limit:
        raise ValueError(
            f"{source}: image of {tuple(shape)} voxels at {np.round(own, 3).tolist()} mm needs "
            f"{working_voxels} voxels at the working spacing {list(spacing)} mm, over the limit of "
            f"{limit} (--conf max_voxels)."
        )


def check_size(path: str | Path, spacing: tuple[float, float, float], max_voxels: int) -> None:
    """Refuse a scan too large to serve from its header alone, before any of its data is read or inflated.

    Args:
        path: image or label file (a DICOM folder passes: the series reader checks its files).
        spacing: working voxel size in mm.
        max_voxels: the working grid's limit; the scan's own grid may hold :data:`NATIVE_FACTOR` times it.

    Raises:
        ValueError: if the header declares more voxels than either limit; the message names the file.
    """
    size = declared_size(path)
    if size is None:
        return
    native = NATIVE_FACTOR * max_voxels
    if size.voxels > native:
        raise ValueError(
            f"{path}: the file declares {size.shape} voxels x {size.channels} channel(s) = {size.voxels} "
            f"values, over the limit of {native} ({NATIVE_FACTOR} x --conf max_voxels); none of it read."
        )
    _check_working(str(path), size.shape, size.spacing, spacing, max_voxels)


def load_working(
    path: str | Path, spacing: tuple[float, float, float], divisor: int, max_voxels: int
) -> WorkingVolume:
    """Read a scan and bring it to the working grid.

    Args:
        path: image file or DICOM series folder (see :func:`medmeta_plugin.io.read_image`).
        spacing: working voxel size in mm.
        divisor: the backbone's size divisor (padding target).
        max_voxels: refuse scans whose working grid would hold more voxels than this (a memory limit).

    Returns:
        The :class:`WorkingVolume`.

    Raises:
        ValueError: if the scan cannot be read, holds NaN/inf, or is too large; the message names the file.
    """
    check_size(path, spacing, max_voxels)
    array, meta = read_image(path)
    _check_working(meta.source, meta.shape, meta.spacing, spacing, max_voxels)
    work, working = resample(array, meta, spacing=spacing, orientation=WORKING_ORIENTATION)
    image = torch.as_tensor(normalize_intensity(work))
    shape = tuple(int(s) for s in image.shape[1:])
    image = pad_to_multiple(image[None], divisor, mode="replicate")
    return WorkingVolume(image=image, shape=shape, working=working, original=meta)  # type: ignore[arg-type]


def label_to_working(path: str | Path, volume: WorkingVolume, divisor: int) -> np.ndarray:
    """Read a label map of ``volume``'s scan and bring it to the same working grid.

    Args:
        path: label file; it must lie on the scan's grid exactly.
        volume: the scan on the working grid.
        divisor: the backbone's size divisor (the label is zero-padded like the image).

    Returns:
        Integer label values, shape (X', Y', Z') (padded like ``volume.image``).

    Raises:
        ValueError: if the label cannot be read or its geometry differs from the scan's.
    """
    label, _ = read_label(path, volume.original)
    spacing, orientation = volume.working.spacing, WORKING_ORIENTATION
    work, _ = resample(label, volume.original, spacing=spacing, orientation=orientation, mode="nearest")
    out = np.zeros(volume.image.shape[2:], dtype=work.dtype)
    x, y, z = (min(a, b) for a, b in zip(work.shape[1:], volume.image.shape[2:]))
    out[:x, :y, :z] = work[0, :x, :y, :z]
    return out


def to_original_grid(labels: np.ndarray, volume: WorkingVolume) -> np.ndarray:
    """Bring a working-grid label map back to the scan's own grid (nearest neighbour).

    Args:
        labels: integer label map on the unpadded working grid, shape (X, Y, Z).
        volume: the scan it was computed for.

    Returns:
        The label map on the scan's grid, shape (1, *volume.original.shape), same dtype.
    """
    out, _ = resample(labels[None], volume.working, reference=volume.original, mode="nearest")
    return out
