"""External registration libraries: a method whose package is missing is skipped, said once, not an error."""

from __future__ import annotations

import logging

import pytest

from medmeta_plugin.benchmarks import external


@pytest.mark.parametrize("method", ["ants-affine-moments", "elastix-affine"])
def test_a_method_without_its_package_is_skipped_with_one_warning(
    method: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(external, "available", lambda name: False)
    monkeypatch.setattr(external, "_warned", set())
    with caplog.at_level(logging.WARNING, logger=external.__name__):
        assert external.run(None, method, None) is None  # type: ignore[arg-type]
        assert external.run(None, method, None) is None  # type: ignore[arg-type]
    warnings = [r.getMessage() for r in caplog.records if method in r.getMessage()]
    assert len(warnings) == 1 and "pip install antspyx itk-elastix" in warnings[0]


def test_availability_follows_what_is_importable() -> None:
    try:
        import ants  # noqa: F401

        has_ants = True
    except ImportError:
        has_ants = False
    assert external.available("ants-affine-moments") is has_ants
