"""The infer tasks on a real runtime (tiny backbone, phantom scans in a real datastore): the ``tasks``
parameter, every request refused with a 4xx and its message before any work, the labels of ``/info/`` that
follow what is adapted, the label map written in each result format with its response JSON, and the volume
predictions of classification and regression tasks."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi import HTTPException

from medmeta_plugin.app.config import parse_conf
from medmeta_plugin.app.datastore import MedMetaDatastore
from medmeta_plugin.app.infer_task import RESULT_EXTENSIONS, SegmentationInfer, VolumeInfer, parse_tasks
from medmeta_plugin.app.runtime import MedMetaRuntime
from medmeta_plugin.io import read_image, write_image
from medmeta_plugin.networks import TaskAdapter
from tests.app.conftest import GEOMETRIES, app_conf, phantom

LABEL_INFO = [{"name": "ball", "idx": 1}, {"name": "box", "idx": 2}]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ([], None),
        ("ball", ["ball"]),
        ("ball, box", ["ball", "box"]),
        ('["ball", "box"]', ["ball", "box"]),
        (["box"], ["box"]),
    ],
)
def test_parse_tasks(value: object, expected: list[str] | None) -> None:
    assert parse_tasks(value) == expected


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ('["ball", ', "tasks is not a valid JSON list"),
        ('["ball", 1]', "tasks must be a list of names"),
        (5, "tasks must be a list of names"),
        ([1, 2], "tasks must be a list of names"),
        ({"ball": 1}, "tasks must be a list of names"),
    ],
)
def test_parse_tasks_refuses_with_a_400(value: object, needle: str) -> None:
    with pytest.raises(HTTPException) as caught:
        parse_tasks(value)
    assert caught.value.status_code == 400 and needle in caught.value.detail


def _runtime(studies: Path, model_dir: Path, backbone: Path) -> MedMetaRuntime:
    datastore = MedMetaDatastore(str(studies), extensions=["*.nii.gz"])
    # The atlas prior is not what is tested here: off, no registration runs (ITK's first load is slow).
    return MedMetaRuntime(parse_conf(app_conf(backbone, atlas="false")), model_dir, datastore)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Phantom scans ``a``, ``b`` (RAS) and ``c`` (flipped) in ``studies/``, their label maps in ``labels/``,
    and an unreadable ``junk.nii.gz`` beside the scans."""
    root = tmp_path_factory.mktemp("infer")
    for sub in ("studies", "labels"):
        (root / sub).mkdir()
    for name, geometry, seed in (("a", "ras", 1), ("b", "ras", 2), ("c", "lps", 3)):
        image, label = phantom(GEOMETRIES[geometry], seed)
        write_image(root / "studies" / f"{name}.nii.gz", image, GEOMETRIES[geometry])
        write_image(root / "labels" / f"{name}.nrrd", label, GEOMETRIES[geometry])
    (root / "studies" / "junk.nii.gz").write_bytes(b"not an image")
    return root


@pytest.fixture(scope="module")
def fresh(folder: Path, tiny_backbone: Path, tmp_path_factory: pytest.TempPathFactory) -> MedMetaRuntime:
    """A runtime with nothing adapted (its own model folder)."""
    return _runtime(folder / "studies", tmp_path_factory.mktemp("fresh-model"), tiny_backbone)


@pytest.fixture(scope="module")
def adapted(folder: Path, tiny_backbone: Path) -> MedMetaRuntime:
    """A runtime with ``ball`` (segmentation), ``grade`` (classification) and ``size_ml`` (regression)
    adapted from the labels of ``a`` and ``b``; its model folder is ``<folder>/model``."""
    runtime = _runtime(folder / "studies", folder / "model", tiny_backbone)
    for image, grade in (("a", 0), ("b", 1)):
        targets = {
            "grade": {"kind": "classification", "value": grade, "num_classes": 2},
            "size_ml": 30.0 + grade,
        }
        info = {"label_info": LABEL_INFO, "targets": targets}
        runtime.datastore.save_label(image, str(folder / "labels" / f"{image}.nrrd"), "final", info)
    for task in ("ball", "grade", "size_ml"):
        runtime.adapt_now(task)
    return runtime


@pytest.fixture
def results() -> Iterator[list[str]]:
    """Result files written by a test, removed after it (infer tasks write them to the system's temp)."""
    paths: list[str] = []
    yield paths
    for path in paths:
        if os.path.exists(path):
            os.remove(path)


