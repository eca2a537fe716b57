"""Bad input ends with one clear `error:` line, a non-zero exit, and nothing written."""

from __future__ import annotations

import logging
from pathlib import Path

from tests.conftest import needs_fmnist, write_manifest
from tests.helpers import run_cli


def _one_error_line(proc) -> str:
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_help_lists_every_stage():
    """`retformer --help` names every stage command, and each command has its own help."""
    out = run_cli("--help").stdout
    for command in ("shards", "embed", "index", "neighbors", "train", "evaluate", "demo"):
        assert command in out
        assert run_cli(command, "--help").returncode == 0


def test_unknown_dataset_name(tmp_path: Path):
    """An unknown dataset name names itself and the known ones, and writes no workspace."""
    ws = tmp_path / "work"
    proc = run_cli(
        "neighbors", "--dataset", "cifar1000", "--kb", "fmnist_world", "--workdir", str(ws), check=False
    )
    assert proc.returncode == 1
    line = _one_error_line(proc)
    assert "cifar1000" in line and "fmnist_lt" in line
    assert not ws.exists()


def test_missing_idx_files(tmp_path: Path):
    """A dataset whose IDX files are missing fails naming the file, and writes nothing."""
    manifest = write_manifest(
        tmp_path / "m.yaml", {"name": "nofiles", "kind": "fashion_mnist_lt", "root": str(tmp_path / "empty")}
    )
    ws = tmp_path / "work"
    proc = run_cli("shards", "--dataset", str(manifest), "--workdir", str(ws), check=False)
    assert proc.returncode == 1
    assert "idx" in _one_error_line(proc).lower()
    assert not ws.exists()


@needs_fmnist
def test_k_larger_than_kb(e2e_workspace: Path, small_manifests):
    """Asking for more neighbors than the KB holds fails before writing any neighbor table."""
    proc = run_cli(
        "neighbors",
        "--dataset",
        str(small_manifests["dataset"]),
        "--kb",
        str(small_manifests["kb"]),
        "--k",
        "100000",
        "--workdir",
        str(e2e_workspace),
        check=False,
    )
    assert proc.returncode == 1
    assert "k=100000" in _one_error_line(proc)
    assert not (e2e_workspace / "datasets" / "tiny_lt" / "neighbors" / "tiny_all" / "k100000").exists()


def test_bad_override(tmp_path: Path):
    """A --set without '=' is rejected with one line."""
    proc = run_cli(
        "shards", "--dataset", "fmnist_lt", "--set", "oops", "--workdir", str(tmp_path / "w"), check=False
    )
    assert proc.returncode == 1
    assert "oops" in _one_error_line(proc)


def test_local_cluster_dashboard_listens_on_loopback_only():
    """The LocalCluster's dashboard binds 127.0.0.1, not every interface (it prints a 127.0.0.1 link)."""
    import psutil

    from retformer.pipelines.dask_runner import dask_client

    with dask_client(n_workers=1) as client:
        port = int(client.dashboard_link.split(":")[2].split("/")[0])
        listening = [
            c.laddr
            for c in psutil.Process().net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port
        ]
    assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening


HEARTBEAT_FAILED = "Failed to communicate with scheduler during heartbeat."


def _heartbeat_filter_on_worker() -> tuple[bool, bool]:
    """Runs on a Dask worker: (is the close filter on its `distributed.worker` logger, does that
    logger keep a heartbeat-failure record while the worker runs)."""
    from retformer.pipelines.worker_exit import _HeartbeatAbortedByClose

    logger = logging.getLogger("distributed.worker")
    record = logging.LogRecord(logger.name, logging.ERROR, __file__, 0, HEARTBEAT_FAILED, None, None)
    installed = any(isinstance(f, _HeartbeatAbortedByClose) for f in logger.filters)
    return installed, bool(logger.filter(record))


def test_heartbeat_cut_by_a_workers_own_close_is_not_logged():
    """CI printed a worker's "Failed to communicate with scheduler during heartbeat" traceback under a
    stage's one-line error: closing the worker shut its connection pool under a heartbeat in flight.
    The workers of clusters we start drop that record while closing and keep it while running."""
    import types

    from distributed.core import Status

    from retformer.pipelines.dask_runner import dask_client
    from retformer.pipelines.worker_exit import _HeartbeatAbortedByClose

    with dask_client(n_workers=1) as client:
        on_workers = client.run(_heartbeat_filter_on_worker)
    assert list(on_workers.values()) == [(True, True)]
    record = logging.LogRecord("distributed.worker", logging.ERROR, __file__, 0, HEARTBEAT_FAILED, None, None)
    other = logging.LogRecord(
        "distributed.worker", logging.ERROR, __file__, 0, "Unexpected exception", None, None
    )
    for status in (Status.closing, Status.closing_gracefully, Status.closed):
        closing = _HeartbeatAbortedByClose(types.SimpleNamespace(status=status))
        assert not closing.filter(record) and closing.filter(other)
    assert _HeartbeatAbortedByClose(types.SimpleNamespace(status=Status.running)).filter(record)
