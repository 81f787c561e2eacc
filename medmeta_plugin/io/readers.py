"""Read NIfTI, NRRD, MetaImage files and DICOM series into a channel-first array plus :class:`ImageMeta`.

Every reader returns the same contract: an array of shape (C, X, Y, Z) whose spatial axes are the file's
own voxel axes (nothing is reoriented or resampled here), and an :class:`ImageMeta` in RAS+ millimetres.
Any failure of the underlying library is turned into a ``ValueError`` that names the file and the problem.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np

from medmeta_plugin.io.dicom import read_dicom_series
from medmeta_plugin.io.formats import file_format, flip_lps_ras
from medmeta_plugin.io.geometry import check_label_geometry
from medmeta_plugin.io.headers import check_nrrd_inflation, nrrd_spatial_axes
from medmeta_plugin.io.meta import ImageMeta

__all__ = ["read_image", "read_label"]

# NRRD "space" values (full and abbreviated) -> sign of each world axis relative to RAS.
_NRRD_SPACE_TO_RAS = {
    "right-anterior-superior": (1.0, 1.0, 1.0),
    "ras": (1.0, 1.0, 1.0),
    "left-anterior-superior": (-1.0, 1.0, 1.0),
    "las": (-1.0, 1.0, 1.0),
    "left-posterior-superior": (-1.0, -1.0, 1.0),
    "lps": (-1.0, -1.0, 1.0),
}


def read_image(
    path: str | Path, *, allow_nonfinite: bool = False, series_uid: str | None = None
) -> tuple[np.ndarray, ImageMeta]:
    """Read an image file or DICOM series folder.

    Args:
        path: a ``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha`` or ``.mhd`` file, or a folder holding a
            DICOM series.
        allow_nonfinite: keep NaN/inf voxels instead of rejecting the image.
        series_uid: for a DICOM folder holding several series, the ``SeriesInstanceUID`` to read.

    Returns:
        ``(array, meta)``: float32 array of shape (C, X, Y, Z), where a 4th (time/vector) axis of the file
        becomes C and a 3D file gives C = 1; and its :class:`ImageMeta` (RAS, mm).

    Raises:
        ValueError: if the path is missing, has an unknown extension, cannot be parsed or decoded, is not 3D,
            or (unless ``allow_nonfinite``) holds NaN/inf voxels; the message names the file or series.
    """
    array, meta = _read_native(Path(path), series_uid)
    array = array.astype(np.float32, copy=False)
    if not allow_nonfinite:
        bad = ~np.isfinite(array)
        if bad.any():
            raise ValueError(
                f"{meta.source}: image holds {int(bad.sum())} NaN/inf voxels (first at channel/voxel index "
                f"{tuple(int(i) for i in np.argwhere(bad)[0])}); pass allow_nonfinite=True to keep them."
            )
    return array, meta


def read_label(
    path: str | Path, image_meta: ImageMeta | None = None, *, series_uid: str | None = None
) -> tuple[np.ndarray, ImageMeta]:
    """Read a label map and check that it holds class indices on its image's grid.

    Args:
        path: label file or DICOM series folder (same formats as :func:`read_image`).
        image_meta: metadata of the image the label belongs to; when given, the label's shape, spacing,
            origin and direction must match it (see :func:`check_label_geometry`).
        series_uid: for a DICOM folder holding several series, the ``SeriesInstanceUID`` to read.

    Returns:
        ``(label, meta)``: integer array of shape (1, X, Y, Z) with non-negative values, in the smallest of
        uint8, int16, int32 that holds them; and its :class:`ImageMeta`.

    Raises:
        ValueError: for any reason :func:`read_image` raises, or if the label has more than one channel,
            holds non-integer, NaN or negative values, or does not match ``image_meta``.
    """
    array, meta = _read_native(Path(path), series_uid)
    if array.shape[0] != 1:
        raise ValueError(
            f"{meta.source}: a label must have one channel, got shape {array.shape} (C, X, Y, Z)."
        )
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        bad = array != np.round(array)  # NaN != NaN, so NaN counts as non-integer too
        if bad.any():
            example = array[bad].flat[0]
            raise ValueError(
                f"{meta.source}: label holds {int(bad.sum())} non-integer values (e.g. {example!r}); "
                "a label must hold integer class indices."
            )
    low, high = (array.min(), array.max()) if array.size else (0, 0)
    if low < 0:
        raise ValueError(f"{meta.source}: label holds negative values (min {low}); class indices are >= 0.")
    for dtype in (np.uint8, np.int16, np.int32):
        if high <= np.iinfo(dtype).max:
            array = array.astype(dtype, copy=False)
            break
    else:
        raise ValueError(f"{meta.source}: label value {high} is too large for an int32 class index.")
    if image_meta is not None:
        check_label_geometry(image_meta, meta)
    return array, meta


def _read_native(path: Path, series_uid: str | None) -> tuple[np.ndarray, ImageMeta]:
    """Dispatch on the path; returns the array in the file's own dtype, shape (C, X, Y, Z)."""
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder.")
    if path.is_dir():
        return read_dicom_series(path, series_uid=series_uid)
    fmt = file_format(path)
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty (0 bytes).")
    reader = {"nifti": _read_nifti, "nrrd": _read_nrrd, "metaimage": _read_metaimage}[fmt]
    data, affine, channel_axis = reader(path)
    return _channel_first(data, affine, channel_axis, path, fmt)


