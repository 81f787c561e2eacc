"""The server as a process (``app/process.py``): the command line and environment that start it, the copy of
the app folder, stopping a child process (SIGTERM, then SIGKILL), a free port, whether a server answers, and
``running_server`` failing with the log's tail when its process exits or does not answer in time.

A real MONAI Label server started through ``running_server`` is tested in ``test_server.py``; here every
process is a real child (``sleep``, ``sh``, a Python HTTP server in a thread) that stands for nothing else.
"""

from __future__ import annotations

import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from medmeta_plugin.app.process import (
    copy_app,
    free_port,
    running_server,
    server_answers,
    server_command,
    stop_process,
)
from medmeta_plugin.paths import APP

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def app(tmp_path: Path) -> Path:
    """A private copy of the shipped app folder."""
    return copy_app(tmp_path / "app")


@pytest.fixture
def studies(tmp_path: Path) -> Path:
    folder = tmp_path / "studies"
    folder.mkdir()
    return folder


# ----- server_command --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("studies_kind", "host", "port", "conf", "tail"),
    [
        pytest.param("folder", "127.0.0.1", 8000, None, [], id="folder-defaults"),
        pytest.param("http://pacs:8042/dicom-web", "0.0.0.0", 9001, None, [], id="dicomweb-http"),
        pytest.param("https://pacs/dicom-web", "::1", 443, [], [], id="dicomweb-https"),
        pytest.param(
            "folder",
            "localhost",
            8123,
            [["spacing", "2"], ["labels", '{"liver": 1, "spleen": 2}']],
            ["--conf", "spacing", "2", "--conf", "labels", '{"liver": 1, "spleen": 2}'],
            id="conf-pairs-kept-whole",
        ),
    ],
)
def test_server_command_runs_monailabel_main_with_the_arguments_in_order(
    app: Path, studies: Path, studies_kind: str, host: str, port: int, conf: list | None, tail: list[str]
) -> None:
    where = str(studies) if studies_kind == "folder" else studies_kind
    command, _ = server_command(where, app, host, port, conf)
    assert command == [
        sys.executable,
        "-m",
        "monailabel.main",
        "start_server",
        "--app",
        str(app),
        "--studies",
        where,
        "--host",
        host,
        "--port",
        str(port),
        *tail,
    ]


