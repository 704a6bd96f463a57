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
import tvm
from tvm import relax

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
    images_per_pass: int = 1  # `main` runs the batch in passes of this many images (see `images_per_pass`)


def check_toolchain(preset: TargetPreset) -> None:
    """Fail before any work when a tool or back end the preset needs is missing."""
    preset.backend.check_toolchain(preset)
    if preset.cross_compiler and shutil.which(preset.cross_compiler) is None:
        raise MixerEdgeError(f"target {preset.name} needs the cross compiler {preset.cross_compiler}, not on PATH: "
                             "install it (Debian: apt-get install g++-aarch64-linux-gnu)")


def import_onnx(proto, batch: int):
    """The ONNX graph as a Relax module with the batch fixed, and its weights detached."""
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


def sink_row_reshapes(mod):
    """`mod` with the reshapes that only regroup rows (the last axis kept: an export's [B, T, C] -> [B*T, C] around
    each linear layer) moved after the row-wise ops they feed (a matmul by a 2-D weight, elementwise ops, per-tensor
    quantize/dequantize), where they meet the reshape back and cancel out: the matmul reads the 3-D tensor, and
    FuseOps fuses its bias, GELU and residual add into it (a reshape between them stops the fusion)."""
    mutator = _RowReshapes(mod)
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return relax.transform.RemoveRedundantReshape()(relax.transform.DeadCodeElimination()(mutator.builder_.get()))


ELEMENTWISE = {"relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.power", "relax.maximum",
               "relax.minimum", "relax.erf", "relax.tanh", "relax.sigmoid", "relax.exp", "relax.sqrt", "relax.rsqrt",
               "relax.negative", "relax.abs", "relax.round", "relax.clip", "relax.astype", "relax.nn.gelu",
               "relax.nn.gelu_tanh", "relax.nn.relu", "relax.nn.silu"}
QUANTIZE = {"relax.quantize", "relax.dequantize"}  # (data, scale, zero point): per-tensor ones only


@relax.expr_functor.mutator
class _RowReshapes(relax.PyExprMutator):
    """The rewrite sink_row_reshapes runs, one binding at a time: op(reshape(x, S), ...) -> reshape(op(x, ...), S)
    for a matmul by a 2-D weight (each row on its own) and elementwise ops whose other operands are reshapes of
    tensors of x's shape, or broadcast the same over any rows (a scalar, a bias along the last axis)."""

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        op, out = getattr(call.op, "name", ""), dense.static_shape(call)
        if out is None or not call.args or op not in ELEMENTWISE | QUANTIZE | {"relax.matmul"}:
            return call
        sources = [self._row_reshape(arg) for arg in call.args]
        shapes = [dense.static_shape(arg) for arg in call.args]
        moved = [i for i, source in enumerate(sources) if source is not None]
        if op == "relax.matmul":
            fits = moved == [0] and shapes[1] is not None and len(shapes[1]) == 2
        elif op in QUANTIZE:
            fits = moved == [0] and all(s == [] for s in shapes[1:]) and len(dense.static_shape(sources[0])) >= len(out)
        else:
            kept = [s for s, source in zip(shapes, sources) if source is None]
            fits = bool(moved) and len({tuple(dense.static_shape(sources[i])) for i in moved}) == 1 and \
                all(shapes[i] == out for i in moved) and all(s is not None and s in ([], [1], [out[-1]]) for s in kept)
        if not fits:
            return call
        args = [arg if source is None else source for arg, source in zip(call.args, sources)]
        return relax.op.reshape(self.builder_.emit(relax.Call(call.op, args, call.attrs)), out)

    def _row_reshape(self, expr):
        """x where `expr` is reshape(x, S) (or a chain of them) and each keeps the last axis; else None."""
        source = None
        while isinstance(expr, relax.Var):
            value = self.lookup_binding(expr)
            if not (isinstance(value, relax.Call) and getattr(value.op, "name", "") == "relax.reshape"):
                break
            before, after = dense.static_shape(value.args[0]), dense.static_shape(value)
            if not (before and after and before[-1] == after[-1]):
                break
            source = expr = value.args[0]
        return source


PASS_BYTES = 1 << 20  # the largest activation tensor of one pass, at most: about what a core's L2 cache holds
ONE_PASS = "one_pass"  # the function `in_passes` calls once per pass


