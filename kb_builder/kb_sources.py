"""Knowledge bases built from local data, written as webdataset shard sets (`shards.py`).

No package ships real image-text pairs offline, so the captions written here are SYNTHETIC: each is
a class name put into one of a handful of templates ("a photo of a bag.", "product photo: bag.", ...).
They stand in for alt-text; they carry no information beyond the class they name.

KB sources (`kind` of the `source:` mapping of a KB manifest, the `LocalSource` passed here):

- `world` (alias `fashion_mnist_world`): the demo KB, for ANY dataset with a pool of labelled images
  outside its train / val / test splits (`DownstreamDataset.pool`: Fashion-MNIST-LT's training
  images outside the LT subset and val, the digits left over, an imagefolder's `world/`), disjoint
  from the downstream splits as DataComp is disjoint from the downstream sets, optionally
  subsampled uniformly at random to `size`. A fixed fraction `wrong_caption_fraction` (default 0.2)
  of the captions names a wrong class, drawn uniformly from the other classes, to mimic noisy web
  alt-text. Captions name the dataset's `class_names` (a manifest can map folder names such as
  `digit_3` to display names). The `label` column is the class the caption NAMES (noisy, like a
  label inferred from alt-text); the json also records `true_label`.
- `downstream`: the downstream training split itself, captions from the same templates naming the
  true label, uids identical to the dataset's train uids (so the neighbor stage can exclude a
  query retrieving itself by uid).
- `all`: both, as two shard sets (`world-*.tar` and `downstream-*.tar`) in one directory.

Keys read here (their defaults live in `kb_schema.LocalSource`): `kind` (world / fashion_mnist_world
/ downstream / all), `size` (None = the whole pool), `seed`, `wrong_caption_fraction`, `templates`
(optional list; each contains `{name}` or `{a}`, the class name with its indefinite article); the KB's
`name` only for messages. `dataset` belongs to the caller. `source_from_mapping` validates a plain
`source:` mapping (a test's) into a `LocalSource`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retformer.artifacts.errors import UserError
from retformer.artifacts.schema import validate_section
from retformer.artifacts.shards import Sample, write_shards
from retformer.kb_builder.datasets.base import DatasetSplit, DownstreamDataset
from retformer.kb_builder.kb_schema import LocalSource

SOURCES = ("world", "downstream", "all")
_ALIASES = {"fashion_mnist_world": "world"}
TEMPLATES: tuple[str, ...] = (
    "a photo of {a}.",
    "{a} on a white background.",
    "product photo: {name}.",
    "a black and white photo of {a}.",
    "a low resolution photo of {a}.",
    "{name} for sale, studio shot.",
    "a close-up photo of {a}.",
    "catalogue image of {a}.",
)
_FINGERPRINT_VERSION = 1


def _label(source: LocalSource, kb_name: str | None) -> str:
    return repr(kb_name or f"source {source.kind}")


def source_from_mapping(raw: dict[str, Any], kb_name: str | None = None) -> LocalSource:
    """A KB manifest's `source:` mapping (a test's, a notebook's) checked as a `LocalSource`: an unknown
    kind names the known ones, any other problem is the schema's one `UserError` line."""
    kind = raw.get("kind")
    label = repr(kb_name or f"source {kind}")
    if (_ALIASES.get(kind, kind) if isinstance(kind, str) else kind) not in SOURCES:
        known = ", ".join([*SOURCES, *_ALIASES])
        raise UserError(f"KB {label}: unknown local source kind {kind!r}: known kinds are {known}")
    return validate_section(LocalSource, raw, f"KB {label}")  # type: ignore[return-value]


def caption_for(template: str, class_name: str) -> str:
    """A synthetic caption: `template` with `{name}` = the lower-cased class name, `{a}` = with article."""
    name = class_name.lower()
    article = "an" if name[:1] in "aeiou" else "a"
    return template.format(name=name, a=f"{article} {name}")


def _templates(source: LocalSource) -> list[str]:
    # The schema refused an empty list and bad templates.
    return list(TEMPLATES) if source.templates is None else list(source.templates)


