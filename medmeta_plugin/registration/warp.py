"""Carrying a support volume onto a query grid through a registration, and distances to a mask's boundary."""

from __future__ import annotations

import itk
import numpy as np
import scipy.ndimage

from medmeta_plugin.registration.grids import check_volume
from medmeta_plugin.registration.itk_bridge import LPS, from_itk, to_itk
from medmeta_plugin.registration.stages import bspline_transform

__all__ = ["signed_distance_mm", "warp_to"]


def _displacement(transform: itk.Transform, reference: itk.Image, step: int = 4) -> itk.Transform:
    """``transform`` as a displacement field sampled every ``step`` voxels over ``reference``'s grid.

    Resampling through a B-spline evaluates it at every voxel (0.46 s a mask on a 122 x 101 x 112 CT);
    the field, linear between its samples, costs a fraction of that and differs by far less than a voxel
    (the B-spline's control points are a third of the scan apart): masks within 0.012 in probability on a CT.
    """
    size = [int(np.ceil((n - 1) / step)) + 1 for n in itk.size(reference)]
    to_field = itk.TransformToDisplacementFieldFilter[itk.Image[itk.Vector[itk.F, 3], 3], itk.D].New(
        Transform=transform,
        Size=size,
        OutputSpacing=[float(s) * step for s in itk.spacing(reference)],
        OutputOrigin=itk.origin(reference),
        OutputDirection=reference.GetDirection(),
    )
    to_field.Update()
    sampled = to_field.GetOutput()
    # The double-precision transform takes a double field: copied through NumPy (a few thousand vectors).
    field = itk.image_from_array(itk.array_from_image(sampled).astype(np.float64), is_vector=True)
    field.SetOrigin(sampled.GetOrigin())
    field.SetSpacing(sampled.GetSpacing())
    field.SetDirection(sampled.GetDirection())
    displacement = itk.DisplacementFieldTransform[itk.D, 3].New()
    displacement.SetDisplacementField(field)
    return displacement


def warp_to(
    moving: np.ndarray,
    moving_affine: np.ndarray,
    fixed_shape: tuple[int, int, int],
    fixed_affine: np.ndarray,
    matrix: np.ndarray,
    bspline: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Resample a support volume (e.g. a mask) onto the query grid through a registration.

    Args:
        moving: support volume, shape (X', Y', Z'), resampled linearly (a mask becomes a probability).
        moving_affine: its 4x4 voxel-to-world matrix (RAS, mm).
        fixed_shape: the query grid's shape (X, Y, Z); fixed_affine: its matrix.
        matrix: fixed-world -> moving-world transform (:attr:`~medmeta_plugin.registration.Registration.
            matrix`).
        bspline: the deformation applied before ``matrix`` (:attr:`~medmeta_plugin.registration.
            Registration.bspline`), if any.

    Returns:
        The resampled volume, shape ``fixed_shape``, float32, 0 outside the support scan.
    """
    moving, moving_affine = check_volume(moving, moving_affine, "moving")
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != (4, 4):
        raise ValueError(f"matrix must be 4x4, got shape {matrix.shape}.")
    shape = tuple(int(s) for s in fixed_shape)
    reference = to_itk(np.zeros(shape, np.float32), fixed_affine)
    transform = itk.AffineTransform[itk.D, 3].New()
    lps = LPS @ matrix @ LPS
    transform.SetMatrix(itk.matrix_from_array(np.ascontiguousarray(lps[:3, :3])))
    transform.SetTranslation([float(t) for t in lps[:3, 3]])
    if bspline is not None:
        composite = itk.CompositeTransform[itk.D, 3].New()
        composite.AddTransform(transform)
        composite.AddTransform(_displacement(bspline_transform(*bspline), reference))  # applied first
        transform = composite
    image = to_itk(moving, moving_affine)
    warped = itk.resample_image_filter(
        image,
        transform=transform,
        interpolator=itk.LinearInterpolateImageFunction.New(image),
        reference_image=reference,
        use_reference_image=True,
        default_pixel_value=0.0,
    )
    return from_itk(warped, shape)


def signed_distance_mm(mask: np.ndarray, affine: np.ndarray, limit_mm: float | None = None) -> np.ndarray:
    """Signed distance to a mask's boundary in mm: negative inside, 0 on the mask's outermost voxels.

    The boundary is the mask's voxels with one of their 26 neighbours outside it (beyond the grid's edge
    counts as inside); every voxel's distance is the Euclidean distance to the nearest of them, on the grid's
    voxel sizes (the columns of ``affine``): ITK's signed Maurer distance map, computed by SciPy, as ITK's
    distance-map modules take seconds to load in a fresh process (a test checks the two agree).

    Args:
        mask: binary mask, shape (X, Y, Z); affine: its 4x4 voxel-to-world matrix (RAS, mm).
        limit_mm: if given, distances are clipped to [-limit_mm, limit_mm]. They are then computed only in
            the mask's bounding box grown by the limit (every boundary voxel lies in the box, so what is
            inside it is exact and what is outside is farther than the limit): a structure that fills a
            small part of a large grid costs a small part of the time.

    Returns:
        Distances, shape (X, Y, Z), float32; +inf everywhere for an empty mask, -inf for one that fills the
        grid (``+limit_mm`` and ``-limit_mm`` with a limit).
    """
    mask = np.asarray(mask) > 0
    far = np.inf if limit_mm is None else float(limit_mm)
    if not mask.any():
        return np.full(mask.shape, far, np.float32)
    spacing = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    box = tuple(slice(None) for _ in range(3))
    if limit_mm is not None:
        if limit_mm <= 0:
            raise ValueError(f"limit_mm must be > 0, got {limit_mm}.")
        grow = np.ceil(limit_mm / spacing).astype(int) + 1
        nonzero = np.nonzero(mask)
        box = tuple(
            slice(max(0, int(i.min()) - g), min(n, int(i.max()) + g + 1))
            for i, g, n in zip(nonzero, grow, mask.shape)
        )
    # The grid's own edges stay edges of the box (a box edge inside the grid has no mask voxel on it), so the
    # erosion below sees the same neighbourhoods as on the whole grid.
    part = mask[box]
    interior = scipy.ndimage.binary_erosion(part, structure=np.ones((3, 3, 3), bool), border_value=1)
    boundary = part & ~interior
    if not boundary.any():
        return np.full(mask.shape, -far, np.float32)
    distance = scipy.ndimage.distance_transform_edt(~boundary, sampling=spacing).astype(np.float32)
    inside = np.where(part, -distance, distance)
    if limit_mm is None:
        return inside
    out = np.full(mask.shape, far, np.float32)
    out[box] = np.clip(inside, -far, far)
    return out
