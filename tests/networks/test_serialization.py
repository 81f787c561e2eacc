"""Saving and loading adapters and backbones: safetensors + JSON, checked, never pickled."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medmeta_plugin.networks import (
    ADAPTER_MODES,
    BackboneConfig,
    MetaModel,
    backbone_hash,
    load_adapter,
    load_backbone,
    save_adapter,
    save_backbone,
)

SMALL = BackboneConfig(features=(8, 16), norm="group", groups=4)


@pytest.fixture
def model() -> MetaModel:
    torch.manual_seed(0)
    return MetaModel(config=SMALL)


def _randomise(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))


@pytest.mark.parametrize("mode", ADAPTER_MODES)
def test_adapter_round_trip(model: MetaModel, tmp_path: Path, mode: str) -> None:
    model.add_task("kidney_left", "segmentation", mode=mode)
    _randomise(model.task("kidney_left"))
    path = save_adapter(model, "kidney_left", tmp_path, shots=3)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["task"] == "kidney_left" and meta["mode"] == mode and meta["shots"] == 3
    assert meta["backbone_hash"] == backbone_hash(model.backbone)
    assert {"created", "kind", "weights_sha256"} <= set(meta)

    x = torch.randn(1, 1, 8, 8, 8)
    expected = model(x, "kidney_left")
    fresh = MetaModel(backbone=model.backbone)
    load_adapter(fresh, path)
    torch.testing.assert_close(fresh(x, "kidney_left"), expected, rtol=0, atol=0)


def test_lora_hparams_survive(model: MetaModel, tmp_path: Path) -> None:
    model.add_task("t", "classification", mode="lora", num_outputs=3, rank=3, alpha=1.5)
    path = save_adapter(model, "t", tmp_path)
    info = load_adapter(MetaModel(backbone=model.backbone), path).info
    assert dict(info.hparams) == {"rank": 3, "alpha": 1.5} and info.num_outputs == 3


def test_backbone_round_trip(model: MetaModel, tmp_path: Path) -> None:
    path = save_backbone(model.backbone, tmp_path / "backbone", extra={"steps": 10})
    loaded = load_backbone(path)
    assert loaded.config == SMALL
    assert backbone_hash(loaded) == backbone_hash(model.backbone)
    assert json.loads(path.with_suffix(".json").read_text())["steps"] == 10


def test_weights_file_is_not_a_pickle(model: MetaModel, tmp_path: Path) -> None:
    model.add_task("t", "segmentation")
    path = save_adapter(model, "t", tmp_path)
    assert path.suffix == ".safetensors"
    assert not path.read_bytes().startswith(b"\x80")  # pickle protocol 2+ header
    assert not list(tmp_path.glob("*.tmp")), "temporary files were left behind"


def _corrupt_weights(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


def _edit_meta(key: str, value):
    def edit(path: Path) -> None:
        meta_path = path.with_suffix(".json")
        meta = json.loads(meta_path.read_text())
        meta[key] = value
        meta_path.write_text(json.dumps(meta))

    return edit


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (_corrupt_weights, "checksum"),
        (lambda p: p.unlink(), "file not found"),
        (lambda p: p.with_suffix(".json").unlink(), "file not found"),
        (lambda p: p.with_suffix(".json").write_text("{not json"), "not valid JSON"),
        (_edit_meta("format", "something-else"), "expected format"),
        (_edit_meta("format_version", 99), "format_version"),
        (_edit_meta("backbone_hash", "0" * 64), "backbone"),
        (_edit_meta("mode", "lorra"), "invalid adapter metadata"),
        (_edit_meta("task", "../../etc/passwd"), "invalid task name"),
        (_edit_meta("num_outputs", 4), "one output"),
        (_edit_meta("mode", "lora"), "do not fit"),
    ],
)
def test_damaged_adapter_is_refused(model: MetaModel, tmp_path: Path, damage, match: str) -> None:
    model.add_task("t", "segmentation", mode="film")
    path = save_adapter(model, "t", tmp_path)
    damage(path)
    target = MetaModel(backbone=model.backbone)
    with pytest.raises(ValueError, match=match):
        load_adapter(target, path)
    assert len(target.tasks) == 0, "a refused adapter must not be half-added"


def test_backbone_mismatch_can_be_overridden(model: MetaModel, tmp_path: Path) -> None:
    model.add_task("t", "segmentation", mode="head")
    path = save_adapter(model, "t", tmp_path)
    other = MetaModel(config=SMALL)
    with pytest.raises(ValueError, match="re-adapt"):
        load_adapter(other, path)
    assert load_adapter(other, path, allow_backbone_mismatch=True).info.name == "t"


def test_save_rejects_unsafe_names(model: MetaModel, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown task"):
        save_adapter(model, "../x", tmp_path)


def test_saved_files_are_world_readable(model: MetaModel, tmp_path: Path) -> None:
    model.add_task("t", "segmentation")
    path = save_adapter(model, "t", tmp_path)
    assert path.stat().st_mode & 0o777 == 0o644
    assert path.with_suffix(".json").stat().st_mode & 0o777 == 0o644
