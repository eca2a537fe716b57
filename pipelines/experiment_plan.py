"""An experiment manifest planned before any data is read: methods, k values, training configs,
recipe, selection grids, checkpoint policy, eval splits. Keys and types were checked when it was
loaded (pipelines/experiment_schema.py); what is left here needs the KB or the dataset."""

from __future__ import annotations

from dataclasses import fields
from typing import TYPE_CHECKING, Any

from retformer.artifacts.errors import UserError
from retformer.trainer.finetune import FinetuneConfig
from retformer.trainer.methods import FEATURE_METHODS, FINETUNE_METHODS, METHODS, TRAINED
from retformer.trainer.model import RECIPES
from retformer.trainer.selection import SelectOptions
from retformer.trainer.train import TrainConfig
from retformer.trainer.zeroshot import check_aligned, templates

if TYPE_CHECKING:
    from retformer.kb_builder.kb_schema import KBManifest

DEFAULT_CHECKPOINT = {"every_s": 60.0, "resume": True}


def _k_values(exp: dict[str, Any]) -> list[int]:
    raw = exp.get("k_values")
    values = raw if raw is not None else [exp.get("k", 32)]
    if not isinstance(values, list) or not values:
        raise UserError(
            f"experiment {exp['name']}: k_values must be a non-empty list of integers, got {raw!r}"
        )
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UserError(f"experiment {exp['name']}: k must be a positive integer, got {v!r}")
        out.append(v)
    return out


def _checkpoint_policy(exp: dict[str, Any]) -> dict[str, Any] | None:
    raw = exp.get("checkpoint", {})
    if raw is False or raw is None:
        return None
    if raw is True:
        raw = {}
    if not isinstance(raw, dict) or set(raw) - set(DEFAULT_CHECKPOINT) - {"enabled"}:
        raise UserError(f"experiment {exp['name']}: checkpoint must be false or a mapping of every_s, resume")
    if raw.get("enabled") is False:
        return None
    policy = {**DEFAULT_CHECKPOINT, **{k: v for k, v in raw.items() if k != "enabled"}}
    policy["every_s"] = float(policy["every_s"])
    return policy


def train_config(exp: dict[str, Any], method: str) -> Any:
    """TrainConfig (feature mode) or FinetuneConfig of one method: train + finetune + method_train."""
    cls, values = TrainConfig, dict(exp.get("train", {}) or {})
    if method in FINETUNE_METHODS:
        cls = FinetuneConfig
        values.update(exp.get("finetune", {}) or {})
    values.update((exp.get("method_train", {}) or {}).get(method, {}) or {})
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        hint = " (fine-tune options go under `finetune:`)" if cls is TrainConfig else ""
        raise UserError(
            f"experiment {exp['name']}, method {method}: unknown training option(s) "
            f"{', '.join(unknown)}{hint}; known: {', '.join(sorted(names))}"
        )
    return cls(**values)


def plan_experiment(exp: dict[str, Any], kb: KBManifest) -> dict[str, Any]:
    """Validate the experiment before any data is read: methods, k values, configs, encoders."""
    methods = list(exp.get("methods", FEATURE_METHODS))
    for m in methods:
        if m not in METHODS:
            raise UserError(
                f"unknown method {m!r} in experiment {exp['name']}: known are {', '.join(METHODS)}"
            )
    if not methods:
        raise UserError(f"experiment {exp['name']} lists no methods")
    configs = {m: train_config(exp, m) for m in methods if m in TRAINED}
    if "zeroshot" in methods:
        check_aligned(kb.encoders.model_dump(), kb.name or "")
        templates((exp.get("zeroshot") or {}).get("templates", "openai"))
    if any(m in FINETUNE_METHODS for m in methods) and kb.encoders.image is None:
        raise UserError(f"KB {kb.name} has no encoders.image to fine-tune")
    recipe = exp.get("recipe", "paper")
    if recipe not in RECIPES:
        raise UserError(
            f"experiment {exp['name']}: recipe must be one of {', '.join(RECIPES)}, got {recipe!r}"
        )
    if recipe == "stacked" and not exp.get("select_split"):
        raise UserError(
            f"experiment {exp['name']}: recipe stacked chooses alpha on a split: set select_split"
        )
    return {
        "recipe": recipe,
        "select": SelectOptions.from_manifest(exp.get("select")),
        "methods": methods,
        "k_values": _k_values(exp),
        "configs": configs,
        "checkpoint": _checkpoint_policy(exp),
    }


def eval_splits(exp: dict[str, Any], info: dict[str, Any]) -> list[str]:
    raw = exp.get("eval_split", "test")
    splits = [raw] if isinstance(raw, str) else raw
    if not isinstance(splits, list) or not splits or not all(isinstance(s, str) for s in splits):
        raise UserError(f"eval_split must be a split name or a list of them, got {raw!r}")
    for s in splits:
        if s not in info["splits"]:
            raise UserError(f"eval_split {s!r} not among the dataset's splits {list(info['splits'])}")
    return splits
