"""Trainer, schedule, losses, checkpoint/resume, metrics, k-NN baseline and the Parquet feature loader."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from retformer.artifacts.embeddings_io import EmbeddingTable, table_to_arrow, write_embeddings_part
from retformer.artifacts.errors import UserError
from retformer.artifacts.workspace import Workspace
from retformer.trainer.baselines import knn_vote
from retformer.trainer.checkpoint import load_model
from retformer.trainer.config import FusionOptions
from retformer.trainer.evaluate import evaluate, shot_split_from_counts
from retformer.trainer.features import RetrievalFeatures, load_retrieval_features
from retformer.trainer.model_factory import build_model
from retformer.trainer.train import (
    TrainConfig,
    WarmupCosine,
    fit,
    logit_adjustment,
    make_optimizer,
    make_scheduler,
    predict,
)

torch.set_num_threads(1)


def make_features(n: int = 64, k: int = 4, m: int = 50, di: int = 32, dt: int = 8, c: int = 4, seed: int = 0):
    """Random unit-norm embeddings, random labels, random neighbor rows (synthetic: trainer logic only)."""
    g = torch.Generator().manual_seed(seed)

    def unit(*shape: int) -> torch.Tensor:
        x = torch.randn(*shape, generator=g)
        return x / x.norm(dim=-1, keepdim=True)

    return RetrievalFeatures(
        query_img=unit(n, di),
        labels=torch.randint(0, c, (n,), generator=g),
        uids=[f"q{i}" for i in range(n)],
        nn_rows=torch.randint(0, m, (n, k), generator=g),
        nn_score=torch.sort(torch.rand(n, k, generator=g), dim=1, descending=True).values,
        store_img=unit(m, di).half(),
        store_txt=unit(m, dt).half(),
        store_has_text=torch.ones(m, dtype=torch.bool),
        store_label=torch.randint(-1, c, (m,), generator=g),
    )


def tiny_model(feats: RetrievalFeatures, kind: str = "retformer", c: int = 4, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    extra = {"width": 32, "depth": 2, "heads": 4, **kw} if kind not in ("linear_probe", "mlp_only") else kw
    return build_model(kind, c, feats.img_dim, feats.txt_dim, feats.k, FusionOptions(**extra))


# ---------------------------------------------------------------- features


def test_batch_gathers_store_rows_and_subset_k() -> None:
    """batch() gathers each query's neighbor vectors from the store by row (float32), and subset_k
    keeps the first k neighbors while sharing the store."""
    f = make_features(n=10, k=4, m=7)
    b = f.batch([3, 5])
    assert b["z"].shape == (2, 32) and b["nn_img"].shape == (2, 4, 32) and b["nn_txt"].shape == (2, 4, 8)
    assert b["nn_img"].dtype == torch.float32
    assert torch.equal(b["nn_img"][1, 2], f.store_img[f.nn_rows[5, 2]].float())
    assert torch.equal(b["nn_label"][0], f.store_label[f.nn_rows[3]])
    assert torch.equal(b["y"], f.labels[[3, 5]])
    f2 = f.subset_k(2)
    assert f2.k == 2 and f2.store_img is f.store_img
    assert torch.equal(f2.batch([5])["nn_img"][0], b["nn_img"][1, :2])
    assert set(f.batch([1], neighbors=False)) == {"z", "y"}
    with pytest.raises(ValueError):
        f.subset_k(5)


def _write_dataset(root: Path, n: int = 6, m_kb: int = 20, k: int = 3, di: int = 8, dt: int = 4) -> dict:
    """A tiny dataset dir in the contract's layout: embeddings/train, neighbors/kbx/k3/{train,store}."""
    rng = np.random.default_rng(0)
    q = EmbeddingTable(
        uid=np.array([f"q{i}" for i in range(n)], dtype=object),
        image_emb=rng.standard_normal((n, di)).astype(np.float16),
        text_emb=np.zeros((n, dt), np.float16),
        has_text=np.zeros(n, bool),
        caption=[None] * n,
        label=np.arange(n, dtype=np.int32) % 3,
        source=["test"] * n,
    )
    write_embeddings_part(root / "embeddings" / "train" / "part-00000.parquet", q)
    nn_id = rng.choice(np.arange(100, 100 + m_kb), size=(n, k))
    used = np.unique(nn_id)
    store = EmbeddingTable(
        uid=np.array([f"kb{i}" for i in used], dtype=object),
        image_emb=rng.standard_normal((len(used), di)).astype(np.float16),
        text_emb=rng.standard_normal((len(used), dt)).astype(np.float16),
        has_text=np.ones(len(used), bool),
        caption=["a caption"] * len(used),
        label=(used % 3).astype(np.int32),
        source=["kb"] * len(used),
    )
    arrow = table_to_arrow(store)
    arrow = arrow.add_column(0, "kb_id", pa.array(used, pa.int64())).replace_schema_metadata(
        arrow.schema.metadata
    )
    nn_dir = root / "neighbors" / "kbx" / f"k{k}"
    nn_dir.mkdir(parents=True)
    pq.write_table(arrow, nn_dir / "store.parquet")
    order = rng.permutation(n)  # neighbor rows in another order than the queries: join by uid
    table = pa.table(
        {
            "uid": pa.array([f"q{i}" for i in order]),
            "nn_id": pa.FixedSizeListArray.from_arrays(pa.array(nn_id[order].ravel(), pa.int64()), k),
            "nn_score": pa.FixedSizeListArray.from_arrays(pa.array(np.full(n * k, 0.5, np.float32)), k),
        }
    )
    pq.write_table(table, nn_dir / "train.parquet")
    return {"q": q, "store": store, "used": used, "nn_id": nn_id, "nn_dir": nn_dir, "table": table}


