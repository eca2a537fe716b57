"""A dataset with a val split, through the real CLI: shards, embed, index, neighbors (issue 9 item 1)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from retformer.artifacts.embeddings_io import list_parts, read_part_arrow
from tests.conftest import SMALL_ENCODERS, write_manifest
from tests.helpers import run_cli


@pytest.mark.slow
def test_val_split_gets_shards_embeddings_and_neighbor_tables(tmp_path: Path):
    """A digits_lt slice (val 5/class, test 5/class) and a 200-image world KB from its pool: every stage
    handles val like train and test (its own shards, embeddings and neighbor table, one row per val
    image, no val image in the KB), and dataset.json records how val was made."""
    ds = write_manifest(
        tmp_path / "m" / "tiny_digits.yaml",
        {
            "name": "tiny_digits",
            "kind": "sklearn_digits_lt",
            "n_max": 20,
            "imbalance_ratio": 10,
            "test_per_class": 5,
            "val_per_class": 5,
            "shard_size": 64,
            "shot_thresholds": {"many": 10, "few": 4},
            "neighbors": {"k": 4},
        },
    )
    kb = write_manifest(
        tmp_path / "m" / "tiny_digits_world.yaml",
        {
            "name": "tiny_digits_world",
            "source": {"kind": "world", "dataset": str(ds), "size": 200, "seed": 0},
            "shard_size": 100,
            "encoders": SMALL_ENCODERS,
            "embed": {"batch_size": 64},
            "index": {"kind": "auto", "recall_target": 0.9, "memory_budget_gb": 1, "num_shards": 1, "k": 4},
        },
    )
    ws = tmp_path / "work"
    common = ["--workdir", str(ws)]
    run_cli("shards", "--kb", str(kb), "--dataset", str(ds), *common)
    run_cli("embed", "--kb", str(kb), "--dataset", str(ds), "--workers", "1", *common)
    run_cli("index", "--kb", str(kb), *common)
    run_cli("neighbors", "--dataset", str(ds), "--kb", str(kb), *common)

    root = ws / "datasets" / "tiny_digits"
    info = json.loads((root / "dataset.json").read_text())
    assert info["split_sizes"]["val"] == 50 and info["split_sizes"]["test"] == 50
    assert "per class" in info["split_notes"]["val"] and info["world_pool_size"] > 200
    assert sorted(p.name.split("-")[0] for p in (root / "shards").glob("*.tar")).count("val") == 1
    val_uids = [
        u
        for p in list_parts(root / "embeddings" / "val")
        for u in read_part_arrow(p, ["uid"])["uid"].to_pylist()
    ]
    assert len(val_uids) == 50

    tables = root / "neighbors" / "tiny_digits_world" / "k4"
    assert {p.stem for p in tables.glob("*.parquet")} == {"train", "val", "test", "store"}
    val = pq.read_table(tables / "val.parquet")
    assert val.num_rows == 50 and set(val.column("uid").to_pylist()) == set(val_uids)
    record = json.loads((tables / "_neighbors.json").read_text())
    assert record["splits"]["val"]["queries"] == 50
    assert record["splits"]["val"]["queries_in_kb_excluded"] == 0  # val is outside the world pool
