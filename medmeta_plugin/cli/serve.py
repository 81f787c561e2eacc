"""``medmeta serve`` and ``medmeta demo``: start MONAI Label with the medmeta app.

Both run ``python -m monailabel.main start_server`` (not the ``monailabel`` shell wrapper, which splits
quoted arguments) with the environment MONAI Label 0.8.5 needs: ``PYTHONPATH`` for its train process,
tracking off, sessions kept in the app's model folder instead of ``~/.cache``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "PARSERS",
    "copy_app",
    "free_port",
    "running_server",
    "server_answers",
    "server_command",
    "stop_process",
]

REPO = Path(__file__).resolve().parents[2]
DEFAULT_APP = REPO / "apps" / "medmeta"


def server_command(
    studies: str, app: Path = DEFAULT_APP, host: str = "127.0.0.1", port: int = 8000, conf: list | None = None
) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that start the server.

    Args:
        studies: a studies folder, or a DICOMweb URL (``http://host/dicom-web``).
        app: the app folder.
        host, port: where to listen.
        conf: ``[[key, value], ...]`` passed as ``--conf key value``.

    Raises:
        ValueError: if the app or the studies folder does not exist.
    """
    if not (Path(app) / "main.py").is_file():
        raise ValueError(f"no MONAI Label app at {app} (main.py missing).")
    if not studies.startswith(("http://", "https://")) and not Path(studies).is_dir():
        raise ValueError(f"studies folder {studies} does not exist.")
    command = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app)]
    command += ["--studies", str(studies), "--host", host, "--port", str(port)]
    for key, value in conf or []:
        command += ["--conf", key, value]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.setdefault("MONAI_LABEL_TRACKING_ENABLED", "false")
    env.setdefault("MONAI_LABEL_SESSION_PATH", str(Path(app) / "model" / "sessions"))
    return command, env


def copy_app(destination: Path, app: Path = DEFAULT_APP) -> Path:
    """A private copy of the app folder without its ``model`` folder (adapters, sessions) or caches, so a
    server started on it begins with nothing adapted and writes nothing into the repository.

    Returns:
        ``destination``.
    """
    shutil.copytree(
        app, destination, ignore=shutil.ignore_patterns("model", "__pycache__"), dirs_exist_ok=True
    )
    return destination


def stop_process(process: subprocess.Popen, timeout: float = 20.0) -> None:
    """Stop a child process: SIGTERM, then SIGKILL if it is still running after ``timeout`` seconds."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_answers(url: str) -> bool:
    """True once the server at ``url`` answers ``GET /info/`` at all (an HTTP error such as 401 counts)."""
    try:
        with urllib.request.urlopen(f"{url}/info/", timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


@contextlib.contextmanager
def running_server(
    studies: str,
    app: Path,
    log: Path,
    conf: list | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120.0,
) -> Iterator[tuple[str, subprocess.Popen]]:
    """A server process on a free 127.0.0.1 port for the ``with`` block (benchmarks and tests).

    Args:
        studies, app, conf: as for :func:`server_command`.
        log: file the server's output is appended to (its tail is in the error if it does not start).
        env: extra environment variables.
        timeout: seconds to wait for ``/info/``.

    Yields:
        ``(url, process)``; the process is terminated (killed after 20 s) when the block ends, unless the
        block stopped it itself.

    Raises:
        RuntimeError: if the server exits or does not answer within ``timeout``.
    """
    command, full_env = server_command(studies, app, "127.0.0.1", free_port(), conf)
    full_env.update(env or {})
    url = f"http://127.0.0.1:{command[command.index('--port') + 1]}"
    with open(log, "a") as out:
        process = subprocess.Popen(
            command, env=full_env, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent
        )
    try:
        deadline = time.monotonic() + timeout
        while not server_answers(url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.25)
        yield url, process
    finally:
        stop_process(process)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--app", type=Path, default=DEFAULT_APP, help="the app folder (default apps/medmeta)")
    p.add_argument(
        "--conf", nargs=2, action="append", metavar=("KEY", "VALUE"), help="app setting, repeatable"
    )


def _add_serve(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="start the MONAI Label server with the medmeta app")
    p.add_argument("--studies", required=True, help="studies folder or DICOMweb URL")
    _add_arguments(p)
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    command, env = server_command(args.studies, args.app, args.host, args.port, args.conf)
    os.execvpe(command[0], command, env)
    return 0  # not reached


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="serve the sample scans with the shipped backbone (make demo)")
    p.add_argument("--root", type=Path, default=REPO / ".demo", help="where the demo studies live")
    _add_arguments(p)
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from medmeta_plugin.app.demo import DEMO_STRUCTURES, prepare_demo

    studies = prepare_demo(args.root)
    url = f"http://{args.host}:{args.port}"
    print(
        f"""
