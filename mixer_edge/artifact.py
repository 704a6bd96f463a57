"""The deployable bundle: model.so + params.npz + manifest.json, written atomically.

When the artifact can run on this machine it is loaded back through `mixer_edge.runtime` and
checked against the reference (torch, or onnxruntime for an ONNX input) before it is published;
the result is recorded in the manifest under `verification`.
"""

from __future__ import annotations

import datetime
import math
import platform
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np

from . import __version__, runtime
from .atomic import ARTIFACT, atomic_dir, atomic_file, check_destination
from .compiler.build import Built
from .compiler.webgpu import dispatch_count
from .data import in_batches
from .errors import MixerEdgeError, reason
from .export import ModelSource, input_spec, run_onnxruntime
from .formats import json_text, parse


def versions() -> dict:
    out = {"mixer_edge": __version__, "python": platform.python_version()}
    for dist in ("apache-tvm", "apache-tvm-ffi", "torch", "onnx", "onnxruntime"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def manifest_for(built: Built, source: ModelSource) -> dict:
    preset = built.preset
    spec = source.input
    return {
        "format_version": runtime.FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": source.name, "config": source.config, "from": "torch" if source.torch_model else "onnx"},
        "input": {**spec.to_dict(), "shape": [built.batch, *spec.shape[1:]]},
        "output": {"name": "logits", "shape": [built.batch, len(source.labels)], "dtype": "float32"},
        "preprocess": source.preprocess.to_dict(),
        "labels": source.labels,
        "target": {"preset": preset.name, "description": preset.description, "tvm": preset.target,
                   "device": preset.device_requirements()},
        "precision": {"compute": built.precision, "accumulation": "int32" if built.int8 else "float32",
                      "weights": sorted({str(a.dtype) for a in built.params.values()})},
        "params": list(built.params),
        "export": source.export,
        "build": {"seconds": round(built.seconds, 2), "tuning_db": built.tuning and
                  {k: built.tuning[k] for k in ("graph", "precision", "records", "workloads", "sha256")},
                  "pipeline": "tvm default, WGSL (webgpu codegen) for wgpu" if built.program else
                  "tvm default with MetaSchedule records" if built.tuning else "tvm default"},
        "versions": versions(),
    }


def write_artifact(out: str | Path, built: Built, source: ModelSource, verify: bool = True,
                   quantization=None, progress=print) -> dict:
    """Write the artifact directory (or `.tar`) at `out` atomically; returns its manifest.

    int8 builds pass their `quantization` (a quant.Quantization): table and recipe go into the manifest."""
    out = Path(out)  # atomic_dir / atomic_file refuse a destination they could not replace
    if out.suffix != ".tar":
        with atomic_dir(out, ARTIFACT) as stage:
            return _fill(stage, built, source, verify, quantization, progress)
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp) / out.stem
        stage.mkdir()
        manifest = _fill(stage, built, source, verify, quantization, progress)
        with atomic_file(out) as tmp_tar, tarfile.open(tmp_tar, "w") as tar:
            tar.add(stage, arcname=out.stem)
    return manifest


def check_output(out: str | Path, inputs=()) -> Path:
    """Refuse, before the build, an `out` the artifact may not replace: one of the command's `inputs`, or what
    atomic.check_destination refuses (a .tar is a file, anything else an ARTIFACT directory)."""
    out = Path(out)
    return check_destination(out, None if out.suffix == ".tar" else ARTIFACT, inputs)


def _fill(stage: Path, built: Built, source: ModelSource, verify: bool, quantization, progress) -> dict:
    manifest = manifest_for(built, source)
    if quantization is not None:
        manifest["quantization"] = quantization.manifest(built.int8)
    if built.program is not None:
        manifest["vulkan"] = {"backend": "wgpu", "dispatches": dispatch_count(built.program),
                              "kernels": len(built.program["kernels"])}
        progress(f"writing {runtime.PROGRAM}: {manifest['vulkan']['dispatches']} dispatches of "
                 f"{manifest['vulkan']['kernels']} WGSL kernels")
        (stage / runtime.PROGRAM).write_text(_json_text(built.program, runtime.PROGRAM, indent=None))
    else:
        cross = f" with {built.preset.cross_compiler}" if built.preset.cross_compiler else ""
        progress(f"writing {runtime.LIBRARY}{cross}")
        try:
            built.export_library(stage / runtime.LIBRARY)
        except Exception as exc:
            raise MixerEdgeError(f"linking {runtime.LIBRARY} for {built.preset.name} failed "
                                 f"({reason(exc, last=True)})") from exc
    np.savez(stage / runtime.PARAMS, **built.params)
    if built.cuda:
        (stage / runtime.CUDA_KERNELS).write_bytes(built.cuda.fat_binary)
        manifest["cuda"] = {"file": runtime.CUDA_KERNELS, "format": "fatbin", "source_sha256": built.cuda.source_sha256,
                            "archs": list(built.preset.cuda_archs), "ptx": built.preset.cuda_ptx,
                            "compiler": built.cuda.compiler}
    manifest["files"] = {p.name: runtime.sha256(p) for p in sorted(stage.iterdir())}
    _write_manifest(stage, manifest)
    if verify:
        manifest["verification"] = verify_artifact(stage, source, quantization and quantization.qdq, progress)
        _write_manifest(stage, manifest)
    return manifest


