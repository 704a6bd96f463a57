"""Default CPU schedules for the tasks a tuning database has no record for (DLight rules).

Without a schedule a fused TIR function compiles to a naive serial loop nest. `schedule_untuned` gives
every unscheduled function of a Relax program a reasonable one: register-tiled matmuls (and other
single reductions: the patch-embedding conv, the mean) with their epilogues fused in, row-parallel
norms, and parallel vectorized elementwise and layout tasks. Anything left at least runs its outermost
spatial loop in parallel. A rule that fails leaves the function to the next one: never the build.
"""

from __future__ import annotations

import re

from tvm import DataType, s_tir, tirx
from tvm.s_tir.dlight import ApplyDefaultSchedule
from tvm.s_tir.dlight.analysis import collect_vars_used_in_prim_expr, get_root_block, normalize_prim_func
from tvm.s_tir.dlight.base import get_extent, try_inline_contiguous_spatial
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.s_tir.stmt import SBlockRealize
from tvm.sym import detect_linear_equation
from tvm.target.codegen import target_has_features


def schedule_untuned(mod, target):
    """`mod` with a default CPU schedule on every PrimFunc not already scheduled (attribute
    `tirx.is_scheduled`: tuned, or a hand-written kernel), for the TVM `target` of the build."""
    with target:
        return ApplyDefaultSchedule(*_rules())(mod.clone())  # the pass writes into the module it is given


def default_schedule(func, target):
    """The schedule (with its trace) `schedule_untuned` gives PrimFunc `func`, or None where no rule takes it."""
    with target:
        return next((sch for rule in _rules() if (sch := rule.apply(func, target, False)) is not None), None)


def _rules():
    """The rules, in the order they are tried."""
    return Matmul(), Norm(), Injective(), Fallback()


def vector_lanes(target, dtype: str = "float32") -> int:
    """How many `dtype` elements a SIMD register of `target` holds: AVX-512 16 fp32, AVX2 8, else (NEON) 4."""
    bits = 512 if target_has_features("avx512f", target) else 256 if target_has_features("avx2", target) else 128
    return bits // DataType(dtype).bits


class Rule(CPUScheduleRule):
    """A CPU rule whose `schedule` may raise or return None: both leave the function to the next rule."""

    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        try:
            return self.schedule(s_tir.Schedule(func), target)
        except Exception:  # pylint: disable=broad-except
            return None

    def schedule(self, sch, target):
        raise NotImplementedError


def divisor(extent: int, choices) -> int:
    """The first of `choices` that divides `extent` (1 if none)."""
    return next((c for c in choices if extent % c == 0), 1)


def _contiguous(sch, block, var) -> bool:
    """Whether every buffer `block` reads or writes moves by at most one element per step of `var`."""
    stmt = sch.get(block)
    for region in [*stmt.reads, *stmt.writes]:
        if not region.region:  # a scalar
            continue
        *outer, last = [r.min for r in region.region]
        if any(_uses(e, var) for e in outer):
            return False
        coeff = detect_linear_equation(last, [var])
        if not coeff or not isinstance(coeff[0], tirx.IntImm) or coeff[0].value not in (0, 1):
            return False
    return True


def _uses(expr, var) -> bool:
    """Whether `expr` reads `var`."""
    return any(v.same_as(var) for v in collect_vars_used_in_prim_expr(expr))


def _spatial(sch, loop) -> bool:
    """Whether `loop` (around a single block) steps only spatial iterators of its block."""
    realize, var = sch.get(loop), sch.get(loop).loop_var
    while not isinstance(realize, SBlockRealize):
        realize = realize.body
    return all(iv.iter_type == tirx.IterVar.DataPar
               for iv, value in zip(realize.block.iter_vars, realize.iter_values) if _uses(value, var))


