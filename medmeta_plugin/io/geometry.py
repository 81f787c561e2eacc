"""Grid geometry: check a label against its image, and resample between an image's grid and a working grid."""

from __future__ import annotations

import dataclasses

import numpy as np

from medmeta_plugin.io.meta import ImageMeta

__all__ = ["RESAMPLE_MODES", "check_label_geometry", "resample"]

#: Interpolation modes of :func:`resample`: "bilinear" (trilinear in 3D) for images, "nearest" for labels.
RESAMPLE_MODES = ("bilinear", "nearest")
_AXIS_LETTERS = ("LR", "PA", "IS")
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # axis codes name the direction of increasing index


def check_label_geometry(
    image_meta: ImageMeta, label_meta: ImageMeta, *, atol_mm: float = 1e-3, atol_direction: float = 1e-4
) -> None:
    """Check that a label lies on exactly its image's voxel grid.

    The default tolerances sit far below any voxel size but above the rounding of the formats: NIfTI stores
    the affine as float32 (about 1e-5 mm at 500 mm from the origin) and DICOM writes direction cosines as
    decimal strings of at most 16 characters.

    Args:
        image_meta: metadata of the image.
        label_meta: metadata of the label read for it.
        atol_mm: largest accepted difference of spacing and origin, in mm.
        atol_direction: largest accepted difference of any direction cosine.

    Raises:
        ValueError: naming both sources and every quantity that differs (shape, spacing, origin, direction)
            with both values.
    """
    problems = []
    if tuple(image_meta.shape) != tuple(label_meta.shape):
        problems.append(f"shape {tuple(label_meta.shape)} != image shape {tuple(image_meta.shape)}")
    for name, tol in (("spacing", atol_mm), ("origin", atol_mm), ("direction", atol_direction)):
        label_value = np.asarray(getattr(label_meta, name), dtype=np.float64)
        image_value = np.asarray(getattr(image_meta, name), dtype=np.float64)
        gap = float(np.max(np.abs(label_value - image_value)))
        if gap > tol:
            unit = "" if name == "direction" else " mm"
            problems.append(
                f"{name} differs by {gap:.4g}{unit} (label {np.round(label_value, 4).tolist()} vs image "
                f"{np.round(image_value, 4).tolist()}, tolerance {tol:g})"
            )
    if problems:
        raise ValueError(
            f"label {label_meta.source or '(unnamed)'} does not match the geometry of image "
            f"{image_meta.source or '(unnamed)'}: " + "; ".join(problems) + "."
        )


def resample(
    array: np.ndarray,
    meta: ImageMeta,
    *,
    spacing: tuple[float, float, float] | None = None,
    orientation: str | None = None,
    reference: ImageMeta | None = None,
    mode: str = "bilinear",
    padding_mode: str = "border",
) -> tuple[np.ndarray, ImageMeta]:
    """Resample a channel-first image to a working grid, or back onto a reference grid.

    Two uses, one function, so the way there and the way back cannot drift apart:

    - working grid: ``orientation`` permutes/flips the voxel axes to the closest axis codes (exact, no
      interpolation; a rotation off the world axes stays in the affine), then ``spacing`` interpolates to
      the new voxel size (MONAI ``Orientation`` and ``Spacing``);
    - back: ``reference`` (e.g. the original image's :class:`ImageMeta`) gives the output grid, shape and
      affine exactly (MONAI ``SpatialResample``).

    Args:
        array: image or label, shape (C, X, Y, Z), with ``(X, Y, Z) == meta.shape``.
        meta: geometry of ``array``.
        spacing: working voxel size in mm along the output axes, shape (3,); None keeps the spacing.
        orientation: working axis codes, e.g. ``"RAS"`` (one letter of each of L/R, P/A, I/S); None keeps
            the voxel axes.
        reference: target grid; excludes ``spacing`` and ``orientation``.
        mode: one of :data:`RESAMPLE_MODES`; "nearest" keeps label values and the input dtype.
        padding_mode: value outside the input grid: "border" (repeat the edge), "zeros" or "reflection".

    Returns:
        ``(array, meta)``: shape (C, X', Y', Z'), float32 for "bilinear" and the input dtype for "nearest";
        and the new grid's :class:`ImageMeta`, with the input's ``source`` and ``extra``. With none of
        ``spacing``, ``orientation``, ``reference`` the input is returned unchanged.

    Raises:
        ValueError: if ``array`` does not match ``meta``, or an argument has an invalid value.
    """
    array = np.asarray(array)
    if array.ndim != 4 or tuple(array.shape[1:]) != tuple(meta.shape):
        raise ValueError(
            f"{meta.source or 'image'}: array must have shape (C, *meta.shape) with meta.shape = "
            f"{tuple(meta.shape)}, got {array.shape}."
        )
    if mode not in RESAMPLE_MODES:
        raise ValueError(f"mode must be one of {RESAMPLE_MODES}, got {mode!r}.")
    if padding_mode not in ("border", "zeros", "reflection"):
        raise ValueError(
            f"padding_mode must be one of ('border', 'zeros', 'reflection'), got {padding_mode!r}."
        )
    if reference is not None and (spacing is not None or orientation is not None):
        raise ValueError("resample: give either reference, or spacing and/or orientation, not both.")
    if spacing is not None:
        spacing = tuple(float(s) for s in np.ravel(spacing))
        if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
            raise ValueError(f"spacing must be 3 positive finite numbers (mm), got {spacing}.")
    if orientation is not None:
        _check_axcodes(orientation)
    if reference is None and spacing is None and orientation is None:
        return array, meta

    # Imported here: MONAI and torch take seconds to load and only resampling needs them.
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Orientation, Spacing, SpatialResample

    image = MetaTensor(torch.as_tensor(array, dtype=torch.float32), affine=torch.as_tensor(meta.affine))
    if reference is not None:
        out = SpatialResample(mode=mode, padding_mode=padding_mode)(
            image, dst_affine=torch.as_tensor(reference.affine), spatial_size=tuple(reference.shape)
        )
        # The reference's own fields, not the affine MONAI hands back, so the grid is the reference exactly.
        out_meta = dataclasses.replace(reference, source=meta.source, extra=dict(meta.extra))
    else:
        out = image
        if orientation is not None:
            out = Orientation(axcodes=orientation.upper(), labels=_RAS_LABELS)(out)
        if spacing is not None:
            out = Spacing(pixdim=spacing, mode=mode, padding_mode=padding_mode)(out)
        out_meta = ImageMeta.from_affine(
            np.asarray(out.affine, dtype=np.float64),
            tuple(out.shape[1:]),
            source=meta.source,
            extra=meta.extra,
        )
    result = out.detach().cpu().numpy()
    if mode == "nearest" and not np.issubdtype(array.dtype, np.floating):
        result = np.rint(result).astype(array.dtype)
    else:
        result = result.astype(np.float32, copy=False)
    return np.ascontiguousarray(result), out_meta


def _check_axcodes(orientation: str) -> None:
    """Raise unless ``orientation`` holds one letter of each pair L/R, P/A, I/S."""
    codes = orientation.upper() if isinstance(orientation, str) else ""
    pairs = sorted(next((i for i, pair in enumerate(_AXIS_LETTERS) if c in pair), -1) for c in codes)
    if len(codes) != 3 or pairs != [0, 1, 2]:
        raise ValueError(
            f"orientation must be 3 axis codes with one letter of each of {', '.join(_AXIS_LETTERS)} "
            f"(e.g. 'RAS', 'LPS'), got {orientation!r}."
        )
