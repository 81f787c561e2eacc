"""DICOM series: round trips through real transfer syntaxes, geometry-ordered slices, and named errors."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless

from medmeta_plugin.io import read_dicom_series, read_image, write_dicom_series

SYNTAXES = {
    "explicit": ExplicitVRLittleEndian,
    "jpeg2000": JPEG2000Lossless,
    "jpegls": JPEGLSLossless,
    "rle": RLELossless,
}


def _shuffle_names(paths, seed=0):
    """Rename the files to a random permutation of unrelated names, so name order says nothing."""
    order = list(range(len(paths)))
    random.Random(seed).shuffle(order)
    temporary = [path.rename(path.with_name(f"tmp{k}")) for k, path in enumerate(paths)]
    return [path.rename(path.with_name(f"IM{order[k]:03d}")) for k, path in enumerate(temporary)]


@pytest.mark.parametrize("syntax", list(SYNTAXES))
def test_series_round_trip_with_shuffled_names(tmp_path, syntax, volume, meta, same_geometry):
    if syntax in ("jpeg2000", "jpegls"):
        pytest.importorskip("imagecodecs")
    paths = write_dicom_series(tmp_path / "series", volume, meta, transfer_syntax=syntax, modality="CT")
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == SYNTAXES[syntax]
    sop_uids = [str(pydicom.dcmread(path).SOPInstanceUID) for path in paths]
    _shuffle_names(paths)
    array, read_meta = read_dicom_series(tmp_path / "series")
    assert array.shape == (1, *volume.shape) and array.dtype == np.float32
    np.testing.assert_array_equal(array[0], volume)
    same_geometry(read_meta, meta, atol=1e-6)
    assert read_meta.extra["SOPInstanceUIDs"] == sop_uids
    assert read_meta.extra["Modality"] == "CT"
    assert read_meta.extra["SeriesInstanceUID"] == str(
        pydicom.dcmread(paths[0].parent / "IM000").SeriesInstanceUID
    )
    assert read_meta.source.endswith("series (series " + read_meta.extra["SeriesInstanceUID"] + ")")


def test_order_ignores_instance_numbers_and_uses_rescale(tmp_path, volume, meta):
    paths = write_dicom_series(tmp_path, volume, meta, modality="MR")
    for path, number in zip(paths, [5, 1, 8, 2, 7, 3, 6, 4]):
        dataset = pydicom.dcmread(path)
        dataset.InstanceNumber = number
        dataset.RescaleSlope, dataset.RescaleIntercept = "2", "-10"
        dataset.save_as(path)
    array, read_meta = read_image(tmp_path)
    np.testing.assert_array_equal(array[0], 2 * volume - 10)
    assert read_meta.extra["Modality"] == "MR"


def test_geometry_matches_itk(tmp_path, volume, meta):
    sitk = pytest.importorskip("SimpleITK")
    write_dicom_series(tmp_path, volume, meta)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path)))
    image = reader.Execute()
    _, read_meta = read_dicom_series(tmp_path)
    np.testing.assert_allclose(image.GetOrigin(), np.multiply(read_meta.origin, [-1, -1, 1]), atol=1e-4)
    lps = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(read_meta.direction)
    np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)), lps, atol=1e-5)
    np.testing.assert_allclose(image.GetSpacing(), read_meta.spacing, atol=1e-5)


def test_left_handed_grid_comes_back_with_slices_along_the_normal(tmp_path, volume, make_meta, same_geometry):
    left = make_meta(direction=np.diag([1.0, 1.0, -1.0]))  # slices run against row x column
    write_dicom_series(tmp_path, volume, left)
    array, read_meta = read_dicom_series(tmp_path)
    np.testing.assert_array_equal(array[0], volume[:, :, ::-1])
    flipped = left.affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, 7], [0, 0, 0, 1.0]])
    np.testing.assert_allclose(read_meta.affine, flipped, atol=1e-6)


def test_gantry_tilt_stays_in_the_affine(tmp_path, volume, make_meta):
    tilted = np.array([[1.0, 0, 0], [0, 1, 0.2], [0, 0, 1]])
    tilted /= np.linalg.norm(tilted, axis=0)
    meta = make_meta(direction=tilted)
    write_dicom_series(tmp_path, volume, meta)
    array, read_meta = read_dicom_series(tmp_path)
    np.testing.assert_array_equal(array[0], volume)
    np.testing.assert_allclose(read_meta.affine, meta.affine, atol=1e-6)


def test_non_dicom_files_and_other_series_can_be_skipped_or_chosen(tmp_path, volume, meta):
    first = write_dicom_series(tmp_path, volume, meta, file_prefix="a")
    write_dicom_series(tmp_path / "sub", volume + 1, meta, file_prefix="b")
    (tmp_path / "README.txt").write_text("exported by a PACS")
    (tmp_path / "DICOMDIR").write_bytes(b"\0" * 200)
    uid = str(pydicom.dcmread(first[0]).SeriesInstanceUID)
    array, read_meta = read_dicom_series(tmp_path, series_uid=uid)
    np.testing.assert_array_equal(array[0], volume)
    assert read_meta.extra["SeriesInstanceUID"] == uid


def test_a_single_slice_reads_with_its_thickness(tmp_path, volume, meta):
    write_dicom_series(tmp_path, volume[:, :, :1], dataclasses.replace(meta, shape=(12, 10, 1)))
    array, read_meta = read_dicom_series(tmp_path)
    assert array.shape == (1, 12, 10, 1)
    np.testing.assert_allclose(read_meta.spacing, meta.spacing, atol=1e-6)


def _make_invalid(case, folder, volume, meta):
    """Write the broken series named ``case`` into ``folder``; returns the folder to read."""
    if case == "empty folder":
        return folder
    if case == "no DICOM among the files":
        (folder / "notes.txt").write_text("not an image")
        return folder
    paths = write_dicom_series(folder, volume, meta)
    if case == "missing slice (gap)":
        paths[3].unlink()
    elif case == "two interleaved series":
        write_dicom_series(folder, volume, meta, file_prefix="other")
    elif case == "slice without pixel data":
        dataset = pydicom.dcmread(paths[2])
        del dataset.PixelData
        dataset.save_as(paths[2])
    elif case == "slice with another orientation":
        dataset = pydicom.dcmread(paths[5])
        dataset.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
        dataset.save_as(paths[5])
    elif case == "slice without position":
        dataset = pydicom.dcmread(paths[1])
        del dataset.ImagePositionPatient
        dataset.save_as(paths[1])
    elif case == "slice with a malformed orientation":
        dataset = pydicom.dcmread(paths[1])
        dataset.ImageOrientationPatient = [1, 0, 0, 0]
        dataset.save_as(paths[1])
    elif case == "slice with another matrix":
        dataset = pydicom.dcmread(paths[4])
        dataset.Rows = 9
        dataset.save_as(paths[4])
    elif case == "duplicate slice":
        dataset = pydicom.dcmread(paths[6])
        dataset.SOPInstanceUID = pydicom.uid.generate_uid()
        dataset.save_as(folder / "copy.dcm")
    elif case == "slice off the line":
        dataset = pydicom.dcmread(paths[4])
        dataset.ImagePositionPatient = [
            float(v) + (5.0 if i == 0 else 0.0) for i, v in enumerate(dataset.ImagePositionPatient)
        ]
        dataset.save_as(paths[4])
    elif case == "undecodable pixel data":
        paths = write_dicom_series(folder, volume, meta, transfer_syntax="rle", file_prefix="rle")
        dataset = pydicom.dcmread(paths[1])
        dataset.PixelData = dataset.PixelData[:40]
        dataset.save_as(paths[1])
        for path in folder.glob("slice_*"):
            path.unlink()
    elif case == "truncated DICOM header":
        data = paths[0].read_bytes()
        paths[0].write_bytes(data[:300])
    elif case == "unknown series_uid":
        pass
    return folder


INVALID = [
    ("empty folder", r"series: the folder holds no files; expected a DICOM series"),
    (
        "no DICOM among the files",
        r"series: no DICOM image found among 1 files \(skipped as not DICOM: notes\.txt",
    ),
    (
        "missing slice (gap)",
        r"series \(series [\d.]+\): gap in slice positions between slice_0002\.dcm .* and slice_0004\.dcm "
        r".*step 6\.000 mm where the series steps 3\.000 mm",
    ),
    (
        "two interleaved series",
        r"series: holds 2 DICOM series; pass series_uid to choose one of: "
        r"[\d.]+ \(8 files, CT\); [\d.]+ \(8 files, CT\)",
    ),
    ("slice without pixel data", r"slice_0002\.dcm: this file of .*series.* has no pixel data"),
    (
        "slice with another orientation",
        r"slice_0005\.dcm: ImageOrientationPatient \[1\.0, 0\.0, 0\.0, 0\.0, 0\.0, -1\.0\] differs from "
        r".* of slice_0000\.dcm",
    ),
    ("slice without position", r"slice_0001\.dcm: this file of .* lacks ImagePositionPatient; cannot place"),
    (
        "slice with a malformed orientation",
        r"slice_0001\.dcm: ImageOrientationPatient must hold 6 numbers, got \[1\.0, 0\.0, 0\.0, 0\.0\]",
    ),
    ("slice with another matrix", r"slice_0004\.dcm: matrix 9x12 differs from 10x12 of slice_0000\.dcm"),
    (
        "duplicate slice",
        r"series.*: files (copy\.dcm and slice_0006\.dcm|slice_0006\.dcm and copy\.dcm) "
        r"are at the same slice position",
    ),
    ("slice off the line", r"series.*: slice slice_0004\.dcm lies 5\.000 mm off the line"),
    (
        "undecodable pixel data",
        r"rle_0001\.dcm: cannot decode the pixel data of this file of .*series.* "
        r"\(transfer syntax RLE Lossless",
    ),
    ("truncated DICOM header", r"slice_0000\.dcm: DICOM file without SeriesInstanceUID; it is truncated"),
]


@pytest.mark.parametrize(("case", "match"), INVALID, ids=[case for case, _ in INVALID])
def test_invalid_series_name_the_file_and_the_problem(tmp_path, volume, meta, case, match):
    folder = tmp_path / "series"
    folder.mkdir()
    with pytest.raises(ValueError, match=match):
        read_dicom_series(_make_invalid(case, folder, volume, meta))


def test_unknown_series_uid_lists_the_series_found(tmp_path, volume, meta):
    write_dicom_series(tmp_path, volume, meta)
    with pytest.raises(
        ValueError, match=r"no image series with SeriesInstanceUID '1\.2\.3'; found: [\d.]+ \(8 files"
    ):
        read_dicom_series(tmp_path, series_uid="1.2.3")


@pytest.mark.parametrize(
    ("kwargs", "array", "match"),
    [
        ({"modality": "US"}, None, r"modality must be one of \['CT', 'MR'\], got 'US'"),
        ({"transfer_syntax": "jpeg"}, None, r"transfer_syntax must be one of .*'rle'\], got 'jpeg'"),
        ({}, np.full((12, 10, 8), 0.5), r"array must hold finite integer values"),
        ({}, np.full((12, 10, 8), 1e6), r"array values \[1000000, 1000000\] fit neither int16 nor uint16"),
        ({}, np.zeros((12, 10)), r"array must have shape meta.shape = \(12, 10, 8\).*, got \(12, 10\)"),
    ],
)
def test_invalid_writes_are_rejected(tmp_path, volume, meta, kwargs, array, match):
    with pytest.raises(ValueError, match=match):
        write_dicom_series(tmp_path, volume if array is None else array, meta, **kwargs)


def test_writing_never_overwrites(tmp_path, volume, meta):
    write_dicom_series(tmp_path, volume, meta)
    with pytest.raises(ValueError, match=r"would overwrite existing files \['slice_0000\.dcm'"):
        write_dicom_series(tmp_path, volume, meta)
