"""Fixtures of the clinical-stack tests: where screenshots go, and the logs printed when a test fails."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

_TAIL = 6000  # characters of each log in a failure report: the end of a log is where the error is


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """Append the logs registered with :func:`stack_logs` to the report of a failed set-up or test."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and report.when in ("setup", "call"):
        for title, read in getattr(item, "_stack_logs", []):
            try:
                text = read()
            except OSError as err:
                text = f"(unreadable: {err})"
            report.sections.append((f"{title} (last {_TAIL} characters)", text[-_TAIL:] or "(empty)"))


@pytest.fixture
def stack_logs(request: pytest.FixtureRequest) -> Callable[[str, Path | Callable[[], str]], None]:
    """Register a log (a file, or a function returning text) to be printed if the test fails.

    Use: ``stack_logs("Orthanc", orthanc.log_path)``.
    """
    logs: list[tuple[str, Callable[[], str]]] = []
    request.node._stack_logs = logs

    def register(title: str, source: Path | Callable[[], str]) -> None:
        if isinstance(source, Path):
            logs.append((title, lambda: source.read_text(errors="replace") if source.exists() else "(none)"))
        elif callable(source):
            logs.append((title, source))
        else:
            raise TypeError(f"source must be a Path or a callable, got {type(source).__name__}.")

    return register


@pytest.fixture
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where tests write screenshots: ``$MEDMETA_ARTIFACTS`` if set (CI keeps it), else a pytest tmp dir."""
    chosen = os.environ.get("MEDMETA_ARTIFACTS")
    folder = Path(chosen) if chosen else tmp_path_factory.mktemp("artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder
