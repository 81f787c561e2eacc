"""The sample scans as real DICOM series (pydicom, correct geometry and UIDs), loaded into Orthanc."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom import dcmread

from medmeta_plugin.io import read_image, write_dicom_series
from medmeta_plugin.stack.orthanc import OrthancServer

__all__ = ["SAMPLE_SERIES", "load_sample_studies"]

SAMPLE = Path(__file__).resolve().parents[2] / "sample_apps" / "data" / "real"

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
        array, meta = read_image(next((SAMPLE / folder).glob("image.*")))
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
