"""What a submitted label means: structure names and values, volume-level targets, and their validation.

The ``params`` of ``PUT /datastore/label`` (a JSON object) may hold:

- ``label_info``: the structures in the label map, as 3D Slicer sends them,
  ``[{"name": "liver", "idx": 1}, {"name": "spleen", "idx": 2}]`` (``"value"`` is accepted for ``"idx"``),
  or as a mapping ``{"liver": 1, "spleen": 2}``. Without it (OHIF's ``label.bin``) the app's configured
  ``--conf labels`` names the values.
- ``targets``: volume-level targets of classification and regression tasks for this scan,
  ``{"tumour_grade": {"kind": "classification", "value": 2, "num_classes": 3},
  "liver_volume_ml": {"kind": "regression", "value": 1530.0}}``; a bare number means regression.

A structure named in ``label_info`` with no voxel in the label map is stored as an explicit "absent here"
example: adaptation uses the scan as a negative for it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medmeta_plugin.io import ImageMeta, read_label
from medmeta_plugin.names import validate_name

__all__ = ["Submission", "VolumeTarget", "check_label_values", "parse_label_params", "validate_label_file"]

# A label map may hold at most this many structures: MONAI Label stores labels as uint8 by default and
# 3D Slicer's segment values start at 1.
_MAX_VALUE = 255


@dataclass(frozen=True)
class VolumeTarget:
    """A classification or regression target of one scan.

    Attributes:
        task: task name; kind: ``classification`` or ``regression``; value: class index or number;
        num_classes: classes of a classification task.
    """

    task: str
    kind: str
    value: float
    num_classes: int | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "value": self.value}
        if self.num_classes is not None:
            out["num_classes"] = self.num_classes
        return out


@dataclass(frozen=True)
class Submission:
    """A parsed label submission.

    Attributes:
        structures: ``{name: value in the label map}``.
        targets: volume-level targets.
        from_fallback: the names came from the app's ``--conf labels``, not from the client; then only the
            values present in the label map count (an unlabelled configured structure is not "absent").
    """

    structures: dict[str, int]
    targets: tuple[VolumeTarget, ...] = ()
    from_fallback: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"structures": self.structures, "targets": {t.task: t.to_json() for t in self.targets}}

    def present_in(self, values: Iterable[int]) -> Submission:
        """This submission keeping the structures whose value is among ``values`` (a label map's values)
        when its names came from the fallback; unchanged when the client named them."""
        if not self.from_fallback:
            return self
        present = set(values)
        structures = {n: v for n, v in self.structures.items() if v in present}
        return Submission(structures, self.targets, from_fallback=True)


def _structure_value(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise ValueError(f"label_info: value of {name!r} must be an integer, got {value!r}.")
    if not 1 <= int(value) <= _MAX_VALUE:
        raise ValueError(f"label_info: value of {name!r} must be in 1..{_MAX_VALUE}, got {value!r}.")
    return int(value)


def _parse_label_info(info: Any) -> dict[str, int]:
    if isinstance(info, Mapping):
        pairs = list(info.items())
    elif isinstance(info, list):
        pairs = []
        for i, entry in enumerate(info):
            if not isinstance(entry, Mapping) or "name" not in entry:
                raise ValueError(f"label_info[{i}] must be an object with 'name' and 'idx', got {entry!r}.")
            pairs.append((entry["name"], entry.get("idx", entry.get("value"))))
    else:
        kind = type(info).__name__
        raise ValueError(f"label_info must be a list of {{'name', 'idx'}} objects, got {kind}.")
    structures: dict[str, int] = {}
    for name, value in pairs:
        if not isinstance(name, str):
            raise ValueError(f"label_info: structure names must be strings, got {name!r}.")
        validate_name(name, "structure name")
        if name in structures:
            raise ValueError(f"label_info names {name!r} twice.")
        structures[name] = _structure_value(name, value)
    seen: dict[int, str] = {}
    for name, value in structures.items():
        if value in seen:
            raise ValueError(f"label_info gives {seen[value]!r} and {name!r} the same value {value}.")
        seen[value] = name
    return structures


def _parse_targets(targets: Any) -> tuple[VolumeTarget, ...]:
    if not isinstance(targets, Mapping):
        raise ValueError(f"targets must be an object {{task: target}}, got {type(targets).__name__}.")
    out = []
    for task, spec in targets.items():
        if not isinstance(task, str):
            raise ValueError(f"targets: task names must be strings, got {task!r}.")
        validate_name(task, "task name")
        if not isinstance(spec, Mapping):
            spec = {"kind": "regression", "value": spec}
        kind = spec.get("kind", "regression")
        value = spec.get("value")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"targets[{task!r}]: value must be a finite number, got {value!r}.")
        if kind == "regression":
            out.append(VolumeTarget(task, kind, float(value)))
        elif kind == "classification":
            classes = spec.get("num_classes")
            if isinstance(classes, bool) or not isinstance(classes, int) or classes < 2:
                raise ValueError(f"targets[{task!r}]: num_classes must be an integer >= 2, got {classes!r}.")
            if int(value) != value or not 0 <= value < classes:
                raise ValueError(f"targets[{task!r}]: class {value!r} is not in 0..{classes - 1}.")
            out.append(VolumeTarget(task, kind, int(value), classes))
        else:
            raise ValueError(
                f"targets[{task!r}]: kind must be 'classification' or 'regression', got {kind!r}."
            )
    return tuple(out)


def parse_label_params(params: Mapping[str, Any] | str | None, fallback: Mapping[str, int]) -> Submission:
    """Parse the ``params`` of a label submission.

    Args:
        params: the parsed JSON object, or its text, or None.
        fallback: ``{name: value}`` used when ``params`` has no ``label_info`` (the app's ``--conf labels``).

    Returns:
        The :class:`Submission`.

    Raises:
        ValueError: for malformed JSON, a non-object, invalid names or values, or invalid targets.
    """
    if params is None or params == "":
        params = {}
    if isinstance(params, str):
        try:
            params = json.loads(params)
        except json.JSONDecodeError as err:
            raise ValueError(f"params is not valid JSON ({err.msg} at position {err.pos}).") from err
    if not isinstance(params, Mapping):
        raise ValueError(f"params must be a JSON object, got {type(params).__name__}.")
    info = params.get("label_info")
    named = info not in (None, [], {})
    structures = _parse_label_info(info) if named else dict(fallback)
    targets = _parse_targets(params["targets"]) if params.get("targets") is not None else ()
    clash = sorted(set(structures) & {t.task for t in targets})
    if clash:
        raise ValueError(f"{clash} named both as a structure and as a volume-level target.")
    return Submission(structures=structures, targets=targets, from_fallback=not named)


def check_label_values(values: np.ndarray, structures: Mapping[str, int], source: str) -> None:
    """Check that every non-zero value of a label map is a named structure.

    Raises:
        ValueError: naming the unnamed values and the named ones.
    """
    present = {int(v) for v in np.unique(values) if v != 0}
    unnamed = sorted(present - set(structures.values()))
    if unnamed:
        named = ", ".join(f"{n}={v}" for n, v in structures.items()) or "none"
        raise ValueError(
            f"{source}: label values {unnamed} are not named in label_info (named: {named}); name every "
            "structure in the label, or set --conf labels."
        )


def validate_label_file(
    label_path: str | Path, image_meta: ImageMeta, submission: Submission
) -> tuple[np.ndarray, Submission]:
    """Read a submitted label map and check it against its image and the submission.

    Returns:
        The label values, shape (1, X, Y, Z), and the submission (restricted to the structures present when
        its names came from the fallback).

    Raises:
        ValueError: if the file cannot be read, its geometry differs from the image's, a value is not named,
            or it names no structure and carries no target.
    """
    label, meta = read_label(label_path, image_meta)
    if submission.from_fallback:
        submission = submission.present_in(int(v) for v in np.unique(label))
    if not submission.structures and not submission.targets:
        raise ValueError(
            "the label names no structure: send params.label_info (as 3D Slicer does) or start the app with "
            "--conf labels."
        )
    check_label_values(label, submission.structures, meta.source or str(label_path))
    return label, submission
