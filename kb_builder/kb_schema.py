"""The knowledge-base manifest's schema: source, encoders, embed, index, shard size.

Validated when the manifest is loaded, before any stage starts (a missing `encoders:` used to be a
KeyError after a Dask cluster had started). The stages read the manifest as written, with their own
defaults, so the schema is strict: a quoted number is refused here.
"""

from __future__ import annotations

import difflib
import string
from typing import Annotated, Any, ClassVar, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from retformer.artifacts.schema import StrictSection, validate_section
from retformer.kb_builder.index.select import KINDS as INDEX_KINDS

PositiveInt = Annotated[int, Field(ge=1)]
# The largest encoder input side: 4x the usual 224-336 px. 20000 px was accepted and asked for a
# 4.8 GB float32 tensor per image at embed.
MAX_IMAGE_SIZE = 1024

# Each encoder's options besides `name`; the encoder classes check these very sets when built.
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
    name: str
    model: str | None = None
    pretrained: str | None = None
    image_size: Annotated[int, Field(ge=16, le=MAX_IMAGE_SIZE)] | None = None
    autocast: bool | None = None
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
    wrong_caption_fraction: Annotated[float, Field(ge=0, le=1)] | None = None
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
    """Options of the embed tasks (kb_builder/embed/options.py holds their defaults)."""

    batch_size: PositiveInt | None = None
    num_workers: Annotated[int, Field(ge=0)] | None = None
    threads: PositiveInt | None = None
    prefetch_factor: PositiveInt | None = None
    device: Annotated[str, Field(pattern=r"^(cpu|mps|cuda(:\d+)?)$")] | None = None


class IndexSection(StrictSection):
    """How the index is chosen, built and checked (kb_builder/index/__init__.py run_index)."""

    kind: Literal["auto", *INDEX_KINDS] = "auto"  # type: ignore[valid-type]
    recall_target: Annotated[float, Field(gt=0, le=1)] = 0.95
    memory_budget_gb: Annotated[float, Field(gt=0)] = 8
    num_shards: PositiveInt = 1
    k: PositiveInt = 32
    num_queries: PositiveInt | None = None


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
    embed: EmbedSection | None = None
    index: IndexSection | None = None


def validate_kb(spec: dict[str, Any], where: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """`spec` checked against the KB schema; returns `spec` unchanged (one `UserError` line if bad)."""
    validate_section(KBManifest, spec, where, overrides)
    return spec
