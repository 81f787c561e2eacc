"""End to end: a real MONAI Label server process on 127.0.0.1, driven by ``monailabel.client`` as 3D Slicer
drives it (info, next sample, sessions, submit label, infer .nrrd/uint8, train start/status/stop)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from monailabel.client import MONAILabelClient

from medmeta_plugin.app.process import copy_app, running_server
from medmeta_plugin.io import read_image
from medmeta_plugin.registration import PlacementConfig
from tests.app.conftest import wait_for_server

LABEL_INFO = [{"name": "ball", "idx": 1}, {"name": "box", "idx": 2}]


@pytest.fixture
def server(tmp_path: Path, studies: dict) -> Iterator[tuple[MONAILabelClient, subprocess.Popen, Path]]:
    app = copy_app(tmp_path / "app")
    log = tmp_path / "server.log"
    # No --conf at all: the shipped backbone with the defaults.
    env = {"MONAI_LABEL_DATASTORE_AUTO_RELOAD": "false"}
    with running_server(str(studies["studies"]), app, log, env=env) as (url, process):
        yield MONAILabelClient(url, tmpdir=str(tmp_path / "client")), process, log


def test_slicer_workflow_against_a_real_server(server, studies, tmp_path: Path) -> None:
    client, _, log = server
    info = client.info()
    assert "config" not in info and info["models"]["medmeta"]["type"] == "segmentation"

    sample = client.next_sample("medmeta_diversity", {})
    assert sample["id"] in {"a", "b", "c"}

    session = client.create_session(str(studies["studies"] / "c.nii.gz"))
    session_id = session["session_id"]
    assert client.get_session(session_id)

    (tmp_path / "client").mkdir()
    response = client.save_label("a", str(studies["a"]), params={"label_info": LABEL_INFO})
    assert sorted(response["medmeta"]["adapting"]) == ["ball", "box"]

    def adapted() -> bool:
        models = client.info()["models"]["medmeta"]
        return models["labels"] == {"ball": 1, "box": 2}

    wait_for_server(adapted, 60, "no adapter", log, interval=0.5)
    out, params = client.infer("medmeta", "b", {"result_extension": ".nrrd", "result_dtype": "uint8"})
    assert params["label_names"] == {"ball": 1, "box": 2}
    # How each answer was found: scan a's masks, placed sure on scan b; the placement shows in /info/.
    provenance = params["provenance"]
    found = {n: (p["found_by"], p["supports"], p["sure_supports"], p["sure"]) for n, p in provenance.items()}
    assert found == {"ball": ("registered", 1, 1, True), "box": ("registered", 1, 1, True)}, provenance
    placement = client.info()["medmeta"]["placement"]
    pairs = {(r["query"], r["support"]): r["sure"] for r in placement["recent"]}
    assert (
        placement["threshold"] == PlacementConfig().threshold and pairs[("b.nii.gz", "a.nii.gz")] is True
    ), placement
    label, meta = read_image(out)
    truth, truth_meta = read_image(studies["b"])
    assert meta.shape == truth_meta.shape
    ball = label[0] == 1
    # On the default 3 mm working grid the 9 mm ball is 3 voxels in radius: the registered mask of scan a,
    # the default answer, gives 0.78 (the head's refinement, --conf refine true, 0.83).
    assert 2 * (ball & (truth[0] == 1)).sum() / (ball.sum() + (truth[0] == 1).sum()) > 0.7

    # Inference on the session's uploaded scan (the flipped one).
    out, params = client.infer("medmeta", "", {"result_extension": ".nii.gz"}, session_id=session_id)
    assert read_image(out)[1].shape == read_image(studies["c"])[1].shape
    client.remove_session(session_id)

    # Slicer's Train button: MONAI Label's training process adapts the structures and reports stats.
    client.train_start("medmeta_adapt", {"structures": "ball"})

    def trained() -> dict | None:
        stats = client.info()["train_stats"].get("medmeta_adapt", {})
        return stats if stats.get("epoch") == 1 and not client.train_status(check_if_running=True) else None

    stats = wait_for_server(trained, 120, "medmeta_adapt did not finish", log, interval=0.5)
    assert stats["total_epochs"] == 1 and "ball" in stats["structures"]
    # The train process wrote version 2 of "ball"; the server serves it at its next request.
    wait_for_server(
        lambda: client.info()["medmeta"]["adapters"]["ball"]["version"] == 2,
        20,
        "no version 2",
        log,
        interval=0.5,
    )
    client.train_stop()  # DELETE /train/ with nothing running is harmless
    assert not client.train_status(check_if_running=True)


def test_unknown_names_are_4xx_over_http(server) -> None:
    client, _, _ = server
    for call in (
        lambda: client.infer("medmeta", "no_such_image", {}),
        lambda: client.infer("no_such_model", "a", {}),
        lambda: client.next_sample("no_such_strategy", {}),
    ):
        with pytest.raises(Exception) as err:
            call()
        assert "Status: 404" in str(err.value)
    assert client.info()["name"] == "medmeta"  # still serving


@pytest.mark.slow
def test_label_revisions_and_concurrent_saves_against_a_real_server(
    server, studies, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Saves of one image from several threads at once (3D Slicer and OHIF users on one scan): every final
    save schedules its adaptation, every replaced label is a revision, and the CLI lists and restores them."""
    import threading

    from medmeta_plugin.cli.main import main

    client, _, log = server
    (tmp_path / "client").mkdir()
    url = client.get_server_url()
    answers: list[tuple[str, dict]] = []
    barrier = threading.Barrier(6)

    def save(i: int) -> None:
        tag = "final" if i % 2 == 0 else "original"
        own = MONAILabelClient(url, tmpdir=str(tmp_path / "client"))
        barrier.wait()
        answers.append(
            (tag, own.save_label("a", str(studies["a" if i < 3 else "b"]), tag, {"label_info": LABEL_INFO}))
        )

    threads = [threading.Thread(target=save, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(answers) == 6, log.read_text()[-3000:]
    for tag, answer in answers:
        adapting = answer["medmeta"]["adapting"]
        assert (sorted(adapting) == ["ball", "box"]) == (tag == "final"), (tag, answer)
    assert main(["labels", "revisions", "a", "--server", url]) == 0
    listed = capsys.readouterr().out
    assert "| 1 |" in listed and "| 2 |" in listed and "| 3 |" not in listed, listed  # 3 finals: 2 replaced
    assert main(["labels", "restore", "a", "1", "--server", url]) == 0
    assert "Adapting: ball, box" in capsys.readouterr().out
    assert main(["labels", "revisions", "a", "--server", url]) == 0
    assert "a restore" in capsys.readouterr().out
    assert main(["labels", "restore", "a", "9", "--server", url]) == 2
    assert "404" in capsys.readouterr().err
