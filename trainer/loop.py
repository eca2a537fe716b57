"""The one epoch loop of both training modes (feature mode: `trainer.train.fit`; fine-tune mode:
`trainer/finetune.py`): they differ only in the `Feed` that delivers their micro-batches and in the
optimizer they build, which they hand over as one `TrainingRun`."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict, Unpack

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from retformer.artifacts.atomic import atomic_path
from retformer.trainer import distributed
from retformer.trainer.checkpoint import (
    check_resumable,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from retformer.trainer.config import TrainConfig
from retformer.trainer.feed import Batch, Feed, Micro
from retformer.trainer.loss import loss_adjustment, mixed, soft_targets
from retformer.trainer.optim import steps_per_epoch
from retformer.trainer.progress import ModelProgress
from retformer.trainer.progress import current as progress_tracker
from retformer.trainer.runtime import amp_policy


class Fitting(nn.Module):
    """The model as the training step calls it: forward is the model's `training_logits` (a stacked
    RetFormer's L_R alone; else its prediction), while the model's own forward stays the prediction. DDP
    wraps this module, so the step still goes through DDP's forward and its gradient hooks."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *inputs: Any, **options: Any) -> torch.Tensor:
        return self.model.training_logits(*inputs, **options)


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


@dataclass
class TrainingRun:
    """What the epoch loop trains, on what and with what: one per fit, built by its mode.

    model: trained in place. feed: the mode's micro-batches and RNGs. labels: every training label
    (their count is the epoch's sample count; logit adjustment counts the classes from them when the
    options give no class_counts). validate(): metrics added to each epoch's entry, or None."""

    model: nn.Module
    feed: Feed
    config: TrainConfig
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    labels: torch.Tensor
    num_classes: int
    device: torch.device
    validate: Callable[[], dict[str, Any]] | None = None


@dataclass
class _LoopState:
    """What the loop carries across epochs: the loss terms, AMP, the history resumed or begun, and where
    it writes (the checkpoint and the metrics file; rank 0 only)."""

    n: int
    adjust: torch.Tensor | None
    use_amp: bool
    amp_dtype: torch.dtype
    scaler: torch.amp.GradScaler
    history: list[dict[str, Any]]
    start_epoch: int
    ckpt: Path | None
    log: Path | None
    main: bool
    spe: int
    world: int


def _start(run: TrainingRun, options: LoopOptions) -> _LoopState:
    """The loop's state before its first epoch: resumed from the checkpoint when there is one to resume,
    the metrics file rewritten to match it (fresh run: empty)."""
    n = len(run.labels)
    adjust = loss_adjustment(run.config, options.get("class_counts"), run.labels, run.num_classes, run.device)
    use_amp, amp_dtype = amp_policy(run.config.amp, run.device)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    history: list[dict[str, Any]] = []
    start_epoch = 0
    main = distributed.is_main()
    checkpoint_path = options.get("checkpoint_path")
    ckpt = Path(checkpoint_path) if checkpoint_path else None
    state = _resume_state(ckpt, options.get("resume", True), run.device, run.config, run.model, n)
    if state is not None:
        run.model.load_state_dict(state["model_state"])
        run.optimizer.load_state_dict(state["optimizer_state"])
        run.scheduler.load_state_dict(state["scheduler_state"])
        if state.get("scaler_state"):
            scaler.load_state_dict(state["scaler_state"])
        set_rng_state(state["rng"], run.device, run.feed.gen, run.feed.np_rng)
        history = list(state.get("history", []))
        start_epoch = int(state["epoch"])
    log_path = options.get("log_path")
    log = Path(log_path) if log_path and main else None
    if log is not None:
        _write_jsonl(log, history)  # fresh run: empty; resumed: exactly the checkpoint's epochs
    spe = steps_per_epoch(n, run.config.batch_size, run.feed.accumulate)
    return _LoopState(
        n, adjust, use_amp, amp_dtype, scaler, history, start_epoch, ckpt, log, main, spe, distributed.world()
    )


