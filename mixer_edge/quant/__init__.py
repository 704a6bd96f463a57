"""int8 post-training quantization: calibration recipes and data, observers, QDQ ONNX + calibration table."""

from __future__ import annotations

from dataclasses import dataclass

from .calibration import Recipe, calibration_data, list_recipes, resolve_recipe
from .qdq import layers, quantize_model
from .sensitivity import fallback, format_sensitivity, layer_sensitivity

__all__ = ["Calibration", "Quantization", "Recipe", "calibrate", "calibration_data", "fallback", "format_sensitivity",
           "is_qdq", "layer_sensitivity", "layers", "list_recipes", "quantize_for_build", "quantize_model",
           "resolve_recipe"]


def calibrate(source, recipe: str | Recipe | None = None, calib_data: str | None = None, samples: int | None = None,
              sensitivity: bool = False, max_accuracy_drop: float | None = None, val_data: str | None = None,
              progress=print):
    """Quantize `source` (an export.ModelSource): returns (QDQ ONNX, calibration table, summary).

    `sensitivity` adds each layer's SQNR (that layer alone in int8) to the summary;
    `max_accuracy_drop` (percentage points) keeps the most sensitive layers in float until the
    accuracy on `val_data` (default: the source's evaluation data) is within budget. The summary
    compares the QDQ model with the float one under onnxruntime on the source's evaluation data
    (the digits test split for the demo model), when it has some.
    """
    import numpy as np

    from ..data import load_inputs
    from ..errors import MixerEdgeError
    from ..export import run_onnxruntime

    recipe = recipe if isinstance(recipe, Recipe) else resolve_recipe(recipe)
    data = calib_data or ("digits-train" if source.eval_data == "digits-test" else None)
    if data is None:
        raise MixerEdgeError(f"{source.name} has no bundled calibration data: pass --calib-data (an image folder, "
                             ".npy/.npz) with inputs like the ones it will see")
    x = calibration_data(data, source.preprocess, samples or recipe.samples, recipe.seed, progress)
    summary = {"recipe": recipe.to_dict(), "calibration_data": str(data), "samples": len(x)}
    if max_accuracy_drop is not None:
        val = val_data or source.eval_data
        if val is None:
            raise MixerEdgeError("--max-accuracy-drop needs labelled validation data: pass --val-data")
        val_x, val_y = load_inputs(val, source.preprocess)
        qdq, table, report = fallback(source.onnx_model, x, recipe, val_x, val_y, max_accuracy_drop, progress)
        summary["sensitivity"] = report.pop("sensitivity")
        summary["mixed_precision"] = {"validation_data": str(val), **report}
    else:
        qdq, table = quantize_model(source.onnx_model, x, recipe, progress)
        if sensitivity:
            summary["sensitivity"] = layer_sensitivity(source.onnx_model, x, recipe, progress)[0]
    if source.eval_data:
        ex, ey = load_inputs(source.eval_data, source.preprocess)
        ref, got = run_onnxruntime(source.onnx_model, ex), run_onnxruntime(qdq, ex)
        summary["evaluation"] = {
            "data": source.eval_data, "samples": len(ex),
            "float_accuracy": float((ref.argmax(1) == ey).mean()), "int8_accuracy": float((got.argmax(1) == ey).mean()),
            "top1_agreement": float((got.argmax(1) == ref.argmax(1)).mean()),
            "max_abs_logit_diff": float(np.abs(got - ref).max())}
    return qdq, table, summary


@dataclass(frozen=True)
class Calibration:
    """How `compile --precision int8` calibrates: a recipe (name or path), data, and a sample count."""

    recipe: str | None = None  # None: calibration/default.toml
    data: str | None = None  # None: the model's bundled training split (the digits demo)
    samples: int | None = None  # None: the recipe's


@dataclass
class Quantization:
    """What an int8 build compiles: the QDQ ONNX, its calibration table and the calibration summary."""

    qdq: object  # onnx.ModelProto
    table: dict | None  # None for a QDQ ONNX given as it is
    summary: dict

    def manifest(self, lowered: dict) -> dict:
        """The artifact manifest's `quantization`: what the lowering did (`lowered`), how it was calibrated."""
        keep = ("recipe", "calibration_data", "samples", "evaluation", "mixed_precision", "sensitivity")
        return {**lowered, **{k: self.summary[k] for k in keep if k in self.summary}, "table": self.table}


def is_qdq(proto) -> bool:
    """True when the ONNX graph is already quantized (has DequantizeLinear nodes)."""
    return any(node.op_type == "DequantizeLinear" for node in proto.graph.node)


def quantize_for_build(source, calibration: Calibration | None = None, progress=print) -> Quantization:
    """What an int8 build of `source` compiles: calibrated with `calibration` (default recipe and data).

    An ONNX that is already QDQ is compiled as it is (no table: its scales came from elsewhere).
    """
    calibration = calibration or Calibration()
    if is_qdq(source.onnx_model):
        if calibration != Calibration():
            from ..errors import MixerEdgeError

            raise MixerEdgeError(f"{source.name} is already a QDQ ONNX: drop --calibration/--calib-data/"
                                 "--calib-samples, or pass the float model")
        progress(f"{source.name} is a QDQ ONNX: compiling its quantization as it is")
        return Quantization(source.onnx_model, None, {"recipe": "given (pre-quantized QDQ ONNX)"})
    return Quantization(*calibrate(source, calibration.recipe, calibration.data, calibration.samples,
                                   progress=progress))
