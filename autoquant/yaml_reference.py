"""The YAML job reference (every key, its type, default and meaning), generated from config.py's schema.

``autoquant schema`` prints it; docs/yaml-reference.md is its committed copy, and a test fails when
that copy is stale (regenerate with ``autoquant schema > docs/yaml-reference.md``).
"""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from autoquant.config import CallableRef, CriterionSpec, Job, SpaceSpec, StrategySpec

# Each model's section, in reading order, with the key that holds it.
SECTIONS: tuple[tuple[str, type[BaseModel]], ...] = (
    ("(top level)", Job), ("space", SpaceSpec), ("criterion", CriterionSpec), ("strategy", StrategySpec),
    ("model / calibration / eval as a mapping", CallableRef),
)
_TYPE_NAMES = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}


def yaml_reference() -> str:
    """The reference as Markdown."""
    lines = ["# YAML job reference", "",
             "Generated from the schema in `autoquant/config.py` by `autoquant schema`; do not edit by hand.",
             "Unknown keys are errors. Relative paths are relative to the job file's folder.", ""]
    for key, model in SECTIONS:
        lines += [f"## {key}", "", (model.__doc__ or "").strip().splitlines()[0], "",
                  "| key | type | default | meaning |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            lines.append(f"| `{name}` | {_type(field.annotation)} | {_default(field)} | {field.description or ''} |")
        lines.append("")
    return "\n".join(lines)


def _type(annotation: Any) -> str:
    if annotation is CallableRef:
        return "callable: `module:function`, or a mapping (call, args)"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"mapping ({annotation.__name__})"
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type(a) for a in args)
    if origin is list:
        return f"list of {_type(args[0])}"
    if origin is dict:
        return "mapping"
    return _TYPE_NAMES.get(annotation, str(annotation))


def _default(field: Any) -> str:
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default is PydanticUndefined else field.default
    if isinstance(value, BaseModel):  # a section: only what differs from the section's own defaults
        fields = type(value).model_fields
        changed = {k: v for k, v in value.model_dump().items() if v != fields[k].get_default(call_default_factory=True)}
        return "`" + ", ".join(f"{k}: {v}" for k, v in changed.items()) + "`" if changed else "see its section"
    return "null" if value is None else f"`{value}`".replace("`True`", "`true`").replace("`False`", "`false`")
