"""Disk faults against a real server process (slow): the disk fills during a label write and during an
adapter write, and the model folder is read-only.

The faults are real: the server runs in a user and mount namespace (``unshare``) where its studies folder and
its model folder are small tmpfs disks, or where the model folder is mounted read-only. The test fills a disk
through ``/proc/<pid>/root``, the server's view of the file system, and frees it again.
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import requests
from monailabel.client import MONAILabelClient

from medmeta_plugin.app.process import copy_app, running_server
from medmeta_plugin.io import write_image
from tests.app.conftest import GEOMETRIES, wait_for_server

LABEL_INFO = [{"name": "ball", "idx": 1}, {"name": "box", "idx": 2}]
ENV = {"MONAI_LABEL_DATASTORE_AUTO_RELOAD": "false"}


def _namespace(script: str) -> list[str]:
    """A launcher that runs ``script`` as root of a new user and mount namespace, then the server."""
    return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-euc", f'{script}\nexec "$@"', "sh"]


@pytest.fixture(scope="module", autouse=True)
def _namespaces_available() -> None:
    probe = _namespace("mount -t tmpfs -o size=1m tmpfs /mnt") + ["true"]
    if shutil.which("unshare") is None or subprocess.run(probe, capture_output=True).returncode != 0:
        pytest.skip("unprivileged user and mount namespaces (unshare -rm) are not available here")


def _info(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/info/", timeout=10) as response:
        return json.loads(response.read())["medmeta"]


def _fill(folder: Path) -> Path:
    """Fill the disk of ``folder`` to the last byte with one file; returns it (unlink it to free the disk)."""
    filler = folder / ".filler"
    with open(filler, "wb", buffering=0) as f:
        for size in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    f.write(bytes(size))
            except OSError as err:
                assert err.errno == errno.ENOSPC, err
    return filler


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _put_label(url: str, image: str, label: Path) -> requests.Response:
    """PUT /datastore/label as 3D Slicer does."""
    with open(label, "rb") as f:
        return requests.put(
            f"{url}/datastore/label",
            params={"image": image, "tag": "final"},
            files={"label": (label.name, f)},
            data={"params": json.dumps({"label_info": LABEL_INFO})},
            timeout=120,
        )


def _adapted(url: str, version: int) -> bool:
    info = _info(url)
    queue = info["adaptation"]
    versions = {n: a["version"] for n, a in info["adapters"].items()}
    return not queue["pending"] and not queue["running"] and versions == {"ball": version, "box": version}


@pytest.mark.slow
def test_a_full_disk_during_label_and_adapter_writes_loses_nothing(tmp_path: Path, studies: dict) -> None:
    app, log = copy_app(tmp_path / "app"), tmp_path / "server.log"
    (app / "model").mkdir()
    disk = tmp_path / "studies-disk"
    disk.mkdir()
    script = (
        f"mount -t tmpfs -o size=16m tmpfs {disk}\ncp -a {studies['studies']}/. {disk}/\n"
        f"mount -t tmpfs -o size=8m tmpfs {app / 'model'}"
    )
    with running_server(str(disk), app, log, env=ENV, launcher=_namespace(script)) as (url, process):
        root = Path(f"/proc/{process.pid}/root")  # the server's view: its two small disks
        studies_disk, model_disk = root / str(disk).lstrip("/"), root / str(app / "model").lstrip("/")
        client = MONAILabelClient(url, tmpdir=str(tmp_path))
        client.save_label("a", str(studies["a"]), params={"label_info": LABEL_INFO})
        wait_for_server(lambda: _adapted(url, 1), 120, "both structures adapted (version 1)", log)

        # The model disk is full: the label is stored, its adaptation fails and says why, version 1 serves.
        filler = _fill(model_disk)
        adapters_before = _files(model_disk / "adapters")
        assert _put_label(url, "b", studies["b"]).status_code == 200
        status = wait_for_server(
            lambda: (
                (s := _info(url)["adaptation"])["tasks"].get("ball", {}).get("state") == "failed"
                and not s["running"]
                and s
            ),
            120,
            "the adaptation fails",
            log,
        )
        error = status["tasks"]["ball"]["error"]
        assert (
            "no space to write version 2 of adapter 'ball'" in error
            and "previous version still serves" in error
        )
        assert _files(model_disk / "adapters") == adapters_before, "nothing of the failed version is left"
        _, params = client.infer("medmeta", "c", {"result_extension": ".nii.gz"})
        assert params["adapter_versions"] == {"ball": 1, "box": 1}, params
        filler.unlink()  # space again: the next save adapts and writes version 2
        assert _put_label(url, "b", studies["b"]).status_code == 200
        wait_for_server(lambda: _adapted(url, 2), 120, "both structures adapted (version 2)", log)

        # The studies disk is full: a new label of "a" is a 507 with a message; the stored one is untouched.
        label = np.random.default_rng(0).integers(0, 3, (1, *GEOMETRIES["ras"].shape)).astype(np.uint8)
        new = write_image(tmp_path / "new-a.nii.gz", label, GEOMETRIES["ras"])
        filler = _fill(studies_disk)
        before = {k: v for k, v in _files(studies_disk).items() if not k.startswith(".filler")}
        answer = _put_label(url, "a", new)
        assert answer.status_code == 507, answer.text
        assert "was not stored" in answer.json()["detail"] and "unchanged" in answer.json()["detail"]
        after = {k: v for k, v in _files(studies_disk).items() if not k.startswith(".filler")}
        assert after.keys() == before.keys(), "no partial file is left"
        changed = [k for k in after if after[k] != before[k] and not k.endswith(".lock")]
        assert changed == [], changed
        revisions = requests.get(f"{url}/datastore/label/revisions", params={"image": "a"}, timeout=30)
        assert revisions.json()["revisions"] == [], revisions.text
        filler.unlink()
        assert _put_label(url, "a", new).status_code == 200
        revisions = requests.get(f"{url}/datastore/label/revisions", params={"image": "a"}, timeout=30)
        assert [r["revision"] for r in revisions.json()["revisions"]] == [1]
        wait_for_server(lambda: _adapted(url, 3), 120, "adapted on the new label (version 3)", log)


@pytest.mark.slow
def test_a_read_only_model_folder_is_refused_at_start(tmp_path: Path, studies: dict) -> None:
    app, log = copy_app(tmp_path / "app"), tmp_path / "server.log"
    model = app / "model"
    (model / "adapters").mkdir(parents=True)  # it exists, as after an earlier run: only writing fails
    script = f"mount --bind {model} {model}\nmount -o remount,ro,bind {model}"
    start = time.monotonic()
    with (
        pytest.raises(RuntimeError, match="server did not start"),
        running_server(str(studies["studies"]), app, log, env=ENV, launcher=_namespace(script), timeout=90),
    ):
        pass
    text = log.read_text()
    assert f"the app's model folder {model} is not writable (Read-only file system)" in text, text[-3000:]
    print(f"refused {time.monotonic() - start:.1f} s after the start")
