"""int8 post-training quantization: calibration recipes and data, observers, QDQ ONNX + calibration table."""

from __future__ import annotations

from .calibration import Recipe, calibration_data, list_recipes, resolve_recipe
from .qdq import layers, quantize_model
from .sensitivity import fallback, format_sensitivity, layer_sensitivity

__all__ = ["Recipe", "calibrate", "calibration_data", "fallback", "format_sensitivity", "layer_sensitivity", "layers",
           "list_recipes", "quantize_model", "resolve_recipe"]


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
