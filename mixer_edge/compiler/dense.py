"""Float32 layers with a constant weight as hand-scheduled kernels on AVX-512 CPUs.

`lower` rewrites every float32 matmul whose weight is a 2-D parameter (X.W, X.W^T, and the token mixing
forms W.X and Y^T.W, which read Y as it is: no transpose kernel) and every patchifying stem convolution into
one kernel,
`fusable_dense_func`: it reads X [..., K] and a weight packed once at build time as [N/16, K, 16] (16 output
channels of each reduction step side by side: one 64-byte vector) and writes the layer's output in the
model's layout, marked fusable (kOutEWiseFusable). FuseOps then fuses the bias, GELU and residual add after
it, and `schedule` (run by int8.schedule_fused, after FuseTIR) computes a register tile (7 rows x 64
channels on S/16's channel MLP) over the whole of K in 28 of AVX-512's 32 vector registers and the fused
epilogue per tile (an input read transposed: over K in blocks whose weights stay in L1).
On Mixer-S/16 it beats MetaSchedule's tuned kernels (the README's "Tuning" section has the figures), and it
needs no tuning: records then only cover what is left (LayerNorms, transposes, the mean).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax
from tvm.target import codegen

from .cpu_schedules import divisor
from .targets import TargetPreset

LANES, COLUMNS = 16, 32  # float32 lanes of a 512-bit vector (a packed weight row); N padded to COLUMNS
ROW_RUN = "mixer_edge.row_run"  # the dense block's annotation: how many rows stay contiguous in the output
K_BLOCKED = "mixer_edge.k_blocked"  # the dense block's annotation: reduce in blocks of K (`schedule`)
L1_WEIGHTS, ROW_BLOCK = 16 << 10, 128  # a K block's weights: half of a 32 KB L1d (a third of 48); rows per task


def applies(preset: TargetPreset) -> bool:
    """Whether `preset` gets these kernels: a CPU target with AVX-512 (32 registers of 16 floats)."""
    if not preset.backend.runs_on_cpu:
        return False
    return "avx512f" in {str(f) for f in codegen.llvm_get_cpu_features(tvm.target.Target(preset.cpu_target))}


def lower(mod, params: dict[str, np.ndarray]):
    """`mod` with its constant-weight float32 matmuls and patch convolutions on `fusable_dense_func` kernels,
    the weight packing lifted into `main_transform_params` (run once at build)."""
    lowering = Lowering(mod, params)
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            lowering.builder_.update_func(gv, lowering.visit_expr(func))
    lowered = relax.transform.DeadCodeElimination(["main"])(lowering.builder_.get())
    return relax.transform.LiftTransformParams()(lowered)


@relax.expr_functor.mutator
class Lowering(relax.PyExprMutator):
    """The rewrite `lower` runs: on the bindings already visited, each layer it takes becomes one kernel call."""

    def __init__(self, mod, params):
        super().__init__(mod)
        self.params, self.kernels = params, {}

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        op = getattr(call.op, "name", "")
        lowered = None
        if op == "relax.divide" and is_scalar_parameter(call.args[1], self.params):
            lowered = times_reciprocal(self.builder_, *call.args)
        elif op == "relax.matmul" and all(_static(arg, "float32") for arg in call.args):
            lowered = self._matmul(call)
        elif op == "relax.nn.conv2d" and all(_static(arg, "float32") for arg in call.args):
            lowered = self._patch_conv(call)
        elif op == "relax.permute_dims" and _static(call.args[0], "float32"):
            lowered = self._transposed_output(call)
        return call if lowered is None else lowered

    def _weight(self, expr):
        """W [N, K] if `expr` is a 2-D parameter used as the right operand of X.W ([K, N]) or its transpose."""
        value = self._bound(expr)
        if _is_permute(value, [1, 0]) and self._parameter(value.args[0]):
            return value.args[0]
        if self._parameter(expr):
            return self.builder_.emit(relax.op.permute_dims(expr, [1, 0]))
        return None

    def _parameter(self, expr) -> bool:
        return isinstance(expr, relax.Var) and expr.name in self.params and expr.ty.ndim == 2

    def _matmul(self, call):
        a, b = call.args
        if a.ty.ndim == 2 and self._parameter(a) and b.ty.ndim >= 2:  # W.X: rows of W mix x's next-to-last axis
            return self._dense(b, TRANSPOSED, a, _last_two_swapped(b.ty.ndim))
        weight = self._weight(b) if b.ty.ndim == 2 and a.ty.ndim >= 2 else None
        return None if weight is None else self._dense(*self._untransposed(a), weight, None)

    def _untransposed(self, x):
        """(y, TRANSPOSED) where `x` is y with its last two axes swapped (a token MLP's input, y^T.W): the kernel
        reads y as it is, and no transpose kernel runs before it; else (x, ROWS)."""
        value = self._bound(x)
        if _is_permute(value, _last_two_swapped(x.ty.ndim)):
            return value.args[0], TRANSPOSED
        return x, ROWS

    def _patch_conv(self, call):
        x, w = call.args
        at = call.attrs
        kernel = static_shape(w)[2:]
        if not self._parameter_4d(w) or [int(s) for s in at.strides] != kernel or any(int(p) for p in at.padding) \
                or int(at.groups) != 1 or any(int(d) != 1 for d in at.dilation) or at.data_layout != "NCHW" \
                or at.kernel_layout != "OIHW" or at.out_dtype not in (None, "", "float32"):
            return None
        b, c, h, wd = static_shape(x)
        (ph, pw), (gh, gw) = kernel, (h // kernel[0], wd // kernel[1])
        if gh * ph != h or gw * pw != wd:
            return None
        weight = self.builder_.emit(relax.op.reshape(w, [static_shape(w)[0], c * ph * pw]))
        return self._dense(x, Patches(c, ph, pw), weight, [0, 3, 1, 2])  # [B, gh, gw, O] -> NCHW

    def _parameter_4d(self, expr) -> bool:
        return isinstance(expr, relax.Var) and expr.name in self.params and expr.ty.ndim == 4

    def _dense(self, x, layout, w_nk, perm):
        """permute_dims(rows(x) . w_nk [N, K]^T, perm) on one fusable kernel, rows(x) as `layout` reads x: x
        [..., K] itself, x [..., K, M] transposed (W.X, y^T.W) or a stem's patches."""
        emit, op = self.builder_.emit, relax.op
        n, k = static_shape(w_nk)
        np_ = round_up(n, COLUMNS)
        padded = emit(op.nn.pad(w_nk, [0, np_ - n, 0, 0])) if np_ != n else w_nk
        packed = emit(op.permute_dims(emit(op.reshape(padded, [np_ // LANES, LANES, k])), [0, 2, 1]))
        return self._kernel_call(Dense(tuple(static_shape(x)), n, tuple(perm or ()), layout), x, packed)

    def _kernel_call(self, dense: Dense, x, packed):
        if dense not in self.kernels:
            name = f"dense_f32_{'x'.join(map(str, dense.x_shape))}x{dense.n}" + ("t" if dense.perm else "")
            func = fusable_dense_func(list(dense.x_shape), dense.n, list(dense.perm) or None, dense.layout)
            self.kernels[dense] = self.builder_.add_func(func, name)
        out_shape = [*dense.layout.lead(list(dense.x_shape)), dense.n]
        out_shape = [out_shape[a] for a in dense.perm] if dense.perm else out_shape
        return relax.call_tir(self.kernels[dense], [x, packed], relax.TensorType(out_shape, "float32"))

    def _transposed_output(self, call):
        """A dense kernel's output, plus a bias per channel or not, with its last two axes swapped (the token MLP's
        fc2 back to [tokens, channels]) as one kernel that writes them swapped: no transpose kernel, and the
        residual add after it fuses into the dense kernel."""
        swap = _last_two_swapped(call.args[0].ty.ndim)
        if not _is_permute(call, swap):
            return None
        value, bias = self._bound(call.args[0]), None
        if _is_op(value, "relax.add") and self._parameter_1d(value.args[1]):
            value, bias = self._bound(value.args[0]), value.args[1]
        kernels = {gv: dense for dense, gv in self.kernels.items()}
        dense = kernels.get(value.args[0]) if _is_op(value, "relax.call_tir") else None
        if dense is None or dense.perm or (bias is not None and static_shape(bias) != [dense.n]):
            return None
        swapped = Dense(dense.x_shape, dense.n, tuple(swap), dense.layout)
        out = self._kernel_call(swapped, *value.args[1].fields)
        if bias is None:
            return out
        return relax.op.add(self.builder_.emit(out), self.builder_.emit(relax.op.reshape(bias, [dense.n, 1])))

    def _bound(self, expr):
        """The value `expr` is bound to (itself if it is not a bound Var)."""
        value = self.lookup_binding(expr) if isinstance(expr, relax.Var) else None
        return expr if value is None else value

    def _parameter_1d(self, expr) -> bool:
        return isinstance(expr, relax.Var) and expr.name in self.params and expr.ty.ndim == 1


@dataclass(frozen=True)
class Dense:
    """One kernel of `fusable_dense_func`: rows(X) . W^T for X of `x_shape` read as `layout` reads it, N = `n`,
    its output permuted by `perm` (empty: as it is)."""

    x_shape: tuple[int, ...]
    n: int
    perm: tuple[int, ...]
    layout: Rows


def _is_op(expr, name: str) -> bool:
    return isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == name


def _is_permute(expr, axes: list[int]) -> bool:
    """Whether `expr` is a permute_dims by `axes` (one without axes reverses them all)."""
    if not _is_op(expr, "relax.permute_dims"):
        return False
    given = expr.attrs.axes
    return [int(a) for a in (range(expr.args[0].ty.ndim)[::-1] if given is None else given)] == axes


def _last_two_swapped(rank: int) -> list[int]:
    """The axes of a transpose of the last two dimensions of a rank-`rank` tensor."""
    return [*range(rank - 2), rank - 1, rank - 2]


@dataclass(frozen=True)
class Rows:
    """X [..., K]: a row per leading index (the layer's own input)."""

    k_blocked = False  # whether `schedule` reduces in blocks of K (class-wide, not a field)

    def lead(self, x_shape: list[int]) -> list[int]:
        return x_shape[:-1]

    def read(self, X, index: list, r):
        return X[(*index, r)]


@dataclass(frozen=True)
class Transposed(Rows):
    """X [..., K, M]: W.X reads its input as it is (no transpose kernel before it). A reduction step's values
    for a tile's rows share a cache line, so the kernel reduces in blocks of K whose weights stay in L1: on
    S/16's token fc1 with its GELU, cold weights, 0.76-0.79x the time of one pass over K."""

    k_blocked = True

    def lead(self, x_shape: list[int]) -> list[int]:
        return [*x_shape[:-2], x_shape[-1]]

    def read(self, X, index: list, r):
        return X[(*index[:-1], r, index[-1])]


@dataclass(frozen=True)
class Patches(Rows):
    """X an NCHW image: row (b, y, x) is the patch at (y, x), K its (channel, row, column) values, read straight
    from the image (no kernel cutting patches first)."""

    channels: int
    height: int
    width: int

    def lead(self, x_shape: list[int]) -> list[int]:
        return [x_shape[0], x_shape[2] // self.height, x_shape[3] // self.width]

    def read(self, X, index: list, r):
        b, y, x = index
        area = self.height * self.width
        return X[b, r // area, y * self.height + r % area // self.width, x * self.width + r % self.width]


ROWS, TRANSPOSED = Rows(), Transposed()


def is_scalar_parameter(expr, params: dict) -> bool:
    """Whether `expr` is a float32 scalar among the model's weights (a scale, GELU's sqrt 2)."""
    return isinstance(expr, relax.Var) and expr.name in params and expr.ty.ndim == 0 and expr.ty.dtype == "float32"


def times_reciprocal(builder, x, scale):
    """x / scale as x * (1 / scale): 1 / scale depends on weights alone, so LiftTransformParams computes it once
    at build, and the kernels multiply instead of divide (the last bit of a product may differ)."""
    return relax.op.multiply(x, builder.emit(relax.op.divide(relax.const(1.0, "float32"), scale)))


def static_shape(expr) -> list[int] | None:
    """The shape of tensor `expr` where every dimension is a constant; else None."""
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None or \
            not all(isinstance(d, tvm.tirx.IntImm) for d in ty.shape.values):
        return None
    return [int(d) for d in ty.shape.values]


def _static(expr, dtype: str) -> bool:
    return static_shape(expr) is not None and expr.ty.dtype == dtype


def fusable_dense_func(x_shape: list[int], n: int, perm: list[int] | None, layout: Rows = ROWS):
    """out = permute_dims(rows(X) . W_packed [N/16, K, 16] as [..., N], perm), float32: `fusable_kernel`'s two
    blocks, rows(X) as `layout` reads them."""
    from tvm import te

    i64 = lambda v: tvm.tirx.IntImm("int64", v)  # noqa: E731
    lead = layout.lead(x_shape)
    k = int(np.prod(x_shape)) // int(np.prod(lead))
    np_ = round_up(n, COLUMNS)
    X = te.placeholder([i64(d) for d in x_shape], "float32", "X")
    W = te.placeholder([i64(np_ // LANES), i64(k), i64(LANES)], "float32", "W")
    return fusable_kernel(X, W, lead, k, n, np_, perm, lambda x, j, r: x * W[j // LANES, r, j % LANES],
                          lambda i, index, r: layout.read(X, index, r), layout.k_blocked)


def fusable_kernel(X, W, lead: list[int], k: int, n: int, np_: int, perm: list[int] | None, product, read,
                   k_blocked: bool = False):
    """A kernel FuseOps fuses the ops after into (kOutEWiseFusable), in two blocks: `dense`, acc [M, np_] with
    acc[i, j] = sum over r < k of product(read(i, index, r), j, r), M = the product of `lead` and index row i
    unflattened over it (annotated: rows per run of the output, and `k_blocked`); and `store`, acc as the
    layer's output [*lead, n] permuted by `perm`.

    Shapes are int64, as Relax's legalized ops have them (for FuseTIR).
    """
    from tvm import te

    i64 = lambda v: tvm.tirx.IntImm("int64", v)  # noqa: E731
    m = int(np.prod(lead))
    r = te.reduce_axis((i64(0), i64(k)), "r")

    def unflatten(i):
        index = []
        for d in reversed(lead):
            index.append(i % d)
            i = i // d
        return index[::-1]

    run = m if perm is None else lead[-1]  # rows that stay one run in the output: a row tile must not cross one
    acc = te.compute((i64(m), i64(np_)), lambda i, j: te.sum(product(read(i, unflatten(i), r), j, r), axis=r),
                     name="dense", attrs={ROW_RUN: run, **({K_BLOCKED: 1} if k_blocked else {})})
    out_shape = [*lead, n]
    inverse = list(range(len(out_shape))) if perm is None else [perm.index(a) for a in range(len(out_shape))]

    def store(*index):
        index = [index[inverse[a]] for a in range(len(out_shape))]  # back to [..., N]
        flat = 0
        for v, d in zip(index[:-1], lead):
            flat = flat * d + v
        return acc[flat, index[-1]]

    out = te.compute([i64(out_shape[a]) for a in (perm or range(len(out_shape)))], store, name="store")
    func = te.create_prim_func([X, W, out]).without_attr("global_symbol")
    return func.with_attr({"tirx.noalias": True, "op_pattern": 4})  # kOutEWiseFusable


@dataclass(frozen=True)
class RegisterTiles:
    """The register tiles a CPU's vector registers hold: at most `rows` rows, `vectors` vectors of 16 channels
    (the weights loaded per reduction step) and `accumulators` accumulator vectors."""

    rows: int
    vectors: int
    accumulators: int

    def fit(self, m: int, vectors: int) -> tuple[int, int]:
        """(rows, vectors) of the tile over m rows and `vectors` vectors of channels: dividing both, within the
        limits; of those, the most accumulated per load of a reduction step (a broadcast per row, a load per
        vector), then the squarest."""
        def merit(tile):
            rows, vecs = tile
            return rows * vecs / (rows + vecs), -abs(rows - vecs), rows

        return max(((r, v) for r in range(1, min(m, self.rows) + 1) if m % r == 0
                    for v in range(1, min(vectors, self.vectors, self.accumulators // r) + 1) if vectors % v == 0),
                   key=merit)


# 28 of AVX-512's 32 registers accumulate. S/16's channel MLP on 2 cores here, 7 x 4 against 14 x 2, interleaved:
# fc1 0.92-0.99x the time, fc2 0.78-0.90x (fewer loads per multiply-add); 14 x 2 ran 1.09x as fast as 7 x 2.
FLOAT_TILES = RegisterTiles(rows=14, vectors=4, accumulators=28)


def schedule(sch, block, epilogue) -> None:
    """Register tiles (`FLOAT_TILES`) in parallel, each accumulated over the whole of K (per step a broadcast
    of X per row and a 16-float load of W per vector), then `epilogue` (the fused ops after it, or the store)
    computed on the tile. A `K_BLOCKED` block instead runs a parallel task per block of up to ROW_BLOCK rows
    of a column strip, over K in blocks whose weights fit in L1 (each block's sums kept between them), its
    epilogue computed on the whole task."""
    i, j, r = sch.get_loops(block)
    annotations = sch.get(block).annotations
    run = int(annotations.get(ROW_RUN, int(sch.get(i).extent)))
    rows, vectors = FLOAT_TILES.fit(run, int(sch.get(j).extent) // LANES)
    io, ii = sch.split(i, [None, rows])
    jo, jm, ji = sch.split(j, [None, vectors, LANES])
    if annotations.get(K_BLOCKED):
        k, fits = int(sch.get(r).extent), L1_WEIGHTS // (vectors * LANES * 4)
        depth = divisor(k, range(fits, 0, -1))  # the largest that fits
        depth = depth if 2 * depth >= min(k, fits) else k  # no divisor near it (a prime K): one block
        ro, ri = sch.split(r, [None, depth])
        task, ti = sch.split(io, [None, divisor(run // rows, range(ROW_BLOCK // rows, 0, -1))])
        sch.reorder(jo, task, ro, ti, ri, ii, jm, ji)
        reduce = ro
    else:
        sch.reorder(jo, io, r, ii, jm, ji)
        task, reduce = io, r
    tile = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(tile, task)
    sch.reverse_compute_at(epilogue, task)
    sch.compute_inline(tile)  # the epilogue reads the sums
    sch.parallel(sch.fuse(jo, task))
    sch.vectorize(ji)
    init = sch.decompose_reduction(block, reduce)
    sch.unroll(ii)
    sch.unroll(jm)
    sch.vectorize(sch.get_loops(init)[-1])
    vectorize_innermost(sch, epilogue)


def vectorize_innermost(sch, epilogue) -> None:
    """The epilogue's innermost loop vectorized, unless a padded tile left it a predicate (then scalar)."""
    try:
        sch.vectorize(sch.get_loops(epilogue)[-1])
    except (RuntimeError, ValueError):  # a schedule primitive refused
        pass


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