def test_load_retrieval_features_joins_by_uid_and_maps_kb_ids(tmp_path: Path) -> None:
    """The loader joins neighbor rows to queries by uid (any order) and maps every nn_id to the store
    row holding that kb_id: the gathered vectors are the store's vectors of exactly those KB rows."""
    d = _write_dataset(Workspace(tmp_path).dataset_dir("d"))
    f = load_retrieval_features(Workspace(tmp_path), "d", "kbx", 3, "train")
    assert len(f) == 6 and f.k == 3 and f.img_dim == 8 and f.txt_dim == 4
    assert f.uids == [f"q{i}" for i in range(6)]
    assert torch.equal(f.labels, torch.tensor([0, 1, 2, 0, 1, 2]))
    for i in range(6):
        rows = np.searchsorted(d["used"], d["nn_id"][i])
        assert torch.equal(f.nn_rows[i], torch.as_tensor(rows))
        np.testing.assert_array_equal(
            f.batch([i])["nn_img"][0].numpy(), d["store"].image_emb[rows].astype(np.float32)
        )
    assert torch.equal(f.store_label, torch.as_tensor(d["used"] % 3))


def test_load_retrieval_features_errors_name_the_file(tmp_path: Path) -> None:
    """A query without a neighbor row, or a neighbor id absent from the store, is a UserError
    naming the file."""
    d = _write_dataset(Workspace(tmp_path).dataset_dir("d"))
    pq.write_table(d["table"].slice(1), d["nn_dir"] / "train.parquet")
    with pytest.raises(UserError, match="train.parquet.*no neighbour row"):
        load_retrieval_features(Workspace(tmp_path), "d", "kbx", 3, "train")
    bad = d["table"].set_column(
        1, "nn_id", pa.FixedSizeListArray.from_arrays(pa.array(np.full(6 * 3, 99999), pa.int64()), 3)
    )
    pq.write_table(bad, d["nn_dir"] / "train.parquet")
    with pytest.raises(UserError, match="store.parquet: kb_id 99999"):
        load_retrieval_features(Workspace(tmp_path), "d", "kbx", 3, "train")
    with pytest.raises(UserError, match="k7"):
        load_retrieval_features(Workspace(tmp_path), "d", "kbx", 7, "train")


# ---------------------------------------------------------------- training


def test_retformer_overfits_tiny_random_set() -> None:
    """RetFormer + trainer can memorise 64 random embeddings with random labels (train acc >= 0.95)."""
    f = make_features()
    model = tiny_model(f)
    cfg = TrainConfig(
        epochs=35,
        batch_size=16,
        lr=3e-3,
        weight_decay=0.0,
        label_smoothing=0.0,
        mixup_alpha=0.0,
        device="cpu",
    )
    history = fit(model, f, cfg, progress=False)
    acc = evaluate(predict(model, f), f.labels)["top1"]
    assert acc >= 0.95, (acc, history[-1])
    assert history[-1]["loss"] < history[0]["loss"]


