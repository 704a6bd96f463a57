"""The file formats mixer-edge reads, each described by one schema (pydantic v2).

A schema is the format's only definition: files are validated against it before any field is
used (unknown keys refused with the known ones listed, wrong types and out-of-range values named
with their field path), and the README's format reference is generated from it
(`python -m mixer_edge.formats`), so the documentation cannot drift from the code.
"""

from __future__ import annotations

import types
import typing
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import MixerEdgeError

S = TypeVar("S", bound="Schema")


class Schema(BaseModel):
    """A record read from a file: unknown keys are errors, values keep their JSON/TOML types (no coercion)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, hide_input_in_errors=True)


def parse(schema: type[S], data: Any, source: str, fix: str = "fix it") -> S:
    """`data` validated as `schema`; else one MixerEdgeError naming `source`, the field, the problem and `fix`."""
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise MixerEdgeError(f"{source}: {describe(schema, exc.errors()[0])}: {fix}") from None
    except RecursionError:
        raise MixerEdgeError(f"{source}: nested too deeply to be a {schema.__name__}: {fix}") from None


def describe(schema: type[Schema], error: dict) -> str:
    """One validation error as a phrase: the field path, what is wrong, and (for an unknown key) the known ones."""
    loc = [str(part) for part in error["loc"]]
    where = ".".join(loc) or "the document"
    if error["type"] == "extra_forbidden":
        known = sorted(_fields_at(schema, error["loc"][:-1]))
        table = ".".join(loc[:-1])
        return (f"unknown field '{safe_text(loc[-1], 60)}'" + (f" in [{table}]" if table else "")
                + (f" (known: {', '.join(known)})" if known else ""))
    if error["type"] == "missing":
        return f"missing field '{where}'"
    got = error.get("input", ...)
    shown = "" if got is ... else f", got {safe_text(repr(got), 60)}"
    return f"field '{where}': {error['msg'].rstrip('.')}{shown}"


def _fields_at(schema: type, loc: tuple) -> set[str]:
    """The field names of the record at `loc` inside `schema` (empty where `loc` leaves the schemas)."""
    node: Any = schema
    for part in loc:
        node = _record(node)
        if node is None:
            return set()
        if isinstance(part, str) and part in node.model_fields:
            node = node.model_fields[part].annotation
        elif not isinstance(part, str) or not node.model_fields:
            continue  # a list index or a dict key: stay on the item's record
    node = _record(node)
    return {f.alias or name for name, f in node.model_fields.items()} if node else set()


def _record(annotation: Any) -> type[BaseModel] | None:
    """The schema inside an annotation (X, X | None, list[X], dict[str, X]), if there is one."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _record(arg)
        if found is not None:
            return found
    return None


def safe_text(text: str, limit: int = 200) -> str:
    """`text` fit for one terminal line: control characters escaped, at most `limit` characters."""
    out = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in str(text))
    return out if len(out) <= limit else out[: limit - 3] + "..."


# ---- the format reference (README), generated from the schemas -------------------------------------

def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is typing.Literal:
        return " / ".join(f'"{a}"' if isinstance(a, str) else str(a) for a in typing.get_args(annotation))
    if origin in (list, tuple):
        return f"list of {_type_name(typing.get_args(annotation)[0])}"
    if origin is dict:
        return f"table of {_type_name(typing.get_args(annotation)[1])}"
    if annotation is type(None):
        return "absent"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"[{annotation.__name__}](#{annotation.__name__.lower()})"
    return {str: "string", int: "integer", float: "number", bool: "boolean", Any: "any"}.get(
        annotation, getattr(annotation, "__name__", str(annotation)))


def _default(value: Any) -> str:
    if isinstance(value, BaseModel):
        return "its defaults"
    return "absent" if value is None else f"`{value!r}`"


def _constraints(field) -> str:
    parts = []
    for meta in field.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "length >="),
                           ("max_length", "length <="), ("pattern", "matches")):
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{sign} `{value}`")
    return ", ".join(parts)


def reference(formats: list[tuple[str, type[Schema]]]) -> str:
    """Markdown tables of every field of each (file, schema), nested records after their parent."""
    out = []
    for title, schema in formats:
        out.append(f"### {title}\n")
        seen: list[type[BaseModel]] = []
        queue = [schema]
        while queue:
            record = queue.pop(0)
            if record in seen:
                continue
            seen.append(record)
            doc = " ".join((record.__doc__ or "").split())
            out.append(f"<a id=\"{record.__name__.lower()}\"></a>**{record.__name__}**: {doc}\n")
            out.append("| field | type | default | meaning |\n| --- | --- | --- | --- |")
            for name, field in record.model_fields.items():
                default = "required" if field.is_required() else _default(field.get_default(call_default_factory=True))
                kind = _type_name(field.annotation)
                limits = _constraints(field)
                meaning = (field.description or "") + (f" ({limits})" if limits else "")
                out.append(f"| `{field.alias or name}` | {kind} | {default} | {meaning} |")
                nested = _record(field.annotation)
                if nested is not None:
                    queue.append(nested)
            out.append("")
    return "\n".join(out)
