"""The file formats mixer-edge reads, each described by one schema (pydantic v2).

A schema is the format's only definition: files are validated against it before any field is
used (unknown keys refused with the known ones listed, wrong types and out-of-range values named
with their field path), and the README's format reference is generated from it
(`python -m mixer_edge.formats`), so the documentation cannot drift from the code.
"""

from __future__ import annotations

import json
import math
import types
import typing
from typing import Annotated, Any, NoReturn, TypeVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, ValidationError
from pydantic_core import PydanticCustomError

from .atomic import atomic_file
from .errors import MixerEdgeError

S = TypeVar("S", bound="Schema")


class Schema(BaseModel):
    """A record read from a file: unknown keys are errors, values keep their JSON/TOML types (no coercion),
    numbers are finite (JSON has no words for NaN and Infinity)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, hide_input_in_errors=True,
                              allow_inf_nan=False)


def refuse(field: str, message: str, value: Any, **params: Any) -> NoReturn:
    """Fail a cross-field check in a model validator, the error located at `field` (dotted, relative to the
    record) and showing `value`; `message` is a format string of `params`."""
    error = {"type": PydanticCustomError("consistency", message, params), "loc": tuple(field.split(".")),
             "input": value}
    raise ValidationError.from_exception_data("consistency", [error])


def _json_data(value: Any) -> Any:
    """`value` if it is plain JSON data (objects with string keys, arrays, strings, finite numbers, true/false/null)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if not all(isinstance(k, str) for k in item):
                raise PydanticCustomError("json_data", "keys must be strings")
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, float) and not math.isfinite(item):
            raise PydanticCustomError("finite_number", "holds {value}, which is not a finite number",
                                      {"value": repr(item)})
        elif item is not None and not isinstance(item, (str, int, float, bool)):
            raise PydanticCustomError("json_data", "holds a {kind}, which is not JSON data",
                                      {"kind": type(item).__name__})
    return value


JsonData = Annotated[Any, AfterValidator(_json_data)]


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
    message = error["msg"].rstrip(".")
    try:
        got = safe_text(repr(error["input"]), 60) if "input" in error else None
    except RecursionError:  # a value nested deeper than repr goes
        got = "a deeply nested value"
    shown = f", got {got}" if got is not None and got not in message else ""
    return (f"field '{where}': " if loc else "") + message + shown


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
    """The first schema inside an annotation (X, X | None, list[X], dict[str, X]), if there is one."""
    return next(iter(_records(annotation)), None)


def json_text(document: Any, indent: int | None = 1, name: str = "the JSON document") -> str:
    """`document` as JSON text, the one way mixer-edge writes JSON. JSON has no NaN or Infinity: a non-finite
    number is refused naming where it is in `name`, never written."""
    try:
        return json.dumps(document, indent=indent, allow_nan=False) + ("\n" if indent is not None else "")
    except ValueError:
        raise MixerEdgeError(f"{name} would hold NaN or Infinity at {_non_finite(document) or '?'}, which JSON "
                             "cannot represent: the model or its build produced non-finite numbers") from None


def _non_finite(data: Any, path: str = "") -> str | None:
    """The dotted path of the first non-finite float inside `data`, or None."""
    if isinstance(data, float):
        return None if math.isfinite(data) else path or "the top level"
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, (list, tuple)) else ()
    for key, value in items:
        found = _non_finite(value, f"{path}.{key}" if path else str(key))
        if found:
            return found
    return None


def _records(annotation: Any) -> list[type[BaseModel]]:
    """Every schema inside an annotation (X | Y, list[X | Y], dict[str, X], Annotated[...]), in order."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [record for arg in typing.get_args(annotation) for record in _records(arg)]


def one_of(name: str, choices: tuple[str, ...]) -> BeforeValidator:
    """A check run before a Literal's, so the refusal reads "NAME 'VALUE' is not one of A, B"."""
    def check(value: Any) -> Any:
        if isinstance(value, str) and value in choices:
            return value
        raise PydanticCustomError("literal_error", "{name} {value} is not one of {choices}",
                                  {"name": name, "value": safe_text(repr(value), 60), "choices": ", ".join(choices)})

    return BeforeValidator(check)


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
    """Markdown tables of every field of each (file, schema), nested records after their parent; a record two
    formats share is documented once, where it first appears (the later one links to it)."""
    out = []
    seen: list[type[BaseModel]] = []
    for title, schema in formats:
        out.append(f"### {title}\n")
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
                cells = (f"`{field.alias or name}`", kind, default, meaning)
                out.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
                queue.extend(_records(field.annotation))  # every record of a union, not just the first
            out.append("")
    return "\n".join(out)


# ---- the formats mixer-edge reads, and the README section generated from them ------------------------

BEGIN, END = "<!-- formats: generated by `python -m mixer_edge.formats README.md`; edit the schemas, not this -->", \
    "<!-- /formats -->"


def documented() -> list[tuple[str, type[Schema]]]:
    """Every file format mixer-edge reads, with its schema (imported here, so the device side, which reads only
    manifests, needs none of the build-side modules)."""
    from .bundle import Bundle
    from .checkpoints import CheckpointMetadata
    from .cuda_driver import CudaPlan
    from .data import PreprocessingFile
    from .compiler.targets import PresetFile
    from .compiler.tuning import RecordRow, TuningKeyFile, WorkloadRow
    from .quant.calibration import RecipeFile
    from .runtime import Manifest
    from .vulkan import Program

    return [("Target presets: `targets/NAME.toml`, `--target FILE.toml`", PresetFile),
            ("Calibration recipes: `calibration/NAME.toml`, `--calibration FILE.toml`", RecipeFile),
            ("Preprocessing: `--preprocessing FILE.toml` or `FILE.json`", PreprocessingFile),
            ("Artifact manifest: `manifest.json`", Manifest),
            ("WGSL program: `program.json` (Vulkan artifacts)", Program),
            ("CUDA launch plan: `cuda_plan.json` (cuda-driver artifacts: the Jetsons)", CudaPlan),
            ("Native bundle: `bundle.json` (`mixer-edge package`)", Bundle),
            ("Tuning database key: `key.json`", TuningKeyFile),
            ("Tuning database rows: `database_workload.json`", WorkloadRow),
            ("Tuning database rows: `database_tuning_record.json`", RecordRow),
            ("Checkpoint metadata: the `.safetensors` header mixer-edge writes", CheckpointMetadata)]


def readme_section() -> str:
    return f"{BEGIN}\n\n{reference(documented())}\n{END}"


def main(argv: list[str]) -> None:
    """Print the reference, or (given a README path) rewrite its generated section in place."""
    if not argv:
        print(readme_section())
        return
    path = argv[0]
    with open(path, encoding="utf-8") as f:
        text = f.read()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    rewritten = text[:start] + readme_section() + text[end:]  # all of it before a byte is written
    with atomic_file(path) as staged:
        staged.write_text(rewritten, encoding="utf-8")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