def test_warmup_cosine_schedule_values() -> None:
    """Linear warm-up from lr/W to lr over W steps, then cosine to min_lr; the optimizer sees these lrs."""
    s = WarmupCosine(warmup_steps=10, total_steps=110)
    assert s(0) == pytest.approx(0.1) and s(4) == pytest.approx(0.5) and s(9) == pytest.approx(1.0)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.5)
    assert s(85) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.75)))
    assert s(110) == pytest.approx(0.0) and s(500) == pytest.approx(0.0)
    assert WarmupCosine(0, 10, min_ratio=0.1)(10) == pytest.approx(0.1)
    # Through the real optimizer: 100 samples, batch 10 -> 10 steps/epoch, warm-up 1 epoch, 3 epochs.
    model = torch.nn.Linear(2, 2)
    cfg = TrainConfig(epochs=3, batch_size=10, lr=1.0, warmup_epochs=1)
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, 100)
    lrs = []
    for _ in range(30):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(1.0)
    assert lrs[20] == pytest.approx(0.5)
    assert lrs == sorted(lrs[:10]) + sorted(lrs[10:], reverse=True)


def test_weight_decay_skips_tokens_and_biases() -> None:
    """AdamW groups: class tokens, position embeddings, biases and LayerNorm weights get no decay."""
    model = tiny_model(make_features())
    opt = make_optimizer(model, TrainConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {"cls_img", "cls_txt", "pos_img", "pos_txt", "head.bias"} <= skipped
    assert all(p.ndim == 2 for p in decay["params"])


@pytest.mark.parametrize("mixup", [0.0, 0.4])
def test_mixup_off_and_on_run(mixup: float) -> None:
    """fit runs with mixup off and on (full model, label smoothing), giving finite, decreasing-ish losses."""
    f = make_features(n=32)
    cfg = TrainConfig(epochs=2, batch_size=8, mixup_alpha=mixup, device="cpu")
    history = fit(tiny_model(f), f, cfg, progress=False)
    assert len(history) == 2 and all(math.isfinite(h["loss"]) for h in history)


def test_mixup_changes_training() -> None:
    """With the same seed, mixup on gives different losses than mixup off (the batches are really mixed)."""
    f = make_features(n=32)
    off = fit(
        tiny_model(f), f, TrainConfig(epochs=1, batch_size=8, mixup_alpha=0.0, device="cpu"), progress=False
    )
    on = fit(
        tiny_model(f), f, TrainConfig(epochs=1, batch_size=8, mixup_alpha=1.0, device="cpu"), progress=False
    )
    assert off[0]["loss"] != pytest.approx(on[0]["loss"])


def test_logit_adjustment_term() -> None:
    """The adjustment is tau * log(class prior); empty classes count as 1 sample (finite loss)."""
    adj = logit_adjustment([90, 9, 1], tau=1.0)
    torch.testing.assert_close(adj, torch.log(torch.tensor([0.9, 0.09, 0.01])))
    torch.testing.assert_close(logit_adjustment([90, 9, 1], tau=2.0), 2 * adj)
    assert torch.isfinite(logit_adjustment([10, 0])).all()


def test_logit_adjusted_loss_shifts_predictions_to_tail() -> None:
    """On an imbalanced, overlapping 2-class set (180 vs 20), training with the logit-adjusted loss makes the
    model predict the tail class more often on balanced test data than plain CE does."""
    g = torch.Generator().manual_seed(0)
    n_head, n_tail, d = 180, 20, 8
    mean = torch.zeros(d)
    mean[0] = 0.5
    x = torch.cat([torch.randn(n_head, d, generator=g) - mean, torch.randn(n_tail, d, generator=g) + mean])
    y = torch.cat([torch.zeros(n_head, dtype=torch.long), torch.ones(n_tail, dtype=torch.long)])
    xt = torch.cat([torch.randn(200, d, generator=g) - mean, torch.randn(200, d, generator=g) + mean])
    yt = torch.cat([torch.zeros(200, dtype=torch.long), torch.ones(200, dtype=torch.long)])

    def feats(z: torch.Tensor, labels: torch.Tensor) -> RetrievalFeatures:
        n = len(z)
        return RetrievalFeatures(
            z,
            labels,
            [str(i) for i in range(n)],
            torch.zeros(n, 1, dtype=torch.long),
            torch.ones(n, 1),
            torch.zeros(1, d),
            torch.zeros(1, 1),
            torch.zeros(1, dtype=torch.bool),
            torch.full((1,), -1),
        )

    train, test = feats(x, y), feats(xt, yt)
    tail_preds = {}
    for loss in ("ce", "logit_adjusted"):
        torch.manual_seed(0)
        model = build_model("linear_probe", 2, d)
        cfg = TrainConfig(
            epochs=30,
            batch_size=50,
            lr=0.05,
            weight_decay=0.0,
            label_smoothing=0.0,
            mixup_alpha=0.0,
            loss=loss,
            device="cpu",
        )
        fit(model, train, cfg, progress=False)
        tail_preds[loss] = int((predict(model, test).argmax(1) == 1).sum())
    assert tail_preds["logit_adjusted"] > tail_preds["ce"] + 100, tail_preds


def test_logit_adjusted_runs_on_retformer() -> None:
    """loss="logit_adjusted" trains the full model, with counts given or counted from the labels."""
    f = make_features(n=32)
    cfg = TrainConfig(epochs=1, batch_size=8, loss="logit_adjusted", device="cpu")
    assert math.isfinite(fit(tiny_model(f), f, cfg, progress=False)[0]["loss"])
    h = fit(tiny_model(f), f, cfg, class_counts=[100, 10, 5, 1], progress=False)
    assert math.isfinite(h[0]["loss"])
    with pytest.raises(UserError, match="class_counts"):
        fit(tiny_model(f), f, cfg, class_counts=[1, 2], progress=False)


def test_resume_gives_the_same_weights(tmp_path: Path) -> None:
    """Stopping after 2 of 4 epochs and resuming from the checkpoint (new model object) ends with exactly
    the weights and history of an uninterrupted 4-epoch run (mixup, dropout and shuffling RNGs restored);
    metrics.jsonl then holds one line per epoch and no temporary file is left behind."""
    f = make_features(n=40)
    cfg = TrainConfig(epochs=4, batch_size=16, mixup_alpha=0.4, device="cpu", seed=3)

    straight = tiny_model(f, dropout=0.1)
    h_straight = fit(straight, f, cfg, progress=False)

    ckpt, log = tmp_path / "run" / "checkpoint.pt", tmp_path / "run" / "metrics.jsonl"
    first = tiny_model(f, dropout=0.1)
    h1 = fit(first, f, cfg, progress=False, checkpoint_path=ckpt, log_path=log, stop_after_epoch=2)
    assert len(h1) == 2 and len(log.read_text().splitlines()) == 2
    torch.manual_seed(99)  # other initial weights: equality below proves the checkpoint was loaded
    options = FusionOptions(width=32, depth=2, heads=4, dropout=0.1)
    resumed = build_model("retformer", 4, f.img_dim, f.txt_dim, f.k, options)
    assert not torch.equal(resumed.head.weight, first.head.weight)
    h2 = fit(resumed, f, cfg, progress=False, checkpoint_path=ckpt, log_path=log)

    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name

    def strip(history: list[dict]) -> list[dict]:
        return [{k: v for k, v in e.items() if k != "time_s"} for e in history]

    assert strip(h2) == strip(h_straight)
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [e["epoch"] for e in lines] == [1, 2, 3, 4]
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["checkpoint.pt", "metrics.jsonl"]

    # The checkpoint rebuilds the model on its own.
    torch.testing.assert_close(predict(load_model(ckpt), f), predict(resumed, f))


def test_resume_refuses_a_different_config(tmp_path: Path) -> None:
    """Resuming with another lr (or another training set size) is a UserError naming what changed."""
    f = make_features(n=16)
    ckpt = tmp_path / "checkpoint.pt"
    fit(
        tiny_model(f),
        f,
        TrainConfig(epochs=2, batch_size=8, device="cpu"),
        progress=False,
        checkpoint_path=ckpt,
        stop_after_epoch=1,
    )
    with pytest.raises(UserError, match="lr"):
        fit(
            tiny_model(f),
            f,
            TrainConfig(epochs=2, batch_size=8, lr=1e-3, device="cpu"),
            progress=False,
            checkpoint_path=ckpt,
        )
    with pytest.raises(UserError, match="samples"):
        fit(
            tiny_model(f),
            f.subset(range(8)),
            TrainConfig(epochs=2, batch_size=8, device="cpu"),
            progress=False,
            checkpoint_path=ckpt,
        )


@pytest.mark.parametrize("kind", ["linear_probe", "mlp_only", "retformer_no_text", "retformer_no_image"])
def test_baselines_and_variants_train(kind: str) -> None:
    """One trainer runs every model kind (baselines ignore the neighbors), with validation metrics."""
    f = make_features(n=32)
    h = fit(tiny_model(f, kind), f, TrainConfig(epochs=1, batch_size=8, device="cpu"), progress=False, val=f)
    assert 0 <= h[0]["val_top1"] <= 1


# ---------------------------------------------------------------- metrics and baselines


def test_evaluate_hand_example() -> None:
    """Exact top-1, top-5, per-class and many/medium/few accuracies on a hand-made 6-class example."""
    labels = [0, 0, 1, 2, 3, 5]
    ranks = [  # class order per row, best first; logits = 6 - rank
        [0, 1, 2, 3, 4, 5],  # correct
        [1, 0, 2, 3, 4, 5],  # wrong, label 2nd: top-5 hit
        [1, 0, 2, 3, 4, 5],  # correct
        [0, 1, 3, 4, 5, 2],  # wrong, label last: top-5 miss
        [3, 0, 1, 2, 4, 5],  # correct
        [0, 1, 2, 3, 5, 4],  # wrong, label 5th: top-5 hit
    ]
    logits = torch.zeros(6, 6)
    for i, order in enumerate(ranks):
        for r, cls in enumerate(order):
            logits[i, cls] = 6 - r
    split = {"many": [0, 1], "medium": [2, 3], "few": [4, 5]}
    m = evaluate(logits, labels, split)
    assert m["top1"] == 0.5 and m["top5"] == pytest.approx(5 / 6) and m["top5_k"] == 5
    assert m["per_class"] == [0.5, 1.0, 0.0, 1.0, None, 0.0]
    assert m["many"] == pytest.approx(2 / 3) and m["medium"] == 0.5 and m["few"] == 0.0
    assert (m["many_samples"], m["medium_samples"], m["few_samples"]) == (3, 2, 1)
    # Empty group, and a group whose classes have no test sample: None.
    m2 = evaluate(logits, labels, {"many": [0, 1, 2, 3, 5], "medium": [4], "few": []})
    assert m2["medium"] is None and m2["few"] is None and m2["many"] == 0.5
    # Fewer than 5 classes: top-5 is top-C.
    m3 = evaluate(torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]]), [0, 0])
    assert m3["top1"] == 0.5 and m3["top5"] == 1.0 and m3["top5_k"] == 3
    with pytest.raises(ValueError):
        evaluate(logits, [0, 0, 1, 2, 3, 6])


