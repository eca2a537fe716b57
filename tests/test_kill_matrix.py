"""The kill matrix: SIGKILL of the whole `retformer` process group in every stage, while one of its
outputs is half-written; then the same command again, without the kill.

Each case starts from the state an uninterrupted run (the session's `e2e_workspace`, built through
the CLI from `small_manifests`) had before that stage, runs the stage's command in a new session
with the test hook `RETFORMER_KILL_AT` (artifacts/faults.py: the process group SIGKILLs itself right
before the named temporary file is renamed onto its output, so the kill point is exact, not timed),
checks that it died by SIGKILL leaving a temporary file, reruns the command and compares:

- shard tars, their _SUCCESS manifests, dataset.json, faiss shard files, neighbor tables and store:
  byte for byte with the uninterrupted run;
- embeddings parts: the same Arrow data and metadata, except the per-shard stats that record this
  run's own paths and timings;
- index.json: build key, factory, shards, tuned params and recall check;
- train: every method's metrics in eval.json (but its seconds), each model file's weights, each
  metrics.jsonl (but its time_s), the per-sample predictions byte for byte and report.html but for
  the config hash (the kill runs checkpoint every epoch: TRAIN_SET) and the workdir it names, i.e. a
  resumed run ends where an uninterrupted one does;
- and no temporary file (`.tmp-`) anywhere in the workdir.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from retformer.artifacts.atomic import atomic_path
from retformer.artifacts.faults import ENV
from tests.conftest import REPO, needs_fmnist

pytestmark = needs_fmnist

KB, DS, RUN = "tiny_all", "tiny_lt", "tiny"
# What each stage writes (globs under the workdir); a stage's "before" state lacks these and every
# later stage's outputs.
STAGE_OUTPUTS = {
    "shards": ["kb/*/shards", "datasets/*/shards", "datasets/*/dataset.json", "*/*/_stages/shards.json"],
    "embed": ["kb/*/embeddings", "datasets/*/embeddings", "*/*/_stages/embed*.json"],
    "index": ["kb/*/index", "kb/*/_stages/index.json"],
    "neighbors": ["datasets/*/neighbors"],
    "train": ["runs"],
}
STAGES = list(STAGE_OUTPUTS)
# Checkpoints every epoch (the default is at most once a minute): the resume case needs two writes.
TRAIN_SET = ["--set", "experiment.checkpoint.every_s=0"]

# (case id, stage, kill point): each point is the rename of a temporary file onto an output that is
# then half-written (a shard set without its manifest, a KB with part of its parts, an index without
# index.json, a table set without its store, a method between two checkpoints...).
CASES = [
    ("shards-kb-set", "shards", f"rename:*/kb/{KB}/shards/_SUCCESS-world.json"),
    ("shards-dataset-split", "shards", f"rename:*/datasets/{DS}/shards/_SUCCESS-test.json"),
    ("shards-mid-set-tar", "shards", f"rename:*/kb/{KB}/shards/world-00001.tar"),
    ("embed-kb-part", "embed", f"rename:*/kb/{KB}/embeddings/part-downstream-00001.parquet"),
    ("index-shard", "index", f"rename:*/kb/{KB}/index/shard-00001.faissindex"),
    ("index-after-recall-check", "index", f"rename:*/kb/{KB}/index/index.json"),
    ("neighbors-store", "neighbors", f"rename:*/{DS}/neighbors/{KB}/k8.tmp-*/store.parquet"),
    ("train-between-checkpoints", "train", f"rename:*/runs/{RUN}/retformer.ckpt.pt@2"),
    ("train-model-file", "train", f"rename:*/runs/{RUN}/mlp_only.pt"),
]


def _command(stage: str, m: dict[str, Path], work: Path) -> list[str]:
    kb, ds = ["--kb", str(m["kb"])], ["--dataset", str(m["dataset"])]
    args = {
        "shards": ["shards", *kb, *ds],
        "embed": ["embed", *kb, *ds, "--workers", "1"],
        "index": ["index", *kb, "--workers", "1"],
        "neighbors": ["neighbors", *ds, *kb],
        "train": ["train", *ds, *kb, "--experiment", str(m["experiment"]), "--run", RUN, *TRAIN_SET],
    }[stage]
    return [sys.executable, "-m", "retformer.pipelines.cli", *args, "--workdir", str(work)]


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(cmd: list[str], kill_at: str | None = None) -> subprocess.Popen:
    """`cmd` started as its own process group (session), one thread, output captured; with `kill_at`,
    the test hook kills that group there."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(ENV, None)
    if kill_at:
        env[ENV] = kill_at
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        # SIGINT at its default, as in a terminal's foreground job: a suite started as a background job
        # of a non-interactive shell (`nohup make test-all &`) hands its children SIGINT ignored, and
        # the Ctrl+C tests would then test nothing but that
        preexec_fn=_default_sigint,
    )