def train_epochs(run: TrainingRun, **options: Unpack[LoopOptions]) -> list[dict[str, Any]]:
    """The one epoch loop (feature and fine-tune mode): label-smoothed / mixed soft targets, logit
    adjustment, AMP, gradient accumulation, resume, history, metrics.jsonl and checkpoints.

    run.validate() adds its metrics to each epoch's entry; the options are `LoopOptions` (meanings:
    `trainer.train.fit`). Each micro-batch's loss is weighted by its share of the step's samples, so
    accumulation computes the mean loss of the whole effective batch. Progress: one console line per
    model, the enclosing `trainer.progress.tracking()` one when there is one (its `enabled` then wins
    over `progress`), else a line named "train" when `progress`; epoch entries never go to the console.

    Under torchrun every rank runs this loop on its parts of the same global micro-batches (`Micro`);
    the loss and accuracy of an epoch are summed over the ranks; only rank 0 writes files and draws
    its own progress line."""
    unknown = set(options) - set(LoopOptions.__annotations__)
    if unknown:
        raise TypeError(f"train_epochs() got unexpected options {sorted(unknown)}")
    config = run.config
    state = _start(run, options)
    stop_after_epoch = options.get("stop_after_epoch")
    last_save = time.monotonic()
    # One console line per model: the caller's (a selection's fits share one), else a line of our own.
    shown = progress_tracker()
    own_line = shown is None
    if shown is None:
        shown = ModelProgress("train", config.epochs, enabled=options.get("progress", True) and state.main)
    shown.begin_fit(config.epochs, state.start_epoch, config)
    # DDP under torchrun, else the model; either way its forward gives the logits training fits
    net = distributed.wrap(Fitting(run.model), run.device, run.feed.find_unused)
    for epoch in range(state.start_epoch, config.epochs):
        net.train()
        t0 = time.time()
        loss_sum, correct = _epoch(run, state, net, epoch, shown)
        entry = _entry(run, state, epoch, loss_sum, correct, time.time() - t0)
        state.history.append(entry)
        shown.epoch(entry)  # the console line; the entry itself goes to the metrics file below
        stopping = stop_after_epoch is not None and epoch + 1 >= stop_after_epoch
        due = time.monotonic() - last_save >= options.get("checkpoint_every_s", 0.0)
        if state.ckpt is not None and state.main and (due or stopping or epoch + 1 == config.epochs):
            last_save = time.monotonic()
            _save(run, state, epoch + 1)
        if state.log is not None:
            _append_jsonl(state.log, entry)
        if stopping:
            break
    if own_line:
        shown.close()
    del net  # the DDP wrapper (its gradient hooks) ends with the fit
    run.model.eval()
    return state.history


def _epoch(
    run: TrainingRun, state: _LoopState, net: nn.Module, epoch: int, shown: ModelProgress
) -> tuple[torch.Tensor, torch.Tensor]:
    """One epoch's micro-batches and optimizer steps; its loss sum and correct count over all ranks."""
    sizes, batches = run.feed.batches(epoch)
    acc = run.feed.accumulate
    # Per-part loss and predictions, summed once at the epoch's end: a handful of tiny kernels per
    # step is a visible share of a small model's step (issue 16).
    part_losses: list[torch.Tensor] = []
    part_weights: list[int] = []
    part_correct: list[torch.Tensor] = []
    step = 0
    run.optimizer.zero_grad(set_to_none=True)
    for mb, part in enumerate(batches):
        y = part.b["y"]
        targets = _targets(part, run.num_classes, run.config.label_smoothing)
        step_end = mb + 1 == len(sizes) or (mb + 1) % acc == 0
        first = mb - mb % acc
        # This part's share of the step's samples; DDP averages over the ranks, hence * world.
        weight = part.counted / sum(sizes[first : first + acc])
        weight = weight * state.world if state.world > 1 else weight
        loss, logits = _forward_backward(run, state, net, part.b, targets, weight, sync=step_end)
        if part.counted:
            part_losses.append(loss.detach())
            part_weights.append(part.counted)
            part_correct.append(logits.detach().argmax(dim=1) == y)
        if step_end:
            _optimizer_step(run, state.scaler)
            step += 1
            shown.step(step, state.spe)
    loss_sum, correct = _epoch_sums(part_losses, part_weights, part_correct, run.device)
    distributed.all_reduce_sum(loss_sum)
    distributed.all_reduce_sum(correct)
    return loss_sum, correct


