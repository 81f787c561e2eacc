"""Read a labelled dataset (a case folder tree or a MONAI-style datalist) into :class:`Case` objects.

Folder layout (one sub-folder per case; hidden folders are skipped)::

    root/
      tasks.json              optional: declares the volume-level tasks (below)
      <case_id>/
        image.<ext>           image file (.nii.gz, .nii, .nrrd, .nhdr, .mha, .mhd) or ``image/`` DICOM folder
        label.<ext>           integer label map on the image's grid; required when labels.json is present
        labels.json           {"<label value>": "<structure name>", ...}; value 0 is background and skipped
        targets.json          optional: {"<task name>": <class index, class name or number>, ...}

``tasks.json`` declares each volume-level task, so a task's kind is never guessed from its values::

    {"tumour_grade": {"kind": "classification", "classes": ["low", "high", "very high"]},
     "age_years": {"kind": "regression", "description": "age at scan"}}

A target may be ``null`` (unknown); that case is then left out of that task.

Datalist (paths relative to the JSON file; extra keys such as MSD's ``modality`` are ignored)::

    {"name": "BrainTumour",                       optional, the dataset name
     "labels": {"1": "tumour"},                   optional, for every entry that has no "labels" of its own
     "tasks": {... same format as tasks.json ...}, optional
     "training": [{"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz",
                   "id": "a", "labels": {...}, "targets": {...}}, ...]}

``id`` defaults to the image file name without its extension.

Structure, task, case and dataset names must pass :func:`medmeta_plugin.names.validate_name`, because they
become task names, file names and URL segments; a bad one is reported with the file it came from.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from medmeta_plugin.episodes.cases import VOLUME_KINDS, Case, TargetSpec, check_option
from medmeta_plugin.io.formats import FILE_FORMATS
from medmeta_plugin.io.headers import detached_data_files
from medmeta_plugin.names import validate_name

__all__ = [
    "parse_declarations",
    "parse_structures",
    "parse_targets",
    "read_datalist",
    "read_folder",
    "read_json",
]

_DECLARATION_KEYS = ("kind", "classes", "description")


def read_json(path: Path) -> Any:
    """Load a JSON file, turning a syntax error into a ``ValueError`` that names the file and line.

    Args:
        path: the JSON file.

    Returns:
        The decoded JSON value.

    Raises:
        ValueError: if the file is missing, unreadable, not UTF-8 or not valid JSON.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read JSON file: {e}") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}.") from e


def _object(raw: object, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(raw).__name__}: {raw!r:.80}.")
    return raw


def _name(name: object, what: str, where: str) -> str:
    try:
        return validate_name(name, what)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from e


def parse_structures(raw: object, where: str) -> dict[int, str]:
    """Parse a ``labels.json`` mapping of label value -> structure name.

    Args:
        raw: the decoded JSON, e.g. ``{"1": "liver", "2": "spleen"}``.
        where: the file (or entry) it came from, named in errors.

    Returns:
        ``{label value: structure name}`` without the background value 0.

    Raises:
        ValueError: if a key is not an integer >= 0, two keys spell one value (``1`` and ``01``), a name is
            invalid, or two values share a name.
    """
    structures: dict[int, str] = {}
    for key, name in _object(raw, where).items():
        if not re.fullmatch(r"[0-9]+", key.strip()):
            raise ValueError(f"{where}: label value {key!r} is not a non-negative integer.")
        value = int(key)
        if value == 0:
            continue
        name = _name(name, "structure name", where)
        if value in structures:
            raise ValueError(f"{where}: label value {value} is given twice (key {key!r}).")
        if name in structures.values():
            raise ValueError(f"{where}: structure name {name!r} is given to two label values.")
        structures[value] = name
    return structures


def parse_declarations(raw: object, where: str) -> dict[str, TargetSpec]:
    """Parse the declarations of volume-level tasks (``tasks.json`` or a datalist's ``"tasks"``).

    Args:
        raw: the decoded JSON (format in the module docstring).
        where: the file it came from, named in errors.

    Returns:
        ``{task name: TargetSpec}``.

    Raises:
        ValueError: on an invalid task name, an unknown kind, unknown keys, or bad class names.
    """
    declarations: dict[str, TargetSpec] = {}
    for name, spec in _object(raw, where).items():
        name = _name(name, "task name", where)
        spec = _object(spec, f"{where}: task {name!r}")
        unknown = sorted(set(spec) - set(_DECLARATION_KEYS))
        if unknown:
            raise ValueError(
                f"{where}: task {name!r} has unknown keys {unknown}; allowed: {list(_DECLARATION_KEYS)}."
            )
        kind = spec.get("kind")
        if kind == "segmentation":
            raise ValueError(
                f"{where}: task {name!r} has kind 'segmentation'; segmentation tasks come from each case's "
                "labels.json, tasks.json declares only volume-level tasks."
            )
        try:
            kind = check_option(kind, VOLUME_KINDS, "kind")
        except ValueError as e:
            raise ValueError(f"{where}: task {name!r} has an {e}") from e
        classes = spec.get("classes", [])
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise ValueError(f"{where}: task {name!r}: 'classes' must be a list of strings, got {classes!r}.")
        try:
            declarations[name] = TargetSpec(name, kind, tuple(classes))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e
    return declarations


