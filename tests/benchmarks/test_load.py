"""The load benchmark's checks and its summary (the run itself needs a server: ``medmeta benchmark load``)."""

from __future__ import annotations

import os

import pytest

from medmeta_plugin.benchmarks.load import _rss_mb, run_load_benchmark, summarise_load


@pytest.mark.parametrize(
    "kwargs",
    [{"submitters": 1}, {"readers": 0}, {"readers": 4, "requests": 3}],
)
def test_a_load_too_small_to_measure_is_refused_before_any_server_starts(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="need submitters >= 2, readers >= 1 and requests >= readers"):
        run_load_benchmark(**kwargs)


def test_resident_memory_is_read_from_proc() -> None:
    assert _rss_mb(os.getpid()) > 1.0


def _result(adapted_s: float | None) -> dict:
    return {
        "submitters": 8,
        "readers": 16,
        "elapsed_s": 42.5,
        "adapted_s": adapted_s,
        "server_rss_mb": {"ready": 900.0, "adapted": 1200.0, "end": 1210.0},
        "labels_submitted": 8,
        "labels_stored": 7,
        "labels_lost": 1,
        "final_adapter_shots": {"ball": 4},
        "expected_shots": {"ball": 4},
        "infer_requests": 1000,
        "infer_requests_while_adapting": 600,
        "infer_requests_after": 400,
        "infer_per_s": 23.5,
        "infer_per_s_after": 30.1,
        "latency_s": {"p50": 0.2, "p95": 0.5, "p99": 0.9},
        "latency_after_s": {"p50": 0.1, "p95": 0.3, "p99": 0.4},
        "errors": ["e1", "e2", "e3", "e4"],
    }


def test_the_summary_says_what_was_lost_and_how_fast_inference_was() -> None:
    text = summarise_load({"result": _result(12.0)})
    assert "every adaptation done after 12.0 s" in text
    assert "labels stored 7 / 8 (lost: 1)" in text
    assert "1000 requests, 23.5 /s, latency p50 0.2 s, p95 0.5 s, p99 0.9 s" in text
    assert "600 while adapting, 400 after (30.1 /s" in text
    assert "errors: 4 ['e1', 'e2', 'e3']" in text  # the count, and the first three
    assert "ready 900.0, adapted 1200.0, after the last request 1210.0" in text
    assert "not all adapted in 600 s" in summarise_load({"result": _result(None)})
