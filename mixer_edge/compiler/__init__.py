"""ONNX -> Relax -> deployable library, for the targets described in `targets/*.toml`."""

from .build import Built, build
from .targets import TargetPreset, list_presets, resolve_target

__all__ = ["Built", "build", "compile_model", "TargetPreset", "list_presets", "resolve_target"]


def compile_model(source, target: str | TargetPreset, out, batch: int = 1, precision: str | None = None,
                  verify: bool = True, progress=print) -> dict:
    """Build `source` (an export.ModelSource) for `target` and write the artifact at `out`; returns its manifest."""
    from ..artifact import write_artifact

    preset = resolve_target(target) if isinstance(target, str) else target
    progress(f"compiling {source.name} for {preset.name} ({preset.kind}, {precision or preset.precision}, batch {batch})")
    built = build(source.onnx_model, preset, batch, precision)
    progress(f"built in {built.seconds:.1f}s")
    return write_artifact(out, built, source, verify=verify, progress=progress)
