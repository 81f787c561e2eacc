"""Faults against a real server process (slow): SIGKILL during adaptation, restart, nothing lost."""

from __future__ import annotations

import json
import signal
import time
import urllib.request
from pathlib import Path

import pytest
from monailabel.client import MONAILabelClient

from medmeta_plugin.app.config import parse_conf
from medmeta_plugin.app.engine import Engine
from medmeta_plugin.app.process import copy_app, running_server
from tests.app.test_upload_limits import _bomb, _nrrd_bomb

LABEL_INFO = [{"name": "ball", "idx": 1}, {"name": "box", "idx": 2}]


def _app(tmp_path: Path) -> Path:
    return copy_app(tmp_path / "app")


def _peak_rss_mb(pid: int) -> float:
    """A process's peak resident memory so far (``VmHWM``), in MB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) / 1024


def _info(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/info/", timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_sigkill_during_adaptation_then_restart_loses_nothing(tmp_path: Path, studies: dict) -> None:
    app, log = _app(tmp_path), tmp_path / "server.log"
    env = {"MONAI_LABEL_DATASTORE_AUTO_RELOAD": "false"}
    with running_server(str(studies["studies"]), app, log, env=env) as (url, process):
        client = MONAILabelClient(url, tmpdir=str(tmp_path))
        try:
            client.save_label("a", str(studies["a"]), params={"label_info": LABEL_INFO})
            deadline = time.monotonic() + 60
            while set(_info(url)["medmeta"]["adapters"]) != {"ball", "box"}:
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

    with running_server(str(studies["studies"]), app, log, env=env) as (url, _):
        # Both labels are still stored, and after the restart both structures are fitted on both.
        store = json.loads(urllib.request.urlopen(f"{url}/datastore/?output=all").read())
        assert {"a", "b"} <= {k for k, v in store["objects"].items() if "final" in v["labels"]}
        deadline = time.monotonic() + 90
        while True:
            status = _info(url)["medmeta"]
            queue = status["adaptation"]
            if not queue["pending"] and not queue["running"]:
                served = Engine(parse_conf({}), app / "model")
                if all(served.served_meta(t)["shots"] == 2 for t in ("ball", "box")):
                    break
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)


@pytest.mark.slow
def test_bad_input_over_http_leaves_the_server_serving(tmp_path: Path, studies: dict) -> None:
    """The bad-input table against a real server process: 4xx with a message, nothing stored changes."""
    import io

    import numpy as np
    import requests

    from medmeta_plugin.io import ImageMeta, write_dicom_series, write_image
    from tests.app.conftest import GEOMETRIES, phantom

    folder = studies["studies"]
    image, _ = phantom(GEOMETRIES["ras"], 7)
    broken = folder / "broken_series"
    files = write_dicom_series(broken, np.round(image * 100).astype(np.int16), GEOMETRIES["ras"])
    files[len(files) // 2].unlink()  # a missing slice
    big = ImageMeta((3.0, 3.0, 3.0), (0.0, 0.0, 0.0), ((1, 0, 0), (0, 1, 0), (0, 0, 1)), (40, 40, 40))
    write_image(folder / "big.nii.gz", np.zeros((1, 40, 40, 40), np.float32), big)
    nan = np.zeros((1, 8, 8, 8), np.float32)
    nan[0, 1, 1, 1] = np.nan
    nan_file = write_image(
        tmp_path / "nan.nii.gz",
        nan,
        ImageMeta((1.0,) * 3, (0.0,) * 3, GEOMETRIES["ras"].direction, (8, 8, 8)),
    )

    nifti_bomb = _bomb(tmp_path / "bomb.nii.gz", (512, 512, 512))  # 128 MiB inflated
    nrrd_bomb = _nrrd_bomb(tmp_path / "bomb.nrrd")  # a 24^3 header, 1 GiB inflated
    log, conf = tmp_path / "server.log", [["max_voxels", "20000"]]
    env = {"MONAI_LABEL_DATASTORE_AUTO_RELOAD": "false"}
    with running_server(str(folder), _app(tmp_path), log, conf=conf, env=env) as (url, process):
        label_info = json.dumps({"label_info": LABEL_INFO})
        requests.put(
            f"{url}/datastore/label",
            params={"image": "a"},
            files={"label": ("a.nrrd", io.BytesIO(studies["a"].read_bytes()))},
            data={"params": label_info},
            timeout=30,
        ).raise_for_status()
        snapshot = {
            p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != "datastore_v2.json"
        }

        def label(image: str, path: Path, params: str) -> requests.Response:
            with open(path, "rb") as f:
                return requests.put(
                    f"{url}/datastore/label",
                    params={"image": image},
                    files={"label": (path.name, f)},
                    data={"params": params},
                    timeout=60,
                )

        def upload(image: str, content: bytes) -> requests.Response:
            """PUT /datastore/ of an image file's bytes, as a .nii.gz upload."""
            files = {"file": ("x.nii.gz", io.BytesIO(content))}
            return requests.put(f"{url}/datastore/", params={"image": image}, files=files, timeout=60)

        cases = [
            (lambda: label("a", studies["c"], label_info), 400, "geometry"),
            (
                lambda: label("a", studies["a"], json.dumps({"label_info": [{"name": "ball", "idx": 1}]})),
                400,
                "not named",
            ),
            (lambda: label("a", studies["a"], "{not json"), 400, "JSON"),
            (
                lambda: label("a", studies["a"], json.dumps({"label_info": [{"name": "../x", "idx": 1}]})),
                400,
                "invalid",
            ),
            (lambda: label("nope", studies["a"], label_info), 404, "nope"),
            (lambda: label("a", nan_file, label_info), 400, "non-integer"),
            (lambda: upload("../../x", b"junk"), 400, "refused"),
            (lambda: upload("nan_scan", nan_file.read_bytes()), 400, "NaN"),
            (
                lambda: requests.post(f"{url}/infer/medmeta", params={"image": "broken_series"}, timeout=60),
                400,
                "broken_series",
            ),
            (
                lambda: requests.post(f"{url}/infer/medmeta", params={"image": "big"}, timeout=60),
                400,
                "max_voxels",
            ),
            # Bombs: refused from the header or while counting the inflated stream, nothing inflated.
            (lambda: label("a", nifti_bomb, label_info), 400, "declares"),
            (lambda: label("a", nrrd_bomb, label_info), 400, "inflates to more than"),
            (lambda: upload("bomb", nifti_bomb.read_bytes()), 413, "declares"),
            (lambda: requests.post(f"{url}/infer/nope", params={"image": "a"}, timeout=30), 404, "nope"),
            (lambda: requests.post(f"{url}/train/nope", timeout=30), 404, "nope"),
            (lambda: requests.post(f"{url}/activelearning/nope", timeout=30), 404, "nope"),
        ]
        # The structures must be adapted first, or inference answers "nothing adapted yet".
        deadline = time.monotonic() + 60
        while set(_info(url)["medmeta"]["adapters"]) != {"ball", "box"}:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        peak = _peak_rss_mb(process.pid)
        for call, status, needle in cases:
            response = call()
            assert response.status_code == status, (needle, response.status_code, response.text[:300])
            assert needle in response.json()["detail"], (needle, response.text[:300])
            assert _info(url)["name"] == "medmeta"  # still serving
        after = {
            p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != "datastore_v2.json"
        }
        assert after == snapshot  # nothing stored changed
        grown = _peak_rss_mb(process.pid) - peak
        assert grown < 300, f"the server's peak memory grew {grown:.0f} MB: a bomb was inflated"


