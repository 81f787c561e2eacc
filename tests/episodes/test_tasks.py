"""Task registries from case folders and datalists: a task per structure name, declared volume tasks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from medmeta_plugin.episodes import Case, TargetSpec, TaskRegistry, TaskSpec
from tests.episodes.conftest import TASKS_JSON, write_case, write_nifti


def test_folder_gives_one_task_per_structure_and_declared_targets(folder_dataset: Path) -> None:
    registry = TaskRegistry.from_folder(folder_dataset)
    assert registry.names() == ["age_years", "kidney_left", "liver", "spleen", "tumour_grade"]
    assert registry.names("segmentation") == ["kidney_left", "liver", "spleen"]
    kidney = registry.get("kidney_left")
    assert kidney.kind == "segmentation" and [c.case_id for c in kidney.cases] == ["a", "c"]
    assert kidney.label_values == {"ct_set:a": 3, "ct_set:c": 3}
    grade = registry.get("tumour_grade")
    assert grade.kind == "classification" and grade.num_classes == 3
    # "low" is stored as its class index; a null target leaves the case out of that task.
    assert {c.case_id: grade.target(c) for c in grade.cases} == {"a": 2, "b": 0}
    age = registry.get("age_years")
    assert age.kind == "regression" and [(c.case_id, age.target(c)) for c in age.cases] == [("a", 63.5)]


def test_background_value_zero_is_not_a_task(folder_dataset: Path) -> None:
    assert "background" not in TaskRegistry.from_folder(folder_dataset)


def test_datalist_reads_relative_paths_and_shared_labels(datalist_dataset: Path) -> None:
    registry = TaskRegistry.from_datalist(datalist_dataset)
    kidney = registry.get("kidney_left")
    assert [c.uid for c in kidney.cases] == ["mr_set:mr_0", "mr_set:mr_1"]
    assert all(c.image_path.exists() and c.label_path.exists() for c in kidney.cases)
    assert [c.case_id for c in registry.get("tumour_grade").cases] == ["mr_1"]


def test_same_structure_in_two_datasets_is_one_task(folder_dataset: Path, datalist_dataset: Path) -> None:
    merged = TaskRegistry.from_folder(folder_dataset).merge(TaskRegistry.from_datalist(datalist_dataset))
    kidney = merged.get("kidney_left")
    assert {c.dataset for c in kidney.cases} == {"ct_set", "mr_set"} and len(kidney.cases) == 4
    # The structure keeps each dataset's own label value.
    assert kidney.label_values == {"ct_set:a": 3, "ct_set:c": 3, "mr_set:mr_0": 1, "mr_set:mr_1": 1}
    assert len(merged.get("tumour_grade").cases) == 3
    assert set(merged.names()) == {"age_years", "kidney_left", "liver", "spleen", "tumour_grade"}


def test_merging_a_registry_with_itself_changes_nothing(folder_dataset: Path) -> None:
    registry = TaskRegistry.from_folder(folder_dataset)
    merged = registry.merge(registry)
    assert [(t.name, len(t.cases)) for t in merged] == [(t.name, len(t.cases)) for t in registry]


def test_verify_drops_structures_absent_from_the_label_map(folder_dataset: Path) -> None:
    labels = folder_dataset / "b" / "labels.json"
    labels.write_text(json.dumps({"1": "liver", "2": "spleen", "7": "stomach"}))
    assert "stomach" in TaskRegistry.from_folder(folder_dataset)
    assert "stomach" not in TaskRegistry.from_folder(folder_dataset, verify=True)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, ["age_years", "kidney_left", "liver", "spleen", "tumour_grade"]),
        ({"include": ["liver", "sp*"]}, ["liver", "spleen"]),
        ({"exclude": ["*_*"]}, ["liver", "spleen"]),
        ({"kinds": ["classification", "regression"]}, ["age_years", "tumour_grade"]),
        ({"min_cases": 2}, ["kidney_left", "liver", "tumour_grade"]),
    ],
)
def test_filter(folder_dataset: Path, kwargs: dict, expected: list[str]) -> None:
    assert TaskRegistry.from_folder(folder_dataset).filter(**kwargs).names() == expected


def _replace_json(name: str, content: object):
    def mutate(root: Path) -> None:
        path = root / "a" / name if name != "tasks.json" else root / name
        path.write_text(content if isinstance(content, str) else json.dumps(content))

    return mutate


def _delete(relative: str):
    return lambda root: (root / relative).unlink()


def _add_unlabelled_label(root: Path) -> None:
    (root / "c" / "labels.json").unlink()


def _second_image(root: Path) -> None:
    shutil.copy(root / "a" / "image.nii.gz", root / "a" / "image.nii")


INVALID_FOLDERS = [
    pytest.param(_delete("a/image.nii.gz"), r"[/\\]a: missing image file", id="missing-image"),
    pytest.param(_delete("b/label.nii.gz"), r"[/\\]b: missing label file", id="missing-label"),
    pytest.param(_add_unlabelled_label, r"label.nii.gz has no labels.json", id="label-without-names"),
    pytest.param(_second_image, r"several image files", id="two-images"),
    pytest.param(
        _replace_json("labels.json", '{"1": "liver",\n "2" "spleen"}'),
        r"a[/\\]labels.json: invalid JSON at line 2",
        id="bad-json",
    ),
    pytest.param(
        _replace_json("labels.json", {"one": "liver"}),
        r"labels.json: label value 'one' is not",
        id="value-not-int",
    ),
    pytest.param(
        _replace_json("labels.json", {"1": "../etc"}),
        r"labels.json: invalid structure name '\.\./etc'",
        id="dotdot",
    ),
    pytest.param(
        _replace_json("labels.json", {"1": "left kidney"}),
        r"invalid structure name 'left kidney'",
        id="space",
    ),
    pytest.param(
        _replace_json("labels.json", {"1": 5}), r"labels.json: structure name must be a string", id="not-str"
    ),
    pytest.param(
        _replace_json("labels.json", {"1": "liver", "2": "liver"}),
        r"'liver' is given to two",
        id="duplicate-name",
    ),
    pytest.param(
        _replace_json("tasks.json", {"grade": {"kind": "clasification", "classes": ["a", "b"]}}),
        r"tasks.json: task 'grade' has an unknown kind 'clasification'. Did you mean 'classification'",
        id="unknown-kind",
    ),
    pytest.param(
        _replace_json("tasks.json", {"grade": {"kind": "segmentation"}}),
        r"segmentation tasks come from each case's labels.json",
        id="segmentation-kind",
    ),
    pytest.param(
        _replace_json("tasks.json", {**TASKS_JSON, "age_years": {"kind": "regression", "unit": "y"}}),
        r"task 'age_years' has unknown keys \['unit'\]",
        id="unknown-key",
    ),
    pytest.param(
        _replace_json("tasks.json", {"tumour_grade": {"kind": "classification", "classes": ["only"]}}),
        r"at least two distinct class names",
        id="one-class",
    ),
    pytest.param(
        _replace_json("targets.json", {"weight_kg": 70}),
        r"targets.json: target 'weight_kg' belongs to no declared task; declared: \['age_years', 'tumour_gr",
        id="undeclared-target",
    ),
    pytest.param(
        _replace_json("targets.json", {"tumour_grade": 5}),
        r"targets.json: target 'tumour_grade' class index 5 is out of range \[0, 2\]",
        id="class-out-of-range",
    ),
    pytest.param(
        _replace_json("targets.json", {"tumour_grade": "medium"}),
        r"not one of its classes",
        id="unknown-class",
    ),
    pytest.param(
        _replace_json("targets.json", {"tumour_grade": True}),
        r"must be a class index or class name",
        id="bool",
    ),
    pytest.param(
        _replace_json("targets.json", {"age_years": "old"}), r"must be a finite number", id="not-number"
    ),
    pytest.param(
        _replace_json("targets.json", [1, 2]), r"targets.json: expected a JSON object", id="not-object"
    ),
]


@pytest.mark.parametrize(("mutate", "match"), INVALID_FOLDERS)
def test_invalid_folders_name_the_problem(folder_dataset: Path, mutate, match: str) -> None:
    mutate(folder_dataset)
    with pytest.raises(ValueError, match=match):
        TaskRegistry.from_folder(folder_dataset)


def test_missing_root_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"nowhere' does not exist"):
        TaskRegistry.from_folder(tmp_path / "nowhere")


def _edit_datalist(edit):
    def mutate(path: Path) -> None:
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))

    return mutate


INVALID_DATALISTS = [
    pytest.param(
        _edit_datalist(lambda d: d.pop("training")), r"expected a list under 'training'", id="no-list"
    ),
    pytest.param(
        _edit_datalist(lambda d: d["training"][1].update(image="imagesTr/gone.nii.gz")),
        r"dataset.json: training\[1\]: missing image file .*gone.nii.gz",
        id="missing-image",
    ),
    pytest.param(
        _edit_datalist(lambda d: d["training"][0].update(image=["a.nii.gz", "b.nii.gz"])),
        r"training\[0\]: 'image' must be one path string",
        id="image-list",
    ),
    pytest.param(
        _edit_datalist(lambda d: d["training"][0].pop("image")),
        r"training\[0\]: has no 'image'",
        id="no-image",
    ),
    pytest.param(
        _edit_datalist(lambda d: d.pop("labels")),
        r"has a 'label' file but no 'labels'",
        id="label-without-names",
    ),
    pytest.param(
        _edit_datalist(lambda d: [e.update(id="same") for e in d["training"]]),
        r"training\[1\]: duplicate case id 'same'",
        id="duplicate-id",
    ),
    pytest.param(
        _edit_datalist(lambda d: d["training"][0].update(targets={"age": 3})),
        r"training\[0\].targets: target 'age' belongs to no declared task",
        id="undeclared-target",
    ),
    pytest.param(
        lambda p: p.write_text('{"training": [\n\n}'), r"dataset.json: invalid JSON at line 3", id="bad-json"
    ),
]


@pytest.mark.parametrize(("mutate", "match"), INVALID_DATALISTS)
def test_invalid_datalists_name_the_problem(datalist_dataset: Path, mutate, match: str) -> None:
    mutate(datalist_dataset)
    with pytest.raises(ValueError, match=match):
        TaskRegistry.from_datalist(datalist_dataset)


def test_unknown_task_suggests_close_names(folder_dataset: Path) -> None:
    registry = TaskRegistry.from_folder(folder_dataset)
    with pytest.raises(ValueError, match=r"'kidny_left' matches no task. Did you mean 'kidney_left'\?"):
        registry.get("kidny_left")
    with pytest.raises(ValueError, match=r"include 'livr' matches no task"):
        registry.filter(include=["livr"])
    with pytest.raises(ValueError, match=r"exclude 'x\*' matches no task"):
        registry.filter(exclude=["x*"])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"kinds": ["detection"]}, ValueError, "unknown kind in kinds 'detection'"),
        ({"min_cases": -1}, ValueError, "min_cases must be a non-negative integer, got -1"),
        ({"include": "liver"}, TypeError, "lists of names, got a string"),
    ],
)
def test_invalid_filters(folder_dataset: Path, kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        TaskRegistry.from_folder(folder_dataset).filter(**kwargs)


def test_merge_rejects_a_task_with_two_kinds(folder_dataset: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "tasks.json").write_text(json.dumps({"tumour_grade": {"kind": "regression"}}))
    write_case(other, "z", {1: "liver"}, {"tumour_grade": 1.5})
    with pytest.raises(ValueError, match=r"task 'tumour_grade' is classification .* and regression"):
        TaskRegistry.from_folder(folder_dataset).merge(TaskRegistry.from_folder(other))


def test_merge_rejects_two_different_cases_with_one_uid(folder_dataset: Path, tmp_path: Path) -> None:
    twin = tmp_path / "twin" / "ct_set"
    twin.mkdir(parents=True)
    write_case(twin, "a", {4: "liver"})
    with pytest.raises(ValueError, match=r"two different cases share uid 'ct_set:a'.*dataset= argument"):
        TaskRegistry.from_folder(folder_dataset).merge(TaskRegistry.from_folder(twin))
    merged = TaskRegistry.from_folder(folder_dataset).merge(TaskRegistry.from_folder(twin, dataset="twin"))
    assert len(merged.get("liver").cases) == 3


def test_structure_named_like_a_volume_task_is_rejected(tmp_path: Path) -> None:
    image = write_nifti(tmp_path / "i.nii.gz", np.zeros((4, 4, 4), "float32"))
    case = Case("x", "d", image, image, {1: "age"}, {"age": 3.0})
    with pytest.raises(ValueError, match=r"structure 'age' has the name of a volume-level task"):
        TaskRegistry.from_cases([case], {"age": TargetSpec("age", "regression")})


INVALID_OBJECTS = [
    pytest.param(lambda: Case("x", "d"), r"give exactly one of image_path and loader", id="case-no-source"),
    pytest.param(lambda: Case("../x", "d", Path("i")), r"invalid case id '\.\./x'", id="case-id"),
    pytest.param(
        lambda: Case("x", "d", Path("i"), None, {1: "liver"}), r"no label_path", id="structures-no-label"
    ),
    pytest.param(
        lambda: Case("x", "d", Path("i"), Path("l"), {0: "bg"}), r"positive integers, got 0", id="value-0"
    ),
    pytest.param(lambda: TargetSpec("t", "segmentation"), r"kind must be one of", id="target-kind"),
    pytest.param(
        lambda: TargetSpec("t", "regression", ("a", "b")), r"takes no class names", id="regression-classes"
    ),
    pytest.param(
        lambda: TaskSpec("t", "detection", ()), r"unknown kind of task 't': 'detection'", id="task-kind"
    ),
    pytest.param(
        lambda: TaskRegistry([TaskSpec("t", "regression", ()), TaskSpec("t", "regression", ())]),
        r"two tasks are named 't'",
        id="duplicate-task",
    ),
]


@pytest.mark.parametrize(("make", "match"), INVALID_OBJECTS)
def test_invalid_objects_name_the_problem(make, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()
