"""An experiment manifest planned before any data is read: methods, k values, training configs,
recipe, selection grids, checkpoint policy, eval splits. Keys and types were checked when it was
loaded (pipelines/experiment_schema.py); what is left here needs the KB or the dataset."""

from __future__ import annotations

from dataclasses import fields
from typing import TYPE_CHECKING, Any

from retformer.artifacts.errors import UserError
from retformer.pipelines.experiment_schema import (
    CheckpointSection,
    ExperimentManifest,
    ZeroshotSection,
    given,
)
from retformer.trainer.finetune import FinetuneConfig
from retformer.trainer.methods import FEATURE_METHODS, FINETUNE_METHODS, TRAINED
from retformer.trainer.selection import SelectOptions
from retformer.trainer.train import TrainConfig
from retformer.trainer.zeroshot import check_aligned, templates

if TYPE_CHECKING:
    from retformer.kb_builder.kb_schema import KBManifest


def _k_values(exp: ExperimentManifest) -> list[int]:
    return list(exp.k_values) if exp.k_values is not None else [exp.k]


def _checkpoint_policy(exp: ExperimentManifest) -> dict[str, Any] | None:
    """`{every_s, resume}` of the run's checkpoints, None when they are off (`checkpoint: false`)."""
    section = CheckpointSection() if exp.checkpoint is True else exp.checkpoint
    if section is None or section is False or not section.enabled:
        return None
    return {"every_s": float(section.every_s), "resume": section.resume}


def train_config(exp: ExperimentManifest, method: str) -> Any:
    """TrainConfig (feature mode) or FinetuneConfig of one method: train + finetune + method_train."""
    cls, values = TrainConfig, given(exp.train)
    if method in FINETUNE_METHODS:
        cls = FinetuneConfig
        values.update(given(exp.finetune))
    values.update(given((exp.method_train or {}).get(method)))
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        hint = " (fine-tune options go under `finetune:`)" if cls is TrainConfig else ""
        raise UserError(
            f"experiment {exp.name}, method {method}: unknown training option(s) "
            f"{', '.join(unknown)}{hint}; known: {', '.join(sorted(names))}"
        )
    return cls(**values)


def plan_experiment(exp: ExperimentManifest, kb: KBManifest) -> dict[str, Any]:
    """Plan the experiment before any data is read: methods, k values, configs, encoders (the keys and
    their types were checked when it was loaded)."""
    methods = list(exp.methods or FEATURE_METHODS)
    configs = {m: train_config(exp, m) for m in methods if m in TRAINED}
    if "zeroshot" in methods:
        check_aligned(kb.encoders.model_dump(), kb.name or "")
        templates((exp.zeroshot or ZeroshotSection()).templates)
    if any(m in FINETUNE_METHODS for m in methods) and kb.encoders.image is None:
        raise UserError(f"KB {kb.name} has no encoders.image to fine-tune")
    if exp.recipe == "stacked" and not exp.select_split:
        raise UserError(f"experiment {exp.name}: recipe stacked chooses alpha on a split: set select_split")
    return {
        "recipe": exp.recipe,
        "select": SelectOptions.from_manifest(given(exp.select)),
        "methods": methods,
        "k_values": _k_values(exp),
        "configs": configs,
        "checkpoint": _checkpoint_policy(exp),
    }


def eval_splits(exp: ExperimentManifest, info: dict[str, Any]) -> list[str]:
    splits = [exp.eval_split] if isinstance(exp.eval_split, str) else list(exp.eval_split)
    for s in splits:
        if s not in info["splits"]:
            raise UserError(f"eval_split {s!r} not among the dataset's splits {list(info['splits'])}")
    return splits
