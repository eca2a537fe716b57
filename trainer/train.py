"""Training: the one epoch loop, and feature mode over in-memory retrieval features (frozen encoders).

Recipe (paper Sec. 4.1): 25 epochs, batch 256, lr 5e-4, weight decay 0.1, 1 warm-up epoch then
cosine decay, label smoothing, mixup, k = 32. Choices the paper leaves open, documented here:

- AdamW, not Adam + L2: the paper says "Adam with a weight decay of 0.1". Coupled L2 at 0.1 would
  dominate the gradient of a small head; decoupled decay (Loshchilov & Hutter) keeps 0.1 sane and
  is what ViT/CLIP fine-tuning recipes mean by it. Class tokens, position embeddings, biases and
  LayerNorm weights are not decayed (ViT practice).
- The schedule is per step (linear warm-up from lr/warmup_steps to lr, then cosine to min_lr);
  the paper's "decreased at each epoch" is the same curve sampled coarser.
- Mixup acts on the embeddings: one lambda ~ Beta(a, a) and one permutation per batch mix z,
  nn_img, nn_txt and the (label-smoothed) one-hot targets alike.
- loss="logit_adjusted" (Menon et al. 2021): train on logits + la_tau * log(prior); predict with
  the raw logits, which are then balanced across classes.
- Resume: a checkpoint at the end of every epoch holds model, optimizer, scheduler, the shuffle /
  mixup / dropout RNG states and the history, so a resumed run ends with the weights an
  uninterrupted run would have (bitwise on the CPU).
- Several processes (`torchrun`, `trainer/distributed.py`): `batch_size` is the global batch; each
  rank computes its part of every global micro-batch and DDP averages the gradients, so N processes
  end with one process's weights up to float rounding (dropout > 0 aside: its masks are drawn per
  rank). Only rank 0 writes the checkpoint and the metrics file; a checkpoint resumes on any number
  of processes.

`train_epochs` is the one epoch loop: feature mode (`fit`, below) and fine-tune mode
(`trainer/finetune.py`) differ only in the `Feed` that delivers their micro-batches and in the
optimizer they build.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict, Unpack

import numpy as np
import torch
import torch.nn.functional as F
from timm.optim import param_groups_weight_decay
from torch import nn

from artifacts.atomic import atomic_path
from artifacts.errors import UserError
from trainer import distributed
from trainer.checkpoint import check_resumable, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from trainer.config import TrainConfig
from trainer.evaluate import evaluate
from trainer.features import RetrievalFeatures
from trainer.progress import ModelProgress, fit_summary
from trainer.progress import current as progress_tracker


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when torch can use a GPU, cpu when there is none (a GPU torch cannot use is one
    UserError: artifacts/devices.py); under torchrun, "cuda" is this process's GPU."""
    from artifacts.devices import pick

    return distributed.device_for(torch.device(pick(device, "training")))


class WarmupCosine:
    """LR multiplier per optimizer step: linear warm-up to 1, then cosine decay to min_ratio."""

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps  # never 0: the first step already learns
        if self.total_steps <= self.warmup_steps:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def steps_per_epoch(num_samples: int, batch_size: int, accumulate: int = 1) -> int:
    """Optimizer steps in one epoch (the last, smaller batch is kept), `accumulate` micro-batches a step."""
    return math.ceil(math.ceil(num_samples / batch_size) / accumulate)


