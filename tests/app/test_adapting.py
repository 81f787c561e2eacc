"""Adapting a task in the app (``app/adapting.py``): the fingerprint stored with an adapter, the support
cases read onto one working shape (cached features reused when the shapes agree, replicate/zero padding when
they do not), and ``adapt_task``: the most recent ``max_shots`` examples, what is stored with the version, and
a refused adaptation that stores and serves nothing.

Everything runs on the real serving stack (tiny backbone, phantom scans written as NIfTI and NRRD files by
``tests/app/conftest.py``). The errors ``adapt_task`` shares with the engine (no example, an invalid name, a
label on another grid) are tested in ``test_engine.py``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from medmeta_plugin.app.adapting import Example, adapt_task, examples_fingerprint, support_cases
from medmeta_plugin.app.config import parse_conf
from medmeta_plugin.app.features import FeatureCache
from medmeta_plugin.app.serving import Serving
from medmeta_plugin.io import read_image
from tests.app.conftest import app_conf

CPU = torch.device("cpu")


def _serving(tiny_backbone: Path, model_dir: Path, **conf: str) -> Serving:
    config = parse_conf(app_conf(tiny_backbone, device="cpu", **conf))
    return Serving(config, model_dir, FeatureCache(config, CPU))


@pytest.fixture
def serving(tiny_backbone: Path, tmp_path: Path) -> Serving:
    return _serving(tiny_backbone, tmp_path / "model")


def _example(studies: dict, name: str, value: int | None = 1, label: bool = True) -> Example:
    return Example(str(studies["studies"] / f"{name}.nii.gz"), str(studies[name]) if label else None, value)


# ----- examples_fingerprint --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("label", "value", "target", "expected"),
    [
        pytest.param(None, None, 2.0, "scan.nii.gz||None|2.0", id="target"),
        pytest.param(None, None, 1, "scan.nii.gz||None|1", id="class"),
        pytest.param("missing.nrrd", 1, None, "scan.nii.gz||1|None", id="label-file-gone"),
        pytest.param("label.nrrd", 2, None, "scan.nii.gz|{stamp}|2|None", id="label-file"),
    ],
)
def test_examples_fingerprint_names_image_label_version_value_and_target(
    tmp_path: Path, studies: dict, label: str | None, value: int | None, target: float | None, expected: str
) -> None:
    shutil.copyfile(studies["a"], tmp_path / "label.nrrd")
    stat = os.stat(tmp_path / "label.nrrd")
    example = Example(
        str(tmp_path / "somewhere" / "scan.nii.gz"),
        None if label is None else str(tmp_path / label),
        value,
        target,
    )
    assert examples_fingerprint([example]) == [expected.format(stamp=f"{stat.st_mtime_ns}:{stat.st_size}")]


def test_a_replaced_label_file_changes_the_fingerprint(tmp_path: Path, studies: dict) -> None:
    label = tmp_path / "label.nrrd"
    shutil.copyfile(studies["a"], label)
    examples = [_example(studies, "b"), Example(str(studies["studies"] / "a.nii.gz"), str(label), 1)]
    before = examples_fingerprint(examples)
    assert len(before) == 2 and examples_fingerprint(examples) == before, "the same files, the same stamp"
    shutil.copyfile(studies["c"], label)  # another label under the same name
    os.utime(label, ns=(os.stat(label).st_mtime_ns + 10**9,) * 2)
    after = examples_fingerprint(examples)
    assert after[0] == before[0] and after[1] != before[1]


# ----- support_cases ---------------------------------------------------------------------------------------


def test_scans_of_one_working_shape_reuse_their_cached_features(serving: Serving, studies: dict) -> None:
    examples = [_example(studies, "a", 1), _example(studies, "b", 2)]  # both 24^3 at 2 mm
    cases, base = support_cases(serving, "segmentation", examples)
    assert base is not None
    cached = [serving.working(ex.image)[1] for ex in examples]
    torch.testing.assert_close(base.features, torch.cat([b.features for b in cached]), rtol=0, atol=0)
    torch.testing.assert_close(base.embedding, torch.cat([b.embedding for b in cached]), rtol=0, atol=0)
    for case, example, name in zip(cases, examples, "ab"):
        assert set(case) == {"image", "label"}
        assert case["image"].shape == (1, 24, 24, 24) and case["label"].shape == (1, 24, 24, 24)
        assert case["label"].dtype is torch.float32
        truth = read_image(studies[name])[0][0] == example.value  # the working grid is the scan's own
        np.testing.assert_array_equal(case["label"][0].numpy(), truth.astype(np.float32))
        assert torch.equal(case["image"], serving.working(example.image)[0].image[0])


def test_scans_of_other_working_shapes_are_padded_to_the_largest(serving: Serving, studies: dict) -> None:
    # a: 24 x 24 x 24 working voxels; c: 24 x 24 x 25, padded to 28 for the backbone's divisor 4.
    examples = [_example(studies, "a", 1), _example(studies, "c", 1)]
    cases, base = support_cases(serving, "segmentation", examples)
    assert base is None, "features of other shapes cannot be stacked"
    assert [tuple(c["image"].shape) for c in cases] == [(1, 24, 24, 28)] * 2
    assert [tuple(c["label"].shape) for c in cases] == [(1, 24, 24, 28)] * 2
    a_image = serving.working(examples[0].image)[0].image[0]
    assert torch.equal(cases[0]["image"][..., :24], a_image)
    assert torch.equal(cases[0]["image"][..., 24:], a_image[..., 23:24].expand(-1, -1, -1, 4)), "edge-padded"
    assert not cases[0]["label"][..., 24:].any(), "labels are padded with background"
    assert cases[0]["label"].sum() == (read_image(studies["a"])[0] == 1).sum()
    assert torch.equal(cases[1]["image"], serving.working(examples[1].image)[0].image[0])
    assert cases[1]["label"].sum() > 0


@pytest.mark.parametrize(
    ("kind", "targets"), [("classification", [0, 1]), ("regression", [31.5, 30.0])], ids=["class", "value"]
)
def test_volume_level_cases_carry_their_targets(
    serving: Serving, studies: dict, kind: str, targets: list[float]
) -> None:
    examples = [Example(str(studies["studies"] / f"{n}.nii.gz"), target=t) for n, t in zip("ab", targets)]
    cases, base = support_cases(serving, kind, examples)
    assert [c["target"] for c in cases] == targets and all(set(c) == {"image", "target"} for c in cases)
    assert base is not None and base.embedding.shape[0] == 2


@pytest.mark.parametrize(
    ("kind", "example", "needle"),
    [
        pytest.param(
            "segmentation",
            lambda s: _example(s, "a", 1, label=False),
            "has no label file or value",
            id="no-label",
        ),
        pytest.param(
            "segmentation", lambda s: _example(s, "a", None), "has no label file or value", id="no-value"
        ),
        pytest.param(
            "classification", lambda s: _example(s, "a"), "classification example of .*a.nii.gz has no target"
        ),
        pytest.param(
            "regression", lambda s: _example(s, "a"), "regression example of .*a.nii.gz has no target"
        ),
        pytest.param(
            "segmentation",
            lambda s: Example(str(s["studies"] / "missing.nii.gz"), str(s["a"]), 1),
            "missing.nii.gz: cannot be read",
            id="unreadable-scan",
        ),
    ],
)
def test_an_incomplete_example_is_a_value_error_naming_its_scan(
    serving: Serving, studies: dict, kind: str, example, needle: str
) -> None:
    b = _example(studies, "b")
    complete = b if kind == "segmentation" else Example(b.image, target=1.0)  # a complete example first
    with pytest.raises(ValueError, match=needle):
        support_cases(serving, kind, [complete, example(studies)])


# ----- adapt_task ------------------------------------------------------------------------------------------


def test_only_the_most_recent_max_shots_examples_are_fitted_and_stored(
    tiny_backbone: Path, tmp_path: Path, studies: dict
) -> None:
    serving = _serving(tiny_backbone, tmp_path / "model", max_shots="2")
    examples = [_example(studies, "a"), _example(studies, "b"), _example(studies, "c")]
    report, version = adapt_task(serving, "ball", "segmentation", examples)
    used = examples[-2:]
    assert version == 1 and report.shots == 2 and report.task == "ball"
    meta = serving.served_meta("ball")
    assert meta is not None and meta["shots"] == 2
    assert meta["report"] == report.to_dict()
    assert meta["examples"] == examples_fingerprint(used)
    assert meta["atlas"] == [{"image": ex.image, "label": ex.label, "value": 1} for ex in used]
    task = serving.tasks()["ball"]
    assert (task.info.kind, task.info.mode, task.info.head) == ("segmentation", "head", serving.config.head)


@pytest.mark.parametrize(
    ("kind", "targets", "num_outputs"),
    [("classification", [0, 1], 2), ("classification", [2, 0], 3), ("regression", [31.5, 30.0], None)],
)
def test_a_volume_level_task_is_adapted_and_stores_no_atlas(
    serving: Serving, studies: dict, kind: str, targets: list[float], num_outputs: int | None
) -> None:
    examples = [Example(str(studies["studies"] / f"{n}.nii.gz"), target=t) for n, t in zip("ab", targets)]
    report, version = adapt_task(serving, "grade", kind, examples, num_outputs)
    assert version == 1 and report.kind == kind and report.shots == 2
    task = serving.tasks(kind)["grade"]
    assert task.info.num_outputs == (num_outputs or 1)
    meta = serving.served_meta("grade")
    assert "atlas" not in meta and meta["examples"] == examples_fingerprint(examples)
    assert serving.atlas_examples("grade") == []


def test_a_new_adaptation_is_a_new_version_served_in_place_of_the_old(
    serving: Serving, studies: dict
) -> None:
    adapt_task(serving, "ball", "segmentation", [_example(studies, "a")])
    first = serving.tasks()["ball"]
    _, version = adapt_task(serving, "ball", "segmentation", [_example(studies, "a"), _example(studies, "b")])
    assert version == 2 and serving.versions() == {"ball": 2} and serving.tasks()["ball"] is not first
    assert [e["image"] for e in serving.atlas_examples("ball")] == [
        str(studies["studies"] / "a.nii.gz"),
        str(studies["studies"] / "b.nii.gz"),
    ]


@pytest.mark.parametrize(
    ("name", "kind", "examples", "num_outputs", "needle"),
    [
        pytest.param(
            "grade",
            "classification",
            lambda s: [Example(_example(s, "a").image, target=1)],
            None,
            "num_outputs",
        ),
        pytest.param(
            "ball", "segmentaton", lambda s: [Example(_example(s, "a").image, target=1)], None, "segmentaton"
        ),
        pytest.param(
            "ball",
            "segmentation",
            lambda s: [_example(s, "a"), _example(s, "b", label=False)],
            None,
            "b.nii.gz has no label file or value",
            id="one-example-incomplete",
        ),
        pytest.param(
            "", "segmentation", lambda s: [_example(s, "a")], None, "invalid task name", id="empty-name"
        ),
    ],
)
def test_a_refused_adaptation_stores_and_serves_nothing(
    serving: Serving, studies: dict, name: str, kind: str, examples, num_outputs: int | None, needle: str
) -> None:
    adapt_task(serving, "box", "segmentation", [_example(studies, "a", 2)])
    before = (serving.versions(), dict(serving.tasks()))
    with pytest.raises(ValueError, match=needle):
        adapt_task(serving, name, kind, examples(studies), num_outputs)
    assert (serving.versions(), serving.tasks()) == before
    assert serving.store.tasks() == ["box"] and serving.store.versions("box") == [1]


def test_adapting_leaves_the_served_backbone_unchanged(serving: Serving, studies: dict) -> None:
    weights = {k: v.clone() for k, v in serving.model.backbone.state_dict().items()}
    model = serving.model
    adapt_task(serving, "ball", "segmentation", [_example(studies, "a"), _example(studies, "c")])
    assert serving.model is model
    now = serving.model.backbone.state_dict()
    assert all(torch.equal(now[k], weights[k]) for k in weights)


def test_an_example_is_a_frozen_record() -> None:
    example = Example("scan.nii.gz", "label.nrrd", 3)
    assert (example.image, example.label, example.value, example.target) == (
        "scan.nii.gz",
        "label.nrrd",
        3,
        None,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        example.value = 4  # type: ignore[misc]
