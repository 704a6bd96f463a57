"""int8 post-training quantization: calibration recipes and data, observers, QDQ ONNX + calibration table."""

from __future__ import annotations

from .calibration import Recipe, calibration_data, list_recipes, resolve_recipe
from .qdq import layers, quantize_model

__all__ = ["Recipe", "calibrate", "calibration_data", "layers", "list_recipes", "quantize_model", "resolve_recipe"]


def calibrate(source, recipe: str | Recipe | None = None, calib_data: str | None = None, samples: int | None = None,
              progress=print):
    """Quantize `source` (an export.ModelSource): returns (QDQ ONNX, calibration table, summary).

    The summary compares the QDQ model with the float one under onnxruntime on the source's
    evaluation data (the digits test split for the demo model), when it has some.
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
    qdq, table = quantize_model(source.onnx_model, x, recipe, progress)
    summary = {"recipe": recipe.to_dict(), "calibration_data": str(data), "samples": len(x)}
    if source.eval_data:
        ex, ey = load_inputs(source.eval_data, source.preprocess)
        ref, got = run_onnxruntime(source.onnx_model, ex), run_onnxruntime(qdq, ex)
        summary["evaluation"] = {
            "data": source.eval_data, "samples": len(ex),
            "float_accuracy": float((ref.argmax(1) == ey).mean()), "int8_accuracy": float((got.argmax(1) == ey).mean()),
            "top1_agreement": float((got.argmax(1) == ref.argmax(1)).mean()),
            "max_abs_logit_diff": float(np.abs(got - ref).max())}
    return qdq, table, summary