def _run(cmd: list[str], kill_at: str | None = None) -> subprocess.CompletedProcess:
    """Run `cmd` as its own process group (session); with `kill_at`, the hook kills that group."""
    proc = _start(cmd, kill_at)
    try:
        out, err = proc.communicate(timeout=900)
    finally:
        _reap_group(proc.pid)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _reap_group(pgid: int) -> None:
    """Wait (briefly) until no process of the group is left; kill stragglers, so none outlives the test."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    raise AssertionError(f"processes of group {pgid} were still alive after the command ended")


def _before(ref: Path, stage: str, dest: Path) -> Path:
    """A copy of the uninterrupted workdir as it was before `stage` (its and later outputs removed).
    copytree keeps mtimes: the embed stage's part-to-shard fingerprints stay valid."""
    shutil.copytree(ref, dest)
    for later in STAGES[STAGES.index(stage) :]:
        for pattern in STAGE_OUTPUTS[later]:
            for path in dest.glob(pattern):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    return dest


def _temps(work: Path) -> list[str]:
    return sorted(str(p.relative_to(work)) for p in work.rglob("*") if ".tmp-" in p.name)


def _outputs(work: Path, stage: str) -> dict[str, Path]:
    """The stage's output files by path relative to the workdir (no stage records, no lock files)."""
    found = {}
    for pattern in STAGE_OUTPUTS[stage]:
        for top in work.glob(pattern):
            for path in [top] if top.is_file() else top.rglob("*"):
                rel = str(path.relative_to(work))
                if path.is_file() and "/_stages/" not in f"/{rel}" and not path.name.endswith(".lock"):
                    found[rel] = path
    return found


def _part_content(path: Path) -> tuple:
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"meta"])
    meta.pop("shard_stats", None)  # this run's paths and timings
    rest = {k: v for k, v in table.schema.metadata.items() if k != b"meta"}
    return table.replace_schema_metadata({}), meta, rest


def _index_record(path: Path) -> dict:
    meta = json.loads(path.read_text())
    shard_keys = ("file", "id_lo", "id_hi", "ntotal", "bytes")
    return {
        "key": meta["key"],
        "factory": meta["factory"],
        "shards": [{k: s[k] for k in shard_keys} for s in meta["shards"]],
        "params": meta["params"],
        "recall_check": meta["recall_check"],
    }


def _jsonl(path: Path) -> list[dict]:
    return [
        {k: v for k, v in json.loads(line).items() if k != "time_s"} for line in path.read_text().splitlines()
    ]


