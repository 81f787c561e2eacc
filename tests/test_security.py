"""Nothing a client can influence is unpickled: a scan of the package's own source."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "medmeta_plugin"
APPS = Path(__file__).resolve().parents[1] / "apps"
SOURCES = sorted([*PACKAGE.rglob("*.py"), *APPS.rglob("*.py")])


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_no_unpickling(path: Path) -> None:
    text = path.read_text()
    assert not re.search(r"^\s*(import pickle|from pickle|import dill|import joblib)", text, re.M), path
    assert "pickle.load" not in text and "allow_pickle=True" not in text, path
    for call in re.finditer(r"torch\.load\((.*?)\)", text, re.S):
        assert "weights_only=True" in call.group(1), f"{path}: torch.load without weights_only=True"
