"""The in-process workspace the tests share (conftest's `e2e_workspace`) is the CLI's workspace: every
stage run through the real `retformer` entry point (a subprocess each, Dask workers for embed and the
sharded index) leaves the same bytes. This is also the fast tier's one real CLI run of every stage."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from tests.conftest import needs_fmnist
from tests.workspace_build import RUN, build_with_cli

pytestmark = needs_fmnist

# Records of a run, not results: timings, rates, memory, dates, thread counts, and the record keys
# (they hash the absolute paths of their inputs) and byte counts of files whose metadata holds paths.
# Each record is compared below without these instead of byte for byte.
VOLATILE_KEYS = {"key", "created", "threads", "memory", "task_timings", "timings", "table_bytes", "bytes"}
VOLATILE_KEYS |= {"shard_fingerprint"}  # a shard's size and mtime: when it was written, not what it holds
VOLATILE_SUFFIXES = ("_s", "_at", "qps", "seconds", "_bytes")


KEY_IN_TEXT = re.compile(r"\b[0-9a-f]{16}\b")
STAMPS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}")
# A file named by its record key (which hashes absolute paths): compared under the key's placeholder.
KEYED_NAME = re.compile(r"-[0-9a-f]{16}(\.\w+)$")


def _files(root: Path) -> dict[str, Path]:
    return {
        KEYED_NAME.sub(r"-<key>\1", str(p.relative_to(root))): p
        for p in root.rglob("*")
        if p.is_file() and not p.name.endswith(".lock") and ".tmp-" not in p.name
    }


def _strip(value, root: str):
    """A record with its volatile keys dropped and the workspace root replaced by a placeholder."""
    if isinstance(value, dict):
        return {
            k: _strip(v, root)
            for k, v in value.items()
            if k not in VOLATILE_KEYS and not k.endswith(VOLATILE_SUFFIXES)
        }
    if isinstance(value, list):
        return [_strip(v, root) for v in value]
    if isinstance(value, str):  # paths, dates and record keys inside strings too
        return STAMPS.sub("<time>", KEY_IN_TEXT.sub("<key>", value.replace(root, "<ws>")))
    return value


def _records(path: Path, root: Path) -> list:
    """A .json file's record, or a .jsonl file's records, without their volatile parts."""
    text = path.read_text()
    lines = text.splitlines() if path.suffix == ".jsonl" else [text]
    return [_strip(json.loads(line), str(root)) for line in lines]


# Builds a second workspace through the real CLI (~40 s on 2 cores): the slow tier (make test-all).
@pytest.mark.slow
def test_in_process_workspace_is_byte_equal_to_the_cli_built_one(
    e2e_workspace: Path, small_manifests, tmp_path
):
    """Shards, embeddings parts, faiss shards and neighbour tables are equal byte for byte; the run's
    model files hold equal tensors; every JSON record is equal once timings and paths are set aside."""
    cli_ws = build_with_cli(tmp_path / "cli", small_manifests)
    mine, theirs = _files(e2e_workspace), _files(cli_ws)
    # Other slow tests add their own runs to the shared workspace (test_predict's fine-tune run "ft"):
    # only the runs this build made are compared.
    mine = {r: p for r, p in mine.items() if not r.startswith("runs/") or r.startswith(f"runs/{RUN}/")}
    assert sorted(mine) == sorted(theirs)
    # report.html is left out: its curves label steps by how long an epoch took
    binary = [r for r in mine if not r.endswith((".json", ".jsonl", ".parquet", ".pt", ".html"))]
    assert any(r.endswith(".tar") for r in binary) and any("index/" in r for r in binary)
    for rel in binary:
        assert mine[rel].read_bytes() == theirs[rel].read_bytes(), rel
    tables = [r for r in mine if r.endswith(".parquet")]
    assert any("embeddings/" in r for r in tables) and any("neighbors/" in r for r in tables)
    for rel in tables:  # the data byte for byte; the key-value metadata holds the part's paths and timings
        a, b = pq.read_table(mine[rel]), pq.read_table(theirs[rel])
        assert a.replace_schema_metadata(None).equals(b.replace_schema_metadata(None)), rel
        meta_a, meta_b = a.schema.metadata or {}, b.schema.metadata or {}
        assert meta_a.keys() == meta_b.keys(), rel
        for key in meta_a:
            va, vb = meta_a[key].decode(), meta_b[key].decode()
            if va.startswith("{"):
                va = _strip(json.loads(va), str(e2e_workspace))
                vb = _strip(json.loads(vb), str(cli_ws))
            assert va == vb, f"{rel}: metadata {key!r}"
    models = [r for r in mine if r.endswith(".pt")]
    assert any(r == f"runs/{RUN}/retformer.pt" for r in models)
    for rel in models:
        a = torch.load(mine[rel], map_location="cpu", weights_only=False)
        b = torch.load(theirs[rel], map_location="cpu", weights_only=False)
        sa, sb = a["model_state"], b["model_state"]
        assert a["model_config"] == b["model_config"], rel
        assert _strip(a["info"], str(e2e_workspace)) == _strip(b["info"], str(cli_ws)), rel
        tensors = {k: v for k, v in sa.items() if isinstance(v, torch.Tensor)}
        assert tensors and tensors.keys() == {k for k, v in sb.items() if isinstance(v, torch.Tensor)}, rel
        for key, tensor in tensors.items():
            assert torch.equal(tensor, sb[key]), f"{rel}: {key}"
    for rel in (r for r in mine if r.endswith((".json", ".jsonl"))):
        assert _records(mine[rel], e2e_workspace) == _records(theirs[rel], cli_ws), rel