class Matmul(Rule):
    """One reduction block (matmul, batched matmul, conv, mean), maybe with injective blocks inlined before
    it and one after (bias, GELU, residual add): register tiles of rows x vectors of output, the reduction
    inside a tile accumulated in registers, the epilogue computed per tile, tiles in parallel.

    The vectorized axis is the output's innermost one; when the inputs are not contiguous along it (the
    stride-16 patch conv), the innermost reduction axis is split off into vector lanes (rfactor) instead.
    """

    def schedule(self, sch, target):
        blocks = try_inline_contiguous_spatial(sch, normalize_prim_func(sch))
        if not blocks or len(blocks) > 2 or not re.fullmatch("S+R+", blocks[0].dom_kind()):
            return None
        if len(blocks) == 2 and not blocks[1].is_injective():
            return None
        block, lanes = blocks[0].block_rv, vector_lanes(target)
        epilogue = blocks[1].block_rv if len(blocks) == 2 else None
        iters = sch.get(block).iter_vars
        spatial = blocks[0].dom_kind().count("S")
        if _contiguous(sch, block, iters[spatial - 1].var):
            _tile(sch, block, epilogue, spatial, lanes)
            return sch
        loops = sch.get_loops(block)
        if get_extent(sch, loops[-1]) % lanes or not _contiguous(sch, block, iters[-1].var):
            return None
        _, lane = sch.split(loops[-1], [None, lanes])
        partial = sch.rfactor(lane, factor_axis=len(sch.get(block).writes[0].region))  # lane sums, innermost
        loops = sch.get_loops(partial)
        sch.reorder(*loops[:spatial], loops[-1], *loops[spatial:-1])
        _tile(sch, partial, None, spatial + 1, lanes, registers=False)
        sch.parallel(sch.fuse(*sch.get_loops(block)[:spatial]))  # the lanes summed
        if epilogue is not None:
            _elementwise(sch, epilogue, lanes)
        return sch


