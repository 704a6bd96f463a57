"""ONNX -> Relax -> deployable library, for the targets described in `targets/*.toml`."""

from ..errors import MixerEdgeError
from .build import Built, build, tune
from .targets import TargetPreset, list_presets, resolve_target
from .tuning import Budget, RpcBoard, Tuning

__all__ = ["Built", "Budget", "RpcBoard", "Tuning", "TargetPreset", "build", "compile_model", "list_presets",
           "resolve_target", "tune", "tune_model"]


def _preset(target: str | TargetPreset) -> TargetPreset:
    return resolve_target(target) if isinstance(target, str) else target


def compile_model(source, target: str | TargetPreset, out, batch: int = 1, precision: str | None = None,
                  verify: bool = True, tuning: Tuning = Tuning(), calibration=None, quantized=None,
                  keep_unverified: bool = False, progress=print) -> dict:
    """Build `source` (an export.ModelSource) for `target` and write the artifact at `out`; returns its manifest.

    int8 builds compile `quantized` (a quant.Quantization) or calibrate with `calibration` (a
    quant.Calibration; default recipe and data) first. An artifact that fails its verification is not
    written, unless `keep_unverified` (its manifest then says so).
    """
    from ..artifact import check_output, write_artifact
    from ..export import check_finite_weights
    from ..quant import quantize_for_build

    check_output(out)
    preset = _preset(target)
    precision = preset.resolve_precision(precision)
    progress(f"compiling {source.name} for {preset.name} ({preset.kind}, {precision}, batch {batch})")
    if precision != "int8" and (calibration or quantized):
        raise MixerEdgeError("--calibration/--calib-data/--calib-samples apply to --precision int8 only")
    if precision == "int8":
        quantized = quantized or quantize_for_build(source, calibration, progress)
    check_finite_weights(quantized.qdq if quantized else source.onnx_model, source.name)  # as loading does
    built = build(quantized.qdq if quantized else source.onnx_model, preset, batch, precision, tuning=tuning,
                  model=source.name, progress=progress)
    progress(f"built in {built.seconds:.1f}s" + (f"; {built.int8['layers']} layers on int8 {built.int8['dot_product']} "
                                                 "kernels" if built.int8 else ""))
    for layer in built.int8["float_layers"] if built.int8 else ():
        progress(f"left in float: {layer['layer']} ({layer['reason']})")
    return write_artifact(out, built, source, verify=verify, quantization=quantized, keep_unverified=keep_unverified,
                          progress=progress)


def tune_model(source, target: str | TargetPreset, batch: int = 1, precision: str | None = None,
               tuning: Tuning = Tuning(tune=True), calibration=None, progress=print) -> dict:
    """Tune `source` for `target` into its database (see compiler/tuning.py); returns the database summary.

    int8 tunes the calibrated QDQ model's float epilogues (the integer kernels come scheduled)."""
    from ..quant import quantize_for_build

    preset = _preset(target)
    precision = preset.resolve_precision(precision)
    proto = quantize_for_build(source, calibration, progress).qdq if precision == "int8" else source.onnx_model
    return tune(proto, preset, batch, precision, tuning=tuning, model=source.name, progress=progress)
