"""Whether another KB can stand in for a run's own: embedded with the run's encoders and the embed options
that shape the vectors, and indexed (`retformer predict --kb`, `Run.predict(kb=...)`, `retformer
evaluate --kb`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from retformer.artifacts.errors import UserError
from retformer.artifacts.names import INDEX_JSON
from retformer.artifacts.workspace import Workspace, read_json

if TYPE_CHECKING:
    from retformer.kb_builder.kb_schema import KBManifest

# The embed options that can change the stored vectors: the device (CUDA embeds under autocast). The
# others (batch_size, num_workers, threads, prefetch_factor) only schedule the work: a KB embedded in
# batches of 32 lives in the space of one embedded in batches of 256.
VECTOR_EMBED_OPTIONS = ("device",)


def _vector_options(embed: dict[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (embed or {}).items() if k in VECTOR_EMBED_OPTIONS and v is not None}


def _describe(encoders: Any, embed: dict[str, Any] | None) -> str:
    """`image=efficientnet_lite0(image_size=64), text=minilm (embed {'batch_size': 256})`: every key
    of each encoder's spec, so that two specs that differ read differently."""
    roles = []
    for role, spec in (encoders or {}).items():
        if spec:
            rest = ", ".join(f"{k}={v}" for k, v in spec.items() if k != "name")
            roles.append(f"{role}={spec.get('name')}" + (f"({rest})" if rest else ""))
    opts = _vector_options(embed)
    return (", ".join(roles) or "no encoders") + (f" (embed {opts})" if opts else "")


def check_kb_compatible(
    ws: Workspace,
    kb: str,
    run: str,
    encoders: dict[str, Any],
    embed: dict[str, Any] | None,
    manifest: KBManifest | None = None,
) -> dict[str, Any]:
    """KB `kb` in `ws` was embedded with these encoders and vector-shaping embed options (the run's) and
    is indexed; returns its index.json. One UserError line naming both sides otherwise. The KB's embed
    record says what it was embedded with; `manifest` (its manifest, when loaded) fills in the embed
    options of records written before they carried them."""
    record = read_json(ws.kb_stage_record(kb, "embed"), torn_ok=True)
    if record is None:
        raise UserError(f"KB {kb} is not embedded in {ws.root}: run `retformer embed --kb {kb}` first")
    kb_embed = record.get("embed", manifest.as_loaded().get("embed") if manifest is not None else None)
    if record.get("encoders") != encoders or _vector_options(kb_embed) != _vector_options(embed):
        raise UserError(
            f"KB {kb} was embedded with {_describe(record.get('encoders'), kb_embed)}, but run {run} was "
            f"trained with {_describe(encoders, embed)}: evaluate with a KB embedded with the run's "
            "encoders (its vectors live in another space)"
        )
    index = read_json(ws.kb_index(kb) / INDEX_JSON, torn_ok=True)
    if not index or "recall_check" not in index:
        raise UserError(f"KB {kb} has no index: run `retformer index --kb {kb}` first")
    return index
