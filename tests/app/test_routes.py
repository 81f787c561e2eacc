"""The guard routes and the revision routes, installed on a FastAPI app that holds MONAI Label's own routers:
they go in front of MONAI Label's routes once, refuse bad ``params``, tags, train tasks, scoring methods and
``output=dicom_seg`` on local studies with a 4xx and a message, and hand every other request on to MONAI
Label's handler. The app they look up is the real medmeta app (built by MONAI Label from its folder on
phantom scans, no server started)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from monailabel.endpoints import datastore, infer, scoring, train
from monailabel.interfaces.app import MONAILabelApp

from medmeta_plugin.app.routes import install_guards
from tests.app.conftest import medmeta_app_instance

LABEL_INFO = [{"name": "ball", "idx": 1}, {"name": "box", "idx": 2}]
GUARDED = [
    ("/datastore/label/revisions", "GET", "list_revisions"),
    ("/datastore/label/restore", "POST", "restore_revision"),
    ("/infer/{model}", "POST", "infer_guard"),
    ("/train/{model}", "POST", "train_guard"),
    ("/scoring/{method}", "POST", "scoring_guard"),
    ("/datastore/label", "PUT", "label_guard"),
]


def _monai_label_app() -> FastAPI:
    """A FastAPI app with MONAI Label's own routers for the guarded paths (as ``monailabel.app`` has)."""
    fastapi_app = FastAPI()
    for module in (infer, train, scoring, datastore):
        fastapi_app.include_router(module.router)
    return fastapi_app


def _routes(fastapi_app: FastAPI) -> list[tuple[str, str, str]]:
    return [
        (r.path, method, r.endpoint.__name__)
        for r in fastapi_app.router.routes
        if isinstance(r, APIRoute)
        for method in sorted(r.methods)
    ]


@pytest.fixture(scope="module")
def client() -> TestClient:
    fastapi_app = _monai_label_app()
    install_guards(fastapi_app)
    return TestClient(fastapi_app)


