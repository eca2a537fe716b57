"""Every stage, run through the real CLI on a small Fashion-MNIST slice, and the artifacts it leaves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retformer.artifacts.embeddings_io import list_parts, read_embeddings
from tests.conftest import needs_fmnist

pytestmark = needs_fmnist


def test_embeddings_parts_follow_the_contract(e2e_workspace: Path):
    """KB parts have the contract's columns and types; vectors are unit-norm fp16; text is null only
    where there is no caption; the stage record counts what it embedded."""
    parts = list_parts(e2e_workspace / "kb" / "tiny_all" / "embeddings")
    assert parts, "no KB parts written"
    schema = pq.read_schema(parts[0])
    assert [f.name for f in schema] == ["uid", "image_emb", "text_emb", "caption", "label", "source"]
    assert str(schema.field("image_emb").type).startswith("fixed_size_binary")
    table = read_embeddings(e2e_workspace / "kb" / "tiny_all" / "embeddings")
    assert table.image_emb.dtype == np.float16
    norms = np.linalg.norm(table.image_emb.astype(np.float32), axis=1)
    assert np.allclose(norms, 1.0, atol=1e-2)
    assert table.has_text.all(), "every KB sample has a caption"
    assert len(set(table.uid.tolist())) == len(table), "uids are unique"
    record = json.loads((e2e_workspace / "kb" / "tiny_all" / "_stages" / "embed.json").read_text())
    assert record["images"] == len(table)
    test_split = read_embeddings(e2e_workspace / "datasets" / "tiny_lt" / "embeddings" / "test")
    assert not test_split.has_text.any(), "downstream test images carry no caption"


def test_index_record_has_recall_at_or_above_target(e2e_workspace: Path):
    """The index stage measured recall against exact search and met its target."""
    record = json.loads((e2e_workspace / "kb" / "tiny_all" / "index" / "index.json").read_text())
    check = record["recall_check"]
    assert check["recall"] >= check["target"] == 0.9


def test_neighbor_tables_follow_the_contract_and_never_return_the_query(e2e_workspace: Path):
    """nn_id/nn_score are fixed-size lists of k, scores descending; no training query retrieves the KB
    row that has its own uid, although the KB contains the whole training split."""
    nn_dir = e2e_workspace / "datasets" / "tiny_lt" / "neighbors" / "tiny_all" / "k8"
    train = pq.read_table(nn_dir / "train.parquet")
    for name, value_type in (("nn_id", pa.int64()), ("nn_score", pa.float32())):
        field_type = train.schema.field(name).type
        assert pa.types.is_fixed_size_list(field_type) and field_type.list_size == 8
        assert field_type.value_type == value_type
    ids = np.stack(train.column("nn_id").to_numpy(zero_copy_only=False))
    scores = np.stack(train.column("nn_score").to_numpy(zero_copy_only=False))
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    store = pq.read_table(nn_dir / "store.parquet", columns=["kb_id", "uid"])
    uid_of = dict(zip(store.column("kb_id").to_pylist(), store.column("uid").to_pylist(), strict=True))
    query_uids = train.column("uid").to_pylist()
    kb_uids = set(read_embeddings(e2e_workspace / "kb" / "tiny_all" / "embeddings").uid.tolist())
    assert set(query_uids) <= kb_uids, "the KB holds every training image (so exclusion matters)"
    for quid, row in zip(query_uids, ids, strict=True):
        assert quid not in {uid_of[i] for i in row}
    record = json.loads((nn_dir / "_neighbors.json").read_text())
    assert record["splits"]["train"]["queries_in_kb_excluded"] == len(query_uids)


def test_train_writes_every_method(e2e_workspace: Path):
    """The train stage evaluated RetFormer and all baselines with top-1 and shot-group accuracies."""
    report = json.loads((e2e_workspace / "runs" / "tiny" / "eval.json").read_text())
    for method in (
        "retformer",
        "retformer_no_text",
        "retformer_no_image",
        "mlp_only",
        "linear_probe",
        "knn_vote",
    ):
        m = report["methods"][method]
        assert 0.0 <= m["top1"] <= 1.0
        assert set(m) >= {"top1", "top5", "many", "medium", "few", "per_class"}
