"""Fine-tune mode: the image encoder trains with the head (the paper's main "Ours" and "CLIP full FT").

What changes against feature mode (`train.py`, "w/ FE"): the query embedding z is the live output
of a trainable copy of the KB's image encoder (L2-normalised, as the frozen one was), computed from
images decoded and augmented in DataLoader workers. What does not change: retrieval. The neighbor
tables were computed once with the frozen encoder, and the neighbors' image and text embeddings
are still gathered per batch from the precomputed store (`features.py`); only the query moves.

Choices, documented:

- Images (`trainer/images.py`): read by random access from the dataset's shards (or its loader),
  augmented with draws seeded by (seed, epoch, sample).
- Mixup mixes the (normalised) pixels, the neighbors and the targets with one lambda and one
  permutation per micro-batch, as feature mode mixes embeddings.
- Two learning rates: `lr` for the head, `encoder_lr` (lower: a pretrained tower is easily
  destroyed) for the encoder; one warm-up + cosine curve scales both. No weight decay on biases,
  norms, class / position embeddings.
- `batch_size` images per forward pass, `accumulate` of them per optimizer step (effective batch
  batch_size x accumulate); each micro-batch's loss is weighted by its share of the step's samples,
  so accumulation computes the mean loss of the whole effective batch.
- AMP on CUDA: bfloat16 autocast where supported (no loss scaling needed), else float16 with a
  GradScaler. Ignored on the CPU.
- Checkpoints (model with encoder, optimizer, scheduler, scaler, RNG states, history) at epoch ends;
  data order and augmentation are functions of (seed, epoch), so a resumed run ends bitwise-equal to
  an uninterrupted one on the CPU.

The epoch loop (targets, mixup, logit adjustment, accumulation, AMP, resume, history, checkpoints) is
`trainer.train.train_epochs`, shared with feature mode; this module gives it the image `Feed`.

Under torchrun (`trainer/distributed.py`) each rank decodes its part of every global micro-batch plus
the mixup partners of its samples that other ranks hold (so with mixup a rank decodes up to twice its
share), and prediction is sharded by batches and gathered. BatchNorm layers (not in ViTs) become
SyncBatchNorm on CUDA; on the CPU (gloo has none) their batch statistics are per rank, so such an
encoder does not end exactly where one process would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Unpack

import numpy as np
import torch
from torch import nn

from retformer.artifacts.devices import resolve_device
from retformer.artifacts.errors import UserError
from retformer.trainer import distributed
from retformer.trainer.config import FinetuneConfig
from retformer.trainer.features import RetrievalFeatures
from retformer.trainer.finetune_model import FinetuneModel
from retformer.trainer.images import (
    ImageDataset,
    ShardImages,
    SplitImages,
    _EpochSampler,
    _loader,
    epoch_batches,
)
from retformer.trainer.train import (
    Feed,
    LoopOptions,
    Micro,
    TrainingRun,
    amp_policy,
    check_labels,
    make_scheduler,
    split_micro,
    train_epochs,
    weight_decay_groups,
)


def make_finetune_optimizer(model: FinetuneModel, config: FinetuneConfig) -> torch.optim.AdamW:
    """AdamW with lr for the head and encoder_lr for the encoder; no decay on 1-d params and embeddings."""
    groups = []
    for module, lr in ((model.head, config.lr), (model.encoder, config.encoder_lr)):
        groups += [{**g, "lr": lr} for g in weight_decay_groups(module, config.weight_decay)]
    return torch.optim.AdamW(groups)


# ------------------------------------------------------------------------------------ training
def _image_feed(
    model: FinetuneModel,
    images: ShardImages | SplitImages,
    train: RetrievalFeatures,
    config: FinetuneConfig,
    device: torch.device,
    extra: Callable[[float], dict[str, Any]],
) -> Feed:
    """Micro-batches of decoded, augmented images (DataLoader workers) with their neighbors; mixup on
    the pixels, seeded by (seed, epoch, micro-batch). The loader's batches are this rank's part of
    each global micro-batch and its part's mixup partners (`distributed.micro_shard`)."""
    dataset = ImageDataset(images, model.preprocess, model.image_size, config.crop_scale, config.hflip)
    sampler = _EpochSampler()
    loader = _loader(dataset, sampler, config.num_workers, device, persistent=True)
    n, alpha = len(train), config.mixup_alpha

    def batches(epoch: int) -> tuple[list[int], Any]:
        glob = epoch_batches(n, config.batch_size, config.seed, epoch, config.augment)
        plans = []
        for mb, items in enumerate(glob):
            lam = perm = None
            if alpha > 0:  # a function of (seed, epoch, micro-batch): the same on every rank
                rng = np.random.default_rng([config.seed, epoch, mb, 0x313])
                lam = float(rng.beta(alpha, alpha))
                perm = rng.permutation(len(items))
            plans.append((lam, *distributed.micro_shard(len(items), perm)))
        sampler.batches = [[items[j] for j in plan[1]] for items, plan in zip(glob, plans, strict=True)]

        def parts() -> Iterator[Micro]:
            for (x, idx), (lam, _, m, partner_at, counted) in zip(loader, plans, strict=True):
                b = train.batch(idx, neighbors=model.needs_neighbors)
                b = {k: v.to(device, non_blocking=True) for k, v in b.items() if k != "z"}
                b["x"] = x.to(device, non_blocking=True)
                yield split_micro(b, m, partner_at, lam, counted)

        return [len(items) for items in glob], parts()

    # find_unused: a KB encoder may hold layers its features skip (EfficientNet's classifier).
    return Feed(batches, accumulate=config.accumulate, find_unused=True, extra=extra)


