"""``medmeta labels``: its arguments, and the revisions table and restore message it prints from a real
server - the project's revision routes on a FastAPI app served by uvicorn in this process, looking up the
real medmeta app on phantom scans - with every error (no server, HTTP 4xx) an exit code 2 naming the call."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import torch
import uvicorn
from fastapi import FastAPI, Request, Response
from monailabel.interfaces.app import MONAILabelApp

from medmeta_plugin.app.process import free_port
from medmeta_plugin.app.routes import install_guards
from medmeta_plugin.cli.main import build_parser, main
from medmeta_plugin.io import write_image
from medmeta_plugin.networks import Backbone3D, save_backbone
from tests.app.conftest import GEOMETRIES, medmeta_app_instance, phantom
from tests.conftest import TINY

LABEL_INFO = {"label_info": [{"name": "ball", "idx": 1}, {"name": "box", "idx": 2}]}
STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC"  # how the table writes a time
HEADER = "| revision | saved | replaced | by | structures |\n|---|---|---|---|---|\n"


class Server:
    """The project's routes on a real HTTP server in a thread; ``authorization`` records each request's
    Authorization header."""

    def __init__(self) -> None:
        self.authorization: list[str | None] = []
        fastapi_app = FastAPI()

        @fastapi_app.middleware("http")
        async def record(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
            self.authorization.append(request.headers.get("authorization"))
            return await call_next(request)

        install_guards(fastapi_app)
        self.url = f"http://127.0.0.1:{free_port()}"
        config = uvicorn.Config(fastapi_app, port=int(self.url.rsplit(":", 1)[1]), log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> Server:
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise AssertionError(f"uvicorn did not start at {self.url}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(10)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with Server() as running:
        yield running


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return save_backbone(Backbone3D(TINY), tmp_path_factory.mktemp("backbone") / "tiny.safetensors")


@pytest.fixture
def studies(tmp_path: Path) -> dict[str, Path]:
    """Scan ``a`` in ``studies/``; label maps ``a`` and ``b`` on its grid (two labels to submit for it)."""
    folder, labels = tmp_path / "studies", tmp_path / "labels"
    folder.mkdir()
    labels.mkdir()
    meta = GEOMETRIES["ras"]
    write_image(folder / "a.nii.gz", phantom(meta, 1)[0], meta)
    paths = {"studies": folder}
    for name, seed in (("a", 1), ("b", 2)):
        paths[name] = write_image(labels / f"{name}.nrrd", phantom(meta, seed)[1], meta)
    return paths


@pytest.fixture
def medmeta_app(
    tmp_path: Path, studies: dict, tiny_backbone: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[MONAILabelApp]:
    """The medmeta app that the routes look up (``app_instance()``), on ``studies``; atlas off (no ITK)."""
    with medmeta_app_instance(tmp_path, studies["studies"], tiny_backbone, monkeypatch) as app:
        yield app


def _labels(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["labels", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def test_parser_defaults() -> None:
    args = build_parser().parse_args(["labels", "restore", "a", "3"])
    assert (args.image, args.revision, args.tag) == ("a", 3, "final")
    assert (args.server, args.token, args.timeout) == ("http://127.0.0.1:8000", None, 60.0)
    args = build_parser().parse_args(["labels", "revisions", "b", "--tag", "original", "--timeout", "2.5"])
    assert (args.image, args.tag, args.timeout) == ("b", "original", 2.5)
    assert not hasattr(args, "revision")


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["labels"], "the following arguments are required: ACTION"),
        (["labels", "list", "a"], "invalid choice: 'list'"),
        (["labels", "restore", "a"], "the following arguments are required: revision"),
        (["labels", "restore", "a", "one"], "invalid int value: 'one'"),
        (["labels", "revisions"], "the following arguments are required: image"),
        (["labels", "revisions", "a", "--timeout", "soon"], "invalid float value: 'soon'"),
    ],
)
def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str], needle: str) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)
    assert exited.value.code == 2 and needle in capsys.readouterr().err


def test_no_server_is_an_error_naming_the_address(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code, out, err = _labels(capsys, "revisions", "a", "--server", url, "--timeout", "5")
    assert code == 2 and out == ""
    assert err.startswith(f"medmeta labels: error: no server answers at {url} (")


def test_an_image_without_earlier_labels(
    server: Server, medmeta_app: MONAILabelApp, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _labels(capsys, "revisions", "a", "--server", server.url)
    assert code == 0
    assert out == f"a (final): current label saved -\n{HEADER}(no earlier label)\n"


def test_revisions_then_restore_then_revisions(
    server: Server, medmeta_app: MONAILabelApp, studies: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    store = medmeta_app.datastore()
    store.save_label("a", str(studies["a"]), "final", dict(LABEL_INFO))
    store.save_label("a", str(studies["b"]), "final", dict(LABEL_INFO))  # the first becomes revision 1
    url = f"{server.url}/"  # a trailing slash is fine
    code, out, _ = _labels(capsys, "revisions", "a", "--server", url)
    assert code == 0
    with urllib.request.urlopen(f"{server.url}/datastore/label/revisions?image=a", timeout=10) as response:
        body = json.loads(response.read())
    lines = out.splitlines()
    assert lines[0] == f"a (final): current label saved {_utc(body['current']['ts'])}"
    assert "\n".join(lines[1:3]) + "\n" == HEADER
    revision = body["revisions"][0]
    expected = f"| 1 | {_utc(revision['ts'])} | {_utc(revision['replaced_at'])} | a new label | ball, box |"
    assert lines[3:] == [expected]
    assert re.fullmatch(rf"\| 1 \| {STAMP} \| {STAMP} \| a new label \| ball, box \|", expected)

    code, out, _ = _labels(capsys, "restore", "a", "1", "--server", server.url)
    assert code == 0
    assert out == (
        "a (final): revision 1 is the current label again; the label it replaced is kept as a revision. "
        "Adapting: ball, box.\n"
    )
    code, out, _ = _labels(capsys, "revisions", "a", "--server", server.url)
    rows = out.splitlines()[3:]
    assert [row.split(" | ")[0] for row in rows] == ["| 1", "| 2"]
    assert rows[0].endswith("| a new label | ball, box |") and rows[1].endswith("| a restore | ball, box |")


def test_restoring_another_tag_adapts_nothing(
    server: Server, medmeta_app: MONAILabelApp, studies: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    store = medmeta_app.datastore()
    for label in ("a", "b"):
        store.save_label("a", str(studies[label]), "original", dict(LABEL_INFO))
    code, out, _ = _labels(capsys, "restore", "a", "1", "--tag", "original", "--server", server.url)
    assert code == 0 and out.startswith("a (original): revision 1 is the current label again")
    assert out.endswith("Adapting: nothing.\n")  # only final labels are adapted from


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["restore", "a", "9"], "POST /datastore/label/restore: 404 "),
        (["revisions", "nope"], "GET /datastore/label/revisions: 404 image 'nope' is not in the datastore."),
        (
            ["restore", "nope", "1"],
            "POST /datastore/label/restore: 404 image 'nope' is not in the datastore.",
        ),
        (["revisions", "a", "--tag", "../x"], "GET /datastore/label/revisions: 400 invalid label tag '../x'"),
    ],
)
def test_http_errors_exit_2_with_the_servers_message(
    server: Server,
    medmeta_app: MONAILabelApp,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    error: str,
) -> None:
    code, out, err = _labels(capsys, *argv, "--server", server.url)
    assert code == 2 and out == ""
    assert err.startswith(f"medmeta labels: error: {error}")


def test_a_server_without_the_routes_is_a_404(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _labels(capsys, "revisions", "a", "--server", f"{server.url}/elsewhere")
    assert code == 2
    assert err == "medmeta labels: error: GET /datastore/label/revisions: 404 Not Found\n"


@pytest.mark.parametrize(("token", "header"), [(None, None), ("s3cret", "Bearer s3cret")])
def test_token_is_sent_as_a_bearer_header(
    server: Server,
    medmeta_app: MONAILabelApp,
    capsys: pytest.CaptureFixture[str],
    token: str | None,
    header: str | None,
) -> None:
    argv = ["revisions", "a", "--server", server.url] + (["--token", token] if token else [])
    server.authorization.clear()
    assert _labels(capsys, *argv)[0] == 0
    assert server.authorization == [header]
