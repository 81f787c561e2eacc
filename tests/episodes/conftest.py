"""Data made on the fly for the episodes tests: NIfTI case folders and datalists, and in-memory cube cases."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medmeta_plugin.episodes import Case, TaskRegistry

SHAPE = (20, 18, 16)


def write_nifti(path: Path, array: np.ndarray, spacing: tuple[float, float, float] = (1.0, 1.0, 2.0)) -> Path:
    """Write a 3D array as NIfTI with the given voxel spacing."""
    nib.save(nib.Nifti1Image(array, np.diag([*spacing, 1.0])), str(path))
    return path


def blob_volumes(seed: int, values: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """An image (float32) and label (int16) of shape SHAPE with one bright box per label value."""
    rng = np.random.default_rng(seed)
    image = rng.normal(100.0, 10.0, SHAPE).astype(np.float32)
    label = np.zeros(SHAPE, dtype=np.int16)
    for i, value in enumerate(values):
        x = 2 + 6 * i
        label[x : x + 4, 5:11, 4:10] = value
        image[label == value] += 50.0 * (i + 1)
    return image, label


def write_case(
    root: Path,
    case_id: str,
    structures: dict[int, str] | None,
    targets: dict | None = None,
    seed: int = 0,
) -> Path:
    """Write root/<case_id>/{image,label}.nii.gz, labels.json and targets.json (when given)."""
    folder = root / case_id
    folder.mkdir(parents=True)
    image, label = blob_volumes(seed, tuple(structures or {}))
    write_nifti(folder / "image.nii.gz", image)
    if structures is not None:
        write_nifti(folder / "label.nii.gz", label)
        (folder / "labels.json").write_text(json.dumps({str(v): n for v, n in structures.items()}))
    if targets is not None:
        (folder / "targets.json").write_text(json.dumps(targets))
    return folder


TASKS_JSON = {
    "tumour_grade": {"kind": "classification", "classes": ["low", "high", "very high"]},
    "age_years": {"kind": "regression", "description": "age at scan"},
}


@pytest.fixture
def folder_dataset(tmp_path: Path) -> Path:
    """Three cases: liver+kidney_left, liver+spleen, and kidney_left only; with volume-level targets."""
    root = tmp_path / "ct_set"
    root.mkdir()
    (root / "tasks.json").write_text(json.dumps(TASKS_JSON))
    write_case(root, "a", {1: "liver", 3: "kidney_left"}, {"tumour_grade": 2, "age_years": 63.5}, seed=1)
    write_case(root, "b", {1: "liver", 2: "spleen"}, {"tumour_grade": "low", "age_years": None}, seed=2)
    write_case(root, "c", {0: "background", 3: "kidney_left"}, seed=3)
    return root


@pytest.fixture
def datalist_dataset(tmp_path: Path) -> Path:
    """A MONAI-style datalist: two cases whose kidney_left has value 1, paths relative to the JSON."""
    root = tmp_path / "mr_set"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    entries = []
    for i, seed in enumerate((4, 5)):
        image, label = blob_volumes(seed, (1,))
        write_nifti(root / "imagesTr" / f"mr_{i}.nii.gz", image)
        write_nifti(root / "labelsTr" / f"mr_{i}.nii.gz", label)
        entries.append({"image": f"imagesTr/mr_{i}.nii.gz", "label": f"labelsTr/mr_{i}.nii.gz"})
    entries[1]["targets"] = {"tumour_grade": 1}
    datalist = {
        "name": "mr_set",
        "labels": {"0": "background", "1": "kidney_left"},
        "tasks": {"tumour_grade": TASKS_JSON["tumour_grade"]},
        "training": entries,
    }
    path = root / "dataset.json"
    path.write_text(json.dumps(datalist, indent=1))
    return path


def cube_volumes(index: int, size: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """A noisy image with a centred cube (value 1) and a small corner box (value 2)."""
    rng = np.random.default_rng(index)
    label = np.zeros((1, size, size, size), dtype=np.int16)
    c = size // 2
    label[0, c - 3 : c + 3, c - 3 : c + 3, c - 3 : c + 3] = 1
    label[0, 1:4, 1:4, 1:4] = 2
    image = rng.normal(0.0, 1.0, label.shape).astype(np.float32) + 3.0 * label
    return image, label


def cube_registry(n_cases: int = 8, size: int = 24) -> TaskRegistry:
    """In-memory cases: tasks ``cube``, ``corner``, ``count`` (classification), ``size``."""
    from medmeta_plugin.episodes import TargetSpec

    declarations = {
        "count": TargetSpec("count", "classification", ("even", "odd")),
        "size": TargetSpec("size", "regression"),
    }
    cases = [
        Case(
            f"cube{i}",
            "cubes",
            structures={1: "cube", 2: "corner"},
            targets={"count": i % 2, "size": float(i) / 2},
            loader=functools.partial(cube_volumes, i, size),
        )
        for i in range(n_cases)
    ]
    return TaskRegistry.from_cases(cases, declarations)
