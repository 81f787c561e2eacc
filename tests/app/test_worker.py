"""The background adaptation worker: coalescing, no skipped label, failures, idle work."""

from __future__ import annotations

import threading
import time

import pytest

from medmeta_plugin.app.worker import AdaptationWorker


class Recorder:
    """An adapt function that records which labels each run saw, optionally blocking or failing."""

    def __init__(self) -> None:
        self.labels: dict[str, list[int]] = {}
        self.runs: list[tuple[str, tuple[int, ...]]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.fail: set[str] = set()

    def __call__(self, task: str) -> dict:
        seen = tuple(self.labels.get(task, []))
        self.started.set()
        self.gate.wait(10)
        self.runs.append((task, seen))
        if task in self.fail:
            self.fail.discard(task)
            raise RuntimeError("out of memory (simulated)")
        return {"labels": len(seen)}


@pytest.fixture
def recorder_worker():
    recorder = Recorder()
    worker = AdaptationWorker(recorder)
    worker.start()
    yield recorder, worker
    recorder.gate.set()
    worker.stop()


def test_requests_coalesce_and_no_label_is_skipped(recorder_worker) -> None:
    recorder, worker = recorder_worker
    recorder.gate.clear()
    recorder.labels["liver"] = [1]
    worker.request(["liver"])
    assert recorder.started.wait(5)
    # Four more labels arrive while the first adaptation runs.
    for label in (2, 3, 4, 5):
        recorder.labels["liver"].append(label)
        worker.request(["liver"])
    status = worker.status()
    assert status["running"] == "liver" and status["pending"] == ["liver"]
    recorder.gate.set()
    assert worker.wait_idle(10)
    # One run for the first label, one coalesced run for the four others, which saw all of them.
    assert [task for task, _ in recorder.runs] == ["liver", "liver"]
    assert recorder.runs[-1][1] == (1, 2, 3, 4, 5)
    assert worker.status()["tasks"]["liver"]["state"] == "ready"


def test_tasks_run_in_request_order(recorder_worker) -> None:
    recorder, worker = recorder_worker
    recorder.gate.clear()
    worker.request(["a"])
    assert recorder.started.wait(5)
    worker.request(["c", "b", "c"])
    recorder.gate.set()
    assert worker.wait_idle(10)
    assert [task for task, _ in recorder.runs] == ["a", "c", "b"]


def test_failure_is_reported_and_next_request_recovers(recorder_worker) -> None:
    recorder, worker = recorder_worker
    recorder.fail.add("spleen")
    worker.request(["spleen"])
    assert worker.wait_idle(10)
    status = worker.status()["tasks"]["spleen"]
    assert status["state"] == "failed" and "out of memory" in status["error"]
    worker.request(["spleen"])
    assert worker.wait_idle(10)
    status = worker.status()["tasks"]["spleen"]
    assert status["state"] == "ready" and status["error"] is None


def test_request_never_blocks_on_running_work(recorder_worker) -> None:
    recorder, worker = recorder_worker
    recorder.gate.clear()
    worker.request(["slow"])
    assert recorder.started.wait(5)
    start = time.perf_counter()
    worker.request(["other"])
    assert time.perf_counter() - start < 0.5
    recorder.gate.set()


def test_idle_job_runs_until_done_and_yields_to_adaptation() -> None:
    calls: list[str] = []
    remaining = [3]

    def idle() -> bool:
        calls.append("idle")
        remaining[0] -= 1
        return remaining[0] > 0

    worker = AdaptationWorker(lambda task: calls.append(task) or {}, idle)
    worker.request(["x"])  # pending before the thread starts: adaptation goes before idle work
    worker.start()
    try:
        deadline = time.monotonic() + 5
        while remaining[0] > 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert calls[0] == "x" and calls.count("idle") == 3
    finally:
        worker.stop()
