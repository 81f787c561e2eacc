"""Label submissions: label_info and targets parsing (tables and properties) and label validation."""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medmeta_plugin.app.labels import Submission, parse_label_params, validate_label_file
from medmeta_plugin.io import ImageMeta, write_image

META = ImageMeta((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), ((1, 0, 0), (0, 1, 0), (0, 0, 1)), (4, 4, 4))


@pytest.mark.parametrize(
    ("params", "structures", "targets"),
    [
        (
            {"label_info": [{"name": "liver", "idx": 1}, {"name": "spleen", "idx": 2}]},
            {"liver": 1, "spleen": 2},
            {},
        ),
        ('{"label_info": [{"name": "liver", "value": 3}]}', {"liver": 3}, {}),
        ({"label_info": {"liver": 1}}, {"liver": 1}, {}),
        ({}, {"fallback": 5}, {}),
        (None, {"fallback": 5}, {}),
        (
            {
                "label_info": [],
                "targets": {"grade": {"kind": "classification", "value": 1, "num_classes": 3}},
            },
            {"fallback": 5},
            {"grade": {"kind": "classification", "value": 1, "num_classes": 3}},
        ),
        (
            {"targets": {"volume_ml": 12.5}},
            {"fallback": 5},
            {"volume_ml": {"kind": "regression", "value": 12.5}},
        ),
    ],
)
def test_valid_params(params: object, structures: dict, targets: dict) -> None:
    submission = parse_label_params(params, {"fallback": 5})
    assert submission.structures == structures
    assert submission.to_json()["targets"] == targets


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ({"label_info": "liver"}, "label_info must be"),
        ({"label_info": [{"idx": 1}]}, "'name'"),
        ({"label_info": [{"name": "../etc", "idx": 1}]}, "invalid structure name"),
        ({"label_info": [{"name": "a b", "idx": 1}]}, "invalid structure name"),
        ({"label_info": [{"name": "liver", "idx": 0}]}, "1..255"),
        ({"label_info": [{"name": 5, "idx": 1}]}, "must be strings"),
        ({"label_info": [{"name": "liver", "idx": 1.5}]}, "integer"),
        ({"label_info": [{"name": "liver", "idx": True}]}, "integer"),
        ({"label_info": [{"name": "a", "idx": 1}, {"name": "b", "idx": 1}]}, "same value"),
        ({"label_info": [{"name": "a", "idx": 1}, {"name": "a", "idx": 2}]}, "twice"),
        ({"targets": [1]}, "targets must be"),
        ({"targets": {"g": {"kind": "classification", "value": 3, "num_classes": 3}}}, "not in 0..2"),
        ({"targets": {"g": {"kind": "classification", "value": 0}}}, "num_classes"),
        ({"targets": {"g": {"kind": "segmentation", "value": 0}}}, "kind must be"),
        ({"targets": {"g": float("nan")}}, "finite"),
        ({"label_info": {"g": 1}, "targets": {"g": 1.0}}, "both as a structure"),
    ],
)
def test_invalid_params(params: object, needle: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_label_params(params, {})
    assert needle in str(err.value)


_names = st.text(string.ascii_letters + string.digits + "_-", min_size=1, max_size=12).filter(
    lambda s: s[0].isalnum()
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(_names, st.integers(1, 255), max_size=8))
def test_label_info_round_trips(mapping: dict[str, int]) -> None:
    # Distinct values parse to exactly the mapping, in both of Slicer's forms; clashing values are refused.
    info = [{"name": n, "idx": v} for n, v in mapping.items()]
    if len(set(mapping.values())) == len(mapping):
        assert parse_label_params({"label_info": info}, {}).structures == mapping
        assert parse_label_params(json.dumps({"label_info": mapping}), {}).structures == mapping
    else:
        with pytest.raises(ValueError, match="same value"):
            parse_label_params({"label_info": info}, {})


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=8),
        lambda children: (
            st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
        ),
        max_leaves=12,
    )
)
def test_arbitrary_params_parse_or_raise_value_error(params: object) -> None:
    # Whatever a client sends, the parser answers with a Submission or a ValueError, never anything else.
    for candidate in (params, {"label_info": params}, {"targets": params}, json.dumps(params)):
        try:
            result = parse_label_params(candidate, {"x": 1})
        except ValueError:
            continue
        assert isinstance(result, Submission)


def _label(tmp_path: Path, values: np.ndarray, meta: ImageMeta = META) -> Path:
    return write_image(tmp_path / "label.nii.gz", values.astype(np.uint8)[None], meta)


def test_label_values_must_be_named(tmp_path: Path) -> None:
    values = np.zeros((4, 4, 4))
    values[0, 0, 0], values[1, 1, 1] = 1, 3
    path = _label(tmp_path, values)
    with pytest.raises(ValueError, match=r"label values \[3\] are not named"):
        validate_label_file(path, META, Submission({"liver": 1}))
    label, _ = validate_label_file(path, META, Submission({"liver": 1, "kidney": 3}))
    assert label.shape == (1, 4, 4, 4)


def test_fallback_names_only_count_present_values(tmp_path: Path) -> None:
    values = np.zeros((4, 4, 4))
    values[0, 0, 0] = 2
    submission = parse_label_params({}, {"liver": 1, "spleen": 2})
    _, used = validate_label_file(_label(tmp_path, values), META, submission)
    assert used.structures == {"spleen": 2}  # liver was not labelled, so it is not an "absent" example


def test_label_on_another_grid_is_refused(tmp_path: Path) -> None:
    other = ImageMeta((1.0, 1.0, 2.0), (0.0, 0.0, 0.0), ((1, 0, 0), (0, 1, 0), (0, 0, 1)), (4, 4, 4))
    path = _label(tmp_path, np.zeros((4, 4, 4)), other)
    with pytest.raises(ValueError, match="spacing differs"):
        validate_label_file(path, META, Submission({"liver": 1}))


def test_label_naming_nothing_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="names no structure"):
        validate_label_file(_label(tmp_path, np.zeros((4, 4, 4))), META, Submission({}))
