"""The embed stage under faults: SIGKILL of the whole run and of one Dask worker, then a rerun, give
parts identical row for row to an uninterrupted run; a partial part is never listed or read; a
truncated part is reported by the next stage as one error line naming the file."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from retformer.artifacts.embeddings_io import list_parts
from retformer.artifacts.shards import Sample, write_shards
from retformer.kb_builder import embed
from retformer.kb_builder.datasets import fashion_mnist as fm
from retformer.kb_builder.kb_schema import EmbedSection, Encoders, image_encoder
from tests.conftest import FMNIST_DIR, REPO, needs_fmnist, write_manifest
from tests.helpers import run_cli

pytestmark = needs_fmnist

N_SHARDS = 8
SHARD_SIZE = 60
# 64 px: ~0.2 s of forward per shard on one core, a window wide enough to kill the run mid-way.
# No text tower: each Dask worker would import sentence-transformers (~5 s); captions are covered by
# test_embed_robustness.py.
ENCODERS = {"image": {"name": "efficientnet_lite0", "image_size": 64}, "text": None}
OPTIONS = {"batch_size": 16, "threads": 1}
COLUMNS = ["uid", "image_emb", "text_emb", "caption", "label", "source"]


@pytest.fixture(scope="module")
def kb(tmp_path_factory) -> dict:
    """Fashion-MNIST shards (8 x 60), a KB manifest over them, and a reference: the same shards
    embedded in this process, uninterrupted, with no loader workers."""
    root = tmp_path_factory.mktemp("faults")
    images, labels = fm.load_arrays(FMNIST_DIR, "train")
    shard_dir = root / "shards"
    samples = (
        Sample(f"fm_{i}", images[i], f"a photo of a {fm.CLASS_NAMES[labels[i]]}", int(labels[i]), "test")
        for i in range(N_SHARDS * SHARD_SIZE)
    )
    shards = write_shards(samples, shard_dir, "world", SHARD_SIZE)
    manifest = write_manifest(
        root / "faults_kb.yaml",
        {
            "name": "faults_kb",
            "source": {"kind": "webdataset", "path": str(shard_dir)},
            "encoders": ENCODERS,
            # One loader process inside the Dask worker: the fork-from-a-daemon path is exercised too.
            "embed": {"batch_size": OPTIONS["batch_size"], "num_workers": 1},
            "index": {"kind": "flat", "num_shards": 1, "k": 4, "recall_target": 0.9},
        },
    )
    torch.set_num_threads(1)
    ref = root / "reference"
    for shard in shards:
        embed.embed_shard(
            (shard, embed.part_stem(shard, shard_dir)), ref, image_encoder(ENCODERS["image"]), None,
            num_workers=0, **OPTIONS,
        )  # fmt: skip
    return {"root": root, "shards": shards, "shard_dir": shard_dir, "manifest": manifest, "ref": ref}


def assert_same_parts(out: Path, ref: Path) -> None:
    """Same part names; each part's rows equal the reference's, column by column, vector bytes included."""
    parts, ref_parts = list_parts(out), list_parts(ref)
    assert [p.name for p in parts] == [p.name for p in ref_parts]
    for got, want in zip(parts, ref_parts, strict=True):
        a, b = pq.read_table(got, columns=COLUMNS), pq.read_table(want, columns=COLUMNS)
        assert a.num_rows == b.num_rows == SHARD_SIZE
        for name in COLUMNS:
            assert a.column(name).equals(b.column(name)), f"{got.name}: column {name} differs"


def _cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "retformer.pipelines.cli", *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: the kill takes the Dask workers along
        **kw,
    )


def _wait_group_gone(pgid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


@pytest.mark.slow
def test_sigkill_of_the_whole_run_then_rerun_gives_identical_parts(kb, tmp_path):
    """`retformer embed` killed with SIGKILL (its whole process group) once some but not all parts
    exist; no temporary file is ever listed as a part; the rerun embeds only the missing shards,
    removes a dead writer's leftover, and the parts equal the uninterrupted run's, row for row."""
    work = tmp_path / "work"
    out = work / "kb" / "faults_kb" / "embeddings"
    proc = _cli("embed", "--kb", str(kb["manifest"]), "--workdir", str(work), "--workers", "1")
    done_at_kill = None
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if out.is_dir():
                parts = list_parts(out)
                assert not any(".tmp-" in p.name for p in parts)
                if parts:
                    os.killpg(proc.pid, signal.SIGKILL)
                    done_at_kill = len(parts)
                    break
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert done_at_kill is not None, f"no part appeared; embed exited {proc.returncode}"
    assert proc.returncode == -signal.SIGKILL
    _wait_group_gone(proc.pid)  # the Dask worker too, before counting what it finished
    done = list_parts(out)
    assert 1 <= len(done) < N_SHARDS, "the kill came too late to test a partial run"
    # A writer killed mid-write leaves `<part>.tmp-<pid>`: plant one for a missing part (its pid is
    # above Linux's largest pid_max, so no live process can own it).
    missing = sorted({embed.part_stem(s, kb["shard_dir"]) for s in kb["shards"]} - {p.stem[5:] for p in done})
    leftover = out / f"part-{missing[0]}.parquet.tmp-{2**22 + 7}"
    leftover.write_bytes(b"PAR1 half a part")
    assert leftover not in list_parts(out)

    run_cli("embed", "--kb", str(kb["manifest"]), "--workdir", str(work), "--workers", "1")
    record = json.loads((work / "kb" / "faults_kb" / "_stages" / "embed.json").read_text())
    assert record["parts_done_before"] == len(done)
    assert record["embedded_this_run"] == (N_SHARDS - len(done)) * SHARD_SIZE
    assert record["images"] == N_SHARDS * SHARD_SIZE
    assert not leftover.exists(), "a dead writer's temporary file is removed when its part is written"
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    assert_same_parts(out, kb["ref"])


@pytest.mark.slow
def test_sigkill_of_one_dask_worker_is_survived(kb, tmp_path):
    """One of two Dask worker processes is SIGKILLed while it embeds a shard: the scheduler re-runs
    its task elsewhere (or, if the run fails, a rerun finishes it) and the parts equal the reference."""
    from retformer.pipelines import stages_embed as stages
    from retformer.pipelines.dask_runner import dask_client

    out = tmp_path / "embeddings"
    options = {**OPTIONS, "num_workers": 0}
    typed = (Encoders.model_validate(ENCODERS), EmbedSection.model_validate(options))
    args = (kb["shards"], kb["shard_dir"], out, *typed, "embed (fault test)")
    killed = None
    with dask_client(n_workers=2) as client, ThreadPoolExecutor(1) as pool:
        pids = client.run(os.getpid)
        running = pool.submit(stages._embed_shards, client, *args)
        deadline = time.monotonic() + 300
        while killed is None and time.monotonic() < deadline and not running.done():
            if out.is_dir() and list_parts(out):
                busy = [w for w, keys in client.processing().items() if keys and w in pids]
                if busy:
                    killed = pids[busy[0]]
                    os.kill(killed, signal.SIGKILL)
            time.sleep(0.01)
        try:
            summary = running.result(timeout=300)
        except Exception:  # noqa: BLE001 - the contract allows failing here, if a rerun completes
            summary = stages._embed_shards(client, *args)
    assert killed is not None, "no worker was busy once the first part existed"
    assert summary["images"] == N_SHARDS * SHARD_SIZE
    assert_same_parts(out, kb["ref"])


def test_truncated_part_is_named_by_the_index_stage(kb, tmp_path):
    """A part cut in half (as a disk-full or a copy gone wrong would leave it) makes `retformer index`
    exit 1 with one `error:` line that names the file, not a traceback."""
    work = tmp_path / "work"
    out = work / "kb" / "faults_kb" / "embeddings"
    shutil.copytree(kb["ref"], out)
    victim = list_parts(out)[3]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    proc = run_cli("index", "--kb", str(kb["manifest"]), "--workdir", str(work), check=False)
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"corrupt or unreadable Parquet file {victim}" in errors[0]
