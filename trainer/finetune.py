"""Fine-tune mode: the image encoder trains with the head (the paper's main "Ours" and "CLIP full FT").

What changes against feature mode (`train.py`, "w/ FE"): the query embedding z is the live output
of a trainable copy of the KB's image encoder (L2-normalised, as the frozen one was), computed from
images decoded and augmented in DataLoader workers. What does not change: retrieval. The neighbour
tables were computed once with the frozen encoder, and the neighbours' image and text embeddings
are still gathered per batch from the precomputed store (`features.py`); only the query moves.

Choices, documented:

- Images come from the dataset's webdataset shards (`work/datasets/<d>/shards/<split>-*.tar`),
  read by random access: one pass over the tar headers records each member's byte offset, and a
  worker reads only the bytes of the images it decodes. `images: dataset` reads them through the
  dataset loader instead (the same uids).
- Augmentation: random resized crop (scale `crop_scale`, aspect 3/4..4/3) to the encoder's input
  size and a horizontal flip, then the encoder's own preprocessing (resize, centre crop, normalise).
  Every random draw comes from a generator seeded by (seed, epoch, sample), never from a worker's
  RNG: the images of epoch e are the same with any number of workers and after a resume.
- Mixup mixes the (normalised) pixels, the neighbours and the targets with one lambda and one
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
"""

from __future__ import annotations

import copy
import io
import json
import math
import multiprocessing
import os
import random
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

from artifacts.atomic import atomic_path
from artifacts.errors import UserError
from kb_builder.decode import to_rgb
from trainer.features import RetrievalFeatures
from trainer.train import (
    TrainConfig,
    WarmupCosine,
    load_checkpoint,
    logit_adjustment,
    resolve_device,
    save_checkpoint,
    soft_cross_entropy,
    soft_targets,
)

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
# FinetuneConfig fields that may change between a run and its resumption (they do not change the maths).
RESUMABLE_CHANGES = {"device", "features_on_device", "eval_batch_size", "num_workers"}


@dataclass
class FinetuneConfig(TrainConfig):
    """TrainConfig plus the encoder's training: its lr, accumulation, augmentation, data loading."""

    encoder_lr: float = 1e-5
    accumulate: int = 1  # micro-batches of batch_size per optimizer step
    num_workers: int = 4  # DataLoader worker processes decoding + augmenting images (0 = in-process)
    augment: bool = True
    crop_scale: tuple[float, float] = (0.5, 1.0)  # random resized crop: fraction of the image area
    hflip: bool = True
    images: str = "shards"  # "shards" (the dataset's webdataset shards) | "dataset" (its loader)
    grad_checkpointing: bool = False  # recompute encoder activations in backward (less GPU memory)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.crop_scale = tuple(float(x) for x in self.crop_scale)  # YAML gives a list
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise UserError(
                f"crop_scale must be [low, high] with 0 < low <= high <= 1, got {self.crop_scale}"
            )
        if self.accumulate < 1:
            raise UserError(f"accumulate must be >= 1, got {self.accumulate}")
        if self.num_workers < 0:
            raise UserError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.encoder_lr < 0:
            raise UserError(f"encoder_lr must be >= 0, got {self.encoder_lr}")
        if self.images not in ("shards", "dataset"):
            raise UserError(f"finetune images must be 'shards' or 'dataset', got {self.images!r}")


