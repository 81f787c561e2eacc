"""One bounded, thread-safe cache for every "compute once, keep a while" job of the package.

Working-grid scans and their backbone features, registrations of pairs of scans, scans and labels read for
atlas priors: each is costly to compute, cheap to keep for a while, and asked for from several threads of a
server at once. :class:`BoundedCache` keeps the ``size`` most recently used entries, computes a missing one
once however many threads ask for it at the same time, and can remember that a computation failed, so a
request that cannot succeed is not attempted again on every call.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

__all__ = ["BoundedCache"]

V = TypeVar("V")


class BoundedCache(Generic[V]):
    """A least-recently-used cache of at most ``size`` entries, safe to share between threads.

    Args:
        size: how many entries to keep (the least recently used one leaves first).
        remember_failures: remember a ``ValueError`` raised by a computation and raise it again for that key
            without computing (failures count towards ``size`` like entries).
        max_bytes: also keep the entries' total ``weigh`` under this many bytes (the most recent entry is
            kept whatever its size); None: no byte budget.
        weigh: an entry's size in bytes (needed with ``max_bytes``).

    Raises:
        ValueError: if ``size`` is not a positive integer, or ``max_bytes`` is given without ``weigh`` or is
            not positive.
    """

    def __init__(
        self,
        size: int,
        *,
        remember_failures: bool = False,
        max_bytes: int | None = None,
        weigh: Callable[[V], int] | None = None,
    ) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive integer, got {size!r}.")
        if max_bytes is not None and (weigh is None or max_bytes < 1):
            raise ValueError(f"max_bytes needs a weigh function and a positive budget, got {max_bytes!r}.")
        self.size, self.remember_failures = size, remember_failures
        self.max_bytes, self._weigh = max_bytes, weigh
        self._bytes: dict[Hashable, int] = {}
        self._entries: OrderedDict[Hashable, V] = OrderedDict()
        self._failures: OrderedDict[Hashable, ValueError] = OrderedDict()
        self._computing: dict[Hashable, threading.Event] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable, compute: Callable[[], V]) -> V:
        """The entry of ``key``, computed by ``compute()`` if missing.

        Concurrent calls for one missing key compute it once: the others wait for that result (and, if it
        failed without being remembered, one of them tries again).

        Raises:
            ValueError: what ``compute`` raised, now or (with ``remember_failures``) when first computed.
            Exception: anything else ``compute`` raises, not remembered.
        """
        while True:
            with self._lock:
                if key in self._entries:
                    self._entries.move_to_end(key)
                    return self._entries[key]
                if key in self._failures:
                    raise self._failures[key]
                pending = self._computing.get(key)
                if pending is None:
                    self._computing[key] = threading.Event()
                    break
            pending.wait()
        try:
            value = compute()
        except ValueError as err:
            if self.remember_failures:
                with self._lock:
                    self._failures[key] = err
                    self._trim(self._failures)
            raise
        finally:
            with self._lock:
                self._computing.pop(key).set()
        self.put(key, value)
        return value

    def put(self, key: Hashable, value: V) -> None:
        """Store ``value`` under ``key`` as the most recently used entry (forgetting a failure of it)."""
        weight = self._weigh(value) if self.max_bytes is not None else 0
        with self._lock:
            self._failures.pop(key, None)
            self._entries[key] = value
            self._entries.move_to_end(key)
            if self.max_bytes is not None:
                self._bytes[key] = weight
                while len(self._entries) > 1 and sum(self._bytes.values()) > self.max_bytes:
                    self._bytes.pop(self._entries.popitem(last=False)[0])
            self._trim(self._entries)

    def peek(self, key: Hashable) -> V | None:
        """The entry of ``key`` without computing it or marking it used; None if missing."""
        with self._lock:
            return self._entries.get(key)

    def failure(self, key: Hashable) -> ValueError | None:
        """The remembered failure of ``key``, if any."""
        with self._lock:
            return self._failures.get(key)

    def values(self) -> list[V]:
        """The entries, least recently used first."""
        with self._lock:
            return list(self._entries.values())

    def clear(self) -> None:
        """Forget every entry and failure."""
        with self._lock:
            self._entries.clear()
            self._failures.clear()
            self._bytes.clear()

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __iter__(self) -> Iterator[Hashable]:
        with self._lock:
            return iter(list(self._entries))

    def _trim(self, entries: OrderedDict) -> None:
        while len(entries) > self.size:
            self._bytes.pop(entries.popitem(last=False)[0], None)
