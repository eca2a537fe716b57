"""The one model factory: a method's model from the experiment's `model:` options (`build_model`), and a
saved model rebuilt from its stored `.config` (`model_from_config` of `parse_stored_model`'s typed
value, trainer/stored_model.py; trainer/checkpoint.py).
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from retformer.trainer.config import FusionOptions, PredictionRule
from retformer.trainer.image_models import LinearProbe, MLPOnly
from retformer.trainer.model import RETFORMER_VARIANTS, RetFormer
from retformer.trainer.stored_model import StoredLinearProbe, StoredMLPOnly, StoredModel, StoredRetFormer

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


def model_from_config(stored: StoredModel) -> nn.Module:
    """Rebuild a model from its stored form (`parse_stored_model` of a checkpoint's `.config` dict; a
    fine-tune model needs its encoder too: `trainer.checkpoint.load_saved_model`)."""
    if isinstance(stored, StoredRetFormer):
        shape = {key: v for key, v in (("k", stored.k), ("variant", stored.variant)) if v is not None}
        dims = stored.img_dim, stored.txt_dim, stored.num_classes
        return RetFormer(*dims, **shape, options=stored.options, rule=stored.rule)
    if isinstance(stored, StoredLinearProbe | StoredMLPOnly):
        prior = {} if stored.prior_tau is None else {"prior_tau": stored.prior_tau}
        if isinstance(stored, StoredLinearProbe):
            return LinearProbe(stored.img_dim, stored.num_classes, log_prior=stored.log_prior, **prior)
        sizes = stored.img_dim, stored.num_classes, stored.mlp_hidden
        return MLPOnly(*sizes, log_prior=stored.log_prior, **prior)
    raise ValueError("unknown model kind 'finetune' in config")