# --------------------------------------------------------------------------------------- images
class ShardImages:
    """Random access to the images of webdataset shards by uid: (shard, byte offset, size) per image.

    Plain arrays and paths, so it pickles cheaply into DataLoader workers; a worker opens the shard
    and reads only the image's bytes."""

    def __init__(self, shards: Sequence[Path], uids: Sequence[str]) -> None:
        self.paths = [str(p) for p in shards]
        where: dict[str, tuple[int, int, int]] = {}
        for s, path in enumerate(self.paths):
            for key, offset, size in _tar_images(Path(path)):
                where[key] = (s, offset, size)
        missing = [u for u in uids if u not in where]
        if missing:
            raise UserError(
                f"{len(missing)} of {len(uids)} images are not in the shards "
                f"{Path(self.paths[0]).parent if self.paths else '(none)'} (first: {missing[0]!r}); "
                "rerun `retformer shards --dataset ...` and the stages after it"
            )
        rows = np.array([where[u] for u in uids], dtype=np.int64).reshape(len(uids), 3)
        self.shard, self.offset, self.size = rows[:, 0].copy(), rows[:, 1].copy(), rows[:, 2].copy()

    def __len__(self) -> int:
        return len(self.shard)

    def load(self, i: int) -> Image.Image:
        """Image i (decoded, any mode)."""
        with open(self.paths[int(self.shard[i])], "rb") as fh:
            fh.seek(int(self.offset[i]))
            data = fh.read(int(self.size[i]))
        img = Image.open(io.BytesIO(data))
        img.load()
        return img


def _tar_images(path: Path) -> Iterator[tuple[str, int, int]]:
    """(key, data offset, size) of every image member of an uncompressed tar (headers only)."""
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                key, _, ext = base.partition(".")
                if ext.lower() in IMAGE_EXTS:
                    yield key, member.offset_data, member.size
    except (tarfile.TarError, EOFError) as exc:
        raise UserError(f"corrupt or truncated shard {path}: {exc}") from exc


class SplitImages:
    """The images of a kb_builder.datasets split, in the order of `uids`."""

    def __init__(self, split: Any, uids: Sequence[str]) -> None:
        row = {u: i for i, u in enumerate(split.uids)}
        missing = [u for u in uids if u not in row]
        if missing:
            raise UserError(f"{len(missing)} images are not in the dataset split (first: {missing[0]!r})")
        self.split = split.subset([row[u] for u in uids])

    def __len__(self) -> int:
        return len(self.split)

    def load(self, i: int) -> Image.Image:
        return self.split.image(int(i))


def shard_images(shard_dir: Path, split: str, uids: Sequence[str]) -> ShardImages:
    """The images of one split of a dataset's shard folder (`<split>-NNNNN.tar`), in `uids` order."""
    from kb_builder.shards import list_shards

    shards = (
        [p for p in list_shards(shard_dir) if p.name.startswith(f"{split}-")] if shard_dir.is_dir() else []
    )
    if not shards:
        raise UserError(
            f"no `{split}` shards in {shard_dir}: fine-tune mode reads the images from the dataset's "
            "shards (run `retformer shards --dataset ...`), or set finetune.images=dataset"
        )
    return ShardImages(shards, uids)


def random_resized_crop(
    img: Image.Image, size: int, scale: tuple[float, float], rng: random.Random
) -> Image.Image:
    """torchvision's RandomResizedCrop (aspect 3/4..4/3, 10 tries, then a centre crop), drawing from
    `rng` instead of the global torch RNG."""
    w, h = img.size
    area = w * h
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = round(math.sqrt(target * aspect))
        ch = round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = rng.randint(0, h - ch), rng.randint(0, w - cw)
            break
    else:
        cw = ch = min(w, h)
        top, left = (h - ch) // 2, (w - cw) // 2
    return img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + cw, top + ch))


class ImageDataset(torch.utils.data.Dataset):
    """Item (i, aug_seed) -> (preprocessed CHW tensor, i); aug_seed None = no augmentation (eval)."""

    def __init__(
        self,
        images: ShardImages | SplitImages,
        preprocess: Callable[[Image.Image], torch.Tensor],
        image_size: int,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        hflip: bool = True,
    ) -> None:
        self.images = images
        self.preprocess = preprocess
        self.image_size = image_size
        self.crop_scale = crop_scale
        self.hflip = hflip

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: tuple[int, int | None]) -> tuple[torch.Tensor, int]:
        i, aug_seed = item
        img = to_rgb(self.images.load(i))
        if aug_seed is not None:
            rng = random.Random(aug_seed)
            img = random_resized_crop(img, self.image_size, self.crop_scale, rng)
            if self.hflip and rng.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return self.preprocess(img), i


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, augment: bool) -> list[list[tuple]]:
    """The micro-batches of one epoch: a permutation seeded by (seed, epoch), each item (i, aug_seed)."""
    order = np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)
    # One distinct augmentation seed per (seed, epoch, sample), independent of the worker that decodes it.
    aug = np.random.default_rng([seed, epoch, 0xA06]).integers(0, 2**62, n) if augment else None
    items = [(int(i), int(aug[i]) if aug is not None else None) for i in order]
    return [items[s : s + batch_size] for s in range(0, n, batch_size)]