def _targets(part: Micro, num_classes: int, smooth: float) -> torch.Tensor:
    """The part's soft targets: the feed's (inputs and targets mixed already), else label-smoothed and,
    with a mixup partner, mixed here along with the part's inputs (in place in `part.b`)."""
    if part.targets is not None:
        return part.targets
    b = part.b
    targets = soft_targets(b["y"], num_classes, smooth)
    if part.mix is not None:
        lam, other = part.mix
        for key in ("x", "nn_img", "nn_txt"):
            if key in b:
                b[key] = mixed(b[key], other[key], lam)
        targets = mixed(targets, soft_targets(other["y"], num_classes, smooth), lam)
    return targets


def _forward_backward(
    run: TrainingRun,
    state: _LoopState,
    net: nn.Module,
    b: Batch,
    targets: torch.Tensor,
    weight: float,
    sync: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, loss and backward of one part (its loss scaled by `weight`); (loss, float logits).
    Gradients are exchanged between ranks only when `sync` (once per optimizer step)."""
    with distributed.no_sync(net, not sync):
        # No autocast object per step without AMP.
        amp = (
            torch.autocast(device_type=run.device.type, dtype=state.amp_dtype)
            if state.use_amp
            else nullcontext()
        )
        with amp:
            extra = {"nn_label": b["nn_label"]} if "nn_label" in b else {}  # an anchored L_R reads it
            logits = net(b["x"], b.get("nn_img"), b.get("nn_txt"), **extra)
        logits = logits.float()
        # Probability targets: gradients bitwise those of -(t * log_softmax).sum(1).mean() (tested).
        loss = F.cross_entropy(logits + state.adjust if state.adjust is not None else logits, targets)
        # x * 1.0 is x, forward and backward: a whole step's part skips the multiply
        state.scaler.scale(loss if weight == 1 else loss * weight).backward()
    return loss, logits


def _optimizer_step(run: TrainingRun, scaler: torch.amp.GradScaler) -> None:
    """One optimizer step on the accumulated gradients (clipped when configured), then the schedule's."""
    if run.config.grad_clip:
        scaler.unscale_(run.optimizer)
        nn.utils.clip_grad_norm_(run.model.parameters(), run.config.grad_clip)
    if scaler.is_enabled():
        scaler.step(run.optimizer)
        scaler.update()
    else:  # what a disabled scaler's step does, without its wrapper
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()


def _entry(
    run: TrainingRun,
    state: _LoopState,
    epoch: int,
    loss_sum: torch.Tensor,
    correct: torch.Tensor,
    seconds: float,
) -> dict[str, Any]:
    """An epoch's history entry (and metrics.jsonl line), validation metrics included."""
    entry: dict[str, Any] = {
        "epoch": epoch + 1,
        "step": (epoch + 1) * state.spe,
        "loss": float(loss_sum) / state.n,
        # accuracy on the (mixed) training inputs against the unmixed labels: a trend, not a metric
        "train_acc": float(correct) / state.n,
        "lr": run.scheduler.get_last_lr()[0],
        **run.feed.extra(seconds),
        "time_s": round(seconds, 3),
    }
    if run.validate is not None:
        entry.update(run.validate())
    return entry


def _save(run: TrainingRun, state: _LoopState, epochs_done: int) -> None:
    """The checkpoint after `epochs_done` epochs: everything an exact resume needs."""
    save_checkpoint(
        state.ckpt,
        run.model,
        run.optimizer,
        run.scheduler,
        epochs_done,
        run.config,
        rng=rng_state(run.device, run.feed.gen, run.feed.np_rng),
        history=state.history,
        num_train=state.n,
        scaler_state=state.scaler.state_dict() if state.scaler.is_enabled() else None,
    )
