"""The one model factory: a method's model from the experiment's `model:` options (`build_model`), and a
saved model rebuilt from its stored `.config` (`model_from_config`, trainer/checkpoint.py).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from retformer.trainer.image_models import LinearProbe, MLPOnly
from retformer.trainer.model import RETFORMER_VARIANTS, RetFormer

# Model kinds: the names of the feature-mode methods that train them (`trainer/methods.py`).
MODEL_KINDS = (*RETFORMER_VARIANTS, "mlp_only", "linear_probe")

# The `model:` options of an experiment manifest, with their types.
_RETFORMER_OPTIONS = {
    "width": int,
    "depth": int,
    "heads": int,
    "tau": float,
    "dropout": float,
    "ffn": bool,
    "ffn_ratio": float,
    "mlp_hidden": int,
    "recipe": str,
    "alpha": float,
    "query_bias": bool,
    "anchor": str,
    "anchor_temp": float,
}


def build_model(
    kind: str, num_classes: int, img_dim: int, txt_dim: int = 0, k: int = 32, **options: Any
) -> nn.Module:
    """The one model factory: the model of a method (its model kind, `trainer.methods`).

    kind: retformer, retformer_no_text, retformer_no_image, mlp_only or linear_probe (a fine-tune method
    passes its head's kind, `METHODS[m].model`). options: the experiment's `model:` section (width,
    depth, heads, tau, dropout, ffn, ffn_ratio, mlp_hidden); a model ignores the ones it has no use for
    (one section serves every method), and mlp_hidden sizes the L_I branch of RetFormer and mlp_only
    alike. Typical: build_model("retformer", C, feats.img_dim, feats.txt_dim, feats.k, width=256)."""
    opts = {k: cast(options[k]) for k, cast in _RETFORMER_OPTIONS.items() if options.get(k) is not None}
    if opts.get("anchor") == "auto":  # resolved by the stacked selection (`Task.build`); no vote elsewhere
        opts["anchor"] = None
    if kind in RETFORMER_VARIANTS:
        return RetFormer(img_dim, txt_dim, num_classes, k=k, variant=RETFORMER_VARIANTS[kind], **opts)
    if kind == "mlp_only":
        return MLPOnly(img_dim, num_classes, mlp_hidden=opts.get("mlp_hidden"))
    if kind == "linear_probe":
        return LinearProbe(img_dim, num_classes)
    raise ValueError(f"unknown model kind {kind!r}; expected one of {', '.join(MODEL_KINDS)}")


def model_from_config(config: dict[str, Any]) -> nn.Module:
    """Rebuild a model from its `.config` dict (as stored in checkpoints)."""
    cfg = dict(config)
    kind = cfg.pop("kind")
    if kind in RETFORMER_VARIANTS:
        return RetFormer(**cfg)
    if kind == "linear_probe":
        return LinearProbe(**cfg)
    if kind == "mlp_only":
        hidden = cfg.get("mlp_hidden")
        return MLPOnly(
            cfg["img_dim"], cfg["num_classes"], hidden, float(cfg.get("prior_tau", 0.0)), cfg.get("log_prior")
        )
    raise ValueError(f"unknown model kind {kind!r} in config")