def test_shot_split_boundaries() -> None:
    """> 100 is many, 20..100 medium, < 20 few: 101 -> many, 100 -> medium, 20 -> medium, 19 -> few."""
    split = shot_split_from_counts([101, 100, 20, 19, 0, 500])
    assert split == {"many": [0, 5], "medium": [1, 2], "few": [3, 4]}


def test_knn_vote_hand_example() -> None:
    """Majority vote of neighbor labels; ties broken by summed similarity; unlabelled (-1) and
    out-of-range labels do not vote; no labelled neighbor gives a uniform row."""
    store_label = torch.tensor([0, 1, 1, -1, 2, 0, 7])
    nn_rows = torch.tensor(
        [
            [1, 0, 2, 3],  # votes: 1 x2, 0 x1 -> class 1
            [0, 1, 4, 3],  # 0, 1, 2 one vote each; similarity 0.9 > 0.8 > 0.7 -> class 0
            [4, 5, 1, 3],  # 2 (0.9), 0 (0.8), 1 (0.2) -> class 2 by similarity
            [3, 6, 3, 6],  # only -1 and 7 (out of range): uniform
        ]
    )
    nn_score = torch.tensor(
        [[0.9, 0.8, 0.7, 0.6], [0.9, 0.8, 0.7, 0.6], [0.9, 0.8, 0.2, 0.1], [0.9, 0.8, 0.7, 0.6]]
    )
    f = RetrievalFeatures(
        query_img=torch.zeros(4, 2),
        labels=torch.tensor([1, 0, 0, 1]),
        uids=list("abcd"),
        nn_rows=nn_rows,
        nn_score=nn_score,
        store_img=torch.zeros(7, 2),
        store_txt=torch.zeros(7, 2),
        store_has_text=torch.ones(7, dtype=torch.bool),
        store_label=store_label,
    )
    scores = knn_vote(f, num_classes=3)
    assert scores.shape == (4, 3)
    assert scores.argmax(1).tolist() == [1, 0, 2, 0]
    assert torch.all(scores[3] == scores[3, 0])  # uniform
    assert scores[0, 1] - scores[0, 0] >= 0.5  # a vote outweighs any similarity tie-break
    m = evaluate(scores, f.labels)
    assert m["top1"] == 0.5  # rows 0, 1 right; row 2 (label 0) wrong; uniform row 3 (label 1) wrong


