"""The package's data paths: a checkout's own folders, and a ``pip install .`` (not editable) that serves the
demo from ``<prefix>/share/medmeta`` without the checkout."""

from __future__ import annotations

import configparser
import glob
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
from monailabel.client import MONAILabelClient

from medmeta_plugin import paths
from medmeta_plugin.app.demo import DEMO_STRUCTURES
from medmeta_plugin.app.process import free_port, server_answers, stop_process

CHECKOUT = Path(__file__).resolve().parents[1]


def test_a_checkout_uses_its_own_folders() -> None:
    assert paths.checkout() == CHECKOUT == paths.ROOT
    assert (paths.APP / "main.py").is_file()
    assert (
        paths.DEFAULT_BACKBONE.is_file()
        and paths.MULTITASK_BACKBONE.is_file()
        and paths.META_RECIPE.is_file()
    )
    assert sorted(p.name for p in paths.SAMPLE_DATA.iterdir()) == [
        "ct_abdomen_a",
        "mr_abdomen_d",
        "mr_brain_tumour_1",
        "mr_brain_tumour_2",
    ]
    assert paths.work_folder("demo") == CHECKOUT / ".demo"


def test_real_data_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MEDMETA_REAL_DATA", str(tmp_path))
    assert paths.real_data_root() == tmp_path
    monkeypatch.delenv("MEDMETA_REAL_DATA")
    assert paths.real_data_root() == CHECKOUT.parent / "shared" / "data" / "real"


def _shipped_files() -> set[str]:
    """Files under apps/medmeta and sample_apps that an installed copy needs (the server's own output and
    caches left out)."""
    skip = {"model", "logs", "__pycache__", "bin", "lib"}
    out = set()
    for top in ("apps/medmeta", "sample_apps"):
        for path in (CHECKOUT / top).rglob("*"):
            if path.is_file() and not skip & set(path.relative_to(CHECKOUT).parts):
                out.add(path.relative_to(CHECKOUT).as_posix())
    return out


def test_setup_cfg_installs_every_shipped_file_where_paths_looks() -> None:
    """A file added to the app or the sample data but not to ``data_files`` would be missing only from
    installed copies; this compares the two lists, and each target folder with the source's."""
    config = configparser.ConfigParser()
    config.read(CHECKOUT / "setup.cfg")
    installed = set()
    for target, sources in config["options.data_files"].items():
        for pattern in sources.split(","):
            for source in glob.glob(pattern.strip(), root_dir=CHECKOUT):
                assert Path(target) == Path("share", "medmeta", Path(source).parent), (target, source)
                installed.add(Path(source).as_posix())
    assert installed == _shipped_files()


@pytest.mark.slow
def test_pip_install_serves_the_demo_without_the_checkout(tmp_path: Path) -> None:
    """``pip install .`` (a wheel, not editable) into a fresh venv; ``medmeta demo`` run from another folder
    adapts the demo structures from the installed sample data and segments the MR; what it writes goes to
    the demo's root, not into the installation."""
    wheels = tmp_path / "wheels"
    build = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        str(wheels),
    ]
    subprocess.run([*build, str(CHECKOUT)], check=True, cwd=tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    wheel = next(wheels.glob("medmeta-*.whl"))
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    # The dependencies come from this environment's site-packages, added by a .pth line: a folder added
    # that way has its own .pth files ignored, so this checkout's editable install stays out of sight.
    site = Path(
        subprocess.check_output(
            [python, "-c", "import site; print(site.getsitepackages()[0])"], text=True
        ).strip()
    )
    (site / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    where = subprocess.check_output(
        [
            python,
            "-c",
            "import medmeta_plugin.paths as p; print(p.__file__); print(p.ROOT); print(p.checkout())",
        ],
        text=True,
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    ).split()
    assert where == [str(site / "medmeta_plugin" / "paths.py"), str(venv / "share" / "medmeta"), "None"]

    port, root, log = free_port(), tmp_path / "demo", tmp_path / "demo.log"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["XDG_DATA_HOME"] = str(tmp_path / "xdg")
    with open(log, "w") as out:
        process = subprocess.Popen(
            [venv / "bin" / "medmeta", "demo", "--port", str(port), "--root", str(root)],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        client = MONAILabelClient(url, tmpdir=str(tmp_path / "client"))
        deadline = time.monotonic() + 300
        status: dict = {}
        while time.monotonic() < deadline and process.poll() is None:
            if server_answers(url):
                status = client.info()["medmeta"]
                queue = status["adaptation"]
                if (
                    set(DEMO_STRUCTURES) <= set(status["adapters"])
                    and not queue["pending"]
                    and not queue["running"]
                ):
                    break
            time.sleep(1)
        else:
            raise AssertionError(
                f"the installed demo did not adapt {DEMO_STRUCTURES}: {status}\n{log.read_text()[-4000:]}"
            )
        _, answer = client.infer("medmeta", "mr_abdomen_d", {})
        assert set(answer["label_names"]) == set(DEMO_STRUCTURES)
        assert all(answer["provenance"][name]["found_by"] for name in DEMO_STRUCTURES)
    finally:
        stop_process(process)
    assert (root / "studies" / "datastore_v2.json").is_file() and (root / "app" / "model").is_dir()
    assert not (venv / "share" / "medmeta" / "apps" / "medmeta" / "model").exists()
