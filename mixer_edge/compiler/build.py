"""ONNX -> Relax -> what the preset's backend compiles it into (mixer_edge/backends).

The shared front half is here: import the ONNX graph with its batch fixed, then float16 casts or
the int8 lowering, with the weight transforms run once on this machine. The preset's backend
(native CPU library, CUDA library + fat binary, WGSL program, ...) does the rest.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass

import numpy as np

from ..backends import Backend
from ..errors import MixerEdgeError, reason
from . import dense
from . import tuning as tuning_lib
from .targets import TargetPreset


@dataclass
class Built:
    backend: Backend  # what compiled it, and writes and loads it
    compiled: object  # what the backend compiled (native.Library, or the WGSL program dict)
    params: dict[str, np.ndarray]  # in the order `main` takes them after the input
    preset: TargetPreset
    batch: int
    precision: str
    seconds: float
    tuning: tuning_lib.AppliedTuning | None = None  # the tuning records applied, and what they cover
    int8: dict | None = None  # int8 builds: the layers lowered to integer kernels and the instruction


def check_toolchain(preset: TargetPreset) -> None:
    """Fail before any work when a tool or back end the preset needs is missing."""
    preset.backend.check_toolchain(preset)
    if preset.cross_compiler and shutil.which(preset.cross_compiler) is None:
        raise MixerEdgeError(f"target {preset.name} needs the cross compiler {preset.cross_compiler}, not on PATH: "
                             "install it (Debian: apt-get install g++-aarch64-linux-gnu)")


def import_onnx(proto, batch: int):
    """The ONNX graph as a Relax module with the batch fixed, and its weights detached."""
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from ..export import input_spec

    spec = input_spec(proto)
    if isinstance(spec.shape[0], int) and spec.shape[0] != batch:
        raise MixerEdgeError(f"the model's input '{spec.name}' has a fixed batch of {spec.shape[0]}, not {batch}: "
                             f"pass --batch {spec.shape[0]} or export with --dynamic-batch")
    try:
        mod = from_onnx(proto, shape_dict={spec.name: [batch, *spec.shape[1:]]}, keep_params_in_input=True)
    except Exception as exc:
        raise MixerEdgeError(f"TVM's ONNX importer rejected the model ({reason(exc)}): simplify it with onnxsim or "
                             "replace the unsupported operator") from exc
    mod, params = relax.frontend.detach_params(mod)
    return mod, weights_by_name(mod, (p.numpy() for p in params.get("main", [])))


def weights_by_name(mod, arrays) -> dict[str, np.ndarray]:
    """`main`'s weight arrays keyed by parameter name, in order; repeated names get a numeric suffix."""
    named = {}
    for var, array in zip(mod["main"].params[1:], arrays, strict=True):
        name, n = str(var.name), 1
        while name in named:
            name, n = f"{var.name}.{n}", n + 1
        named[name] = array
    return named


def module_source(executable, kind: str, fmt: str = "") -> str:
    """The source of the built executable's `kind` module: CUDA C (kind cuda, which TVM keeps
    uncompiled) or the CPU code's assembly (kind llvm, fmt asm)."""
    pending = [executable.mod]
    while pending:
        module = pending.pop()
        if module.kind == kind:
            return str(module.inspect_source(fmt))
        pending.extend(module.imports)
    raise MixerEdgeError(f"the build produced no {kind} code")


def mixed_precision(mod):
    """fp16 compute with fp32 accumulation; LiftTransformParams moves the weight casts out of `main`."""
    from tvm import relax

    return relax.transform.LiftTransformParams()(relax.transform.ToMixedPrecision(out_dtype="float32")(mod))


def run_transform_params(mod, params: dict[str, np.ndarray]):
    """Run `main_transform_params` (weight casts, layout prepacking) once, here, on the host CPU.

    Returns `main` alone and the weights it takes, so the device never repeats that work.
    """
    import tvm
    from tvm import relax

    if "main_transform_params" not in [gv.name_hint for gv in mod.functions]:
        return mod, params
    transform = tvm.IRModule({gv: f for gv, f in mod.functions.items() if gv.name_hint != "main"}, attrs=mod.attrs)
    transform = relax.transform.DeadCodeElimination(["main_transform_params"])(transform)
    for gv, func in transform.functions.items():
        if isinstance(func, tvm.tirx.PrimFunc) and "target" in (func.attrs or {}):
            transform[gv] = func.without_attr("target")  # compiled for the host, whatever the device
    vm = relax.VirtualMachine(tvm.compile(transform, tvm.target.Target({"kind": "llvm"})), tvm.cpu())
    lifted = vm["main_transform_params"]([tvm.runtime.tensor(p) for p in params.values()])
    mod = tvm.IRModule({gv: f for gv, f in mod.functions.items() if gv.name_hint != "main_transform_params"},
                       attrs=mod.attrs)
    mod = relax.transform.DeadCodeElimination(["main"])(mod)
    return mod, weights_by_name(mod, (t.numpy() for t in lifted))


def relax_program(proto, preset: TargetPreset, batch: int, precision: str):
    """The ONNX graph as the Relax program a build starts from, its weights, its tuning key, and
    (int8: `proto` is a QDQ model) what the integer lowering did."""
    check_toolchain(preset)
    mod, params = import_onnx(proto, batch)
    key = tuning_lib.graph_key(mod, preset, precision)
    lowered = None
    if precision == "float16":
        mod, params = run_transform_params(mixed_precision(mod), params)
    elif precision == "int8":
        from . import int8

        mod, lowered = int8.lower(mod, params, preset)
        mod, params = run_transform_params(mod, params)
    elif dense.applies(preset):  # float32 on AVX-512: its layers on register-tiled kernels
        mod, params = run_transform_params(dense.lower(mod, params), params)
    return mod, params, key, lowered


def tune(proto, preset: TargetPreset, batch: int = 1, precision: str | None = None,
         tuning: tuning_lib.Tuning = tuning_lib.Tuning(tune=True), model: str = "model", progress=print) -> dict:
    """Tune the model for `preset` into its database (created or resumed); returns the database summary."""
    precision = preset.resolve_precision(precision)
    preset.backend.check_tunable(preset)
    mod, _, key, _ = relax_program(proto, preset, batch, precision)
    return tuning_lib.tune_into(key, preset, tuning, tuning_lib.prepare(mod, preset), model, progress)


def build(proto, preset: TargetPreset, batch: int = 1, precision: str | None = None,
          tuning: tuning_lib.Tuning = tuning_lib.Tuning(), model: str = "model", progress=print) -> Built:
    """Compile an ONNX Mixer for `preset` with its backend: TVM's pipeline for the target, with MetaSchedule's
    records for this (graph, target, precision) where a tuning database has them (tuning first if asked)."""
    precision = preset.resolve_precision(precision)
    start = time.perf_counter()
    mod, params, key, lowered = relax_program(proto, preset, batch, precision)
    backend = preset.backend
    compiled, params, record = backend.compile(mod, params, preset, key, tuning, model, progress)
    return Built(backend, compiled, params, preset, batch, precision, time.perf_counter() - start, record, lowered)