def _scan(folder: Path, name: str) -> str:
    return str(folder / "studies" / f"{name}.nii.gz")


def _filled(request: dict, folder: Path) -> dict:
    """``request`` with ``{folder}`` and ``{<scan>}`` in its string values replaced."""
    names = {n: _scan(folder, n) for n in ("a", "b", "c", "junk")}
    return {k: v.format(folder=folder, **names) if isinstance(v, str) else v for k, v in request.items()}


def _refused(task: SegmentationInfer | VolumeInfer, request: dict) -> HTTPException:
    with pytest.raises(HTTPException) as caught:
        task(request)
    return caught.value


@pytest.mark.parametrize(
    ("request_", "status", "needle"),
    [
        ({}, 404, "image None not found"),
        ({"image": ""}, 404, "image '' not found"),
        ({"image": 5}, 404, "image 5 not found"),
        ({"image": "{folder}/studies/missing.nii.gz"}, 404, "missing.nii.gz"),
        # The image is checked first, whatever else is wrong.
        ({"image": "{folder}/nope.nii.gz", "result_extension": ".png"}, 404, "nope.nii.gz"),
        ({"image": "{a}", "tasks": "[ball"}, 400, "tasks is not a valid JSON list"),
        (
            {"image": "{a}", "result_extension": ".png"},
            400,
            "result_extension must be one of ['.nii.gz', '.nii', '.nrrd'], got '.png'",
        ),
        ({"image": "{a}", "result_extension": "nrrd"}, 400, "got 'nrrd'"),
        (
            {"image": "{a}", "result_dtype": "float32"},
            400,
            "result_dtype must be one of ['uint8', 'uint16', 'int16', 'int32'], got 'float32'",
        ),
        ({"image": "{a}"}, 400, "no structure has been adapted yet"),
    ],
)
def test_segmentation_requests_refused_before_any_work(
    fresh: MedMetaRuntime, folder: Path, request_: dict, status: int, needle: str
) -> None:
    refused = _refused(SegmentationInfer(fresh), _filled(request_, folder))
    assert refused.status_code == status and needle in refused.detail


@pytest.mark.parametrize(
    ("request_", "status", "needle"),
    [
        ({"image": None}, 404, "image None not found"),
        ({"image": "/no/such/scan.nii.gz"}, 404, "/no/such/scan.nii.gz"),
        ({"image": "{a}", "tasks": 7}, 400, "tasks must be a list of names"),
        ({"image": "{a}"}, 400, "no classification or regression task has been adapted yet"),
    ],
)
def test_volume_requests_refused_before_any_work(
    fresh: MedMetaRuntime, folder: Path, request_: dict, status: int, needle: str
) -> None:
    refused = _refused(VolumeInfer(fresh), _filled(request_, folder))
    assert refused.status_code == status and needle in refused.detail


def test_info_lists_what_is_adapted_by_kind(fresh: MedMetaRuntime, adapted: MedMetaRuntime) -> None:
    for runtime, labels, volume in ((fresh, {}, []), (adapted, {"ball": 1}, ["grade", "size_ml"])):
        segmentation = SegmentationInfer(runtime).info()
        assert segmentation["type"] == "segmentation" and segmentation["dimension"] == 3
        assert segmentation["labels"] == labels
        info = VolumeInfer(runtime).info()
        assert info["type"] == "classification" and info["labels"] == volume


def test_info_picks_up_what_another_process_adapted(
    studies: dict, tiny_backbone: Path, tmp_path: Path
) -> None:
    task = SegmentationInfer(_runtime(studies["studies"], tmp_path / "model", tiny_backbone))
    assert task.info()["labels"] == {}
    trainer = _runtime(studies["studies"], tmp_path / "model", tiny_backbone)  # e.g. a train process
    trainer.datastore.save_label("a", str(studies["a"]), "final", {"label_info": LABEL_INFO})
    trainer.adapt_now("box")
    assert task.info()["labels"] == {"box": 1}


