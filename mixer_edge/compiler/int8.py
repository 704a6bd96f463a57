"""Integer lowering for `--precision int8`: QDQ matmuls become int8 x int8 -> int32 kernels.

A QDQ ONNX (quant/qdq.py, or any with the same pattern) imports into Relax as float math:
`matmul(dequantize(x_q, s_x, z_x), dequantize(W_q, s_w, 0))`. `lower` rewrites each such matmul
(token- and channel-mixing MLPs, head; W.X with the weight on the left too) and each patchifying stem
convolution into

    acc = x_q' . W_q                        int32; a hand-scheduled kernel on the target's dot product
    y   = (acc - (z_x + o) * colsum(W_q)) * (s_x * s_w)          float; fused with bias, GELU, next quantize

where x_q' = x_q + o (o = 128 where the instruction wants unsigned activations, as x86 VNNI does).
Weights are packed `[N/16, K/4, 16, 4]` (16 output channels x 4 reduction steps per instruction).
The packing, column sums and scale products depend on weights only, so LiftTransformParams moves
them into `main_transform_params`, which the build runs once on the host. Scales and zero points
stay runtime tensors. LayerNorm, GELU and the residual adds stay float.

The kernels carry `tirx.is_scheduled`: the default pipelines, DLight and MetaSchedule leave them as
they are, and tuning spends its trials on the float epilogues around them.
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
from .targets import TargetPreset

LANES, STEP = 16, 4  # output channels and reduction steps per packed weight tile


@dataclass(frozen=True)
class DotProduct:
    """How a target multiplies int8: the instruction, and what its activations must be."""

    name: str  # vnni, sdot, dp4a, or plain (no dot-product instruction: LLVM's vectorizer)
    activation: str  # uint8 or int8

    @property
    def offset(self) -> int:
        return 128 if self.activation == "uint8" else 0


DOT_PRODUCTS = {"vnni": DotProduct("vnni", "uint8"), "sdot": DotProduct("sdot", "int8"),
                "dp4a": DotProduct("dp4a", "int8"), "plain": DotProduct("plain", "int8")}
# The first CPU feature (LLVM name) the target has picks the instruction (GPU backends name theirs).
CPU_DOT_PRODUCT = (("avx512vnni", "vnni"), ("dotprod", "sdot"))


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

    # -- matching ------------------------------------------------------------------------
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
        if weight_left:  # rows of W mix the next-to-last axis of x: [..., k, c] -> [..., c, k], back after
            if q.ty.ndim < 2:
                return "its input has fewer than 2 axes"
            swap = [*range(q.ty.ndim - 2), q.ty.ndim - 1, q.ty.ndim - 2]
            q = emit(op.permute_dims(q, swap))
        shape = _shape(q)
        x2 = emit(op.reshape(q, [int(np.prod(shape[:-1])), shape[-1]]))
        y = op.reshape(self._int8_dense(x2, *weight, s_x, z_x), [*shape[:-1], -1])
        return op.permute_dims(emit(y), swap) if weight_left else y

    def _patch_conv(self, call):
        x, w = call.args
        a = call.attrs
        kernel = _shape(w)[2:]
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
        b, c, h, wd = _shape(q)
        (ph, pw), (gh, gw) = kernel, (h // kernel[0], wd // kernel[1])
        if gh * ph != h or gw * pw != wd:
            return "its patches do not tile the image"
        emit, op = self.builder_.emit, relax.op
        patches = emit(op.permute_dims(emit(op.reshape(q, [b, c, gh, ph, gw, pw])), [0, 2, 4, 1, 3, 5]))
        x2 = emit(op.reshape(patches, [b * gh * gw, c * ph * pw]))
        w_q, s_w = weight
        w2 = emit(op.reshape(w_q, [_shape(w_q)[0], c * ph * pw]))
        y = emit(op.reshape(self._int8_dense(x2, w2, s_w, s_x, z_x), [b, gh, gw, -1]))
        return op.permute_dims(y, [0, 3, 1, 2])

    # -- rewriting -----------------------------------------------------------------------
    def _int8_dense(self, x_q, w_q, s_w, s_x, z_x):
        """float32 [M, N] = dequantize(x_q [M, K]) @ dequantize(w_q [N, K]).T, computed in int32."""
        emit, op = self.builder_.emit, relax.op
        (m, k), n = _shape(x_q), _shape(w_q)[0]
        kp, np_ = -(-k // STEP) * STEP, -(-n // LANES) * LANES
        offset = relax.const(self.dot.offset, "int32")
        if self.dot.offset:
            x_q = emit(op.astype(emit(op.add(emit(op.astype(x_q, "int32")), offset)), "uint8"))
        if kp != k:
            x_q = emit(op.nn.pad(x_q, [0, 0, 0, kp - k]))
        packed = emit(op.nn.pad(w_q, [0, np_ - n, 0, kp - k])) if (np_, kp) != (n, k) else w_q
        packed = emit(op.permute_dims(emit(op.reshape(packed, [np_ // LANES, LANES, kp // STEP, STEP])), [0, 2, 1, 3]))
        acc = emit(relax.call_tir(self._kernel(m, kp, np_), [x_q, packed], relax.TensorType([m, np_], "int32")))
        if np_ != n:
            acc = emit(op.strided_slice(acc, axes=[1], begin=[0], end=[n]))
        colsum = emit(op.sum(emit(op.astype(w_q, "int32")), axis=[1]))
        zero = emit(op.add(emit(op.astype(z_x, "int32")), offset))
        centred = emit(op.subtract(acc, emit(op.multiply(zero, colsum))))
        return emit(op.multiply(emit(op.astype(centred, "float32")), emit(op.multiply(s_x, s_w))))

    def _kernel(self, m: int, k: int, n: int):
        key = (m, k, n)
        if key not in self.kernels:
            func = schedule(dense_func(m, k, n, self.dot.activation), self.dot)
            self.kernels[key] = self.builder_.add_func(func, f"int8_dense_{self.dot.name}_{m}x{k}x{n}")
        return self.kernels[key]


def _shape(expr) -> list[int]:
    return [int(d) for d in expr.ty.shape.values]


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


def _divisor(n: int, preferred: tuple[int, ...]) -> int:
    return next((d for d in preferred if n % d == 0), 1)


def schedule(func, dot: DotProduct):
    """`func` (dense_func) scheduled for `dot`'s instruction; marked scheduled."""
    sch = s_tir.Schedule(func)
    {"vnni": _schedule_cpu, "sdot": _schedule_cpu, "plain": _schedule_cpu, "dp4a": _schedule_dp4a}[dot.name](sch, dot)
    return sch.mod["main"].without_attr("global_symbol").with_attr("tirx.is_scheduled", True)