@pytest.fixture
def medmeta_app(
    tmp_path: Path, studies: dict, tiny_backbone: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[MONAILabelApp]:
    """The medmeta app that the guards look up (``app_instance()``), on ``studies``; atlas off (no ITK)."""
    with medmeta_app_instance(tmp_path, studies["studies"], tiny_backbone, monkeypatch) as app:
        yield app


def _put_label(client: TestClient, image: str, path: Path, tag: str | None = None, params: str | None = None):
    query = {"image": image} if tag is None else {"image": image, "tag": tag}
    body = json.dumps({"label_info": LABEL_INFO}) if params is None else params
    with open(path, "rb") as f:
        return client.put(
            "/datastore/label", params=query, files={"label": (path.name, f)}, data={"params": body}
        )


def test_guards_go_in_front_of_monai_labels_routes_once() -> None:
    fastapi_app = _monai_label_app()
    before = list(fastapi_app.router.routes)
    install_guards(fastapi_app)
    assert _routes(fastapi_app)[: len(GUARDED)] == GUARDED
    assert fastapi_app.router.routes[len(GUARDED) :] == before  # MONAI Label's own stay, behind the guards
    routes = list(fastapi_app.router.routes)
    install_guards(fastapi_app)
    assert fastapi_app.router.routes == routes


PARAMS = [
    ("{bad", "params is not valid JSON (Expecting property name enclosed in double quotes at position 1)."),
    ('{"a": 1', "params is not valid JSON (Expecting ',' delimiter at position 7)."),
    ("[1]", "params must be a JSON object, got list."),
    ('"x"', "params must be a JSON object, got str."),
    ("3", "params must be a JSON object, got int."),
    ("null", "params must be a JSON object, got NoneType."),
]


@pytest.mark.parametrize(("params", "detail"), PARAMS)
def test_infer_params_that_are_no_json_object_are_a_400(client: TestClient, params: str, detail: str) -> None:
    response = client.post("/infer/medmeta", params={"image": "a"}, data={"params": params})
    assert response.status_code == 400 and response.json()["detail"] == detail


@pytest.mark.parametrize(("params", "detail"), PARAMS)
def test_label_params_that_are_no_json_object_are_a_400(
    client: TestClient, studies: dict, params: str, detail: str
) -> None:
    response = _put_label(client, "a", studies["a"], params=params)
    assert response.status_code == 400 and response.json()["detail"] == detail


BAD_TAGS = ["../x", "a/b", ".hidden", "a..b", "x" * 129]


@pytest.mark.parametrize("tag", BAD_TAGS)
def test_a_label_tag_that_is_no_safe_name_is_a_400_on_every_label_route(
    client: TestClient, studies: dict, tag: str
) -> None:
    answers = [
        _put_label(client, "a", studies["a"], tag=tag),
        client.get("/datastore/label/revisions", params={"image": "a", "tag": tag}),
        client.post("/datastore/label/restore", params={"image": "a", "revision": 1, "tag": tag}),
    ]
    for response in answers:
        assert response.status_code == 400, response.text
        assert response.json()["detail"].startswith(f"invalid label tag {tag!r}")


@pytest.mark.parametrize(
    ("call", "status", "detail"),
    [
        (
            lambda c: c.post("/train/no_such_task"),
            404,
            "unknown train task 'no_such_task'; train tasks: ['medmeta_adapt', 'medmeta_metatrain'].",
        ),
        (
            lambda c: c.post("/scoring/no_such_method"),
            404,
            "unknown scoring method 'no_such_method'; scoring methods: ['medmeta_uncertainty'].",
        ),
        (
            lambda c: c.post("/train/medmeta_adapt", json={"structures": '["ball", '}),
            400,
            "structures is not a valid JSON list (Expecting value): '[\"ball\",'.",  # stripped
        ),
        (
            lambda c: c.post("/train/medmeta_adapt", json={"structures": 5}),
            400,
            "structures must be a list of names, a JSON list or a comma list, got 5.",
        ),
        (
            lambda c: c.post("/train/medmeta_adapt", json={"structures": ["ball", 2]}),
            400,
            "structures must be a list of names, a JSON list or a comma list, got ['ball', 2].",
        ),
        (
            lambda c: c.post("/infer/medmeta", params={"image": "a", "output": "dicom_seg"}),
            400,
            "output=dicom_seg needs DICOMweb studies (a DICOM SEG references a series).",
        ),
        (
            lambda c: c.get("/datastore/label/revisions", params={"image": "nope"}),
            404,
            "image 'nope' is not in the datastore.",
        ),
        (
            lambda c: c.post("/datastore/label/restore", params={"image": "nope", "revision": 1}),
            404,
            "image 'nope' is not in the datastore.",
        ),
    ],
)
def test_requests_the_running_app_cannot_serve_are_4xx(
    client: TestClient, medmeta_app: MONAILabelApp, call, status: int, detail: str
) -> None:
    response = call(client)
    assert response.status_code == status, response.text
    assert response.json()["detail"] == detail


def test_other_requests_reach_monai_labels_handlers(client: TestClient, medmeta_app: MONAILabelApp) -> None:
    # The infer guard hands a good request to MONAI Label's run_inference, which asks the app.
    response = client.post("/infer/medmeta", params={"image": "a"}, data={"params": "{}"})
    assert response.status_code == 400 and "no structure has been adapted yet" in response.json()["detail"]
    response = client.post("/infer/no_model", params={"image": "a"})
    assert response.status_code == 404 and "unknown model 'no_model'" in response.json()["detail"]
    # The scoring guard hands a known method on: it scores every unlabelled scan (no adapter: no score).
    response = client.post("/scoring/medmeta_uncertainty", params={"run_sync": "true"})
    assert response.status_code == 200 and response.json() == {"scores": {"a": None, "b": None, "c": None}}


def test_revisions_are_listed_and_restored(
    client: TestClient, medmeta_app: MONAILabelApp, studies: dict
) -> None:
    empty = client.get("/datastore/label/revisions", params={"image": "a"})
    assert empty.status_code == 200
    assert empty.json() == {"image": "a", "tag": "final", "current": None, "revisions": []}
    # An empty tag is the final label, as MONAI Label's default.
    saved = _put_label(client, "a", studies["a"], tag="")
    assert saved.status_code == 200, saved.text
    assert saved.json()["medmeta"] == {"adapting": ["ball", "box"]}
    assert _put_label(client, "a", studies["b"]).status_code == 200  # replaces it: revision 1
    body = client.get("/datastore/label/revisions", params={"image": "a", "tag": "final"}).json()
    assert body["current"]["file"] == "a.nrrd" and isinstance(body["current"]["ts"], int)
    assert [(r["revision"], r["reason"], r["structures"]) for r in body["revisions"]] == [
        (1, "replaced", ["ball", "box"])
    ]
    restored = client.post("/datastore/label/restore", params={"image": "a", "revision": 1})
    assert restored.status_code == 200, restored.text
    assert restored.json() == {
        "image": "a",
        "tag": "final",
        "restored": 1,
        "label": "a",
        "medmeta": {"adapting": ["ball", "box"]},  # adapted from like a new label
    }
    body = client.get("/datastore/label/revisions", params={"image": "a"}).json()
    assert [(r["revision"], r["reason"]) for r in body["revisions"]] == [(1, "replaced"), (2, "restored")]
    missing = client.post("/datastore/label/restore", params={"image": "a", "revision": 9})
    assert missing.status_code == 404 and "9" in missing.json()["detail"]
    other_tag = client.get("/datastore/label/revisions", params={"image": "a", "tag": "original"}).json()
    assert other_tag["revisions"] == [] and other_tag["tag"] == "original"