class _EpochSampler:
    """Batch sampler whose batches are set per epoch (it runs in the main process, so persistent
    workers keep serving it)."""

    def __init__(self) -> None:
        self.batches: list[list[tuple]] = []

    def __iter__(self) -> Iterator[list[tuple]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _loader(dataset: ImageDataset, sampler: Any, num_workers: int, device: torch.device, persistent: bool):
    # fork: workers inherit the dataset (and the encoder's transform) without pickling it.
    ctx = "fork" if num_workers and "fork" in multiprocessing.get_all_start_methods() else None
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=persistent and num_workers > 0,
        multiprocessing_context=ctx,
    )


# ---------------------------------------------------------------------------------------- model
class FinetuneModel(nn.Module):
    """A trainable copy of a KB image encoder followed by a head with the trainer's signature:
    forward(images, nn_img, nn_txt) = head(normalize(encoder(images)), nn_img, nn_txt)."""

    def __init__(self, image_encoder: Any, head: nn.Module) -> None:
        super().__init__()
        # Copy the tower: the loaded encoder may be shared (open_clip's cache) and must stay frozen.
        enc = copy.copy(image_encoder)
        enc.model = copy.deepcopy(image_encoder.model)
        enc.model.requires_grad_(True)
        self._enc = enc  # not a module attribute: its tower is registered below as `encoder`
        self.encoder = enc.model
        self.head = head
        self.preprocess = enc.preprocess
        self.image_size = int(enc.image_size)
        self.needs_neighbours = bool(getattr(head, "needs_neighbours", True))
        self.config: dict[str, Any] = {
            "kind": "finetune",
            "encoder": dict(getattr(enc, "spec", {})),
            "head": dict(getattr(head, "config", {})),
        }

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """z: the encoder's features, L2-normalised in float32 (as the KB's were)."""
        return F.normalize(self._enc._features(images).float(), dim=-1)

    def forward(
        self, images: torch.Tensor, nn_img: torch.Tensor | None = None, nn_txt: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.head(self.encode(images), nn_img, nn_txt)

    def no_weight_decay(self) -> set[str]:
        """Class / position embeddings of the encoder and the head (ViT practice)."""
        out = set()
        for prefix, module in (("encoder.", self.encoder), ("head.", self.head)):
            if hasattr(module, "no_weight_decay"):
                out |= {prefix + n for n in module.no_weight_decay()}
        return out


def make_finetune_optimizer(model: FinetuneModel, config: FinetuneConfig) -> torch.optim.AdamW:
    """AdamW with lr for the head and encoder_lr for the encoder; no decay on 1-d params and embeddings."""
    skip = model.no_weight_decay()
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = (name.startswith("encoder."), not (p.ndim < 2 or name in skip))
        groups.setdefault(key, []).append(p)
    return torch.optim.AdamW(
        [
            {
                "params": params,
                "lr": config.encoder_lr if is_enc else config.lr,
                "weight_decay": config.weight_decay if decay else 0.0,
            }
            for (is_enc, decay), params in sorted(groups.items())
        ]
    )


# ------------------------------------------------------------------------------------ training
def _amp(config: TrainConfig, device: torch.device) -> tuple[bool, torch.dtype]:
    if not (config.amp and device.type == "cuda"):
        return False, torch.float32
    return True, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _check_resumable(path: Path, state: dict[str, Any], model: FinetuneModel, config: FinetuneConfig, n: int):
    saved = state.get("train_config") or {}
    now = asdict(config)
    diff = [
        f.name for f in fields(config) if f.name not in RESUMABLE_CHANGES and saved.get(f.name) != now[f.name]
    ]
    if diff:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in diff)
        raise UserError(f"{path} was written with a different config ({details}); delete it to start over")
    if state.get("model_config") != model.config:
        raise UserError(
            f"{path} holds a different model ({state.get('model_config')}); delete it to start over"
        )
    if state.get("num_train") != n:
        raise UserError(f"{path} was trained on {state.get('num_train')} samples, this run has {n}")


