"""The experiment manifest's schema: methods, k, model, training, fine-tuning, selection, checkpoints.

The model and training sections are the trainer's own dataclasses seen as schemas
(`section_from_dataclass`), so a default or a limit lives in one place: FusionOptions / TrainConfig /
FinetuneConfig / SelectOptions. Values are coerced (YAML's `1e-3` is a string; a list becomes the tuple a
grid is), and the coerced manifest is what the experiment runs with.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, PrivateAttr

from retformer.artifacts.schema import Section, dump_given, section_from_dataclass, validate_section
from retformer.trainer.config import (
    METHOD_NAMES,
    RECIPES,
    FinetuneConfig,
    FusionOptions,
    SelectOptions,
    TrainConfig,
)

PositiveInt = Annotated[int, Field(ge=1)]
MethodName = Literal[METHOD_NAMES]  # type: ignore[valid-type]

TrainSection = section_from_dataclass(TrainConfig, "train")
FinetuneSection = section_from_dataclass(FinetuneConfig, "finetune")
SelectSection = section_from_dataclass(SelectOptions, "select")
ModelSection = section_from_dataclass(FusionOptions, "model")  # the fusion model (build_model's options)


class ZeroshotSection(Section):
    """Class-name prompts of the zero-shot baseline."""

    templates: str | list[str] = "openai"


class CheckpointSection(Section):
    """How often a training run saves its resumable state, and whether a rerun resumes from it."""

    every_s: Annotated[float, Field(ge=0)] = 60.0
    resume: bool = True
    enabled: bool = True


class ExperimentManifest(Section):
    """An experiment: the methods to train and evaluate on one dataset x KB, and how."""

    name: str | None = None
    description: str | None = None
    k: PositiveInt = 32  # the neighbours each query gets (k_values: a sweep instead)
    k_values: Annotated[list[PositiveInt], Field(min_length=1)] | None = None
    eval_split: str | Annotated[list[str], Field(min_length=1)] = "test"
    select_split: str | None = None
    methods: Annotated[list[MethodName], Field(min_length=1)] | None = None
    recipe: Literal[RECIPES] = "paper"  # type: ignore[valid-type]
    model: ModelSection | None = None  # type: ignore[valid-type]
    train: TrainSection | None = None  # type: ignore[valid-type]
    finetune: FinetuneSection | None = None  # type: ignore[valid-type]
    method_train: dict[MethodName, FinetuneSection] | None = None  # type: ignore[valid-type]
    zeroshot: ZeroshotSection | None = None
    checkpoint: CheckpointSection | bool | None = True  # false (or null): no checkpoints
    select: SelectSection | None = None  # type: ignore[valid-type]
    # Up to this many of the KB's items labelled with the dataset's classes join the training split of
    # every feature-mode method, each with its leave-one-out neighbours (trainer/kb_episodes.py); the
    # epochs are scaled so that a fit takes the steps it takes without them. 0 = off.
    kb_episodes: Annotated[int, Field(ge=0)] = 0
    # What labels those items: "label" = the KB's own labels (the dataset's classes, else no episode);
    # "caption" = the class each item's caption names (the KB's text tower against class-name prompts,
    # more than half the caption's mass on one class, else the item stays out), for KBs of web pairs
    # without labels; admitted only where the mlp_only selection with them scores at least as well on
    # val as without (an irrelevant KB's captions, or a misread class name, teach wrong labels);
    # "auto" = "caption" where the KB has no label at all (web pairs), else "label".
    kb_episode_labels: Literal["auto", "label", "caption"] = "auto"
    # "knn": an item joins only where at least 2 of its 10 nearest images (the other KB items, the training
    # split) carry its label (KB or caption): drops most wrong labels, few right ones
    # (trainer/kb_episodes.knn_agreeing_labels); "none": every labelled item may join; "auto": the one
    # whose mlp_only selection scores higher on val (the filter on a tie; pipelines/experiment_episodes).
    kb_episode_filter: Literal["auto", "knn", "none"] = "auto"
    # Where the manifest was read from (None for one built in code): not a key of the manifest.
    _manifest_path: str | None = PrivateAttr(default=None)

    @property
    def manifest_path(self) -> str | None:
        return self._manifest_path

    def seeded(self, seed: int) -> ExperimentManifest:
        """This experiment with `train.seed` set, as a given key (a run's record and config hash show it)."""
        train = self.train or TrainSection()
        return self.model_copy(update={"train": train.model_copy(update={"seed": seed})})


def given(section: BaseModel | None) -> dict[str, Any]:
    """A section's given values (`dump_given`), {} for a section the manifest leaves out."""
    return dump_given(section) if section is not None else {}


def validate_experiment(
    spec: dict[str, Any], where: str, overrides: list[str] | None = None
) -> ExperimentManifest:
    """`spec` checked against the schema, its values coerced; `_manifest_path` (the loader's) kept as
    the model's `manifest_path`. Only the keys `spec` gives are set (`dump_given` writes those)."""
    exp = validate_section(ExperimentManifest, spec, where, overrides)
    assert isinstance(exp, ExperimentManifest)
    exp._manifest_path = spec.get("_manifest_path")
    return exp
