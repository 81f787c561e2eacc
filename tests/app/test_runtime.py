"""The runtime across restarts: a structure is re-adapted exactly when its labels changed while it was not
being served (a label stored, then the server died before or during the adaptation)."""

from __future__ import annotations

from pathlib import Path

from medmeta_plugin.app.config import parse_conf
from medmeta_plugin.app.datastore import MedMetaDatastore
from medmeta_plugin.app.runtime import MedMetaRuntime
from tests.app.conftest import app_conf

INFO = {"label_info": [{"name": "ball", "idx": 1}, {"name": "box", "idx": 2}]}


def _runtime(tmp_path: Path, studies: dict, backbone: Path) -> MedMetaRuntime:
    datastore = MedMetaDatastore(str(studies["studies"]), extensions=["*.nii.gz"])
    return MedMetaRuntime(parse_conf(app_conf(backbone)), tmp_path / "model", datastore)


def test_restart_readapts_only_what_changed(tmp_path: Path, studies: dict, tiny_backbone: Path) -> None:
    first = _runtime(tmp_path, studies, tiny_backbone)
    first.datastore.save_label("a", str(studies["a"]), "final", dict(INFO))
    try:
        assert sorted(first.start()) == ["ball", "box"]  # labels without adapters
        assert first.worker.wait_idle(60)
    finally:
        first.worker.stop()

    second = _runtime(tmp_path, studies, tiny_backbone)
    try:
        assert second.start() == []  # every adapter was fitted on exactly the stored labels
    finally:
        second.worker.stop()

    # A label stored while no adaptation ran (the server died first): both structures are stale.
    second.datastore.save_label("b", str(studies["b"]), "final", dict(INFO))
    third = _runtime(tmp_path, studies, tiny_backbone)
    try:
        assert sorted(third.start()) == ["ball", "box"]
        assert third.worker.wait_idle(60)
        assert third.engine.served_meta("ball")["shots"] == 2
    finally:
        third.worker.stop()


def test_inference_slots_bound_how_many_inferences_compute_at_once(
    tmp_path: Path, studies: dict, tiny_backbone: Path
) -> None:
    import threading
    import time

    datastore = MedMetaDatastore(str(studies["studies"]), extensions=["*.nii.gz"])
    conf = parse_conf({**app_conf(tiny_backbone), "concurrent_inferences": "2"})
    runtime = MedMetaRuntime(conf, tmp_path / "model", datastore)
    inside, most, waits = [0], [0], []
    lock = threading.Lock()

    def infer() -> None:
        with runtime.inference_slot() as waited:
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(0.2)
            with lock:
                inside[0] -= 1
        waits.append(waited)

    threads = [threading.Thread(target=infer) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 2, "never more than concurrent_inferences at once"
    assert max(waits) >= 0.35, "the later requests waited their turn"


def test_status_says_how_structures_are_answered(tmp_path: Path, studies: dict, tiny_backbone: Path) -> None:
    datastore = MedMetaDatastore(str(studies["studies"]), extensions=["*.nii.gz"])
    cases = (({}, "registered"), ({"incontext": "true"}, "refined"), ({"atlas": "false"}, "network"))
    for conf, answer in cases:  # incontext: the shipped refiner
        runtime = MedMetaRuntime(parse_conf(app_conf(tiny_backbone, **conf)), tmp_path / answer, datastore)
        try:
            assert runtime.status()["answer"] == answer
        finally:
            runtime.worker.stop()
