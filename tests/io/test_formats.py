"""File formats on their own, beyond the suffix cases in ``test_readers.py``.

- :func:`file_format` knows every suffix of :data:`FILE_FORMATS` whatever its case, looks at the file name
  only (not the folders, not the disk), and refuses other names with a ``ValueError`` that names the file,
  the suffix, the supported ones and, where one is close, the likely one.
- :func:`flip_lps_ras` is its own inverse exactly, negates the x and y world coordinates of every voxel and
  nothing else, and returns a new float64 array without touching its input.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from medmeta_plugin.io.formats import FILE_FORMATS, file_format, flip_lps_ras

SUPPORTED = r"supported: \.nii, \.nii\.gz, \.nrrd, \.nhdr, \.mha, \.mhd or a folder holding a DICOM series\."


def test_the_formats_are_the_documented_three() -> None:
    assert set(FILE_FORMATS.values()) == {"nifti", "nrrd", "metaimage"}
    assert all(suffix == suffix.lower() and suffix.startswith(".") for suffix in FILE_FORMATS)


@pytest.mark.parametrize(("suffix", "expected"), list(FILE_FORMATS.items()))
@pytest.mark.parametrize("stem", ["scan", "CT.Thorax", "case.001"])
def test_every_suffix_is_known_in_any_case(suffix: str, expected: str, stem: str) -> None:
    assert file_format(stem + suffix) == expected
    assert file_format(stem + suffix.upper()) == expected
    assert file_format(Path("/data") / (stem + suffix)) == expected


VALID = [
    ("study.nii/scan.mha", "metaimage"),  # a folder that looks like another format does not count
    ("scan.seg.nrrd", "nrrd"),
    ("scan.nhdr.nii", "nifti"),  # the last suffix decides
    ("labels.nii.gz", "nifti"),  # .nii.gz, not a bare .gz
    (".nii", "nifti"),  # a name that is only the suffix
]


@pytest.mark.parametrize(("name", "expected"), VALID)
def test_only_the_file_name_decides(name: str, expected: str) -> None:
    assert file_format(name) == expected


def test_the_file_need_not_exist(tmp_path: Path) -> None:
    assert file_format(tmp_path / "missing" / "scan.nhdr") == "nrrd"
    assert not (tmp_path / "missing").exists()


INVALID = [
    ("scan.dcm", r"'\.dcm'", None),
    ("scan.png", r"'\.png'", None),
    ("scan.tar.gz", r"'\.tar\.gz'", None),
    ("scan.gz", r"'\.gz'", ".nii.gz"),
    ("scan.nrd", r"'\.nrd'", ".nrrd"),
    ("scan.hdr", r"'\.hdr'", ".nhdr"),
    ("scan.MH", r"'\.mh'", ".mhd"),
    ("scan.nii.bak", r"'\.nii\.bak'", ".nii.gz"),
    ("export.nrrd/case.v2/scan", r"'\(none\)'", None),  # the folders' suffixes are not the file's
]


@pytest.mark.parametrize(("name", "suffix", "close"), INVALID)
def test_unknown_suffixes_name_the_file_the_supported_ones_and_the_closest(
    name: str, suffix: str, close: str | None
) -> None:
    with pytest.raises(ValueError) as raised:
        file_format(Path(name))
    message = str(raised.value)
    assert message.startswith(f"{Path(name)}: unknown image file extension ")
    assert re.search(suffix + "; " + SUPPORTED, message)
    if close is None:
        assert "Did you mean" not in message
    else:
        assert message.endswith(f" Did you mean {close!r}?")


AFFINES = {
    "identity": np.eye(4),
    "anisotropic": np.diag([0.8, 0.9, 3.0, 1.0]),
    "integer": np.array([[0, 0, -2, 10], [1, 0, 0, -5], [0, 3, 0, 7], [0, 0, 0, 1]]),
}


@pytest.fixture(params=[*AFFINES, "rotated"])
def affine(request: pytest.FixtureRequest, meta) -> np.ndarray:
    """An identity, a scaled, an integer permuted and a rotated, flipped, off-origin affine."""
    return meta.affine if request.param == "rotated" else AFFINES[request.param]


def test_flip_is_its_own_inverse_exactly(affine: np.ndarray) -> None:
    np.testing.assert_array_equal(flip_lps_ras(flip_lps_ras(affine)), affine)


def test_flip_negates_x_and_y_of_every_voxel_and_nothing_else(affine: np.ndarray) -> None:
    voxels = np.c_[np.random.default_rng(0).uniform(-5.0, 20.0, (10, 3)), np.ones(10)].T
    ras, lps = affine @ voxels, flip_lps_ras(affine) @ voxels
    np.testing.assert_allclose(lps[:2], -ras[:2], rtol=0, atol=1e-12)
    np.testing.assert_allclose(lps[2:], ras[2:], rtol=0, atol=1e-12)


def test_flip_returns_a_new_float64_array_and_leaves_its_input(affine: np.ndarray) -> None:
    before = np.array(affine, copy=True)
    flipped = flip_lps_ras(affine)
    assert flipped.dtype == np.float64 and flipped.shape == (4, 4)
    assert not np.shares_memory(flipped, affine)
    np.testing.assert_array_equal(affine, before)
    np.testing.assert_array_equal(flip_lps_ras(affine.tolist()), flipped)  # nested lists read alike