medmeta demo: MONAI Label server on {url} with the shipped meta-trained backbone
studies: {studies}
  ct_abdomen_a  abdominal CT; {", ".join(DEMO_STRUCTURES)} already labelled (adapted at start-up)
  mr_abdomen_d  abdominal MR of another patient: run medmeta on it
  mr_brain_1    brain MRI with a tumour: label it (as "tumour"), Submit Label
  mr_brain_2    brain MRI of another patient: run medmeta on it

In 3D Slicer: Modules > Active Learning > MONAI Label; server {url}; Next Sample (or pick mr_abdomen_d);
Auto Segmentation: model "medmeta", Run. To teach it a new structure: draw it in Segment Editor on one
scan, Submit Label; a few seconds later "medmeta" segments it on the next scan.
OHIF: {url}/ohif/ (needs a DICOMweb studies source).  Stop with Ctrl+C.
""",
        flush=True,
    )
    command, env = server_command(str(studies), args.app, args.host, args.port, args.conf)
    os.execvpe(command[0], command, env)
    return 0  # not reached


def _add_demo_pacs(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo-pacs",
        help="a local Orthanc PACS with the sample studies + the app on its DICOMweb (make demo-pacs)",
    )
    p.add_argument("--root", type=Path, default=REPO / ".demo-pacs", help="Orthanc storage and DICOM files")
    _add_arguments(p)
    p.set_defaults(func=_demo_pacs)


def _stop_on_sigterm(*_: object) -> None:
    raise KeyboardInterrupt  # so a `kill` (SIGTERM) stops Orthanc and the server like Ctrl+C


def _label_demo_structures(server: subprocess.Popen, url: str, series_dir: Path, names: tuple) -> None:
    """Once the server answers, label the demo structures on the CT as 3D Slicer would: OHIF's panel cannot
    submit labels, and medmeta has nothing to segment until a structure is labelled."""
    from medmeta_plugin.stack.studies import submit_sample_label

    while not server_answers(url):
        if server.poll() is not None:
            return  # the server's own output says why
        time.sleep(0.5)
    submit_sample_label(url, "ct_abdomen_a", series_dir, list(names))
    print(f"medmeta demo-pacs: labelled {', '.join(names)} on the CT; adapting them now.", flush=True)


def _demo_pacs(args: argparse.Namespace) -> int:
    import signal

    signal.signal(signal.SIGTERM, _stop_on_sigterm)

    from medmeta_plugin.app.demo import DEMO_STRUCTURES
    from medmeta_plugin.stack.orthanc import OrthancServer
    from medmeta_plugin.stack.studies import load_sample_studies

    orthanc = OrthancServer(args.root / "orthanc").start()
    try:
        first_run = not orthanc.get("/series")
        if first_run:
            load_sample_studies(orthanc, args.root / "dicom")
        url = f"http://{args.host}:{args.port}"
        print(
            f"""
medmeta demo-pacs: Orthanc (DICOMweb {orthanc.dicomweb}) with the sample CT and MR of two patients,
and the MONAI Label server on {url} reading its studies over DICOMweb; {", ".join(DEMO_STRUCTURES)}
are labelled on the CT (stored in Orthanc as a DICOM SEG) and adapted as the server starts.
OHIF: {url}/ohif/  - open MEDMETA-D (the MR) in the "MONAI Label" mode, connect the MONAI Label panel to
{url}/, Auto-Segmentation: model "medmeta", Run.  Orthanc's explorer: {orthanc.url}/app/explorer.html.
Stop with Ctrl+C.
""",
            flush=True,
        )
        command, env = server_command(orthanc.dicomweb, args.app, args.host, args.port, args.conf)
        env.setdefault("MONAI_LABEL_DICOMWEB_SEARCH_FILTER", "{}")
        server = subprocess.Popen(command, env=env)
        try:
            if first_run:
                _label_demo_structures(server, url, args.root / "dicom" / "ct_abdomen_a", DEMO_STRUCTURES)
            return server.wait()
        except KeyboardInterrupt:
            server.terminate()
            server.wait(20)
            return 0
    finally:
        orthanc.stop()


PARSERS = (_add_serve, _add_demo, _add_demo_pacs)
