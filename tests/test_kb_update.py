"""Issue 19: new knowledge without retraining.

- `retformer evaluate RUN --kb OTHER` (and `predict --kb`, `Run.predict(kb=...)`) on the small e2e run:
  the results equal fresh neighbours + an evaluation computed by hand on the same tables, the run's own
  KB reproduces eval.json, the original results are untouched, a KB with other encoders is one line;
- a KB grown in place (new shards in its source): `retformer index` adds them to the index, the tables
  computed before are stale and `evaluate --kb` recomputes them;
- the index growth itself: a grown Flat index returns what a rebuilt one returns, a kind that no longer
  fits or moved ids rebuild (index.json says why), and a kill during the add + rerun gives the same index.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from retformer.artifacts.faults import ENV
from retformer.artifacts.workspace import Workspace, write_stage_record
from tests.conftest import REPO, needs_fmnist, write_manifest
from tests.helpers import run_cli, synthetic_clustered_vectors, write_parts

RUN, DS, KB = "tiny", "tiny_lt", "tiny_all"


# --------------------------------------------------------------------------------- index growth
def _index(tmp: Path, name: str, parts: list[Path], kind: str = "flat") -> dict:
    from retformer.kb_builder.index import run_index
    from retformer.kb_builder.kb_schema import IndexSection

    cfg = IndexSection(kind=kind, k=10, recall_target=0.9, num_queries=200)
    return run_index(parts[0].parent, tmp / name, cfg, parts=parts)


def _parts(tmp: Path, sizes: list[int], d: int = 32) -> list[Path]:
    x = synthetic_clustered_vectors(sum(sizes), d, seed=3)
    return write_parts(tmp / "emb", x, sizes)


def test_grown_flat_index_returns_what_a_rebuilt_one_returns(tmp_path: Path):
    """Parts appended after the indexed ones are added as one more shard (not rebuilt): index.json
    records the growth and a fresh recall check, a rerun skips, and the neighbours (ids and scores)
    equal those of an exact index built from scratch over all parts."""
    from retformer.kb_builder.index.search import ShardedIndex

    parts = _parts(tmp_path, [1500, 1500, 1500, 600])
    _index(tmp_path, "grown", parts[:3])
    rec = _index(tmp_path, "grown", parts)
    assert rec["grown"]["from_n"] == 4500 and rec["grown"]["to_n"] == 5100 and rec["num_shards"] == 2
    meta = json.loads((tmp_path / "grown" / "index.json").read_text())
    assert meta["n"] == 5100 and len(meta["grown"]) == 1 and meta["recall_check"]["recall"] == 1.0
    assert meta["recall_check"]["fresh_queries"] > 0
    assert _index(tmp_path, "grown", parts)["reused"] is True
    _index(tmp_path, "rebuilt", parts)
    grown, rebuilt = ShardedIndex.load(tmp_path / "grown"), ShardedIndex.load(tmp_path / "rebuilt")
    q = np.concatenate([read_vectors(parts[0])[:300], read_vectors(parts[3])[:300]])
    own = np.concatenate([np.arange(300), 4500 + np.arange(300)])
    s1, i1 = grown.search(q, 10, exclude_ids=own)
    s2, i2 = rebuilt.search(q, 10, exclude_ids=own)
    assert np.array_equal(i1, i2) and np.allclose(s1, s2, rtol=0, atol=1e-6)  # BLAS rounding at most
    assert (i1 >= 4500).any(), "no query found a new row: the test would prove nothing"


def read_vectors(part: Path) -> np.ndarray:
    from retformer.artifacts.embeddings_io import read_image_vectors

    return np.asarray(read_image_vectors(part)[1], dtype=np.float32)


def test_growth_that_does_not_fit_rebuilds_and_says_why(tmp_path: Path):
    """A new part that sorts before an indexed one would move kb_ids, and another index kind no longer
    fits: both rebuild, and index.json's `rebuilt` says why."""
    parts = _parts(tmp_path, [1000, 1000, 500])
    _index(tmp_path, "a", parts[1:])  # part-00001, part-00002; then part-00000 sorts before them
    rec = _index(tmp_path, "a", parts)
    assert "grown" not in rec and "ids of indexed rows would move" in rec["rebuilt"]["reason"]
    assert "would move" in json.loads((tmp_path / "a" / "index.json").read_text())["rebuilt"]["reason"]
    _index(tmp_path, "b", parts[:2])
    rec = _index(tmp_path, "b", parts, kind="hnsw")
    assert "kind no longer fits" in rec["rebuilt"]["reason"] and rec["factory"].startswith("IDMap,HNSW")