def images_per_pass(proto, preset: TargetPreset, batch: int) -> int:
    """How many images one pass of the compiled program takes: `batch`, or where the backend runs a batch in
    passes (CPUs) the most that keep one pass's largest activation within PASS_BYTES, so that it stays in cache
    from layer to layer (a batch of 64 Mixer-S/16 images in one pass streams 100 MB through memory at every
    layer; the small digits Mixer keeps its whole batch in one pass, where per-call overheads dominate)."""
    from ..export import input_spec

    fixed = input_spec(proto).shape[0]
    if batch == 1 or not preset.backend.runs_in_passes or isinstance(fixed, int) and fixed != 1:
        return batch
    if fixed == 1:
        return 1  # the ONNX takes one image: passes of one
    per_image = largest_activation(import_onnx(proto, 1)[0])
    return max(m for m in range(1, batch + 1) if batch % m == 0 and (m == 1 or m * per_image <= PASS_BYTES))


def largest_activation(mod) -> int:
    """Bytes of the largest tensor `main` computes (its bindings of static shape)."""
    sizes = [0]
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            shape = dense.static_shape(binding.var)
            if shape is not None:
                sizes.append(int(np.prod(shape)) * tvm.DataType(binding.var.ty.dtype).bits // 8)
    return max(sizes)


def in_passes(mod, passes: int):
    """`mod`, whose `main` takes one pass of images, as a `main` that takes `passes` times as many and runs them
    pass after pass through the one-pass program (renamed `one_pass`), the logits concatenated. (Each pass's
    images are copied out of the batch first: kernels take tensors that start where their memory does.)"""
    single = mod["main"]
    x, *weights = single.params
    shape = [int(d) for d in x.ty.shape.values]
    builder = relax.BlockBuilder(tvm.IRModule({gv: f for gv, f in mod.functions.items() if gv.name_hint != "main"},
                                              attrs=mod.attrs))
    one_pass = builder.add_func(single.without_attr("global_symbol"), ONE_PASS)
    batch = relax.Var(x.name, relax.TensorType([passes * shape[0], *shape[1:]], x.ty.dtype))
    params = [relax.Var(w.name, w.ty) for w in weights]
    with builder.function("main", [batch, *params], attrs=dict(single.attrs)):
        with builder.dataflow():
            logits = [builder.emit(relax.Call(one_pass, [builder.emit(relax.op.strided_slice(
                batch, [0], [p * shape[0]], [(p + 1) * shape[0]])), *params])) for p in range(passes)]
            out = builder.emit_output(relax.op.concat(logits, axis=0))
        builder.emit_func_output(out)
    return builder.get()


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
    return relax.transform.LiftTransformParams()(relax.transform.ToMixedPrecision(out_dtype="float32")(mod))


def run_transform_params(mod, params: dict[str, np.ndarray]):
    """Run `main_transform_params` (weight casts, layout prepacking) once, here, on the host CPU.

    Returns `main` alone and the weights it takes, so the device never repeats that work.
    """
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
    mod = sink_row_reshapes(mod)
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
    mod, _, key, _ = relax_program(proto, preset, images_per_pass(proto, preset, batch), precision)
    return tuning_lib.tune_into(key, preset, tuning, tuning_lib.prepare(mod, preset), model, progress)


def build(proto, preset: TargetPreset, batch: int = 1, precision: str | None = None,
          tuning: tuning_lib.Tuning = tuning_lib.Tuning(), model: str = "model", progress=print) -> Built:
    """Compile an ONNX Mixer for `preset` with its backend: TVM's pipeline for the target, with MetaSchedule's
    records for this (graph, target, precision) where a tuning database has them (tuning first if asked)."""
    precision = preset.resolve_precision(precision)
    start = time.perf_counter()
    per_pass = images_per_pass(proto, preset, batch)
    mod, params, key, lowered = relax_program(proto, preset, per_pass, precision)
    backend = preset.backend
    compiled, params, record = backend.compile(mod, params, preset, key, tuning, model, progress,
                                               passes=batch // per_pass)
    return Built(backend, compiled, params, preset, batch, precision, time.perf_counter() - start, record, lowered,
                 per_pass)