# ---------------------------------------------------------------- library replacements


def test_cross_entropy_with_probability_targets_is_the_soft_target_loss() -> None:
    """F.cross_entropy with probability targets (what the loop calls) is -sum_c t_c log softmax_c averaged
    over the batch, the hand-written loss it replaced, for label-smoothed and mixed targets: the same
    value to rounding and bitwise the same gradient (so training is bitwise unchanged)."""
    g = torch.Generator().manual_seed(0)
    for n, c in ((128, 10), (37, 4), (5, 1000)):
        logits = torch.randn(n, c, generator=g, requires_grad=True)
        y = torch.randint(0, c, (n,), generator=g)
        targets = torch.nn.functional.one_hot(y, c).float() * 0.9 + 0.1 / c
        perm = torch.randperm(n, generator=g)
        targets = 0.3 * targets + 0.7 * targets[perm]
        hand = -(targets * torch.nn.functional.log_softmax(logits, dim=1)).sum(dim=1).mean()
        lib = torch.nn.functional.cross_entropy(logits, targets)
        torch.testing.assert_close(lib, hand)
        (g_hand,) = torch.autograd.grad(hand, logits)
        (g_lib,) = torch.autograd.grad(lib, logits)
        assert torch.equal(g_hand, g_lib), (n, c)


