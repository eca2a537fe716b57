"""YAML manifests: one per KB source, per dataset, per experiment; a path works wherever a name does.

Values can be overridden from the command line with `--set dotted.key=value` (the value is parsed as
YAML, so `--set train.epochs=3` gives an int and `--set encoders.image.pretrained=null` gives None).
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import yaml

from retformer.artifacts.errors import UserError

CATEGORIES = ("kb", "datasets", "experiments", "clusters")


def manifest_roots() -> list[Path]:
    """Where named manifests are looked up: $RETFORMER_MANIFESTS, ./manifests, then the repo's own."""
    roots = []
    if env := os.environ.get("RETFORMER_MANIFESTS"):
        roots.append(Path(env))
    roots.append(Path.cwd() / "manifests")
    roots.append(Path(__file__).resolve().parents[1] / "manifests")
    seen: list[Path] = []
    for r in roots:
        if r not in seen:
            seen.append(r)
    return seen


def available(category: str) -> list[str]:
    """Names of the manifests of one category found in the manifest roots."""
    names: set[str] = set()
    for root in manifest_roots():
        names.update(p.stem for p in (root / category).glob("*.yaml"))
    return sorted(names)


def resolve(category: str, name_or_path: str) -> Path:
    """The file behind a manifest name (looked up in `category`) or an explicit path to a YAML file."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown manifest category {category!r}")
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or os.sep in name_or_path:
        if not candidate.is_file():
            raise UserError(f"manifest file not found: {candidate}")
        return candidate
    for root in manifest_roots():
        path = root / category / f"{name_or_path}.yaml"
        if path.is_file():
            return path
    known = ", ".join(available(category)) or "none"
    singular = {
        "kb": "knowledge base",
        "datasets": "dataset",
        "experiments": "experiment",
        "clusters": "cluster",
    }[category]
    raise UserError(f"unknown {singular} {name_or_path!r}: known {category} manifests are {known}")


class _Loader(yaml.SafeLoader):
    """YAML 1.2's floats: PyYAML (YAML 1.1) reads `1e-3` as a string, which no manifest means. A key
    given twice in one mapping is an error (PyYAML keeps the last value without a word)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` merges may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line)
            except TypeError:  # an unhashable key: the base class says so
                break
            if first != key_node.start_mark.line:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {first + 1})", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """`at line L, column C: problem` on one line (PyYAML's own message spans several)."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{where}: {problem}"


def parse_yaml(text: str) -> Any:
    """YAML as manifests and `--set` values are read (see `_Loader`)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Return a copy of `data` with each `dotted.key=value` override applied (value parsed as YAML)."""
    data = copy.deepcopy(data)
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = parse_yaml(raw)
        except yaml.YAMLError as exc:
            raise UserError(f"override {item!r}: value is not valid YAML{_yaml_problem(exc)}") from None
        node: Any = data
        parts = key.strip().split(".")
        for depth, part in enumerate(parts[:-1]):
            if isinstance(node, list):  # `a.b.0.c=x`: an item of a list, kept a list
                part = _list_index(node, part, item, parts[:depth])
            elif part not in node:
                node[part] = {}
            if not isinstance(node[part], (dict, list)):
                node[part] = {}
            node = node[part]
        last = parts[-1]
        node[_list_index(node, last, item, parts[:-1]) if isinstance(node, list) else last] = value
    return data


def _list_index(items: list[Any], part: str, item: str, where: list[str]) -> int:
    """The list index `part` names in override `item` (`--set a.b.0=x` sets item 0 of the list a.b;
    it used to turn the list into the dict {"0": x})."""
    if not part.isdigit() or int(part) >= len(items):
        raise UserError(
            f"override {item!r}: {'.'.join(where)} is a list of {len(items)} item(s), {part!r} is not an "
            f"index of it (0..{len(items) - 1}; to replace the list: {'.'.join(where)}=[...])"
        )
    return int(part)


def load(category: str, name_or_path: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Load a manifest by name or path and apply overrides; `name` defaults to the file's stem."""
    path = resolve(category, name_or_path)
    try:
        data = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"manifest {path} is not valid YAML{_yaml_problem(exc)}") from None
    if not isinstance(data, dict):
        raise UserError(f"manifest {path} must be a mapping at the top level")
    data.setdefault("name", path.stem)
    data = apply_overrides(data, overrides)
    data["_manifest_path"] = str(path)
    return data