@pytest.mark.parametrize("extension", RESULT_EXTENSIONS)
def test_label_map_written_in_each_format(
    adapted: MedMetaRuntime, folder: Path, results: list[str], extension: str
) -> None:
    request = {"image": _scan(folder, "c"), "result_extension": extension}
    path, body = SegmentationInfer(adapted)(request)
    results.append(path)
    assert path.endswith(extension) and os.path.basename(path).startswith("medmeta-")
    label, meta = read_image(path)
    image_meta = read_image(_scan(folder, "c"))[1]
    assert meta.shape == image_meta.shape  # on the scan's own (flipped) grid
    np.testing.assert_allclose(meta.affine, image_meta.affine, atol=1e-4)
    assert set(np.unique(label).astype(int).tolist()) <= {0, 1}
    assert body["label_names"] == {"ball": 1}
    assert body["adapter_versions"] == {"ball": 1}
    provenance = body["provenance"]["ball"]
    assert set(provenance) == {"found_by", "supports", "sure_supports", "confidence", "sure", "note"}
    assert provenance["found_by"] == "network" and provenance["sure"] is False  # atlas off: a guess
    latencies = body["latencies"]
    assert {"queued", "total"} <= set(latencies) and all(v >= 0 for v in latencies.values())
    assert latencies["total"] >= max(v for k, v in latencies.items() if k != "total")


def test_default_result_is_nifti_gz(adapted: MedMetaRuntime, folder: Path, results: list[str]) -> None:
    path, body = SegmentationInfer(adapted)({"image": _scan(folder, "b"), "result_dtype": "int32"})
    results.append(path)
    assert path.endswith(".nii.gz") and body["label_names"] == {"ball": 1}


@pytest.mark.parametrize(
    ("request_", "needle"),
    [
        ({"image": "{c}", "tasks": "nope"}, "nope"),  # not adapted: the engine's message, as a 400
        ({"image": "{c}", "tasks": "grade"}, "grade"),  # a volume task is no structure
        ({"image": "{junk}"}, "cannot read"),
    ],
)
def test_segmentation_errors_of_the_engine_are_400s(
    adapted: MedMetaRuntime, folder: Path, request_: dict, needle: str
) -> None:
    refused = _refused(SegmentationInfer(adapted), _filled(request_, folder))
    assert refused.status_code == 400 and needle in refused.detail


def test_more_structures_than_the_dtype_holds_are_refused(
    adapted: MedMetaRuntime, folder: Path, tiny_backbone: Path, results: list[str]
) -> None:
    runtime = _runtime(folder / "studies", folder / "model", tiny_backbone)  # restores the adapted ones
    backbone = runtime.engine.model.backbone
    info = runtime.engine.tasks()["ball"].info
    # 256 structures: values 1..256, one more than uint8 holds (linear heads: the position head's per-voxel
    # MLP 256 times over would take most of this file's time).
    for i in range(255):
        runtime.engine.model.attach(
            TaskAdapter(dataclasses.replace(info, name=f"s{i:03d}", head="linear"), backbone)
        )
    task = SegmentationInfer(runtime)
    refused = _refused(task, {"image": _scan(folder, "b"), "result_dtype": "uint8"})
    assert refused.status_code == 400
    assert refused.detail == "256 structures do not fit result_dtype 'uint8'."
    path, body = task({"image": _scan(folder, "b"), "result_dtype": "uint16"})
    results.append(path)
    assert len(body["label_names"]) == 256 and max(body["label_names"].values()) == 256


def test_volume_predictions(adapted: MedMetaRuntime, folder: Path) -> None:
    path, body = VolumeInfer(adapted)({"image": _scan(folder, "c")})
    assert path is None
    predictions = body["predictions"]
    assert sorted(predictions) == ["grade", "size_ml"]
    assert predictions["grade"]["class"] in (0, 1)
    assert sum(predictions["grade"]["probabilities"]) == pytest.approx(1.0, abs=1e-5)
    assert isinstance(predictions["size_ml"]["value"], float)
    assert set(body["latencies"]) == {"total"} and body["latencies"]["total"] >= 0


@pytest.mark.parametrize(("tasks", "expected"), [("size_ml", ["size_ml"]), ('["grade"]', ["grade"])])
def test_volume_tasks_parameter_restricts_predictions(
    adapted: MedMetaRuntime, folder: Path, tasks: str, expected: list[str]
) -> None:
    _, body = VolumeInfer(adapted)({"image": _scan(folder, "a"), "tasks": tasks})
    assert sorted(body["predictions"]) == expected


@pytest.mark.parametrize(
    ("request_", "needle"),
    [({"image": "{a}", "tasks": "nope"}, "nope"), ({"image": "{junk}"}, "cannot read")],
)
def test_volume_errors_of_the_engine_are_400s(
    adapted: MedMetaRuntime, folder: Path, request_: dict, needle: str
) -> None:
    refused = _refused(VolumeInfer(adapted), _filled(request_, folder))
    assert refused.status_code == 400 and needle in refused.detail