@pytest.mark.slow
def test_with_authentication_enabled_the_app_endpoints_require_it(tmp_path: Path, studies: dict) -> None:
    """MONAI Label's own authentication (Keycloak/OIDC bearer tokens): without a token, the app's endpoints
    and its guard routes answer 401 like MONAI Label's own, before any medmeta check runs."""
    import requests

    log = tmp_path / "server.log"
    env = {"MONAI_LABEL_DATASTORE_AUTO_RELOAD": "false", "MONAI_LABEL_AUTH_ENABLE": "true"}
    # The server counts as up when /info/ answers at all: here it answers 401.
    with running_server(str(studies["studies"]), _app(tmp_path), log, env=env) as (url, _):
        with open(studies["a"], "rb") as f:
            label = f.read()
        calls = {
            "info": lambda: requests.get(f"{url}/info/", timeout=10),
            "datastore (MONAI Label's)": lambda: requests.get(f"{url}/datastore/?output=all", timeout=10),
            "infer medmeta": lambda: requests.post(f"{url}/infer/medmeta", params={"image": "a"}, timeout=10),
            "infer unknown model": lambda: requests.post(
                f"{url}/infer/nope", params={"image": "a"}, timeout=10
            ),
            "save label": lambda: requests.put(
                f"{url}/datastore/label",
                params={"image": "a"},
                files={"label": ("a.nrrd", label)},
                timeout=10,
            ),
            "train medmeta_adapt": lambda: requests.post(f"{url}/train/medmeta_adapt", timeout=10),
            "train unknown": lambda: requests.post(f"{url}/train/nope", timeout=10),
            "scoring": lambda: requests.post(f"{url}/scoring/medmeta_uncertainty", timeout=10),
            "strategy": lambda: requests.post(f"{url}/activelearning/medmeta_uncertainty", timeout=10),
            "label revisions": lambda: requests.get(
                f"{url}/datastore/label/revisions", params={"image": "a"}, timeout=10
            ),
            "restore a revision": lambda: requests.post(
                f"{url}/datastore/label/restore", params={"image": "a", "revision": 1}, timeout=10
            ),
        }
        answers = {name: call().status_code for name, call in calls.items()}
        assert answers == {name: 401 for name in calls}, answers
        assert not (studies["studies"] / "labels" / "final" / "a.nrrd").exists()
