"""The DICOM series writer on its own, read back with pydicom and with the project's ``read_image``.

Beyond the round trips and refusals of ``test_dicom.py``:

- every modality and transfer syntax stores the extremes of int16 and uint16 without loss, with the pixel
  representation and intercept documented (JPEG-LS unsigned, shifted by the minimum);
- each slice's header says where it lies: position = LPS origin + k x the slice axis, the row and column
  cosines, spacing between rows then columns, Rows = Y and Columns = X, pixels transposed to (Rows, Columns);
- identity: files named and numbered in slice order, given UIDs kept and the others fresh per call, one
  frame of reference per series, unique instance UIDs, patient and description written;
- a (1, X, Y, Z) array writes as its (X, Y, Z) volume; a missing folder is made;
- a refused write (values, shape, plane, names, a file in the way) names what is wrong and leaves the disk
  as it was.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medmeta_plugin.io import ImageMeta, read_image, write_dicom_series
from medmeta_plugin.io.dicom_writer import DICOM_TRANSFER_SYNTAXES
from medmeta_plugin.io.formats import flip_lps_ras

SOP_CLASSES = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}
RANGES = {"unsigned": (0, 65535), "signed": (-32768, 32767)}


def _extremes(shape: tuple[int, int, int], value_range: str) -> np.ndarray:
    """Random integers of ``value_range`` with both of its ends present, shape (X, Y, Z), float64."""
    low, high = RANGES[value_range]
    array = np.random.default_rng(1).integers(low, high, shape, endpoint=True).astype(np.float64)
    array[0, 0, 0], array[-1, -1, -1] = low, high
    return array


def _read(paths: list[Path]) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(path) for path in paths]


STORAGE = [
    # modality, transfer syntax, value range, PixelRepresentation, RescaleIntercept
    ("CT", "explicit", "unsigned", 0, 0.0),
    ("MR", "explicit", "signed", 1, 0.0),
    ("MR", "rle", "unsigned", 0, 0.0),
    ("CT", "rle", "signed", 1, 0.0),
    ("CT", "jpegls", "unsigned", 0, 0.0),
    ("MR", "jpegls", "signed", 0, -32768.0),  # the encoder takes unsigned samples: value - min
    ("CT", "jpeg2000", "unsigned", 0, 0.0),
    ("MR", "jpeg2000", "signed", 1, 0.0),
]


@pytest.mark.parametrize(("modality", "syntax", "value_range", "representation", "intercept"), STORAGE)
def test_the_extremes_of_each_range_are_stored_without_loss(
    tmp_path, meta, modality, syntax, value_range, representation, intercept
) -> None:
    if syntax in ("jpeg2000", "jpegls"):
        pytest.importorskip("imagecodecs")
    volume = _extremes(meta.shape, value_range)
    paths = write_dicom_series(tmp_path, volume, meta, modality=modality, transfer_syntax=syntax)
    for k, dataset in enumerate(_read(paths)):
        assert dataset.file_meta.TransferSyntaxUID == DICOM_TRANSFER_SYNTAXES[syntax]
        assert dataset.SOPClassUID == dataset.file_meta.MediaStorageSOPClassUID == SOP_CLASSES[modality]
        assert dataset.Modality == modality
        assert dataset.PixelRepresentation == representation
        assert (dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit) == (16, 16, 15)
        assert float(dataset.RescaleSlope) == 1.0 and float(dataset.RescaleIntercept) == intercept
        assert dataset.get("LossyImageCompression", "00") == "00"
        pixels = dataset.pixel_array.astype(np.float64) + intercept
        np.testing.assert_array_equal(pixels, volume[:, :, k].T)
    array, read_meta = read_image(tmp_path)
    np.testing.assert_array_equal(array[0], volume)
    assert read_meta.extra["Modality"] == modality


def _permuted(meta: ImageMeta) -> ImageMeta:
    """A sagittal grid: X along anterior, Y along superior, Z along right (a right-handed permutation)."""
    direction = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    affine = np.eye(4)
    affine[:3, :3] = direction * np.asarray(meta.spacing)[None, :]
    affine[:3, 3] = meta.origin
    return ImageMeta.from_affine(affine, meta.shape)


GEOMETRIES = {
    "rotated and flipped": lambda meta: meta,
    "axial": lambda meta: dataclasses.replace(meta, direction=tuple(map(tuple, np.eye(3)))),
    "sagittal": _permuted,
}


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_each_slice_header_says_where_it_lies(tmp_path, volume, meta, geometry) -> None:
    grid = GEOMETRIES[geometry](meta)
    paths = write_dicom_series(tmp_path, volume, grid)
    lps = flip_lps_ras(grid.affine)
    spacing = np.asarray(grid.spacing)
    for k, dataset in enumerate(_read(paths)):
        position = np.array(dataset.ImagePositionPatient, dtype=np.float64)
        np.testing.assert_allclose(position, lps[:3, 3] + k * lps[:3, 2], atol=1e-9)
        orientation = np.array(dataset.ImageOrientationPatient, dtype=np.float64)
        np.testing.assert_allclose(orientation[:3], lps[:3, 0] / spacing[0], atol=1e-9)
        np.testing.assert_allclose(orientation[3:], lps[:3, 1] / spacing[1], atol=1e-9)
        np.testing.assert_allclose(np.array(dataset.PixelSpacing, dtype=np.float64), spacing[[1, 0]])
        assert float(dataset.SliceThickness) == pytest.approx(spacing[2])
        assert (dataset.Rows, dataset.Columns) == (volume.shape[1], volume.shape[0])
        np.testing.assert_array_equal(dataset.pixel_array, volume[:, :, k].T)


def test_files_are_named_numbered_and_identified_as_one_series(tmp_path, volume, meta) -> None:
    paths = write_dicom_series(
        tmp_path,
        volume,
        meta,
        series_uid="1.2.826.0.1.3680043.8.498.1",
        study_uid="1.2.826.0.1.3680043.8.498.2",
        series_description="thorax, 3 mm",
        patient_id="P-0042",
        file_prefix="ct",
    )
    assert paths == [tmp_path / f"ct_{k:04d}.dcm" for k in range(meta.shape[2])]
    assert sorted(tmp_path.iterdir()) == paths
    datasets = _read(paths)
    assert [int(ds.InstanceNumber) for ds in datasets] == list(range(1, len(paths) + 1))
    assert {ds.SeriesInstanceUID for ds in datasets} == {"1.2.826.0.1.3680043.8.498.1"}
    assert {ds.StudyInstanceUID for ds in datasets} == {"1.2.826.0.1.3680043.8.498.2"}
    assert len({ds.FrameOfReferenceUID for ds in datasets}) == 1
    assert len({ds.SOPInstanceUID for ds in datasets}) == len(paths)
    for ds in datasets:
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.PatientID == "P-0042" and str(ds.PatientName) == "P-0042"
        assert ds.SeriesDescription == "thorax, 3 mm" and ds.PhotometricInterpretation == "MONOCHROME2"
    assert all(path.read_bytes()[128:132] == b"DICM" for path in paths)  # a DICOM file, preamble first
    _, read_meta = read_image(tmp_path)
    assert read_meta.extra["SeriesInstanceUID"] == "1.2.826.0.1.3680043.8.498.1"
    assert read_meta.extra["StudyInstanceUID"] == "1.2.826.0.1.3680043.8.498.2"
    assert read_meta.extra["SeriesDescription"] == "thorax, 3 mm"


def test_uids_not_given_are_fresh_for_each_series(tmp_path, volume, meta) -> None:
    first = _read(write_dicom_series(tmp_path / "a", volume, meta))[0]
    second = _read(write_dicom_series(tmp_path / "b", volume, meta))[0]
    for name in ("SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID", "SOPInstanceUID"):
        assert getattr(first, name) != getattr(second, name), name
        assert pydicom.uid.UID(getattr(first, name)).is_valid


def test_a_channel_first_array_writes_as_its_volume_into_a_new_folder(tmp_path, volume, meta) -> None:
    folder = tmp_path / "new" / "series"
    paths = write_dicom_series(folder, volume[None], meta)
    assert folder.is_dir() and len(paths) == meta.shape[2]
    array, _ = read_image(folder)
    np.testing.assert_array_equal(array[0], volume)


def _skewed(meta: ImageMeta) -> ImageMeta:
    """The grid with its column axis 10 degrees off perpendicular to its row axis."""
    direction = np.asarray(meta.direction).copy()
    angle = np.deg2rad(10.0)
    direction[:, 1] = np.cos(angle) * direction[:, 1] + np.sin(angle) * direction[:, 0]
    return dataclasses.replace(meta, direction=tuple(map(tuple, direction)), source="skewed.nii")


INVALID = [
    # what is changed, the change (array, meta -> array, meta, kwargs), message
    ("below int16", lambda a, m: (a - a.max() - 32769, m, {}), r"array values \[-\d+, -32769\] fit neither"),
    (
        "above uint16",
        lambda a, m: (np.maximum(a, 0) + 65536, m, {}),
        r"array values \[65536, \d+\] fit neither",
    ),
    ("NaN", lambda a, m: (np.where(a > 1500, np.nan, a), m, {}), r"array must hold finite integer values"),
    ("inf", lambda a, m: (np.where(a > 1500, np.inf, a), m, {}), r"array must hold finite integer values"),
    (
        "two channels",
        lambda a, m: (np.stack([a, a]), m, {}),
        r"meta\.shape = \(12, 10, 8\).*got \(2, 12, 10, 8\)",
    ),
    ("one slice short", lambda a, m: (a[:, :, :7], m, {}), r"meta\.shape = \(12, 10, 8\).*got \(12, 10, 7\)"),
    ("skewed plane", lambda a, m: (a, _skewed(m), {}), r"skewed\.nii: the first two direction columns"),
    ("lower-case modality", lambda a, m: (a, m, {"modality": "ct"}), r"modality must be one of .*got 'ct'"),
    ("unknown syntax", lambda a, m: (a, m, {"transfer_syntax": "jpeg2000lossy"}), r"got 'jpeg2000lossy'"),
]


@pytest.mark.parametrize(("case", "change", "match"), INVALID, ids=[case for case, _, _ in INVALID])
def test_a_refused_write_names_the_problem_and_writes_nothing(tmp_path, volume, meta, case, change, match):
    array, grid, kwargs = change(volume.astype(np.float64), meta)
    folder = tmp_path / "series"
    with pytest.raises(ValueError, match=match):
        write_dicom_series(folder, array, grid, **kwargs)
    assert not folder.exists()


def test_one_file_in_the_way_stops_the_whole_series(tmp_path, volume, meta) -> None:
    (tmp_path / "slice_0005.dcm").write_bytes(b"someone else's slice")
    with pytest.raises(ValueError, match=r"would overwrite existing files \['slice_0005\.dcm'\]"):
        write_dicom_series(tmp_path, volume, meta)
    assert [path.name for path in tmp_path.iterdir()] == ["slice_0005.dcm"]
    assert (tmp_path / "slice_0005.dcm").read_bytes() == b"someone else's slice"
    assert len(write_dicom_series(tmp_path, volume, meta, file_prefix="other")) == meta.shape[2]
