"""A structure's mask as registration would carry it from another scan: misplaced, deformed, or missing.

An in-context model reads the query scan together with the mask that placement and registration carried
onto it (issue 18). Meta-training episodes need that carried mask without registering every pair, so it is
drawn: the true mask moved by a residual misalignment like the registration's measured errors (a global
shift plus a smooth deformation, several millimetres to a few centimetres between two patients,
docs/benchmarks/placement.md), its boundary grown or shrunk (two atlases draw one organ at different
sizes), and sometimes left empty (the placement was unsure and nothing was carried).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["CarryConfig", "simulate_carry"]


@dataclass(frozen=True)
class CarryConfig:
    """How far a simulated carried mask departs from the truth.

    Attributes:
        shift_mm: largest global shift per axis (uniform in [-shift_mm, shift_mm]).
        warp_mm: largest amplitude of the smooth deformation (per axis, at its control points).
        control_mm: spacing of the deformation's control points (its smoothness).
        grow_mm: largest boundary change, grown or shrunk (uniform in [-grow_mm, grow_mm]).
        empty: probability that nothing is carried (an all-zero mask).
        varied: scale shift, warp and growth of each draw by a factor uniform in [0, 1] (from nearly right
            to the largest departure); False draws every carry at the full size.
    """

    shift_mm: float = 12.0
    warp_mm: float = 9.0
    control_mm: float = 40.0
    grow_mm: float = 4.0
    empty: float = 0.15
    varied: bool = True

    def __post_init__(self) -> None:
        for name in ("shift_mm", "warp_mm", "grow_mm"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if self.control_mm <= 0:
            raise ValueError(f"control_mm must be > 0, got {self.control_mm}.")
        if not 0.0 <= self.empty <= 1.0:
            raise ValueError(f"empty must be in [0, 1], got {self.empty}.")


def simulate_carry(
    mask: torch.Tensor, spacing_mm: float, rng: np.random.Generator, config: CarryConfig | None = None
) -> torch.Tensor:
    """The mask as a registration might have carried it onto its own scan.

    Args:
        mask: the true mask, shape (X, Y, Z), values in [0, 1].
        spacing_mm: the grid's voxel size (isotropic, as the app's working grid).
        rng: draws the misalignment.
        config: its size (:class:`CarryConfig`).

    Returns:
        The carried mask, shape (X, Y, Z), float32 in [0, 1] (soft at its boundary, as a warped mask is).

    Raises:
        ValueError: if ``mask`` is not 3D or ``spacing_mm`` is not positive.
    """
    config = config or CarryConfig()
    if mask.ndim != 3:
        raise ValueError(f"mask must be 3D (X, Y, Z), got shape {tuple(mask.shape)}.")
    if spacing_mm <= 0:
        raise ValueError(f"spacing_mm must be > 0, got {spacing_mm}.")
    out = mask.float()
    if rng.random() < config.empty:
        return torch.zeros_like(out)
    shape = np.array(out.shape)
    # How far off this carry is, drawn per mask: registration is often nearly right (one subject's copies, a
    # brain onto a brain) and sometimes far off (two patients' abdomens), and the model must learn both to
    # trust a good carry and to correct a poor one.
    severity = float(rng.uniform(0.0, 1.0)) if config.varied else 1.0
    grow = severity * rng.uniform(-config.grow_mm, config.grow_mm) / spacing_mm
    if abs(grow) >= 0.5:
        out = _grown(out, int(round(grow)))
    # Displacement in voxels on a coarse control grid, upsampled (trilinear) to a smooth field.
    control = np.maximum(2, np.ceil(shape * spacing_mm / config.control_mm).astype(int) + 1)
    field = rng.uniform(-1.0, 1.0, (3, *control)) * severity * config.warp_mm / spacing_mm
    field += rng.uniform(-1.0, 1.0, (3, 1, 1, 1)) * severity * config.shift_mm / spacing_mm
    dense = F.interpolate(
        torch.from_numpy(field.astype(np.float32))[None], size=tuple(int(s) for s in shape), mode="trilinear"
    )[0]
    # grid_sample wants normalised (x=last axis) coordinates: a voxel shift d on axis i is 2 d / (n_i - 1).
    axes = [torch.linspace(-1.0, 1.0, int(n)) for n in shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)
    grid = grid + (dense.permute(1, 2, 3, 0) * 2.0 / torch.from_numpy(np.maximum(shape - 1, 1)).float())
    warped = F.grid_sample(out[None, None], grid.flip(-1)[None], mode="bilinear", align_corners=True)
    return warped[0, 0].clamp(0.0, 1.0)


def _grown(mask: torch.Tensor, voxels: int) -> torch.Tensor:
    """``mask`` dilated by ``voxels`` (> 0) or eroded by ``-voxels`` (< 0), with a cube of that radius."""
    size = 2 * abs(voxels) + 1
    binary = (mask >= 0.5).float()[None, None]
    if voxels > 0:
        return F.max_pool3d(binary, size, stride=1, padding=abs(voxels))[0, 0]
    return -F.max_pool3d(-binary, size, stride=1, padding=abs(voxels))[0, 0]