def _fingerprint(description: dict[str, Any], arrays: Sequence[np.ndarray] = ()) -> str:
    """sha256 of everything that determines a shard set's content (metadata + image pixels)."""
    h = hashlib.sha256(
        json.dumps({"v": _FINGERPRINT_VERSION, **description}, sort_keys=True, default=str).encode()
    )
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _split_image_identity(split: DatasetSplit) -> tuple[list[Any], list[np.ndarray]]:
    """What identifies a split's images: their pixels, or (path, size, mtime) of their files."""
    if split.pixels is not None:
        return [], [split.pixels]
    assert split.paths is not None
    ident = []
    for p in split.paths:
        st = p.stat()
        ident.append([str(p), st.st_size, st.st_mtime_ns])
    return ident, []


def _rngs(seed: int) -> tuple[np.random.Generator, np.random.Generator, np.random.Generator]:
    # Independent streams, so that changing e.g. the wrong-caption fraction does not change the subsample.
    subsample, wrong, template = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    return subsample, wrong, template


def world_samples(
    source: LocalSource, dataset: DownstreamDataset, kb_name: str | None = None
) -> tuple[list[str], list[str], np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """The world KB's metadata, before any image is encoded.

    The world is the dataset's `pool`: labelled images in none of its train / val / test splits
    (Fashion-MNIST-LT: training images outside the LT subset and val; digits: the rest of the 1,797;
    imagefolder: `world/` or the LT leftovers). Captions name `dataset.class_names` (the manifest's
    `class_names` display names) through the templates.

    Returns (uids, captions, named labels, true labels, source indices of the chosen pool items,
    info). Every draw is seeded by `source.seed`.
    """
    pool_split = dataset.pool
    if pool_split is None or len(pool_split) == 0:
        raise UserError(
            f"the world pool of dataset {dataset.name!r} is empty: KB source 'world' needs images outside "
            "its train / val / test splits (Fashion-MNIST: use kind fashion_mnist_lt; imagefolder: add "
            "root/world/<class>/ or an imbalance_ratio)"
        )
    seed = source.seed
    frac = float(source.wrong_caption_fraction)  # the schema keeps it in [0, 1]
    templates = _templates(source)
    pool = np.arange(len(pool_split), dtype=np.int64)
    size = source.size
    if size is not None and (int(size) < 1 or int(size) > len(pool)):
        label = _label(source, kb_name)
        raise UserError(f"KB {label}: size {size} must be between 1 and the pool size {len(pool)}")
    rng_sub, rng_wrong, rng_tpl = _rngs(seed)
    # Uniform without replacement: the class proportions of the pool carry over.
    pos = np.sort(rng_sub.choice(pool, int(size), replace=False)) if size is not None else pool
    true = pool_split.labels[pos].astype(np.int64)
    n, c = len(pos), dataset.num_classes
    n_wrong = int(round(frac * n))
    named = true.copy()
    if c > 1 and n_wrong:
        wrong_pos = rng_wrong.choice(n, n_wrong, replace=False)
        # true + uniform{1..C-1} mod C: uniform over the other classes.
        named[wrong_pos] = (true[wrong_pos] + rng_wrong.integers(1, c, n_wrong)) % c
    tpl = rng_tpl.integers(0, len(templates), n)
    captions = [caption_for(templates[t], dataset.class_names[k]) for t, k in zip(tpl, named, strict=True)]
    uids = [pool_split.uids[i] for i in pos]
    info = {
        "pool_size": int(len(pool)),
        "size": n,
        "seed": seed,
        "wrong_caption_fraction": {
            "requested": frac,
            "measured": float(np.mean(named != true)) if n else 0.0,
        },
        "true_class_counts": np.bincount(true, minlength=c).tolist(),
        "named_class_counts": np.bincount(named, minlength=c).tolist(),
    }
    return uids, captions, named, true, pool_split.source_index[pos], info


def _build_world(
    source: LocalSource, dataset: DownstreamDataset, out_dir: Path, shard_size: int, kb_name: str | None
) -> dict:
    uids, captions, named, true, rows, info = world_samples(source, dataset, kb_name)
    assert dataset.pool is not None  # world_samples refuses a dataset without one
    pool = dataset.pool.subset(np.searchsorted(dataset.pool.source_index, rows))
    if pool.uids != uids:  # source_index is sorted for every loader; guard the mapping anyway
        by_uid = {u: i for i, u in enumerate(dataset.pool.uids)}
        pool = dataset.pool.subset([by_uid[u] for u in uids])
    ident, arrays = _split_image_identity(pool)
    fp = _fingerprint(
        {
            "source": "world",
            "uids": uids,
            "captions": captions,
            "named": named.tolist(),
            "true": true.tolist(),
            "files": ident,
        },
        arrays,
    )

    def gen() -> Iterator[Sample]:
        for i, uid in enumerate(uids):
            yield Sample(
                uid, pool.image_source(i), captions[i], int(named[i]), "world", {"true_label": int(true[i])}
            )

    shards = write_shards(gen(), out_dir, "world", shard_size, fingerprint=fp)
    return {**info, "count": len(uids), "shards": [str(p) for p in shards], "fingerprint": fp}


def _build_downstream(
    source: LocalSource, dataset: DownstreamDataset, out_dir: Path, shard_size: int
) -> dict:
    split = dataset.train
    seed = source.seed
    templates = _templates(source)
    _, _, rng_tpl = _rngs(seed)
    tpl = rng_tpl.integers(0, len(templates), len(split))
    captions = [
        caption_for(templates[t], dataset.class_names[k]) for t, k in zip(tpl, split.labels, strict=True)
    ]
    ident, arrays = _split_image_identity(split)
    fp = _fingerprint(
        {
            "source": "downstream",
            "uids": split.uids,
            "captions": captions,
            "labels": split.labels.tolist(),
            "files": ident,
        },
        arrays,
    )

    def gen() -> Iterator[Sample]:
        for i, uid in enumerate(split.uids):
            yield Sample(uid, split.image_source(i), captions[i], int(split.labels[i]), "downstream")

    shards = write_shards(gen(), out_dir, "downstream", shard_size, fingerprint=fp)
    return {"count": len(split), "seed": seed, "shards": [str(p) for p in shards], "fingerprint": fp}


def build_kb_shards(
    source: LocalSource,
    dataset: DownstreamDataset,
    out_dir: Path,
    shard_size: int,
    kb_name: str | None = None,
) -> dict[str, Any]:
    """Write the shard sets of the KB whose `source` is local (world / downstream / all) into `out_dir`.

    Idempotent (see `shards.write_shards`). Returns the facts for the stage record: shards, counts,
    seeds, requested and measured wrong-caption fraction, class counts, templates.
    """
    kind = _ALIASES.get(source.kind, source.kind)
    out_dir = Path(out_dir)
    parts: dict[str, dict[str, Any]] = {}
    if kind in ("world", "all"):
        parts["world"] = _build_world(source, dataset, out_dir, shard_size, kb_name)
    if kind in ("downstream", "all"):
        parts["downstream"] = _build_downstream(source, dataset, out_dir, shard_size)
    shards = sorted(s for p in parts.values() for s in p["shards"])
    world = parts.get("world", {})
    return {
        "kb": kb_name,
        "kind": kind,
        "dataset": dataset.name,
        "synthetic_captions": True,
        "templates": _templates(source),
        "seed": source.seed,
        "shard_size": shard_size,
        "counts": {
            **{k: v["count"] for k, v in parts.items()},
            "total": sum(v["count"] for v in parts.values()),
        },
        "wrong_caption_fraction": world.get("wrong_caption_fraction"),
        "parts": {k: {kk: vv for kk, vv in v.items() if kk != "shards"} for k, v in parts.items()},
        "shards": shards,
    }


def write_dataset_shards(dataset: DownstreamDataset, out_dir: Path, shard_size: int) -> dict[str, list[Path]]:
    """Write every split of `dataset` as `<split>-%05d.tar` (no captions, source "downstream").

    Idempotent per split. Returns {split: shard paths}.
    """
    out: dict[str, list[Path]] = {}
    for name, split in dataset.splits.items():
        ident, arrays = _split_image_identity(split)
        fp = _fingerprint(
            {
                "dataset": dataset.name,
                "split": name,
                "uids": split.uids,
                "labels": split.labels.tolist(),
                "files": ident,
            },
            arrays,
        )

        def gen(split: DatasetSplit = split) -> Iterator[Sample]:
            for i, uid in enumerate(split.uids):
                yield Sample(uid, split.image_source(i), None, int(split.labels[i]), "downstream")

        out[name] = write_shards(gen(), out_dir, name, shard_size, fingerprint=fp)
    return out
