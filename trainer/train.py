"""Training loop over in-memory retrieval features (frozen encoders: "feature mode").

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
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from artifacts.atomic import atomic_path
from artifacts.errors import UserError
from trainer.evaluate import evaluate
from trainer.features import RetrievalFeatures
from trainer.model import model_from_config

CHECKPOINT_FORMAT = "retformer-trainer-checkpoint/1"
# TrainConfig fields that may change between a run and its resumption (they do not change the maths).
_RESUMABLE_CHANGES = {"device", "features_on_device", "eval_batch_size"}


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (defaults: the paper's recipe)."""

    epochs: int = 25
    batch_size: int = 256
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup_epochs: float = 1.0
    min_lr: float = 0.0
    label_smoothing: float = 0.1
    mixup_alpha: float = 0.2  # 0 = off
    loss: str = "ce"  # "ce" | "logit_adjusted"
    la_tau: float = 1.0  # logit-adjustment strength (Menon et al. use 1)
    grad_clip: float | None = None
    seed: int = 0
    device: str = "auto"  # "auto" = cuda if available, else cpu
    amp: bool = True  # bfloat16 autocast on CUDA; ignored on the CPU
    features_on_device: bool = True  # copy the features to the GPU once; gather batches there
    eval_batch_size: int = 1024

    def __post_init__(self) -> None:
        if self.loss not in ("ce", "logit_adjusted"):
            raise UserError(f"loss must be 'ce' or 'logit_adjusted', got {self.loss!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise UserError("epochs and batch_size must be >= 1")
        if not 0 <= self.label_smoothing < 1:
            raise UserError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.mixup_alpha < 0:
            raise UserError(f"mixup_alpha must be >= 0, got {self.mixup_alpha}")


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    """Optimizer steps in one epoch (the last, smaller batch is kept)."""
    return math.ceil(num_samples / batch_size)


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with no decay on biases, norms, class tokens and position embeddings."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name in skip else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr)


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, num_samples: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step warm-up + cosine schedule for `config.epochs` epochs over `num_samples` samples."""
    spe = steps_per_epoch(num_samples, config.batch_size)
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


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum_c t_c log softmax(logits)_c (targets may be mixed / smoothed)."""
    return -(targets * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


def _num_classes(model: nn.Module, train: RetrievalFeatures) -> int:
    cfg = getattr(model, "config", None)
    if cfg and "num_classes" in cfg:
        return int(cfg["num_classes"])
    return int(train.labels.max()) + 1


def _model_inputs(model: nn.Module, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return (b["z"], b.get("nn_img"), b.get("nn_txt"))


def _needs_neighbours(model: nn.Module) -> bool:
    return bool(getattr(model, "needs_neighbours", True))


def save_checkpoint(
    path: Path | str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    epoch: int,
    config: TrainConfig | None,
    **extra: Any,
) -> None:
    """Write a checkpoint atomically (temporary name, then os.replace): a kill never leaves a torn file.
    `epoch` = number of finished epochs; `extra` (rng states, history, ...) is stored as is."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "model_config": getattr(model, "config", None),
        "model_state": model.state_dict(),
        "optimizer_state": optimizer.state_dict() if optimizer is not None else None,
        "scheduler_state": scheduler.state_dict() if scheduler is not None else None,
        "epoch": epoch,
        "train_config": asdict(config) if config is not None else None,
        **extra,
    }
    with atomic_path(Path(path)) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path | str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by save_checkpoint; a corrupt or foreign file is a UserError naming it."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError as exc:
        raise UserError(f"checkpoint not found: {path}") from exc
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a torn/foreign file
        raise UserError(f"unreadable checkpoint {path}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a RetFormer trainer checkpoint")
    return state


def load_model(path: Path | str, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a checkpoint's model (architecture from its config, then its weights), in eval mode."""
    state = load_checkpoint(path, map_location)
    if state.get("model_config") is None:
        raise UserError(f"{path} has no model config; cannot rebuild the model")
    model = model_from_config(state["model_config"])
    model.load_state_dict(state["model_state"])
    return model.eval()


def _rng_state(gen: torch.Generator, np_rng: np.random.Generator, device: torch.device) -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "shuffle": gen.get_state(),
        "numpy": np_rng.bit_generator.state,
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(
    state: dict[str, Any], gen: torch.Generator, np_rng: np.random.Generator, device: torch.device
) -> None:
    torch.set_rng_state(state["torch"].cpu())
    gen.set_state(state["shuffle"].cpu())
    np_rng.bit_generator.state = state["numpy"]
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def _check_resumable(
    path: Path, state: dict[str, Any], model: nn.Module, config: TrainConfig, n: int
) -> None:
    saved = state.get("train_config") or {}
    now = asdict(config)
    diff = [
        f.name
        for f in fields(TrainConfig)
        if f.name not in _RESUMABLE_CHANGES and saved.get(f.name) != now[f.name]
    ]
    if diff:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in diff)
        raise UserError(
            f"{path} was written with a different training config ({details}); "
            "use the same config or delete the checkpoint to start over"
        )
    if state.get("model_config") != getattr(model, "config", None):
        raise UserError(
            f"{path} holds a different model ({state.get('model_config')}); delete it to start over"
        )
    if state.get("num_train") != n:
        raise UserError(f"{path} was trained on {state.get('num_train')} samples, this run has {n}")


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))


