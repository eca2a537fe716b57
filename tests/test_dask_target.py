"""Where a stage's Dask tasks run, as one argument (pipelines/dask_target.py)."""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

from retformer.pipelines import dask_target
from retformer.pipelines.clusters import ClusterSpec
from retformer.pipelines.dask_target import DaskTarget


def test_one_in_process_rule():
    """Tasks run here only when no target is given and the work is not parallel; any of the four
    options (workers too) sends them to a cluster."""
    assert DaskTarget().runs_here(parallel=False)
    assert not DaskTarget().runs_here(parallel=True)
    for given in (
        DaskTarget(workers=2),
        DaskTarget(scheduler="tcp://127.0.0.1:8786"),
        DaskTarget(scheduler_file="/tmp/sched.json"),
        DaskTarget(cluster=ClusterSpec(name="local")),
    ):
        assert given.given and not given.runs_here(parallel=False)


def test_local_means_this_machine():
    """A scheduler to join, a scheduler file or a SLURM manifest is not this machine; nothing or a
    local manifest is."""
    assert DaskTarget().local and DaskTarget(workers=3).local
    assert DaskTarget(cluster=ClusterSpec(name="l", kind="local")).local
    assert not DaskTarget(cluster=ClusterSpec(name="s", kind="slurm")).local
    assert not DaskTarget(scheduler="tcp://x:1").local
    assert not DaskTarget(scheduler_file="/tmp/s.json").local


def test_cluster_starts_at_the_first_non_empty_map(monkeypatch):
    """The on-demand mapper opens one Client with the target's options at the first call that has
    tasks (none for an empty call) and closes it with the stack."""
    opened: list[dict] = []
    closed: list[bool] = []

    @contextmanager
    def fake_client(**options):
        opened.append(options)
        yield "client"
        closed.append(True)

    monkeypatch.setattr(dask_target, "dask_client", fake_client)

    def inline(client):
        return lambda fn, items, **kwargs: [fn(i) for i in items]

    monkeypatch.setattr(dask_target, "task_mapper", inline)
    target = DaskTarget(workers=2)
    with ExitStack() as stack:
        map_tasks = target.map_tasks(stack, parallel=False)
        assert map_tasks(str, []) == [] and opened == []
        assert map_tasks(str, [1, 2]) == ["1", "2"]
        assert map_tasks(str, [3]) == ["3"]
        assert opened == [target.client_options] and opened[0]["n_workers"] == 2 and not closed
    assert closed == [True]
