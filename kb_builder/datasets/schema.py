"""The dataset manifest's schema: the keys every kind takes, and each kind's own (see __init__'s docs).

A manifest is validated in two steps: `kind` first (so the error for a wrong kind lists the known
ones), then the kind's own model, which refuses keys of other kinds and misspellings alike.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, PrivateAttr, ValidatorFunctionWrapHandler, WrapValidator

from retformer.artifacts.errors import UserError
from retformer.artifacts.schema import StrictSection, dump_given, validate_section

PositiveInt = Annotated[int, Field(ge=1)]


Seed = Annotated[int, Field(ge=0)]


def _as_written(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """A number checked as a float but kept as written (`100` stays an int), so a manifest dumps as the
    file gave it (the records, and the run's config hash, are those of the dict the YAML read)."""
    checked = handler(value)
    return value if type(value) is int else checked


Threshold = Annotated[float, Field(ge=0), WrapValidator(_as_written)]
Ratio = Annotated[float, Field(ge=1), WrapValidator(_as_written)]
Fraction = Annotated[float, Field(ge=0, lt=1), WrapValidator(_as_written)]  # 0: no hold-out

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"


class ShotThresholds(StrictSection):
    """many / few thresholds of the shot groups (longtail.shot_thresholds)."""

    many: Threshold = 100
    few: Threshold = 20
    scale: bool = False
    reference_max: PositiveInt | None = None


class LabelNoise(StrictSection):
    """Synthetic noise on the train split's labels (label_noise.py)."""

    kind: Literal["symmetric", "asymmetric"] = "symmetric"
    rate: Annotated[float, Field(ge=0, lt=1), WrapValidator(_as_written)]
    seed: Seed = 0
    mapping: list[int] | None = None


class NeighborsSection(StrictSection):
    """The neighbors stage's defaults for this dataset."""

    k: PositiveInt = 32


class DatasetManifest(StrictSection):
    """Keys every dataset kind takes (plus the shards and neighbors stages' own); each kind's model
    below adds its own keys with their defaults. `manifest_path` is the file it was read from."""

    name: str | None = None
    description: str | None = None
    kind: str
    shot_thresholds: ShotThresholds = Field(default_factory=ShotThresholds)
    label_noise: LabelNoise | None = None
    class_names: list[str] | dict[str, str] | None = None
    shard_size: PositiveInt = 5000
    neighbors: NeighborsSection = Field(default_factory=NeighborsSection)

    _manifest_path: str | None = PrivateAttr(default=None)
    _order: tuple[str, ...] = PrivateAttr(default=())

    @property
    def manifest_path(self) -> str | None:
        """The manifest file this dataset was read from (None for one built in code)."""
        return self._manifest_path

    def given(self) -> dict[str, Any]:
        """The keys the manifest gave, as written and in its order (what `dataset.json` and a run's
        config hash hold)."""
        values = dump_given(self)
        order = [k for k in self._order if k in values] + [k for k in values if k not in self._order]
        return {k: values[k] for k in order}

    def record(self) -> dict[str, Any]:
        """`given()` plus `_manifest_path` when read from a file (what a saved model's info holds)."""
        path = {"_manifest_path": self._manifest_path} if self._manifest_path is not None else {}
        return {**self.given(), **path}


class FashionMnist(DatasetManifest):
    """Balanced Fashion-MNIST (fashion_mnist.py)."""

    kind: Literal["fashion_mnist"]
    root: str = FASHION_MNIST_ROOT
    test_limit: PositiveInt | None = None
    seed: Seed = 0


class FashionMnistLt(FashionMnist):
    """Fashion-MNIST-LT: the CIFAR-LT rule on the training set; an optional balanced val split."""

    kind: Literal["fashion_mnist_lt"]  # type: ignore[assignment]
    n_max: PositiveInt = 500
    imbalance_ratio: Ratio = 100
    val_per_class: PositiveInt | None = None
    val_seed: Seed | None = None  # None: seed + 1

    @property
    def val_split_seed(self) -> int:
        """The seed of the val split: `val_seed`, else seed + 1."""
        return self.val_seed if self.val_seed is not None else self.seed + 1


class ImageFolder(DatasetManifest):
    """`root/<split>/<class>/<image>` (imagefolder.py)."""

    kind: Literal["imagefolder"]
    root: str | None = None
    imbalance_ratio: Ratio | None = None  # None: train as found
    n_max: PositiveInt | None = None  # None: the largest class's size
    seed: Seed = 0
    val_per_class: PositiveInt | None = None
    # Held out for model selection when the folder has no val/ and the manifest names no val_per_class.
    val_fraction: Fraction = 0.2


class SklearnDigitsLt(DatasetManifest):
    """scikit-learn's 8x8 digits, long-tailed (sklearn_digits.py)."""

    kind: Literal["sklearn_digits_lt"]
    n_max: PositiveInt = 50
    imbalance_ratio: Ratio = 10
    seed: Seed = 0
    test_per_class: PositiveInt = 50
    val_per_class: PositiveInt = 30


class HeldOutVal(DatasetManifest):
    """A kind with no val split of its own: `val_per_class` or `val_fraction` holds one out of train."""

    root: str | None = None
    val_per_class: PositiveInt | None = None
    val_fraction: Fraction = 0.0
    seed: Seed = 0


class Cifar100Lt(HeldOutVal):
    """CIFAR-100-LT (cifar.py)."""

    kind: Literal["cifar100_lt"]
    imbalance_ratio: Ratio = 100
    n_max: PositiveInt | None = None  # None: the full training set's class size
    test_limit: PositiveInt | None = None
    shot_reference_ratio: Ratio | None = 100  # None: the shot groups of this ratio's own counts


class ImagenetLt(DatasetManifest):
    """ImageNet-LT list files (imagenet_lt.py)."""

    kind: Literal["imagenet_lt"]
    root: str | None = None
    lists: str | None = None  # None: root
    num_classes: PositiveInt = 1000


class MiniWebvision(HeldOutVal):
    """The first WebVision classes, DivideMix conventions (webvision.py)."""

    kind: Literal["mini_webvision"]
    num_classes: PositiveInt = 50
    imagenet_val_root: str | None = None
    imagenet_val_list: str | None = None


KIND_MODELS: dict[str, type[DatasetManifest]] = {
    "fashion_mnist": FashionMnist,
    "fashion_mnist_lt": FashionMnistLt,
    "imagefolder": ImageFolder,
    "sklearn_digits_lt": SklearnDigitsLt,
    "cifar100_lt": Cifar100Lt,
    "imagenet_lt": ImagenetLt,
    "mini_webvision": MiniWebvision,
}
# Each kind's own keys (those beyond DatasetManifest's).
KINDS: dict[str, tuple[str, ...]] = {
    kind: tuple(k for k in model.model_fields if k not in DatasetManifest.model_fields)
    for kind, model in KIND_MODELS.items()
}
# Every key some dataset manifest takes (to route an unprefixed `--set`).
DATASET_KEYS = frozenset(k for model in KIND_MODELS.values() for k in model.model_fields)


def kind_model(kind: str) -> type[DatasetManifest]:
    """The schema of one dataset kind: the common keys plus the kind's own."""
    return KIND_MODELS[kind]


def validate_dataset(
    spec: Any, where: str | None = None, overrides: list[str] | None = None
) -> DatasetManifest:
    """`spec` checked against its kind's schema, as that kind's model (`_manifest_path`, which the
    manifest loader adds, becomes its `manifest_path`).

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
    dataset = validate_section(kind_model(kind), spec, where, overrides)
    assert isinstance(dataset, DatasetManifest)
    path = spec.get("_manifest_path")
    dataset._manifest_path = str(path) if path is not None else None
    dataset._order = tuple(str(k) for k in spec if not str(k).startswith("_"))
    return dataset