@pytest.mark.parametrize("kind", ["retformer", "retformer_no_image", "linear_probe", "mlp_only"])
def test_timm_weight_decay_groups_follow_the_rule(kind: str) -> None:
    """timm's parameter groups (make_optimizer) decay exactly the parameters of 2 or more dimensions that
    the model does not list in no_weight_decay(); everything else, and nothing more, gets no decay."""
    model = tiny_model(make_features(), kind)
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    expected = {n for n, p in model.named_parameters() if p.ndim >= 2 and n not in skip}
    names = {id(p): n for n, p in model.named_parameters()}
    groups = make_optimizer(model, TrainConfig(weight_decay=0.1)).param_groups
    decayed = {names[id(p)] for g in groups if g["weight_decay"] == 0.1 for p in g["params"]}
    not_decayed = {names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert decayed == expected
    assert not_decayed == set(names.values()) - expected


def test_mixed_is_the_mixup_blend_to_rounding() -> None:
    """`mixed` (one lerp) is lam * own + (1 - lam) * partner to float32 rounding, for a scalar lam and
    for one lam per row."""
    from retformer.trainer.train import mixed

    gen = torch.Generator().manual_seed(0)
    own, partner = torch.randn(64, 33, generator=gen), torch.randn(64, 33, generator=gen)
    for lam in (0.0, 0.3, 0.7, 1.0, torch.rand(64, 1, generator=gen)):
        want = lam * own + (1 - lam) * partner
        torch.testing.assert_close(mixed(own, partner.clone(), lam), want, rtol=0, atol=1e-6)


def test_the_whole_epoch_feed_trains_bitwise_like_the_per_batch_feed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole-epoch gather-and-mix path (small splits) and the per-batch path (large splits, and every
    DDP rank) give bitwise the same weights: one mixup, two layouts."""
    import retformer.trainer.feature_feed as train_module

    feats = make_features(n=300, c=4)
    cfg = TrainConfig(epochs=3, batch_size=64, lr=1e-2, mixup_alpha=0.4, label_smoothing=0.1, seed=3)
    states = []
    for budget in (train_module.EPOCH_INPUT_BYTES, 0):  # 0: no split fits, every batch on its own
        monkeypatch.setattr(train_module, "EPOCH_INPUT_BYTES", budget)
        model = tiny_model(feats)
        fit(model, feats, cfg, progress=False)
        states.append(model.state_dict())
    for name, value in states[0].items():
        assert torch.equal(value, states[1][name]), name
