"""The demo studies folder: the sample scans, with structures already labelled on the CT.

``prepare_demo`` copies the sample CT, MR and two brain MRIs into a MONAI Label studies folder and submits a
label of a few structures on the CT through the app's own datastore (validated like any submission), so the
server adapts them as it starts and a new user sees medmeta segment the MR right away; the kidneys, the psoas
muscles and the vertebrae are labelled on the CT and segmented on the MR of another patient. The brain MRIs of
two patients are there to teach a structure (their tumour) on one and get it on the other.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from medmeta_plugin.io import read_image, read_label, write_image
from medmeta_plugin.paths import SAMPLE_DATA

__all__ = ["DEMO_STRUCTURES", "prepare_demo"]

# Structures labelled in both abdominal scans (see sample_apps/data/README.md), large enough to see at 3 mm.
DEMO_STRUCTURES = ("kidney_left", "kidney_right", "iliopsoas_left", "iliopsoas_right", "spinal_cord")

_SCANS = {
    "ct_abdomen_a": "ct_abdomen_a",
    "mr_abdomen_d": "mr_abdomen_d",
    "mr_brain_tumour_1": "mr_brain_1",
    "mr_brain_tumour_2": "mr_brain_2",
}


def prepare_demo(root: str | Path, sample_data: Path = SAMPLE_DATA) -> Path:
    """Create (once) the demo studies folder under ``root`` and return its path.

    Raises:
        ValueError: if the sample data is missing.
    """
    from medmeta_plugin.app.datastore import MedMetaDatastore

    studies = Path(root) / "studies"
    if (studies / "datastore_v2.json").is_file():
        return studies
    if not sample_data.is_dir():
        raise ValueError(f"sample data not found at {sample_data}.")
    studies.mkdir(parents=True, exist_ok=True)
    for folder, image_id in _SCANS.items():
        source = next((sample_data / folder).glob("image.*"))
        suffix = "".join(source.suffixes)
        shutil.copyfile(source, studies / f"{image_id}{suffix}")
    datastore = MedMetaDatastore(str(studies), extensions=["*.nii.gz", "*.nii", "*.nrrd"])
    ct = sample_data / "ct_abdomen_a"
    names = {name: int(value) for value, name in json.loads((ct / "labels.json").read_text()).items()}
    _, meta = read_image(next(ct.glob("image.*")))
    label, _ = read_label(next(ct.glob("label.*")), meta)
    seed = np.zeros_like(label, dtype=np.uint8)
    info = []
    for idx, name in enumerate(DEMO_STRUCTURES, start=1):
        seed[label == names[name]] = idx
        info.append({"name": name, "idx": idx})
    with tempfile.TemporaryDirectory() as tmp:
        path = write_image(Path(tmp) / "label.nii.gz", seed, meta)
        datastore.save_label("ct_abdomen_a", str(path), "final", {"label_info": info})
    return studies
