"""The MONAI Label server as a process: the command and environment that start it with the medmeta app, a
copy of the app folder, waiting for it to answer, stopping it.

Used by ``medmeta serve`` / ``demo`` (:mod:`medmeta_plugin.cli.serve`), the clinical stack and the benchmarks
that drive a real server. It runs ``python -m monailabel.main start_server`` (not the ``monailabel`` shell
wrapper, which splits quoted arguments) with the environment MONAI Label 0.8.5 needs: ``PYTHONPATH`` for its
train process, tracking off, sessions kept in the app's model folder instead of ``~/.cache``.
"""

from __future__ import annotations

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

from medmeta_plugin.paths import APP, checkout

__all__ = [
    "copy_app",
    "free_port",
    "running_server",
    "server_answers",
    "server_command",
    "stop_process",
]


def server_command(
    studies: str, app: Path = APP, host: str = "127.0.0.1", port: int = 8000, conf: list | None = None
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
    source = checkout()  # an installed copy is importable as it is; a checkout must be on the path
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(source or ""), env.get("PYTHONPATH", "")) if p)
    env.setdefault("MONAI_LABEL_TRACKING_ENABLED", "false")
    env.setdefault("MONAI_LABEL_SESSION_PATH", str(Path(app) / "model" / "sessions"))
    return command, env


def copy_app(destination: Path, app: Path = APP) -> Path:
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
    launcher: list[str] | None = None,
) -> Iterator[tuple[str, subprocess.Popen]]:
    """A server process on a free 127.0.0.1 port for the ``with`` block (benchmarks and tests).

    Args:
        studies, app, conf: as for :func:`server_command`.
        log: file the server's output is appended to (its tail is in the error if it does not start).
        env: extra environment variables.
        timeout: seconds to wait for ``/info/``.
        launcher: a command the server's command line is appended to, which must end by running it as the
            same process (``exec "$@"``), e.g. a mount namespace with a small disk for fault tests.

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
            [*(launcher or []), *command], env=full_env, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent
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
