"""The offline knowledge-base pipeline: datasets, encoders, sources, download, embed, index, neighbors.

Every stage has one entry point `run_<stage>(..., map_tasks)` and a per-shard task function; the
fan-out is the caller's `map_tasks` (pipelines/dask_runner.py builds it on a Dask client).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# map_tasks(fn, items, desc=..., unit=..., count_key=..., **kwargs) -> [fn(item, **kwargs) per item],
# in item order; `desc`, `unit` and `count_key` only label the progress display.
MapTasks = Callable[..., list[Any]]


def map_inline(fn: Callable[..., Any], items: list[Any], **kwargs: Any) -> list[Any]:
    """`map_tasks` in this process, one item after another (progress labels are ignored)."""
    for label in ("desc", "unit", "count_key"):
        kwargs.pop(label, None)
    return [fn(item, **kwargs) for item in items]
