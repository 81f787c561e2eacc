"""Guard routes: client errors that MONAI Label 0.8.5 answers with a 500, or accepts and fails later, get a
4xx with a message instead.

- ``POST /infer/{model}`` with ``params`` that are not a JSON object (MONAI Label: 500 from ``json.loads``);
- ``POST /train/{model}`` for an unknown train task, or a ``structures`` parameter that is no list of names
  (MONAI Label: 200, then the train process fails);
- ``POST /scoring/{method}`` for an unknown scoring method (likewise);
- ``POST /infer/{model}?output=dicom_seg``, which MONAI Label answers through dcmqi (absent here): written
  with pydicom-seg instead;
- ``PUT /datastore/label`` with ``params`` that are not a JSON object (MONAI Label: 500), or a ``tag`` that
  is not a safe name (it becomes a folder name).

And two routes of medmeta's own, for label revisions: ``GET /datastore/label/revisions?image=&tag=`` and
``POST /datastore/label/restore?image=&revision=&tag=``.

Each guard has the same signature and the same authentication dependency as the route it stands in front
of, checks the request, and then calls MONAI Label's own handler, so behaviour is otherwise unchanged. The
guards are inserted at the front of the running FastAPI router (routes are matched per request, so this is
safe after start-up, where middleware could no longer be added).
"""

# No ``from __future__ import annotations``: FastAPI reads these signatures' annotations at run time.

import json
import os

from fastapi import BackgroundTasks, Depends, FastAPI, File, Form, HTTPException, UploadFile
from fastapi.responses import FileResponse
from monailabel.config import settings
from monailabel.endpoints import datastore as datastore_endpoints
from monailabel.endpoints import infer as infer_endpoints
from monailabel.endpoints import scoring as scoring_endpoints
from monailabel.endpoints import train as train_endpoints
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.utils.app import app_instance

from medmeta_plugin.names import parse_name_list, validate_name

__all__ = ["install_guards"]

# FastAPI parameter declarations, made once (the same objects MONAI Label's routes declare inline).
_PARAMS = Form("{}")
_FILE = File(None)
_REQUIRED_FILE = File(...)
_USER = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))
_ADMIN = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))
_ANNOTATOR = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR))


def _json_object(params: str) -> dict:
    """``params`` as a dict; a 400 unless it is empty or a JSON object."""
    try:
        parsed = json.loads(params) if params else {}
    except json.JSONDecodeError as err:
        raise HTTPException(400, f"params is not valid JSON ({err.msg} at position {err.pos}).") from err
    if not isinstance(parsed, dict):
        raise HTTPException(400, f"params must be a JSON object, got {type(parsed).__name__}.")
    return parsed


def _dicom_seg(background_tasks: BackgroundTasks, model: str, image: str, params: dict):
    """``output=dicom_seg``: the label map as a DICOM SEG of the DICOMweb series it was computed for.

    MONAI Label's own path writes SEG with dcmqi's binary (downloaded from the internet, not in Debian); this
    writes it with pydicom-seg (MONAI Label's converter, its Python branch), naming the segments from the
    response's ``label_names``.
    """
    from monailabel.utils.others.generic import remove_file

    from medmeta_plugin.app.dicomweb import MedMetaDICOMWebDatastore, write_seg

    instance = app_instance()
    datastore = instance.datastore()
    if not isinstance(datastore, MedMetaDICOMWebDatastore):
        raise HTTPException(400, "output=dicom_seg needs DICOMweb studies (a DICOM SEG references a series).")
    result = instance.infer({**params, "model": model, "image": image})
    labels = result.get("file") or result.get("label")
    names = (result.get("params") or {}).get("label_names", {})
    seg = write_seg(datastore.series_dir(image), labels, names, "medmeta result")
    background_tasks.add_task(remove_file, labels)
    if not seg:
        raise HTTPException(400, "the result holds no segment to write as DICOM SEG.")
    background_tasks.add_task(remove_file, seg)
    return FileResponse(seg, media_type="application/dicom", filename=os.path.basename(seg))


def _front(fastapi_app: FastAPI, count: int) -> None:
    routes = fastapi_app.router.routes
    added = routes[-count:]
    del routes[-count:]
    routes[:0] = added


def install_guards(fastapi_app: FastAPI) -> None:
    """Put the guard routes in front of MONAI Label's (once per process; they look up the running app).

    Args:
        fastapi_app: MONAI Label's FastAPI application (``monailabel.app.app``).
    """
    if getattr(fastapi_app.state, "medmeta_guards", False):
        return
    prefix = settings.MONAI_LABEL_API_STR

    def infer_guard(
        background_tasks: BackgroundTasks,
        model: str,
        image: str = "",
        session_id: str = "",
        params: str = _PARAMS,
        file: UploadFile = _FILE,
        label: UploadFile = _FILE,
        output: infer_endpoints.ResultType | None = None,
        user: User = _USER,
    ):
        parsed = _json_object(params)
        if output == infer_endpoints.ResultType.dicom_seg:
            return _dicom_seg(background_tasks, model, image, parsed)
        return infer_endpoints.run_inference(
            background_tasks, model, image, session_id, params, file, label, output
        )

    def train_guard(
        model: str,
        params: dict | None = None,
        run_sync: bool | None = False,
        enqueue: bool | None = False,
        user: User = _ADMIN,
    ):
        trainers = app_instance()._trainers
        if model not in trainers:
            raise HTTPException(404, f"unknown train task {model!r}; train tasks: {sorted(trainers)}.")
        try:  # a malformed structure list is the request's fault: a 400 now, not a failed run later
            parse_name_list((params or {}).get("structures"), "structures")
        except ValueError as err:
            raise HTTPException(400, str(err)) from err
        return train_endpoints.run_model(model, params, run_sync, enqueue)

    def scoring_guard(
        method: str,
        params: dict | None = None,
        run_sync: bool | None = False,
        user: User = _ANNOTATOR,
    ):
        methods = app_instance()._scoring_methods
        if method not in methods:
            valid = sorted(methods)
            raise HTTPException(404, f"unknown scoring method {method!r}; scoring methods: {valid}.")
        return scoring_endpoints.run_method(method, params, run_sync)

    def label_guard(
        background_tasks: BackgroundTasks,
        image: str,
        params: str = _PARAMS,
        tag: str = "final",
        label: UploadFile = _REQUIRED_FILE,
        user: User = _ANNOTATOR,
    ):
        _json_object(params)
        try:
            validate_name(tag or "final", "label tag")
        except ValueError as err:
            raise HTTPException(400, str(err)) from err
        return datastore_endpoints.save_label(background_tasks, image, params, tag, label, user.username)

    for path, guard, method in (
        (f"{prefix}/infer/{{model}}", infer_guard, "POST"),
        (f"{prefix}/train/{{model}}", train_guard, "POST"),
        (f"{prefix}/scoring/{{method}}", scoring_guard, "POST"),
        (f"{prefix}/datastore/label", label_guard, "PUT"),
    ):
        fastapi_app.add_api_route(path, guard, methods=[method], include_in_schema=False)
    _front(fastapi_app, 4)
    _install_revisions(fastapi_app, prefix)
    fastapi_app.state.medmeta_guards = True


def _revision_store(image: str, tag: str):
    """The running app's datastore, once ``image`` and ``tag`` are known to be fit to ask it about."""
    try:
        validate_name(tag, "label tag")
    except ValueError as err:
        raise HTTPException(400, str(err)) from err
    datastore = app_instance().datastore()
    if not hasattr(datastore, "revisions"):
        raise HTTPException(400, "this datastore keeps no label revisions.")
    if image not in datastore.list_images():
        raise HTTPException(404, f"image {image!r} is not in the datastore.")
    return datastore


def _install_revisions(fastapi_app: FastAPI, prefix: str) -> None:
    """``GET /datastore/label/revisions`` lists an image's label revisions, ``POST
    /datastore/label/restore`` makes one of them current again (itself a new revision, so undoable), and
    schedules the adaptation a new label would. Guarded like MONAI Label's label routes."""

    def list_revisions(image: str, tag: str = "final", user: User = _ANNOTATOR):
        from medmeta_plugin.app.datastore import current_label

        datastore = _revision_store(image, tag)
        current = current_label(datastore, image, tag)
        return {
            "image": image,
            "tag": tag,
            "current": None
            if current is None
            else {"ts": current[1].get("ts"), "file": os.path.basename(current[0])},
            "revisions": [r.to_json() for r in datastore.revisions.list(image, tag)],
        }

    def restore_revision(image: str, revision: int, tag: str = "final", user: User = _ANNOTATOR):
        datastore = _revision_store(image, tag)
        label_id = datastore.restore_label(image, tag, revision)
        answer = app_instance().on_save_label(image, label_id)
        return {"image": image, "tag": tag, "restored": revision, "label": label_id, **(answer or {})}

    fastapi_app.add_api_route(
        f"{prefix}/datastore/label/revisions", list_revisions, methods=["GET"], summary="Label revisions"
    )
    fastapi_app.add_api_route(
        f"{prefix}/datastore/label/restore", restore_revision, methods=["POST"], summary="Restore a revision"
    )
    _front(fastapi_app, 2)
