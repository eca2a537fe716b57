"""Typed manifest schemas (pydantic): the shared base, and bad input as one line naming the key.

Each layer owns the schema of the manifest it reads (kb_builder/datasets/schema.py for datasets,
kb_builder/kb_schema.py for knowledge bases, pipelines/experiment_schema.py for experiments); this
module holds what they share: a `Section` base that refuses unknown keys, `section_from_dataclass`
(a config dataclass's fields as a section, so the defaults and types live in one place), and
`validate_section`, which turns pydantic's report into a single `UserError` line:

    manifests/experiments/demo.yaml: train.epocs: unknown key (did you mean 'epochs'?)
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Union

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from retformer.artifacts.errors import UserError


class Section(BaseModel):
    """A manifest mapping: unknown keys are errors; lax coercion so YAML's `1e-3` (a string) is a float."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class StrictSection(Section):
    """A section read as written by code that keeps its own defaults: no coercion, so a quoted number
    is refused here instead of crashing later (an int still passes where a float is expected)."""

    model_config = ConfigDict(strict=True)


def section_from_dataclass(
    cls: type, name: str | None = None, base: type[Section] = Section
) -> type[Section]:
    """A `Section` with `cls`'s dataclass fields (types with their `Annotated` limits, and defaults)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    spec: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        spec[f.name] = (hints[f.name], default)
    return create_model(name or f"{cls.__name__}Section", __base__=base, **spec)


def _walk(model: Any, loc: tuple[Any, ...]) -> tuple[tuple[Any, ...], Any, Any]:
    """Follow pydantic's error location through `model`: (the location as the user wrote it, the
    annotation there, the FieldInfo there). Union tags and validator names pydantic inserts (a
    discriminator value, `function-after[...]`, a member class name) are dropped."""
    node: Any = model
    field: Any = None
    clean: list[Any] = []
    for part in loc:
        members = [m for m in _members(node) if isinstance(m, type) and issubclass(m, BaseModel)]
        hit = next((m for m in members if isinstance(part, str) and part in m.model_fields), None)
        if hit is not None:
            field = hit.model_fields[part]
            node = field.annotation
            clean.append(part)
            continue
        tagged = [m for m in members if part in _tags_of(m)]
        if tagged or (isinstance(part, str) and _is_pydantic_tag(part)):
            node = tagged[0] if tagged else node  # a union member chosen by its tag: stay, narrowed
            continue
        inner = _container_item(node, part)
        clean.append(part)
        node, field = inner, None
    return tuple(clean), node, field


def _tags_of(model: type[BaseModel]) -> tuple[Any, ...]:
    """The `kind` values that select `model` in a discriminated union (its Literal's values)."""
    kind = model.model_fields.get("kind")
    return typing.get_args(kind.annotation) if kind is not None else ()


def _container_item(node: Any, part: Any) -> Any:
    for candidate in _members(node):
        origin = typing.get_origin(candidate)
        if origin is dict:
            return typing.get_args(candidate)[1]
        if origin in (list, tuple) and isinstance(part, int):
            return typing.get_args(candidate)[0]
    return None


def _mapping_fields(node: Any) -> list[str]:
    fields: list[str] = []
    for candidate in _members(node):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            fields += [f for f in candidate.model_fields if f not in fields]
    return fields


def _nested_fields(node: Any) -> list[tuple[str, str]]:
    """(section, key) for every key of the mappings one level below `node`."""
    out = []
    for candidate in _members(node):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            for name, info in candidate.model_fields.items():
                out += [(name, key) for key in _mapping_fields(info.annotation)]
    return out


def _members(node: Any) -> list[Any]:
    """The alternatives of a union (or the type itself), Annotated metadata stripped."""
    origin = typing.get_origin(node)
    if origin is typing.Annotated:
        return _members(typing.get_args(node)[0])
    if origin in (Union, types.UnionType):
        return [m for arg in typing.get_args(node) for m in _members(arg)]
    return [node]


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _is_pydantic_tag(part: str) -> bool:
    # Union members (`TrainSection`, `list[int]`) and validator names pydantic adds to a location.
    return part[:1].isupper() or "[" in part or part.startswith("function-")


def explain(exc: ValidationError, model: type[BaseModel]) -> str:
    """The first problem in `exc` as `dotted.key: what is wrong` (with "did you mean" for unknown keys,
    and the field's description for a missing one), located as the user wrote the YAML."""
    err = exc.errors(include_url=False)[0]
    if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        parent, node, _ = _walk(model, tuple(err["loc"][:-1]))
        loc = (*parent, err["loc"][-1])
        known = sorted(_mapping_fields(node))
        close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
        if not close:  # a key written one level too high (`epocs` for `train.epochs`)
            nested = _nested_fields(node)
            close = [f"{p}.{c}" for p, c in nested if c in difflib.get_close_matches(str(loc[-1]), [c])]
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        hint = hint or (f" (known: {', '.join(known)})" if known else "")
        return f"{_dotted(loc)}: unknown key{hint}"
    loc, _, field = _walk(model, tuple(err["loc"]))
    key = _dotted(loc) or "(top level)"
    if err["type"] == "missing":
        about = f" ({field.description})" if field is not None and field.description else ""
        return f"{key}: required key is missing{about}"
    given = err.get("input")
    shown = f", got {given!r}" if not isinstance(given, dict | list) and given is not None else ""
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] in ("model_type", "model_attributes_type", "dict_type", "dataclass_type"):
        msg = "must be a mapping of keys to values"  # not "an instance of <class>": YAML has none
    if err["type"] == "union_tag_invalid":
        msg = f"unknown kind {err['ctx']['tag']} (known: {err['ctx']['expected_tags']})"
        key, shown = f"{key}.kind" if key != "(top level)" else "kind", ""
    return f"{key}: {msg[:1].lower()}{msg[1:]}{shown}"


def validate_section(
    model: type[BaseModel], data: dict[str, Any], where: str, overrides: list[str] | None = None
) -> BaseModel:
    """`data` validated against `model`; a problem becomes one `UserError` line starting with `where`
    (the manifest file), naming the dotted key and, when the key came from `--set`, that override."""
    body = {k: v for k, v in data.items() if not str(k).startswith("_")}
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        line = explain(exc, model)
        key = line.split(":", 1)[0]
        typed = [(o, o.split("=", 1)[0].strip()) for o in overrides or []]
        field = key.split("[", 1)[0]  # `k_values[0]` was set by `k_values=[0,4]`
        by = [o for o, k in typed if field in (k, k.split(".", 1)[-1])]
        suffix = f" (from --set {by[-1]})" if by else ""
        raise UserError(f"{where}: {line}{suffix}") from None
    except UserError as exc:
        # A dataclass's own __post_init__ check (ranges that span fields): keep its words, add the file.
        raise UserError(f"{where}: {exc}") from None


def dump_given(section: BaseModel) -> dict[str, Any]:
    """The section's values as a plain dict, only the keys the manifest gave (coerced to their types)."""
    return section.model_dump(exclude_unset=True)
