"""Writing a synthetic dataset: the case-folder layout that ``read_folder`` reads, holding exactly the cases
``synthetic_registry`` draws for the same arguments (arrays, structure names, targets, spacing); the same
seed writes the same files; a folder that is not empty, or a file, is never written into."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medmeta_plugin.episodes import (
    META_TRAIN_FAMILIES,
    SYNTHETIC_TARGETS,
    load_case,
    synthetic_registry,
    write_synthetic_dataset,
)
from medmeta_plugin.episodes.sources import read_folder
from medmeta_plugin.episodes.synthetic import case_plans, make_case
from medmeta_plugin.io import read_image

FAMILIES = META_TRAIN_FAMILIES[:5]
SHAPE = (24, 24, 24)  # the phantoms' smallest size
N_CASES = 3
SEED = 2


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("export") / "nested" / "synth"  # absent parents are made
    assert write_synthetic_dataset(root, FAMILIES, N_CASES, SEED, shape=SHAPE) == root
    return root


def test_the_layout_is_one_folder_per_case_and_a_tasks_file(written: Path) -> None:
    assert sorted(p.name for p in written.iterdir()) == ["case00000", "case00001", "case00002", "tasks.json"]
    for folder in sorted(written.glob("case*")):
        assert sorted(p.name for p in folder.iterdir()) == [
            "image.nii.gz",
            "label.nii.gz",
            "labels.json",
            "targets.json",
        ]
    declared = json.loads((written / "tasks.json").read_text())
    assert declared == {
        name: {"kind": spec.kind, **({"classes": list(spec.class_names)} if spec.class_names else {})}
        for name, spec in SYNTHETIC_TARGETS.items()
    }


def test_the_files_hold_the_cases_synthetic_registry_draws(written: Path) -> None:
    cases, declarations = read_folder(written)
    assert declarations == SYNTHETIC_TARGETS
    registry = synthetic_registry(FAMILIES, N_CASES, SEED, shape=SHAPE)
    drawn = {case.case_id: case for task in registry for case in task.cases}
    assert sorted(drawn) == [c.case_id for c in cases]
    for case in cases:
        twin = drawn[case.case_id]
        assert dict(case.structures) == dict(twin.structures)
        assert set(case.structures.values()) <= {f"synth_{f}" for f in FAMILIES}
        assert dict(case.targets) == dict(twin.targets)
        (image, label), (twin_image, twin_label) = load_case(case), load_case(twin)
        assert image.shape == (1, *SHAPE) and label.shape == (1, *SHAPE)
        np.testing.assert_array_equal(image, twin_image)
        np.testing.assert_array_equal(label, twin_label)
        assert set(np.unique(label)) == {0, *case.structures}


def test_the_affine_carries_the_case_spacing_and_the_volume_target_matches_it(written: Path) -> None:
    plans = case_plans(
        FAMILIES, N_CASES, SEED, (2, 4)
    )  # write_synthetic_dataset's default structures_per_case
    for folder, (chosen, case_seed) in zip(sorted(written.glob("case*")), plans, strict=True):
        label, meta = read_image(folder / "label.nii.gz")
        _, image_meta = read_image(folder / "image.nii.gz")
        for m in (meta, image_meta):
            np.testing.assert_allclose(m.spacing, make_case(chosen, case_seed, SHAPE).spacing, rtol=1e-6)
            np.testing.assert_allclose(m.origin, 0.0)
            np.testing.assert_allclose(m.direction, np.eye(3), atol=1e-6)
        volume_ml = (label > 0).sum() * np.prod(meta.spacing) / 1000.0
        targets = json.loads((folder / "targets.json").read_text())
        assert targets["synth_total_volume_ml"] == pytest.approx(volume_ml, rel=1e-5)
        labels = json.loads((folder / "labels.json").read_text())
        assert list(labels) == [str(v) for v in range(1, len(chosen) + 1)]
        assert list(labels.values()) == [f"synth_{f}" for f in chosen]
        assert targets["synth_structure_count"] == len(chosen) - 1


def test_the_same_seed_writes_the_same_dataset_and_another_seed_another(
    written: Path, tmp_path: Path
) -> None:
    again = write_synthetic_dataset(tmp_path / "again", FAMILIES, N_CASES, SEED, shape=SHAPE)
    other = write_synthetic_dataset(tmp_path / "other", FAMILIES, N_CASES, SEED + 1, shape=SHAPE)
    for name in ("case00000/labels.json", "case00001/targets.json", "case00002/labels.json", "tasks.json"):
        assert (again / name).read_text() == (written / name).read_text()
    for name in ("image.nii.gz", "label.nii.gz"):
        np.testing.assert_array_equal(
            read_image(again / "case00001" / name)[0], read_image(written / "case00001" / name)[0]
        )
    assert not np.array_equal(
        read_image(other / "case00000" / "image.nii.gz")[0],
        read_image(written / "case00000" / "image.nii.gz")[0],
    )


def test_an_empty_existing_folder_is_written_into(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    write_synthetic_dataset(tmp_path / "empty", FAMILIES, 1, SEED, shape=SHAPE, structures_per_case=(1, 1))
    cases, _ = read_folder(tmp_path / "empty")
    assert len(cases) == 1 and len(cases[0].structures) == 1


def test_a_folder_with_anything_in_it_or_a_file_is_refused_and_left_alone(tmp_path: Path) -> None:
    full = tmp_path / "full"
    full.mkdir()
    (full / ".keep").write_text("mine")
    with pytest.raises(
        ValueError, match=r"full: exists and is not an empty folder; refusing to write into it"
    ):
        write_synthetic_dataset(full, FAMILIES, 1, SEED, shape=SHAPE)
    assert [p.name for p in full.iterdir()] == [".keep"] and (full / ".keep").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"file: exists and is not an empty folder"):
        write_synthetic_dataset(tmp_path / "file", FAMILIES, 1, SEED, shape=SHAPE)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"families": ["no_such_family"]}, r"unknown family 'no_such_family'"),
        ({"families": [FAMILIES[0], FAMILIES[0]]}, r"families must be distinct family names"),
        ({"n_cases": 0}, r"n_cases must be a positive integer, got 0"),
        ({"structures_per_case": (3, 2)}, r"structures_per_case must be a range within \[1, 4\]"),
    ],
)
def test_invalid_arguments_are_refused_before_anything_is_written(
    tmp_path: Path, kwargs: dict, match: str
) -> None:
    arguments = {"families": FAMILIES, "n_cases": 1, "seed": SEED, "shape": SHAPE, **kwargs}
    with pytest.raises(ValueError, match=match):
        write_synthetic_dataset(tmp_path / "out", **arguments)
    assert not (tmp_path / "out").exists()


def test_an_invalid_shape_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"shape must be three integers >= 24"):
        write_synthetic_dataset(tmp_path / "out", FAMILIES, 1, SEED, shape=(8, 8, 8))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
