"""read_image / read_label: every format gives (C, X, Y, Z) + RAS geometry; errors name file and problem."""

from __future__ import annotations

import gzip
import os

import nibabel as nib
import nrrd
import numpy as np
import pytest

from medmeta_plugin.io import read_image, read_label, write_image
from medmeta_plugin.io.formats import file_format, flip_lps_ras


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.nii", "nifti"),
        ("a.NII.GZ", "nifti"),
        ("dir.v2/a.nrrd", "nrrd"),
        ("a.nhdr", "nrrd"),
        ("a.mha", "metaimage"),
        ("a.mhd", "metaimage"),
    ],
)
def test_file_format_from_suffix(name, expected):
    assert file_format(name) == expected


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("a.nii.zip", r"a\.nii\.zip: unknown .*'\.nii\.zip'.*Did you mean '\.nii\.gz'"),
        ("a", r"a: unknown .*'\(none\)'"),
    ],
)
def test_file_format_rejects_unknown_suffixes(name, match):
    with pytest.raises(ValueError, match=match):
        file_format(name)


def test_nifti_and_nrrd_written_by_their_own_libraries_agree(tmp_path, volume, meta, same_geometry):
    """Independent of write_image: nibabel gets the RAS affine, pynrrd a hand-made LPS header."""
    nib.save(nib.Nifti1Image(volume, meta.affine), tmp_path / "a.nii.gz")
    lps = flip_lps_ras(meta.affine)
    header = {"space": "LPS", "space directions": lps[:3, :3].T, "space origin": lps[:3, 3]}
    nrrd.write(str(tmp_path / "a.nrrd"), volume, header, index_order="F")
    for name in ("a.nii.gz", "a.nrrd"):
        array, read_meta = read_image(tmp_path / name)
        np.testing.assert_array_equal(array[0], volume)
        same_geometry(read_meta, meta)


@pytest.mark.parametrize(("space", "signs"), [("right-anterior-superior", (1, 1, 1)), ("LAS", (-1, 1, 1))])
def test_nrrd_spaces_are_converted_to_ras(tmp_path, volume, space, signs):
    header = {
        "space": space,
        "space directions": np.diag([0.8, 0.9, 3.0]),
        "space origin": np.array([1.0, 2, 3]),
    }
    nrrd.write(str(tmp_path / "a.nrrd"), volume, header, index_order="F")
    _, meta = read_image(tmp_path / "a.nrrd")
    np.testing.assert_allclose(meta.origin, np.multiply(signs, [1, 2, 3]))
    np.testing.assert_allclose(meta.direction, np.diag(signs))


def test_nrrd_without_world_geometry_reads_as_itk_does(tmp_path, volume):
    nrrd.write(str(tmp_path / "a.nrrd"), volume, {"spacings": [0.8, 0.9, 3.0]}, index_order="F")
    _, meta = read_image(tmp_path / "a.nrrd")
    np.testing.assert_allclose(meta.spacing, [0.8, 0.9, 3.0])
    np.testing.assert_allclose(meta.direction, np.diag([-1.0, -1.0, 1.0]))  # identity in LPS


def test_nifti_4d_becomes_channels_and_keeps_native_label_dtype(tmp_path, volume, meta):
    nib.save(nib.Nifti1Image(np.stack([volume, -volume], axis=-1), meta.affine), tmp_path / "a.nii")
    array, _ = read_image(tmp_path / "a.nii")
    np.testing.assert_array_equal(array, np.stack([volume, -volume]))


def test_metaimage_is_read_through_itk(tmp_path, volume, meta, same_geometry):
    sitk = pytest.importorskip("SimpleITK")
    image = sitk.GetImageFromArray(volume.transpose(2, 1, 0))
    lps = flip_lps_ras(meta.affine)
    image.SetSpacing(meta.spacing)
    image.SetOrigin(lps[:3, 3].tolist())
    image.SetDirection((lps[:3, :3] / np.asarray(meta.spacing)).ravel().tolist())
    sitk.WriteImage(image, str(tmp_path / "a.mha"))
    array, read_meta = read_image(tmp_path / "a.mha")
    np.testing.assert_array_equal(array[0], volume)
    same_geometry(read_meta, meta)


def test_read_label_returns_small_integers_and_checks_the_image(tmp_path, label, meta):
    path = write_image(tmp_path / "label.nii.gz", label.astype(np.float32), meta)
    read, label_meta = read_label(path, meta)
    assert read.dtype == np.uint8 and read.shape == (1, *meta.shape)
    np.testing.assert_array_equal(read, label)
    big, _ = read_label(write_image(tmp_path / "big.nrrd", label.astype(np.int32) * 1000, meta))
    assert big.dtype == np.int16