def fit(
    model: nn.Module,
    train: RetrievalFeatures,
    config: TrainConfig | None = None,
    class_counts: torch.Tensor | np.ndarray | list[int] | None = None,
    progress: bool = True,
    log_path: Path | str | None = None,
    checkpoint_path: Path | str | None = None,
    resume: bool = True,
    val: RetrievalFeatures | None = None,
    stop_after_epoch: int | None = None,
    checkpoint_every_s: float = 0.0,
) -> list[dict[str, Any]]:
    """Train `model` in place on `train`; return the history (one dict per finished epoch).

    class_counts: training samples per class for loss="logit_adjusted" (default: counted from
    train.labels). log_path: metrics.jsonl, one line per epoch (rewritten from the checkpoint's
    history on resume, so it always matches the checkpoint). checkpoint_path: written at the end of
    every epoch; with resume=True an existing one is loaded and training continues after its last
    finished epoch (its config must match). val: evaluated after every epoch (val_top1, val_top5).
    stop_after_epoch: return once this many epochs are finished (time-sliced jobs; tests).
    checkpoint_every_s: write the checkpoint at the end of an epoch only when at least this many
    seconds passed since the last one (0 = every epoch); the last epoch (and a stop_after_epoch
    stop) is always written. Resuming is exact from any epoch's checkpoint."""
    config = config or TrainConfig()
    device = resolve_device(config.device)
    n = len(train)
    if n == 0:
        raise UserError("no training samples")
    num_classes = _num_classes(model, train)
    if int(train.labels.min()) < 0 or int(train.labels.max()) >= num_classes:
        raise UserError(
            f"training labels must be in [0, {num_classes}); unlabelled (-1) queries cannot be trained on"
        )
    use_nn = _needs_neighbours(model)

    model.to(device)
    if device.type == "cuda" and config.features_on_device:
        train = train.to(device)
    torch.manual_seed(config.seed)  # dropout (and CUDA) RNG
    gen = torch.Generator().manual_seed(config.seed)  # shuffling and mixup permutations
    np_rng = np.random.default_rng(config.seed)  # mixup lambda
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config, n)

    adjust = None
    if config.loss == "logit_adjusted":
        if class_counts is None:
            class_counts = torch.bincount(train.labels.cpu(), minlength=num_classes)
        if len(class_counts) != num_classes:
            raise UserError(
                f"class_counts has {len(class_counts)} entries, the model has {num_classes} classes"
            )
        adjust = logit_adjustment(class_counts, config.la_tau).to(device)

    history: list[dict[str, Any]] = []
    start_epoch = 0
    ckpt = Path(checkpoint_path) if checkpoint_path else None
    if ckpt is not None and resume and ckpt.exists():
        state = load_checkpoint(ckpt, map_location=device)
        _check_resumable(ckpt, state, model, config, n)
        model.load_state_dict(state["model_state"])
        optimizer.load_state_dict(state["optimizer_state"])
        scheduler.load_state_dict(state["scheduler_state"])
        _set_rng_state(state["rng"], gen, np_rng, device)
        history = list(state.get("history", []))
        start_epoch = int(state["epoch"])
    log = Path(log_path) if log_path else None
    if log is not None:
        _write_jsonl(log, history)  # fresh run: empty; resumed: exactly the checkpoint's epochs

    amp = config.amp and device.type == "cuda"
    spe = steps_per_epoch(n, config.batch_size)
    last_save = time.monotonic()
    for epoch in range(start_epoch, config.epochs):
        model.train()
        t0 = time.time()
        perm = torch.randperm(n, generator=gen)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        bar = tqdm(total=spe, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not progress, leave=False)
        for step in range(spe):
            idx = perm[step * config.batch_size : (step + 1) * config.batch_size]
            b = {k: v.to(device, non_blocking=True) for k, v in train.batch(idx, neighbours=use_nn).items()}
            y = b["y"]
            targets = soft_targets(y, num_classes, config.label_smoothing)
            if config.mixup_alpha > 0:
                lam = float(np_rng.beta(config.mixup_alpha, config.mixup_alpha))
                p = torch.randperm(len(y), generator=gen).to(device)
                for key in ("z", "nn_img", "nn_txt"):
                    if key in b:
                        b[key] = lam * b[key] + (1 - lam) * b[key][p]
                targets = lam * targets + (1 - lam) * targets[p]
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(*_model_inputs(model, b))
            logits = logits.float()
            train_logits = logits + adjust if adjust is not None else logits
            loss = soft_cross_entropy(train_logits, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach() * len(y)
            correct += (logits.detach().argmax(dim=1) == y).sum()
            if progress and (step % 20 == 0 or step == spe - 1):
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            bar.update(1)
        bar.close()
        entry: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": (epoch + 1) * spe,
            "loss": float(loss_sum) / n,
            # accuracy on the (mixed) training inputs against the unmixed labels: a trend, not a metric
            "train_acc": float(correct) / n,
            "lr": scheduler.get_last_lr()[0],
            "time_s": round(time.time() - t0, 3),
        }
        if val is not None:
            m = evaluate(predict(model, val, config.eval_batch_size, device=device), val.labels)
            entry["val_top1"], entry["val_top5"] = m["top1"], m["top5"]
        history.append(entry)
        if progress:
            tqdm.write(json.dumps(entry))
        stopping = stop_after_epoch is not None and epoch + 1 >= stop_after_epoch
        due = time.monotonic() - last_save >= checkpoint_every_s
        if ckpt is not None and (due or stopping or epoch + 1 == config.epochs):
            last_save = time.monotonic()
            save_checkpoint(
                ckpt,
                model,
                optimizer,
                scheduler,
                epoch + 1,
                config,
                rng=_rng_state(gen, np_rng, device),
                history=history,
                num_train=n,
            )
        if log is not None:
            with open(log, "a") as fh:
                fh.write(json.dumps(entry) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        if stopping:
            break
    model.eval()
    return history


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
    use_nn = _needs_neighbours(model)
    out = []
    for start in range(0, len(features), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(features)))
        b = {k: v.to(device, non_blocking=True) for k, v in features.batch(idx, neighbours=use_nn).items()}
        out.append(model(*_model_inputs(model, b)).float().cpu())
    if not out:
        return torch.zeros(0, _num_classes(model, features))
    return torch.cat(out)
