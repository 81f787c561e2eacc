"""DICOM SEG written for the DICOMweb datastore: each segment carries the name of the value it holds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from medmeta_plugin.app.dicomweb import write_seg
from medmeta_plugin.io import ImageMeta, write_dicom_series, write_image

SHAPE = (6, 5, 4)  # (X, Y, Z): columns, rows, slices


@pytest.fixture
def series(tmp_path: Path) -> tuple[Path, ImageMeta]:
    """A small CT series (3 x 2.5 x 4 mm voxels, LPS-flipped like a scanner's) and its geometry."""
    affine = np.diag([-3.0, -2.5, 4.0, 1.0])
    affine[:3, 3] = (12.0, -7.5, 30.0)
    meta = ImageMeta.from_affine(affine, SHAPE, source="synthetic")
    volume = np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE)
    write_dicom_series(tmp_path / "series", volume, meta, modality="CT")
    return tmp_path / "series", meta


def _label(tmp_path: Path, meta: ImageMeta, values: dict[int, tuple[slice, ...]]) -> Path:
    label = np.zeros(SHAPE, np.uint8)
    for value, where in values.items():
        label[where] = value
    return write_image(tmp_path / "label.nii.gz", label[None], meta)


def _write(folder: Path, label: Path, names: dict[str, int]) -> pydicom.Dataset | None:
    """Write the SEG, read it back and delete the file (MONAI Label's converter writes it to /tmp)."""
    path = write_seg(str(folder), label, names, "medmeta label")
    if not path:
        return None
    try:
        return pydicom.dcmread(path)
    finally:
        Path(path).unlink()


def _segments(seg: pydicom.Dataset) -> dict[int, tuple[str, int]]:
    """``{segment number: (label, voxel count)}`` of a SEG."""
    frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), seg.Rows, seg.Columns)
    counts: dict[int, int] = {}
    for frame, group in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        number = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        counts[number] = counts.get(number, 0) + int(frame.sum())
    return {
        int(s.SegmentNumber): (str(s.SegmentLabel), counts[int(s.SegmentNumber)]) for s in seg.SegmentSequence
    }


VALID = [
    # (names, voxels per value in the label, expected {segment: (name, voxels)})
    ({"liver": 1, "spleen": 2}, {1: 6, 2: 4}, {1: ("liver", 6), 2: ("spleen", 4)}),
    # A structure named but absent ("absent here") must not shift the names of the others.
    ({"kidney_left": 1, "liver": 2, "spleen": 3}, {2: 6, 3: 4}, {2: ("liver", 6), 3: ("spleen", 4)}),
    ({"aorta": 5, "liver": 2}, {5: 4}, {5: ("aorta", 4)}),
]
_WHERE = {6: (slice(0, 3), slice(0, 2), 0), 4: (slice(2, 4), slice(3, 5), 2)}


@pytest.mark.parametrize(("names", "voxels", "expected"), VALID)
def test_segments_are_named_by_their_value(tmp_path, series, names, voxels, expected) -> None:
    folder, meta = series
    label = _label(tmp_path, meta, {value: _WHERE[count] for value, count in voxels.items()})
    seg = _write(folder, label, names)
    assert _segments(seg) == expected
    assert seg.SeriesDescription == "medmeta label"
    assert (
        seg.ReferencedSeriesSequence[0].SeriesInstanceUID
        == pydicom.dcmread(next(folder.iterdir())).SeriesInstanceUID
    )


INVALID = [
    ({"liver": 1}, {}),  # nothing labelled
    ({"liver": 1}, {2: 6}),  # only a value that is not named (the datastore refuses such labels before)
]


@pytest.mark.parametrize(("names", "voxels"), INVALID)
def test_no_named_structure_present_writes_no_seg(tmp_path, series, names, voxels) -> None:
    folder, meta = series
    label = _label(tmp_path, meta, {value: _WHERE[count] for value, count in voxels.items()})
    assert _write(folder, label, names) is None
