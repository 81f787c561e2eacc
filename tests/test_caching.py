"""BoundedCache: computed once, least recently used out first, one computation for concurrent callers."""

from __future__ import annotations

import threading
import time

import pytest

from medmeta_plugin.caching import BoundedCache


def test_an_entry_is_computed_once_and_the_least_recently_used_leaves_first() -> None:
    cache: BoundedCache[str] = BoundedCache(2)
    calls: list[str] = []

    def make(key: str):
        return lambda: calls.append(key) or key.upper()

    assert cache.get("a", make("a")) == "A" and cache.get("b", make("b")) == "B"
    assert cache.get("a", make("a")) == "A"  # a is now the most recently used
    cache.get("c", make("c"))  # evicts b
    assert calls == ["a", "b", "c"]
    assert "b" not in cache and "a" in cache and len(cache) == 2
    assert cache.values() == ["A", "C"]  # least recently used first
    assert cache.peek("b") is None and cache.peek("a") == "A"


def test_put_replaces_and_marks_used_and_clear_forgets() -> None:
    cache: BoundedCache[int] = BoundedCache(2)
    cache.put("x", 1)
    cache.put("y", 2)
    cache.put("x", 3)
    cache.put("z", 4)  # y was the least recently used
    assert list(cache) == ["x", "z"] and cache.peek("x") == 3
    cache.clear()
    assert len(cache) == 0 and cache.get("x", lambda: 5) == 5


@pytest.mark.parametrize("remember", [True, False])
def test_a_failure_is_remembered_only_when_asked(remember: bool) -> None:
    cache: BoundedCache[int] = BoundedCache(4, remember_failures=remember)
    calls = []

    def fail() -> int:
        calls.append(1)
        raise ValueError("cannot be placed")

    for _ in range(3):
        with pytest.raises(ValueError, match="cannot be placed"):
            cache.get("pair", fail)
    assert len(calls) == (1 if remember else 3)
    assert (cache.failure("pair") is not None) is remember
    cache.put("pair", 7)  # a later success replaces the failure
    assert cache.failure("pair") is None and cache.get("pair", fail) == 7


def test_other_errors_are_never_remembered() -> None:
    cache: BoundedCache[int] = BoundedCache(4, remember_failures=True)
    with pytest.raises(RuntimeError):
        cache.get("k", lambda: (_ for _ in ()).throw(RuntimeError("transient")))
    assert cache.failure("k") is None and cache.get("k", lambda: 1) == 1


def test_concurrent_callers_of_one_key_share_one_computation() -> None:
    cache: BoundedCache[int] = BoundedCache(4)
    calls, started = [], threading.Event()

    def slow() -> int:
        calls.append(1)
        started.set()
        time.sleep(0.2)
        return 42

    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(cache.get("k", slow))) for _ in range(4)]
    threads[0].start()
    started.wait()
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join()
    assert calls == [1] and results == [42] * 4


def test_a_waiter_computes_itself_when_the_first_computation_fails() -> None:
    cache: BoundedCache[int] = BoundedCache(4)
    started, attempts = threading.Event(), []

    def first() -> int:
        attempts.append("first")
        started.set()
        time.sleep(0.2)
        raise RuntimeError("the first computation failed")

    errors: list[Exception] = []

    def run_first() -> None:
        try:
            cache.get("k", first)
        except RuntimeError as err:
            errors.append(err)

    t = threading.Thread(target=run_first)
    t.start()
    started.wait()
    value = cache.get("k", lambda: attempts.append("second") or 9)
    t.join()
    assert value == 9 and attempts == ["first", "second"] and len(errors) == 1


@pytest.mark.parametrize("size", [0, -1, 1.5, True, "4"])
def test_a_bad_size_is_refused(size) -> None:
    with pytest.raises(ValueError, match="size"):
        BoundedCache(size)


def test_a_byte_budget_evicts_the_least_recently_used_but_keeps_the_newest() -> None:
    cache: BoundedCache[bytes] = BoundedCache(10, max_bytes=10, weigh=len)
    cache.put("a", b"xxxx")
    cache.put("b", b"xxxx")
    cache.get("a", lambda: b"")  # a is now the most recently used
    cache.put("c", b"xxxx")  # 12 bytes: b leaves
    assert list(cache) == ["a", "c"]
    cache.put("huge", b"x" * 50)  # over the budget alone: kept, everything else leaves
    assert list(cache) == ["huge"]
    cache.clear()
    cache.put("d", b"xxxx")
    assert list(cache) == ["d"]


@pytest.mark.parametrize("kwargs", [{"max_bytes": 10}, {"max_bytes": 0, "weigh": len}])
def test_a_byte_budget_needs_a_weight_and_a_positive_size(kwargs) -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        BoundedCache(4, **kwargs)
