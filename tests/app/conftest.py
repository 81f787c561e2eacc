"""Fixtures of the app tests: a tiny backbone file, a studies folder of phantom scans, an in-process server.

Everything is real: NIfTI/NRRD files written with the project's writers, MONAI Label's FastAPI app served by
``TestClient`` (the server's own lifespan runs), the medmeta app class loaded by MONAI Label from its folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from medmeta_plugin.app.process import copy_app
from medmeta_plugin.io import ImageMeta, write_image
from medmeta_plugin.networks import Backbone3D, save_backbone
from tests.conftest import TINY

REPO = Path(__file__).resolve().parents[2]

# Two geometries: an axial RAS scan and a flipped (LPS-like) one with another spacing, so every test that
# goes through the app also checks the way to the working grid and back.
GEOMETRIES = {
    "ras": ImageMeta((2.0, 2.0, 2.0), (0.0, 0.0, 0.0), ((1, 0, 0), (0, 1, 0), (0, 0, 1)), (24, 24, 24)),
    "lps": ImageMeta((1.5, 1.5, 2.5), (40.0, 40.0, 0.0), ((-1, 0, 0), (0, -1, 0), (0, 0, 1)), (32, 32, 20)),
}


def phantom(meta: ImageMeta, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A noisy scan with a bright ball (label 1) and a dark box (label 2), positions jittered by ``seed``.

    Returns:
        image float32 (1, X, Y, Z) and label uint8 (1, X, Y, Z) on ``meta``'s grid.
    """
    rng = np.random.default_rng(seed)
    world = np.stack(np.meshgrid(*[np.arange(n) for n in meta.shape], indexing="ij"), axis=-1) @ (
        np.asarray(meta.direction) * np.asarray(meta.spacing)
    ).T + np.asarray(meta.origin)
    centre = np.array([24.0, 24.0, 24.0]) + rng.uniform(-3, 3, 3)
    ball = np.linalg.norm(world - centre, axis=-1) < 9.0
    box = np.all(np.abs(world - (centre + np.array([-14.0, -14.0, 0.0]))) < 4.0, axis=-1) & ~ball
    image = rng.normal(0.0, 0.2, meta.shape) + 2.0 * ball - 1.5 * box
    label = (ball * 1 + box * 2).astype(np.uint8)
    return image[None].astype(np.float32), label[None]


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("backbone") / "tiny.safetensors"
    save_backbone(Backbone3D(TINY), path)
    return path


@pytest.fixture
def studies(tmp_path: Path) -> dict[str, Path]:
    """Three scans (``a`` and ``b`` RAS, ``c`` flipped) and their label maps, outside the studies folder."""
    folder = tmp_path / "studies"
    labels = tmp_path / "labels"
    folder.mkdir()
    labels.mkdir()
    paths = {"studies": folder, "labels": labels}
    for name, geometry, seed in (("a", "ras", 1), ("b", "ras", 2), ("c", "lps", 3)):
        image, label = phantom(GEOMETRIES[geometry], seed)
        write_image(folder / f"{name}.nii.gz", image, GEOMETRIES[geometry])
        write_image(labels / f"{name}.nrrd", label, GEOMETRIES[geometry])
        paths[name] = labels / f"{name}.nrrd"
    return paths


def app_conf(backbone: Path, **extra: str) -> dict[str, str]:
    return {"backbone": str(backbone), "spacing": "2", "adapt_steps": "10", **extra}


@contextlib.contextmanager
def medmeta_app_instance(
    tmp_path: Path, studies_folder: Path, backbone: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator:
    """The medmeta app as MONAI Label's ``app_instance()`` builds it in this process (what the project's
    routes look up), on ``studies_folder``, atlas off (no ITK); no server is started."""
    from monailabel.config import settings
    from monailabel.interfaces.utils.app import app_instance, clear_cache

    values = {
        "MONAI_LABEL_APP_DIR": str(copy_app(tmp_path / "app")),
        "MONAI_LABEL_STUDIES": str(studies_folder),
        "MONAI_LABEL_APP_CONF": app_conf(backbone, atlas="false"),
        "MONAI_LABEL_DATASTORE_AUTO_RELOAD": False,
        "MONAI_LABEL_SESSION_PATH": str(tmp_path / "sessions"),
    }
    for key, value in values.items():
        monkeypatch.setattr(settings, key, value)
    clear_cache()
    try:
        yield app_instance()
    finally:
        clear_cache()


@pytest.fixture
def app_client(tmp_path: Path, studies: dict[str, Path], tiny_backbone: Path) -> Iterator:
    """MONAI Label's FastAPI app serving the medmeta app on ``studies``, in process."""
    from fastapi.testclient import TestClient
    from monailabel.config import settings

    app_dir = copy_app(tmp_path / "app")
    conf = {**app_conf(tiny_backbone), "server_mode": "true"}
    values = {
        "MONAI_LABEL_APP_DIR": str(app_dir),
        "MONAI_LABEL_STUDIES": str(studies["studies"]),
        "MONAI_LABEL_APP_CONF": conf,
        "MONAI_LABEL_DATASTORE_AUTO_RELOAD": False,
        "MONAI_LABEL_SESSION_PATH": str(tmp_path / "sessions"),
    }
    saved = {k: getattr(settings, k) for k in values}
    env = dict(os.environ)
    for key, value in values.items():
        setattr(settings, key, value)
        os.environ[key] = json.dumps(value) if isinstance(value, dict) else str(value)
    os.environ.setdefault("PYTHONPATH", str(REPO))
    from monailabel.app import app
    from monailabel.interfaces.utils.app import clear_cache

    clear_cache()
    try:
        with TestClient(app) as client:
            client.app_dir = app_dir
            yield client
    finally:
        clear_cache()
        for key, value in saved.items():
            setattr(settings, key, value)
        os.environ.clear()
        os.environ.update(env)


def save_label(client, image: str, path: Path, label_info: object = None, **params: object):
    """``PUT /datastore/label`` as 3D Slicer sends it (file + JSON params with ``label_info``)."""
    body = dict(params)
    if label_info is not None:
        body["label_info"] = label_info
    with open(path, "rb") as f:
        return client.put(
            "/datastore/label",
            params={"image": image},
            files={"label": (path.name, f)},
            data={"params": json.dumps(body)},
        )


def wait_adapted(client, names: list[str], timeout: float = 60.0) -> dict:
    """Poll ``/info/`` until every name has an adapter and nothing is pending; returns the medmeta status."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        status = client.get("/info/").json()["medmeta"]
        queue = status["adaptation"]
        if all(n in status["adapters"] for n in names) and not queue["pending"] and not queue["running"]:
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"not adapted within {timeout} s: {status}")
        time.sleep(0.2)


def wait_for_server(predicate, timeout: float, what: str, log: Path, interval: float = 0.3):
    """Poll ``predicate`` until it returns something true (returned) or ``timeout`` seconds pass; the
    failure names ``what`` and shows the tail of the server's ``log``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what} within {timeout} s; server log:\n{log.read_text()[-4000:]}")
