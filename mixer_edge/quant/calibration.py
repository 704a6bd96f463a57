"""Calibration recipes (`calibration/*.toml`) and calibration data, checked before any work."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data import Preprocess, load_inputs
from ..errors import MixerEdgeError
from ..resources import data_dir
from .observers import OBSERVERS

INT8_OPS = ("layernorm", "gelu", "residual")  # float unless a recipe's int8_ops lists them


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


def load_recipe_file(path: Path) -> Recipe:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise MixerEdgeError(f"calibration recipe {path} could not be read ({exc}): fix the TOML") from exc
    known = set(Recipe.__dataclass_fields__) - {"name", "source"}
    if set(data) - known:
        raise MixerEdgeError(f"{path}: unknown field(s) {', '.join(sorted(set(data) - known))}; "
                             f"a recipe takes {', '.join(sorted(known))}")
    lists = {key: data.get(key, ()) for key in ("float_layers", "int8_ops")}
    for key, value in lists.items():
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise MixerEdgeError(f"{path}: {key} must be a list of strings, not {value!r}")
    recipe = Recipe(name=path.stem, source=str(path), **{**data, **{k: tuple(v) for k, v in lists.items()}})
    for entry in recipe.int8_ops:
        if entry.partition(":")[0] not in INT8_OPS:
            raise MixerEdgeError(f"{path}: int8_ops entry '{entry}' names no op kind: use {', '.join(INT8_OPS)}, "
                                 "optionally with :LAYER_PREFIX (e.g. \"gelu:blocks.0.\")")
    if recipe.observer not in OBSERVERS:
        raise MixerEdgeError(f"{path}: observer '{recipe.observer}' is not one of {', '.join(OBSERVERS)}")
    if recipe.activations not in ("symmetric", "affine"):
        raise MixerEdgeError(f"{path}: activations must be \"symmetric\" or \"affine\", not '{recipe.activations}'")
    if not 50 < recipe.percentile <= 100:
        raise MixerEdgeError(f"{path}: percentile must be in (50, 100], not {recipe.percentile}")
    if not isinstance(recipe.samples, int) or recipe.samples < 1:
        raise MixerEdgeError(f"{path}: samples must be a positive integer, not {recipe.samples}")
    return recipe


def calibration_data(source: str | Path, preprocess: Preprocess, samples: int, seed: int = 0,
                     progress=print) -> np.ndarray:
    """`samples` model inputs drawn (seeded) from `source`, preprocessed as the model's manifest says.

    Refused: a source with fewer samples than asked, wrong shape or channels, NaN/Inf, or all-constant inputs.
    """
    x, _ = load_inputs(source, preprocess)  # checks existence, shape/channels and NaN/Inf
    if len(x) == 0:
        raise MixerEdgeError(f"calibration data {source} is empty: give at least {samples} samples")
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
