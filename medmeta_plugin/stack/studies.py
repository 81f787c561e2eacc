"""The sample scans as real DICOM series (pydicom, correct geometry and UIDs), loaded into Orthanc, and
their reference structures submitted as labels the way 3D Slicer submits them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread

from medmeta_plugin.io import read_image, read_label, write_dicom_series, write_image
from medmeta_plugin.paths import SAMPLE_DATA
from medmeta_plugin.stack.orthanc import OrthancServer

__all__ = ["SAMPLE_SERIES", "load_sample_studies", "sample_mask", "submit_sample_label"]

# folder in sample_apps/data/real -> (modality, patient id); two patients, as in the abdominal benchmark.
SAMPLE_SERIES = {"ct_abdomen_a": ("CT", "MEDMETA-A"), "mr_abdomen_d": ("MR", "MEDMETA-D")}


def load_sample_studies(server: OrthancServer, work: str | Path) -> dict[str, str]:
    """Write each sample scan as a DICOM series and store it in Orthanc.

    CT values are Hounsfield units (int16); MR intensities are rescaled to 0..4095 (uint12 range) as a
    scanner would store them.

    Returns:
        ``{sample folder: SeriesInstanceUID}`` (the image ids MONAI Label's DICOMweb datastore uses).
    """
    uids = {}
    for folder, (modality, patient) in SAMPLE_SERIES.items():
        array, meta = read_image(next((SAMPLE_DATA / folder).glob("image.*")))
        if modality == "MR":
            low, high = float(array.min()), float(array.max())
            array = (array - low) / max(high - low, 1e-6) * 4095
        files = write_dicom_series(
            Path(work) / folder,
            np.round(array).astype(np.int16),
            meta,
            modality=modality,
            patient_id=patient,
            series_description=f"medmeta sample {folder}",
        )
        server.upload(files)
        uids[folder] = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    return uids


def sample_mask(folder: str, structure: str) -> np.ndarray:
    """A sample scan's reference mask of one structure.

    Args:
        folder: a key of :data:`SAMPLE_SERIES`.
        structure: a name of the scan's ``labels.json``.

    Returns:
        Boolean array (X, Y, Z) on the scan's grid, which is also its DICOM series' grid (see
        :func:`load_sample_studies`).

    Raises:
        ValueError: for an unknown folder or structure (the message lists the valid ones).
    """
    if folder not in SAMPLE_SERIES:
        raise ValueError(f"unknown sample {folder!r}; samples: {sorted(SAMPLE_SERIES)}.")
    values = {n: int(v) for v, n in json.loads((SAMPLE_DATA / folder / "labels.json").read_text()).items()}
    if structure not in values:
        raise ValueError(f"{folder} has no structure {structure!r}; structures: {sorted(values)}.")
    label, _ = read_label(next((SAMPLE_DATA / folder).glob("label.*")))
    return label[0] == values[structure]


def submit_sample_label(server: str, folder: str, series_dir: str | Path, structures: Sequence[str]) -> Any:
    """Submit reference structures of a sample as a label of its DICOM series, as 3D Slicer does.

    ``PUT /datastore/label?image=<SeriesInstanceUID>`` with an NRRD label on the series' grid (values 1..n in
    the order of ``structures``) and ``params.label_info`` naming them.

    Args:
        server: the MONAI Label server's URL.
        folder: a key of :data:`SAMPLE_SERIES`.
        series_dir: the folder :func:`load_sample_studies` wrote the sample's series to.
        structures: names of the sample's ``labels.json``.

    Returns:
        The server's answer (JSON).
    """
    from monailabel.client import MONAILabelClient

    _, meta = read_image(series_dir)
    label = np.zeros(meta.shape, np.uint8)
    for value, name in enumerate(structures, start=1):
        label[sample_mask(folder, name)] = value
    series_uid = str(dcmread(next(Path(series_dir).glob("*.dcm")), stop_before_pixels=True).SeriesInstanceUID)
    path = write_image(Path(series_dir).parent / f"{folder}-label.nrrd", label[None], meta)
    try:
        client = MONAILabelClient(server, tmpdir=str(path.parent))
        info = [{"name": name, "idx": value} for value, name in enumerate(structures, start=1)]
        return client.save_label(series_uid, str(path), params={"label_info": info})
    finally:
        path.unlink(missing_ok=True)
