"""Integer lowering for `--precision int8`: QDQ matmuls become int8 x int8 -> int32 kernels.

A QDQ ONNX (quant/qdq.py, or any with the same pattern) imports into Relax as float math:
`matmul(dequantize(x_q, s_x, z_x), dequantize(W_q, s_w, 0))`. `lower` rewrites each such matmul
(token- and channel-mixing MLPs, head; W.X with the weight on the left too) and each patchifying stem
convolution into

    acc = x_q' . W_q                        int32; a hand-scheduled kernel on the target's dot product
    y   = (acc - (z_x + o) * colsum(W_q)) * (s_x * s_w)          float

where x_q' = x_q + o (o = 128 where the instruction wants unsigned activations, as x86 VNNI and AMX do).
Weights are packed `[N/16, K/4, 16, 4]` (16 output channels x 4 reduction steps per instruction; an AMX
weight tile is 16 consecutive such rows). The packing, column sums and scale products depend on weights
only, so LiftTransformParams moves them into `main_transform_params`, which the build runs once on the
host. Scales and zero points stay runtime tensors; a division by one (a quantize, GELU's sqrt 2) becomes a
multiplication by its reciprocal, lifted the same way. LayerNorm, GELU and the residual adds stay float.

On CPUs (amx, vnni, sdot, plain) a matmul's kernel (`fusable_dense_func`) reads x_q and writes acc in the
layout the model has after it ([..., N], or W.X's transposed one), marked fusable (kOutEWiseFusable):
FuseOps fuses y and the elementwise and broadcast ops after it (bias, GELU, the next layer's quantize, a
residual add) into it, and `schedule_fused` (run by tuning.prepare after FuseTIR) schedules the product
(`_schedule_cpu`: register tiles on VNNI/sdot; `_schedule_amx`: strips of 32 channels in tile registers)
and computes that epilogue per tile, reading acc back while it is still in cache (no separate pass over
it). The patch-embedding stem, a K not a multiple of 4, and CUDA's dp4a keep an opaque kernel writing
acc [M, N] and the epilogue as a separate fused float kernel.

Scheduled kernels carry `tirx.is_scheduled`: the default pipelines, DLight and MetaSchedule leave them as
they are, and tuning spends its trials on the float kernels around them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax, s_tir
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T
from tvm.target import codegen

from ..errors import MixerEdgeError
from . import dense
from .cpu_schedules import divisor
from .targets import TargetPreset

LANES, STEP = 16, 4  # output channels and reduction steps per packed weight tile
MAX_ROWS = 8  # rows of a CPU kernel's register tile (DotProduct.tiles)
LAYOUT_CHANGES = ("relax.permute_dims", "relax.reshape")  # moves elements, computes nothing


@dataclass(frozen=True)
class DotProduct:
    """How a target multiplies int8: the instruction, and what its activations must be."""

    name: str  # vnni, sdot, dp4a, or plain (no dot-product instruction: LLVM's vectorizer)
    activation: str  # uint8 or int8
    accumulators: int = 8  # CPU register tiles: at most this many int32 accumulators of 16
    vectors: int = 2  # channels, in at most this many vectors of 16 channels (the weights loaded per step)

    @property
    def tiles(self) -> dense.RegisterTiles:
        """The CPU register tiles of its kernels. On VNNI 7 x 4 runs S/16's channel MLP 1.25x as fast as 4 x 2;
        16 rows ran at half the speed of 8."""
        return dense.RegisterTiles(MAX_ROWS, self.vectors, self.accumulators)

    @property
    def offset(self) -> int:
        return 128 if self.activation == "uint8" else 0

    @property
    def columns(self) -> int:
        """Output channels per kernel tile: N is padded to a multiple of it."""
        return AMX_COLUMNS if self.name == "amx" else LANES


# VNNI: 28 of AVX-512's 32 registers accumulate, 4 hold weights. sdot: 8 x 16 channels fill NEON's 32 registers.
DOT_PRODUCTS = {"amx": DotProduct("amx", "uint8"), "vnni": DotProduct("vnni", "uint8", 28, 4),
                "sdot": DotProduct("sdot", "int8"), "dp4a": DotProduct("dp4a", "int8"),
                "plain": DotProduct("plain", "int8")}
# The first CPU feature (LLVM name) the target has picks the instruction (GPU backends name theirs).
CPU_DOT_PRODUCT = (("amx-int8", "amx"), ("avx512vnni", "vnni"), ("dotprod", "sdot"))
AMX_COLUMNS, AMX_DEPTH, AMX_ROWS = 32, 64, 16  # two 16-channel tiles per strip; bytes of K and rows per tile


def dot_product(preset: TargetPreset) -> DotProduct:
    """The int8 dot-product instruction the preset's device has: its backend's, else its CPU's."""
    if preset.backend.int8_dot_product:
        return DOT_PRODUCTS[preset.backend.int8_dot_product]
    features = set(codegen.llvm_get_cpu_features(tvm.target.Target(preset.cpu_target)))
    return DOT_PRODUCTS[next((name for feature, name in CPU_DOT_PRODUCT if feature in features), "plain")]


