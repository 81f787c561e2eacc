"""Cases and volume-level target declarations: ``check_option`` answers an unknown name with the close and
the valid ones; a ``TargetSpec`` turns each valid raw target into an index or a float and refuses the rest
naming task, file and value; a ``Case`` has one source, positive label values and distinct names;
``load_case`` returns (C, X, Y, Z) float32 and (1, X, Y, Z) arrays from files or a loader, or says why not.

Folder and datalist parsing (which builds these) is in ``test_sources.py`` and ``test_tasks.py``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medmeta_plugin.episodes.cases import VOLUME_KINDS, Case, TargetSpec, check_option, load_case

GRADE = TargetSpec("grade", "classification", ("low", "high", "very_high"))
AGE = TargetSpec("age", "regression")


# ----------------------------------------------------------------------------------------------- check_option


@pytest.mark.parametrize(
    ("value", "options", "match"),
    [
        ("regresion", VOLUME_KINDS, r"unknown kind 'regresion'\. Did you mean 'regression'\? Valid: class"),
        ("zzz", VOLUME_KINDS, r"unknown kind 'zzz'\. Valid: classification, regression\.$"),
        (None, VOLUME_KINDS, r"unknown kind None\. Valid: classification, regression\.$"),
        (
            "lung",
            {"lungs", "lunge", "liver"},
            r"Did you mean 'lungs' or 'lunge'\? Valid: liver, lunge, lungs\.",
        ),
    ],
)
def test_check_option_refuses_with_close_and_sorted_valid_names(
    value: object, options: Iterable[str], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        check_option(value, options, "kind")


@pytest.mark.parametrize("options", [VOLUME_KINDS, ["regression", "classification"], iter(VOLUME_KINDS)])
def test_check_option_returns_a_valid_value(options: Iterable[str]) -> None:
    assert check_option("regression", options, "kind") == "regression"


# ------------------------------------------------------------------------------------------------ TargetSpec


@pytest.mark.parametrize(
    ("spec", "raw", "expected"),
    [
        (GRADE, 0, 0),
        (GRADE, 2, 2),
        (GRADE, "low", 0),
        (GRADE, "very_high", 2),
        (AGE, 63, 63.0),
        (AGE, 63.5, 63.5),
        (AGE, -1e300, -1e300),
        (AGE, np.float64(2.5), 2.5),
    ],
)
def test_valid_targets_become_a_class_index_or_a_float(
    spec: TargetSpec, raw: object, expected: float
) -> None:
    value = spec.check_target(raw, "t.json")
    assert value == expected
    assert type(value) is (int if spec.kind == "classification" else float)


@pytest.mark.parametrize(
    ("spec", "raw", "match"),
    [
        (GRADE, 3, r"t\.json: target 'grade' class index 3 is out of range \[0, 2\] for classes \['low'"),
        (GRADE, -1, r"class index -1 is out of range \[0, 2\]"),
        (GRADE, "medium", r"t\.json: target 'grade' is 'medium', not one of its classes \['low', 'high'"),
        (GRADE, "Low", r"is 'Low', not one of its classes"),
        (GRADE, True, r"t\.json: target 'grade' must be a class index or class name, got True"),
        (GRADE, 1.0, r"must be a class index or class name, got 1\.0"),
        (GRADE, None, r"must be a class index or class name, got None"),
        (AGE, math.nan, r"t\.json: target 'age' must be a finite number, got nan"),
        (AGE, math.inf, r"must be a finite number, got inf"),
        (AGE, -math.inf, r"must be a finite number, got -inf"),
        (AGE, False, r"must be a finite number, got False"),
        (AGE, "63", r"must be a finite number, got '63'"),
        (AGE, [63], r"must be a finite number, got \[63\]"),
    ],
)
def test_invalid_targets_name_the_task_the_file_and_the_value(
    spec: TargetSpec, raw: object, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        spec.check_target(raw, "t.json")


def test_a_valid_declaration_keeps_its_fields() -> None:
    assert GRADE.class_names == ("low", "high", "very_high") and GRADE.kind == "classification"
    assert AGE.class_names == ()
    assert TargetSpec("grade", "classification", ("a", "b")) == TargetSpec(
        "grade", "classification", ("a", "b")
    )


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: TargetSpec("grade", "classification", ("a", "a")), ValueError, r"two distinct class names"),
        (lambda: TargetSpec("grade", "classification"), ValueError, r"task 'grade': a classification task"),
        (
            lambda: TargetSpec("grade", "regresion"),
            ValueError,
            r"kind must be one of \['classification', 're",
        ),
        (lambda: TargetSpec("a/b", "regression"), ValueError, r"invalid task name 'a/b'"),
        (lambda: TargetSpec(7, "regression"), TypeError, r"task name must be a string"),  # type: ignore[arg-type]
    ],
)
def test_invalid_declarations_are_refused(
    make: Callable[[], object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        make()


# ------------------------------------------------------------------------------------------------------ Case


def _arrays(
    shape: tuple[int, ...] = (1, 6, 5, 4), label_shape: tuple[int, ...] | None = (1, 6, 5, 4)
) -> tuple[np.ndarray, np.ndarray | None]:
    """A ramp image (float64, to check the cast) and a label of values 0-2."""
    image = np.arange(np.prod(shape), dtype=np.float64).reshape(shape)
    label = None if label_shape is None else (np.arange(np.prod(label_shape)) % 3).reshape(label_shape)
    return image, label


def _in_memory(**kwargs: object) -> Case:
    return Case(
        "c1", "set", structures={1: "liver", 2: "spleen"}, loader=functools.partial(_arrays), **kwargs
    )


def test_uid_joins_dataset_and_case_id() -> None:
    assert _in_memory().uid == "set:c1"


def test_equality_ignores_the_loader_and_a_case_is_hashable() -> None:
    a = _in_memory()
    b = Case("c1", "set", structures={1: "liver", 2: "spleen"}, loader=lambda: _arrays())
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != Case("c1", "set", structures={1: "liver"}, loader=a.loader)
    assert a != Case("c1", "other", structures={1: "liver", 2: "spleen"}, loader=a.loader)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, ValueError, r"case 'd:x': give exactly one of image_path and loader, got image_path=None"),
        (
            {"image_path": Path("i"), "loader": _arrays},
            ValueError,
            r"give exactly one of image_path and loader",
        ),
        (
            {"image_path": Path("i"), "structures": {1: "liver"}},
            ValueError,
            r"'d:x': has structures .* no label",
        ),
        ({"loader": _arrays, "structures": {-1: "liver"}}, ValueError, r"positive integers, got -1"),
        ({"loader": _arrays, "structures": {True: "liver"}}, ValueError, r"positive integers, got True"),
        ({"loader": _arrays, "structures": {"1": "liver"}}, ValueError, r"positive integers, got '1'"),
        (
            {"loader": _arrays, "structures": {1: "a", 2: "a"}},
            ValueError,
            r"'d:x': a structure name is used by two",
        ),
        (
            {"loader": _arrays, "structures": {1: "left kidney"}},
            ValueError,
            r"invalid structure name 'left kidney'",
        ),
        ({"loader": _arrays, "structures": {1: None}}, TypeError, r"structure name must be a string"),
    ],
)
def test_invalid_cases_are_refused_naming_the_uid(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        Case("x", "d", **kwargs)


@pytest.mark.parametrize(
    ("case_id", "dataset", "match"),
    [("../x", "d", r"invalid case id"), ("x", "my set", r"invalid dataset name")],
)
def test_case_and_dataset_names_are_validated(case_id: str, dataset: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Case(case_id, dataset, loader=_arrays)


def test_an_in_memory_case_may_name_structures_without_a_label_path() -> None:
    assert dict(_in_memory().structures) == {1: "liver", 2: "spleen"}


# ------------------------------------------------------------------------------------------------- load_case


@pytest.mark.parametrize(
    ("shape", "label_shape"),
    [((1, 6, 5, 4), (1, 6, 5, 4)), ((3, 8, 4, 2), (1, 8, 4, 2)), ((2, 4, 4, 4), None)],
)
def test_a_loader_case_gives_float32_image_and_its_label(
    shape: tuple[int, ...], label_shape: tuple[int, ...] | None
) -> None:
    case = Case("x", "d", loader=functools.partial(_arrays, shape, label_shape))
    image, label = load_case(case)
    expected_image, expected_label = _arrays(shape, label_shape)
    assert image.dtype == np.float32 and image.shape == shape
    np.testing.assert_array_equal(image, expected_image.astype(np.float32))
    if label_shape is None:
        assert label is None
    else:
        np.testing.assert_array_equal(label, expected_label)


@pytest.mark.parametrize(
    ("shape", "label_shape", "match"),
    [
        ((6, 5, 4), None, r"case 'd:x': image must have shape \(C, X, Y, Z\), got \(6, 5, 4\)"),
        ((1, 1, 6, 5, 4), None, r"image must have shape \(C, X, Y, Z\), got \(1, 1, 6, 5, 4\)"),
        (
            (1, 6, 5, 4),
            (6, 5, 4),
            r"case 'd:x': label must have shape \(1, 6, 5, 4\) like the image, got \(6, 5",
        ),
        (
            (1, 6, 5, 4),
            (2, 6, 5, 4),
            r"label must have shape \(1, 6, 5, 4\) like the image, got \(2, 6, 5, 4\)",
        ),
        (
            (2, 6, 5, 4),
            (1, 6, 5, 3),
            r"label must have shape \(1, 6, 5, 4\) like the image, got \(1, 6, 5, 3\)",
        ),
    ],
)
def test_a_loader_returning_wrong_shapes_is_named(
    shape: tuple[int, ...], label_shape: tuple[int, ...] | None, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        load_case(Case("x", "d", loader=functools.partial(_arrays, shape, label_shape)))


def _nifti(path: Path, array: np.ndarray, spacing: tuple[float, float, float] = (1.0, 1.0, 2.0)) -> Path:
    nib.save(nib.Nifti1Image(array, np.diag([*spacing, 1.0])), str(path))
    return path


OnDisk = tuple[Path, Path, np.ndarray, np.ndarray]


@pytest.fixture
def on_disk(tmp_path: Path) -> OnDisk:
    rng = np.random.default_rng(0)
    image = rng.normal(size=(8, 6, 4)).astype(np.float32)
    label = (image > 0.5).astype(np.uint8) * 2
    return _nifti(tmp_path / "i.nii.gz", image), _nifti(tmp_path / "l.nii.gz", label), image, label


def test_a_file_case_reads_its_image_and_label_on_their_own_grid(on_disk: OnDisk) -> None:
    image_path, label_path, image, label = on_disk
    read_image, read_label = load_case(Case("x", "d", image_path, label_path, {2: "blob"}))
    assert read_image.dtype == np.float32 and read_image.shape == (1, 8, 6, 4)
    np.testing.assert_allclose(read_image[0], image)
    assert read_label.shape == (1, 8, 6, 4) and np.issubdtype(read_label.dtype, np.integer)
    np.testing.assert_array_equal(read_label[0], label)
    only_image, none = load_case(Case("x", "d", image_path))
    np.testing.assert_array_equal(only_image, read_image)
    assert none is None


def test_a_label_on_another_grid_is_refused_naming_both_files(on_disk: OnDisk, tmp_path: Path) -> None:
    image_path, _, _, label = on_disk
    other = _nifti(tmp_path / "other.nii.gz", label, spacing=(1.0, 1.0, 3.0))
    with pytest.raises(ValueError, match=r"other\.nii\.gz does not match .*i\.nii\.gz: spacing differs by 1"):
        load_case(Case("x", "d", image_path, other, {2: "blob"}))


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"gone\.nii\.gz: no such file"):
        load_case(Case("x", "d", tmp_path / "gone.nii.gz"))
