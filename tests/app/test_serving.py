"""What the app serves: the device name, which backbone file is used, adapters saved then swapped in (and
refused after a backbone change), restored after a restart, picked up from another process, snapshots by
kind, the stored metadata and atlas examples of the served version, and the refused model folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medmeta_plugin.app.config import AppConfig, parse_conf
from medmeta_plugin.app.features import FeatureCache
from medmeta_plugin.app.serving import Serving, resolve_device
from medmeta_plugin.networks import Backbone3D, TaskAdapter, TaskInfo, backbone_hash, save_backbone
from tests.app.conftest import app_conf
from tests.conftest import TINY

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("cpu", torch.device("cpu")),
        ("cuda", torch.device("cuda")),
        ("cuda:1", torch.device("cuda", 1)),
        ("auto", torch.device("cuda" if torch.cuda.is_available() else "cpu")),
    ],
)
def test_resolve_device(name: str, expected: torch.device) -> None:
    assert resolve_device(name) == expected


@pytest.fixture
def config(tiny_backbone: Path) -> AppConfig:
    return parse_conf(app_conf(tiny_backbone, device="cpu"))


def _serving(config: AppConfig, model_dir: Path) -> Serving:
    return Serving(config, model_dir, FeatureCache(config, CPU))


@pytest.fixture
def serving(config: AppConfig, tmp_path: Path) -> Serving:
    return _serving(config, tmp_path / "model")


def _adapter(serving: Serving, name: str, kind: str = "segmentation", num_outputs: int = 1) -> TaskAdapter:
    """A fresh (identity) head-mode adapter on the served backbone: what adaptation hands back."""
    return TaskAdapter(TaskInfo(name, kind, "head", num_outputs), serving.model.backbone)


def _new_backbone(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    return save_backbone(Backbone3D(TINY), path)


def test_a_fresh_model_folder_serves_the_configs_backbone_and_no_adapter(
    serving: Serving, config: AppConfig, tmp_path: Path
) -> None:
    assert serving.backbone_path == Path(config.backbone)
    assert serving.model_dir == tmp_path / "model" and serving.model_dir.is_dir()
    assert serving.tasks() == {} and serving.versions() == {}
    # Adapters live under the hash of the backbone they were fitted on.
    assert serving.store.root == tmp_path / "model" / "adapters" / backbone_hash(serving.model.backbone)[:16]
    assert serving.divisor == serving.model.backbone.size_divisor == 2 ** (len(TINY.features) - 1)
    assert not serving.model.backbone.training  # served in eval mode


def test_loading_the_backbone_resets_the_feature_cache(config: AppConfig, tmp_path: Path) -> None:
    features = FeatureCache(config, CPU)
    with pytest.raises(RuntimeError, match="no backbone in use yet"):
        features.size_divisor()
    serving = Serving(config, tmp_path / "model", features)
    assert features.size_divisor() == serving.divisor


def test_a_file_in_place_of_the_model_folder_is_refused(config: AppConfig, tmp_path: Path) -> None:
    blocked = tmp_path / "model"
    blocked.write_text("a file, not a folder")
    with pytest.raises(ValueError, match="the app's model folder .*model is not writable"):
        _serving(config, blocked)


def test_serve_saves_a_version_then_serves_it(serving: Serving) -> None:
    adapter = _adapter(serving, "ball")
    extra = {"report": {"steps": 3}, "atlas": [{"image": "a.nii.gz", "label": "a.nrrd", "value": 1}]}
    assert serving.serve("ball", adapter, serving.model, shots=1, extra=extra) == 1
    assert serving.tasks() == {"ball": adapter} and serving.versions() == {"ball": 1}
    assert serving.store.versions("ball") == [1]
    meta = serving.served_meta("ball")
    assert meta is not None and meta["shots"] == 1 and meta["report"] == {"steps": 3}
    assert serving.atlas_examples("ball") == extra["atlas"]
    # A second fit of the same task is a new version, served in place of the first.
    again = _adapter(serving, "ball")
    assert serving.serve("ball", again, serving.model, shots=2, extra={}) == 2
    assert serving.tasks()["ball"] is again and serving.versions() == {"ball": 2}
    assert serving.served_meta("ball")["shots"] == 2 and serving.atlas_examples("ball") == []


@pytest.mark.parametrize("task", ["never_adapted", "ball"])
def test_nothing_served_has_no_meta_and_no_atlas(serving: Serving, task: str) -> None:
    serving.serve("box", _adapter(serving, "box"), serving.model, shots=1, extra={"atlas": [{"x": 1}]})
    if task == "ball":  # a task with a stored version that this process never loaded is not served either
        other = _serving(serving.config, serving.model_dir)
        other.serve("ball", _adapter(other, "ball"), other.model, shots=1, extra={})
    assert serving.served_meta(task) is None
    assert serving.atlas_examples(task) == []


def test_a_restart_restores_the_newest_version_of_every_task(serving: Serving) -> None:
    for name, fits in (("ball", 2), ("box", 1)):
        for _ in range(fits):
            serving.serve(name, _adapter(serving, name), serving.model, shots=1, extra={})
    restarted = _serving(serving.config, serving.model_dir)
    assert restarted.versions() == {"ball": 2, "box": 1}
    assert sorted(restarted.tasks()) == ["ball", "box"]
    assert restarted.load_backbone() == {"ball": 2, "box": 1}  # reloading restores the same


def test_tasks_is_a_sorted_snapshot_by_kind(serving: Serving) -> None:
    for name, kind, outputs in (("spleen", "segmentation", 1), ("grade", "classification", 3)):
        serving.serve(name, _adapter(serving, name, kind, outputs), serving.model, shots=1, extra={})
    serving.serve("age", _adapter(serving, "age", "regression"), serving.model, shots=1, extra={})
    serving.serve("ball", _adapter(serving, "ball"), serving.model, shots=1, extra={})
    assert list(serving.tasks()) == ["age", "ball", "grade", "spleen"]
    assert list(serving.tasks("segmentation")) == ["ball", "spleen"]
    assert list(serving.tasks("classification")) == ["grade"]
    assert list(serving.tasks("regression")) == ["age"]
    assert serving.tasks("no_such_kind") == {}
    snapshot = serving.tasks("segmentation")
    serving.serve("liver", _adapter(serving, "liver"), serving.model, shots=1, extra={})
    assert list(snapshot) == ["ball", "spleen"]  # later swaps do not reach a snapshot


def test_an_adapter_fitted_before_a_backbone_change_is_refused(serving: Serving) -> None:
    serving.serve("ball", _adapter(serving, "ball"), serving.model, shots=1, extra={})
    before = serving.model
    stale = _adapter(serving, "box")
    serving.load_backbone()  # e.g. a train task wrote a new one while "box" was adapting
    assert serving.model is not before
    with pytest.raises(ValueError, match="the backbone changed while 'box' was adapting"):
        serving.serve("box", stale, before, shots=1, extra={})
    assert "box" not in serving.tasks() and serving.store.versions("box") == []
    assert serving.versions() == {"ball": 1}


def test_refresh_picks_up_another_processs_versions(serving: Serving) -> None:
    assert serving.refresh() is None
    other = _serving(serving.config, serving.model_dir)  # e.g. MONAI Label's train process
    other.serve("ball", _adapter(other, "ball"), other.model, shots=1, extra={})
    assert "ball" not in serving.tasks()
    assert serving.refresh() == "adapters"
    assert serving.versions() == {"ball": 1} and "ball" in serving.tasks()
    assert serving.refresh() is None  # nothing new since


def test_refresh_ignores_an_incomplete_newer_version(serving: Serving) -> None:
    serving.serve("ball", _adapter(serving, "ball"), serving.model, shots=1, extra={})
    served = {k: v.clone() for k, v in serving.tasks()["ball"].state_dict().items()}
    other = _serving(serving.config, serving.model_dir)
    newer = _adapter(other, "ball")
    with torch.no_grad():
        for p in newer.parameters():
            p.add_(1.0)  # other weights than version 1's
    other.serve("ball", newer, other.model, shots=2, extra={})
    weights = serving.store.root / "ball" / "v0002.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])  # caught half-written
    assert serving.refresh() is None
    assert serving.versions() == {"ball": 1}
    now = serving.tasks()["ball"].state_dict()
    assert now.keys() == served.keys() and all(torch.equal(now[k], served[k]) for k in served)


def test_a_backbone_trained_on_the_datastore_replaces_the_configs(
    serving: Serving, config: AppConfig
) -> None:
    serving.serve("ball", _adapter(serving, "ball"), serving.model, shots=1, extra={})
    old_store = serving.store.root
    local = _new_backbone(serving.model_dir / "backbone.safetensors", seed=1)
    assert serving.backbone_path == local != Path(config.backbone)
    assert serving.refresh() == "backbone"
    # Another backbone starts with a clean set of adapters, in its own store; the old ones are kept.
    assert serving.tasks() == {} and serving.versions() == {}
    assert serving.store.root != old_store and (old_store / "ball").is_dir()
    assert serving.refresh() is None


def test_a_backbone_that_does_not_load_yet_is_retried(serving: Serving) -> None:
    serving.serve("ball", _adapter(serving, "ball"), serving.model, shots=1, extra={})
    model = serving.model
    local = serving.model_dir / "backbone.safetensors"
    local.write_bytes(b"half a file")  # caught between the two files of the pair being replaced
    for _ in range(2):
        assert serving.refresh() is None
        assert serving.model is model and serving.versions() == {"ball": 1}
    _new_backbone(local, seed=2)
    assert serving.refresh() == "backbone" and serving.model is not model


def test_atlas_examples_follow_the_served_version_across_a_backbone_change(serving: Serving) -> None:
    old = [{"image": "a.nii.gz", "label": "a.nrrd", "value": 1}]
    serving.serve("ball", _adapter(serving, "ball"), serving.model, shots=1, extra={"atlas": old})
    assert serving.atlas_examples("ball") == old
    _new_backbone(serving.model_dir / "backbone.safetensors", seed=3)
    assert serving.refresh() == "backbone"
    new = [*old, {"image": "b.nii.gz", "label": "b.nrrd", "value": 1}]
    assert serving.serve("ball", _adapter(serving, "ball"), serving.model, shots=2, extra={"atlas": new}) == 1
    assert serving.served_meta("ball")["atlas"] == new
    assert serving.atlas_examples("ball") == new


def test_working_names_a_scan_that_cannot_be_read(serving: Serving, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="missing.nii.gz: cannot be read"):
        serving.working(tmp_path / "missing.nii.gz")


def test_working_reads_a_scan_onto_the_working_grid(serving: Serving, studies: dict) -> None:
    volume, base = serving.working(studies["studies"] / "a.nii.gz")
    shape = volume.image.shape
    assert len(shape) == 5 and all(s % serving.divisor == 0 for s in shape[2:])
    assert base.features.shape[2:] == shape[2:]
    assert base.embedding.shape == (1, serving.model.backbone.embedding_dim)
    again = serving.working(studies["studies"] / "a.nii.gz")
    assert again[1] is base  # cached per file version
