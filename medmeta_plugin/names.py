"""Validation of names that end up in file names and URLs (task, structure, adapter names)."""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["NAME_PATTERN", "parse_name_list", "validate_name"]

# Letters, digits and a few separators; first character alphanumeric so a name can never be "." or "..",
# start with "-" (an option to a shell tool) or hold a path separator. 128 characters fit every file system.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")


def validate_name(name: object, what: str = "name") -> str:
    """Return ``name`` if it is safe to use as a file name and URL segment.

    Args:
        name: the candidate name.
        what: what the name is for, used in the error message (e.g. ``"task name"``).

    Returns:
        The name, unchanged.

    Raises:
        TypeError: if ``name`` is not a string.
        ValueError: if ``name`` is empty, too long, contains path separators, ``..`` or other characters
            outside ``[A-Za-z0-9_.+-]``.
    """
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a string, got {type(name).__name__}: {name!r}.")
    if not NAME_PATTERN.match(name) or ".." in name:
        raise ValueError(
            f"invalid {what} {name!r}: use 1-128 characters from letters, digits and '_.+-', starting with a "
            "letter or digit, without '..' or path separators."
        )
    return name


def parse_name_list(value: Any, what: str) -> list[str] | None:
    """A list of names as request parameters carry them: a list, a JSON list (``'["liver", "spleen"]'``) or a
    comma-separated string (``"liver, spleen"``); None for nothing (None, ``""`` or ``[]``).

    The names are returned as given (not validated: an unknown name is the caller's message to give).

    Raises:
        ValueError: for text that starts like a JSON list but does not parse, or anything that is not a
            list of strings, naming ``what``.
    """
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"{what} is not a valid JSON list ({err.msg}): {text!r}.") from err
        else:
            value = [t.strip() for t in text.split(",") if t.strip()]
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise ValueError(f"{what} must be a list of names, a JSON list or a comma list, got {value!r}.")
    return value or None
