"""The train tasks: medmeta_adapt's progress, and medmeta_metatrain (fine-tunes the served backbone on the
datastore's tasks, which the server then reloads)."""

from __future__ import annotations

from pathlib import Path

import pytest

from medmeta_plugin.app.config import parse_conf
from medmeta_plugin.app.datastore import MedMetaDatastore
from medmeta_plugin.app.runtime import MedMetaRuntime
from medmeta_plugin.app.train_task import AdaptTrain, MetaTrain, write_datalist
from medmeta_plugin.episodes import TaskRegistry
from tests.app.conftest import REPO

RECIPE = REPO / "sample_apps" / "backbone" / "meta_train.yaml"
INFO = {"label_info": [{"name": "ball", "idx": 1}, {"name": "box", "idx": 2}]}


@pytest.fixture
def runtime(tmp_path: Path, studies: dict) -> MedMetaRuntime:
    datastore = MedMetaDatastore(str(studies["studies"]), extensions=["*.nii.gz"])
    for image in ("a", "b"):
        datastore.save_label(image, str(studies[image]), "final", dict(INFO))
    # The shipped backbone: the recipe's architecture, so it can be fine-tuned.
    return MedMetaRuntime(parse_conf({"spacing": "2", "adapt_steps": "5"}), tmp_path / "model", datastore)


def test_datastore_becomes_a_datalist(runtime: MedMetaRuntime, tmp_path: Path) -> None:
    count = write_datalist(runtime.datastore, tmp_path / "datalist.json", {})
    assert count == 2
    registry = TaskRegistry.from_datalist(tmp_path / "datalist.json")
    assert sorted(registry.names()) == ["ball", "box"]
    assert len(registry.get("ball").cases) == 2


@pytest.mark.slow  # about a minute on 2 CPU cores: phantoms, deformed copies and two meta-training steps
def test_metatrain_installs_a_backbone_the_server_reloads(runtime: MedMetaRuntime) -> None:
    runtime.adapt_now("ball")
    task = MetaTrain(runtime, RECIPE)
    stats = task({"steps": 2, "synthetic_cases": 8}, runtime.datastore)
    assert stats["epoch"] == stats["total_epochs"] == 2 and stats["tasks_from_datastore"] == 2
    assert (runtime.engine.model_dir / "backbone.safetensors").is_file()
    assert task.stats()["epoch"] == 2
    runtime.worker.start()
    try:
        runtime.refresh()  # the new backbone is loaded; "ball" must be adapted again on it
        assert runtime.engine.backbone_path.parent == runtime.engine.model_dir
        assert runtime.worker.wait_idle(120)
        assert sorted(runtime.engine.tasks()) == ["ball", "box"]
    finally:
        runtime.worker.stop()


def test_adapt_train_reports_progress_and_refuses_unknown_names(runtime: MedMetaRuntime) -> None:
    task = AdaptTrain(runtime)
    stats = task({"structures": "ball,box"}, runtime.datastore)
    assert stats["epoch"] == stats["total_epochs"] == 2
    assert stats["best_metric"] > 0  # mean leave-one-out Dice over two labelled scans
    assert task.stats() == stats
    with pytest.raises(ValueError, match="nope"):
        task({"structures": ["nope"]}, runtime.datastore)
