"""Where a stage's Dask tasks run, as one argument: the four options every Dask command takes
(`--scheduler`, `--workers`, `--cluster`, `--scheduler-file`; pipelines/clusters.py), and the one rule
that decides when a stage's tasks run in this process instead."""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retformer.kb_builder import MapTasks
from retformer.pipelines.clusters import ClusterSpec
from retformer.pipelines.dask_runner import dask_client, task_mapper


@dataclass(frozen=True)
class DaskTarget:
    """A running scheduler (`scheduler` address or `scheduler_file`), a cluster manifest (`cluster`: a
    name, path or loaded ClusterSpec) or a LocalCluster of `workers` processes; all None (the default):
    a LocalCluster when a stage's work is parallel, this process otherwise (`runs_here`)."""

    scheduler: str | None = None
    workers: int | None = None
    cluster: ClusterSpec | str | None = None
    scheduler_file: Path | str | None = None

    @property
    def given(self) -> bool:
        """Whether the command named where its tasks run (any of the four options)."""
        return bool(self.scheduler or self.workers or self.cluster or self.scheduler_file)

    @property
    def local(self) -> bool:
        """Whether the tasks run on this machine (no scheduler to join, no SLURM or unloaded manifest):
        then a stage can check this machine's GPUs before it starts."""
        on_this_machine = self.cluster is None or getattr(self.cluster, "kind", None) == "local"
        return on_this_machine and not (self.scheduler or self.scheduler_file)

    @property
    def client_options(self) -> dict[str, Any]:
        """The keywords of `pipelines.dask_runner.dask_client` that open a Client on this target."""
        return {
            "scheduler": self.scheduler,
            "n_workers": self.workers,
            "cluster": self.cluster,
            "scheduler_file": self.scheduler_file,
        }

    def runs_here(self, parallel: bool) -> bool:
        """The one in-process rule: a stage's tasks run in this process when no target is given and its
        work is not `parallel` (a one-shard index build, the neighbor search); on a cluster otherwise
        (embedding and downloading are always parallel). The output is the same either way."""
        return not self.given and not parallel

    def map_tasks(self, stack: ExitStack, parallel: bool) -> MapTasks:
        """The `map_tasks` of a CPU stage under `runs_here`'s rule. The cluster starts (or is joined) at
        the first non-empty call and is closed with `stack`: a stage that finds its output complete
        never pays for a cluster's start."""
        if self.runs_here(parallel):
            return task_mapper(None)
        mapper: MapTasks | None = None

        def on_demand(fn: Any, items: list[Any], **kwargs: Any) -> list[Any]:
            nonlocal mapper
            if not items:
                return []
            if mapper is None:
                mapper = task_mapper(stack.enter_context(dask_client(**self.client_options)))
            return mapper(fn, items, **kwargs)

        return on_demand