def _schedule_cpu(sch, dot: DotProduct) -> None:
    """Rows x 16-channel tiles in parallel; per reduction step of 4, a register tile of rows x 32 channels.

    VNNI does 16 channels per instruction, sdot 4 (so 16 = 4 x sdot); without a dot product the
    innermost 16 channels are vectorized and LLVM widens the multiplies.
    """
    block = sch.get_sblock("dense")
    i, j, r = sch.get_loops(block)
    m, n = (int(sch.get(loop).extent) for loop in (i, j))
    io, ii = sch.split(i, [None, _divisor(m, (4, 7, 6, 5, 3, 2))])
    jo, jm, ji = sch.split(j, [None, _divisor(n // LANES, (2,)), LANES])
    ro, ri = sch.split(r, [None, STEP])
    sch.reorder(jo, io, ro, ii, jm, ji, ri)
    out = sch.cache_write(block, 0, "global")
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
    sch.vectorize(sch.get_loops(out)[-1])


def _schedule_dp4a(sch, dot: DotProduct) -> None:
    """One thread per output (16 channels x up to 8 rows a block); dp4a over each 4-step of K."""
    block = sch.get_sblock("dense")
    i, j, r = sch.get_loops(block)
    m = int(sch.get(i).extent)
    io, ii = sch.split(i, [None, _divisor(m, (8, 4, 7, 6, 5, 3, 2))])
    jo, ji = sch.split(j, [None, LANES])
    ro, ri = sch.split(r, [None, STEP])
    sch.reorder(io, jo, ii, ji, ro, ri)
    out = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(out, ji)
    sch.bind(sch.fuse(io, jo), "blockIdx.x")
    sch.bind(sch.fuse(ii, ji), "threadIdx.x")
    sch.decompose_reduction(block, ro)
    sch.tensorize(ri, DP4A)


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
