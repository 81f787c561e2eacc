"""Headless Chromium for the stack: the offline flags, a missing browser named, and teardown by PID."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest

from medmeta_plugin.stack import browser
from medmeta_plugin.stack.browser import CHROMIUM_FLAGS, HeadlessChromium, find_chromium

# The flags issue 6 asks for on a machine without internet.
REQUIRED_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


@pytest.mark.parametrize("flag", REQUIRED_FLAGS)
def test_offline_flags_are_passed(flag: str) -> None:
    assert flag in CHROMIUM_FLAGS


def test_a_missing_chromium_is_named_with_its_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(browser, "_CANDIDATES", ("no-such-chromium", "/no/such/chromium"))
    with pytest.raises(ValueError, match="apt-get install chromium"):
        find_chromium()


@pytest.mark.stack
def test_browser_is_offline_and_stopped_with_its_children(tmp_path: Path) -> None:
    with HeadlessChromium(tmp_path / "chromium") as chromium:
        assert find_chromium() == chromium.executable
        page = chromium.new_page()
        page.set_content("<script>console.log('from the page')</script>")
        with pytest.raises(Exception, match="ERR_NAME_NOT_RESOLVED"):
            page.goto("http://example.org/", timeout=30_000)  # no host but 127.0.0.1 resolves
        assert {urlparse(url).hostname for url in chromium.external} == {"example.org"}
        assert "[log] from the page" in chromium.console
        group = chromium.process.pid
        assert _group_members(group), "the browser's process group is empty while it runs"
    assert chromium.process is None
    assert _group_members(group) == []


def _group_members(pgid: int) -> list[int]:
    """PIDs of live (not zombie) processes in a process group."""
    out = subprocess.run(["ps", "-eo", "pid=,pgid=,stat="], capture_output=True, text=True, check=True).stdout
    return [
        int(pid)
        for pid, group, stat in (line.split() for line in out.splitlines())
        if int(group) == pgid and not stat.startswith("Z") and int(pid) != os.getpid()
    ]
