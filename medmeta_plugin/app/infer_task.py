"""Infer tasks: ``medmeta`` (one label map of every adapted structure) and ``medmeta_volume`` (JSON
predictions of the adapted classification and regression tasks).

Their ``labels`` are whatever has an adapter right now, so ``GET /info/`` changes as structures are adapted.
Every client error is an ``HTTPException`` with a 4xx status and a message, raised before any work is done.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from medmeta_plugin.app.runtime import MedMetaRuntime
from medmeta_plugin.io import write_image
from medmeta_plugin.names import parse_name_list

__all__ = ["RESULT_EXTENSIONS", "SegmentationInfer", "VolumeInfer", "parse_tasks"]

RESULT_EXTENSIONS = (".nii.gz", ".nii", ".nrrd")
_DTYPES = {"uint8": 255, "uint16": 65535, "int16": 32767, "int32": 2**31 - 1}


def parse_tasks(value: Any) -> list[str] | None:
    """The ``tasks`` request parameter (:func:`~medmeta_plugin.names.parse_name_list`); None for all.

    Raises:
        HTTPException: 400 if it is no list of names.
    """
    try:
        return parse_name_list(value, "tasks")
    except ValueError as err:
        raise HTTPException(400, str(err)) from err


class _RuntimeInfer(InferTask):
    def __init__(self, runtime: MedMetaRuntime, kind: str, type: str, description: str) -> None:
        super().__init__(type=type, labels=[], dimension=3, description=description)
        self.runtime, self.kind = runtime, kind

    def is_valid(self) -> bool:
        return True

    def _names(self) -> list[str]:
        kinds = ("segmentation",) if self.kind == "segmentation" else ("classification", "regression")
        return [n for n, t in self.runtime.engine.tasks().items() if t.info.kind in kinds]

    def _image(self, request: dict[str, Any]) -> str:
        image = request.get("image")
        if not isinstance(image, str) or not image or not os.path.exists(image):
            raise HTTPException(404, f"image {request.get('image')!r} not found.")
        return image


class SegmentationInfer(_RuntimeInfer):
    """``POST /infer/medmeta``: every adapted structure (or ``tasks``) in one label map.

    Request parameters: ``tasks`` (restrict the structures), ``result_extension`` (``.nii.gz`` default,
    ``.nii``, ``.nrrd``), ``result_dtype`` (``uint8`` default; the map is written in the smallest integer type
    holding its values and refused if they do not fit the type asked for).

    The response JSON holds ``label_names``, ``latencies``, ``adapter_versions`` and ``provenance``: per
    structure, how its answer was found and how sure it is
    (:class:`~medmeta_plugin.app.segmenting.Provenance`: ``found_by``, ``supports``, ``sure_supports``,
    ``confidence``, ``sure``, ``note``), so a reader can tell a guess from a finding. 3D Slicer ignores the
    keys it does not know.
    """

    def __init__(self, runtime: MedMetaRuntime) -> None:
        super().__init__(
            runtime,
            "segmentation",
            InferType.SEGMENTATION,
            "medmeta: every structure adapted from your labels, one meta-learned backbone",
        )

    def info(self) -> dict[str, Any]:
        self.runtime.refresh()
        self.labels = self.runtime.engine.label_values(self._names())
        return super().info()

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        start = time.perf_counter()
        image = self._image(request)
        tasks = parse_tasks(request.get("tasks"))
        ext = request.get("result_extension") or ".nii.gz"
        if ext not in RESULT_EXTENSIONS:
            valid = list(RESULT_EXTENSIONS)
            raise HTTPException(400, f"result_extension must be one of {valid}, got {ext!r}.")
        dtype = request.get("result_dtype") or "uint8"
        if dtype not in _DTYPES:
            raise HTTPException(400, f"result_dtype must be one of {list(_DTYPES)}, got {dtype!r}.")
        self.runtime.refresh()
        if not self._names():
            raise HTTPException(
                400,
                "no structure has been adapted yet: label a structure on one scan and submit the label "
                "(3D Slicer: Submit Label), then run medmeta again.",
            )
        try:
            with self.runtime.inference_slot() as waited:
                result = self.runtime.engine.segment(image, tasks)
        except ValueError as err:
            raise HTTPException(400, str(err)) from err
        if max(result.names.values(), default=0) > _DTYPES[dtype]:
            raise HTTPException(400, f"{len(result.names)} structures do not fit result_dtype {dtype!r}.")
        fd, path = tempfile.mkstemp(suffix=ext, prefix="medmeta-")
        os.close(fd)
        write_image(path, result.labels, result.meta)
        latencies = {**{k: round(v, 3) for k, v in result.seconds.items()}, "queued": round(waited, 3)}
        latencies["total"] = round(time.perf_counter() - start, 3)
        versions = self.runtime.engine.versions()
        return path, {
            "label_names": result.names,
            "latencies": latencies,
            "adapter_versions": {n: versions.get(n) for n in result.names},
            "provenance": {n: result.provenance[n].to_dict() for n in result.names},
        }


class VolumeInfer(_RuntimeInfer):
    """``POST /infer/medmeta_volume``: JSON predictions of every adapted classification/regression task."""

    def __init__(self, runtime: MedMetaRuntime) -> None:
        super().__init__(
            runtime,
            "volume",
            InferType.CLASSIFICATION,
            "medmeta: volume-level classification and regression tasks adapted from your targets",
        )

    def info(self) -> dict[str, Any]:
        self.runtime.refresh()
        self.labels = self._names()
        return super().info()

    def __call__(self, request: dict[str, Any]) -> tuple[None, dict[str, Any]]:
        start = time.perf_counter()
        image = self._image(request)
        tasks = parse_tasks(request.get("tasks"))
        self.runtime.refresh()
        if not self._names():
            raise HTTPException(
                400, "no classification or regression task has been adapted yet: submit targets with a label."
            )
        try:
            with self.runtime.inference_slot():
                predictions = self.runtime.engine.predict(image, tasks)
        except ValueError as err:
            raise HTTPException(400, str(err)) from err
        latencies = {"total": round(time.perf_counter() - start, 3)}
        return None, {"predictions": predictions, "latencies": latencies}