def _tile(sch, block, epilogue, spatial: int, lanes: int, registers: bool = True) -> None:
    """Tile `block` (its first `spatial` loops spatial, the rest reduction) into MR x NR register tiles, accumulated
    in a local tile (`registers`) or in place (the lane sums of an rfactor: over several fused spatial axes the
    local tile's bounds are not provable, and it would be allocated whole, per thread, on the stack)."""
    loops = sch.get_loops(block)
    n = get_extent(sch, loops[spatial - 1])
    panels = []  # blocks that copy B[k, j]'s columns of a column of tiles together, contiguous
    if n % lanes and n > lanes:  # columns padded to whole vectors (token-mixing fc2: 196 -> 224)
        sch.pad_einsum(block, [1] * (spatial - 1) + [2 * lanes] + [1] * (len(loops) - spatial))
        (copy,) = sch.get_consumers(block)  # the padded result copied out: the epilogue, or fused into it
        if epilogue is None:
            epilogue = copy
        else:
            sch.compute_inline(copy)
        panels, loops = sch.get_producers(block), sch.get_loops(block)
    if not panels:
        iters = [iv.var for iv in sch.get(block).iter_vars]
        b_reads = [i for i, r in enumerate(sch.get(block).reads)  # read along the columns, not the rows
                   if any(_uses(e.min, iters[spatial - 1]) for e in r.region)
                   and not any(_uses(e.min, v) for e in r.region for v in iters[: spatial - 1])]
        panels = [sch.cache_read(block, b_reads[0], "global")] if len(b_reads) == 1 else []
    # MR divides the innermost row axis, so that a tile's rows are contiguous in the output
    mr = divisor(get_extent(sch, loops[spatial - 2]) if spatial > 1 else 1, (8, 7, 6, 5, 4, 3, 2))
    rows = sch.fuse(*loops[: spatial - 1]) if spatial > 1 else sch.add_unit_loop(loops[0])
    col, red = loops[spatial - 1], sch.fuse(*loops[spatial:])
    nr = divisor(get_extent(sch, col), (2 * lanes, lanes, lanes // 2, lanes // 4, 2))
    vec = min(nr, lanes)
    i_o, i_i = sch.split(rows, [None, mr])
    j_o, j_v, j_l = sch.split(col, [None, nr // vec, vec])
    sch.reorder(j_o, i_o, red, i_i, j_v, j_l)
    if panels:  # the columns of tiles in parallel, each with its panels
        sch.parallel(j_o)
        for panel in panels:
            sch.compute_at(panel, j_o)
            _vectorize_inner(sch, sch.get_loops(panel)[-1], lanes)
        tile, depth = i_o, 2
    else:
        tile, depth = sch.fuse(j_o, i_o), 1
        sch.parallel(tile)
    sch.unroll(i_i)
    sch.unroll(j_v)
    sch.vectorize(j_l)
    out = sch.cache_write(block, 0, "local") if registers else epilogue
    if out is not None:
        sch.reverse_compute_at(out, tile)
    if registers and epilogue is not None:
        sch.compute_inline(out)
        out = epilogue
        sch.reverse_compute_at(out, tile)
    if out is not None:
        *unrolled, inner = sch.get_loops(out)[depth:]
        for loop in unrolled:
            sch.unroll(loop)
        _vectorize_inner(sch, inner, lanes)
    sch.decompose_reduction(block, red)  # last: vectorize refuses a loop over a decomposed update


def _vectorize_inner(sch, loop, lanes: int) -> None:
    """`loop` vectorized `lanes` at a time (whole, if shorter); left alone if `lanes` leaves a tail."""
    extent = get_extent(sch, loop)
    if extent > lanes and extent % lanes == 0:
        loop = sch.split(loop, [None, lanes])[1]
    if extent % lanes == 0 or extent < lanes:
        sch.vectorize(loop)


def _elementwise(sch, block, lanes: int) -> None:
    """All of `block`'s loops fused, the outer part parallel, the inner vectorized. A transpose (reads not
    contiguous along the innermost loop) goes by square tiles of about `lanes` x `lanes` instead."""
    loops = sch.get_loops(block)
    if len(loops) > 1 and not _contiguous(sch, block, sch.get(block).iter_vars[-1].var):
        sizes = [divisor(get_extent(sch, loop), (lanes, lanes // 2, lanes // 4)) for loop in loops[-2:]]
        (a_o, a_i), (b_o, b_i) = (sch.split(loop, [None, size]) for loop, size in zip(loops[-2:], sizes))
        sch.reorder(a_o, b_o, a_i, b_i)
        sch.parallel(sch.fuse(*loops[:-2], a_o, b_o))
        sch.vectorize(b_i)
        return
    loop = sch.fuse(*loops)
    extent = get_extent(sch, loop)
    if extent % lanes == 0 and extent > lanes:
        outer, inner = sch.split(loop, [None, lanes])
        sch.vectorize(inner)
        loop = outer
    sch.parallel(loop)


class Norm(Rule):
    """Reductions along rows with elementwise work around them (LayerNorm, softmax): one parallel loop over
    the rows, each reduction summed in vector lanes first (rfactor), the elementwise blocks vectorized."""

    def schedule(self, sch, target):
        blocks = try_inline_contiguous_spatial(sch, normalize_prim_func(sch))
        if not blocks or not blocks[-1].is_injective() or all(b.is_injective() for b in blocks):
            return None
        rows = min(len(b.dom_kind()) - len(b.dom_kind().lstrip("S")) for b in blocks)
        if not rows or not all(re.fullmatch("S+R?", b.dom_kind()) for b in blocks):
            return None
        lanes = vector_lanes(target)
        for b in blocks:
            loop, var = sch.get_loops(b.block_rv)[-1], sch.get(b.block_rv).iter_vars[-1].var
            if not b.is_injective() and get_extent(sch, loop) % lanes == 0 and _contiguous(sch, b.block_rv, var):
                sch.rfactor(sch.split(loop, [None, lanes])[1], factor_axis=len(sch.get(b.block_rv).writes[0].region))
        row = sch.fuse(*sch.get_loops(blocks[-1].block_rv)[:rows])
        sch.parallel(row)
        for block in reversed(sch.get_child_blocks(get_root_block(sch))[:-1]):
            sch.compute_at(block, row)
        for block in sch.get_child_blocks(row):  # spatial loops inside: elementwise, or lanes of partial sums
            inner = sch.get_loops(block)[1:]
            spatial = [loop for loop in inner if _spatial(sch, loop)]
            if spatial:
                sch.reorder(*[loop for loop in inner if not _spatial(sch, loop)], *spatial)
                _vectorize_inner(sch, spatial[-1], lanes)
        return sch


class Injective(Rule):
    """Elementwise, transpose, reshape and (de)quantize tasks: one loop nest per block that cannot be
    inlined, fused, parallel outside and vectorized inside."""

    def schedule(self, sch, target):
        blocks = try_inline_contiguous_spatial(sch, normalize_prim_func(sch))
        if not blocks or not all(b.is_injective() for b in blocks):
            return None
        for block in blocks:
            _elementwise(sch, block.block_rv, vector_lanes(target))
        return sch


class Fallback(Rule):
    """Anything else: the outermost loop of each top-level block parallel where it is spatial."""

    def schedule(self, sch, target):
        for block in sch.get_child_blocks(get_root_block(sch)):
            try:
                sch.parallel(sch.get_loops(block)[0])
            except Exception:  # pylint: disable=broad-except
                continue
        return sch
