"""``make demo``'s studies folder: the sample scans and the CT's demo label (a final label), made once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medmeta_plugin.app.demo import DEMO_STRUCTURES, prepare_demo
from medmeta_plugin.io import read_label


def test_demo_studies_hold_the_sample_scans_and_the_ct_label(tmp_path: Path) -> None:
    studies = prepare_demo(tmp_path)
    images = sorted(
        p.name for p in studies.iterdir() if p.is_file() and not p.name.startswith((".", "datastore"))
    )
    assert images == ["ct_abdomen_a.nii.gz", "mr_abdomen_d.nii.gz", "mr_brain_1.nrrd", "mr_brain_2.nrrd"]
    (label,) = (studies / "labels" / "final").glob("ct_abdomen_a.*")
    values, _ = read_label(label)
    assert set(np.unique(values)) == set(range(len(DEMO_STRUCTURES) + 1))
    store = json.loads((studies / "datastore_v2.json").read_text())
    info = store["objects"]["ct_abdomen_a"]["labels"]["final"]["info"]
    assert [s["name"] for s in info["label_info"]] == list(DEMO_STRUCTURES)
    # A second start keeps what is there (labels a user added included).
    before = label.stat().st_mtime_ns
    assert prepare_demo(tmp_path) == studies and label.stat().st_mtime_ns == before


def test_demo_needs_the_sample_data(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sample data not found"):
        prepare_demo(tmp_path, sample_data=tmp_path / "nowhere")
