"""The meta-training YAML's ``data`` section: which real cases a config names (``data.real_cases``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from medmeta_plugin.meta.config import DataConfig, load_config


def _load(tmp_path: Path, data: dict) -> DataConfig:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"data": data}))
    return load_config(path).data


@pytest.mark.parametrize(
    ("real_cases", "expected"),
    [
        (None, ()),  # not given: every case of the datasets
        ([], ()),
        (["scan_a"], ("scan_a",)),
        (["scan_a", "scan_b"], ("scan_a", "scan_b")),
        (["real:scan_a"], ("real:scan_a",)),  # dataset:case id, where two datasets share an id
        (["mr_brain_tumour_1", "1.2.840-case+3"], ("mr_brain_tumour_1", "1.2.840-case+3")),
    ],
)
def test_valid_real_cases(tmp_path: Path, real_cases: list[str] | None, expected: tuple[str, ...]) -> None:
    data = {"real": ["somewhere"]} | ({} if real_cases is None else {"real_cases": real_cases})
    config = _load(tmp_path, data)
    assert config.real_cases == expected
    assert config.real == ("somewhere",)


@pytest.mark.parametrize(
    ("real_cases", "match"),
    [
        ("scan_a", "must be a list of case ids, got 'scan_a'"),
        ({"scan_a": 1}, "must be a list of case ids"),
        (["scan_a", "scan_b", "scan_a"], r"lists \['scan_a'\] more than once"),
        ([""], "invalid case id in data.real_cases ''"),
        (["../scan_a"], "invalid case id in data.real_cases '../scan_a'"),
        (["scan a"], "invalid case id in data.real_cases 'scan a'"),
        (["real:"], "invalid case id in data.real_cases ''"),
        ([":scan_a"], "invalid dataset name in data.real_cases ''"),
        (["a:b:c"], "invalid case id in data.real_cases 'b:c'"),
        ([3], "case id in data.real_cases must be a string, got int: 3"),
    ],
)
def test_invalid_real_cases(tmp_path: Path, real_cases: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _load(tmp_path, {"real": ["somewhere"], "real_cases": real_cases})


def test_real_cases_need_a_dataset(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="data.real names no dataset"):
        _load(tmp_path, {"real_cases": ["scan_a"]})


def test_direct_construction_checks_the_same() -> None:
    """The checks live on the dataclass, so a config built in code is held to them too."""
    assert DataConfig(real=("x",), real_cases=("scan_a",)).real_cases == ("scan_a",)
    with pytest.raises(ValueError, match="more than once"):
        DataConfig(real=("x",), real_cases=("scan_a", "scan_a"))
    with pytest.raises(TypeError, match="must be a string"):
        DataConfig(real=("x",), real_cases=(None,))
