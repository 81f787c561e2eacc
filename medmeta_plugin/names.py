"""Validation of names that end up in file names and URLs (task, structure, adapter names)."""

from __future__ import annotations

import re

__all__ = ["NAME_PATTERN", "validate_name"]

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
