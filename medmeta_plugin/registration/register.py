"""Registration of a labelled support scan onto a query scan: placement, then rigid, affine, B-spline.

:func:`register` is the product's first stage: a structure labelled on one scan is, on another, where the
two scans align. :func:`~medmeta_plugin.registration.placement.place` finds where the query lies in the
support scan over the whole extent of both (any field of view, voxel order, orientation, modality) and says
how sure it is; the local stages (:mod:`~medmeta_plugin.registration.stages`) refine from there. Mattes
mutual information compares intensity co-occurrence rather than intensities, so a CT aligns with an MR.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import itk
import numpy as np

from medmeta_plugin.registration.grids import check_volume
from medmeta_plugin.registration.itk_bridge import (
    LPS,
    euler_from_matrix,
    matrix_from_transform,
)
from medmeta_plugin.registration.placement import Placement, PlacementConfig, place
from medmeta_plugin.registration.pyramid import Pyramid
from medmeta_plugin.registration.stages import affine_stage, bspline_stage, optimise

__all__ = ["REGISTRATION_TRANSFORMS", "Registration", "register"]

#: What :func:`register` may fit: ``rigid`` (rotation and translation), ``affine`` (rigid, then affine) or
#: ``bspline`` (rigid, affine, then a coarse B-spline deformation on top).
REGISTRATION_TRANSFORMS = ("rigid", "affine", "bspline")


@dataclass(frozen=True)
class Registration:
    """The result of :func:`register`.

    Attributes:
        matrix: 4x4 world transform (RAS, mm) mapping a point of the fixed (query) scan to the point of the
            moving (support) scan that lies on it.
        metric: final Mattes mutual information (lower is better; negative).
        seconds: wall time of the registration, placement included.
        transform: the global transform ``matrix`` is, ``rigid`` or ``affine`` (``rigid`` also when an
            affine stage was asked for but rejected), or ``bspline`` when a deformation was fitted on top.
        bspline: the deformation, ITK's cubic B-spline ``(fixed_parameters, parameters)`` in LPS mm: a point
            of the fixed scan is first moved by it, then mapped by ``matrix``; None without one.
        placement: where the global placement put the scan and how sure it is; None when the registration
            was started from a given matrix.
    """

    matrix: np.ndarray
    metric: float
    seconds: float
    transform: str = "rigid"
    bspline: tuple[np.ndarray, np.ndarray] | None = None
    placement: Placement | None = None

    @property
    def sure(self) -> bool:
        """False when the placement this registration started from was flagged as a guess."""
        return self.placement is None or self.placement.sure


def register(
    fixed: np.ndarray,
    fixed_affine: np.ndarray,
    moving: np.ndarray,
    moving_affine: np.ndarray,
    *,
    transform: str = "affine",
    iterations: int = 100,
    max_scale: float = 1.5,
    placement: PlacementConfig | None = None,
    initial: np.ndarray | None = None,
) -> Registration:
    """Align a moving (support) scan onto a fixed (query) scan: placement, rigid, then (by default) affine.

    Args:
        fixed: query scan, shape (X, Y, Z); fixed_affine: its 4x4 voxel-to-world matrix (RAS, mm).
        moving: support scan, shape (X', Y', Z'); moving_affine: its matrix.
        transform: one of :data:`REGISTRATION_TRANSFORMS`.
        iterations: optimiser iterations per stage and resolution level.
        max_scale: the affine stage is rejected (the rigid result returned) if it scales any axis by more
            than this factor or less than its inverse.
        placement: settings of the global placement (:class:`~medmeta_plugin.registration.placement.
            PlacementConfig`).
        initial: start the local stages from this 4x4 fixed -> moving matrix instead of placing (a known
            correspondence, e.g. a benchmark's truth).

    Returns:
        :class:`Registration` (fixed-world -> moving-world matrix, metric, seconds, the transform kept, and
        the placement with its confidence).

    Raises:
        ValueError: if an array is not 3D, holds NaN/inf, or an affine is not an invertible 4x4 matrix, for an
            unknown ``transform``, or if the scans cannot be placed (no body overlap in any position).
    """
    fixed, fixed_affine = check_volume(fixed, fixed_affine, "fixed")
    moving, moving_affine = check_volume(moving, moving_affine, "moving")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}.")
    if transform not in REGISTRATION_TRANSFORMS:
        raise ValueError(f"unknown transform {transform!r}; valid: {list(REGISTRATION_TRANSFORMS)}.")
    if max_scale <= 1.0:
        raise ValueError(f"max_scale must be > 1, got {max_scale}.")
    start = time.perf_counter()
    placed = None
    pyramids = (Pyramid(fixed, fixed_affine), Pyramid(moving, moving_affine))
    if initial is None:
        placed = place(fixed, fixed_affine, moving, moving_affine, placement, pyramids)
        initial = placed.matrix
    initial = np.asarray(initial, dtype=np.float64)
    if initial.shape != (4, 4) or not np.isfinite(initial).all():
        raise ValueError(f"initial must be a finite 4x4 matrix, got {initial!r}.")
    # The local stages sample the ITK fixed image, so the scan with the smaller field of view takes that
    # role: sampled over a whole CT, an MR slab registered onto it drifts away from the true placement (final
    # error 72-88 mm from a true start, docs/benchmarks/placement.md); the result is inverted back.
    swap = _field_of_view(moving, moving_affine) < _field_of_view(fixed, fixed_affine)
    first, second = (pyramids[1], pyramids[0]) if swap else pyramids
    start_matrix = np.linalg.inv(initial) if swap else initial
    coarse = (first.level(4), second.level(4))
    fine = (first.level(2), second.level(2))
    centre = (first.affine @ np.array([*(np.array(first.array.shape) - 1) / 2, 1.0]))[:3]
    rigid = euler_from_matrix(start_matrix, centre)
    try:
        value = optimise(*fine, rigid, iterations)
    except RuntimeError as err:
        raise ValueError(f"registration failed at the rigid stage: {err}") from err
    result: tuple[itk.Transform, float, str] = (rigid, value, "rigid")
    if transform in ("affine", "bspline"):
        refined = affine_stage(rigid, coarse, fine, iterations)
        if refined is not None:
            scales = np.linalg.svd(itk.array_from_matrix(refined[0].GetMatrix()), compute_uv=False)
            plausible = scales.max() <= max_scale and scales.min() >= 1.0 / max_scale
            if plausible and refined[1] <= value:
                result = (refined[0], refined[1], "affine")
    matrix = matrix_from_transform(result[0])
    if swap:
        matrix = np.linalg.inv(matrix)
    seconds = time.perf_counter() - start
    if transform == "bspline":
        # The deformation lives on the query's grid, on top of the global transform (query -> support).
        deformation = bspline_stage(_affine_transform(matrix), (pyramids[0].level(2), pyramids[1].level(2)))
        if deformation is not None:
            return Registration(
                matrix, deformation[1], time.perf_counter() - start, "bspline", deformation[0], placed
            )
    return Registration(matrix, result[1], seconds, result[2], None, placed)


def _field_of_view(array: np.ndarray, affine: np.ndarray) -> float:
    """The volume (mm^3) a scan's voxels cover."""
    return float(np.prod(array.shape) * abs(np.linalg.det(np.asarray(affine)[:3, :3])))


def _affine_transform(matrix: np.ndarray) -> itk.AffineTransform:
    """ITK's affine transform of a 4x4 RAS world matrix."""
    lps = LPS @ np.asarray(matrix, dtype=np.float64) @ LPS
    transform = itk.AffineTransform[itk.D, 3].New()
    transform.SetMatrix(itk.matrix_from_array(np.ascontiguousarray(lps[:3, :3])))
    transform.SetTranslation([float(t) for t in lps[:3, 3]])
    return transform