GROW_SCRIPT = """
import sys
from pathlib import Path
from retformer.artifacts.embeddings_io import list_parts
from retformer.kb_builder.index import run_index
from retformer.kb_builder.kb_schema import IndexSection
emb, out = Path(sys.argv[1]), Path(sys.argv[2])
parts = list_parts(emb)
cfg = IndexSection(kind="flat", k=10, recall_target=0.9, num_queries=200)
run_index(emb, out, cfg, parts=parts[: int(sys.argv[3])])
"""


def _grow(emb: Path, out: Path, nparts: int, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop(ENV, None)
    if kill_at:
        env[ENV] = kill_at
    cmd = [sys.executable, "-c", GROW_SCRIPT, str(emb), str(out), str(nparts)]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, start_new_session=True)


def _index_state(index_dir: Path) -> dict:
    meta = json.loads((index_dir / "index.json").read_text())
    shards = [
        {k: s[k] for k in ("file", "id_lo", "id_hi", "ntotal", "bytes", "sha256")} for s in meta["shards"]
    ]
    grown = [
        {k: g[k] for k in ("from_n", "to_n", "added", "shard", "recall", "params")} for g in meta["grown"]
    ]
    files = sorted(p.name for p in index_dir.iterdir() if not p.name.endswith(".lock"))
    return {
        "key": meta["key"],
        "shards": shards,
        "grown": grown,
        "params": meta["params"],
        "recall_check": meta["recall_check"],
        "files": files,
        "bytes": {f: (index_dir / f).read_bytes() for f in files if f.endswith((".faissindex", ".npz"))},
    }


