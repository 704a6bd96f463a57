"""ONNX -> Relax -> deployable library, for the targets described in `targets/*.toml`."""

from .build import Built, build, tune
from .targets import TargetPreset, list_presets, resolve_target
from .tuning import Budget, RpcBoard, Tuning

__all__ = ["Built", "Budget", "RpcBoard", "Tuning", "TargetPreset", "build", "compile_model", "list_presets",
           "resolve_target", "tune", "tune_model"]


def _preset(target: str | TargetPreset) -> TargetPreset:
    return resolve_target(target) if isinstance(target, str) else target


def compile_model(source, target: str | TargetPreset, out, batch: int = 1, precision: str | None = None,
                  verify: bool = True, tuning: Tuning = Tuning(), progress=print) -> dict:
    """Build `source` (an export.ModelSource) for `target` and write the artifact at `out`; returns its manifest."""
    from ..artifact import write_artifact

    preset = _preset(target)
    progress(f"compiling {source.name} for {preset.name} ({preset.kind}, {precision or preset.precision}, batch {batch})")
    built = build(source.onnx_model, preset, batch, precision, tuning=tuning, model=source.name, progress=progress)
    progress(f"built in {built.seconds:.1f}s")
    return write_artifact(out, built, source, verify=verify, progress=progress)


def tune_model(source, target: str | TargetPreset, batch: int = 1, precision: str | None = None,
               tuning: Tuning = Tuning(tune=True), progress=print) -> dict:
    """Tune `source` for `target` into its database (see compiler/tuning.py); returns the database summary."""
    return tune(source.onnx_model, _preset(target), batch, precision, tuning=tuning, model=source.name,
                progress=progress)