def finetune_fit(
    model: FinetuneModel,
    images: ShardImages | SplitImages,
    train: RetrievalFeatures,
    config: FinetuneConfig,
    **options: Unpack[LoopOptions],
) -> list[dict[str, Any]]:
    """Train encoder + head in place on the images of `train` (same order as its uids); return the
    history (one dict per epoch). Arguments as `train.fit`; `images[i]` is the image of train query i."""
    device = distributed.device_for(resolve_device(config.device, "training"))  # torchrun: own GPU
    n = len(train)
    if n == 0:
        raise UserError("no training samples")
    if len(images) != n:
        raise ValueError(f"{len(images)} images for {n} training queries")
    num_classes = int(model.config["head"].get("num_classes") or int(train.labels.max()) + 1)
    check_labels(train.labels, num_classes)
    model.to(device)
    if device.type == "cuda" and config.features_on_device:
        train = train.to(device)
    if config.grad_checkpointing and hasattr(model.encoder, "set_grad_checkpointing"):
        model.encoder.set_grad_checkpointing(True)
    if distributed.active() and device.type == "cuda":
        # One process's batch statistics: BatchNorm over the global batch, not each rank's part.
        model.encoder = nn.SyncBatchNorm.convert_sync_batchnorm(model.encoder)
        model._enc.model = model.encoder
    torch.manual_seed(config.seed)  # dropout RNG (data order and augmentation have their own seeds)
    optimizer = make_finetune_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config, n, config.accumulate)

    def extra(seconds: float) -> dict[str, Any]:
        return {
            "encoder_lr": scheduler.get_last_lr()[-1] if config.encoder_lr else 0.0,
            "images_per_s": round(n / max(seconds, 1e-9), 1),
        }

    feed = _image_feed(model, images, train, config, device, extra)
    labels = train.labels
    run = TrainingRun(model, feed, config, optimizer, scheduler, labels, num_classes, device)
    history = train_epochs(run, **options)
    del run  # holds the feed too
    del feed  # stops the persistent DataLoader workers
    return history


@torch.inference_mode()
def finetune_predict(
    model: FinetuneModel,
    images: ShardImages | SplitImages,
    features: RetrievalFeatures,
    batch_size: int = 256,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    amp: bool = True,
) -> torch.Tensor:
    """Logits (N, C), float32 on the CPU, in the order of `features` (eval preprocessing, no mixup).
    Under torchrun each rank computes a contiguous run of the batches and every rank gets all logits."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device).eval()
    n = len(features)
    if len(images) != n:
        raise ValueError(f"{len(images)} images for {n} queries")
    sampler = _EpochSampler()
    every = [[(i, None) for i in range(s, min(s + batch_size, n))] for s in range(0, n, batch_size)]
    lo, hi = distributed.shard_bounds(len(every))  # the same batches as one process: the same logits
    sampler.batches = every[lo:hi]
    dataset = ImageDataset(images, model.preprocess, model.image_size)
    use_amp, dtype = amp_policy(amp, device)
    out = []
    for x, idx in _loader(dataset, sampler, num_workers, device, persistent=False):
        b = features.batch(idx, neighbors=model.needs_neighbors)
        b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
        with torch.autocast(device_type=device.type, dtype=dtype, enabled=use_amp):
            logits = model(x.to(device, non_blocking=True), b.get("nn_img"), b.get("nn_txt"))
        out.append(logits.float().cpu())
    if distributed.active():
        out = [t for part in distributed.all_gather(out) for t in part]
    if not out:
        return torch.zeros(0, int(model.config["head"].get("num_classes", 0)))
    return torch.cat(out)
