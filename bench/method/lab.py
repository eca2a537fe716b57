"""Method research for issue 9: why RetFormer's fusion branch hurts, and which recipe fixes it.

Research code, not the trainer: it reuses trainer.model's RetFormer / MLPOnly / LinearProbe and the
trainer's optimiser, schedule, targets and loss helpers, and adds the candidate remedies in its own
small training loop so that trainer/ stays untouched while it is being restructured:

- per-branch logits (L_I = MLP(z), L_R = h(fusion)) and a prediction L_I + alpha * L_R;
- auxiliary per-branch losses: aux * (CE(L_I) + CE(L_R)) besides CE(tau/2 (L_I + L_R));
- train-time logit adjustment (la_tau * log prior added to every logit set the loss sees);
- warm-starting L_I from a trained MLPOnly; neighbour-text dropout; neighbour shuffling across the
  batch at train time (a sample sees another query's neighbours with probability nn_shuffle);
- evaluation on val after every epoch, best-on-val epoch kept (per alpha).

Every choice reads val only; test is evaluated by `final_eval` once the choice is made.
Run with PYTHONPATH=<worktree>, OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from trainer.baselines import knn_vote
from trainer.evaluate import evaluate
from trainer.features import RetrievalFeatures, load_retrieval_features
from trainer.model import LinearProbe, MLPOnly, RetFormer
from trainer.train import TrainConfig, logit_adjustment, make_optimizer, make_scheduler, soft_targets

torch.set_num_threads(1)
WORK = Path(__file__).resolve().parents[2] / "work"
RESULTS = Path(__file__).resolve().parent / "results"
ALPHAS = (0.0, 0.25, 0.5, 1.0)  # prediction = L_I + alpha * L_R; 1 = the paper's sum


# ------------------------------------------------------------------------------------------ data
@dataclass
class Data:
    name: str
    kb: str
    train: RetrievalFeatures
    val: RetrievalFeatures
    test: RetrievalFeatures
    info: dict[str, Any]

    @property
    def num_classes(self) -> int:
        return int(self.info["num_classes"])

    @property
    def shot(self) -> dict[str, list[int]]:
        return self.info["shot_split"]

    @property
    def counts(self) -> list[int]:
        return self.info["train_class_counts"]


def load(dataset: str, kb: str, k: int = 32) -> Data:
    d = WORK / "datasets" / dataset
    info = json.loads((d / "dataset.json").read_text())
    f = {s: load_retrieval_features(d, kb, k, s) for s in ("train", "val", "test")}
    for s in f:  # float32 once: the store is float16 on disk
        f[s] = replace(f[s], store_img=f[s].store_img.float(), store_txt=f[s].store_txt.float())
    return Data(dataset, kb, f["train"], f["val"], f["test"], info)


def shuffled(feats: RetrievalFeatures, seed: int = 123) -> RetrievalFeatures:
    """Each query gets the neighbour list of another query (a random derangement-like permutation):
    the irrelevant-neighbour control any dataset gives for free."""
    g = torch.Generator().manual_seed(seed)
    n = len(feats)
    perm = torch.randperm(n, generator=g)
    same = perm == torch.arange(n)
    perm[same] = (perm[same] + 1) % n  # nobody keeps its own list
    return replace(feats, nn_rows=feats.nn_rows[perm], nn_score=feats.nn_score[perm])


def metrics(logits: torch.Tensor, data: Data, feats: RetrievalFeatures) -> dict[str, float]:
    m = evaluate(logits, feats.labels, data.shot)
    return {k: round(100 * m[k], 2) for k in ("top1", "many", "medium", "few")}


# ----------------------------------------------------------------------------------------- model
def branches(model: RetFormer, z, nn_img, nn_txt) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_I, L_R) of the full RetFormer: its forward() without the final tau/2 (L_I + L_R)."""
    x_img = model._tokens(model.proj_img(z), model.proj_img(nn_img), model.cls_img, model.pos_img)
    t = model.proj_txt(nn_txt)
    x_txt = model._tokens(t.new_zeros(t.shape[0], t.shape[2]), t, model.cls_txt, model.pos_txt)
    for layer in model.layers:
        x_img, x_txt, _ = layer(x_img, x_txt, False)
    cls = torch.cat([model.norm_img(x_img[:, 0]), model.norm_txt(x_txt[:, 0])], dim=-1)
    lr = model.head(cls)
    if hasattr(model, "gate_w"):
        lr = lr * relevance_gate(model, z, nn_img)[:, None]
    return model.mlp(z), lr


