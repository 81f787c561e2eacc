"""The adapter store: versions never overwrite, a half-written version is ignored, restore after restart."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medmeta_plugin.adapt.store import AdapterStore
from medmeta_plugin.networks import MetaModel


def _fit(model: MetaModel, task: str, value: float) -> None:
    model.add_task(task, "segmentation", mode="film")
    with torch.no_grad():
        model.task(task).head.conv.bias.fill_(value)


def test_versions_accumulate_and_restore_picks_the_newest(tmp_path: Path, tiny_model: MetaModel) -> None:
    store = AdapterStore(tmp_path)
    for value in (1.0, 2.0):
        _fit(tiny_model, "liver", value)
        store.save(tiny_model, "liver", shots=1)
    _fit(tiny_model, "spleen", 5.0)
    assert store.save(tiny_model, "spleen") == 1
    assert store.versions("liver") == [1, 2] and store.tasks() == ["liver", "spleen"]
    fresh = MetaModel(backbone=tiny_model.backbone)
    assert store.restore(fresh) == {"liver": 2, "spleen": 1}
    assert float(fresh.task("liver").head.conv.bias) == 2.0


@pytest.mark.parametrize("damage", ["truncate_weights", "remove_weights", "garbage_json"])
def test_a_damaged_newest_version_falls_back_to_the_previous(
    tmp_path: Path, tiny_model: MetaModel, damage: str
) -> None:
    store = AdapterStore(tmp_path)
    _fit(tiny_model, "liver", 1.0)
    store.save(tiny_model, "liver")
    _fit(tiny_model, "liver", 2.0)
    store.save(tiny_model, "liver")
    weights, meta = tmp_path / "liver" / "v0002.safetensors", tmp_path / "liver" / "v0002.json"
    if damage == "truncate_weights":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "remove_weights":
        weights.unlink()
    else:
        meta.write_text("{")
    fresh = MetaModel(backbone=tiny_model.backbone)
    adapter, version = store.load_latest(fresh, "liver")
    assert version == 1 and float(adapter.head.conv.bias) == 1.0


def test_a_crash_before_the_metadata_never_reuses_the_version_number(
    tmp_path: Path, tiny_model: MetaModel
) -> None:
    store = AdapterStore(tmp_path)
    _fit(tiny_model, "liver", 1.0)
    store.save(tiny_model, "liver")
    (tmp_path / "liver" / "v0001.json").unlink()  # as if the process died between the two writes
    assert store.save(tiny_model, "liver") == 2
    assert (tmp_path / "liver" / "v0001.safetensors").is_file(), "nothing stored is overwritten"


@pytest.mark.parametrize("name", ["../etc", "a/b", "", ".hidden"])
def test_unsafe_task_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="invalid task name"):
        AdapterStore(tmp_path).versions(name)
