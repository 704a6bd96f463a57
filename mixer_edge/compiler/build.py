"""ONNX -> Relax -> a compiled Relax VM executable for one target preset.

CPU targets use TVM's default pipeline (cross-compiled for ARM boards); CUDA targets use the
default GPU pipeline (DLight schedules), and their kernels are compiled ahead of time into a fat
binary shipped beside the library (compiler/cuda.py).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import MixerEdgeError, reason
from . import cuda as cuda_kernels
from . import tuning as tuning_lib
from . import webgpu
from .targets import TargetPreset


@dataclass
class Built:
    executable: object | None  # tvm.relax.VMExecutable; None on the WebGPU route
    params: dict[str, np.ndarray]  # in the order `main` takes them after the input
    preset: TargetPreset
    batch: int
    precision: str
    seconds: float
    cuda: cuda_kernels.CudaKernels | None = None
    program: dict | None = None  # the WebGPU route's kernels and launch plan (compiler/webgpu.py)
    tuning: dict | None = None  # the tuning database applied (tuning.summary), if any
    int8: dict | None = None  # int8 builds: the layers lowered to integer kernels and the instruction

    def export_library(self, path: Path) -> None:
        """Write the shared library, with the preset's cross compiler where it has one."""
        if self.preset.cross_compiler:
            from tvm.support.cc import cross_compiler

            self.executable.export_library(str(path), fcompile=cross_compiler(self.preset.cross_compiler))
        else:
            self.executable.export_library(str(path))


def check_toolchain(preset: TargetPreset) -> None:
    """Fail before any work when a tool or back end the preset needs is missing."""
    import tvm

    if preset.kind == "vulkan" and preset.webgpu_target is None and \
            tvm.get_global_func("target.build.vulkan", allow_missing=True) is None:
        raise MixerEdgeError(f"target {preset.name} needs TVM's Vulkan code generator, which this TVM build lacks "
                             "(the PyPI wheel has none): build TVM with USE_VULKAN=ON, or add a [build.webgpu] "
                             "table to the preset to run WGSL through wgpu")
    if preset.cross_compiler and shutil.which(preset.cross_compiler) is None:
        raise MixerEdgeError(f"target {preset.name} needs the cross compiler {preset.cross_compiler}, not on PATH: "
                             "install it (Debian: apt-get install g++-aarch64-linux-gnu)")
    if preset.kind == "cuda":
        cuda_kernels.check_compilers(preset)


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
    return mod, params, key, lowered


def tune(proto, preset: TargetPreset, batch: int = 1, precision: str | None = None,
         tuning: tuning_lib.Tuning = tuning_lib.Tuning(tune=True), model: str = "model", progress=print) -> dict:
    """Tune the model for `preset` into its database (created or resumed); returns the database summary."""
    precision = preset.resolve_precision(precision)
    _refuse_wgpu_tuning(preset)
    mod, _, key, _ = relax_program(proto, preset, batch, precision)
    return tuning_lib.tune_into(key, preset, tuning, tuning_lib.prepare(mod, preset), model, progress)


def _refuse_wgpu_tuning(preset: TargetPreset) -> None:
    if preset.uses_wgpu:
        raise MixerEdgeError(f"target {preset.name} builds WGSL with DLight's schedules, which MetaSchedule does "
                             "not tune: drop --tune/--tuning-db")


def build(proto, preset: TargetPreset, batch: int = 1, precision: str | None = None,
          tuning: tuning_lib.Tuning = tuning_lib.Tuning(), model: str = "model", progress=print) -> Built:
    """Compile an ONNX Mixer for `preset`: TVM's pipeline for the target, with MetaSchedule's records
    for this (graph, target, precision) where a tuning database has them (tuning first if asked)."""
    import tvm

    precision = preset.resolve_precision(precision)
    start = time.perf_counter()
    mod, params, key, lowered = relax_program(proto, preset, batch, precision)
    if preset.uses_wgpu:
        if tuning.wanted:
            _refuse_wgpu_tuning(preset)
        prog = webgpu.program(mod, tvm.target.Target({**preset.webgpu_target, "host": {"kind": "llvm"}}))
        return Built(None, params, preset, batch, precision, time.perf_counter() - start, program=prog)
    if preset.kind == "cpu" or tuning.wanted or tuning_lib.find_database(key):
        mod = tuning_lib.prepare(mod, preset)
    database, record = tuning_lib.database_for(key, preset, tuning, mod, model, progress)
    if database is not None:
        mod = tuning_lib.apply(mod, preset, database)
    mod, params = run_transform_params(mod, params)
    target = preset.tvm_target()
    with target:
        try:
            executable = tvm.compile(mod, target)
        except Exception as exc:
            raise MixerEdgeError(f"TVM could not compile the model for {preset.name} ({reason(exc, last=True)}): "
                                 "report it with the model and target") from exc
    kernels = cuda_kernels.compile_kernels(module_source(executable, "cuda"), preset) if preset.kind == "cuda" else None
    return Built(executable, params, preset, batch, precision, time.perf_counter() - start, kernels,
                 tuning=record, int8=lowered)
