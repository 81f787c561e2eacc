"""The sample studies of the clinical stack: the sample table, :func:`sample_mask` on the shipped scans
(valid and invalid folders and structures), :func:`submit_sample_label`'s input errors, raised before any
request, and (with Orthanc, ``-m stack``) the DICOM series :func:`load_sample_studies` writes: the scan's
grid, CT in Hounsfield units, MR rescaled to 0..4095.

``test_orthanc.py`` and ``test_ohif.py`` cover the series served over DICOMweb and a submitted label.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom import dcmread

from medmeta_plugin.io import read_image, write_dicom_series
from medmeta_plugin.names import validate_name
from medmeta_plugin.paths import SAMPLE_DATA
from medmeta_plugin.stack.studies import SAMPLE_SERIES, load_sample_studies, sample_mask, submit_sample_label

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: a request would fail, never answer


def _names(folder: str) -> dict[str, int]:
    return {n: int(v) for v, n in json.loads((SAMPLE_DATA / folder / "labels.json").read_text()).items()}


def _label(folder: str) -> np.ndarray:
    """The sample's label map as nibabel reads it (independently of the project's readers)."""
    return np.asarray(nib.load(str(SAMPLE_DATA / folder / "label.nii.gz")).dataobj)


@pytest.mark.parametrize("folder", sorted(SAMPLE_SERIES))
def test_every_sample_is_a_shipped_scan_of_its_own_patient(folder: str) -> None:
    modality, patient = SAMPLE_SERIES[folder]
    assert modality in ("CT", "MR")
    assert validate_name(patient, "patient id") == patient
    assert len(list((SAMPLE_DATA / folder).glob("image.*"))) == 1
    assert len(list((SAMPLE_DATA / folder).glob("label.*"))) == 1
    assert _names(folder)


def test_the_samples_are_two_patients_and_both_modalities() -> None:
    assert sorted(m for m, _ in SAMPLE_SERIES.values()) == ["CT", "MR"]
    assert len({p for _, p in SAMPLE_SERIES.values()}) == len(SAMPLE_SERIES)


@pytest.mark.parametrize(
    ("folder", "structure"),
    [
        ("ct_abdomen_a", "kidney_left"),
        ("ct_abdomen_a", "gallbladder"),
        ("ct_abdomen_a", "costal_cartilages"),  # the highest label value of the CT
        ("mr_abdomen_d", "kidney_left"),
        ("mr_abdomen_d", "iliopsoas_right"),
    ],
)
def test_sample_masks_are_the_structures_voxels_on_the_scans_grid(folder: str, structure: str) -> None:
    mask = sample_mask(folder, structure)
    label = _label(folder)
    image, _ = read_image(next((SAMPLE_DATA / folder).glob("image.*")))
    assert mask.dtype == np.bool_ and mask.shape == label.shape == image.shape[1:]
    np.testing.assert_array_equal(mask, label == _names(folder)[structure])
    assert mask.any()


def test_masks_of_two_structures_are_disjoint() -> None:
    kidney, gallbladder = (
        sample_mask("ct_abdomen_a", "kidney_left"),
        sample_mask("ct_abdomen_a", "gallbladder"),
    )
    assert kidney.any() and gallbladder.any() and not (kidney & gallbladder).any()


INVALID_MASKS = [
    pytest.param(
        "mr_brain_tumour_1",  # shipped, but not one of the stack's series
        "tumour",
        r"unknown sample 'mr_brain_tumour_1'; samples: \['ct_abdomen_a', 'mr_abdomen_d'\]",
        id="not-a-series",
    ),
    pytest.param("ct_abdomen_b", "kidney_left", r"unknown sample 'ct_abdomen_b'", id="unknown-folder"),
    pytest.param("", "kidney_left", r"unknown sample ''", id="empty-folder"),
    pytest.param(
        "ct_abdomen_a",
        "liver",
        r"ct_abdomen_a has no structure 'liver'; structures: \['adrenal_gland_left', ",
        id="unlabelled",
    ),
    pytest.param("ct_abdomen_a", "lung_right", r"ct_abdomen_a has no structure 'lung_right'", id="mr-only"),
    pytest.param("mr_abdomen_d", "sacrum", r"mr_abdomen_d has no structure 'sacrum'", id="ct-only"),
    pytest.param("ct_abdomen_a", "Kidney_Left", r"no structure 'Kidney_Left'", id="case"),
]


@pytest.mark.parametrize(("folder", "structure", "match"), INVALID_MASKS)
def test_invalid_sample_masks_name_the_value_and_list_the_valid_ones(
    folder: str, structure: str, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        sample_mask(folder, structure)


@pytest.fixture(scope="module")
def mr_series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The MR sample as a DICOM series (20 slices), written as :func:`load_sample_studies` writes it."""
    array, meta = read_image(SAMPLE_DATA / "mr_abdomen_d" / "image.nii.gz")
    scaled = (array - array.min()) / (array.max() - array.min()) * 4095
    folder = tmp_path_factory.mktemp("dicom") / "mr_abdomen_d"
    write_dicom_series(folder, np.round(scaled).astype(np.int16), meta, modality="MR")
    return folder


@pytest.mark.parametrize(
    ("folder", "structures", "match"),
    [
        ("mr_abdomen_d", ["kidney_left", "liver"], r"mr_abdomen_d has no structure 'liver'"),
        ("mr_abdomen_d", ["sacrum"], r"no structure 'sacrum'"),
        ("mr_abdomen_e", ["kidney_left"], r"unknown sample 'mr_abdomen_e'"),
    ],
)
def test_submitting_an_unknown_structure_fails_before_any_request(
    mr_series: Path, folder: str, structures: list[str], match: str
) -> None:
    before = set(mr_series.parent.iterdir())
    with pytest.raises(ValueError, match=match):
        submit_sample_label(UNREACHABLE, folder, mr_series, structures)
    assert set(mr_series.parent.iterdir()) == before, "no label file is left behind"


@pytest.mark.stack
def test_loaded_series_hold_the_scans_on_their_grid(tmp_path: Path) -> None:
    from medmeta_plugin.stack.orthanc import OrthancServer

    with OrthancServer(tmp_path / "orthanc") as server:
        uids = load_sample_studies(server, tmp_path / "dicom")
        stored = server.get("/series")
    assert len(stored) == len(SAMPLE_SERIES)
    for folder, (modality, patient) in SAMPLE_SERIES.items():
        original, original_meta = read_image(next((SAMPLE_DATA / folder).glob("image.*")))
        series, series_meta = read_image(tmp_path / "dicom" / folder)
        first = dcmread(next((tmp_path / "dicom" / folder).glob("*.dcm")), stop_before_pixels=True)
        assert (first.Modality, first.PatientID, str(first.SeriesInstanceUID)) == (
            modality,
            patient,
            uids[folder],
        )
        assert series.shape == original.shape
        np.testing.assert_allclose(series_meta.affine, original_meta.affine, atol=1e-3)
        if modality == "CT":
            np.testing.assert_allclose(series, np.round(original), atol=0.5)  # Hounsfield units, kept
        else:
            assert (float(series.min()), float(series.max())) == (0.0, 4095.0)
            # A linear rescale: the ranks of the intensities are kept.
            assert np.corrcoef(series.ravel(), original.ravel())[0, 1] > 0.999
