"""Dataset sources: the JSON parsers (``labels.json``, task declarations, targets) each with a table of valid
and of invalid inputs; ``read_json`` errors that name the file; and what ``read_folder``/``read_datalist``
do that ``test_tasks.py`` (which reads through :class:`TaskRegistry`) leaves out: ids, names, order,
skipped entries, per-entry labels and the other datalist keys."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest

from medmeta_plugin.episodes.cases import TargetSpec
from medmeta_plugin.episodes.sources import (
    parse_declarations,
    parse_structures,
    parse_targets,
    read_datalist,
    read_folder,
    read_json,
)

DECLARED = {
    "grade": TargetSpec("grade", "classification", ("low", "high")),
    "age": TargetSpec("age", "regression"),
}


# ------------------------------------------------------------------------------------------------- read_json


def test_read_json_returns_the_decoded_value(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text('{"1": "liver", "x": [1, 2.5, null]}', encoding="utf-8")
    assert read_json(tmp_path / "a.json") == {"1": "liver", "x": [1, 2.5, None]}


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, r"gone\.json: cannot read JSON file"),
        (b"\xff\xfe{}", r"a\.json: cannot read JSON file"),
        (b'{"a": 1,\n\n "b" 2}', r"a\.json: invalid JSON at line 3, column 6: Expecting ':' delimiter\."),
        (b"", r"a\.json: invalid JSON at line 1, column 1"),
    ],
    ids=["missing", "not-utf8", "syntax", "empty"],
)
def test_read_json_errors_name_the_file(tmp_path: Path, content: bytes | None, match: str) -> None:
    path = tmp_path / ("gone.json" if content is None else "a.json")
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        read_json(path)


# ------------------------------------------------------------------------------------------ parse_structures


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({}, {}),
        ({"0": "background"}, {}),
        ({"1": "liver", "2": "spleen"}, {1: "liver", 2: "spleen"}),
        ({"0": "background", "7": "kidney_left", "300": "aorta"}, {7: "kidney_left", 300: "aorta"}),
        ({" 3 ": "liver"}, {3: "liver"}),
        ({"1": "T1.lesion+core"}, {1: "T1.lesion+core"}),
    ],
)
def test_parse_structures_maps_values_to_names_without_background(raw: dict, expected: dict) -> None:
    assert parse_structures(raw, "labels.json") == expected


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (["liver"], r"labels\.json: expected a JSON object, got list"),
        ({"-1": "liver"}, r"labels\.json: label value '-1' is not a non-negative integer"),
        ({"1.0": "liver"}, r"label value '1\.0' is not a non-negative integer"),
        ({"": "liver"}, r"label value '' is not"),
        ({"1": ""}, r"labels\.json: invalid structure name ''"),
        ({"1": "a/b"}, r"invalid structure name 'a/b'"),
        ({"1": ["liver"]}, r"labels\.json: structure name must be a string, got list"),
        ({"1": "liver", "2": "liver"}, r"structure name 'liver' is given to two label values"),
    ],
)
def test_parse_structures_refuses_naming_the_file(raw: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_structures(raw, "labels.json")


def test_two_spellings_of_one_label_value_are_refused() -> None:
    with pytest.raises(ValueError, match="labels.json"):
        parse_structures({"1": "liver", "01": "spleen"}, "labels.json")


# ---------------------------------------------------------------------------------------- parse_declarations


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({}, {}),
        (
            {"grade": {"kind": "classification", "classes": ["low", "high"], "description": "WHO grade"}},
            {"grade": TargetSpec("grade", "classification", ("low", "high"))},
        ),
        ({"age": {"kind": "regression"}}, {"age": TargetSpec("age", "regression")}),
        ({"age": {"kind": "regression", "classes": []}}, {"age": TargetSpec("age", "regression")}),
    ],
)
def test_parse_declarations_builds_target_specs(raw: dict, expected: dict) -> None:
    assert parse_declarations(raw, "tasks.json") == expected


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ([], r"tasks\.json: expected a JSON object, got list"),
        ({"age": "regression"}, r"tasks\.json: task 'age': expected a JSON object, got str"),
        ({"a b": {"kind": "regression"}}, r"tasks\.json: invalid task name 'a b'"),
        (
            {"age": {}},
            r"tasks\.json: task 'age' has an unknown kind None\. Valid: classification, regression",
        ),
        ({"age": {"kind": "Regression"}}, r"has an unknown kind 'Regression'\. Did you mean 'regression'\?"),
        (
            {"g": {"kind": "classification", "classes": "low,high"}},
            r"task 'g': 'classes' must be a list of str",
        ),
        ({"g": {"kind": "classification", "classes": ["low", 2]}}, r"'classes' must be a list of strings"),
        (
            {"age": {"kind": "regression", "classes": ["a", "b"]}},
            r"tasks\.json: task 'age': a regression task",
        ),
        (
            {"age": {"kind": "regression", "units": "y", "aim": 1}},
            r"unknown keys \['aim', 'units'\]; allowed",
        ),
    ],
)
def test_parse_declarations_refuses_naming_the_file_and_task(raw: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_declarations(raw, "tasks.json")


# --------------------------------------------------------------------------------------------- parse_targets


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({}, {}),
        ({"grade": "high", "age": 63}, {"grade": 1, "age": 63.0}),
        ({"grade": 0}, {"grade": 0}),
        ({"grade": None, "age": 2.5}, {"age": 2.5}),
        ({"grade": None, "age": None}, {}),
    ],
)
def test_parse_targets_checks_each_value_and_leaves_out_nulls(raw: dict, expected: dict) -> None:
    targets = parse_targets(raw, DECLARED, "targets.json")
    assert targets == expected
    assert all(type(v) is (int if k == "grade" else float) for k, v in targets.items())


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ("high", r"targets\.json: expected a JSON object, got str"),
        (
            {"weight": 70},
            r"targets\.json: target 'weight' belongs to no declared task; declared: \['age', 'grade'\]",
        ),
        ({"grade": "medium"}, r"targets\.json: target 'grade' is 'medium', not one of its classes"),
        ({"age": "old"}, r"targets\.json: target 'age' must be a finite number"),
    ],
)
def test_parse_targets_refuses_naming_the_file(raw: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_targets(raw, DECLARED, "targets.json")


# ----------------------------------------------------------------------------------------------- read_folder


def _image(path: Path) -> Path:
    """A 4^3 image file in the format its suffix names (the readers here only look for files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.zeros((4, 4, 4), np.uint8)
    if path.suffix in (".nrrd", ".nhdr"):
        nrrd.write(str(path), data, index_order="F")
    elif path.suffix == ".mha":
        header = "ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementType = MET_UCHAR\n"
        path.write_bytes((header + "ElementDataFile = LOCAL\n").encode() + data.tobytes())
    else:
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return path


def _folder_case(
    root: Path, case_id: str, labels: dict[str, str] | None = None, image: str = "image.nii.gz"
) -> Path:
    folder = root / case_id
    if image.endswith("/"):
        (folder / image).mkdir(parents=True)  # a DICOM series folder: its files are read later
    else:
        _image(folder / image)
    if labels is not None:
        _image(folder / "label.nrrd")
        (folder / "labels.json").write_text(json.dumps(labels))
    return folder


def test_read_folder_skips_hidden_folders_and_files_and_sorts_by_id(tmp_path: Path) -> None:
    root = tmp_path / "set"
    for case_id in ("c2", "a10", "b", "a9"):
        _folder_case(root, case_id, {"1": "liver"})
    _folder_case(root, ".cache", {"1": "liver"})
    (root / "README.md").write_text("not a case")
    _image(root / "b" / "image_preview.nii.gz")  # not "image" nor "image.<ext>": ignored
    cases, declarations = read_folder(root)
    assert [c.case_id for c in cases] == ["a10", "a9", "b", "c2"] and declarations == {}
    assert all(c.dataset == "set" and c.label_path.name == "label.nrrd" for c in cases)
    assert cases[2].image_path == root / "b" / "image.nii.gz"


@pytest.mark.parametrize("image", ["image.nii", "image.mha", "image.nrrd", "image/"])
def test_read_folder_accepts_each_image_format_and_a_dicom_folder(tmp_path: Path, image: str) -> None:
    _folder_case(tmp_path / "set", "a", image=image)
    (case,), _ = read_folder(tmp_path / "set")
    assert case.image_path == tmp_path / "set" / "a" / image.rstrip("/")
    assert case.label_path is None and dict(case.structures) == {} and dict(case.targets) == {}


def test_read_folder_accepts_a_detached_nrrd_with_its_data_file(tmp_path: Path) -> None:
    _folder_case(tmp_path / "set", "a", image="image.nhdr")
    assert sorted(p.name for p in (tmp_path / "set" / "a").iterdir()) == ["image.nhdr", "image.raw.gz"]
    (case,), _ = read_folder(tmp_path / "set")
    assert case.image_path == tmp_path / "set" / "a" / "image.nhdr"


@pytest.mark.parametrize(
    ("dataset", "folder", "expected"), [(None, "ct_2024", "ct_2024"), ("renamed", "ct_2024", "renamed")]
)
def test_read_folder_names_the_dataset(
    tmp_path: Path, dataset: str | None, folder: str, expected: str
) -> None:
    _folder_case(tmp_path / folder, "a")
    cases, _ = read_folder(tmp_path / folder, dataset=dataset)
    assert [c.uid for c in cases] == [f"{expected}:a"]


@pytest.mark.parametrize(
    ("folder", "case_id", "dataset", "match"),
    [
        ("my set", "a", None, r"my set: invalid dataset name 'my set'"),
        ("set", "a", "bad/name", r"set: invalid dataset name 'bad/name'"),
        ("set", "case 1", None, r"case 1: invalid case id 'case 1'"),
    ],
)
def test_read_folder_refuses_bad_names_naming_the_folder(
    tmp_path: Path, folder: str, case_id: str, dataset: str | None, match: str
) -> None:
    _folder_case(tmp_path / folder, case_id)
    with pytest.raises(ValueError, match=match):
        read_folder(tmp_path / folder, dataset=dataset)


def test_read_folder_refuses_a_file_as_root(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"file' does not exist or is not a folder"):
        read_folder(tmp_path / "file")


# --------------------------------------------------------------------------------------------- read_datalist


@pytest.fixture
def datalist_root(tmp_path: Path) -> Path:
    for name in (
        "imagesTr/a.nii.gz",
        "imagesTr/b.nrrd",
        "imagesTr/c.nii",
        "labelsTr/a.nii.gz",
        "labelsTr/b.nrrd",
    ):
        _image(tmp_path / "ds" / name)
    return tmp_path / "ds"


def _write_datalist(root: Path, data: dict, name: str = "dataset.json") -> Path:
    (root / name).write_text(json.dumps(data))
    return root / name


def test_read_datalist_ids_labels_and_targets_per_entry(datalist_root: Path) -> None:
    path = _write_datalist(
        datalist_root,
        {
            "name": "BrainTumour",
            "labels": {"0": "background", "1": "tumour"},
            "tasks": {"age": {"kind": "regression"}},
            "training": [
                {"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz", "modality": "MR"},
                {
                    "image": "imagesTr/b.nrrd",
                    "label": "labelsTr/b.nrrd",
                    "labels": {"2": "edema"},
                    "id": "bee",
                },
                {"image": "imagesTr/c.nii", "case_id": "cee", "targets": {"age": 50}, "labels": {}},
            ],
        },
    )
    cases, declarations = read_datalist(path)
    assert [c.uid for c in cases] == ["BrainTumour:a", "BrainTumour:bee", "BrainTumour:cee"]
    assert [dict(c.structures) for c in cases] == [{1: "tumour"}, {2: "edema"}, {}]
    assert cases[0].image_path == datalist_root / "imagesTr/a.nii.gz"
    assert cases[1].label_path == datalist_root / "labelsTr/b.nrrd" and cases[2].label_path is None
    assert dict(cases[2].targets) == {"age": 50.0} and declarations == {
        "age": TargetSpec("age", "regression")
    }


@pytest.mark.parametrize(
    ("top", "dataset", "expected"),
    [
        ({}, None, "ds"),  # no "name": the folder's name
        ({"name": 7}, None, "ds"),  # a "name" that is no string is ignored
        ({"name": "Spleen"}, None, "Spleen"),
        ({"name": "Spleen"}, "mine", "mine"),
    ],
)
def test_read_datalist_names_the_dataset(
    datalist_root: Path, top: dict, dataset: str | None, expected: str
) -> None:
    path = _write_datalist(datalist_root, {**top, "training": [{"image": "imagesTr/c.nii"}]})
    cases, _ = read_datalist(path, dataset=dataset)
    assert [c.uid for c in cases] == [f"{expected}:c"]


def test_read_datalist_reads_the_list_under_another_key(datalist_root: Path) -> None:
    path = _write_datalist(
        datalist_root,
        {"training": [{"image": "imagesTr/a.nii.gz"}], "validation": [{"image": "imagesTr/c.nii"}]},
    )
    assert [c.case_id for c in read_datalist(path, key="validation")[0]] == ["c"]
    with pytest.raises(
        ValueError, match=r"expected a list under 'test', got NoneType; keys: \['training', 'val"
    ):
        read_datalist(path, key="test")


Edit = Callable[[dict], object]

INVALID_DATALISTS = [
    pytest.param(
        lambda d: d.update(training={"image": "x"}), r"expected a list under 'training', got dict", id="dict"
    ),
    pytest.param(
        lambda d: d["training"].append("imagesTr/c.nii"), r"training\[1\]: expected a JSON object", id="str"
    ),
    pytest.param(
        lambda d: d["training"][0].update(labels={"1": "tumour"}, label=None),
        r"training\[0\]: 'label' must be one path string, got None",
        id="label-null",
    ),
    pytest.param(
        lambda d: d["training"].append({"image": "imagesTr/c.nii", "labels": {"1": "tumour"}}),
        r"training\[1\]: label names are given but there is no 'label' file",
        id="labels-without-label",
    ),
    pytest.param(
        lambda d: d["training"][0].update(labels={"x": "tumour"}),
        r"training\[0\]\.labels: label value 'x' is not a non-negative integer",
        id="entry-labels",
    ),
    pytest.param(
        lambda d: d.update(labels={"1": "a b"}),
        r"dataset\.json: 'labels': invalid structure name",
        id="top-labels",
    ),
    pytest.param(
        lambda d: d.update(tasks={"age": {"kind": "regresion"}}),
        r"dataset\.json: 'tasks': task 'age' has an unknown kind",
        id="tasks",
    ),
    pytest.param(
        lambda d: d["training"][0].update(id="a/b"), r"training\[0\]: invalid case id 'a/b'", id="id"
    ),
    pytest.param(
        lambda d: d["training"].append({"image": "imagesTr/c.nii", "id": "a", "labels": {}}),
        r"training\[1\]: duplicate case id 'a'",
        id="duplicate-explicit-id",
    ),
]


@pytest.mark.parametrize(("edit", "match"), INVALID_DATALISTS)
def test_invalid_datalists_name_the_entry(datalist_root: Path, edit: Edit, match: str) -> None:
    data = {
        "labels": {"1": "tumour"},
        "training": [{"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"}],
    }
    edit(data)
    with pytest.raises(ValueError, match=match):
        read_datalist(_write_datalist(datalist_root, data))


def test_a_datalist_that_is_not_an_object_is_named(datalist_root: Path) -> None:
    with pytest.raises(ValueError, match=r"dataset\.json: expected a JSON object, got list"):
        read_datalist(_write_datalist(datalist_root, [{"image": "imagesTr/a.nii.gz"}]))  # type: ignore[arg-type]