def _assert_same(rel: str, got: Path, want: Path) -> None:
    """`got` holds what `want` (the uninterrupted run's file) holds, by the rules of the module doc."""
    name = got.name
    if name == "report.html":
        # The same page but for the config hash, which covers the checkpoint override (TRAIN_SET), and
        # the workdir its header's browse command names (<workdir>/runs/<run>/report.html).
        pages = []
        for path in (got, want):
            config_hash = json.loads((path.parent / "eval.json").read_text())["config_hash"]
            workdir = str(path.resolve().parents[2])
            pages.append(path.read_text().replace(config_hash, "<hash>").replace(workdir, "<workdir>"))
        assert pages[0] == pages[1], f"{rel}: report differs"
    elif name == "eval.json":
        metrics = [
            {
                m: {k: v for k, v in r.items() if k != "seconds"}
                for m, r in json.loads(p.read_text())["methods"].items()
            }
            for p in (got, want)
        ]
        assert metrics[0] == metrics[1], rel
    elif name.endswith(".metrics.jsonl"):
        assert _jsonl(got) == _jsonl(want), rel
    elif name.endswith(".pt"):
        a, b = (torch.load(p, weights_only=True)["model_state"] for p in (got, want))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{rel}: weights differ"
    elif name == "index.json":
        assert _index_record(got) == _index_record(want), rel
    elif "/embeddings/" in f"/{rel}":
        (ta, ma, ra), (tb, mb, rb) = _part_content(got), _part_content(want)
        assert ta.equals(tb) and ma == mb and ra == rb, f"{rel}: embeddings differ"
    elif name.startswith("shard-") and name.endswith(".json"):
        keys = ("shard", "file", "id_lo", "id_hi", "ntotal", "bytes")  # but its build time
        a, b = (json.loads(p.read_text()) for p in (got, want))
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}, rel
    elif name == "_neighbors.json":
        a, b = (json.loads(p.read_text()) for p in (got, want))
        for rec in (a, b):
            for volatile in ("seconds", "finished_at", "versions", "key", "split_keys"):
                rec.pop(volatile, None)
            for split in rec["splits"].values():
                split.pop("search_seconds")
        assert a == b, rel
    else:  # tars, _SUCCESS manifests, dataset.json, faiss files, neighbor tables and store
        assert got.read_bytes() == want.read_bytes(), f"{rel}: bytes differ"


# The fast tier keeps one case (the cheapest: the KB shard set); `make test-all` runs them all.
TIERED_CASES = [
    pytest.param(*c, id=c[0], marks=() if c[0] == "shards-kb-set" else pytest.mark.slow) for c in CASES
]


@pytest.mark.parametrize(("case", "stage", "kill_at"), TIERED_CASES)
def test_killed_stage_reruns_to_the_uninterrupted_result(
    case: str, stage: str, kill_at: str, e2e_workspace: Path, small_manifests, tmp_path: Path
):
    """SIGKILL of the stage's process group while an output is half-written, then a rerun: the
    outputs equal the uninterrupted run's and no temporary file is left (module doc)."""
    work = _before(e2e_workspace, stage, tmp_path / "work")
    cmd = _command(stage, small_manifests, work)
    killed = _run(cmd, kill_at)
    assert killed.returncode == -signal.SIGKILL, f"not killed at {kill_at}:\n{killed.stdout}\n{killed.stderr}"
    assert _temps(work), "the kill left no half-written (temporary) file: the point was not mid-write"
    rerun = _run(cmd)
    assert rerun.returncode == 0, f"rerun failed:\n{rerun.stdout}\n{rerun.stderr}"
    assert _temps(work) == [], "temporary files left after the rerun"
    got, want = _outputs(work, stage), _outputs(e2e_workspace, stage)
    assert sorted(got) == sorted(want)
    for rel in want:
        _assert_same(rel, got[rel], want[rel])


# ----------------------------------------------------------------------- Ctrl+C (issue 17, item 2)
INTERRUPTED = "error: interrupted: `retformer {}` stopped by Ctrl+C (SIGINT)"


