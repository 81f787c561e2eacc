"""Faults against a real server process (slow): SIGKILL during adaptation, restart, nothing lost."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from monailabel.client import MONAILabelClient

from medmeta_plugin.app.config import parse_conf
from medmeta_plugin.app.engine import Engine
from medmeta_plugin.cli.serve import server_command
from tests.app.conftest import REPO
from tests.app.test_server import _answers, _free_port

LABEL_INFO = [{"name": "ball", "idx": 1}, {"name": "box", "idx": 2}]


def _start(app: Path, studies: Path, port: int, log: Path) -> subprocess.Popen:
    command, env = server_command(str(studies), app, "127.0.0.1", port)
    env["MONAI_LABEL_DATASTORE_AUTO_RELOAD"] = "false"
    with open(log, "a") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=app.parent)
    deadline = time.monotonic() + 120
    while not _answers(f"http://127.0.0.1:{port}"):
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError("server did not start:\n" + log.read_text()[-3000:])
        time.sleep(0.5)
    return process


def _info(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/info/", timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_sigkill_during_adaptation_then_restart_loses_nothing(tmp_path: Path, studies: dict) -> None:
    app = tmp_path / "app"
    shutil.copytree(REPO / "apps" / "medmeta", app, ignore=shutil.ignore_patterns("model", "__pycache__"))
    port, log = _free_port(), tmp_path / "server.log"
    process = _start(app, studies["studies"], port, log)
    client = MONAILabelClient(f"http://127.0.0.1:{port}", tmpdir=str(tmp_path))
    try:
        client.save_label("a", str(studies["a"]), params={"label_info": LABEL_INFO})
        deadline = time.monotonic() + 60
        while set(_info(port)["medmeta"]["adapters"]) != {"ball", "box"}:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        # A second label, and the server is killed while it adapts on it.
        client.save_label("b", str(studies["b"]), params={"label_info": LABEL_INFO})
        time.sleep(0.3)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(10)

    # Every version file that carries a name loads; the store serves the newest complete one.
    engine = Engine(parse_conf({}), app / "model")
    assert set(engine.tasks()) == {"ball", "box"}
    for meta in (app / "model" / "adapters").glob("*/*/v*.json"):
        json.loads(meta.read_text())

    process = _start(app, studies["studies"], port, log)
    try:
        # Both labels are still stored, and after the restart both structures are fitted on both.
        store = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/datastore/?output=all").read())
        assert {"a", "b"} <= {k for k, v in store["objects"].items() if "final" in v["labels"]}
        deadline = time.monotonic() + 90
        while True:
            status = _info(port)["medmeta"]
            queue = status["adaptation"]
            if not queue["pending"] and not queue["running"]:
                served = Engine(parse_conf({}), app / "model")
                if all(served.served_meta(t)["shots"] == 2 for t in ("ball", "box")):
                    break
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
    finally:
        process.terminate()
        process.wait(20)