def test_nonfinite_voxels_can_be_allowed(tmp_path, volume, meta):
    volume[1, 2, 3] = np.nan
    array, _ = read_image(write_image(tmp_path / "nan.nii.gz", volume, meta), allow_nonfinite=True)
    assert np.isnan(array[0, 1, 2, 3])


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _make_invalid(case, folder, volume, label, meta, make_meta):
    """Write the invalid input named ``case``; returns (path to read, image meta or None)."""
    image = write_image(folder / "image.nii.gz", volume, meta)
    if case == "truncated .nii.gz":
        _truncate(image)
        return image, None
    if case == "truncated .nii":
        path = write_image(folder / "image.nii", volume, meta)
        _truncate(path)
        return path, None
    if case == "random bytes .nii.gz":
        path = folder / "random.nii.gz"
        path.write_bytes(os.urandom(2000))
        return path, None
    if case == "gzip of random bytes .nii.gz":
        path = folder / "random.nii.gz"
        path.write_bytes(gzip.compress(os.urandom(2000)))
        return path, None
    if case == "truncated .nrrd":
        path = write_image(folder / "image.nrrd", volume, meta)
        _truncate(path, keep=0.8)
        return path, None
    if case == "not an nrrd":
        path = folder / "text.nrrd"
        path.write_text("hello\n")
        return path, None
    if case == "empty file":
        path = folder / "empty.nrrd"
        path.touch()
        return path, None
    if case == "unknown extension":
        (folder / "image.png").write_bytes(b"\x89PNG")
        return folder / "image.png", None
    if case == "missing file":
        return folder / "nothere.nii.gz", None
    if case == "empty folder":
        (folder / "empty_dir").mkdir()
        return folder / "empty_dir", None
    if case == "2D image":
        path = folder / "flat.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros((4, 5), np.float32), np.eye(4)), path)
        return path, None
    if case == "image with NaN":
        volume = volume.copy()
        volume[3, 4, 5] = np.nan
        return write_image(folder / "nan.nii.gz", volume, meta), None
    if case == "label with wrong shape":
        small = make_meta(shape=(12, 10, 7))
        return write_image(folder / "label.nii.gz", label[:, :, :, :7], small), meta
    if case == "label with shifted origin":
        shifted = make_meta(origin=(10.5, -20.25, 36.0))
        return write_image(folder / "label.nii.gz", label, shifted), meta
    if case == "label with other spacing":
        return write_image(folder / "label.nrrd", label, make_meta(spacing=(0.8, 0.9, 2.5))), meta
    if case == "label with non-integer values":
        return write_image(folder / "label.nii.gz", label + np.float32(0.5), meta), meta
    if case == "label with negative values":
        return write_image(folder / "label.nii.gz", label.astype(np.int16) - 1, meta), meta
    if case == "label with two channels":
        return write_image(folder / "label.nii.gz", np.concatenate([label, label]), meta), meta
    raise KeyError(case)


INVALID = [
    ("truncated .nii.gz", r"image\.nii\.gz: cannot read NIfTI file: the file is truncated"),
    ("truncated .nii", r"image\.nii: cannot read NIfTI file: the file is truncated"),
    (
        "random bytes .nii.gz",
        r"random\.nii\.gz: cannot read NIfTI file: the gzip stream is corrupt or not gzip",
    ),
    ("gzip of random bytes .nii.gz", r"random\.nii\.gz: cannot read NIfTI file"),
    ("truncated .nrrd", r"image\.nrrd: cannot read NRRD file: the file is truncated"),
    ("not an nrrd", r"text\.nrrd: cannot read NRRD file: this is not a NRRD file"),
    ("empty file", r"empty\.nrrd: the file is empty"),
    ("unknown extension", r"image\.png: unknown image file extension '\.png'; supported: \.nii"),
    ("missing file", r"nothere\.nii\.gz: no such file or folder"),
    ("empty folder", r"empty_dir: the folder holds no files"),
    ("2D image", r"flat\.nii\.gz: expected a 3D image .*got array shape \(4, 5\)"),
    ("image with NaN", r"nan\.nii\.gz: image holds 1 NaN/inf voxels .*\(0, 3, 4, 5\)"),
    (
        "label with wrong shape",
        r"label .*label\.nii\.gz does not match .*image\.nii\.gz: shape \(12, 10, 7\) !=",
    ),
    ("label with shifted origin", r"label\.nii\.gz does not match .*image\.nii\.gz: origin differs by 3 mm"),
    ("label with other spacing", r"label\.nrrd does not match .*image\.nii\.gz: spacing differs by 0\.5 mm"),
    ("label with non-integer values", r"label\.nii\.gz: label holds 960 non-integer values \(e\.g\. \d\.5\)"),
    ("label with negative values", r"label\.nii\.gz: label holds negative values \(min -1\)"),
    ("label with two channels", r"label\.nii\.gz: a label must have one channel, got .*\(2, 12, 10, 8\)"),
]


@pytest.mark.parametrize(("case", "match"), INVALID, ids=[case for case, _ in INVALID])
def test_invalid_inputs_name_the_file_and_the_problem(tmp_path, volume, label, meta, make_meta, case, match):
    path, image_meta = _make_invalid(case, tmp_path, volume, label, meta, make_meta)
    if case.startswith("label"):
        image_meta = read_image(tmp_path / "image.nii.gz")[1]
        with pytest.raises(ValueError, match=match):
            read_label(path, image_meta)
    else:
        with pytest.raises(ValueError, match=match):
            read_image(path)
