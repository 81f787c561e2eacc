"""The medmeta app in MONAI Label's own FastAPI server (in process): the calls 3D Slicer and OHIF make."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from requests_toolbelt.multipart import decoder

from medmeta_plugin.io import read_image, write_image
from tests.app.conftest import GEOMETRIES, REPO, phantom, save_label, wait_adapted

SLICER_INFO = [{"name": "ball", "idx": 1}, {"name": "box", "idx": 2}]


def _multipart(response) -> tuple[dict, bytes]:
    """The ``params`` JSON and the file of a multipart infer response (what 3D Slicer parses)."""
    parts = decoder.MultipartDecoder(response.content, response.headers["content-type"]).parts
    params, image = {}, b""
    for part in parts:
        disposition = part.headers[b"Content-Disposition"].decode()
        if 'name="params"' in disposition:
            params = json.loads(part.content)
        else:
            image = part.content
    return params, image


def test_info_is_valid_for_slicer(app_client) -> None:
    info = app_client.get("/info/").json()
    assert "config" not in info  # 3D Slicer refuses a server whose /info/ has a top-level config
    for name, model in info["models"].items():
        assert {"type", "labels", "dimension"} <= set(model), name
    assert info["models"]["medmeta"]["type"] == "segmentation"
    assert info["models"]["medmeta_volume"]["type"] == "classification"
    assert {"medmeta_adapt", "medmeta_metatrain"} <= set(info["trainers"])
    assert {"medmeta_uncertainty", "medmeta_diversity", "random"} <= set(info["strategies"])
    assert info["datastore"]["total"] == 3
    assert info["models"]["medmeta"]["labels"] == {}  # nothing adapted yet


def test_submitted_label_is_adapted_and_served(app_client, studies) -> None:
    response = save_label(app_client, "a", studies["a"], SLICER_INFO)
    assert response.status_code == 200, response.text
    assert sorted(response.json()["medmeta"]["adapting"]) == ["ball", "box"]
    status = wait_adapted(app_client, ["ball", "box"])
    assert status["adaptation"]["tasks"]["ball"]["state"] == "ready"
    assert app_client.get("/info/").json()["models"]["medmeta"]["labels"] == {"ball": 1, "box": 2}

    # Slicer's inference call on the flipped scan: .nrrd, uint8, multipart with label_names.
    response = app_client.post(
        "/infer/medmeta",
        params={"image": "c"},
        data={"params": json.dumps({"result_extension": ".nrrd", "result_dtype": "uint8"})},
    )
    assert response.status_code == 200, response.text
    params, payload = _multipart(response)
    assert params["label_names"] == {"ball": 1, "box": 2}
    assert {n: p["found_by"] for n, p in params["provenance"].items()} == {
        "ball": "registered",
        "box": "registered",
    }
    path = Path(app_client.app_dir) / "result.nrrd"
    path.write_bytes(payload)
    label, meta = read_image(path)
    image_meta = read_image(Path(studies["studies"]) / "c.nii.gz")[1]
    assert meta.shape == image_meta.shape
    np.testing.assert_allclose(meta.affine, image_meta.affine, atol=1e-4)
    assert set(np.unique(label).astype(int)) <= {0, 1, 2}


def test_tasks_parameter_restricts_output(app_client, studies) -> None:
    save_label(app_client, "a", studies["a"], SLICER_INFO)
    wait_adapted(app_client, ["ball", "box"])
    query = {"image": "b", "output": "json"}
    response = app_client.post("/infer/medmeta", params=query, data={"params": json.dumps({"tasks": "box"})})
    assert response.status_code == 200, response.text
    assert response.json()["label_names"] == {"box": 2}
    response = app_client.post("/infer/medmeta", params=query, data={"params": json.dumps({"tasks": "nope"})})
    assert response.status_code == 400
    assert "nope" in response.json()["detail"]


def test_ohif_label_bin_uses_configured_names(app_client, studies) -> None:
    # OHIF sends raw uint8 voxels named label.bin and no label_info; --conf labels was not set here, so the
    # label is refused with a message that says how to name it.
    _, label = phantom(GEOMETRIES["ras"], 2)
    raw = label[0].astype(np.uint8).tobytes(order="F")
    response = app_client.put(
        "/datastore/label",
        params={"image": "b"},
        files={"label": ("label.bin", io.BytesIO(raw))},
        data={"params": "{}"},
    )
    assert response.status_code == 400
    assert "label_info" in response.json()["detail"]
    # With names it is stored, on the image's grid.
    response = app_client.put(
        "/datastore/label",
        params={"image": "b"},
        files={"label": ("label.bin", io.BytesIO(raw))},
        data={"params": json.dumps({"label_info": SLICER_INFO})},
    )
    assert response.status_code == 200, response.text
    wait_adapted(app_client, ["ball", "box"])


def test_ohif_infer_output_image(app_client, studies) -> None:
    save_label(app_client, "a", studies["a"], SLICER_INFO)
    wait_adapted(app_client, ["ball"])
    response = app_client.post("/infer/medmeta", params={"image": "b", "output": "image"})
    assert response.status_code == 200
    path = Path(app_client.app_dir) / "ohif.nii.gz"
    path.write_bytes(response.content)
    assert read_image(path)[1].shape == GEOMETRIES["ras"].shape


@pytest.mark.parametrize(
    ("call", "status", "needle"),
    [
        (lambda c: c.post("/infer/medmeta", params={"image": "missing"}), 404, "missing"),
        (lambda c: c.post("/infer/unknown_model", params={"image": "a"}), 404, "unknown_model"),
        # A server-side path named by the client is not served (only uploads and sessions are).
        (lambda c: c.post("/infer/medmeta", params={"image": str(REPO / "README.md")}), 404, "README.md"),
        (
            lambda c: c.post("/infer/medmeta?image=a", data={"params": '{"image": "/etc/hostname"}'}),
            404,
            "/etc",
        ),
        (lambda c: c.post("/infer/medmeta", params={"image": "a"}), 400, "no structure has been adapted"),
        (lambda c: c.post("/activelearning/no_such_strategy"), 404, "no_such_strategy"),
        (lambda c: c.post("/train/no_such_trainer"), 404, "no_such_trainer"),
        (
            lambda c: c.post("/train/medmeta_adapt", json={"structures": '["ball", '}),
            400,
            "structures is not a valid JSON list",
        ),
        (lambda c: c.post("/train/medmeta_adapt", json={"structures": 5}), 400, "must be a list of names"),
        (
            lambda c: c.post("/infer/medmeta", params={"image": "a"}, data={"params": '{"tasks": "[x"}'}),
            400,
            "tasks is not a valid JSON list",
        ),
        (lambda c: c.post("/scoring/no_such_method"), 404, "no_such_method"),
        (
            lambda c: c.post("/infer/medmeta", params={"image": "a"}, data={"params": "{bad"}),
            400,
            "not valid JSON",
        ),
        (
            lambda c: c.post("/infer/medmeta", params={"image": "a"}, data={"params": "[1]"}),
            400,
            "JSON object",
        ),
    ],
)
def test_client_errors_are_4xx_with_message(app_client, call, status, needle) -> None:
    response = call(app_client)
    assert response.status_code == status, response.text
    assert needle in response.json()["detail"]


def test_refused_label_leaves_stored_label_untouched(app_client, studies, tmp_path) -> None:
    assert save_label(app_client, "a", studies["a"], SLICER_INFO).status_code == 200
    stored = studies["studies"] / "labels" / "final" / "a.nrrd"
    before = stored.read_bytes()
    # A label on another grid (the flipped scan's) for image "a".
    response = save_label(app_client, "a", studies["c"], SLICER_INFO)
    assert response.status_code == 400
    assert "geometry" in response.json()["detail"]
    # A value not named in label_info.
    response = save_label(app_client, "a", studies["a"], [{"name": "ball", "idx": 1}])
    assert response.status_code == 400
    assert "[2]" in response.json()["detail"]
    # Malformed label_info, params that are not JSON, a tag that would be a path.
    response = save_label(app_client, "a", studies["a"], [{"idx": 1}])
    assert response.status_code == 400
    with open(studies["a"], "rb") as f:
        files = {"label": ("a.nrrd", f.read())}
    response = app_client.put("/datastore/label", params={"image": "a"}, files=files, data={"params": "{x"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["detail"]
    response = app_client.put("/datastore/label", params={"image": "a", "tag": "../../x"}, files=files)
    assert response.status_code == 400 and "label tag" in response.json()["detail"]
    # A file that is not an image at all.
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"not an image")
    assert save_label(app_client, "a", junk, SLICER_INFO).status_code == 400
    assert stored.read_bytes() == before


def test_volume_targets_are_adapted_and_predicted(app_client, studies) -> None:
    for image, grade in (("a", 0), ("b", 1)):
        targets = {
            "grade": {"kind": "classification", "value": grade, "num_classes": 2},
            "size_ml": 30.0 + grade,
        }
        response = save_label(app_client, image, studies[image], SLICER_INFO, targets=targets)
        assert response.status_code == 200, response.text
    wait_adapted(app_client, ["grade", "size_ml"])
    info = app_client.get("/info/").json()
    assert sorted(info["models"]["medmeta_volume"]["labels"]) == ["grade", "size_ml"]
    response = app_client.post("/infer/medmeta_volume", params={"image": "c", "output": "json"})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert predictions["grade"]["class"] in (0, 1)
    assert abs(sum(predictions["grade"]["probabilities"]) - 1) < 1e-5
    assert 25.0 < predictions["size_ml"]["value"] < 36.0


def test_strategies_pick_unlabelled_scans(app_client, studies) -> None:
    response = app_client.post("/activelearning/medmeta_diversity")
    assert response.status_code == 200
    assert response.json()["id"] in {"a", "b", "c"}
    save_label(app_client, "a", studies["a"], SLICER_INFO)
    wait_adapted(app_client, ["ball", "box"])
    for strategy in ("medmeta_uncertainty", "medmeta_diversity", "random"):
        response = app_client.post(f"/activelearning/{strategy}")
        assert response.status_code == 200, response.text
        assert response.json()["id"] in {"b", "c"}, strategy


def test_adapters_survive_a_restart(app_client, studies, tiny_backbone) -> None:
    from medmeta_plugin.app.config import parse_conf
    from medmeta_plugin.app.engine import Engine
    from tests.app.conftest import app_conf

    save_label(app_client, "a", studies["a"], SLICER_INFO)
    wait_adapted(app_client, ["ball", "box"])
    engine = Engine(parse_conf(app_conf(tiny_backbone)), Path(app_client.app_dir) / "model")
    assert sorted(engine.tasks()) == ["ball", "box"]
    assert engine.versions() == {"ball": 1, "box": 1}


def test_label_written_as_nifti_with_write_image_is_accepted(app_client, studies, tmp_path) -> None:
    # The same label as NIfTI (what OHIF-converted and scripted clients send).
    label, meta = read_image(studies["a"])
    path = write_image(tmp_path / "a_label.nii.gz", label.astype(np.uint8), meta)
    response = save_label(app_client, "a", path, {"ball": 1, "box": 2})
    assert response.status_code == 200, response.text


DICOM_UID = "1.2.826.0.1.3680043.8.498.12345"  # a UID as folder name: its dots are not file extensions


@pytest.fixture
def dicom_series(studies) -> str:
    """A DICOM CT series in the studies folder (one folder, one file per slice), before the server starts."""
    from medmeta_plugin.io import write_dicom_series

    image, _ = phantom(GEOMETRIES["ras"], 5)
    write_dicom_series(
        studies["studies"] / DICOM_UID, np.round(image * 100).astype(np.int16), GEOMETRIES["ras"]
    )
    return DICOM_UID


def test_dicom_series_folder_is_an_image(dicom_series, app_client, studies, tmp_path) -> None:
    listing = app_client.get("/datastore/?output=all").json()
    assert dicom_series in listing["objects"], sorted(listing["objects"])
    save_label(app_client, "a", studies["a"], SLICER_INFO)
    wait_adapted(app_client, ["ball", "box"])
    response = app_client.post("/infer/medmeta", params={"image": dicom_series, "output": "image"})
    assert response.status_code == 200, response.text
    path = tmp_path / "dicom_result.nii.gz"
    path.write_bytes(response.content)
    assert read_image(path)[1].shape == GEOMETRIES["ras"].shape


@pytest.mark.parametrize(
    ("image_id", "filename", "content", "status"),
    [
        ("../../escape", "x.nii.gz", None, 400),  # path traversal in the id
        ("new_scan", "x.nii.gz", b"\x1f\x8b truncated gzip", 400),  # a corrupt NIfTI
        ("new_scan", "x.txt", b"hello", 400),  # not an image at all
        ("a", "x.nii.gz", None, 409),  # an id in use: the stored image is never replaced
        ("new_scan", "x.nii.gz", None, 200),
    ],
)
def test_image_upload_is_validated(app_client, studies, image_id, filename, content, status) -> None:
    before = (studies["studies"] / "a.nii.gz").read_bytes()
    body = content if content is not None else (studies["studies"] / "b.nii.gz").read_bytes()
    response = app_client.put(
        "/datastore/", params={"image": image_id}, files={"file": (filename, io.BytesIO(body))}
    )
    assert response.status_code == status, response.text
    assert (studies["studies"] / "a.nii.gz").read_bytes() == before
    assert not (studies["studies"].parent / "escape.nii.gz").exists()


def test_label_bin_of_the_wrong_size_is_refused(app_client, studies) -> None:
    response = app_client.put(
        "/datastore/label",
        params={"image": "b"},
        files={"label": ("label.bin", io.BytesIO(b"\x00" * 100))},
        data={"params": json.dumps({"label_info": SLICER_INFO})},
    )
    assert response.status_code == 400
    assert "one uint8 per voxel" in response.json()["detail"]
    assert not (studies["studies"] / "labels" / "final" / "b.nii.gz").exists()


def test_infer_on_an_uploaded_file(app_client, studies) -> None:
    # Inference on a scan sent with the request (not in the datastore): MONAI Label's temporary file.
    save_label(app_client, "a", studies["a"], SLICER_INFO)
    wait_adapted(app_client, ["ball", "box"])
    body = (studies["studies"] / "c.nii.gz").read_bytes()
    response = app_client.post(
        "/infer/medmeta", params={"output": "json"}, files={"file": ("scan.nii.gz", io.BytesIO(body))}
    )
    assert response.status_code == 200, response.text
    assert response.json()["label_names"] == {"ball": 1, "box": 2}


def test_failed_adaptation_is_reported_and_the_previous_adapter_serves(app_client, studies) -> None:
    save_label(app_client, "a", studies["a"], SLICER_INFO)
    wait_adapted(app_client, ["ball", "box"])
    # The stored label of scan a is damaged on disk; the next adaptation of "ball" reads it and fails.
    stored = studies["studies"] / "labels" / "final" / "a.nrrd"
    stored.write_bytes(b"NRRD0004\ndamaged")
    assert (
        save_label(
            app_client, "b", studies["b"], [{"name": "ball", "idx": 1}, {"name": "box", "idx": 2}]
        ).status_code
        == 200
    )
    status = wait_adapted(app_client, ["ball", "box"])
    ball = status["adaptation"]["tasks"]["ball"]
    assert ball["state"] == "failed" and "a.nrrd" in ball["error"]
    assert status["adapters"]["ball"]["version"] == 1  # the previous adapter still serves
    response = app_client.post("/infer/medmeta", params={"image": "c", "output": "json"})
    assert response.status_code == 200 and "ball" in response.json()["label_names"]
    # The next submission (a good label on a again) adapts normally.
    assert save_label(app_client, "a", studies["a"], SLICER_INFO).status_code == 200
    status = wait_adapted(app_client, ["ball", "box"])
    assert status["adaptation"]["tasks"]["ball"]["state"] == "ready"
    assert status["adapters"]["ball"]["version"] == 2
