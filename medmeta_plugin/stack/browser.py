"""Headless Chromium (Debian's ``chromium``) for the clinical stack, driven through Playwright over CDP.

:class:`HeadlessChromium` starts the system browser itself (``subprocess.Popen``, so it is stopped by its
PID like Orthanc and the MONAI Label server), with the flags a machine without internet needs, and connects
Playwright to it over the DevTools protocol; Playwright never downloads a browser here.

Nothing leaves the machine: besides the flags that switch off Chromium's own background traffic, every host
name other than 127.0.0.1 resolves to nothing (``--host-resolver-rules``), so what OHIF's page fetches from
the internet (its Google Fonts stylesheet) fails at once and OHIF falls back to a local font. Requests are
not blocked with Playwright's request routing: with routing on, OHIF 3.10 never finishes starting (its web
worker stalls). Every request that leaves 127.0.0.1 is recorded in :attr:`HeadlessChromium.external`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from medmeta_plugin.app.process import stop_process

__all__ = ["CHROMIUM_FLAGS", "HeadlessChromium", "find_chromium"]

# The flags a machine without internet needs (issue 6), then two of this module's own (see below).
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    # WebGL without a GPU is SwiftShader; Chromium 156 still falls back to it by itself but warns that this
    # fallback is deprecated. The pages are this machine's own OHIF, so opting in costs no security.
    "--enable-unsafe-swiftshader",
)
_CANDIDATES = ("chromium", "/usr/lib/chromium/chromium", "chromium-browser")
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def find_chromium() -> str:
    """The system Chromium's executable.

    Raises:
        ValueError: if Chromium is not installed (``apt-get install chromium``).
    """
    for name in _CANDIDATES:
        path = shutil.which(name) or (name if Path(name).is_file() else None)
        if path:
            return path
    raise ValueError(f"Chromium is not installed (looked for {list(_CANDIDATES)}): apt-get install chromium")


class HeadlessChromium:
    """One headless Chromium process and a Playwright connection to it.

    Args:
        work: folder for the browser profile and its log (created if missing).
        size: viewport ``(width, height)`` of the pages, in CSS pixels.

    Raises:
        ValueError: if Chromium or the ``playwright`` package (``pip install -e .[stack]``) is missing.
    """

    def __init__(self, work: str | Path, size: tuple[int, int] = (1400, 900)) -> None:
        self.executable = find_chromium()
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError as err:
            raise ValueError("the playwright package is missing: pip install -e '.[stack]'") from err
        self.work = Path(work)
        self.size = size
        self.process: subprocess.Popen | None = None
        self.console: list[str] = []
        self.external: list[str] = []
        self._playwright: Any = None
        self._browser: Any = None

    @property
    def log_path(self) -> Path:
        """Chromium's own output (stderr), not the pages' console (:attr:`console`)."""
        return self.work / "chromium.log"

    def start(self, timeout: float = 60.0) -> HeadlessChromium:
        """Start Chromium with a DevTools port chosen by itself, and connect Playwright.

        Raises:
            RuntimeError: if Chromium exits or opens no DevTools port within ``timeout`` seconds.
        """
        from playwright.sync_api import sync_playwright

        profile = self.work / "profile"
        profile.mkdir(parents=True, exist_ok=True)
        port_file = profile / "DevToolsActivePort"
        port_file.unlink(missing_ok=True)
        command = [self.executable, *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
        command += ["--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "about:blank"]
        with open(self.log_path, "ab") as log:
            # Its own session, so that the renderer and GPU processes it forks can be stopped with it.
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while not (port_file.is_file() and port_file.read_text().count("\n") >= 1):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Chromium did not start:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.1)
        port = int(port_file.read_text().splitlines()[0])
        self._playwright = sync_playwright().start()
        self._browser = self._playwright.chromium.connect_over_cdp(f"http://127.0.0.1:{port}")
        return self

    def new_page(self) -> Any:
        """A page in a fresh browser context (no cookies), whose console and traffic are recorded.

        Returns:
            A ``playwright.sync_api.Page``.
        """
        if self._browser is None:
            raise RuntimeError("the browser is not started; use `with HeadlessChromium(...)` or start().")
        width, height = self.size
        context = self._browser.new_context(viewport={"width": width, "height": height})
        context.on("request", self._record_request)
        page = context.new_page()
        page.on("console", lambda message: self.console.append(f"[{message.type}] {message.text}"))
        page.on("pageerror", lambda error: self.console.append(f"[pageerror] {error}"))
        return page

    def _record_request(self, request: Any) -> None:
        host = urlparse(request.url).hostname
        if host is not None and host not in _LOOPBACK:
            self.external.append(request.url)

    def stop(self, timeout: float = 20.0) -> None:
        """Disconnect Playwright, then stop Chromium by its PID (terminate, then kill its process group)."""
        for close in (getattr(self._browser, "close", None), getattr(self._playwright, "stop", None)):
            if close is not None:
                with contextlib.suppress(Exception):  # the browser may be gone already; it is killed below
                    close()
        self._browser = self._playwright = None
        if self.process is None:
            return
        stop_process(self.process, timeout)
        _kill_group(self.process.pid, timeout)
        self.process = None

    def __enter__(self) -> HeadlessChromium:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _kill_group(pgid: int, timeout: float) -> None:
    """Kill what is left of the browser's process group (renderers, GPU and zygote processes) and wait."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            return
        time.sleep(0.05)
