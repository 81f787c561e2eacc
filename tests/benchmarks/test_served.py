"""The benchmark's served answers are the server's: one labelled pair through both, the same mask.

The few-shot benchmark's ``atlas`` method (the app's default answer) runs the app's pipeline in process
(:mod:`medmeta_plugin.benchmarks.served`); a real MONAI Label server, given the same files and the label as
3D Slicer submits it, must answer with the same voxels (ITK on one thread in both, as its threads sum in no
fixed order). An abdominal pair (one patient's CT labelled, another
patient's MR segmented) and a brain pair (one patient's tumour MRI labelled, another's segmented).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from medmeta_plugin.benchmarks.served import ServedPipeline
from medmeta_plugin.io import read_image, read_label
from medmeta_plugin.networks import Backbone3D, save_backbone
from medmeta_plugin.paths import SAMPLE_DATA
from medmeta_plugin.registration import deterministic_registration
from tests.app.conftest import GEOMETRIES, app_conf, phantom
from tests.conftest import TINY

# (structure, its value in the support case's label map, support case, query case)
PAIRS = [
    ("kidney_right", None, "ct_abdomen_a", "mr_abdomen_d"),
    ("tumour", 1, "mr_brain_tumour_1", "mr_brain_tumour_2"),
]


def _item(case: str, structure: str | None = None, value: int | None = None) -> dict:
    image, meta = read_image(next((SAMPLE_DATA / case).glob("image.*")))
    item = {"image": image[:1].astype(np.float32), "affine": meta.affine}
    if structure is not None:
        label, _ = read_label(next((SAMPLE_DATA / case).glob("label.*")), meta)
        if value is None:
            names = {
                n: int(v) for v, n in json.loads((SAMPLE_DATA / case / "labels.json").read_text()).items()
            }
            value = names[structure]
        item["label"] = (label[:1] == value).astype(np.float32)
    return item


def test_the_benchmark_serves_what_the_server_serves(tmp_path: Path) -> None:
    from monailabel.client import MONAILabelClient

    from medmeta_plugin.app.process import copy_app, running_server

    served = ServedPipeline(tmp_path / "served")
    studies, expected = tmp_path / "studies", {}
    studies.mkdir()
    for structure, value, support_case, query_case in PAIRS:
        support, query = _item(support_case, structure, value), _item(query_case)
        with deterministic_registration():  # ITK on one thread here and in the server: the same sums
            (answer,) = served.answer(structure, [support], [query])
        # The very files the benchmark's engine read go to the server: images by id, the label as Slicer's.
        for role, item in (("support", support), ("query", query)):
            shutil.copyfile(served.scan(item), studies / f"{role}_{structure}.nii.gz")
        expected[structure] = (answer, served.label(support, structure))
    app = tmp_path / "app"
    copy_app(app)
    one_thread = {"ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1"}
    with running_server(str(studies), app, tmp_path / "server.log", env=one_thread) as (url, _):
        client = MONAILabelClient(url, tmpdir=str(tmp_path / "client"))
        (tmp_path / "client").mkdir()
        for structure, (answer, label_file) in expected.items():
            client.save_label(
                f"support_{structure}", label_file, params={"label_info": [{"name": structure, "idx": 1}]}
            )
            for _ in range(600):  # the adaptation runs in the background: ask again, as a user would
                try:
                    out, params = client.infer("medmeta", f"query_{structure}", {"tasks": [structure]})
                    if structure in params.get("label_names", {}):
                        break
                except Exception:  # a 400 "not adapted yet"
                    pass
                time.sleep(0.2)
            else:
                pytest.fail(f"{structure} was not served; see {tmp_path / 'server.log'}")
            result, _ = read_image(out)
            mask = result[0] == params["label_names"][structure]
            assert mask.shape == answer.mask.shape
            np.testing.assert_array_equal(mask, answer.mask, err_msg=structure)
            assert params["provenance"][structure]["found_by"] == answer.provenance.found_by


def test_a_phantom_without_geometry_is_written_on_the_working_grid(tmp_path: Path) -> None:
    """Phantoms have no geometry: they are served on a RAS grid of the app's spacing, voxels as they are."""
    served = ServedPipeline(tmp_path, conf={"spacing": "3"})
    phantom = {"image": np.arange(512, dtype=np.float32).reshape(1, 8, 8, 8)}
    values, meta = read_image(served.scan(phantom))
    assert meta.spacing == pytest.approx((3.0, 3.0, 3.0)) and values.shape == (1, 8, 8, 8)
    np.testing.assert_array_equal(values, phantom["image"])
    item = {"image": np.zeros((1, 8, 8, 8), np.float32), "affine": np.diag([2.0, 2.0, 2.0, 1.0])}
    assert served.scan(item) == served.scan(item)  # written once, by case
    written, _ = read_image(served.scan(item))
    assert written.shape == (1, 8, 8, 8)


def _phantom_item(seed: int) -> dict:
    meta = GEOMETRIES["ras"]
    image, label = phantom(meta, seed)
    return {"image": image, "label": (label == 1).astype(np.float32), "affine": meta.affine}


def test_pipelines_of_one_run_register_each_pair_of_scans_once(tmp_path: Path) -> None:
    """The benchmark's atlas and incontext answers differ only after registration: one registration a pair."""
    torch.manual_seed(0)
    save_backbone(Backbone3D(TINY), tmp_path / "tiny.safetensors")
    conf = app_conf(tmp_path / "tiny.safetensors")
    first = ServedPipeline(tmp_path / "first", conf=conf)
    second = ServedPipeline(tmp_path / "second", conf={**conf, "adapt_steps": "5"}, share=first)
    calls = []
    registrations = first.engine._atlas.registrations
    real = registrations.register
    registrations.register = lambda *args: calls.append(1) or real(*args)
    support, query = _phantom_item(1), _phantom_item(2)
    a = first.answer("ball", [support], [query])
    b = second.answer("ball", [support], [query])
    assert len(calls) == 1, "the second pipeline used the first one's registration"
    assert second.scan(query) == first.scan(query)  # the same files, so the same cache keys
    np.testing.assert_array_equal(a[0].mask, b[0].mask)
    with pytest.raises(ValueError, match="register differently"):
        ServedPipeline(tmp_path / "third", conf={**conf, "registration": "rigid"}, share=first)
