"""The one model factory: a method's model from the experiment's `model:` options (`build_model`), and a
saved model rebuilt from its stored `.config` (`model_from_config`, trainer/checkpoint.py).
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

from torch import nn

from retformer.trainer.config import FusionOptions, PredictionRule
from retformer.trainer.image_models import LinearProbe, MLPOnly
from retformer.trainer.model import RETFORMER_VARIANTS, STORED_KEYS, RetFormer

# Model kinds: the names of the feature-mode methods that train them (`trainer/methods.py`).
MODEL_KINDS = (*RETFORMER_VARIANTS, "mlp_only", "linear_probe")


def build_model(
    kind: str,
    num_classes: int,
    img_dim: int,
    txt_dim: int = 0,
    k: int = 32,
    options: FusionOptions | None = None,
    rule: PredictionRule | None = None,
) -> nn.Module:
    """The one model factory: the model of a method (its model kind, `trainer.methods`).

    kind: retformer, retformer_no_text, retformer_no_image, mlp_only or linear_probe (a fine-tune method
    passes its head's kind, `METHODS[m].model`). options: the experiment's `model:` section (defaults:
    `FusionOptions()`); a model ignores the ones it has no use for (one section serves every method), and
    mlp_hidden sizes the L_I branch of RetFormer and mlp_only alike. rule: a RetFormer's prediction rule
    (default: the options' alpha, the rest at their defaults). Typical:
    build_model("retformer", C, feats.img_dim, feats.txt_dim, feats.k, FusionOptions(width=256))."""
    options = options or FusionOptions()
    if options.anchor == "auto":  # resolved by the stacked selection (`Task.build`); no vote elsewhere
        options = replace(options, anchor=None)
    if kind in RETFORMER_VARIANTS:
        return RetFormer(img_dim, txt_dim, num_classes, k, RETFORMER_VARIANTS[kind], options, rule)
    if kind == "mlp_only":
        return MLPOnly(img_dim, num_classes, mlp_hidden=options.mlp_hidden)
    if kind == "linear_probe":
        return LinearProbe(img_dim, num_classes)
    raise ValueError(f"unknown model kind {kind!r}; expected one of {', '.join(MODEL_KINDS)}")


def model_from_config(config: dict[str, Any]) -> nn.Module:
    """Rebuild a model from its `.config` dict (as stored in checkpoints; a RetFormer's keys that a file
    written before an option existed lacks take their defaults, an unknown key is a TypeError)."""
    cfg = dict(config)
    kind = cfg.pop("kind")
    if kind in RETFORMER_VARIANTS:
        unknown = sorted(set(cfg) - set(STORED_KEYS))
        missing = [key for key in ("img_dim", "txt_dim", "num_classes") if key not in cfg]
        if unknown or missing:
            raise TypeError(f"RetFormer config: unexpected keys {unknown}, missing keys {missing}")
        options = FusionOptions(**{f.name: cfg[f.name] for f in fields(FusionOptions) if f.name in cfg})
        rule = PredictionRule(**{f.name: cfg[f.name] for f in fields(PredictionRule) if f.name in cfg})
        shape = {key: cfg[key] for key in ("k", "variant") if key in cfg}
        dims = cfg["img_dim"], cfg["txt_dim"], cfg["num_classes"]
        return RetFormer(*dims, **shape, options=options, rule=rule)
    if kind == "linear_probe":
        return LinearProbe(**cfg)
    if kind == "mlp_only":
        hidden = cfg.get("mlp_hidden")
        return MLPOnly(
            cfg["img_dim"], cfg["num_classes"], hidden, float(cfg.get("prior_tau", 0.0)), cfg.get("log_prior")
        )
    raise ValueError(f"unknown model kind {kind!r} in config")