def relevance_gate(model: RetFormer, z: torch.Tensor, nn_img: torch.Tensor) -> torch.Tensor:
    """g = sigmoid(w (s - b)), s = mean cosine between the query image and its neighbours' images,
    recomputed from the vectors the model is given (so shuffled or foreign neighbours score low).
    Two learned scalars; L_R is multiplied by g."""
    s = (F.normalize(z, dim=-1)[:, None, :] * F.normalize(nn_img, dim=-1)).sum(-1).mean(1)
    return torch.sigmoid(model.gate_w * (s - model.gate_b))


@dataclass
class Cfg:
    kind: str = "retformer"  # retformer | mlp | linear
    epochs: int = 20
    lr: float = 1e-3
    weight_decay: float = 0.1
    batch_size: int = 128
    label_smoothing: float = 0.1
    mixup: float = 0.2
    warmup: float = 1.0
    la_tau: float = 0.0  # train-time logit adjustment (0 = plain CE)
    main: float = 1.0  # weight of CE(tau/2 (L_I + L_R))
    aux: float = 0.0  # weight of CE(L_I) + CE(L_R)
    width: int = 128
    depth: int = 2
    heads: int = 4
    dropout: float = 0.0
    ffn: bool = True
    tau: float = 2.0
    mlp_hidden: int | None = None  # RetFormer's L_I hidden size (None = img_dim, the trainer's default)
    txt_drop: float = 0.0  # train: each neighbour's text vector zeroed with this probability
    nn_shuffle: float = 0.0  # train: a sample's neighbours replaced by another sample's, this probability
    # target of L_R's own loss for a sample whose neighbours were swapped: "label" (its class) or
    # "uniform" (no opinion: irrelevant neighbours should leave the prediction to L_I)
    shuffle_target: str = "label"
    gate: bool = False  # multiply L_R by a learned gate on the query-neighbour image similarity
    warm_mlp: dict | None = field(default=None, repr=False)  # MLPOnly state dict to start L_I from
    freeze_li: bool = False  # keep L_I at its warm start: the fusion branch learns a residual on it
    seed: int = 0

    def tag(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "warm_mlp"}
        d["warm_mlp"] = self.warm_mlp is not None
        return d


def build(cfg: Cfg, data: Data) -> torch.nn.Module:
    torch.manual_seed(cfg.seed)
    c, di, dt = data.num_classes, data.train.img_dim, data.train.txt_dim
    if cfg.kind == "linear":
        return LinearProbe(di, c)
    if cfg.kind == "mlp":
        return MLPOnly(di, c, hidden=cfg.width)
    m = RetFormer(
        di, dt, c, width=cfg.width, depth=cfg.depth, heads=cfg.heads, k=data.train.k,
        mlp_hidden=cfg.mlp_hidden, tau=cfg.tau, dropout=cfg.dropout, ffn=cfg.ffn,
    )  # fmt: skip
    if cfg.gate:
        m.gate_w = torch.nn.Parameter(torch.tensor(10.0))
        m.gate_b = torch.nn.Parameter(torch.tensor(0.5))
    if cfg.warm_mlp is not None:
        m.mlp.load_state_dict(cfg.warm_mlp)
    if cfg.freeze_li:
        m.mlp.requires_grad_(False)
    return m