def finetune_fit(
    model: FinetuneModel,
    images: ShardImages | SplitImages,
    train: RetrievalFeatures,
    config: FinetuneConfig,
    class_counts: Sequence[int] | None = None,
    progress: bool = True,
    log_path: Path | str | None = None,
    checkpoint_path: Path | str | None = None,
    resume: bool = True,
    checkpoint_every_s: float = 0.0,
    stop_after_epoch: int | None = None,
) -> list[dict[str, Any]]:
    """Train encoder + head in place on the images of `train` (same order as its uids); return the
    history (one dict per epoch). Arguments as `train.fit`; `images[i]` is the image of train query i."""
    device = resolve_device(config.device)
    n = len(train)
    if n == 0:
        raise UserError("no training samples")
    if len(images) != n:
        raise ValueError(f"{len(images)} images for {n} training queries")
    num_classes = int(model.config["head"].get("num_classes") or int(train.labels.max()) + 1)
    if int(train.labels.min()) < 0 or int(train.labels.max()) >= num_classes:
        raise UserError(f"training labels must be in [0, {num_classes})")
    use_nn = model.needs_neighbours

    model.to(device)
    if device.type == "cuda" and config.features_on_device:
        train = train.to(device)
    if config.grad_checkpointing and hasattr(model.encoder, "set_grad_checkpointing"):
        model.encoder.set_grad_checkpointing(True)
    torch.manual_seed(config.seed)  # dropout RNG (data order and augmentation have their own seeds)
    optimizer = make_finetune_optimizer(model, config)
    micro = math.ceil(n / config.batch_size)
    spe = math.ceil(micro / config.accumulate)  # optimizer steps per epoch
    schedule = WarmupCosine(round(config.warmup_epochs * spe), config.epochs * spe, config.min_lr / config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    use_amp, amp_dtype = _amp(config, device)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    adjust = None
    if config.loss == "logit_adjusted":
        counts = (
            class_counts
            if class_counts is not None
            else torch.bincount(train.labels.cpu(), minlength=num_classes)
        )
        if len(counts) != num_classes:
            raise UserError(f"class_counts has {len(counts)} entries, the model has {num_classes} classes")
        adjust = logit_adjustment(counts, config.la_tau).to(device)

    history: list[dict[str, Any]] = []
    start_epoch = 0
    ckpt = Path(checkpoint_path) if checkpoint_path else None
    if ckpt is not None and resume and ckpt.exists():
        state = load_checkpoint(ckpt, map_location=device)
        _check_resumable(ckpt, state, model, config, n)
        model.load_state_dict(state["model_state"])
        optimizer.load_state_dict(state["optimizer_state"])
        scheduler.load_state_dict(state["scheduler_state"])
        if state.get("scaler_state"):
            scaler.load_state_dict(state["scaler_state"])
        torch.set_rng_state(state["rng"]["torch"].cpu())
        if device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), device)
        history = list(state.get("history", []))
        start_epoch = int(state["epoch"])
    log = Path(log_path) if log_path else None
    if log is not None:
        with atomic_path(log) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in history))

    dataset = ImageDataset(images, model.preprocess, model.image_size, config.crop_scale, config.hflip)
    sampler = _EpochSampler()
    loader = _loader(dataset, sampler, config.num_workers, device, persistent=True)
    last_save = time.monotonic()
    for epoch in range(start_epoch, config.epochs):
        model.train()
        t0 = time.time()
        sampler.batches = epoch_batches(n, config.batch_size, config.seed, epoch, config.augment)
        sizes = [len(b) for b in sampler.batches]
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        bar = tqdm(total=spe, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not progress, leave=False)
        optimizer.zero_grad(set_to_none=True)
        for mb, (x, idx) in enumerate(loader):
            step_start = mb - mb % config.accumulate
            step_total = sum(sizes[step_start : step_start + config.accumulate])
            x = x.to(device, non_blocking=True)
            b = {k: v.to(device, non_blocking=True) for k, v in train.batch(idx, neighbours=use_nn).items()}
            y = b["y"]
            targets = soft_targets(y, num_classes, config.label_smoothing)
            if config.mixup_alpha > 0:
                rng = np.random.default_rng([config.seed, epoch, mb, 0x313])
                lam = float(rng.beta(config.mixup_alpha, config.mixup_alpha))
                p = torch.from_numpy(rng.permutation(len(y))).to(device)
                x = lam * x + (1 - lam) * x[p]
                for key in ("nn_img", "nn_txt"):
                    if key in b:
                        b[key] = lam * b[key] + (1 - lam) * b[key][p]
                targets = lam * targets + (1 - lam) * targets[p]
            with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
                logits = model(x, b.get("nn_img"), b.get("nn_txt"))
            logits = logits.float()
            loss = soft_cross_entropy(logits + adjust if adjust is not None else logits, targets)
            scaler.scale(loss * (len(y) / step_total)).backward()
            loss_sum += loss.detach() * len(y)
            correct += (logits.detach().argmax(dim=1) == y).sum()
            if mb + 1 == len(sizes) or (mb + 1) % config.accumulate == 0:
                if config.grad_clip:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                bar.update(1)
                if progress:
                    bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        bar.close()
        entry: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": (epoch + 1) * spe,
            "loss": float(loss_sum) / n,
            "train_acc": float(correct) / n,
            "lr": scheduler.get_last_lr()[0],
            "encoder_lr": scheduler.get_last_lr()[-1] if config.encoder_lr else 0.0,
            "images_per_s": round(n / max(time.time() - t0, 1e-9), 1),
            "time_s": round(time.time() - t0, 3),
        }
        history.append(entry)
        if progress:
            tqdm.write(json.dumps(entry))
        stopping = stop_after_epoch is not None and epoch + 1 >= stop_after_epoch
        due = time.monotonic() - last_save >= checkpoint_every_s
        if ckpt is not None and (due or stopping or epoch + 1 == config.epochs):
            last_save = time.monotonic()
            rng_state = {"torch": torch.get_rng_state()}
            if device.type == "cuda":
                rng_state["cuda"] = torch.cuda.get_rng_state(device)
            save_checkpoint(
                ckpt,
                model,
                optimizer,
                scheduler,
                epoch + 1,
                config,
                rng=rng_state,
                history=history,
                num_train=n,
                scaler_state=scaler.state_dict() if scaler.is_enabled() else None,
            )
        if log is not None:
            with open(log, "a") as fh:
                fh.write(json.dumps(entry) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        if stopping:
            break
    del loader  # stop the persistent workers
    model.eval()
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
    """Logits (N, C), float32 on the CPU, in the order of `features` (eval preprocessing, no mixup)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device).eval()
    n = len(features)
    if len(images) != n:
        raise ValueError(f"{len(images)} images for {n} queries")
    sampler = _EpochSampler()
    sampler.batches = [[(i, None) for i in range(s, min(s + batch_size, n))] for s in range(0, n, batch_size)]
    dataset = ImageDataset(images, model.preprocess, model.image_size)
    use_amp = amp and device.type == "cuda"
    dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    out = []
    for x, idx in _loader(dataset, sampler, num_workers, device, persistent=False):
        b = features.batch(idx, neighbours=model.needs_neighbours)
        b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
        with torch.autocast(device_type=device.type, dtype=dtype, enabled=use_amp):
            logits = model(x.to(device, non_blocking=True), b.get("nn_img"), b.get("nn_txt"))
        out.append(logits.float().cpu())
    if not out:
        return torch.zeros(0, int(model.config["head"].get("num_classes", 0)))
    return torch.cat(out)
