"""Saving and loading backbones and adapters: safetensors weights plus a JSON metadata file. Never pickle.

An adapter ``<folder>/<task>.safetensors`` comes with ``<folder>/<task>.json``::

    {"format": "medmeta-adapter", "format_version": 1, "task": "liver", "kind": "segmentation",
     "mode": "film", "num_outputs": 1, "hparams": {}, "head": "linear", "backbone_hash": "<sha256>",
     "shots": 3, "created": "2026-11-26T07:00:00+00:00", "weights_sha256": "<sha256 of the .safetensors
     file>", ...}

``weights_sha256`` ties the two files together: if a crash ever leaves a new weights file beside an old
metadata file (each is written atomically, but not both at once), loading refuses the pair instead of
serving a mismatched adapter. ``backbone_hash`` refuses an adapter trained on another backbone.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from medmeta_plugin.atomic import atomic_write_bytes
from medmeta_plugin.names import validate_name
from medmeta_plugin.networks.backbone import Backbone3D, BackboneConfig
from medmeta_plugin.networks.model import MetaModel, TaskAdapter, TaskInfo
from medmeta_plugin.networks.refiner import Refiner

__all__ = [
    "backbone_hash",
    "load_adapter",
    "load_backbone",
    "load_refiner",
    "save_adapter",
    "save_backbone",
    "save_refiner",
]

ADAPTER_FORMAT = "medmeta-adapter"
BACKBONE_FORMAT = "medmeta-backbone"
REFINER_FORMAT = "medmeta-refiner"
FORMAT_VERSION = 1


def backbone_hash(backbone: Backbone3D) -> str:
    """SHA-256 of the backbone's config and of every parameter and buffer (name, dtype, shape, bytes)."""
    digest = hashlib.sha256(json.dumps(backbone.config.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(backbone.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


def _write_pair(weights_path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    blob = st_save(tensors, metadata={"format": str(meta["format"])})
    meta = {**meta, "weights_file": weights_path.name, "weights_sha256": hashlib.sha256(blob).hexdigest()}
    atomic_write_bytes(weights_path, blob)
    try:
        atomic_write_bytes(
            weights_path.with_suffix(".json"), json.dumps(meta, indent=2, sort_keys=True).encode()
        )
    except BaseException:  # the pair is incomplete (the disk is full): leave no weights without their record
        weights_path.unlink(missing_ok=True)
        raise


def _save(
    module: torch.nn.Module,
    weights_path: Path,
    file_format: str,
    record: dict[str, Any],
    extra: dict[str, Any] | None,
) -> Path:
    """Write ``module``'s tensors and its JSON record (format, version, ``record``, creation time, then
    ``extra``) as a pair; the path of the ``.safetensors`` file."""
    meta = {
        "format": file_format,
        "format_version": FORMAT_VERSION,
        **record,
        "created": _now(),
        **(extra or {}),
    }
    _write_pair(weights_path, _tensors(module), meta)
    return weights_path


def _read_pair(
    path: str | Path, expected_format: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any], Path]:
    """Read and cross-check a ``.safetensors`` + ``.json`` pair given either file's path."""
    path = Path(path)
    weights_path = path.with_suffix(".safetensors")
    meta_path = path.with_suffix(".json")
    for p in (weights_path, meta_path):
        if not p.is_file():
            raise ValueError(f"{p}: file not found (a {expected_format} needs both .safetensors and .json).")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{meta_path}: not valid JSON metadata ({err}).") from err
    if not isinstance(meta, dict) or meta.get("format") != expected_format:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{meta_path}: expected format {expected_format!r}, found {found!r}.")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta_path}: unsupported format_version {meta.get('format_version')!r}.")
    blob = weights_path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != meta.get("weights_sha256"):
        raise ValueError(
            f"{weights_path}: weights do not match the checksum in {meta_path.name} "
            "(a partial or foreign file); refusing to load."
        )
    try:
        tensors = st_load(blob)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise ValueError(f"{weights_path}: not a readable safetensors file ({err}).") from err
    return tensors, meta, weights_path


def _load_state(module: torch.nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source}: tensors do not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})."
        )
    for k, v in tensors.items():
        if v.shape != expected[k].shape:
            raise ValueError(
                f"{source}: tensor {k!r} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}."
            )
    module.load_state_dict(tensors)


