"""A size-bounded map, the shape of every cache the user service keeps in memory."""

from __future__ import annotations

from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Bounded(Generic[K, V]):
    """A dict that forgets its oldest entry when full.

    Insertion-order (FIFO) eviction instead of LRU: a miss only costs one indexed
    read, and FIFO keeps hits free of bookkeeping.
    """

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._data: dict[K, V] = {}

    def get(self, key: K) -> V | None:
        return self._data.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def put(self, key: K, value: V) -> None:
        if key not in self._data and len(self._data) >= self._capacity:
            del self._data[next(iter(self._data))]
        self._data[key] = value

    def pop(self, key: K) -> None:
        self._data.pop(key, None)

    def __len__(self) -> int:
        return len(self._data)