def weight_decay_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """timm's AdamW parameter groups: no decay on 1-d parameters (biases, norms) and on the names in
    `module.no_weight_decay()` (class tokens, position embeddings), `weight_decay` on the rest."""
    skip = module.no_weight_decay() if hasattr(module, "no_weight_decay") else ()
    return param_groups_weight_decay(module, weight_decay, no_weight_decay_list=skip)


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with no decay on biases, norms, class tokens and position embeddings."""
    # Decayed group first: the optimizer-state layout of the checkpoints written so far.
    return torch.optim.AdamW(weight_decay_groups(model, config.weight_decay)[::-1], lr=config.lr)


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, num_samples: int, accumulate: int = 1
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step warm-up + cosine schedule for `config.epochs` epochs over `num_samples` samples."""
    spe = steps_per_epoch(num_samples, config.batch_size, accumulate)
    fn = WarmupCosine(round(config.warmup_epochs * spe), config.epochs * spe, config.min_lr / config.lr)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def soft_targets(y: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """Label-smoothed one-hot targets: (1 - eps) on the label plus eps / C everywhere."""
    return F.one_hot(y, num_classes).float() * (1 - smoothing) + smoothing / num_classes


def logit_adjustment(class_counts: torch.Tensor | np.ndarray | list[int], tau: float = 1.0) -> torch.Tensor:
    """tau * log(prior) per class (Menon et al. 2021), added to the logits at train time.
    Classes with no training sample are counted as 1 (log 0 would make the loss infinite)."""
    counts = torch.as_tensor(np.asarray(class_counts), dtype=torch.float64).clamp(min=1)
    return (tau * torch.log(counts / counts.sum())).float()


def amp_policy(enabled: bool, device: torch.device) -> tuple[bool, torch.dtype]:
    """(autocast on?, dtype): bfloat16 on CUDA where native (compute capability >= 8.0), else float16
    (with a GradScaler; emulated bf16 on a T4/V100 is slow); off on the CPU."""
    if not (enabled and device.type == "cuda"):
        return False, torch.float32
    from artifacts.devices import amp_dtype

    return True, amp_dtype(device)


# A one-process fit whose inputs (and their mixup partners) take at most this many bytes for a whole
# epoch gathers and mixes them once per epoch (`_feature_feed`): the baselines' 1,236 x 1,280 floats.
EPOCH_INPUT_BYTES = 64 << 20
# A head with at most this many parameters trains and predicts on one CPU thread (TrainConfig.threads
# = 0): its ops are too small for OpenMP to pay, and on a busy machine every op waits at a barrier for
# a descheduled thread. The demo's heads (RetFormer width 64, depth 1: 0.31 M parameters; mlp_only
# 0.17 M) ran 7-10x slower per step on 2 threads than on 1 on a 2-core machine shared with a test run
# (BENCHMARKS.md, "Trainer"); a width-256 depth-4 RetFormer (8.4 M) keeps torch's threads.
SMALL_HEAD_PARAMS = 1 << 20


def head_threads(model: nn.Module, device: torch.device, threads: int = 0) -> int | None:
    """The intra-op threads a feature-mode head runs with on `device`: `threads` when given, one for a
    small head on the CPU, else None (torch's setting is left alone)."""
    if device.type != "cpu":
        return None
    if threads:
        return threads
    return 1 if sum(p.numel() for p in model.parameters()) <= SMALL_HEAD_PARAMS else None


@contextmanager
def intra_op_threads(threads: int | None) -> Iterator[None]:
    """torch.set_num_threads(threads) inside the block, the previous count restored after it."""
    before = torch.get_num_threads()
    if threads is None or threads == before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_labels(labels: torch.Tensor, num_classes: int) -> None:
    """UserError unless there are training samples, all labelled within [0, num_classes)."""
    if len(labels) == 0:
        raise UserError("no training samples")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise UserError(
            f"training labels must be in [0, {num_classes}); unlabelled (-1) queries cannot be trained on"
        )


def needs_neighbors(model: nn.Module) -> bool:
    """Whether the model reads the neighbors (the baselines do not: their batches skip the gather)."""
    return bool(getattr(model, "needs_neighbors", True))


Batch = dict[str, torch.Tensor]


def mixed(own: torch.Tensor, partner: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
    """Mixup's lam * own + (1 - lam) * partner, as one lerp from the partner, written into `partner`
    (one pass instead of three: it was a fifth of a linear probe's step; the values differ from the
    two products and a sum in the last bit only). lam: a float, or per row, shaped to broadcast."""
    return partner.lerp_(own, lam)


@dataclass
class Micro:
    """This rank's part of one global micro-batch.

    b: its rows, `x` (the model's first input: query embeddings, or images in fine-tune mode), `y`,
    and `nn_img` / `nn_txt` when the model reads the neighbors. mix: None, or (lambda, the rows each
    row of b is mixed with: same keys). counted: the rows that count (len(b["y"]); 0 for the stand-in
    row of a rank whose part is empty, `distributed.micro_shard`). targets: None, or the label-smoothed
    targets the feed made, mixed as the loop would mix them, b's inputs then being mixed already
    (`_feature_feed`: `mixed`, as the loop calls it)."""

    b: Batch
    mix: tuple[float, Batch] | None
    counted: int
    targets: torch.Tensor | None = None  # the feed's soft targets: b's inputs and these are mixed already


def split_micro(
    batch: Batch, needed_m: int, partner_at: np.ndarray | None, lam: float | None, counted: int
) -> Micro:
    """A Micro from the rows a rank loaded (`distributed.micro_shard`'s `needed`): its own first
    `needed_m` rows, the mixup partners at `partner_at`. In one process the partners are the batch
    permuted, as before: the same tensors bit for bit."""
    own = {k: v[:needed_m] for k, v in batch.items()}
    if partner_at is None or lam is None:
        return Micro(own, None, counted)
    at = torch.as_tensor(partner_at, device=batch["y"].device)
    return Micro(own, (lam, {k: v[at] for k, v in batch.items()}), counted)


@dataclass
class Feed:
    """What a training mode gives the epoch loop.

    batches(epoch) -> (GLOBAL micro-batch sizes, iterable of this rank's `Micro` parts of them, in
    order). gen / np_rng: the mode's own RNGs, saved in checkpoints (every rank draws the same).
    extra(seconds): mode-specific fields of an epoch's history entry."""

    batches: Callable[[int], tuple[list[int], Iterable[Micro]]]
    accumulate: int = 1  # micro-batches per optimizer step
    find_unused: bool = False  # some trainable parameters may sit out a forward pass (DDP must know)
    gen: torch.Generator | None = None
    np_rng: np.random.Generator | None = None
    extra: Callable[[float], dict[str, Any]] = field(default=lambda seconds: {})


def _adjustment(
    config: TrainConfig, class_counts: Any, labels: torch.Tensor, num_classes: int, device: torch.device
) -> torch.Tensor | None:
    if config.loss != "logit_adjusted":
        return None
    if class_counts is None:
        class_counts = torch.bincount(labels.cpu(), minlength=num_classes)
    if len(class_counts) != num_classes:
        raise UserError(f"class_counts has {len(class_counts)} entries, the model has {num_classes} classes")
    return logit_adjustment(class_counts, config.la_tau).to(device)


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _resume_state(
    ckpt: Path | None, resume: bool, device: torch.device, config: TrainConfig, model: nn.Module, n: int
) -> dict[str, Any] | None:
    """The checkpoint to resume from, or None. Rank 0 decides (it alone deletes or writes checkpoints);
    every rank then reads the same file (the run folder is shared, as the features are)."""
    load = distributed.from_main(lambda: ckpt is not None and resume and ckpt.exists())
    if not load:
        return None
    state = load_checkpoint(ckpt, map_location=device)
    check_resumable(ckpt, state, config, model, n)
    return state


def _append_jsonl(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


class LoopOptions(TypedDict, total=False):
    """Options of a training run, the same in both modes (meanings: `fit`)."""

    class_counts: torch.Tensor | np.ndarray | list[int] | None
    progress: bool
    log_path: Path | str | None
    checkpoint_path: Path | str | None
    resume: bool
    checkpoint_every_s: float
    stop_after_epoch: int | None


def _epoch_sums(
    losses: list[torch.Tensor], weights: list[int], correct: list[torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """An epoch's summed loss (each part's mean loss times its counted samples) and correct count."""
    if not losses:
        return torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.long)
    w = torch.tensor(weights, dtype=torch.float32, device=device)
    return (torch.stack(losses) * w).sum(), torch.cat(correct).sum()


def train_epochs(
    model: nn.Module,
    feed: Feed,
    config: TrainConfig,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    labels: torch.Tensor,
    num_classes: int,
    device: torch.device,
    validate: Callable[[], dict[str, Any]] | None = None,
    class_counts: Any = None,
    progress: bool = True,
    log_path: Path | str | None = None,
    checkpoint_path: Path | str | None = None,
    resume: bool = True,
    checkpoint_every_s: float = 0.0,
    stop_after_epoch: int | None = None,
) -> list[dict[str, Any]]:
    """The one epoch loop (feature and fine-tune mode): label-smoothed / mixed soft targets, logit
    adjustment, AMP, gradient accumulation, resume, history, metrics.jsonl and checkpoints.

    validate() adds its metrics to each epoch's entry; the other options are `LoopOptions`. Each
    micro-batch's loss is weighted by its share of the step's samples, so accumulation computes the
    mean loss of the whole effective batch. Progress: one console line per model, the enclosing
    `trainer.progress.tracking()` one when there is one (its `enabled` then wins over `progress`),
    else a line named "train" when `progress`; epoch entries never go to the console.

    Under torchrun every rank runs this loop on its parts of the same global micro-batches (`Micro`);
    the loss and accuracy of an epoch are summed over the ranks; only rank 0 writes files and draws
    its own progress line."""
    n = len(labels)
    adjust = _adjustment(config, class_counts, labels, num_classes, device)
    use_amp, amp_dtype = amp_policy(config.amp, device)

    def amp() -> torch.autocast:
        return torch.autocast(device_type=device.type, dtype=amp_dtype)

    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    history: list[dict[str, Any]] = []
    start_epoch = 0
    main = distributed.is_main()
    ckpt = Path(checkpoint_path) if checkpoint_path else None
    state = _resume_state(ckpt, resume, device, config, model, n)
    if state is not None:
        model.load_state_dict(state["model_state"])
        optimizer.load_state_dict(state["optimizer_state"])
        scheduler.load_state_dict(state["scheduler_state"])
        if state.get("scaler_state"):
            scaler.load_state_dict(state["scaler_state"])
        set_rng_state(state["rng"], device, feed.gen, feed.np_rng)
        history = list(state.get("history", []))
        start_epoch = int(state["epoch"])
    log = Path(log_path) if log_path and main else None
    if log is not None:
        _write_jsonl(log, history)  # fresh run: empty; resumed: exactly the checkpoint's epochs

    acc = feed.accumulate
    spe = steps_per_epoch(n, config.batch_size, acc)
    last_save = time.monotonic()
    # One console line per model: the caller's (a selection's fits share one), else a line of our own.
    shown = progress_tracker()
    own_line = shown is None
    if shown is None:
        shown = ModelProgress("train", config.epochs, enabled=progress and main)
    shown.begin_fit(config.epochs, start_epoch, fit_summary(config))
    net = distributed.wrap(model, device, feed.find_unused)  # DDP under torchrun, else the model
    world = distributed.world()
    for epoch in range(start_epoch, config.epochs):
        net.train()
        t0 = time.time()
        sizes, batches = feed.batches(epoch)
        # Per-part loss and predictions, summed once at the epoch's end: a handful of tiny kernels per
        # step is a visible share of a small model's step (issue 16).
        part_losses: list[torch.Tensor] = []
        part_weights: list[int] = []
        part_correct: list[torch.Tensor] = []
        step = 0
        optimizer.zero_grad(set_to_none=True)
        smooth = config.label_smoothing
        for mb, part in enumerate(batches):
            b, y = part.b, part.b["y"]
            if part.targets is not None:  # the feed mixed inputs and targets already
                targets = part.targets
            else:
                targets = soft_targets(y, num_classes, smooth)
                if part.mix is not None:
                    lam, other = part.mix
                    for key in ("x", "nn_img", "nn_txt"):
                        if key in b:
                            b[key] = mixed(b[key], other[key], lam)
                    targets = mixed(targets, soft_targets(other["y"], num_classes, smooth), lam)
            step_end = mb + 1 == len(sizes) or (mb + 1) % acc == 0
            with distributed.no_sync(net, not step_end):  # gradients are exchanged once per step
                with amp() if use_amp else nullcontext():  # no autocast object per step without AMP
                    extra = {"nn_label": b["nn_label"]} if "nn_label" in b else {}  # an anchored L_R reads it
                    logits = net(b["x"], b.get("nn_img"), b.get("nn_txt"), **extra)
                logits = logits.float()
                # Probability targets: gradients bitwise those of -(t * log_softmax).sum(1).mean() (tested).
                loss = F.cross_entropy(logits + adjust if adjust is not None else logits, targets)
                first = mb - mb % acc
                # This part's share of the step's samples; DDP averages over the ranks, hence * world.
                weight = part.counted / sum(sizes[first : first + acc])
                weight = weight * world if world > 1 else weight
                # x * 1.0 is x, forward and backward: a whole step's part skips the multiply
                scaler.scale(loss if weight == 1 else loss * weight).backward()
            if part.counted:
                part_losses.append(loss.detach())
                part_weights.append(part.counted)
                part_correct.append(logits.detach().argmax(dim=1) == y)
            if step_end:
                if config.grad_clip:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                if scaler.is_enabled():
                    scaler.step(optimizer)
                    scaler.update()
                else:  # what a disabled scaler's step does, without its wrapper
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1
                shown.step(step, spe)
        loss_sum, correct = _epoch_sums(part_losses, part_weights, part_correct, device)
        distributed.all_reduce_sum(loss_sum)
        distributed.all_reduce_sum(correct)
        seconds = time.time() - t0
        entry: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": (epoch + 1) * spe,
            "loss": float(loss_sum) / n,
            # accuracy on the (mixed) training inputs against the unmixed labels: a trend, not a metric
            "train_acc": float(correct) / n,
            "lr": scheduler.get_last_lr()[0],
            **feed.extra(seconds),
            "time_s": round(seconds, 3),
        }
        if validate is not None:
            entry.update(validate())
        history.append(entry)
        shown.epoch(entry)  # the console line; the entry itself goes to the metrics file below
        stopping = stop_after_epoch is not None and epoch + 1 >= stop_after_epoch
        due = time.monotonic() - last_save >= checkpoint_every_s
        if ckpt is not None and main and (due or stopping or epoch + 1 == config.epochs):
            last_save = time.monotonic()
            save_checkpoint(
                ckpt,
                model,
                optimizer,
                scheduler,
                epoch + 1,
                config,
                rng=rng_state(device, feed.gen, feed.np_rng),
                history=history,
                num_train=n,
                scaler_state=scaler.state_dict() if scaler.is_enabled() else None,
            )
        if log is not None:
            _append_jsonl(log, entry)
        if stopping:
            break
    if own_line:
        shown.close()
    del net  # the DDP wrapper (its gradient hooks) ends with the fit
    model.eval()
    return history


# ------------------------------------------------------------------------------- feature mode
def _num_classes(model: nn.Module, train: RetrievalFeatures) -> int:
    cfg = getattr(model, "config", None)
    if cfg and "num_classes" in cfg:
        return int(cfg["num_classes"])
    return int(train.labels.max()) + 1


def _feature_feed(
    train: RetrievalFeatures, config: TrainConfig, device: torch.device, use_nn: bool, num_classes: int
) -> Feed:
    """Shuffled mini-batches of the in-memory features; mixup on the embeddings. Every rank draws the
    order and the mixup of each global batch, then gathers its part and its part's mixup partners.

    The inputs a model reads (z, and nn_img / nn_txt when it reads the neighbours) are gathered, and
    mixed in place (`mixed`: the loop's arithmetic, bit for bit), into two
    buffers per input that every step reuses: a fresh (B, k, D) float32 tensor per step and per
    operation cost more than the arithmetic (page faults on every new large allocation). The
    neighbours come from the split's resident tensors when it has them (`fit`). The soft targets are
    made once per split and mixed here too (`Micro.targets`). A yielded part's tensors are
    overwritten by the next part: the loop is done with a part when it asks for the next."""
    # The whole-epoch gather and mix are memory-bound copies of (N, D): they run on the threads the
    # process has (2x faster on 2 cores than on the one thread a small model's steps use).
    copy_threads = torch.get_num_threads()
    gen = torch.Generator().manual_seed(config.seed)  # shuffling and mixup permutations
    np_rng = np.random.default_rng(config.seed)  # mixup lambda
    n, bs = len(train), config.batch_size
    sources = {"x": "z", "nn_img": "nn_img", "nn_txt": "nn_txt"} if use_nn else {"x": "z"}
    widths = {"z": (train.img_dim,), "nn_img": (train.k, train.img_dim), "nn_txt": (train.k, train.txt_dim)}
    buffers: dict[tuple[str, int], torch.Tensor] = {}
    soft = soft_targets(train.labels, num_classes, config.label_smoothing)  # per row: the loop's values

    def gathered(key: str, which: int, idx: torch.Tensor) -> torch.Tensor:
        buf = buffers.get((key, which))
        if buf is None:
            rows = n if whole_epoch else bs  # a whole epoch's rows, or a batch's
            buf = torch.empty((rows, *widths[sources[key]]), dtype=torch.float32, device=train.device)
            buffers[(key, which)] = buf
        return train.gather_into(sources[key], idx, buf[: len(idx)])

    single = distributed.world() == 1
    row_bytes = 4 * sum(math.prod(widths[src]) for src in sources.values())
    whole_epoch = single and 2 * n * row_bytes <= EPOCH_INPUT_BYTES

    def draws(idxs: list[torch.Tensor]) -> list[tuple[float | None, torch.Tensor | None]]:
        """Each batch's mixup (lambda, partner permutation), drawn in the per-batch order."""
        out: list[tuple[float | None, torch.Tensor | None]] = []
        for idx in idxs:
            if config.mixup_alpha > 0:  # drawn for the global batch, on every rank alike
                lam = float(np_rng.beta(config.mixup_alpha, config.mixup_alpha))
                out.append((lam, torch.randperm(len(idx), generator=gen)))
            else:
                out.append((None, None))
        return out

    def epoch_items(perm: torch.Tensor, idxs: list[torch.Tensor]) -> Iterable[Micro]:
        """One process, small inputs: the whole epoch's batches gathered and mixed at once (a few ops
        on (N, D) instead of a dozen per step), then sliced. Per row the same products and sums as
        the per-batch path: lam and 1 - lam are each batch's float32 scalars, repeated per row."""
        mixes = draws(idxs)
        with intra_op_threads(copy_threads):
            b, targets = epoch_inputs(perm, idxs, mixes)
        start = 0
        for idx in idxs:
            stop = start + len(idx)
            yield Micro({k: v[start:stop] for k, v in b.items()}, None, len(idx), targets=targets[start:stop])
            start = stop

    def epoch_inputs(
        perm: torch.Tensor, idxs: list[torch.Tensor], mixes: list[tuple[float | None, torch.Tensor | None]]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The epoch's gathered and mixed inputs (and labels) and mixed soft targets, in `perm`'s order."""
        own = perm.to(train.device)
        b = {key: gathered(key, 0, own) for key in sources}
        targets = soft[own]
        if config.mixup_alpha > 0:
            partner = torch.cat([idx[p] for idx, (_, p) in zip(idxs, mixes, strict=True)]).to(train.device)
            sizes = torch.tensor([len(idx) for idx in idxs])

            def per_row(values: list[float]) -> torch.Tensor:  # (N,) float32, one value per batch
                return torch.tensor(values, dtype=torch.float32).repeat_interleave(sizes).to(train.device)

            lam = per_row([m[0] for m in mixes])
            for key, src in sources.items():
                shape = (n, *[1] * len(widths[src]))
                b[key] = mixed(b[key], gathered(key, 1, partner), lam.view(shape))
            targets = mixed(targets, soft[partner], lam[:, None])
        b["y"] = train.labels[own]
        if use_nn:
            b["nn_label"] = train.store_label[train.nn_rows[own]]
        return {k: v.to(device) for k, v in b.items()}, targets.to(device)

    def batches(epoch: int) -> tuple[list[int], Iterable[Micro]]:
        perm = torch.randperm(n, generator=gen)
        idxs = [perm[s : s + bs] for s in range(0, n, bs)]
        if whole_epoch:
            return [len(i) for i in idxs], epoch_items(perm, idxs)

        def items() -> Iterable[Micro]:
            for idx in idxs:
                lam = p = None
                if config.mixup_alpha > 0:  # drawn for the global batch, on every rank alike
                    lam = float(np_rng.beta(config.mixup_alpha, config.mixup_alpha))
                    p = torch.randperm(len(idx), generator=gen)
                needed, m, partner_at, counted = distributed.micro_shard(len(idx), p)
                rows = (idx if single else idx[torch.from_numpy(needed)]).to(train.device)
                own = rows[:m]
                b = {key: gathered(key, 0, own) for key in sources}
                b["y"] = train.labels[own]
                if use_nn:
                    b["nn_label"] = train.store_label[train.nn_rows[own]]
                targets = soft[own]
                mix = None
                if partner_at is not None and lam is not None:
                    partner = rows[torch.as_tensor(partner_at, device=rows.device)]
                    for key in sources:
                        b[key] = mixed(b[key], gathered(key, 1, partner), lam)
                    targets = mixed(targets, soft[partner], lam)
                    mix = (lam, {"y": train.labels[partner]})
                # Reused buffers: a blocking copy when the device differs (no copy is left in flight).
                b = {k: v.to(device) for k, v in b.items()}
                yield Micro(b, mix, counted, targets=targets.to(device))

        return [len(i) for i in idxs], items()

    return Feed(batches, gen=gen, np_rng=np_rng)


def fit(
    model: nn.Module,
    train: RetrievalFeatures,
    config: TrainConfig | None = None,
    val: RetrievalFeatures | None = None,
    on_epoch: Callable[[], dict[str, Any]] | None = None,
    **options: Unpack[LoopOptions],
) -> list[dict[str, Any]]:
    """Train `model` in place on `train`; return the history (one dict per finished epoch).

    class_counts: training samples per class for loss="logit_adjusted" (default: counted from
    train.labels). log_path: metrics.jsonl, one line per epoch (rewritten from the checkpoint's
    history on resume, so it always matches the checkpoint). checkpoint_path: written at the end of
    every epoch; with resume=True an existing one is loaded and training continues after its last
    finished epoch (its config must match). val: evaluated after every epoch (val_top1, val_top5);
    on_epoch() instead, when given (model selection keeps its best-on-val checkpoints there).
    stop_after_epoch: return once this many epochs are finished (time-sliced jobs; tests).
    checkpoint_every_s: write the checkpoint at the end of an epoch only when at least this many
    seconds passed since the last one (0 = every epoch); the last epoch (and a stop_after_epoch
    stop) is always written. Resuming is exact from any epoch's checkpoint."""
    config = config or TrainConfig()
    device = resolve_device(config.device)
    if len(train) == 0:
        raise UserError("no training samples")
    num_classes = _num_classes(model, train)
    check_labels(train.labels, num_classes)
    model.to(device)
    if device.type == "cuda" and config.features_on_device:
        train = train.to(device)
    if needs_neighbors(model):
        train.make_resident()  # the neighbours' vectors gathered once, when the split is small enough
    torch.manual_seed(config.seed)  # dropout (and CUDA) RNG
    feed = _feature_feed(train, config, device, needs_neighbors(model), num_classes)
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config, len(train))

    def validate() -> dict[str, Any]:
        m = evaluate(predict(model, val, config.eval_batch_size, device=device), val.labels)
        return {"val_top1": m["top1"], "val_top5": m["top5"]}

    check = on_epoch or (validate if val is not None else None)
    with intra_op_threads(head_threads(model, device, config.threads)):
        return train_epochs(
            model, feed, config, optimizer, scheduler, train.labels, num_classes, device, check, **options
        )


@torch.inference_mode()
def predict(
    model: nn.Module,
    features: RetrievalFeatures,
    batch_size: int = 1024,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Logits (N, C) as float32 on the CPU, in the order of the features (model in eval mode, fp32)."""
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    model.to(device).eval()
    use_nn = needs_neighbors(model)
    if use_nn:
        features.make_resident()  # a split evaluated every epoch gathers its neighbours once
    out = []
    with intra_op_threads(head_threads(model, device)):
        for start in range(0, len(features), batch_size):
            stop = min(start + batch_size, len(features))
            b = {k: v.to(device, non_blocking=True) for k, v in features.inputs(start, stop, use_nn).items()}
            out.append(
                model(b["z"], b.get("nn_img"), b.get("nn_txt"), nn_label=b.get("nn_label")).float().cpu()
            )
    if not out:
        return torch.zeros(0, _num_classes(model, features))
    return torch.cat(out)