def save_backbone(backbone: Backbone3D, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Save a backbone as ``<path>.safetensors`` + ``<path>.json`` (config, hash and ``extra``).

    Returns:
        The path of the ``.safetensors`` file.
    """
    record = {"config": backbone.config.to_dict(), "backbone_hash": backbone_hash(backbone)}
    return _save(backbone, Path(path).with_suffix(".safetensors"), BACKBONE_FORMAT, record, extra)


def load_backbone(path: str | Path) -> Backbone3D:
    """Load a backbone saved by :func:`save_backbone` (either file of the pair may be given).

    Raises:
        ValueError: if a file is missing, corrupt, of another format, or the weights do not fit the config.
    """
    tensors, meta, weights_path = _read_pair(path, BACKBONE_FORMAT)
    try:
        config = BackboneConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{weights_path.with_suffix('.json')}: invalid backbone config ({err}).") from err
    backbone = Backbone3D(config)
    _load_state(backbone, tensors, weights_path)
    return backbone


def save_refiner(refiner: Refiner, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Save the in-context refiner as ``<path>.safetensors`` + ``<path>.json`` (its features and ``extra``:
    the training config, log and command).

    Returns:
        The path of the ``.safetensors`` file.
    """
    record = {"features": list(refiner.backbone.config.features)}
    return _save(refiner, Path(path).with_suffix(".safetensors"), REFINER_FORMAT, record, extra)


def load_refiner(path: str | Path) -> Refiner:
    """Load a refiner saved by :func:`save_refiner` (either file of the pair may be given), in eval mode.

    Raises:
        ValueError: if a file is missing, corrupt, of another format, or the weights do not fit.
    """
    tensors, meta, weights_path = _read_pair(path, REFINER_FORMAT)
    try:
        refiner = Refiner(tuple(int(f) for f in meta["features"]))
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{weights_path.with_suffix('.json')}: invalid refiner features ({err}).") from err
    _load_state(refiner, tensors, weights_path)
    return refiner.eval()


def save_adapter(
    model: MetaModel,
    task: str,
    folder: str | Path,
    shots: int | None = None,
    extra: dict[str, Any] | None = None,
    stem: str | None = None,
) -> Path:
    """Save one task's adapter and head as ``<folder>/<task>.safetensors`` + ``<folder>/<task>.json``.

    Args:
        model: the model holding the task.
        task: task name.
        folder: destination folder (created if missing).
        shots: number of labelled cases the adapter was fitted on, for the record.
        extra: further JSON-serialisable metadata (e.g. an adaptation report).
        stem: file name without suffix (default: the task name), e.g. a version number.

    Returns:
        The path of the ``.safetensors`` file.
    """
    adapter = model.task(task)
    info = adapter.info
    record = {
        "task": info.name,
        "kind": info.kind,
        "mode": info.mode,
        "num_outputs": info.num_outputs,
        "hparams": dict(info.hparams),
        "head": info.head,
        "backbone_hash": backbone_hash(model.backbone),
        "shots": shots,
    }
    validate_name(task, "task name")
    weights_path = Path(folder) / f"{validate_name(stem or task, 'file stem')}.safetensors"
    return _save(adapter, weights_path, ADAPTER_FORMAT, record, extra)


def load_adapter(model: MetaModel, path: str | Path, allow_backbone_mismatch: bool = False) -> TaskAdapter:
    """Load an adapter saved by :func:`save_adapter` into ``model`` (replacing a task of the same name).

    Args:
        model: the model to add the task to; its backbone must be the one the adapter was fitted on.
        path: the adapter's ``.safetensors`` or ``.json`` file.
        allow_backbone_mismatch: load even if the backbone hash differs (the adapter may then be poor).

    Returns:
        The loaded :class:`TaskAdapter`.

    Raises:
        ValueError: if a file is missing or corrupt, the metadata is invalid, the backbone differs, or the
            tensors do not fit; ``model`` is left unchanged in every case.
    """
    tensors, meta, weights_path = _read_pair(path, ADAPTER_FORMAT)
    if not allow_backbone_mismatch and meta.get("backbone_hash") != backbone_hash(model.backbone):
        raise ValueError(
            f"{weights_path}: adapter was fitted on backbone {str(meta.get('backbone_hash'))[:12]}, "
            f"this model's backbone is {backbone_hash(model.backbone)[:12]}; re-adapt it, or pass "
            "allow_backbone_mismatch=True."
        )
    try:
        info = TaskInfo(
            name=validate_name(meta["task"], "task name"),
            kind=meta["kind"],
            mode=meta["mode"],
            num_outputs=int(meta["num_outputs"]),
            hparams=tuple(sorted(meta.get("hparams", {}).items())),
            head=meta.get("head", "linear"),  # adapters saved before heads had kinds are linear
        )
        adapter = TaskAdapter(info, model.backbone)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{weights_path.with_suffix('.json')}: invalid adapter metadata ({err}).") from err
    _load_state(adapter, tensors, weights_path)
    model.tasks[info.name] = adapter.to(next(model.backbone.parameters()).device)
    return model.tasks[info.name]
