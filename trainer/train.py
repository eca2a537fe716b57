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

Feature mode: `fit` and `predict` (below). The pieces, one job each: the epoch loop both modes share
(`trainer/loop.py`, `train_epochs`), the batches it is fed (`trainer/feed.py`; feature mode's:
`trainer/feature_feed.py`), the optimizer and schedule (`trainer/optim.py`), targets, mixup and logit
adjustment (`trainer/loss.py`), AMP and threads (`trainer/runtime.py`; the device is
`artifacts.devices.resolve_device`'s). Their public names are importable from here too, as before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Unpack

import torch
from torch import nn

from retformer.artifacts.devices import resolve_device
from retformer.artifacts.errors import UserError
from retformer.trainer import distributed
from retformer.trainer.config import TrainConfig
from retformer.trainer.evaluate import evaluate
from retformer.trainer.feature_batches import map_batches
from retformer.trainer.feature_feed import EPOCH_INPUT_BYTES, feature_feed
from retformer.trainer.features import RetrievalFeatures
from retformer.trainer.feed import Batch, Feed, Micro, split_micro
from retformer.trainer.loop import LoopOptions, TrainingRun, train_epochs
from retformer.trainer.loss import logit_adjustment, loss_adjustment, mixed, soft_targets
from retformer.trainer.optim import (
    WarmupCosine,
    make_optimizer,
    make_scheduler,
    steps_per_epoch,
    weight_decay_groups,
)
from retformer.trainer.runtime import SMALL_HEAD_PARAMS, amp_policy, head_threads, intra_op_threads

# Re-exported: the names other modules, tests and benchmarks import from trainer.train.
__all__ = [
    "EPOCH_INPUT_BYTES",
    "SMALL_HEAD_PARAMS",
    "Batch",
    "Feed",
    "LoopOptions",
    "Micro",
    "TrainConfig",
    "TrainingRun",
    "WarmupCosine",
    "amp_policy",
    "check_labels",
    "feature_feed",
    "fit",
    "head_threads",
    "intra_op_threads",
    "logit_adjustment",
    "loss_adjustment",
    "make_optimizer",
    "make_scheduler",
    "mixed",
    "needs_neighbors",
    "predict",
    "soft_targets",
    "split_micro",
    "steps_per_epoch",
    "train_epochs",
    "weight_decay_groups",
]


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


def _num_classes(model: nn.Module, train: RetrievalFeatures) -> int:
    cfg = getattr(model, "config", None)
    if cfg and "num_classes" in cfg:
        return int(cfg["num_classes"])
    return int(train.labels.max()) + 1


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
    device = distributed.device_for(resolve_device(config.device, "training"))  # torchrun: own GPU
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
    feed = feature_feed(train, config, device, needs_neighbors(model), num_classes)
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config, len(train))

    def validate() -> dict[str, Any]:
        m = evaluate(predict(model, val, config.eval_batch_size, device=device), val.labels)
        return {"val_top1": m["top1"], "val_top5": m["top5"]}

    check = on_epoch or (validate if val is not None else None)
    with intra_op_threads(head_threads(model, device, config.threads)):
        run = TrainingRun(model, feed, config, optimizer, scheduler, train.labels, num_classes, device, check)
        return train_epochs(run, **options)


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

    def forward(b: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(b["z"], b.get("nn_img"), b.get("nn_txt"), nn_label=b.get("nn_label")).float().cpu()

    def empty() -> torch.Tensor:
        return torch.zeros(0, _num_classes(model, features))

    with intra_op_threads(head_threads(model, device)):
        return map_batches(
            features, forward, batch_size, empty, neighbors=use_nn, device=device, non_blocking=True
        )