@pytest.mark.parametrize(
    "point", ["shard-00001.faissindex", pytest.param("index.json", marks=pytest.mark.slow)]
)
def test_kill_during_growth_then_rerun_gives_the_same_index(tmp_path: Path, point: str):
    """SIGKILL while the grown index is half-written (its new shard, or index.json after the recall
    check), then the same command: the index equals an uninterrupted growth's, no temporary file left."""
    parts = _parts(tmp_path, [1500, 1500, 600])
    emb = parts[0].parent
    for name in ("ref", "killed"):
        assert _grow(emb, tmp_path / name, 2).returncode == 0
    assert _grow(emb, tmp_path / "ref", 3).returncode == 0
    killed = _grow(emb, tmp_path / "killed", 3, kill_at=f"rename:*/killed/{point}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert any(".tmp-" in p.name for p in (tmp_path / "killed").iterdir())
    assert json.loads((tmp_path / "killed" / "index.json").read_text())["n"] == 3000  # the old index
    rerun = _grow(emb, tmp_path / "killed", 3)
    assert rerun.returncode == 0, rerun.stderr
    assert not any(".tmp-" in p.name for p in (tmp_path / "killed").iterdir())
    assert _index_state(tmp_path / "killed") == _index_state(tmp_path / "ref")


# ------------------------------------------------------------------------- evaluate / predict --kb
def _other_kb(work: Path, manifests: dict, tmp: Path, shards: list[str], name: str = "tiny_other") -> Path:
    """A KB of some of the run KB's shards (webdataset source: more shards can join it later), embedded
    by copying the run KB's parts (same encoders), indexed (Flat)."""
    from retformer.pipelines import stages

    src = tmp / f"{name}_src"
    src.mkdir(exist_ok=True)
    emb = Workspace(work).kb_embeddings(name)
    emb.mkdir(parents=True, exist_ok=True)
    for shard in shards:
        shutil.copy2(work / "kb" / KB / "shards" / f"{shard}.tar", src / f"{shard}.tar")
        shutil.copy2(work / "kb" / KB / "embeddings" / f"part-{shard}.parquet", emb / f"part-{shard}.parquet")
    run_kb = stages.load_kb(str(manifests["kb"]), None)
    path = write_manifest(
        tmp / f"{name}.yaml",
        {
            "name": name,
            "source": {"kind": "webdataset", "path": str(src)},
            "encoders": run_kb.as_loaded()["encoders"],
            "embed": run_kb.as_loaded()["embed"],
            "index": {"kind": "flat", "recall_target": 0.9, "k": 8},
        },
    )
    kb = stages.load_kb(str(path), None)
    ws = Workspace(work)
    stages.stage_embed_kb(ws, kb, None)  # every part is there: it only records the encoders
    stages.stage_index(ws, kb, in_process=True)
    return path


def _by_hand(work: Path, other: str, model_file: str, k_table: int) -> dict:
    """Fresh neighbours of the test split against `other`'s index (a table set of its own), then the
    run's model on them, evaluated as the run evaluates: the figures `evaluate --kb` must give."""
    from retformer.kb_builder.neighbors import run_neighbors
    from retformer.trainer.checkpoint import load_saved_model
    from retformer.trainer.evaluate import evaluate
    from retformer.trainer.features import load_retrieval_features
    from retformer.trainer.train import predict

    ws = Workspace(work)
    run_neighbors(
        ws.kb_index(other),
        ws.kb_embeddings(other),
        {"test": ws.dataset_embeddings(DS, "test")},
        ws.neighbors_dir(DS, "by_hand", k_table),
        k_table,
    )
    saved = load_saved_model(work / "runs" / RUN / model_file)
    f = load_retrieval_features(ws, DS, "by_hand", k_table, "test").subset_k(int(saved.info["k"]))
    info = json.loads(ws.dataset_info(DS).read_text())
    with torch.inference_mode():
        return evaluate(predict(saved.model, f), f.labels, info["shot_split"])


FIGURES = ("top1", "top5", "many", "medium", "few")


@needs_fmnist
@pytest.mark.slow
def test_evaluate_and_predict_with_another_kb(e2e_workspace: Path, small_manifests, tmp_path: Path):
    """`evaluate RUN --kb OTHER` = fresh neighbours + evaluation by hand; eval.json untouched; the run's
    own KB reproduces eval.json; `predict --kb` / `Run.predict(kb=)` classify as that evaluation did;
    a KB grown in place is added to its index, its old tables are stale and recomputed."""
    from retformer import load_run, read_embeddings

    work = tmp_path / "work"
    shutil.copytree(e2e_workspace, work)
    run_dir = work / "runs" / RUN
    before = (run_dir / "eval.json").read_bytes()
    original = json.loads(before)
    k_table = original["neighbor_table_k"]
    path = _other_kb(work, small_manifests, tmp_path, ["world-00000", "world-00001"])

    out = run_cli("evaluate", RUN, "--kb", str(path), "--workdir", str(work))
    assert "trained with tiny_all, evaluated with tiny_other" in out.stdout
    assert (run_dir / "eval.json").read_bytes() == before  # the run's own results untouched
    got = json.loads((run_dir / "eval.tiny_other.json").read_text())
    assert got["trained_kb"] == KB and got["evaluated_kb"] == "tiny_other" and got["kb_index"]["n"] == 200
    tables = work / "datasets" / DS / "neighbors" / "tiny_other" / f"k{k_table}"
    assert sorted(json.loads((tables / "_neighbors.json").read_text())["splits"]) == [
        "test"
    ]  # that split only
    for model in ("retformer", "mlp_only", "retformer_no_text"):
        hand = _by_hand(work, "tiny_other", f"{model}.pt", k_table)
        assert {m: got["methods"][model][m] for m in FIGURES} == {m: hand[m] for m in FIGURES}, model
    hand_table = work / "datasets" / DS / "neighbors" / "by_hand" / f"k{k_table}" / "test.parquet"
    assert pq.read_table(tables / "test.parquet").equals(pq.read_table(hand_table))
    assert "trained with tiny_all, evaluated with tiny_other" in (
        run_dir / "report.html"
    ).read_text().replace("Trained", "trained")

    # The run's own KB through the same path gives the run's own figures.
    run_cli("evaluate", RUN, "--kb", str(small_manifests["kb"]), "--workdir", str(work))
    own = json.loads((run_dir / f"eval.{KB}.json").read_text())
    for name, row in original["methods"].items():
        if "top1" in row:
            assert {m: own["methods"][name][m] for m in FIGURES} == {m: row[m] for m in FIGURES}, name

    # predict --kb and Run.predict(kb=) classify the test images as `evaluate --kb` did.
    preds = pq.read_table(run_dir / got["methods"]["retformer"]["predictions"]).to_pandas()
    run = load_run(RUN, workdir=work)
    test = read_embeddings(work / "datasets" / DS / "embeddings" / "test")
    via_api = run.predict(embeddings=test, kb="tiny_other")
    want = dict(zip(preds["uid"], preds["pred"], strict=True))
    assert [want[u] for u in via_api["uid"]] == via_api["class_index"].tolist()
    shard = sorted((work / "datasets" / DS / "shards").glob("test-*.tar"))[0]
    cli = run_cli("predict", RUN, str(shard), "--kb", "tiny_other", "--workdir", str(work))
    lines = [json.loads(line) for line in cli.stdout.splitlines()]
    assert lines and all(rec["class_index"] == want[rec["uid"]] for rec in lines)

    # Grow tiny_other in place: a new shard joins its source; embed (here: its part copied) and index.
    from retformer.pipelines import stages

    shutil.copy2(
        work / "kb" / KB / "shards" / "world-00002.tar", tmp_path / "tiny_other_src" / "world-00002.tar"
    )
    shutil.copy2(
        work / "kb" / KB / "embeddings" / "part-world-00002.parquet",
        work / "kb" / "tiny_other" / "embeddings" / "part-world-00002.parquet",
    )
    kb = stages.load_kb(str(path), None)
    stages.stage_embed_kb(Workspace(work), kb, None)
    rec = stages.stage_index(Workspace(work), kb, in_process=True)
    assert rec["grown"]["from_n"] == 200 and rec["grown"]["to_n"] == 300
    from retformer.kb_builder.neighbors import stale_reason

    assert "200 to 300 rows" in stale_reason(tables, work / "kb" / "tiny_other" / "index")
    run_cli("evaluate", RUN, "--kb", str(path), "--workdir", str(work))
    grown = json.loads((run_dir / "eval.tiny_other.json").read_text())
    assert grown["kb_index"]["n"] == 300 and grown["neighbor_tables"]["reused"] is False
    assert stale_reason(tables, work / "kb" / "tiny_other" / "index") is None
    hand = _by_hand(work, "tiny_other", "retformer.pt", k_table)
    assert {m: grown["methods"]["retformer"][m] for m in FIGURES} == {m: hand[m] for m in FIGURES}


def _foreign_kb(work: Path, small_manifests, tmp_path: Path) -> Path:
    """A KB whose embed record names other encoders (EfficientNet-Lite0 at 96 px, the run's at 32)."""
    from retformer.pipelines import stages

    run_kb = stages.load_kb(str(small_manifests["kb"]), None)
    foreign = {"image": {"name": "efficientnet_lite0", "image_size": 96}, "text": {"name": "minilm"}}
    path = write_manifest(
        tmp_path / "tiny_foreign.yaml",
        {
            "name": "tiny_foreign",
            "source": {"kind": "webdataset", "path": str(work / "kb" / KB / "shards")},
            "encoders": foreign,
            "embed": run_kb.as_loaded()["embed"],
        },
    )
    ws = Workspace(work)
    write_stage_record(ws.kb_stage_record("tiny_foreign", "embed"), "embed", {"encoders": foreign})
    return path


def _one_line_naming_both(message: str) -> None:
    assert "\n" not in message and message.startswith("KB tiny_foreign was embedded with"), message
    assert "image=efficientnet_lite0(image_size=96)" in message and f"run {RUN} was trained with" in message


@needs_fmnist
def test_kb_with_other_encoders_is_refused(e2e_workspace: Path, small_manifests, tmp_path: Path):
    """evaluate --kb and predict --kb (Predictor, Run.predict) with a KB embedded by other encoders: one
    line naming both the KB's encoders and the run's, before any work."""
    from retformer import load_run
    from retformer.artifacts.errors import UserError
    from retformer.pipelines.evaluate_kb import stage_evaluate_kb

    work = tmp_path / "work"
    shutil.copytree(e2e_workspace, work)
    path = _foreign_kb(work, small_manifests, tmp_path)
    with pytest.raises(UserError) as exc:
        stage_evaluate_kb(Workspace(work), RUN, str(path))
    _one_line_naming_both(str(exc.value))
    run = load_run(RUN, workdir=work, device="cpu")
    with pytest.raises(UserError) as exc:
        run.predict(embeddings=np.zeros((1, 4), dtype=np.float16), kb="tiny_foreign")
    _one_line_naming_both(str(exc.value))
    assert not (work / "runs" / RUN / "eval.tiny_foreign.json").exists()


@needs_fmnist
@pytest.mark.slow
def test_kb_with_other_encoders_is_one_error_line(e2e_workspace: Path, small_manifests, tmp_path: Path):
    """The same through the CLI: one `error:` line, exit status 1, nothing written into the run."""
    work = tmp_path / "work"
    shutil.copytree(e2e_workspace, work)
    path = _foreign_kb(work, small_manifests, tmp_path)
    files = sorted(p.name for p in (work / "runs" / RUN).iterdir())
    for args in (("evaluate", RUN, "--kb", str(path)), ("predict", RUN, str(work), "--kb", "tiny_foreign")):
        res = run_cli(*args, "--workdir", str(work), check=False)
        assert res.returncode == 1, res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        _one_line_naming_both(lines[0][len("error: ") :])
    assert sorted(p.name for p in (work / "runs" / RUN).iterdir()) == files
