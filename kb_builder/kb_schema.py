"""The knowledge-base manifest's schema: source, encoders, embed, index, shard size.

Validated when the manifest is loaded, before any stage starts (a missing `encoders:` used to be a
KeyError after a Dask cluster had started); the stages read the validated `KBManifest`, and the
defaults of its sections live here. The schema is strict: a quoted number is refused here.
"""

from __future__ import annotations

import copy
import difflib
import string
from typing import Annotated, Any, ClassVar, Literal

from pydantic import ConfigDict, Field, PrivateAttr, field_validator, model_validator

from retformer.artifacts.schema import StrictSection, dump_given, validate_section
from retformer.kb_builder.index.select import KINDS as INDEX_KINDS

PositiveInt = Annotated[int, Field(ge=1)]
# The largest encoder input side: 4x the usual 224-336 px. 20000 px was accepted and asked for a
# 4.8 GB float32 tensor per image at embed.
MAX_IMAGE_SIZE = 1024

# Each encoder's options besides `name` (checked here: the encoder classes take the validated models).
ENCODER_OPTIONS: dict[str, dict[str, set[str]]] = {
    "image": {
        "efficientnet_lite0": {"image_size", "autocast"},
        "open_clip": {"model", "pretrained", "image_size", "autocast", "batch_size"},
    },
    "text": {
        "minilm": {"autocast", "batch_size"},
        "open_clip": {"model", "pretrained", "image_size", "autocast", "batch_size"},
    },
}


TEMPLATES_EMPTY = "`templates` is empty: give at least one, or leave the key out for the default templates"


def template_problem(template: Any) -> str | None:
    """Why `template` cannot be a caption template (kb_builder/kb_sources.py), or None. Only the plain
    fields `{name}` and `{a}` are allowed: `{name.__class__}` or `{a[0]}` would reach attributes."""
    if not isinstance(template, str):
        return f"template {template!r} is not a string"
    try:
        fields = [
            "{" + field + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
            for _, field, spec, conv in string.Formatter().parse(template)
            if field is not None
        ]
    except ValueError:
        return f"template {template!r} is not a valid format string"
    other = [f for f in fields if f not in ("{name}", "{a}")]
    if other or not fields:
        return f"template {template!r} may hold only the fields {{name}} and {{a}}" + (
            f" (it has {', '.join(other)})" if other else ", and needs one of them"
        )
    return None


class _Encoder(StrictSection):
    """One encoder: `name` plus that encoder's own options (checked against ENCODER_OPTIONS)."""

    model_config = ConfigDict(extra="allow")
    ROLE: ClassVar[str] = ""  # "image" | "text", set by the subclasses below
    name: str = Field(description="an encoder needs a `name`, e.g. open_clip")
    model: str | None = None
    pretrained: str | None = None
    image_size: Annotated[int, Field(ge=16, le=MAX_IMAGE_SIZE)] | None = None  # None: the encoder's own
    autocast: bool = True  # the forward pass under autocast on CUDA
    batch_size: PositiveInt | None = None

    @model_validator(mode="after")
    def _known_options(self) -> _Encoder:
        known = ENCODER_OPTIONS[self.ROLE]
        if self.name not in known:
            raise ValueError(f"unknown {self.ROLE} encoder {self.name!r} (known: {', '.join(sorted(known))})")
        given = set(self.model_fields_set) | set(self.model_extra or {})
        extra = sorted(given - known[self.name] - {"name"})
        if extra:
            close = difflib.get_close_matches(extra[0], sorted(known[self.name]), n=1, cutoff=0.6)
            hint = (
                f"did you mean {close[0]!r}?" if close else f"it takes {', '.join(sorted(known[self.name]))}"
            )
            raise ValueError(f"encoder {self.name} does not take {extra[0]!r} ({hint})")
        return self


class ImageEncoder(_Encoder):
    """`encoders.image`."""

    ROLE: ClassVar[str] = "image"


class TextEncoder(_Encoder):
    """`encoders.text`."""

    ROLE: ClassVar[str] = "text"


class Encoders(StrictSection):
    """The frozen encoders: the KB and every dataset searched against it are embedded with these."""

    image: ImageEncoder
    text: TextEncoder | None = None


class LocalSource(StrictSection):
    """A KB built from a downstream dataset's manifest: its world pool, its training split, or both."""

    kind: Literal["world", "fashion_mnist_world", "downstream", "all"]
    dataset: str
    size: PositiveInt | None = None
    # The share of world captions naming a wrong class (noisy like web alt-text).
    wrong_caption_fraction: Annotated[float, Field(ge=0, le=1)] = 0.2
    seed: Annotated[int, Field(ge=0)] = 0
    templates: list[str] | None = None

    @field_validator("templates")
    @classmethod
    def _templates(cls, templates: list[str] | None) -> list[str] | None:
        if templates is not None and not templates:
            raise ValueError(TEMPLATES_EMPTY)
        for t in templates or []:
            if (problem := template_problem(t)) is not None:
                raise ValueError(problem)
        return templates


