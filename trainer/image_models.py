"""The image-only models: RetFormer's L_I branch (`ImageBranch`) and the baselines that read the query
embedding alone (`LinearProbe`, the `mlp_only` ablation `MLPOnly`), with the class prior's log that
RetFormer, mlp_only and the linear probe adjust their logits by. They take RetFormer's forward
arguments (one call serves every model, trainer/train.py) and ignore the neighbours.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def log_prior(class_counts: list[int] | torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C,) log of the class prior from training counts (a class with 0 images counts as 1)."""
    counts = torch.as_tensor(list(class_counts), dtype=torch.float32).clamp_min(1.0)
    if len(counts) != num_classes:
        raise ValueError(f"{len(counts)} class counts for {num_classes} classes")
    return torch.log(counts / counts.sum())


# A model input that may be absent (the neighbours a model does not read).
OptTensor = torch.Tensor | None


class ImageBranch(nn.Sequential):
    """RetFormer's L_I branch, the paper's MLP(z): Linear(img_dim, hidden) -> ReLU -> Linear(hidden, C).
    The `mlp_only` ablation is this very module alone (`MLPOnly`); hidden defaults to img_dim."""

    def __init__(self, img_dim: int, num_classes: int, hidden: int | None = None) -> None:
        hidden = hidden or img_dim
        super().__init__(nn.Linear(img_dim, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
        self.hidden = hidden


class ImageOnlyModel(nn.Module):
    """A model of the query embedding alone: `forward` takes RetFormer's arguments and ignores the
    neighbours (so the epoch loop skips gathering them: `needs_neighbors`); a subclass says its logits."""

    needs_neighbors = False

    def forward(
        self,
        z: torch.Tensor,
        nn_img: torch.Tensor | None = None,
        nn_txt: torch.Tensor | None = None,
        *,
        nn_label: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, C) logits of the query embeddings z (B, img_dim)."""
        return self.image_logits(z)

    def training_logits(
        self, z: torch.Tensor, nn_img: OptTensor, nn_txt: OptTensor, *, nn_label: OptTensor = None
    ) -> torch.Tensor:
        """(B, C) the logits training fits (`trainer.loop.Fitting`): before any post-hoc adjustment."""
        return self.image_logits(z, adjust=False)

    def image_logits(self, z: torch.Tensor, adjust: bool = True) -> torch.Tensor:
        """(B, C) logits of z: the subclass's model (adjust=False: without its post-hoc adjustment)."""
        raise NotImplementedError


class PriorAdjusted(ImageOnlyModel):
    """An image-only model with the post-hoc logit adjustment at prediction (Menon et al.): logits -
    prior_tau * log prior, prior_tau chosen on val; training is unchanged (it sees the logits before the
    adjustment). The prior lives in the config, not the state dict (so mlp_only's state dict stays exactly
    RetFormer's L_I branch, `mlp.*`)."""

    def __init__(
        self, sizes: dict[str, Any], num_classes: int, prior_tau: float, prior: list[float] | None
    ) -> None:
        """sizes: the subclass's kind and sizes, the start of its config."""
        super().__init__()
        values = torch.zeros(num_classes) if prior is None else torch.tensor(prior, dtype=torch.float32)
        self.config: dict[str, Any] = {**sizes, "prior_tau": prior_tau, "log_prior": values.tolist()}
        self.register_buffer("log_prior", values, persistent=False)

    def set_prior(self, class_counts: list[int] | torch.Tensor) -> None:
        """log of the training class prior, for the post-hoc adjustment."""
        self.log_prior.copy_(log_prior(class_counts, len(self.log_prior)))
        self.config["log_prior"] = self.log_prior.tolist()

    def set_prior_tau(self, prior_tau: float) -> None:
        """Predict with the post-hoc adjustment prior_tau from now on (chosen on val; saved in the config)."""
        self.config["prior_tau"] = prior_tau

    def image_logits(self, z: torch.Tensor, adjust: bool = True) -> torch.Tensor:
        """(B, C) = the model's raw logits, less prior_tau * log prior when `adjust` (prediction)."""
        logits = self.raw_logits(z)
        if not adjust or not float(self.config["prior_tau"]):
            return logits
        return logits - float(self.config["prior_tau"]) * self.log_prior.to(logits)

    def raw_logits(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C) logits of z before the adjustment: the subclass's model."""
        raise NotImplementedError


class LinearProbe(PriorAdjusted):
    """Linear classifier on the query embedding ("CLIP classifier FT"), fitted as a logistic regression
    (trainer/logistic_probe.py), with the post-hoc prior adjustment; ignores the neighbors."""

    def __init__(
        self, img_dim: int, num_classes: int, prior_tau: float = 0.0, log_prior: list[float] | None = None
    ) -> None:
        sizes = {"kind": "linear_probe", "img_dim": img_dim, "num_classes": num_classes}
        super().__init__(sizes, num_classes, prior_tau, log_prior)
        self.fc = nn.Linear(img_dim, num_classes)

    def raw_logits(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C) = fc(z)."""
        return self.fc(z)


class MLPOnly(PriorAdjusted):
    """The `mlp_only` ablation: exactly RetFormer's L_I branch alone (the same `ImageBranch` module, same
    hidden width: `mlp_hidden`, default img_dim, as in RetFormer), no retrieval; ignores the neighbors.
    Its state dict has RetFormer's `mlp.*` keys."""

    def __init__(
        self,
        img_dim: int,
        num_classes: int,
        mlp_hidden: int | None = None,
        prior_tau: float = 0.0,
        log_prior: list[float] | None = None,
    ) -> None:
        branch = ImageBranch(img_dim, num_classes, mlp_hidden)
        sizes = {"kind": "mlp_only", "img_dim": img_dim, "num_classes": num_classes}
        super().__init__({**sizes, "mlp_hidden": branch.hidden}, num_classes, prior_tau, log_prior)
        self.mlp = branch

    def raw_logits(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C) = mlp(z)."""
        return self.mlp(z)
