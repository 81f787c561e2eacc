"""The background adaptation worker: one thread in the server process that re-adapts tasks on request.

Contract:
- :meth:`AdaptationWorker.request` marks tasks dirty and returns at once (a label submission never waits).
- Requests coalesce: a task requested five times while it waits is adapted once, from all its labels.
- No label is skipped: a task requested *while* it adapts is adapted again afterwards, so its final adapter
  has seen every label stored before its last request.
- A failed adaptation leaves the previous adapter serving; its error is kept in :meth:`status` until the next
  successful adaptation of that task.
- When no adaptation is pending, an optional idle job runs in small steps (e.g. refreshing active-learning
  scores) and yields to adaptation between steps.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["AdaptationWorker"]

logger = logging.getLogger(__name__)


class AdaptationWorker:
    """Runs ``adapt_fn(task)`` for requested tasks on one daemon thread.

    Args:
        adapt_fn: adapts one task from everything stored for it and returns a JSON-able summary; raising
            marks that adaptation failed.
        idle_fn: called repeatedly while nothing is pending; returns True while it has more to do.
    """

    def __init__(
        self,
        adapt_fn: Callable[[str], dict[str, Any]],
        idle_fn: Callable[[], bool] | None = None,
    ) -> None:
        self._adapt_fn, self._idle_fn = adapt_fn, idle_fn
        self._cond = threading.Condition()
        self._pending: list[str] = []
        self._running: str | None = None
        self._status: dict[str, dict[str, Any]] = {}
        self._idle_work = idle_fn is not None
        self._stop = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread (idempotent)."""
        with self._cond:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="medmeta-adapt", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the thread to finish its current adaptation and stop."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def request(self, tasks: Iterable[str]) -> list[str]:
        """Schedule adaptation of ``tasks``; returns them. Never blocks on running work."""
        tasks = list(dict.fromkeys(tasks))
        with self._cond:
            for task in tasks:
                if task not in self._pending:
                    self._pending.append(task)
                self._status.setdefault(task, {})["state"] = "running" if task == self._running else "pending"
            self._idle_work = self._idle_fn is not None
            self._cond.notify_all()
        return tasks

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is pending or running; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._pending or self._running is not None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def status(self) -> dict[str, Any]:
        """``{"pending": [...], "running": task | None, "tasks": {task: {...}}}`` (a copy)."""
        with self._cond:
            return {
                "pending": list(self._pending),
                "running": self._running,
                "tasks": {k: dict(v) for k, v in sorted(self._status.items())},
            }

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stop and not self._idle_work:
                    self._cond.wait()
                if self._stop:
                    return
                if not self._pending:
                    task = None
                else:
                    task = self._pending.pop(0)
                    self._running = task
                    self._status.setdefault(task, {})["state"] = "running"
            if task is None:
                self._run_idle()
                continue
            start = time.perf_counter()
            try:
                summary = self._adapt_fn(task)
                outcome: dict[str, Any] = {"state": "ready", "error": None, **summary}
            except Exception as err:
                logger.error("adaptation of %s failed: %s\n%s", task, err, traceback.format_exc())
                outcome = {"state": "failed", "error": f"{type(err).__name__}: {err}"}
            outcome["seconds"] = round(time.perf_counter() - start, 3)
            outcome["finished"] = time.time()
            with self._cond:
                self._running = None
                status = self._status.setdefault(task, {})
                if outcome["state"] == "failed":
                    status.update({k: v for k, v in outcome.items() if k in ("error", "seconds", "finished")})
                    status["state"] = "failed"
                else:
                    status.clear()
                    status.update(outcome)
                if task in self._pending:
                    status["state"] = "pending"
                self._cond.notify_all()

    def _run_idle(self) -> None:
        try:
            more = bool(self._idle_fn and self._idle_fn())
        except Exception as err:
            logger.warning("background scoring failed: %s", err)
            more = False
        with self._cond:
            if not more and not self._pending:
                self._idle_work = False
            self._cond.notify_all()