def _channel_first(
    data: np.ndarray, affine: np.ndarray, channel_axis: int | None, path: Path, fmt: str
) -> tuple[np.ndarray, ImageMeta]:
    """Move the channel axis (if any) to the front; ``affine`` is RAS for the three spatial axes."""
    if channel_axis is None:
        if data.ndim != 3:
            raise ValueError(
                f"{path}: expected a 3D image (or 3D plus channels), got array shape {data.shape}."
            )
        data = data[None]
    else:
        data = np.moveaxis(data, channel_axis, 0)
    meta = ImageMeta.from_affine(
        affine, data.shape[1:], source=str(path), extra={"format": fmt, "dtype": str(data.dtype)}
    )
    return np.ascontiguousarray(data), meta


def _cannot_read(path: Path, fmt: str, err: Exception) -> ValueError:
    """A ValueError naming the file, a plain-words diagnosis and the library's own message."""
    text = str(err)
    truncated = (
        ("Expected" in text and "bytes" in text) or "Size of the data" in text or "buffer size" in text
    )
    if isinstance(err, EOFError) or truncated:
        diagnosis = "the file is truncated (less data than the header announces)"
    elif isinstance(err, gzip.BadGzipFile | zlib.error) or "not a gzip file" in text:
        diagnosis = "the gzip stream is corrupt or not gzip at all"
    elif "magic" in text.lower() or "Cannot work out file type" in text:
        diagnosis = f"this is not a {fmt} file"
    else:
        diagnosis = "the file is malformed"
    return ValueError(f"{path}: cannot read {fmt} file: {diagnosis} ({type(err).__name__}: {text.strip()}).")


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, int | None]:
    """Read with nibabel; 4D (X, Y, Z, T) and 5D (X, Y, Z, 1, C) files carry channels on their last axis."""
    try:
        img = nib.load(path, mmap=False)
        data = np.asanyarray(img.dataobj)
    except Exception as err:  # nibabel, gzip and zlib raise many unrelated types for bad files
        raise _cannot_read(path, "NIfTI", err) from err
    if data.ndim == 5 and data.shape[3] == 1:
        data = data[:, :, :, 0]
    channel_axis = 3 if data.ndim == 4 else None
    return data, np.asarray(img.affine, dtype=np.float64), channel_axis


def _read_nrrd(path: Path) -> tuple[np.ndarray, np.ndarray, int | None]:
    """Read with pynrrd; the one non-spatial axis (kind ``vector``, ``list``, ...) if any becomes channels."""
    check_nrrd_inflation(path)  # pynrrd would inflate a compressed stream whole, however large
    try:
        data, header = nrrd.read(str(path), index_order="F")
    except Exception as err:  # pynrrd raises NRRDError, ValueError, OSError, zlib.error
        raise _cannot_read(path, "NRRD", err) from err
    directions = header.get("space directions")
    kinds = header.get("kinds")
    if directions is not None:
        directions = np.asarray(directions, dtype=np.float64)
    spatial = nrrd_spatial_axes(header, data.ndim)
    other = [axis for axis in range(data.ndim) if axis not in spatial]
    if len(spatial) != 3 or len(other) > 1:
        raise ValueError(
            f"{path}: expected 3 spatial axes and at most one channel axis, got sizes {list(data.shape)} "
            f"with kinds {kinds} and space directions {None if directions is None else directions.tolist()}."
        )
    space = str(header.get("space", "left-posterior-superior")).lower()
    if space not in _NRRD_SPACE_TO_RAS:
        raise ValueError(
            f"{path}: NRRD space {header.get('space')!r} is not supported; supported: "
            f"{', '.join(_NRRD_SPACE_TO_RAS)}."
        )
    affine = np.eye(4)
    if directions is not None:
        affine[:3, :3] = directions[spatial].T
    else:
        # No world geometry in the header: ITK's reading (LPS, identity direction, the "spacings" field).
        spacings = np.asarray(header.get("spacings", [1.0] * data.ndim), dtype=np.float64)[spatial]
        affine[:3, :3] = np.diag(np.where(np.isfinite(spacings), spacings, 1.0))
    affine[:3, 3] = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64)
    affine = np.diag([*_NRRD_SPACE_TO_RAS[space], 1.0]) @ affine
    return data, affine, (other[0] if other else None)


def _read_metaimage(path: Path) -> tuple[np.ndarray, np.ndarray, int | None]:
    """Read a MetaImage (.mha/.mhd) with ITK (LPS world, array in (Z, Y, X[, C]) order)."""
    import itk  # imported here: loading ITK takes seconds and only this format needs it

    try:
        img = itk.imread(str(path))
        data = np.asarray(itk.array_from_image(img))
    except Exception as err:  # ITK raises RuntimeError with its C++ message
        raise _cannot_read(path, "MetaImage", err) from err
    ndim_spatial = img.GetImageDimension()
    if ndim_spatial != 3:
        raise ValueError(f"{path}: expected a 3D image, got a {ndim_spatial}D MetaImage.")
    vector = data.ndim == 4
    data = np.transpose(data, (2, 1, 0, 3) if vector else (2, 1, 0))
    affine = np.eye(4)
    direction = np.asarray(itk.array_from_matrix(img.GetDirection()), dtype=np.float64)
    affine[:3, :3] = direction * np.asarray(img.GetSpacing(), dtype=np.float64)[None, :]
    affine[:3, 3] = np.asarray(img.GetOrigin(), dtype=np.float64)
    return data, flip_lps_ras(affine), (3 if vector else None)
