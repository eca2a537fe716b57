"""Manifests as the stage commands read them: a KB, dataset or experiment manifest by name or path,
with the `--set` overrides addressed to it, validated."""

from __future__ import annotations

import difflib
import logging
from typing import TYPE_CHECKING

from retformer.artifacts import manifest
from retformer.artifacts.errors import UserError

if TYPE_CHECKING:
    from retformer.kb_builder.datasets.schema import DatasetManifest
    from retformer.kb_builder.kb_schema import KBManifest
    from retformer.pipelines.experiment_schema import ExperimentManifest

log = logging.getLogger(__name__)


def _schema_keys() -> dict[str, set[str]]:
    """The top-level keys each manifest kind's schema takes (to route unprefixed `--set` items)."""
    from retformer.kb_builder.datasets.schema import DATASET_KEYS
    from retformer.kb_builder.kb_schema import KBManifest
    from retformer.pipelines.experiment_schema import ExperimentManifest

    return {
        "kb": set(KBManifest.model_fields),
        "dataset": set(DATASET_KEYS),
        "experiment": set(ExperimentManifest.model_fields),
    }


def split_overrides(overrides: list[str] | None, prefix: str) -> list[str]:
    """The overrides addressed to one manifest kind: `kb.index.k=8` -> `index.k=8` for "kb", and an
    unprefixed `train.epochs=3` for every kind whose schema has a top-level `train`. An unprefixed
    key no manifest has is an error (a typo would otherwise be dropped without a word)."""
    keys = _schema_keys()
    out = []
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"--set {item!r} is not of the form key=value")
        head = item.split("=", 1)[0].strip().split(".", 1)[0]
        if head in keys:
            if head == prefix:
                out.append(item.split(".", 1)[1])
            continue
        owners = [kind for kind, fields in keys.items() if head in fields]
        if not owners:
            every = sorted(set().union(*keys.values()))
            close = difflib.get_close_matches(head, every, n=1, cutoff=0.6)
            hint = (
                f" (did you mean {close[0]!r}?)"
                if close
                else " (prefix it with kb., dataset. or experiment.)"
            )
            raise UserError(f"--set {item}: no manifest has a key {head!r}{hint}")
        if prefix in owners:
            out.append(item)
    return out


def _load(category: str, kind: str, name: str, overrides: list[str] | None) -> tuple[dict, str, list]:
    mine = split_overrides(overrides, kind)
    data = manifest.load(category, name, mine)
    # Error lines quote the override as the user typed it (`kb.shard_size=0`).
    typed = [o for o in overrides or [] if split_overrides([o], kind)]
    return data, data["_manifest_path"], typed


def load_kb(name: str, overrides: list[str] | None) -> KBManifest:
    """A KB manifest (a name under manifests/kb/ or a path) with its `--set` overrides, validated."""
    from retformer.kb_builder.kb_schema import validate_kb

    return validate_kb(*_load("kb", "kb", name, overrides))


def load_dataset_manifest(name: str, overrides: list[str] | None) -> DatasetManifest:
    """A dataset manifest (a name under manifests/datasets/ or a path) with its overrides, validated:
    its kind's model (schema.py), which knows the file it was read from (`manifest_path`)."""
    from retformer.kb_builder.datasets.schema import validate_dataset

    return validate_dataset(*_load("datasets", "dataset", name, overrides))


def load_experiment(name: str, overrides: list[str] | None) -> ExperimentManifest:
    """An experiment manifest (a name under manifests/experiments/ or a path) with its overrides,
    validated; values coerced to their types (pipelines/experiment_schema.py)."""
    from retformer.pipelines.experiment_schema import validate_experiment

    exp = validate_experiment(*_load("experiments", "experiment", name, overrides))
    for item in unread_overrides(exp, split_overrides(overrides, "experiment")):
        log.warning("--set %s is not read by this experiment: %s", *item)
    return exp


# Keys of `train:` a selection replaces from its `select:` grids: an override of them changes nothing.
_SELECTED_KEYS = {
    "train.epochs": "epochs come from select.baseline_epochs (mlp_only) and select.retformer_epochs "
    "(RetFormer); linear_probe is fitted by L-BFGS (select.probe_l2)",
    "train.lr": "lr comes from select.lr_grid (mlp_only) and select.retformer_grid (RetFormer); linear_probe "
    "is fitted by L-BFGS (select.probe_l2)",
}


def unread_overrides(exp: ExperimentManifest, overrides: list[str]) -> list[tuple[str, str]]:
    """(override, why) for each experiment override the run will never read: train.epochs / train.lr
    where every trained method is chosen on a select split (the grids set them)."""
    from retformer.trainer.methods import METHODS

    methods = exp.methods or []
    selected = exp.select_split and all(
        m not in METHODS or METHODS[m].mode in ("frozen", "vote") for m in methods
    )
    if not selected:
        return []
    out = []
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in _SELECTED_KEYS:
            out.append((item, _SELECTED_KEYS[key]))
    return out


def datasets_for_kb(kb: KBManifest, overrides: list[str] | None) -> dict[str, DatasetManifest]:
    """The manifest of the dataset a KB is built from ({} for downloaded or external shards)."""
    name = getattr(kb.source, "dataset", None)  # a local source's (webdataset, img2dataset: none)
    return {name: load_dataset_manifest(name, overrides)} if name else {}
