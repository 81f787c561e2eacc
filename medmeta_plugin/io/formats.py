"""File formats known to ``medmeta_plugin.io``: suffix dispatch and the LPS/RAS world conventions."""

from __future__ import annotations

import difflib
from pathlib import Path

import numpy as np

__all__ = ["FILE_FORMATS", "file_format", "flip_lps_ras"]

#: Suffix (lower case) -> format name. A folder is read as a DICOM series instead.
FILE_FORMATS: dict[str, str] = {
    ".nii": "nifti",
    ".nii.gz": "nifti",
    ".nrrd": "nrrd",
    ".nhdr": "nrrd",
    ".mha": "metaimage",
    ".mhd": "metaimage",
}


def file_format(path: str | Path) -> str:
    """Name the format of an image file from its suffix.

    Args:
        path: image file name; only the name is looked at, the file need not exist.

    Returns:
        One of the values of :data:`FILE_FORMATS` (``"nifti"``, ``"nrrd"``, ``"metaimage"``).

    Raises:
        ValueError: if the suffix is not one of :data:`FILE_FORMATS`; the message names the file, the
            suffixes that are supported and the closest one.
    """
    name = Path(path).name.lower()
    # Longest suffix first, so ".nii.gz" wins over a bare ".gz".
    for suffix in sorted(FILE_FORMATS, key=len, reverse=True):
        if name.endswith(suffix):
            return FILE_FORMATS[suffix]
    suffix = "".join(Path(name).suffixes[-2:]) or "(none)"
    close = difflib.get_close_matches(suffix, list(FILE_FORMATS), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(
        f"{path}: unknown image file extension {suffix!r}; supported: {', '.join(FILE_FORMATS)} "
        f"or a folder holding a DICOM series.{hint}"
    )


def flip_lps_ras(affine: np.ndarray) -> np.ndarray:
    """Convert a voxel-to-world affine between LPS (DICOM, ITK, NRRD) and RAS (NIfTI, MONAI).

    The two conventions differ by the sign of the x and y world axes, so the conversion is its own inverse.

    Args:
        affine: voxel-to-world matrix, shape (4, 4).

    Returns:
        The converted matrix, shape (4, 4), float64 (a new array).
    """
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, dtype=np.float64)