def lower(mod, params: dict[str, np.ndarray], preset: TargetPreset):
    """`mod` with its QDQ matmuls and patch convolutions in integer arithmetic, and what was lowered.

    Layers the QDQ model keeps in float (a recipe's `float_layers`) have no dequantize and stay float; a
    quantized layer no integer kernel takes stays float too, listed with the reason in `float_layers`.
    """
    _register_intrinsics()
    dot = dot_product(preset)
    lowering = Lowering(mod, params, dot)
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            lowering.builder_.update_func(gv, lowering.visit_expr(func))
    lowered = relax.transform.DeadCodeElimination(["main"])(lowering.builder_.get())
    if not lowering.count:
        raise MixerEdgeError("--precision int8 found no quantized matmul to lower: compile a QDQ model "
                             "(mixer-edge calibrate, or --calibration/--calib-data)")
    summary = {"layers": lowering.count, "float_layers": lowering.float_layers, "dot_product": dot.name,
               "activations": dot.activation}
    return relax.transform.LiftTransformParams()(lowered), summary


@relax.expr_functor.mutator
class Lowering(relax.PyExprMutator):
    """The rewrite `lower` runs: matches on the bindings already visited, emits the integer form."""

    def __init__(self, mod, params, dot):
        super().__init__(mod)
        self.params, self.dot = params, dot
        self.kernels, self.count = {}, 0
        self.float_layers: list[dict] = []  # quantized in the QDQ model, left float here: {layer, reason}

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        op = getattr(call.op, "name", "")
        if op in ("relax.quantize", "relax.divide") and dense.is_scalar_parameter(call.args[1], self.params):
            return self._reciprocal(call)
        if op not in ("relax.matmul", "relax.nn.conv1d", "relax.nn.conv2d") or \
                not any(self._dequantize(arg) is not None for arg in call.args):
            return call  # not a layer the QDQ model quantized
        lowered = self._matmul(call) if op == "relax.matmul" else self._patch_conv(call) if op == "relax.nn.conv2d" \
            else "a convolution with a kernel wider than 1 and not a patch embedding"
        if isinstance(lowered, str):
            self.float_layers.append({"layer": self._name(call), "reason": lowered})
            return call
        self.count += 1
        return lowered

    def _name(self, call) -> str:
        """The layer's name for a message: its quantized weight parameter's, else its op's."""
        for arg in call.args:
            dq = self._dequantize(arg)
            if dq is not None and isinstance(dq[0], relax.Var) and dq[0].name in self.params:
                return dq[0].name.removesuffix("_q")
        return call.op.name

    def _reciprocal(self, call):
        """x / s (a divide, or a quantize's `round(x / s) + z`) with x * (1 / s) (dense.times_reciprocal).

        A quantize with one scale per tensor is elementwise, so it runs before the transposes and reshapes
        between it and what it quantizes (`_beneath_layout_changes`): FuseOps then fuses it into that kernel
        (the token MLP's LayerNorm), and the transpose moves int8 instead of float32."""
        if call.op.name == "relax.quantize" and call.args[2].ty.ndim == 0 and self._layout_changes(call.args[0]):
            return self._beneath_layout_changes(call.args[0], lambda y: self.builder_.emit(
                self._reciprocal(relax.Call(call.op, [y, *call.args[1:]], call.attrs))))
        emit, op = self.builder_.emit, relax.op
        scaled = dense.times_reciprocal(self.builder_, *call.args[:2])
        if call.op.name == "relax.divide":
            return scaled
        zero, dtype = call.args[2], call.attrs.out_dtype
        low, high = np.iinfo(dtype).min, np.iinfo(dtype).max
        shifted = op.add(emit(op.round(emit(scaled))), emit(op.astype(zero, "float32")))
        clipped = op.maximum(emit(op.minimum(emit(shifted), relax.const(float(high), "float32"))),
                             relax.const(float(low), "float32"))
        return op.astype(emit(clipped), dtype)

    # -- matching ------------------------------------------------------------------------
    def _layout_changes(self, expr) -> list:
        """The transposes and reshapes `expr` is bound to, outermost first (empty: none)."""
        chain = []
        while isinstance(expr, relax.Var):
            value = self.lookup_binding(expr)
            if isinstance(value, relax.Call) and getattr(value.op, "name", "") in LAYOUT_CHANGES:
                chain.append(value)
                value = value.args[0]
            expr = value  # a Var bound to another Var is followed too
        return chain

    def _dequantize(self, expr):
        """(q, scale, zero point, axis) if `expr` is bound to a dequantize, else None."""
        value = self.lookup_binding(expr) if isinstance(expr, relax.Var) else None
        if isinstance(value, relax.Call) and getattr(value.op, "name", "") == "relax.dequantize":
            return (*value.args, int(value.attrs.axis))
        return None

    def _activation(self, expr):
        dq = self._dequantize(expr)
        if dq is None or dq[0].ty.dtype != "int8" or dq[1].ty.ndim != 0:
            return None  # int8, one scale per tensor
        return dq[:3]

    def _weight(self, expr, out_axis: int):
        """(W_q [N, K], scale [N]) if `expr` is a per-output-channel dequantized int8 weight parameter."""
        transposed = False
        value = self.lookup_binding(expr) if isinstance(expr, relax.Var) else None
        if isinstance(value, relax.Call) and getattr(value.op, "name", "") == "relax.permute_dims" and \
                [int(a) for a in value.attrs.axes] == [1, 0]:
            expr, transposed = value.args[0], True
        dq = self._dequantize(expr)
        if dq is None:
            return None
        q, scale, zero, axis = dq
        name = q.name if isinstance(q, relax.Var) else None
        if name not in self.params or q.ty.dtype != "int8":
            return None
        zero_value = self.params.get(zero.name) if isinstance(zero, relax.Var) else None
        if zero_value is None or np.any(zero_value != 0):
            return None  # an asymmetric weight: leave it fake-quant
        ndim = q.ty.ndim
        axis %= ndim
        if ndim == 2 and axis == (out_axis if not transposed else 1 - out_axis):
            return (q if axis == 0 else self.builder_.emit(relax.op.permute_dims(q, [1, 0]))), scale
        if ndim == 4 and axis == 0 and not transposed:  # conv OIHW
            return q, scale
        return None

    def _matmul(self, call):
        """X.W (a Linear), or W.X (a weight on the left: token mixing without transposes), in int8."""
        a, b = call.args
        weight_left = a.ty.ndim == 2 and self._dequantize(a) is not None and self._weight(a, out_axis=0) is not None
        x, w = (b, a) if weight_left else (a, b)
        act = self._activation(x)
        weight = self._weight(w, out_axis=0 if weight_left else 1) if w.ty.ndim == 2 else None
        if act is None:
            return "its input is not int8 with one scale per tensor"
        if weight is None:
            return "its weight is not a 2-D int8 parameter, symmetric per output channel"
        q, s_x, z_x = act
        emit, op = self.builder_.emit, relax.op
        if weight_left and q.ty.ndim < 2:
            return "its input has fewer than 2 axes"
        swap = [*range(q.ty.ndim - 2), q.ty.ndim - 1, q.ty.ndim - 2] if weight_left else None
        if self.dot.name != "dp4a" and dense.static_shape(q)[-2 if weight_left else -1] % STEP == 0:
            # CPUs: the kernel writes the model's layout, for FuseOps to fuse the epilogue into it
            if self.dot.offset:
                q = self._offset(q)
            if weight_left:  # rows of W mix the next-to-last axis of x: [..., k, c] -> [..., c, k]
                q = emit(op.permute_dims(q, swap))
            return self._fused_dense(q, *weight, s_x, z_x, swap)
        if weight_left:  # rows of W mix the next-to-last axis of x: [..., k, c] -> [..., c, k], back after
            q = emit(op.permute_dims(q, swap))
        shape = dense.static_shape(q)
        x2 = emit(op.reshape(q, [int(np.prod(shape[:-1])), shape[-1]]))
        y = op.reshape(self._int8_dense(x2, *weight, s_x, z_x), [*shape[:-1], -1])
        return op.permute_dims(emit(y), swap) if weight_left else y

    def _patch_conv(self, call):
        x, w = call.args
        a = call.attrs
        kernel = dense.static_shape(w)[2:]
        if [int(s) for s in a.strides] != kernel or any(int(p) for p in a.padding) or int(a.groups) != 1 \
                or any(int(d) != 1 for d in a.dilation) or a.data_layout != "NCHW" or a.kernel_layout != "OIHW":
            return "a convolution that is not a patch embedding (stride = kernel, no padding, one group, NCHW)"
        act = self._activation(x)
        weight = self._weight(w, out_axis=0)
        if act is None:
            return "its input is not int8 with one scale per tensor"
        if weight is None:
            return "its weight is not an int8 parameter, symmetric per output channel"
        q, s_x, z_x = act
        b, c, h, wd = dense.static_shape(q)
        (ph, pw), (gh, gw) = kernel, (h // kernel[0], wd // kernel[1])
        if gh * ph != h or gw * pw != wd:
            return "its patches do not tile the image"
        emit, op = self.builder_.emit, relax.op
        patches = emit(op.permute_dims(emit(op.reshape(q, [b, c, gh, ph, gw, pw])), [0, 2, 4, 1, 3, 5]))
        x2 = emit(op.reshape(patches, [b * gh * gw, c * ph * pw]))
        w_q, s_w = weight
        w2 = emit(op.reshape(w_q, [dense.static_shape(w_q)[0], c * ph * pw]))
        y = emit(op.reshape(self._int8_dense(x2, w2, s_w, s_x, z_x), [b, gh, gw, -1]))
        return op.permute_dims(y, [0, 3, 1, 2])

    # -- rewriting -----------------------------------------------------------------------
    def _offset(self, x_q):
        """x_q + o as uint8 (the activations VNNI wants), added before any transposes x_q went through."""
        emit, op = self.builder_.emit, relax.op
        return self._beneath_layout_changes(x_q, lambda q: emit(op.astype(emit(op.add(
            emit(op.astype(q, "int32")), relax.const(self.dot.offset, "int32"))), "uint8")))

    def _beneath_layout_changes(self, expr, elementwise):
        """`elementwise`(expr) computed as the same transposes and reshapes of `elementwise`(their source)."""
        changes = self._layout_changes(expr)
        out = elementwise(changes[-1].args[0] if changes else expr)
        for change in reversed(changes):
            out = self.builder_.emit(relax.Call(change.op, [out, *change.args[1:]], change.attrs))
        return out

    def _fused_dense(self, x_q, w_q, s_w, s_x, z_x, perm):
        """float32 dequantize(x_q [..., K]) @ dequantize(w_q [N, K]).T, permuted by `perm` (None: as it is).

        x_q comes offset already. The kernel (fusable_dense_func) reads x_q and writes the int32 product in the
        output's shape, so the dequantize here and the model's bias, GELU and next quantize after it are
        elementwise or broadcast: FuseOps fuses them into the kernel and `schedule_fused` schedules it.
        """
        emit = self.builder_.emit
        x_shape, n = dense.static_shape(x_q), dense.static_shape(w_q)[0]
        packed = self._packed(w_q, x_shape[-1])
        out_shape = [*x_shape[:-1], n]
        if perm is not None:
            out_shape = [out_shape[a] for a in perm]
        key = ("fused", tuple(x_shape), n, tuple(perm or ()))
        if key not in self.kernels:
            func = fusable_dense_func(x_shape, n, self.dot, perm)
            name = f"int8_dense_{self.dot.name}_{'x'.join(map(str, x_shape))}x{n}" + ("t" if perm else "")
            self.kernels[key] = self.builder_.add_func(func, name)
        if self.dot.name == "amx":  # tiles load rows of a 2-D X
            x_q = emit(relax.op.reshape(x_q, [int(np.prod(x_shape[:-1])), x_shape[-1]]))
        acc = emit(relax.call_tir(self.kernels[key], [x_q, packed], relax.TensorType(out_shape, "int32")))
        return self._dequantized(acc, w_q, s_w, s_x, z_x, channels_first=perm is not None)

    def _int8_dense(self, x_q, w_q, s_w, s_x, z_x):
        """float32 [M, N] = dequantize(x_q [M, K]) @ dequantize(w_q [N, K]).T, computed in int32."""
        emit, op = self.builder_.emit, relax.op
        (m, k), n = dense.static_shape(x_q), dense.static_shape(w_q)[0]
        kp, np_ = dense.round_up(k, STEP), dense.round_up(n, self.dot.columns)
        if self.dot.offset:
            x_q = self._offset(x_q)
        if kp != k:
            x_q = emit(op.nn.pad(x_q, [0, 0, 0, kp - k]))
        packed = self._packed(emit(op.nn.pad(w_q, [0, 0, 0, kp - k])) if kp != k else w_q, kp)
        acc = emit(relax.call_tir(self._kernel(m, kp, np_), [x_q, packed], relax.TensorType([m, np_], "int32")))
        if np_ != n:
            acc = emit(op.strided_slice(acc, axes=[1], begin=[0], end=[n]))
        return emit(self._dequantized(acc, w_q, s_w, s_x, z_x))

    def _packed(self, w_q, k: int):
        """w_q [N, K] (K a multiple of 4) as the kernels read it: [N/16, K/4, 16, 4], N padded to the kernel's
        column tile."""
        emit, op = self.builder_.emit, relax.op
        n = dense.static_shape(w_q)[0]
        np_ = dense.round_up(n, self.dot.columns)
        packed = emit(op.nn.pad(w_q, [0, np_ - n, 0, 0])) if np_ != n else w_q
        return emit(op.permute_dims(emit(op.reshape(packed, [np_ // LANES, LANES, k // STEP, STEP])), [0, 2, 1, 3]))

    def _dequantized(self, acc, w_q, s_w, s_x, z_x, channels_first: bool = False):
        """(acc - (z_x + o) * colsum(w_q)) * s_x * s_w, float32 (not emitted); `channels_first`: acc's channels on
        its next-to-last axis (W.X)."""
        emit, op = self.builder_.emit, relax.op
        colsum = emit(op.sum(emit(op.astype(w_q, "int32")), axis=[1]))
        zero = emit(op.add(emit(op.astype(z_x, "int32")), relax.const(self.dot.offset, "int32")))
        correction, scale = emit(op.multiply(zero, colsum)), emit(op.multiply(s_x, s_w))
        if channels_first:
            n = dense.static_shape(w_q)[0]
            correction, scale = emit(op.reshape(correction, [n, 1])), emit(op.reshape(scale, [n, 1]))
        return op.multiply(emit(op.astype(emit(op.subtract(acc, correction)), "float32")), scale)

    def _kernel(self, m: int, k: int, n: int):
        key = (m, k, n)
        if key not in self.kernels:
            func = schedule(dense_func(m, k, n, self.dot.activation), self.dot)
            self.kernels[key] = self.builder_.add_func(func, f"int8_dense_{self.dot.name}_{m}x{k}x{n}")
        return self.kernels[key]


def dense_func(m: int, k: int, n: int, activation: str):
    """C[m, n] = sum_k X[m, k] * W[n // 16, k // 4, n % 16, k % 4], in int32."""
    @T.prim_func(s_tir=True)
    def dense(X: T.Buffer((m, k), activation), W: T.Buffer((n // LANES, k // STEP, LANES, STEP), "int8"),
              C: T.Buffer((m, n), "int32")):
        T.func_attr({"tirx.noalias": True, "op_pattern": 8})  # opaque: FuseOps keeps it a kernel of its own
        for i, j, r in T.grid(m, n, k):
            with T.sblock("dense"):
                vi, vj, vr = T.axis.remap("SSR", [i, j, r])
                with T.init():
                    C[vi, vj] = 0
                C[vi, vj] = C[vi, vj] + T.cast(X[vi, vr], "int32") * \
                    T.cast(W[vj // LANES, vr // STEP, vj % LANES, vr % STEP], "int32")

    return dense


def fusable_dense_func(x_shape: list[int], n: int, dot: DotProduct, perm: list[int] | None):
    """out = permute_dims(X [..., K] . W_packed [N/16, K/4, 16, 4] as [..., N], perm), int32: dense.fusable_kernel's
    two blocks, N rounded up to the column tile. AMX reads X flattened to [M, K]."""
    from tvm import te

    i64 = lambda v: tvm.tirx.IntImm("int64", v)  # noqa: E731
    lead, k = x_shape[:-1], x_shape[-1]
    np_ = dense.round_up(n, dot.columns)
    flat = dot.name == "amx"
    X = te.placeholder([i64(d) for d in ([int(np.prod(lead)), k] if flat else x_shape)], dot.activation, "X")
    W = te.placeholder([i64(np_ // LANES), i64(k // STEP), i64(LANES), i64(STEP)], "int8", "W")
    return dense.fusable_kernel(X, W, lead, k, n, np_, perm, lambda x, j, r: x.astype("int32") * W[
        j // LANES, r // STEP, j % LANES, r % STEP].astype("int32"),
        lambda i, index, r: X[i, r] if flat else X[(*index, r)])


def schedule_fused(preset: TargetPreset):
    """A pass: every PrimFunc with the `dense` block of fusable_dense_func (FuseOps and FuseTIR having put the
    epilogue after it) scheduled as `_schedule_cpu` does, the epilogue inlined into one block computed per
    register tile, and marked scheduled. For CPU targets, after FuseTIR (tuning.prepare)."""
    @tvm.transform.module_pass(opt_level=0, name="MixerEdgeScheduleFusedInt8")
    def run(mod, _ctx):
        dot = None
        for gv, func in list(mod.functions.items()):
            if not isinstance(func, tvm.tirx.PrimFunc) or (func.attrs is not None and
                                                            func.attrs.get("tirx.is_scheduled", False)):
                continue
            try:
                sch = s_tir.Schedule(func)
                sch.get_sblock("dense"), sch.get_sblock("store")
            except Exception:  # noqa: BLE001 - not fusable_dense_func's blocks: not an int8 kernel
                continue
            dot = dot or dot_product(preset)
            mod[gv] = _schedule_fused(func, dot)
        return mod
    return run


def _schedule_fused(func, dot: DotProduct):
    """`func`'s dense block as `_schedule_cpu` schedules it; the blocks after it (store, dequantize, bias,
    GELU, quantize...) inlined into the last, computed per tile. Where they do not inline (a fused function
    with two outputs), the store alone goes per tile and the epilogue stays loops of its own."""
    try:
        sch = s_tir.Schedule(func)
        dense = sch.get_sblock("dense")
        *middle, last = [b for b in sch.get_child_blocks(sch.get_sblock("root"))
                         if not sch.get(b).same_as(sch.get(dense))]
        for block in middle:
            sch.compute_inline(block)
        _schedule_dense(sch, dot, dense, last)
    except (RuntimeError, ValueError):  # a schedule primitive refused
        sch = s_tir.Schedule(func)
        _schedule_dense(sch, dot, sch.get_sblock("dense"), sch.get_sblock("store"))
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _schedule_dense(sch, dot: DotProduct, block, epilogue) -> None:
    """An integer kernel on `dot`'s instruction; a float32 one (compiler/dense.py) on its register tile."""
    if str(sch.get(block).writes[0].source.dtype) == "float32":
        dense.schedule(sch, block, epilogue)
    else:
        SCHEDULES[dot.name](sch, dot, block=block, epilogue=epilogue)


def schedule(func, dot: DotProduct):
    """`func` (dense_func) scheduled for `dot`'s instruction; marked scheduled."""
    sch = s_tir.Schedule(func)
    SCHEDULES[dot.name](sch, dot)
    return sch.mod["main"].without_attr("global_symbol").with_attr("tirx.is_scheduled", True)


def _schedule_cpu(sch, dot: DotProduct, block=None, epilogue=None) -> None:
    """Register tiles (`DotProduct.tiles`: rows x 16-channel vectors) in parallel, each accumulated over K in
    reduction steps of 4, its epilogue computed on it.

    VNNI does 16 channels per instruction, sdot 4 (so 16 = 4 x sdot); without a dot product the
    innermost 16 channels are vectorized and LLVM widens the multiplies.
    """
    block = block or sch.get_sblock("dense")
    i, j, r = sch.get_loops(block)
    m, n = (int(sch.get(loop).extent) for loop in (i, j))
    rows, vectors = dot.tiles.fit(m, n // LANES)
    io, ii = sch.split(i, [None, rows])
    jo, jm, ji = sch.split(j, [None, vectors, LANES])
    ro, ri = sch.split(r, [None, STEP])
    sch.reorder(jo, io, ro, ii, jm, ji, ri)
    out = epilogue or sch.cache_write(block, 0, "global")  # the tile, written per tile
    sch.reverse_compute_at(out, io)
    sch.parallel(sch.fuse(jo, io))
    if dot.name == "plain":  # 16 lanes innermost, vectorized while the block still has its init
        sch.reorder(ri, ji)
        sch.vectorize(ji)
        sch.unroll(ri)
    init = sch.decompose_reduction(block, ro)
    sch.unroll(ii)
    sch.unroll(jm)
    if dot.name == "vnni":
        sch.tensorize(ji, VNNI)
    elif dot.name == "sdot":
        _, jl = sch.split(ji, [None, 4])
        sch.tensorize(jl, SDOT)
    sch.vectorize(sch.get_loops(init)[-1])
    if epilogue is None:
        sch.vectorize(sch.get_loops(out)[-1])
    else:
        dense.vectorize_innermost(sch, out)


def _schedule_amx(sch, dot: DotProduct, block=None, epilogue=None) -> None:
    """Strips of 32 channels x a block of rows in parallel, each one AMX call (`_amx_intrinsic`: the whole K
    in tile registers); the epilogue computed per strip while it is in cache."""
    block = block or sch.get_sblock("dense")
    i, j, r = sch.get_loops(block)
    m, k = (int(sch.get(loop).extent) for loop in (i, r))
    index = str(sch.get(i).extent.ty)  # int64 in fused functions (FuseTIR's shapes), int32 otherwise
    rows = max(d for d in range(1, AMX_ROWS + 1) if m % d == 0)
    if rows < 4:  # tiles of 1 to 3 rows would idle most of the tile unit: VNNI (every AMX CPU has it) instead
        return _schedule_cpu(sch, DOT_PRODUCTS["vnni"], block, epilogue)
    span = max(d for d in range(rows, max(256, rows) + 1, rows) if m % d == 0)  # rows per call: a few tiles
    io, ii = sch.split(i, [None, span])
    jo, ji = sch.split(j, [None, AMX_COLUMNS])
    sch.reorder(jo, io, ii, ji, r)
    if epilogue is not None:
        sch.reverse_compute_at(epilogue, io)
    sch.parallel(sch.fuse(jo, io))
    outer = sch.blockize(ii)
    sch.tensorize(outer, _amx_intrinsic(span, k, rows, index))
    # the intrinsic starts its tiles at zero (tilezero) and stores every element: the init is dead stores
    block = sch.get(outer)
    sch.state.replace(sch.get_sref(outer), s_tir.SBlock(
        block.iter_vars, block.reads, block.writes, block.name_hint, block.body, None, block.alloc_buffers,
        block.match_buffers, block.annotations), {block: block})
    if epilogue is not None:
        dense.vectorize_innermost(sch, epilogue)


def _amx_intrinsic(m: int, k: int, rows: int, index: str) -> str:
    """C[m, 32] = A[m, k] (uint8) . B (two 16-channel packed tiles [2, k/4, 16, 4], int8), registered once.

    Tiles (palette 1): 0, 1 accumulate C's two 16-channel halves, `rows` rows at a time; 2 holds 64 bytes of
    K of A's rows, 3 and 4 the matching 16 steps of B; 5 and 6 the last k % 64 bytes where K has them.
    """
    name = f"mixer_edge_amx_{m}x{k}_{rows}_{index}"
    if TensorIntrin.get(name, allow_missing=True) is not None:
        return name
    full, tail = divmod(k, AMX_DEPTH)
    config = np.zeros(64, np.uint8)
    config[0] = 1  # palette
    shapes = [(rows, AMX_DEPTH)] * 3 + [(AMX_DEPTH // STEP, AMX_DEPTH)] * 2 + \
        ([(rows, tail), (tail // STEP, AMX_DEPTH)] if tail else [])
    for t, (tile_rows, width) in enumerate(shapes):
        config[16 + 2 * t], config[48 + t] = width, tile_rows  # bytes per row (< 256), rows
    words = [int(v) for v in config.view("<u8")]
    call = lambda *args: T.call_llvm_intrin("void", *args)  # noqa: E731
    steps, tail_step = AMX_DEPTH // STEP, full * AMX_DEPTH // STEP
    M, K, K4, N, P, Q, C2 = (tvm.tirx.IntImm(index, v) for v in (m, k, k // STEP, AMX_COLUMNS, LANES, STEP, 2))

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((M, K), "uint8", offset_factor=1), B: T.Buffer((C2, K4, P, Q), "int8",
                                                                        offset_factor=1),
             C: T.Buffer((M, N), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(A[0:M, 0:K], B[0:C2, 0:K4, 0:P, 0:Q])
            T.writes(C[0:M, 0:N])
            for i, j, r in T.grid(M, N, K):
                with T.sblock("update"):
                    vi, vj, vr = T.axis.remap("SSR", [i, j, r])
                    T.reads(C[vi, vj], A[vi, vr], B[vj // LANES, vr // STEP, vj % LANES, vr % STEP])
                    T.writes(C[vi, vj])
                    with T.init():
                        C[vi, vj] = 0
                    C[vi, vj] = C[vi, vj] + T.cast(A[vi, vr], "int32") * \
                        T.cast(B[vj // LANES, vr // STEP, vj % LANES, vr % STEP], "int32")

    sa, sc = tvm.tirx.Var("sa", index), tvm.tirx.Var("sc", index)

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((M, K), "uint8", offset_factor=1, strides=[sa, 1]),
             B: T.Buffer((C2, K4, P, Q), "int8", offset_factor=1),
             C: T.Buffer((M, N), "int32", offset_factor=1, strides=[sc, 1])) -> None:
        with T.sblock("root"):
            T.reads(A[0:M, 0:K], B[0:C2, 0:K4, 0:P, 0:Q])
            T.writes(C[0:M, 0:N])
            cfg = T.decl_buffer((8,), "uint64", scope="local")
            cfg[0] = T.uint64(words[0])
            cfg[1] = T.uint64(words[1])
            cfg[2] = T.uint64(words[2])
            cfg[3] = T.uint64(words[3])
            cfg[4] = T.uint64(words[4])
            cfg[5] = T.uint64(words[5])
            cfg[6] = T.uint64(words[6])
            cfg[7] = T.uint64(words[7])
            T.evaluate(call("llvm.x86.ldtilecfg", T.address_of(cfg[0])))
            for io in range(m // rows):
                T.evaluate(call("llvm.x86.tilezero", T.int8(0)))
                T.evaluate(call("llvm.x86.tilezero", T.int8(1)))
                for ko in range(full):
                    T.evaluate(call("llvm.x86.tileloadd64", T.int8(2), T.address_of(A[io * rows, ko * AMX_DEPTH]),
                                    T.Cast("int64", sa)))
                    T.evaluate(call("llvm.x86.tileloadd64", T.int8(3), T.address_of(B[0, ko * steps, 0, 0]),
                                    T.int64(AMX_DEPTH)))
                    T.evaluate(call("llvm.x86.tdpbusd", T.int8(0), T.int8(2), T.int8(3)))
                    T.evaluate(call("llvm.x86.tileloadd64", T.int8(4), T.address_of(B[1, ko * steps, 0, 0]),
                                    T.int64(AMX_DEPTH)))
                    T.evaluate(call("llvm.x86.tdpbusd", T.int8(1), T.int8(2), T.int8(4)))
                if tail > 0:
                    T.evaluate(call("llvm.x86.tileloadd64", T.int8(5), T.address_of(A[io * rows, full * AMX_DEPTH]),
                                    T.Cast("int64", sa)))
                    T.evaluate(call("llvm.x86.tileloadd64", T.int8(6), T.address_of(B[0, tail_step, 0, 0]),
                                    T.int64(AMX_DEPTH)))
                    T.evaluate(call("llvm.x86.tdpbusd", T.int8(0), T.int8(5), T.int8(6)))
                    T.evaluate(call("llvm.x86.tileloadd64", T.int8(6), T.address_of(B[1, tail_step, 0, 0]),
                                    T.int64(AMX_DEPTH)))
                    T.evaluate(call("llvm.x86.tdpbusd", T.int8(1), T.int8(5), T.int8(6)))
                T.evaluate(call("llvm.x86.tilestored64", T.int8(0), T.address_of(C[io * rows, 0]),
                                T.Cast("int64", sc * 4)))
                T.evaluate(call("llvm.x86.tilestored64", T.int8(1), T.address_of(C[io * rows, LANES]),
                                T.Cast("int64", sc * 4)))
            T.evaluate(call("llvm.x86.tilerelease"))

    TensorIntrin.register(name, desc, impl)
    return name


def _schedule_dp4a(sch, dot: DotProduct, block=None, epilogue=None) -> None:
    """One thread per output (16 channels x up to 8 rows a block); dp4a over each 4-step of K. GPU kernels
    are opaque: no epilogue comes with them."""
    assert epilogue is None, "dp4a kernels keep their epilogue a kernel of its own"
    block = block or sch.get_sblock("dense")
    i, j, r = sch.get_loops(block)
    m = int(sch.get(i).extent)
    io, ii = sch.split(i, [None, divisor(m, (8, 4, 7, 6, 5, 3, 2))])
    jo, ji = sch.split(j, [None, LANES])
    ro, ri = sch.split(r, [None, STEP])
    sch.reorder(io, jo, ii, ji, ro, ri)
    out = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(out, ji)
    sch.bind(sch.fuse(io, jo), "blockIdx.x")
    sch.bind(sch.fuse(ii, ji), "threadIdx.x")
    sch.decompose_reduction(block, ro)
    sch.tensorize(ri, DP4A)


SCHEDULES = {"amx": _schedule_amx, "vnni": _schedule_cpu, "sdot": _schedule_cpu, "plain": _schedule_cpu,
             "dp4a": _schedule_dp4a}
VNNI, SDOT, DP4A = "mixer_edge_vnni_16x4", "mixer_edge_sdot_4x4", "mixer_edge_dp4a"


def _register_intrinsics() -> None:
    """Tensor intrinsics for the three instructions (TVM's own VNNI one predates LLVM 22's operand types)."""
    if TensorIntrin.get(VNNI, allow_missing=True) is not None:
        return

    def desc(a_dtype: str, lanes: int):
        @T.prim_func(s_tir=True)
        def f(A: T.Buffer((STEP,), a_dtype, offset_factor=1), B: T.Buffer((lanes, STEP), "int8", offset_factor=1),
              C: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:
            with T.sblock("root"):
                T.reads(C[0:lanes], A[0:STEP], B[0:lanes, 0:STEP])
                T.writes(C[0:lanes])
                for i, r in T.grid(lanes, STEP):
                    with T.sblock("update"):
                        vi, vr = T.axis.remap("SR", [i, r])
                        C[vi] = C[vi] + T.cast(A[vr], "int32") * T.cast(B[vi, vr], "int32")
        return f

    def impl(a_dtype: str, lanes: int, intrinsic: str):
        """C[lanes] += A[4] . B[lanes, 4] in one LLVM intrinsic: A broadcast to every lane."""
        @T.prim_func(s_tir=True)
        def f(A: T.Buffer((STEP,), a_dtype, offset_factor=1), B: T.Buffer((lanes, STEP), "int8", offset_factor=1),
              C: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:
            with T.sblock("root"):
                T.reads(C[0:lanes], A[0:STEP], B[0:lanes, 0:STEP])
                T.writes(C[0:lanes])
                C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(intrinsic), C.vload([0], dtype=f"int32x{lanes}"),
                    T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], f"{a_dtype}x4"), dtype="int32"), lanes),
                                  dtype=f"{a_dtype}x{lanes * STEP}"),
                    B.vload([0, 0], dtype=f"int8x{lanes * STEP}"), dtype=f"int32x{lanes}")
        return f

    @T.prim_func(s_tir=True)
    def dp4a_desc(A: T.Buffer((STEP,), "int8", offset_factor=1), B: T.Buffer((STEP,), "int8", offset_factor=1),
                  C: T.Buffer((1,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:1], A[0:STEP], B[0:STEP])
            T.writes(C[0:1])
            for r in range(STEP):
                with T.sblock("update"):
                    vr = T.axis.remap("R", [r])
                    C[0] = C[0] + T.cast(A[vr], "int32") * T.cast(B[vr], "int32")

    @T.prim_func(s_tir=True)
    def dp4a(A: T.Buffer((STEP,), "int8", offset_factor=1), B: T.Buffer((STEP,), "int8", offset_factor=1),
             C: T.Buffer((1,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:1], A[0:STEP], B[0:STEP])
            T.writes(C[0:1])
            C[0] = C[0] + T.call_pure_extern("__dp4a", A.vload([0], "int8x4"), B.vload([0], "int8x4"),
                                             T.int32(0), dtype="int32")

    TensorIntrin.register(VNNI, desc("uint8", 16), impl("uint8", 16, "llvm.x86.avx512.vpdpbusd.512"))
    TensorIntrin.register(SDOT, desc("int8", 4), impl("int8", 4, "llvm.aarch64.neon.sdot.v4i32.v16i8"))
    TensorIntrin.register(DP4A, dp4a_desc, dp4a)