class WebdatasetSource(StrictSection):
    """The user's own webdataset shards (`*.tar` under `path`, any depth)."""

    kind: Literal["webdataset"]
    path: str


class Img2datasetSource(StrictSection):
    """url/caption Parquet metadata that `retformer download` fetches into shards under `path`."""

    kind: Literal["img2dataset"]
    metadata: str
    path: str
    settings: dict[str, Any] | None = None  # kb_builder/download/settings.py checks these


class EmbedSection(StrictSection):
    """Options of the embed tasks (`kb_builder.embed.embed_shard`'s keywords): `batch_size` (images per
    forward), `num_workers` (loader processes per task; None: none on a one-core worker, else a few,
    kb_builder/embed/options.py), `threads` (torch threads of the task; None: torch's), `prefetch_factor`
    (batches each loader worker keeps ready), `device` ("cpu", "cuda", "cuda:1"; None: cuda when
    available)."""

    batch_size: PositiveInt = 256
    num_workers: Annotated[int, Field(ge=0)] | None = None
    threads: PositiveInt | None = None
    prefetch_factor: PositiveInt = 2
    device: Annotated[str, Field(pattern=r"^(cpu|mps|cuda(:\d+)?)$")] | None = None

    def given(self) -> dict[str, Any]:
        """The options the manifest gave (None values left out): what the embed records store."""
        return {key: value for key, value in dump_given(self).items() if value is not None}


def embed_options(section: dict[str, Any] | None) -> dict[str, Any]:
    """The options an `embed:` mapping gives (None values left out), checked against `EmbedSection`
    (a typo gets "did you mean")."""
    return validate_section(EmbedSection, dict(section or {}), "embed").given()  # type: ignore[attr-defined]


class IndexSection(StrictSection):
    """How the index is chosen, built and checked (kb_builder/index/__init__.py run_index)."""

    kind: Literal["auto", *INDEX_KINDS] = "auto"  # type: ignore[valid-type]
    recall_target: Annotated[float, Field(gt=0, le=1)] = 0.95
    memory_budget_gb: Annotated[float, Field(gt=0)] = 8
    num_shards: PositiveInt = 1
    k: PositiveInt = 32
    num_queries: PositiveInt = 1000  # the recall check's queries (at most the KB's rows)

    @field_validator("num_queries", mode="before")
    @classmethod
    def _default_queries(cls, value: Any) -> Any:
        return 1000 if value is None else value  # `num_queries: null` read as the default


class KBManifest(StrictSection):
    """A knowledge base: where its image-text pairs come from and how they are embedded and indexed."""

    name: str | None = None
    description: str | None = None
    source: Annotated[LocalSource | WebdatasetSource | Img2datasetSource, Field(discriminator="kind")]
    encoders: Encoders = Field(
        description="a KB names its frozen encoders, e.g. encoders: {image: {name: open_clip, model: "
        "ViT-B-16, pretrained: datacomp_xl_s13b_b90k}, text: {name: open_clip, ...}}"
    )
    shard_size: PositiveInt = 5000
    embed: EmbedSection = Field(default_factory=EmbedSection)
    index: IndexSection = Field(default_factory=IndexSection)
    # The manifest as loaded (after `--set`, with the loader's `_manifest_path`): see `as_loaded`.
    _loaded: dict[str, Any] | None = PrivateAttr(default=None)

    @field_validator("embed", "index", mode="before")
    @classmethod
    def _empty_section(cls, value: Any) -> Any:
        return {} if value is None else value  # `embed:` with nothing under it: the defaults

    @property
    def manifest_path(self) -> str | None:
        """The file the manifest was read from (None for one built in code)."""
        return (self._loaded or {}).get("_manifest_path")

    def as_loaded(self) -> dict[str, Any]:
        """The manifest as the loader read it (a copy): the keys as written, their values unchanged (a
        `memory_budget_gb: 4` stays the int 4, not the 4.0 the model holds), with `_manifest_path`;
        the given keys for a manifest built in code. What run hashes and saved models record."""
        return copy.deepcopy(self._loaded) if self._loaded is not None else dump_given(self)


def validate_kb(spec: dict[str, Any], where: str, overrides: list[str] | None = None) -> KBManifest:
    """`spec` checked against the KB schema, as a `KBManifest` that remembers `spec` (`as_loaded`,
    `manifest_path`); one `UserError` line if bad."""
    kb = validate_section(KBManifest, spec, where, overrides)
    assert isinstance(kb, KBManifest)
    kb._loaded = copy.deepcopy(spec)
    return kb


def image_encoder(spec: Any, where: str = "image encoder") -> ImageEncoder:
    """An `encoders.image` mapping (a saved model's, a test's) as the schema's `ImageEncoder`."""
    return spec if isinstance(spec, ImageEncoder) else validate_section(ImageEncoder, spec, where)  # type: ignore[return-value]


def text_encoder(spec: Any, where: str = "text encoder") -> TextEncoder:
    """An `encoders.text` mapping (a saved model's, a test's) as the schema's `TextEncoder`."""
    return spec if isinstance(spec, TextEncoder) else validate_section(TextEncoder, spec, where)  # type: ignore[return-value]
