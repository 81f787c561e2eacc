"""The adapter store: versions never overwrite, a half-written version is ignored, restore after restart."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medmeta_plugin.adapt.store import AdapterStore
from medmeta_plugin.networks import MetaModel
from tests.conftest import file_size_limit


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


def test_meta_returns_what_save_stored(tmp_path: Path, tiny_model: MetaModel) -> None:
    store = AdapterStore(tmp_path)
    _fit(tiny_model, "liver", 1.0)
    extra = {"report": {"steps": 3}, "atlas": [{"image": "a.nii.gz", "label": "a_seg.nii.gz", "value": 1}]}
    version = store.save(tiny_model, "liver", shots=1, extra=extra)
    meta = store.meta("liver", version)
    assert {k: meta[k] for k in extra} == extra
    assert meta["task"] == "liver" and meta["shots"] == 1


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(None, id="missing-version"),
        pytest.param("{", id="corrupt-json"),
        pytest.param("[1, 2]", id="not-an-object"),
    ],
)
def test_meta_of_a_missing_or_damaged_version_is_none(
    tmp_path: Path, tiny_model: MetaModel, damage: str | None
) -> None:
    store = AdapterStore(tmp_path)
    _fit(tiny_model, "liver", 1.0)
    version = store.save(tiny_model, "liver")
    if damage is None:
        version += 1
    else:
        (tmp_path / "liver" / f"v{version:04d}.json").write_text(damage)
    assert store.meta("liver", version) is None
    assert store.meta("spleen", 1) is None  # a task never saved


@pytest.mark.parametrize("name", ["../etc", "a/b", "", ".hidden"])
def test_unsafe_task_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="invalid task name"):
        AdapterStore(tmp_path).versions(name)
    with pytest.raises(ValueError, match="invalid task name"):
        AdapterStore(tmp_path).meta(name, 1)


_WRITER = """
import sys, torch
from medmeta_plugin.adapt.store import AdapterStore
from medmeta_plugin.networks import BackboneConfig, MetaModel
torch.manual_seed(0)
model = MetaModel(config=BackboneConfig(features=(8, 16, 16), norm="group", groups=4))
model.add_task("liver", "segmentation", mode="lora")
store = AdapterStore(sys.argv[1])
value = 0.0
print("ready", flush=True)
while True:
    value += 1.0
    with torch.no_grad():
        model.task("liver").head.conv.bias.fill_(value)
    store.save(model, "liver")
"""


@pytest.mark.slow  # five processes that import torch: about a minute on 2 cores
def test_sigkill_while_writing_leaves_a_loadable_store(tmp_path: Path) -> None:
    # A real process writes versions as fast as it can and is killed with SIGKILL at random moments; after
    # each kill the newest complete version loads and no half-written file carries a version's name.
    import signal
    import subprocess
    import sys
    import time

    import numpy as np

    from medmeta_plugin.networks import BackboneConfig

    rng = np.random.default_rng(0)
    store_dir = tmp_path / "store"
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    loaded_versions = []
    for _ in range(5):
        process = subprocess.Popen(
            [sys.executable, str(script), str(store_dir)], stdout=subprocess.PIPE, text=True
        )
        assert process.stdout.readline().strip() == "ready"
        time.sleep(float(rng.uniform(0.2, 0.8)))
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        torch.manual_seed(0)
        model = MetaModel(config=BackboneConfig(features=(8, 16, 16), norm="group", groups=4))
        store = AdapterStore(store_dir)
        adapter, version = store.load_latest(model, "liver")
        # The weights are the ones saved with that version (the writer stored bias = its counter).
        assert float(adapter.head.conv.bias) >= 1.0
        loaded_versions.append(version)
        for path in (store_dir / "liver").glob("v*.json"):
            assert path.read_text().rstrip().endswith("}")  # every named metadata file is complete
    assert loaded_versions == sorted(loaded_versions) and loaded_versions[-1] > loaded_versions[0]


def test_a_version_the_disk_cannot_hold_leaves_nothing_and_the_previous_serves(
    tmp_path: Path, tiny_model: MetaModel
) -> None:
    """A real full disk (``RLIMIT_FSIZE``) at the weights and at the record: a clear error, no file of the
    failed version, the previous version loads, and the next save once there is room is version 2."""
    store = AdapterStore(tmp_path)
    _fit(tiny_model, "liver", 1.0)
    store.save(tiny_model, "liver", extra={"report": "x" * 20_000})
    folder = tmp_path / "liver"
    weights, record = (folder / "v0001.safetensors").stat().st_size, (folder / "v0001.json").stat().st_size
    assert weights < record, "the record is padded to fail after the weights were written"
    _fit(tiny_model, "liver", 2.0)
    for limit in (weights // 2, (weights + record) // 2):  # the weights fail; the weights fit, the record not
        with file_size_limit(limit), pytest.raises(OSError, match="no space to write version 2 of adapter"):
            store.save(tiny_model, "liver", extra={"report": "y" * 20_000})
        assert sorted(p.name for p in folder.iterdir()) == ["v0001.json", "v0001.safetensors"], limit
        fresh = MetaModel(backbone=tiny_model.backbone)
        assert store.restore(fresh) == {"liver": 1}
        assert float(fresh.task("liver").head.conv.bias) == 1.0
    assert store.save(tiny_model, "liver", extra={"report": "y" * 20_000}) == 2
