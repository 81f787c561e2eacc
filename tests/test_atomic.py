"""Crash-safe writes: a write that does not fit leaves the previous file whole and nothing else behind."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from medmeta_plugin.atomic import atomic_copy, atomic_write_bytes, check_writable, out_of_space
from tests.conftest import file_size_limit


def test_a_write_that_does_not_fit_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")
    source = tmp_path / "big.bin"
    source.write_bytes(b"n" * 50_000)
    for write in (lambda: atomic_write_bytes(target, b"n" * 50_000), lambda: atomic_copy(source, target)):
        with file_size_limit(10_000), pytest.raises(OSError) as caught:
            write()
        assert out_of_space(caught.value) and caught.value.errno == errno.EFBIG
        assert target.read_bytes() == b"old"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["big.bin", "f.bin"]
    atomic_copy(source, target)  # once there is room, the same write works
    assert target.read_bytes() == source.read_bytes()
    assert not out_of_space(OSError(errno.EACCES, "denied")) and not out_of_space(ValueError())


def test_check_writable_refuses_a_folder_that_takes_no_file(tmp_path: Path) -> None:
    assert check_writable(tmp_path / "new" / "models", "the model folder") == tmp_path / "new" / "models"
    assert list((tmp_path / "new" / "models").iterdir()) == [], "the probe file is removed"
    with file_size_limit(2), pytest.raises(ValueError, match="the model folder .* is not writable"):
        check_writable(tmp_path / "full", "the model folder")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="not writable"):
        check_writable(blocker / "models", "the model folder")
