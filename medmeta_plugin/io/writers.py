"""Write a channel-first array plus :class:`ImageMeta` as NIfTI or NRRD, atomically.

The file appears complete or not at all: data goes to a temporary file in the target folder, which then
replaces the target in one ``os.replace``. Integer arrays (labels) keep an integer dtype on disk.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np

from medmeta_plugin.io.formats import FILE_FORMATS, file_format, flip_lps_ras
from medmeta_plugin.io.meta import ImageMeta

__all__ = ["write_image"]

_WRITABLE = ("nifti", "nrrd")


def write_image(path: str | Path, array: np.ndarray, meta: ImageMeta) -> Path:
    """Write an image or label file with the geometry of ``meta``.

    Args:
        path: target file ending in ``.nii``, ``.nii.gz`` or ``.nrrd`` (NRRD with attached, gzip-encoded
            data); the folder must exist. An existing file is replaced.
        array: shape (C, X, Y, Z) or (X, Y, Z), with ``(X, Y, Z) == meta.shape``. Floating arrays are written
            as float32; bool and integer arrays as the smallest of uint8, int16, int32 holding their values.
            For NIfTI, C > 1 becomes the 4th dimension; for NRRD, a leading ``vector`` axis.
        meta: geometry (RAS) to write; NRRD files are written in LPS space, as 3D Slicer and ITK expect.

    Returns:
        The path written.

    Raises:
        ValueError: if the extension is not writable, the folder is missing, the array does not match
            ``meta``, or integer values do not fit int32; the message names the file.
    """
    path = Path(path)
    fmt = file_format(path)
    if fmt not in _WRITABLE or path.name.lower().endswith(".nhdr"):
        writable = [
            suffix for suffix, name in FILE_FORMATS.items() if name in _WRITABLE and suffix != ".nhdr"
        ]
        raise ValueError(f"{path}: cannot write {fmt} files; writable extensions: {', '.join(writable)}.")
    if not path.parent.is_dir():
        raise ValueError(f"{path}: the folder {path.parent} does not exist.")
    array = np.asarray(array)
    if array.ndim not in (3, 4) or tuple(array.shape[-3:]) != tuple(meta.shape):
        raise ValueError(
            f"{path}: array must have shape (C, *meta.shape) or meta.shape = {tuple(meta.shape)}, "
            f"got {array.shape}."
        )
    if array.ndim == 3:
        array = array[None]
    array = _disk_dtype(array, path)
    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix
    # A unique name that keeps the format's suffix; created by the writer itself, so it gets the usual
    # umask permissions (tempfile.mkstemp would leave the final file readable by its owner only).
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp{suffix}")
    try:
        (_write_nifti if fmt == "nifti" else _write_nrrd)(temp, array, meta)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return path


def _disk_dtype(array: np.ndarray, path: Path) -> np.ndarray:
    """float32 for floating data; the smallest of uint8, int16, int32 for bool/integer data."""
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        return array.astype(np.float32, copy=False)
    low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
    for dtype in (np.uint8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return array.astype(dtype, copy=False)
    raise ValueError(f"{path}: integer values [{low}, {high}] do not fit int32.")


def _write_nifti(path: Path, array: np.ndarray, meta: ImageMeta) -> None:
    """(C, X, Y, Z) -> NIfTI (X, Y, Z) or (X, Y, Z, C), with sform and qform both set to the affine."""
    data = array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)
    image = nib.Nifti1Image(data, meta.affine)
    image.set_sform(meta.affine, code="scanner")
    image.set_qform(meta.affine, code="scanner")
    image.header.set_xyzt_units(xyz="mm")
    nib.save(image, path)


def _write_nrrd(path: Path, array: np.ndarray, meta: ImageMeta) -> None:
    """(C, X, Y, Z) -> NRRD in LPS space; C > 1 becomes a leading ``vector`` axis (Slicer's layout)."""
    lps = flip_lps_ras(meta.affine)
    directions = lps[:3, :3].T  # one row per array axis
    header = {
        "space": "left-posterior-superior",
        "space origin": lps[:3, 3],
        "encoding": "gzip",
    }
    if array.shape[0] == 1:
        data = array[0]
        header["space directions"] = directions
        header["kinds"] = ["domain"] * 3
    else:
        data = array
        header["space directions"] = np.vstack([np.full((1, 3), np.nan), directions])
        header["kinds"] = ["vector", "domain", "domain", "domain"]
    nrrd.write(str(path), data, header, index_order="F")
