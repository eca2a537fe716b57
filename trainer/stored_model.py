"""A model as a model file or checkpoint stores it (`model_config`, the model's `.config`), read back typed.

`parse_stored_model` is the one reader of that stored dict (trainer/checkpoint.py calls it on every file
it opens): below it, `model_from_config` (trainer/model_factory.py) rebuilds a model from the typed value.
Files written before an option existed still load: a RetFormer's missing option or rule key takes its
default (`FusionOptions`, `PredictionRule`), its unknown key is a TypeError; an unknown kind a ValueError.
Nothing here writes: the stored dict is the model's `.config`, unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from retformer.trainer.config import FusionOptions, PredictionRule
from retformer.trainer.model import RETFORMER_VARIANTS, STORED_KEYS


@dataclass(frozen=True)
class StoredRetFormer:
    """A RetFormer: its kind (retformer, retformer_no_text, retformer_no_image), sizes, options and rule.
    `k` and `variant` are None where the file lacks them (the model's own defaults then)."""

    kind: str
    img_dim: int
    txt_dim: int
    num_classes: int
    options: FusionOptions
    rule: PredictionRule
    k: int | None = None
    variant: str | None = None


@dataclass(frozen=True)
class StoredLinearProbe:
    """A linear probe: its sizes, and the post-hoc prior adjustment chosen on val (None: as the model starts;
    files written before the probe had one)."""

    img_dim: int
    num_classes: int
    prior_tau: float | None = None
    log_prior: list[float] | None = None


@dataclass(frozen=True)
class StoredMLPOnly:
    """The mlp_only model: its sizes, and the post-hoc prior adjustment chosen on val (None: as the model
    starts)."""

    img_dim: int
    num_classes: int
    mlp_hidden: int | None = None
    prior_tau: float | None = None
    log_prior: list[float] | None = None


StoredHead = StoredRetFormer | StoredLinearProbe | StoredMLPOnly


@dataclass(frozen=True)
class StoredFinetune:
    """A fine-tuned encoder + head: the head, and the image encoder spec it recorded (the weights are rebuilt
    over the encoder the file's `info` names, `trainer.checkpoint`)."""

    head: StoredHead
    encoder: dict[str, Any]


StoredModel = StoredHead | StoredFinetune


def _retformer(kind: str, stored: dict[str, Any]) -> StoredRetFormer:
    unknown = sorted(set(stored) - set(STORED_KEYS))
    missing = [key for key in ("img_dim", "txt_dim", "num_classes") if key not in stored]
    if unknown or missing:
        raise TypeError(f"RetFormer config: unexpected keys {unknown}, missing keys {missing}")
    options = FusionOptions(**{f.name: stored[f.name] for f in fields(FusionOptions) if f.name in stored})
    rule = PredictionRule(**{f.name: stored[f.name] for f in fields(PredictionRule) if f.name in stored})
    dims = stored["img_dim"], stored["txt_dim"], stored["num_classes"]
    return StoredRetFormer(kind, *dims, options, rule, stored.get("k"), stored.get("variant"))


def parse_stored_model(stored: dict[str, Any]) -> StoredModel:
    """The typed model of a stored `model_config` dict (see the module doc). A missing `kind` is a KeyError;
    a linear probe's unknown or missing key a TypeError; an mlp_only's missing size a KeyError (its other
    keys ignored, as they always were)."""
    rest = dict(stored)
    kind = rest.pop("kind")
    if kind in RETFORMER_VARIANTS:
        return _retformer(kind, rest)
    if kind == "linear_probe":
        return StoredLinearProbe(**rest)
    if kind == "mlp_only":
        prior_tau = rest.get("prior_tau")
        return StoredMLPOnly(
            rest["img_dim"],
            rest["num_classes"],
            rest.get("mlp_hidden"),
            None if prior_tau is None else float(prior_tau),
            rest.get("log_prior"),
        )
    if kind == "finetune":
        head = parse_stored_model(rest["head"])
        if isinstance(head, StoredFinetune):
            raise ValueError("unknown model kind 'finetune' in config")  # a head is never a fine-tune model
        return StoredFinetune(head, dict(rest.get("encoder") or {}))
    raise ValueError(f"unknown model kind {kind!r} in config")