@torch.inference_mode()
def predict_branches(model, feats: RetrievalFeatures, bs: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_I, L_R) for every query (L_R = 0 for models without retrieval)."""
    model.eval()
    li, lr = [], []
    for s in range(0, len(feats), bs):
        idx = torch.arange(s, min(s + bs, len(feats)))
        b = feats.batch(idx, neighbours=isinstance(model, RetFormer))
        if isinstance(model, RetFormer):
            a, r = branches(model, b["z"], b["nn_img"], b["nn_txt"])
        else:
            a = model(b["z"])
            r = torch.zeros_like(a)
        li.append(a.float())
        lr.append(r.float())
    return torch.cat(li), torch.cat(lr)


def combos(li: torch.Tensor, lr: torch.Tensor, is_rf: bool) -> dict[str, torch.Tensor]:
    if not is_rf:
        return {"model": li}
    out = {f"a{a:g}": li + a * lr for a in ALPHAS}
    out["r_only"] = lr
    return out


def _ce(logits: torch.Tensor, targets: torch.Tensor, adjust: torch.Tensor | None) -> torch.Tensor:
    if adjust is not None:
        logits = logits + adjust
    return -(targets * F.log_softmax(logits.float(), dim=1)).sum(1).mean()


def fit(cfg: Cfg, data: Data, keep: bool = True) -> dict[str, Any]:
    """Train on data.train, evaluate on data.val after every epoch.

    Returns {"history": [per epoch: val top1 per combo], "best": {combo: (epoch, top1, state)}}."""
    model = build(cfg, data)
    is_rf = isinstance(model, RetFormer)
    if cfg.freeze_li:
        model.mlp.eval()  # (no dropout / norm in it; explicit anyway)
    train = data.train
    n, c = len(train), data.num_classes
    tc = TrainConfig(
        epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
        warmup_epochs=cfg.warmup, device="cpu",
    )  # fmt: skip
    opt = make_optimizer(model, tc)
    sched = make_scheduler(opt, tc, n)
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    adjust = logit_adjustment(data.counts, cfg.la_tau) if cfg.la_tau else None
    spe = -(-n // cfg.batch_size)
    hist, best = [], {}
    t0 = time.time()
    for ep in range(cfg.epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        for st in range(spe):
            idx = perm[st * cfg.batch_size : (st + 1) * cfg.batch_size]
            b = train.batch(idx, neighbours=is_rf)
            y = b["y"]
            tgt = soft_targets(y, c, cfg.label_smoothing)
            tgt_r = tgt
            if is_rf and cfg.nn_shuffle > 0:
                swap = torch.rand(len(y), generator=gen) < cfg.nn_shuffle
                other = torch.randint(0, n, (len(y),), generator=gen)
                if swap.any():
                    ob = train.batch(other[swap], neighbours=True)
                    b["nn_img"][swap] = ob["nn_img"]
                    b["nn_txt"][swap] = ob["nn_txt"]
                    if cfg.shuffle_target == "uniform":
                        tgt_r = tgt.clone()
                        tgt_r[swap] = 1.0 / c
            if is_rf and cfg.txt_drop > 0:
                keep_t = (torch.rand(b["nn_txt"].shape[:2], generator=gen) >= cfg.txt_drop).float()
                b["nn_txt"] = b["nn_txt"] * keep_t[..., None]
            if cfg.mixup > 0:
                lam = float(rng.beta(cfg.mixup, cfg.mixup))
                p = torch.randperm(len(y), generator=gen)
                for key in ("z", "nn_img", "nn_txt"):
                    if key in b:
                        b[key] = lam * b[key] + (1 - lam) * b[key][p]
                tgt = lam * tgt + (1 - lam) * tgt[p]
                tgt_r = lam * tgt_r + (1 - lam) * tgt_r[p]
            if is_rf:
                li, lr = branches(model, b["z"], b["nn_img"], b["nn_txt"])
                loss = cfg.main * _ce(cfg.tau / 2 * (li + lr), tgt, adjust)
                if cfg.aux:
                    loss = loss + cfg.aux * (_ce(li, tgt, adjust) + _ce(lr, tgt_r, adjust))
            else:
                loss = _ce(model(b["z"]), tgt, adjust)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        li, lr = predict_branches(model, data.val)
        row = {"epoch": ep + 1}
        for name, lg in combos(li, lr, is_rf).items():
            acc = round(100 * float((lg.argmax(1) == data.val.labels).float().mean()), 2)
            row[name] = acc
            if name != "r_only" and (name not in best or acc > best[name][1]):
                best[name] = (ep + 1, acc, copy.deepcopy(model.state_dict()) if keep else None)
        hist.append(row)
    return {"cfg": cfg, "history": hist, "best": best, "seconds": round(time.time() - t0, 1), "model": model}


def grid(base: Cfg, data: Data, lrs=(1e-3, 3e-3, 1e-2), epochs=(200,), combo: str | None = None) -> dict:
    """The selection every method gets: each (lr, epochs) of the grid, best epoch on val, best run on
    val. For RetFormer `combo` restricts the choice to one prediction rule (e.g. "a1" = the paper's
    sum); None lets alpha be chosen on val too."""
    runs = []
    for lr in lrs:
        for ep in epochs:
            r = fit(replace(base, lr=lr, epochs=ep), data)
            runs.append(r)
    best = None
    for r in runs:
        for name, (epoch, acc, state) in r["best"].items():
            if combo is not None and name != combo:
                continue
            if best is None or acc > best["val_top1"]:
                best = {"run": r, "combo": name, "epoch": epoch, "val_top1": acc, "state": state}
    return {"runs": runs, "best": best}


def final_eval(sel: dict, data: Data, split: str = "test") -> dict[str, Any]:
    """Metrics of a selected checkpoint on `split` and with neighbours shuffled across queries."""
    r = sel["run"]
    model = build(r["cfg"], data)
    model.load_state_dict(sel["state"])
    is_rf = isinstance(model, RetFormer)
    feats = getattr(data, split)
    out = {}
    li, lr = predict_branches(model, feats)
    out["plain"] = metrics(combos(li, lr, is_rf)[sel["combo"]], data, feats)
    if is_rf:
        li, lr = predict_branches(model, shuffled(feats))
        out["shuffled"] = metrics(combos(li, lr, True)[sel["combo"]], data, feats)
    return out


def knn_select(data: Data, ks=(1, 3, 5, 10, 20, 32)) -> dict[str, Any]:
    """kNN vote with k chosen on val; None when the KB's labels are not the dataset's (checked by the
    caller: an irrelevant KB)."""
    val = {k: metrics(knn_vote(data.val.subset_k(k), data.num_classes), data, data.val) for k in ks}
    kbest = max(ks, key=lambda k: val[k]["top1"])
    return {"k": kbest, "val": val[kbest], "all_val": {k: v["top1"] for k, v in val.items()}}


def attention_mass(model: RetFormer, feats: RetrievalFeatures, n: int = 500) -> dict[str, float]:
    """Mean attention of the class token (last layer and all layers, heads averaged) on itself, the
    query slot and the k neighbours, per stream."""
    model.eval()
    b = feats.batch(torch.arange(min(n, len(feats))))
    with torch.inference_mode():
        _, attn = model(b["z"], b["nn_img"], b["nn_txt"], return_attention=True)
    out = {}
    for stream, w in attn.items():  # (L, B, H, P, P)
        cls_row = w.mean(dim=2)[:, :, 0, :]  # (L, B, P)
        for li in range(cls_row.shape[0]):
            out[f"{stream}_L{li}_cls"] = round(float(cls_row[li, :, 0].mean()), 3)
            out[f"{stream}_L{li}_query"] = round(float(cls_row[li, :, 1].mean()), 3)
            out[f"{stream}_L{li}_nn"] = round(float(cls_row[li, :, 2:].sum(-1).mean()), 3)
    return out


def log(name: str, row: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / f"{name}.jsonl", "a") as fh:
        fh.write(json.dumps(row, default=str) + "\n")
    print(json.dumps(row, default=str), flush=True)


def neighbour_similarity(feats: RetrievalFeatures) -> torch.Tensor:
    """Per query: mean cosine between its image and its k neighbours' images (from the vectors)."""
    out = []
    for st in range(0, len(feats), 2000):
        b = feats.batch(torch.arange(st, min(st + 2000, len(feats))))
        z = F.normalize(b["z"], dim=-1)[:, None, :]
        out.append((z * F.normalize(b["nn_img"], dim=-1)).sum(-1).mean(1))
    return torch.cat(out)