def _interrupt(
    cmd: list[str], ready: Callable[[], bool], timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run `cmd` in its own session; once `ready()` holds, send SIGINT to its process group (what a
    terminal's Ctrl+C does) and wait for it to end."""
    proc = _start(cmd)
    try:
        deadline = time.monotonic() + timeout
        while proc.poll() is None and not ready() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the command ended before the interrupt point"
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        _reap_group(proc.pid)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["embed", "train"])
def test_ctrl_c_exits_130_with_one_line_and_the_rerun_resumes(
    stage: str, e2e_workspace: Path, small_manifests, tmp_path: Path
):
    """Ctrl+C (SIGINT to the process group) in the middle of `retformer embed` (after its first part)
    and `retformer train` (after its first epoch). Before: typer's 130 was dropped by main() and both
    exited 0 with no message, so `set -e; retformer embed; retformer index` went on with part of the
    KB. Now: exit status 130 and one line naming the command and saying a rerun resumes; the rerun
    of embed ends with the uninterrupted run's parts."""
    work = _before(e2e_workspace, stage, tmp_path / "work")
    cmd = _command(stage, small_manifests, work)
    if stage == "embed":
        ready = lambda: any((work / "kb" / KB / "embeddings").glob("part-*.parquet"))  # noqa: E731
    else:
        ready = lambda: any(p.stat().st_size for p in (work / "runs" / RUN).glob("*.metrics.jsonl"))  # noqa: E731
    stopped = _interrupt(cmd, ready)
    assert stopped.returncode == 130, f"{stopped.returncode}:\n{stopped.stdout}\n{stopped.stderr}"
    assert "Traceback" not in stopped.stderr, stopped.stderr
    (line,) = [x for x in stopped.stderr.splitlines() if x.startswith("error:")]
    assert line.startswith(INTERRUPTED.format(stage)) and "run the same command again to resume" in line
    if stage == "embed":
        rerun = _run(cmd)
        assert rerun.returncode == 0, f"rerun failed:\n{rerun.stdout}\n{rerun.stderr}"
        got, want = _outputs(work, stage), _outputs(e2e_workspace, stage)
        assert sorted(got) == sorted(want)
        for rel in want:
            _assert_same(rel, got[rel], want[rel])


# ------------------------------------------------------------------- disk full (issue 17, item 11)
class _FillsUp:
    """A file that takes `room` bytes, then refuses every write as a full disk does (ENOSPC)."""

    def __init__(self, fh, room: int) -> None:
        self.fh, self.room = fh, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.fh.close()


@pytest.mark.parametrize("writer", ["checkpoint", "model_file", "atomic_path"])
def test_a_full_disk_under_torch_save_is_an_oserror_naming_the_file(writer, tmp_path, monkeypatch):
    """Issue 17 (11), without a real full disk: torch.save to a path turned ENOSPC into a RuntimeError
    ("unexpected pos ..."; a 123-line traceback at `retformer train`). Now a checkpoint or model file
    whose write the OS refuses is an OSError ENOSPC naming the file (the CLI's one `error:` line), and
    no temporary file is left; so is any atomic write's OSError that named no file."""
    from retformer.trainer import checkpoint

    real_open = open
    monkeypatch.setattr(checkpoint, "open", lambda p, mode: _FillsUp(real_open(p, mode), 1000), raising=False)
    model = torch.nn.Linear(100, 100)
    path = tmp_path / ("m.ckpt.pt" if writer == "checkpoint" else "m.pt")
    with pytest.raises(OSError) as err:
        if writer == "checkpoint":
            checkpoint.save_checkpoint(path, model, None, None, 1, None)
        elif writer == "model_file":
            checkpoint.save_model(path, model, {"kb": "x"})
        else:  # any other atomic write (eval.json, a report) that the OS refuses without a file name
            with atomic_path(path) as tmp:
                tmp.write_bytes(b"x")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(path), err.value
    assert list(tmp_path.iterdir()) == []


def _mount_tmpfs(where: Path, size_kb: int) -> bool:
    where.mkdir(parents=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(where)], capture_output=True
    )
    return proc.returncode == 0


@pytest.mark.slow
def test_disk_full_during_train_is_one_line_naming_the_file(e2e_workspace: Path, small_manifests, tmp_path):
    """Issue 17 (11) on a real full disk: `retformer train` on a workdir on a tmpfs with about 1 MiB
    free after the stages before train (a model file is ~6 MB). Before: torch.save's 155-line "unexpected
    pos" traceback. Now: exit 1 and one `error:` line, "No space left on device" and the file's path,
    and no temporary file left. Needs root (mount); skipped otherwise."""
    ref = _before(e2e_workspace, "train", tmp_path / "ref")
    used_kb = sum(p.stat().st_size for p in ref.rglob("*") if p.is_file()) // 1024
    full = tmp_path / "full"
    if not _mount_tmpfs(full, used_kb + 1024):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        work = full / "work"
        shutil.copytree(ref, work)
        proc = _run(_command("train", small_manifests, work))
        assert proc.returncode == 1, f"{proc.returncode}:\n{proc.stderr}"
        assert "Traceback" not in proc.stderr, proc.stderr
        (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
        assert "No space left on device" in line and str(work / "runs" / RUN) in line, line
        assert _temps(work) == []
    finally:
        subprocess.run(["umount", str(full)], check=False)