def test_server_command_environment_puts_the_checkout_first_and_keeps_the_callers_settings(
    app: Path, studies: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", "/some/where")
    monkeypatch.delenv("MONAI_LABEL_TRACKING_ENABLED", raising=False)
    monkeypatch.delenv("MONAI_LABEL_SESSION_PATH", raising=False)
    _, env = server_command(str(studies), app)
    assert env["PYTHONPATH"].split(":") == [str(REPO), "/some/where"]
    assert env["MONAI_LABEL_TRACKING_ENABLED"] == "false"
    assert env["MONAI_LABEL_SESSION_PATH"] == str(app / "model" / "sessions")
    # A caller's own choices are kept; an empty PYTHONPATH adds no empty entry (the current folder).
    monkeypatch.setenv("PYTHONPATH", "")
    monkeypatch.setenv("MONAI_LABEL_TRACKING_ENABLED", "true")
    monkeypatch.setenv("MONAI_LABEL_SESSION_PATH", "/tmp/mine")
    _, env = server_command(str(studies), app)
    assert env["PYTHONPATH"] == str(REPO)
    assert env["MONAI_LABEL_TRACKING_ENABLED"] == "true" and env["MONAI_LABEL_SESSION_PATH"] == "/tmp/mine"


@pytest.mark.parametrize(
    ("app_kind", "studies_kind", "needle"),
    [
        pytest.param("no-main", "folder", "no MONAI Label app at .*main.py missing", id="app-without-main"),
        pytest.param("missing", "folder", "no MONAI Label app at", id="app-missing"),
        pytest.param("app", "missing", "studies folder .*nope does not exist", id="studies-missing"),
        pytest.param("app", "file", "studies folder .*a-file does not exist", id="studies-is-a-file"),
        pytest.param("app", "ftp://pacs/dicom-web", "studies folder ftp://pacs", id="not-http"),
    ],
)
def test_server_command_refuses_a_missing_app_or_studies_folder(
    app: Path, studies: Path, tmp_path: Path, app_kind: str, studies_kind: str, needle: str
) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    (tmp_path / "a-file").write_text("x")
    apps = {"app": app, "no-main": bare, "missing": tmp_path / "no-app"}
    where = {"folder": str(studies), "missing": str(tmp_path / "nope"), "file": str(tmp_path / "a-file")}
    with pytest.raises(ValueError, match=needle):
        server_command(where.get(studies_kind, studies_kind), apps[app_kind])


# ----- copy_app --------------------------------------------------------------------------------------------


def test_copy_app_leaves_out_the_model_folder_and_caches(tmp_path: Path) -> None:
    source = tmp_path / "source"
    for name, text in {
        "main.py": "# app",
        "lib/infer.py": "# code",
        "model/adapters/ball/v0001.safetensors": "weights",
        "model/sessions/s1": "session",
        "__pycache__/main.cpython-311.pyc": "cache",
        "lib/__pycache__/infer.cpython-311.pyc": "cache",
    }.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text(text)
    destination = tmp_path / "copy"
    destination.mkdir()
    (destination / "kept.txt").write_text("already here")  # copied into, not replaced
    assert copy_app(destination, source) == destination
    files = sorted(p.relative_to(destination).as_posix() for p in destination.rglob("*") if p.is_file())
    assert files == ["kept.txt", "lib/infer.py", "main.py"]
    assert (destination / "lib" / "infer.py").read_text() == "# code"


def test_copy_app_of_the_shipped_app_can_be_served(tmp_path: Path) -> None:
    copy = copy_app(tmp_path / "app")
    assert (copy / "main.py").read_bytes() == (APP / "main.py").read_bytes()
    assert not (copy / "model").exists()
    command, _ = server_command(str(tmp_path), copy)
    assert command[command.index("--app") + 1] == str(copy)


# ----- stop_process ----------------------------------------------------------------------------------------


def test_stop_process_terminates_a_running_child() -> None:
    process = subprocess.Popen(["sleep", "30"])
    start = time.monotonic()
    stop_process(process)
    assert process.returncode == -signal.SIGTERM
    assert time.monotonic() - start < 5


def test_stop_process_kills_a_child_that_ignores_sigterm() -> None:
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
    process = subprocess.Popen([sys.executable, "-c", code + "time.sleep(30)"], stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == b"ready"
        start = time.monotonic()
        stop_process(process, timeout=0.5)
        assert process.returncode == -signal.SIGKILL
        assert 0.4 < time.monotonic() - start < 5, "SIGTERM was waited for, then SIGKILL sent"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()


def test_stop_process_leaves_an_exited_child_as_it_ended() -> None:
    process = subprocess.Popen(["sh", "-c", "exit 3"])
    process.wait(10)
    stop_process(process)
    assert process.returncode == 3


# ----- free_port and server_answers ------------------------------------------------------------------------


def test_free_port_can_be_listened_on() -> None:
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()


@pytest.fixture
def http_server() -> Iterator[tuple[str, list[str], list[int]]]:
    """A real HTTP server on 127.0.0.1 answering every GET with the status in ``status[0]``; yields its URL,
    the paths asked for and that status list."""
    paths: list[str] = []
    status = [200]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            paths.append(self.path)
            self.send_response(status[0])
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", paths, status
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.mark.parametrize("code", [200, 401, 404, 500])
def test_a_server_answers_whatever_its_status(http_server: tuple, code: int) -> None:
    url, paths, status = http_server
    status[0] = code
    assert server_answers(url) is True
    assert paths == ["/info/"]


def test_nothing_listening_does_not_answer() -> None:
    assert server_answers(f"http://127.0.0.1:{free_port()}") is False


# ----- running_server --------------------------------------------------------------------------------------


def test_a_server_process_that_exits_is_an_error_with_its_log(
    app: Path, studies: Path, tmp_path: Path
) -> None:
    log = tmp_path / "logs" / "server.log"
    log.parent.mkdir()
    log.write_text("earlier run\n")
    # The launcher prints what it was given, where it runs and the extra environment, then exits.
    script = 'echo "args: $*"; echo "cwd: $(pwd)"; echo "marker: $MEDMETA_TEST_MARKER"; exit 3'
    launcher = ["sh", "-c", script, "sh"]
    conf, env = [["spacing", "2"]], {"MEDMETA_TEST_MARKER": "x42"}
    with (
        pytest.raises(RuntimeError, match="server did not start") as caught,
        running_server(str(studies), app, log, conf, env, 30, launcher),
    ):
        raise AssertionError("the block must not run")
    message = str(caught.value)
    assert "marker: x42" in message and f"cwd: {log.parent}" in message
    assert f"monailabel.main start_server --app {app} --studies {studies} --host 127.0.0.1" in message
    assert "--conf spacing 2" in message
    assert log.read_text().startswith("earlier run\n"), "the log is appended to"


def test_a_server_that_does_not_answer_in_time_is_an_error_and_is_stopped(
    app: Path, studies: Path, tmp_path: Path
) -> None:
    log, pid_file = tmp_path / "server.log", tmp_path / "pid"
    # ``exec`` keeps the process id: the one written is the one running_server started.
    launcher = ["sh", "-c", f"echo $$ > {pid_file}; exec sleep 30", "sh"]
    start = time.monotonic()
    with (
        pytest.raises(RuntimeError, match="server did not start"),
        running_server(str(studies), app, log, timeout=1.0, launcher=launcher),
    ):
        raise AssertionError("the block must not run")
    assert 1.0 <= time.monotonic() - start < 10, "it waited for the timeout, no longer"
    with pytest.raises(ProcessLookupError):  # stopped and reaped
        os.kill(int(pid_file.read_text()), 0)


def test_running_server_refuses_a_missing_studies_folder_before_starting(app: Path, tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with (
        pytest.raises(ValueError, match="studies folder .* does not exist"),
        running_server(str(tmp_path / "nope"), app, log),
    ):
        raise AssertionError("the block must not run")
    assert not log.exists(), "nothing was started"
