"""The deployable bundle: the backend's model files + params.npz + manifest.json, written atomically.

When the artifact can run on this machine it is loaded back through `mixer_edge.runtime` and
checked against the reference (torch, or onnxruntime for an ONNX input) before it is published;
the result is recorded in the manifest under `verification`.
"""

from __future__ import annotations

import datetime
import platform
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np

from . import __version__, runtime
from .atomic import ARTIFACT, atomic_dir, atomic_file, check_destination
from .compiler.build import Built
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
        "build": {"seconds": round(built.seconds, 2), **_tuning(built.tuning),
                  "pipeline": built.backend.pipeline + (" with MetaSchedule records" if built.tuning and
                                                        built.tuning.tuned else ""),
                  "images_per_pass": built.images_per_pass},
        "versions": versions(),
    }


def _tuning(applied) -> dict:
    """The manifest's build.tuning_db (the model's own database) and build.tuning (what every record covered)."""
    def database(summary: dict) -> dict:
        return {k: summary[k] for k in ("graph", "precision", "records", "workloads", "sha256")}

    if applied is None:
        return {"tuning_db": None, "tuning": None}
    return {"tuning_db": applied.own and database(applied.own),
            "tuning": {"tasks": applied.tasks, "tuned": applied.tuned, "transferred": applied.transferred,
                       "untuned": list(applied.untuned),
                       "transferred_from": [database(s) for s in applied.transferred_from]}}


def write_artifact(out: str | Path, built: Built, source: ModelSource, verify: bool = True,
                   quantization=None, keep_unverified: bool = False, progress=print) -> dict:
    """Write the artifact directory (or `.tar`) at `out` atomically; returns its manifest.

    int8 builds pass their `quantization` (a quant.Quantization): table and recipe go into the manifest.
    An artifact that fails its verification is not written, unless `keep_unverified` (then its manifest
    says it failed, and why)."""
    out = Path(out)  # atomic_dir / atomic_file refuse a destination they could not replace
    if out.suffix != ".tar":
        with atomic_dir(out, ARTIFACT) as stage:
            return _fill(stage, built, source, verify, quantization, keep_unverified, progress)
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp) / out.stem
        stage.mkdir()
        manifest = _fill(stage, built, source, verify, quantization, keep_unverified, progress)
        with atomic_file(out) as tmp_tar, tarfile.open(tmp_tar, "w") as tar:
            tar.add(stage, arcname=out.stem)
    return manifest


def check_output(out: str | Path, inputs=()) -> Path:
    """Refuse, before the build, an `out` the artifact may not replace: one of the command's `inputs`, or what
    atomic.check_destination refuses (a .tar is a file, anything else an ARTIFACT directory)."""
    out = Path(out)
    return check_destination(out, None if out.suffix == ".tar" else ARTIFACT, inputs)


def _fill(stage: Path, built: Built, source: ModelSource, verify: bool, quantization, keep_unverified: bool,
          progress) -> dict:
    manifest = manifest_for(built, source)
    if quantization is not None:
        manifest["quantization"] = quantization.manifest(built.int8)
    manifest.update(built.backend.write(built.compiled, stage, built.preset, progress))
    np.savez(stage / runtime.PARAMS, **built.params)
    manifest["files"] = {p.name: runtime.sha256(p) for p in sorted(stage.iterdir())}
    _write_manifest(stage, manifest)
    if verify:
        check = verify_artifact(stage, source, quantization and quantization.qdq, progress)
        if check["status"] == "failed" and not keep_unverified:
            raise MixerEdgeError(f"verification failed: {check['reason']}; so the artifact was not written (pass "
                                 "--keep-unverified to write it anyway, marked failed, for a bug report)")
        manifest["verification"] = check
        _write_manifest(stage, manifest)
    return manifest


def _write_manifest(root: Path, manifest: dict) -> None:
    """Write the manifest sealed with its own digest: the runtime refuses it after any edit.

    It is checked against the schema the runtime reads it with (runtime.Manifest) first, so an artifact
    is never written that its own runtime would refuse, and never with NaN or Infinity (not JSON)."""
    manifest["manifest_sha256"] = runtime.manifest_digest(manifest)
    text = json_text(manifest, indent=2, name=runtime.MANIFEST)
    parse(runtime.Manifest, manifest, f"the {runtime.MANIFEST} being written",
          "report this: mixer-edge wrote a manifest its runtime would refuse")
    (root / runtime.MANIFEST).write_text(text)


