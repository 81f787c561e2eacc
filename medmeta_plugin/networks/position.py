"""Where a voxel lies in the body: in-plane coordinates normalised to the body's bounding box.

Convolutional features say what a voxel looks like and what surrounds it, not where it is. Many structures
differ mainly by where they are: the left and the right kidney, hippocampus or psoas are mirror images, and
a label of one of them adapted on appearance alone also marks the other. The segmentation head therefore
also sees the voxel's position, measured in a frame that transfers between patients: the body's bounding
box (voxels brighter than the background) maps to ``[-1, 1]`` on each in-plane axis.

Only the in-plane axes are used (axes 0 and 1 of the RAS working grid, left-right and anterior-posterior).
The body fills the in-plane field of view of nearly every scan, so the box is a stable frame; along the
through-plane axis, scans of the same region start and stop at different levels (a 20-slice MR slab beside
a 112-slice CT), so a normalised head-foot coordinate would place a structure at different anatomical
levels in different scans.
"""

from __future__ import annotations

import torch

__all__ = ["BODY_THRESHOLD", "POSITION_AXES", "POSITION_CHANNELS", "body_position"]

#: The axes whose normalised coordinates the head sees (in-plane on the RAS working grid).
POSITION_AXES = (0, 1)
POSITION_CHANNELS = len(POSITION_AXES)
#: A voxel belongs to the body when it is brighter than this fraction of the way from the image's 1st to its
#: 99th intensity percentile: air and the background of MR are near the bottom of the range, every tissue
#: (fat included) above it.
BODY_THRESHOLD = 0.15
# Percentiles are estimated on at most this many voxels (torch.quantile has an input size limit).
_QUANTILE_SAMPLE = 1 << 20


def _body_box(image: torch.Tensor) -> list[tuple[int, int]]:
    """Bounding box ``[(lo, hi), ...]`` per spatial axis of the body in one image (C, X, Y, Z)."""
    values = image.mean(0)
    flat = values.reshape(-1)
    if flat.numel() > _QUANTILE_SAMPLE:
        flat = flat[torch.linspace(0, flat.numel() - 1, _QUANTILE_SAMPLE, device=flat.device).long()]
    low, high = torch.quantile(flat.float(), torch.tensor([0.01, 0.99], device=flat.device))
    body = values > low + BODY_THRESHOLD * (high - low)
    if not bool(body.any()) or float(high - low) <= 0:
        return [(0, s - 1) for s in values.shape]  # a constant image: the whole grid is the frame
    box = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        present = torch.nonzero(body.any(dim=others)).view(-1)
        box.append((int(present[0]), int(present[-1])))
    return box


def body_position(images: torch.Tensor) -> torch.Tensor:
    """Normalised in-plane coordinates of every voxel.

    Args:
        images: a batch of images, shape (B, C, X, Y, Z).

    Returns:
        Coordinates of shape (B, :data:`POSITION_CHANNELS`, X, Y, Z): for each axis of :data:`POSITION_AXES`,
        -1 at the body's first voxel along it, +1 at its last, linear in between (beyond the box outside).

    Raises:
        ValueError: if ``images`` is not 5D.
    """
    if images.ndim != 5:
        raise ValueError(f"images must have shape (B, C, X, Y, Z), got {tuple(images.shape)}.")
    spatial = images.shape[2:]
    out = torch.empty(
        (images.shape[0], POSITION_CHANNELS, *spatial), device=images.device, dtype=images.dtype
    )
    with torch.no_grad():
        for b, image in enumerate(images):
            box = _body_box(image)
            for c, axis in enumerate(POSITION_AXES):
                lo, hi = box[axis]
                centre, half = (lo + hi) / 2, max((hi - lo) / 2, 1.0)
                ramp = (torch.arange(spatial[axis], device=images.device, dtype=images.dtype) - centre) / half
                shape = [1, 1, 1]
                shape[axis] = -1
                out[b, c] = ramp.view(shape).expand(*spatial)
    return out
