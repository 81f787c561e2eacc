"""Names: the safe-name check and the one parser of name lists in request parameters."""

from __future__ import annotations

import pytest

from medmeta_plugin.names import parse_name_list, validate_name


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ([], None),
        ("[]", None),
        (" , ", None),
        ("liver", ["liver"]),
        ("liver, spleen,", ["liver", "spleen"]),
        ('["liver", "spleen"]', ["liver", "spleen"]),
        ('  ["a,b"]', ["a,b"]),  # a JSON list keeps commas inside names
        (["liver"], ["liver"]),
    ],
)
def test_a_name_list_parses_from_a_list_json_or_commas(value, expected) -> None:
    assert parse_name_list(value, "tasks") == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('["liver", ', "tasks is not a valid JSON list"),
        ("[1, 2]", "must be a list of names"),
        ('["a", null]', "must be a list of names"),
        (5, "must be a list of names"),
        ({"liver": 1}, "must be a list of names"),
        ([1], "must be a list of names"),
    ],
)
def test_anything_else_is_a_value_error_naming_the_parameter(value, message) -> None:
    with pytest.raises(ValueError, match=message):
        parse_name_list(value, "tasks")


def test_validate_name_refuses_paths() -> None:
    assert validate_name("kidney_left") == "kidney_left"
    for bad in ("..", "../x", "a/b", "", "-rf", "a" * 200):
        with pytest.raises(ValueError, match="invalid"):
            validate_name(bad, "task name")
    with pytest.raises(TypeError):
        validate_name(3)
