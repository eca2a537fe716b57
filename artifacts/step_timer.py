"""Named durations of a task's steps, accumulated over its loop (autofaiss's `Timeit` style):

    timer = StepTimer("decode", "forward")
    with timer.step("decode"):
        ...
    timer.add("loader_cpu", seconds_measured_elsewhere)
    timer.as_dict()  # {"decode": 0.12, "forward": 3.4, "loader_cpu": ...}

instead of hand-written `t0 = perf_counter()` ... `x += t1 - t0` pairs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class StepTimer:
    """Seconds per step name, summed over every time the step ran.

    The names given at construction come first in `as_dict` and are there (0.0) even when their step
    never ran (a record's keys do not depend on the data); others follow in first-use order."""

    def __init__(self, *names: str) -> None:
        self._seconds: dict[str, float] = dict.fromkeys(names, 0.0)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Time the block as step `name` (added even when the block raises)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - started)

    def add(self, name: str, seconds: float) -> None:
        """Add `seconds` measured elsewhere (another process, another thread) to step `name`."""
        self._seconds[name] = self._seconds.get(name, 0.0) + seconds

    def as_dict(self) -> dict[str, float]:
        """{step: seconds}, a copy."""
        return dict(self._seconds)