def _write_manifest(root: Path, manifest: dict) -> None:
    """Write the manifest sealed with its own digest: the runtime refuses it after any edit.

    It is checked against the schema the runtime reads it with (runtime.Manifest) first, so an artifact
    is never written that its own runtime would refuse, and never with NaN or Infinity (not JSON)."""
    manifest["manifest_sha256"] = runtime.manifest_digest(manifest)
    text = _json_text(manifest, runtime.MANIFEST, indent=2)
    parse(runtime.Manifest, manifest, f"the {runtime.MANIFEST} being written",
          "report this: mixer-edge wrote a manifest its runtime would refuse")
    (root / runtime.MANIFEST).write_text(text)


def _json_text(data, name: str, indent: int | None) -> str:
    """`data` as JSON text (formats.json_text); a non-finite number, which JSON cannot hold, is refused naming
    where it is."""
    try:
        return json_text(data, indent)
    except ValueError:
        raise MixerEdgeError(f"{name} would hold NaN or Infinity at {_non_finite(data) or '?'}, which JSON cannot "
                             "represent: the model or its build produced non-finite numbers") from None


def _non_finite(data, path: str = "") -> str | None:
    """The dotted path of the first non-finite float inside `data`, or None."""
    if isinstance(data, float):
        return None if math.isfinite(data) else path or "the top level"
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, (list, tuple)) else ()
    for key, value in items:
        found = _non_finite(value, f"{path}.{key}" if path else str(key))
        if found:
            return found
    return None


def verify_artifact(root: Path, source: ModelSource, qdq=None, progress=print) -> dict:
    """Compare the artifact with the reference model on this machine, if it can run here.

    int8 builds are compared with the float reference (what quantization cost) and with onnxruntime
    running their QDQ ONNX `qdq` (whether the integer kernels compute what the QDQ graph says).
    """
    try:
        model = runtime.load(root)
    except MixerEdgeError as exc:
        progress(f"not verified here: {exc}")
        return {"status": "not run on this machine", "reason": str(exc)}
    from .data import load_inputs

    if source.eval_data:
        x, y = load_inputs(source.eval_data, source.preprocess)
        data = source.eval_data
    else:
        rng = np.random.default_rng(0)
        x, y = rng.standard_normal((2, *model.input_shape[1:])).astype(np.float32), None
        data = "2 random inputs"  # untuned CPU builds of paper-size models take seconds per image
    reference = reference_logits(source.torch_model, source.onnx_model, x)
    got = model(x)
    reference_name = "torch" if source.torch_model else "onnxruntime"
    _require_finite(reference, f"the reference ({reference_name})", data,
                    "its weights are not finite or it overflows on these inputs; check the checkpoint or ONNX file")
    _require_finite(got, f"the artifact built for {model.record.target.preset}", data,
                    "the compiled model overflows (float16?) or is miscompiled; rebuild with --precision float32, "
                    "or report this model")
    report = {
        "status": "verified",
        "data": data,
        "samples": len(x),
        "top1_agreement": float((got.argmax(1) == reference.argmax(1)).mean()),
        "max_abs_logit_diff": float(np.abs(got - reference).max()),
        "reference": reference_name,
    }
    if y is not None:
        report["accuracy"] = float((got.argmax(1) == y).mean())
        report["reference_accuracy"] = float((reference.argmax(1) == y).mean())
    progress(f"verified on {data}: top-1 agreement {report['top1_agreement']:.2%}, "
             f"max |logit diff| {report['max_abs_logit_diff']:.2e}")
    if qdq is not None:
        ort = reference_logits(None, qdq, x)
        _require_finite(ort, "onnxruntime on the QDQ model", data, "its quantization is broken; calibrate again "
                        "(mixer-edge calibrate) or report this model")
        report["onnxruntime_qdq"] = {"top1_agreement": float((got.argmax(1) == ort.argmax(1)).mean()),
                                     "max_abs_logit_diff": float(np.abs(got - ort).max())}
        progress(f"against onnxruntime on the same QDQ model: top-1 agreement "
                 f"{report['onnxruntime_qdq']['top1_agreement']:.2%}, max |logit diff| "
                 f"{report['onnxruntime_qdq']['max_abs_logit_diff']:.2e}")
    return report


def _require_finite(logits: np.ndarray, who: str, data: str, fix: str) -> None:
    """Fail the verification, so that nothing is written, when `who`'s logits hold NaN or Inf: a model that
    outputs NaN is never "verified" (every comparison with NaN is false)."""
    bad = ~np.isfinite(logits)
    if bad.any():
        kinds = " and ".join(k for k, found in (("NaN", np.isnan(logits).any()), ("Inf", np.isinf(logits).any()))
                             if found)
        raise MixerEdgeError(f"verification failed: {who} produced {kinds} logits on {int(bad.any(axis=-1).sum())} "
                             f"of {len(logits)} inputs ({data}), so the artifact was not written: likely {fix}")


def reference_logits(torch_model, onnx_model, x: np.ndarray) -> np.ndarray:
    """Logits of a reference: the torch model if given, else onnxruntime on the ONNX graph."""
    if torch_model is not None:
        import torch

        with torch.no_grad():
            return torch_model(torch.from_numpy(x)).numpy()
    batch = input_spec(onnx_model).shape[0]
    if not isinstance(batch, int):
        return run_onnxruntime(onnx_model, x)
    return in_batches(lambda chunk: run_onnxruntime(onnx_model, chunk), x, batch)  # whole batches only
