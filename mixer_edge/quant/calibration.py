"""Calibration recipes (`calibration/*.toml`, schema `RecipeFile`) and calibration data, checked before any work."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import AfterValidator, BeforeValidator, Field
from pydantic_core import PydanticCustomError

from ..data import Preprocess, load_inputs
from ..errors import MixerEdgeError
from ..formats import Schema, one_of, parse, safe_text
from ..resources import data_dir
from .observers import OBSERVERS

INT8_OPS = ("layernorm", "gelu", "residual")  # float unless a recipe's int8_ops lists them
ACTIVATIONS = ("symmetric", "affine")


@dataclass(frozen=True)
class Recipe:
    name: str
    observer: str = "percentile"
    percentile: float = 99.99
    samples: int = 256
    seed: int = 0
    activations: str = "symmetric"  # or "affine"
    float_layers: tuple[str, ...] = ()  # layer names (or prefixes, e.g. "head", "blocks.0.") kept in float
    int8_ops: tuple[str, ...] = ()  # LayerNorm/GELU/residual ops put in int8: KIND or KIND:NAME_PREFIX
    description: str = ""
    source: str = field(default="", compare=False)

    @property
    def symmetric(self) -> bool:
        return self.activations == "symmetric"

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "source"} | \
            {"float_layers": list(self.float_layers), "int8_ops": list(self.int8_ops)}


def list_recipes() -> dict[str, Recipe]:
    return {p.stem: load_recipe_file(p) for p in sorted(data_dir("calibration").glob("*.toml"))}


def resolve_recipe(spec: str | None) -> Recipe:
    """A recipe by name (calibration/NAME.toml) or from a .toml path; default: `default`."""
    spec = spec or "default"
    if spec.endswith(".toml"):
        if not Path(spec).is_file():
            raise MixerEdgeError(f"calibration recipe {spec} does not exist")
        return load_recipe_file(Path(spec))
    recipes = list_recipes()
    if spec not in recipes:
        raise MixerEdgeError(f"unknown calibration recipe '{spec}': choose one of {', '.join(recipes)} (or a .toml file)")
    return recipes[spec]


# ---- the recipe file's schema ----------------------------------------------------------------------

def list_of_strings(name: str) -> BeforeValidator:
    """A check run before a list's, so a lone string reads "NAME must be a list of strings"."""
    def check(value: Any) -> Any:
        if not isinstance(value, list):
            raise PydanticCustomError("list_type", "{name} must be a list of strings, e.g. [\"head\"]", {"name": name})
        return value

    return BeforeValidator(check)


def _int8_op(entry: str) -> str:
    if entry.partition(":")[0] not in INT8_OPS:
        raise PydanticCustomError(
            "int8_op", "int8_ops entry {entry} names no op kind: use {kinds}, optionally with :LAYER_PREFIX "
            "(e.g. \"gelu:blocks.0.\")", {"entry": safe_text(repr(entry), 60), "kinds": ", ".join(INT8_OPS)})
    return entry


LayerName = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")]


class RecipeFile(Schema):
    """A calibration recipe (`calibration/NAME.toml`, or a .toml given to --calibration): how int8 activation
    ranges are measured and which layers and ops stay float."""

    description: str = Field("", max_length=300, pattern=r"^[^\x00-\x1f\x7f]*$",
                             description="one line for listings and the calibration table")
    observer: Annotated[Literal[OBSERVERS], one_of("observer", OBSERVERS)] = Field(
        "percentile", description="how a tensor's range comes from its histogram: the whole range (minmax), a "
        "percentile of the magnitudes, the KL-divergence (entropy) or least-MSE clipping threshold")
    percentile: float = Field(99.99, gt=50, le=100, description="the percentile observer's clipping point, in %")
    samples: int = Field(256, ge=1, le=1_000_000, description="calibration samples drawn (--calib-samples overrides)")
    seed: int = Field(0, ge=0, lt=2**32, description="seed of the random draw of the calibration samples")
    activations: Annotated[Literal[ACTIVATIONS], one_of("activations", ACTIVATIONS)] = Field(
        "symmetric", description="int8 activations with zero point 0 (symmetric) or a fitted zero point (affine)")
    float_layers: Annotated[list[LayerName], list_of_strings("float_layers")] = Field(
        [], max_length=10_000, description="layers kept in float: a layer name or name prefix each (e.g. "
        "\"head\", \"blocks.0.\"); each must match a layer of the model")
    int8_ops: Annotated[list[Annotated[str, AfterValidator(_int8_op)]], list_of_strings("int8_ops")] = Field(
        [], max_length=10_000, description="LayerNorm/GELU/residual ops given int8 inputs (LayerNorm, GELU) or "
        "outputs (residual adds): KIND or KIND:LAYER_PREFIX with KIND one of layernorm, gelu, residual; each must "
        "match an op of the model")


def load_recipe_file(path: Path) -> Recipe:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise MixerEdgeError(f"calibration recipe {path} could not be read ({safe_text(exc)}): fix the TOML") from exc
    except RecursionError:
        raise MixerEdgeError(f"calibration recipe {path} could not be read (nested too deeply): fix the TOML") from None
    doc = parse(RecipeFile, data, str(path), "fix the recipe")
    return Recipe(name=path.stem, source=str(path), observer=doc.observer, percentile=float(doc.percentile),
                  samples=doc.samples, seed=doc.seed, activations=doc.activations,
                  float_layers=tuple(doc.float_layers), int8_ops=tuple(doc.int8_ops), description=doc.description)


def calibration_data(source: str | Path, preprocess: Preprocess, samples: int, seed: int = 0,
                     progress=print) -> np.ndarray:
    """`samples` model inputs drawn (seeded) from `source`, preprocessed as the model's manifest says.

    Refused: a source with fewer samples than asked, wrong shape or channels, NaN/Inf, or all-constant inputs.
    """
    x, _ = load_inputs(source, preprocess)  # checks existence, emptiness, shape/channels and NaN/Inf
    if len(x) < samples:
        raise MixerEdgeError(f"calibration data {source} has {len(x)} samples, fewer than the {samples} asked: "
                             f"pass --calib-samples {len(x)} or more data")
    available = len(x)
    x = x[np.sort(np.random.default_rng(seed).choice(available, samples, replace=False))]
    if float(x.std()) == 0.0:
        raise MixerEdgeError(f"calibration data {source} is constant (every value {float(x.flat[0]):g}): "
                             "activation ranges from it would be meaningless; use real inputs")
    progress(f"calibration data: {samples} of the {available} samples in {source} (seed {seed})")
    return x