# The least cosine similarity of an artifact's logits with what it must compute (the float reference; for int8,
# onnxruntime on the same QDQ model) where they are not simply equal: below it, the build is wrong.
MIN_COSINE = {"float32": 0.999, "float16": 0.99, "int8": 0.9}


def verify_artifact(root: Path, source: ModelSource, qdq=None, progress=print) -> dict:
    """Compare the artifact with the reference model on this machine, if it can run here.

    int8 builds are compared with the float reference (what quantization cost) and with onnxruntime
    running their QDQ ONNX `qdq` (whether the integer kernels compute what the QDQ graph says). Status
    `failed` (with the reason) when the artifact does not run here although this machine has what it
    needs, or computes NaN, Inf or something else than it should.
    """
    try:
        record = runtime.verified_manifest(root)[1]
        runtime.check_device(record, root)
    except MixerEdgeError as exc:
        progress(f"not verified here: {exc}")
        return {"status": "not run on this machine", "reason": str(exc)}
    try:
        return _compare(runtime.load(root), source, qdq, progress)
    except Exception as exc:  # whatever the artifact raises on the machine it was built for is its failure
        detail = str(exc) if isinstance(exc, MixerEdgeError) else f"it does not run here ({reason(exc, last=True)})"
        progress(f"verification failed: {detail}")
        return {"status": "failed", "reason": detail}


def _compare(model, source: ModelSource, qdq, progress) -> dict:
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
    report = {"status": "verified", "data": data, "samples": len(x), **_agreement(got, reference),
              "reference": reference_name}
    if y is not None:
        report["accuracy"] = float((got.argmax(1) == y).mean())
        report["reference_accuracy"] = float((reference.argmax(1) == y).mean())
    progress(f"verified on {data}: top-1 agreement {report['top1_agreement']:.2%}, "
             f"max |logit diff| {report['max_abs_logit_diff']:.2e}")
    precision = model.record.precision.compute
    expected, expected_name = reference, reference_name
    if qdq is not None:
        ort = reference_logits(None, qdq, x)
        _require_finite(ort, "onnxruntime on the QDQ model", data, "its quantization is broken; calibrate again "
                        "(mixer-edge calibrate) or report this model")
        report["onnxruntime_qdq"] = _agreement(got, ort)
        expected, expected_name = ort, "onnxruntime on the same QDQ model"
        progress(f"against {expected_name}: top-1 agreement {report['onnxruntime_qdq']['top1_agreement']:.2%}, "
                 f"max |logit diff| {report['onnxruntime_qdq']['max_abs_logit_diff']:.2e}")
    _require_close(got, expected, precision, f"{expected_name} on {data}")
    return report


def _agreement(got: np.ndarray, expected: np.ndarray) -> dict:
    return {"top1_agreement": float((got.argmax(1) == expected.argmax(1)).mean()),
            "max_abs_logit_diff": float(np.abs(got - expected).max())}


def _require_close(got: np.ndarray, expected: np.ndarray, precision: str, against: str) -> None:
    """Fail when the logits are neither within rounding of `expected` nor pointing the same way (cosine)."""
    from .bench import cosines

    scale = max(1.0, float(np.abs(expected).max()))
    if np.abs(got - expected).max() <= 1e-3 * scale:
        return
    worst = float(cosines(got, expected).min())
    if worst < MIN_COSINE[precision]:
        raise MixerEdgeError(f"the artifact's logits differ from {against} (least cosine similarity {worst:.4f}, "
                             f"below {MIN_COSINE[precision]} for {precision}): the build is wrong; report this model")


def _require_finite(logits: np.ndarray, who: str, data: str, fix: str) -> None:
    """Fail the verification when `who`'s logits hold NaN or Inf: a model that outputs NaN is never
    "verified" (every comparison with NaN is false)."""
    bad = ~np.isfinite(logits)
    if bad.any():
        kinds = " and ".join(k for k, found in (("NaN", np.isnan(logits).any()), ("Inf", np.isinf(logits).any()))
                             if found)
        raise MixerEdgeError(f"{who} produced {kinds} logits on {int(bad.any(axis=-1).sum())} of {len(logits)} "
                             f"inputs ({data}): likely {fix}")


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
