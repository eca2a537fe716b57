"""The dataset manifest's schema: the keys every kind takes, and each kind's own (see __init__'s docs).

A manifest is validated in two steps: `kind` first (so the error for a wrong kind lists the known
ones), then the kind's own model, which refuses keys of other kinds and misspellings alike.
"""

from __future__ import annotations

from functools import cache
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, create_model

from retformer.artifacts.errors import UserError
from retformer.artifacts.schema import StrictSection, validate_section

PositiveInt = Annotated[int, Field(ge=1)]


Seed = Annotated[int, Field(ge=0)]


class ShotThresholds(StrictSection):
    """many / few thresholds of the shot groups (longtail.shot_thresholds)."""

    many: Annotated[float, Field(ge=0)] = 100
    few: Annotated[float, Field(ge=0)] = 20
    scale: bool = False
    reference_max: PositiveInt | None = None


class LabelNoise(StrictSection):
    """Synthetic noise on the train split's labels (label_noise.py)."""

    kind: Literal["symmetric", "asymmetric"] = "symmetric"
    rate: Annotated[float, Field(ge=0, lt=1)]
    seed: Seed = 0
    mapping: list[int] | None = None


class NeighborsSection(StrictSection):
    """The neighbors stage's defaults for this dataset."""

    k: PositiveInt = 32


class DatasetCommon(StrictSection):
    """Keys every dataset kind takes (plus the shards and neighbors stages' own)."""

    name: str | None = None
    description: str | None = None
    kind: str
    shot_thresholds: ShotThresholds | None = None
    label_noise: LabelNoise | None = None
    class_names: list[str] | dict[str, str] | None = None
    shard_size: PositiveInt = 5000
    neighbors: NeighborsSection | None = None


# The kind-specific keys: their types (every one optional; the loaders hold the defaults).
KEY_TYPES: dict[str, Any] = {
    "root": str,
    "lists": str,
    "n_max": PositiveInt,
    "imbalance_ratio": Annotated[float, Field(ge=1)],
    "seed": Seed,
    "val_seed": Seed,
    "test_limit": PositiveInt,
    "test_per_class": PositiveInt,
    "val_per_class": PositiveInt,
    "val_fraction": Annotated[float, Field(ge=0, lt=1)],  # 0: no hold-out
    "shot_reference_ratio": Annotated[float, Field(ge=1)],
    "num_classes": PositiveInt,
    "imagenet_val_root": str,
    "imagenet_val_list": str,
}
HOLDOUT_KEYS = ("val_per_class", "val_fraction", "seed")
KINDS: dict[str, tuple[str, ...]] = {
    "fashion_mnist": ("root", "test_limit", "seed"),
    "fashion_mnist_lt": (
        *("root", "n_max", "imbalance_ratio", "seed", "test_limit", "val_per_class", "val_seed"),
    ),
    "imagefolder": ("root", "imbalance_ratio", "n_max", "seed", "val_per_class", "val_fraction"),
    "sklearn_digits_lt": ("n_max", "imbalance_ratio", "seed", "test_per_class", "val_per_class"),
    "cifar100_lt": ("root", "imbalance_ratio", "n_max", "test_limit", "shot_reference_ratio", *HOLDOUT_KEYS),
    "imagenet_lt": ("root", "lists", "num_classes"),
    "mini_webvision": ("root", "num_classes", "imagenet_val_root", "imagenet_val_list", *HOLDOUT_KEYS),
}


@cache
def kind_model(kind: str) -> type[BaseModel]:
    """The schema of one dataset kind: the common keys plus the kind's own."""
    own = {key: (KEY_TYPES[key] | None, None) for key in KINDS[kind]}
    return create_model(f"Dataset_{kind}", __base__=DatasetCommon, kind=(Literal[kind], ...), **own)


def validate_dataset(
    spec: Any, where: str | None = None, overrides: list[str] | None = None
) -> dict[str, Any]:
    """`spec` checked against its kind's schema; returns `spec` itself (the loaders keep its defaults).

    `where` names the manifest in the error line (default: its file, else its name). A key of
    another kind is refused with the kinds it belongs to.
    """
    if not isinstance(spec, dict):
        raise UserError(f"a dataset spec must be a mapping, got {type(spec).__name__}")
    where = where or str(spec.get("_manifest_path") or f"dataset {spec.get('name', spec.get('kind'))!r}")
    kind = spec.get("kind")
    if kind not in KINDS:
        raise UserError(f"{where}: kind: unknown dataset kind {kind!r} (known: {', '.join(sorted(KINDS))})")
    for key in spec:
        owners = [k for k, keys in KINDS.items() if key in keys]
        if owners and key not in KINDS[kind]:
            owned = ", ".join(owners)
            raise UserError(f"{where}: {key}: does not apply to kind {kind} (it is a key of {owned})")
    validate_section(kind_model(kind), spec, where, overrides)
    return spec