def parse_targets(raw: object, declarations: dict[str, TargetSpec], where: str) -> dict[str, int | float]:
    """Parse one case's volume-level targets against the declared tasks.

    Args:
        raw: the decoded JSON, e.g. ``{"tumour_grade": "high", "age_years": 63.5}``.
        declarations: the declared volume-level tasks.
        where: the file (or entry) it came from, named in errors.

    Returns:
        ``{task name: class index or value}``; ``null`` targets are left out.

    Raises:
        ValueError: for a target of an undeclared task or an invalid value.
    """
    targets: dict[str, int | float] = {}
    for name, value in _object(raw, where).items():
        if name not in declarations:
            raise ValueError(
                f"{where}: target {name!r} belongs to no declared task; declared: {sorted(declarations)} "
                "(declare volume-level tasks in tasks.json, or a datalist's 'tasks')."
            )
        if value is not None:
            targets[name] = declarations[name].check_target(value, where)
    return targets


def _find_one(folder: Path, stem: str) -> Path | None:
    """The single child named ``stem`` or ``stem.<ext>`` of ``folder`` (None if absent); a detached header
    counts as one file with the data files it names."""
    found = sorted(p for p in folder.iterdir() if p.name == stem or p.name.startswith(stem + "."))
    if len(found) > 1:
        for header in found:
            if {p.name for p in found} - {header.name} <= detached_data_files(header):
                return header
        raise ValueError(f"{folder}: several {stem} files, expected one: {[p.name for p in found]}.")
    return found[0] if found else None


def read_folder(root: str | Path, dataset: str | None = None) -> tuple[list[Case], dict[str, TargetSpec]]:
    """Read a case folder tree (layout in the module docstring).

    Args:
        root: the dataset folder.
        dataset: dataset name; defaults to the folder's name.

    Returns:
        The cases, sorted by id, and the declared volume-level tasks.

    Raises:
        ValueError: on a missing folder, image or label file, invalid JSON, or any invalid name or target.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"dataset folder {str(root)!r} does not exist or is not a folder.")
    dataset = _name(dataset if dataset is not None else root.resolve().name, "dataset name", str(root))
    tasks_file = root / "tasks.json"
    declarations = parse_declarations(read_json(tasks_file), str(tasks_file)) if tasks_file.exists() else {}
    cases = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        image, label = _find_one(folder, "image"), _find_one(folder, "label")
        if image is None:
            raise ValueError(
                f"{folder}: missing image file (expected image.<ext> or an image/ DICOM folder)."
            )
        labels_file, targets_file = folder / "labels.json", folder / "targets.json"
        structures: dict[int, str] = {}
        if labels_file.exists():
            structures = parse_structures(read_json(labels_file), str(labels_file))
            if label is None:
                raise ValueError(
                    f"{folder}: missing label file (labels.json is present, label.<ext> is not)."
                )
        elif label is not None:
            raise ValueError(f"{folder}: {label.name} has no labels.json naming its label values.")
        targets = {}
        if targets_file.exists():
            targets = parse_targets(read_json(targets_file), declarations, str(targets_file))
        case_id = _name(folder.name, "case id", str(folder))
        cases.append(Case(case_id, dataset, image, label, structures, targets))
    return cases, declarations


def _case_id_from(path: Path) -> str:
    name = path.name
    for suffix in sorted(FILE_FORMATS, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_datalist(
    path: str | Path, dataset: str | None = None, key: str = "training"
) -> tuple[list[Case], dict[str, TargetSpec]]:
    """Read a MONAI-style datalist JSON (format in the module docstring).

    Args:
        path: the datalist file; relative image and label paths are resolved against its folder.
        dataset: dataset name; defaults to the datalist's ``"name"``, else its folder's name.
        key: the list of entries to read (``"training"``, ``"validation"``, ...).

    Returns:
        The cases, in datalist order, and the declared volume-level tasks.

    Raises:
        ValueError: on invalid JSON, a missing key, image or label file, a duplicate case id, or any invalid
            name or target.
    """
    path = Path(path)
    top = _object(read_json(path), str(path))
    if dataset is None:
        dataset = top.get("name") if isinstance(top.get("name"), str) else path.resolve().parent.name
    dataset = _name(dataset, "dataset name", str(path))
    declarations = parse_declarations(top.get("tasks", {}), f"{path}: 'tasks'")
    shared = parse_structures(top["labels"], f"{path}: 'labels'") if "labels" in top else None
    entries = top.get(key)
    if not isinstance(entries, list):
        raise ValueError(
            f"{path}: expected a list under {key!r}, got {type(entries).__name__}; keys: {sorted(top)}."
        )
    cases, seen = [], set()
    for i, entry in enumerate(entries):
        where = f"{path}: {key}[{i}]"
        entry = _object(entry, where)
        files = {}
        for field in ("image", "label"):
            if field not in entry:
                continue
            if not isinstance(entry[field], str):
                raise ValueError(f"{where}: {field!r} must be one path string, got {entry[field]!r:.80}.")
            files[field] = path.parent / entry[field]
            if not files[field].exists():
                raise ValueError(f"{where}: missing {field} file {str(files[field])!r}.")
        if "image" not in files:
            raise ValueError(f"{where}: has no 'image'.")
        structures = parse_structures(entry["labels"], f"{where}.labels") if "labels" in entry else shared
        if structures and "label" not in files:
            raise ValueError(f"{where}: label names are given but there is no 'label' file.")
        if "label" in files and structures is None:
            raise ValueError(
                f"{where}: has a 'label' file but no 'labels' naming its values (per entry or top-level)."
            )
        targets = parse_targets(entry.get("targets", {}), declarations, f"{where}.targets")
        case_id = _name(
            entry.get("id", entry.get("case_id", _case_id_from(files["image"]))), "case id", where
        )
        if case_id in seen:
            raise ValueError(f"{where}: duplicate case id {case_id!r}; give entries distinct 'id's.")
        seen.add(case_id)
        cases.append(Case(case_id, dataset, files["image"], files.get("label"), structures or {}, targets))
    return cases, declarations