GATE_QUANTILES = (None, 0.01, 0.05, 0.1, 0.2)  # None = no gate


def gated_logits(li, lr, sim, alpha: float, threshold: float | None) -> torch.Tensor:
    """L_I + alpha * 1[s > t] * L_R: the retrieval branch only speaks when the query's neighbours look
    like it (mean image cosine s above a threshold t chosen on val)."""
    if threshold is None or alpha == 0:
        return li + alpha * lr
    return li + alpha * (sim > threshold).float()[:, None] * lr


def select_gated(r: dict, data: Data, tolerance: float = 1.0) -> dict[str, Any]:
    """Val-only choice of (checkpoint, alpha, gate threshold) for a trained RetFormer run `r`.

    Candidates: the best-on-val checkpoint of every alpha; thresholds at quantiles of the val
    queries' own similarity. Admissible: val top-1 with neighbours shuffled across queries is within
    `tolerance` points of the L_I branch alone on val. Best admissible plain val top-1 wins (alpha =
    0 is always admissible, so the result is never below its own L_I branch on val)."""
    model = r["model"]
    val_s, val_sh = data.val, shuffled(data.val)
    sim, sim_sh = neighbour_similarity(val_s), neighbour_similarity(val_sh)
    y = data.val.labels
    best, table = None, []
    for rule, (epoch, _, state) in r["best"].items():
        alpha = float(rule[1:])
        model.load_state_dict(state)
        li, lr = predict_branches(model, val_s)
        li_sh, lr_sh = predict_branches(model, val_sh)
        base = 100 * float((li.argmax(1) == y).float().mean())
        for q in GATE_QUANTILES:
            t = None if q is None else float(torch.quantile(sim, q))
            acc = 100 * float((gated_logits(li, lr, sim, alpha, t).argmax(1) == y).float().mean())
            acc_sh = 100 * float((gated_logits(li_sh, lr_sh, sim_sh, alpha, t).argmax(1) == y).float().mean())
            row = {"rule": rule, "epoch": epoch, "q": q, "t": t, "val": round(acc, 2),
                   "val_shuffled": round(acc_sh, 2), "l_i": round(base, 2)}  # fmt: skip
            table.append(row)
            ok = acc_sh >= base - tolerance
            # compare unrounded accuracies: ties keep the first candidate (smaller alpha, no/laxer gate)
            if ok and (best is None or acc > best["_acc"] + 1e-9):
                best = {**row, "state": state, "alpha": alpha, "_acc": acc}
    return {
        "best": best,
        "table": table,
        "sim_val_mean": float(sim.mean()),
        "sim_shuf_mean": float(sim_sh.mean()),
    }


def eval_gated(model, sel: dict, data: Data, split: str) -> dict[str, Any]:
    """Metrics of the gated prediction of a selected checkpoint on `split`, plain and shuffled."""
    model.load_state_dict(sel["state"])
    feats = getattr(data, split)
    out = {}
    for name, f in (("plain", feats), ("shuffled", shuffled(feats))):
        li, lr = predict_branches(model, f)
        out[name] = metrics(
            gated_logits(li, lr, neighbour_similarity(f), sel["alpha"], sel["t"]), data, feats
        )
    return out
