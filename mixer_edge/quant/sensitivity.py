"""Which layers int8 hurts: per-layer SQNR, and a float fallback for the most sensitive within an accuracy budget."""

from __future__ import annotations

import numpy as np

from ..errors import MixerEdgeError
from ..export import run_onnxruntime
from .calibration import Recipe
from .qdq import activation_histograms, build_qdq, chosen_sites, kept_in_float, layers, with_node_names


def sqnr_db(reference: np.ndarray, got: np.ndarray) -> float | None:
    """Signal-to-quantization-noise ratio of `got` against `reference`, in dB; None where they are identical."""
    noise = float(np.sum((got - reference) ** 2))
    return None if noise == 0 else float(10 * np.log10(float(np.sum(reference ** 2)) / noise))


def _sqnr_order(row: dict) -> float:
    return float("inf") if row["sqnr_db"] is None else row["sqnr_db"]


def layer_sensitivity(proto, x: np.ndarray, recipe: Recipe, progress=print) -> tuple[list[dict], dict]:
    """SQNR of the model's logits on the calibration inputs `x` with each layer alone in int8.

    Returns the rows (graph order) and the activation histograms (also of the recipe's int8_ops), for reuse.
    """
    from tqdm import tqdm

    proto = with_node_names(proto)
    found = layers(proto)
    tensors = [l.activation for l in found] + [s.tensor for s in chosen_sites(proto, found, recipe)]
    hists = activation_histograms(proto, list(dict.fromkeys(tensors)), x, recipe.symmetric, progress)
    reference = run_onnxruntime(proto, x)
    rows = []
    for layer in tqdm(found, desc="sensitivity", unit="layer", leave=False, disable=None):
        qdq, _ = build_qdq(proto, [layer], hists, recipe)
        rows.append({"layer": layer.name, "sqnr_db": sqnr_db(reference, run_onnxruntime(qdq, x))})
    return rows, hists


def accuracy(proto, x: np.ndarray, y: np.ndarray) -> float:
    return float((run_onnxruntime(proto, x).argmax(1) == y).mean())


def fallback(proto, x: np.ndarray, recipe: Recipe, val_x: np.ndarray, val_y: np.ndarray, max_drop_points: float,
             progress=print):
    """int8 with the most sensitive layers kept in float, one at a time, until the accuracy drop on the
    validation data is within `max_drop_points` percentage points. Returns (QDQ, table, report)."""
    if val_y is None or (val_y < 0).any():
        raise MixerEdgeError("--max-accuracy-drop needs labelled validation data: pass --val-data (an ImageFolder "
                             "directory or an .npz with labels)")
    proto = with_node_names(proto)
    found = layers(proto)
    rows, hists = layer_sensitivity(proto, x, recipe, progress)
    order = [r["layer"] for r in sorted(rows, key=_sqnr_order)]  # most sensitive first
    kept = [l.name for l in found if kept_in_float(l, recipe)]
    sites = chosen_sites(proto, found, recipe)
    float_accuracy = accuracy(proto, val_x, val_y)
    while True:
        chosen = [l for l in found if l.name not in kept]
        qdq, table = build_qdq(proto, chosen, hists, recipe, sites)
        int8_accuracy = accuracy(qdq, val_x, val_y)
        drop = 100 * (float_accuracy - int8_accuracy)
        progress(f"{len(chosen)} int8 layers, {len(kept)} float: accuracy {int8_accuracy:.2%} "
                 f"(drop {drop:.2f} points, budget {max_drop_points})")
        remaining = [name for name in order if name not in kept]
        if drop <= max_drop_points or not remaining:
            break
        kept.append(remaining[0])
    report = {"max_accuracy_drop_points": max_drop_points, "float_layers": kept, "float_accuracy": float_accuracy,
              "int8_accuracy": int8_accuracy, "drop_points": drop, "within_budget": drop <= max_drop_points,
              "sensitivity": rows}
    return qdq, table, report


def format_sensitivity(rows: list[dict], kept: list[str] = ()) -> str:
    lines = ["| layer | SQNR dB (only this layer int8) | kept in float |", "| --- | --- | --- |"]
    for r in rows:
        sqnr = "∞ (identical)" if r["sqnr_db"] is None else f"{r['sqnr_db']:.1f}"
        lines.append(f"| {r['layer']} | {sqnr} | {'yes' if r['layer'] in kept else ''} |")
    return "\n".join(lines)
