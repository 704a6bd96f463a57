"""Vulkan through WebGPU: TVM's WebGPU code generator writes the kernels (WGSL), we write the plan.

The PyPI TVM wheel has no Vulkan code generator and no Vulkan runtime, but it has the WebGPU code
generator, which emits WGSL with the same DLight GPU schedules. wgpu-native runs WGSL on Vulkan
(and Metal, D3D12). For a static-shape model the host side is a fixed sequence of allocations and
kernel launches, so instead of a host library we record that sequence as data ("the program"):

- from the lowered Relax `main`: storage allocations, tensor views, reshapes, PrimFunc calls;
- from each PrimFunc's lowered host code: the kernels it launches (`call_ffi_kernel`), which of
  its arguments each kernel binds, its scalar arguments and its grid size (constants here).

`mixer_edge.vulkan` replays the program with wgpu, weights and intermediates resident on the GPU
(`vulkan.Program` is the file's schema); the graph's constants travel in it as `constant` steps.
Before lowering, `for_wgsl` makes any Mixer's graph fit WGSL: TVM names each kernel's buffers after
`main`'s variables, which carry the ONNX graph's names (e.g. `2.0.fn.3.weight` for a model built as an
nn.Sequential), so each is renamed by one function, `wgsl_identifier`; and WGSL has no 64-bit
integers, so int64 weights, constants and index arithmetic (a class token's Gather) become int32.
"""

from __future__ import annotations

import base64
import re

import numpy as np

from ..errors import MixerEdgeError, reason
from ..vulkan import PROGRAM_FORMAT, STORABLE, STORED_AS, stored
from . import launch_plan

# WGSL's keywords and reserved words (W3C WGSL, "Keyword and Reserved Word Summary"): never identifiers; and its
# predeclared types, which a declaration of the same name would shadow (`array<f32>` needs both).
WGSL_RESERVED = frozenset("""
alias break case const const_assert continue continuing default diagnostic discard else enable false fn for if let
loop override requires return struct switch true var while
NULL Self abstract active alignas alignof as asm asm_fragment async attribute auto await become binding_array cast
catch class co_await co_return co_yield coherent column_major common compile compile_fragment concept const_cast
consteval constexpr constinit crate debugger decltype delete demote demote_to_helper do dynamic_cast enum explicit
export extends extern external fallthrough filter final finally friend from fxgroup get goto groupshared highp impl
implements import inline instanceof interface layout lowp macro macro_rules match mediump meta mod module move mut
mutable namespace new nil noexcept noinline nointerpolation noperspective null nullptr of operator package
packoffset partition pass patch pixelfragment precise precision premerge priv protected pub public readonly ref
regardless register reinterpret_cast require resource restrict self set shared sizeof smooth snorm static
static_assert static_cast std subroutine super target template this thread_local throw trait try type typedef typeid
typename typeof union unless unorm unsafe unsized use using varying virtual volatile wgsl where with writeonly yield
array atomic bool f16 f32 i32 u32 ptr sampler sampler_comparison texture_1d texture_2d texture_2d_array texture_3d
texture_cube texture_cube_array texture_multisampled_2d texture_external texture_storage_1d texture_storage_2d
texture_storage_2d_array texture_storage_3d texture_depth_2d texture_depth_2d_array texture_depth_cube
texture_depth_cube_array texture_depth_multisampled_2d
""".split()) | {f"vec{n}{t}" for n in "234" for t in ("", "i", "u", "f", "h")} | \
    {f"mat{c}x{r}{t}" for c in "234" for r in "234" for t in ("", "f", "h")}
_WIDE = ("int64", "uint64")  # narrowed to 32 bits: computed on as such (the other STORED_AS types are cast back)


def wgsl_launch(record: dict) -> dict:
    """A launch_plan.kernel_launches record as program.json has it: the buffers it binds, its scalars (int32 and
    float32: WGSL has no 64-bit integers, and for_wgsl narrowed them) and its grid (WGSL fixes the workgroup size)."""
    return {"kernel": record["kernel"], "buffers": [k for kind, k in record["params"] if kind == "buffer"],
            "scalars": [("f32" if kind == "f32" else "i32", v) for kind, v in record["params"] if kind != "buffer"],
            "grid": record["grid"]}


def split_wgsl(source: str) -> dict[str, str]:
    """TVM emits every kernel into one text, each after a `// Function: NAME` header."""
    parts = re.split(r"^// Function: (\w+)\n//-+\n", source, flags=re.M)
    return {name: body for name, body in zip(parts[1::2], parts[2::2]) if body.strip()}


def wgsl_identifier(name: str, taken: set[str]) -> str:
    """`name` as a WGSL identifier not in `taken` (which it joins): other characters become `_`, a leading
    digit or `__` (reserved) or a reserved word gets a `v_` prefix, a clash a numeric suffix."""
    ident = re.sub(r"[^A-Za-z0-9_]", "_", name)
    if not re.match(r"[A-Za-z]|_[A-Za-z0-9]", ident) or ident in WGSL_RESERVED:
        ident = "v_" + ident
    unique, n = ident, 2
    while unique in taken:
        unique, n = f"{ident}_{n}", n + 1
    taken.add(unique)
    return unique


def _rewriter(mod, params):
    """The mutator `for_wgsl` runs over `main` (see there)."""
    from tvm import relax

    @relax.expr_functor.mutator
    class ForWgsl(relax.PyExprMutator):
        def __init__(self):
            super().__init__(mod)
            self.taken: set[str] = set()

        def _define(self, var):
            ty = var.ty
            if var in params and str(getattr(ty, "dtype", "")) in _WIDE:
                ty = relax.TensorType(ty.shape, STORED_AS[str(ty.dtype)])  # a weight: `vulkan.stored` narrows it
            name = wgsl_identifier(str(var.name), self.taken)
            if name == str(var.name) and ty.same_as(var.ty):
                return var
            new = type(var)(name, ty)
            self.set_var_remap(var, new)
            return new

        def visit_var_def_(self, var):
            return self._define(var)

        def visit_dataflow_var_def_(self, var):
            return self._define(var)

        def visit_generic_const_(self, const):
            if str(const.ty.dtype) not in _WIDE:
                return const
            return relax.const(stored(const.value.numpy(), "a constant"))

    return ForWgsl()


def _stored_params(main):
    """`main` taking its bool and 8- or 16-bit integer parameters (e.g. a comparison of weights that a float16
    build precomputed) as the 32-bit ones `vulkan.stored` uploads, cast back where they are used."""
    from tvm import relax

    params, casts = [], {}
    for param in main.params:
        dtype = str(getattr(param.ty, "dtype", ""))
        if dtype in STORED_AS and dtype not in _WIDE:
            wide = relax.Var(param.name, relax.TensorType(param.ty.shape, STORED_AS[dtype]))
            casts[param] = relax.BlockBuilder().normalize(relax.op.astype(wide, dtype))
            param = wide
        params.append(param)
    if not casts:
        return main
    bound = main.bind_params(casts)
    return relax.Function(params, bound.body, bound.ret_ty, bound.is_pure, main.attrs, main.span)


def _op_name(value) -> str:
    op = getattr(value, "op", None)
    return str(getattr(op, "name", None) or getattr(op, "name_hint", None) or type(value).__name__)


def for_wgsl(mod):
    """`mod` as the WGSL route needs it (the caller keeps its module):

    - shape arithmetic folded away (static shapes: e.g. the int64 `shape_to_tensor` of a class token's Gather);
    - every variable of `main` renamed by `wgsl_identifier`: TVM names each kernel's buffers after them, and they
      carry the ONNX graph's names (e.g. `2.0.fn.3.weight` from an nn.Sequential), which WGSL may not take;
    - 64-bit integers narrowed to 32 bits (WGSL has none): int64 weights (`vulkan.stored` uploads them as int32),
      int64 constants and so whatever computes on them, such as a Gather's index. Tensor dims are far below 2^31,
      so indices fit; a value that does not, or an operator that still computes int64 or float64, is refused in
      one line naming it;
    - bool and 8- or 16-bit integer weights taken as 32-bit ones (see `_stored_params`)."""
    from tvm import ir, relax

    mod = relax.transform.FoldConstant()(mod)
    main = _stored_params(mod["main"])
    for binding in (b for block in main.body.blocks for b in block.bindings):
        args = [a for arg in getattr(binding.value, "args", ()) for a in getattr(arg, "fields", [arg])]  # tuples too
        for arg in args:
            if isinstance(arg, ir.GenericConst) and str(arg.ty.dtype) in _WIDE:
                stored(arg.value.numpy(), f"operator {_op_name(binding.value)}'s constant")
    try:
        func = _rewriter(mod, set(main.params)).visit_expr(main)
    except Exception as exc:  # type inference over the narrowed graph: an operator that mixes 32 and 64 bits
        raise MixerEdgeError(f"the WGSL route cannot narrow this model's 64-bit integers to 32 bits "
                             f"({reason(exc, last=True)}): build it for a CPU or CUDA target") from exc
    for binding in (b for block in func.body.blocks for b in block.bindings):
        dtype = str(getattr(binding.var.ty, "dtype", ""))
        if dtype in ("int64", "uint64", "float64"):
            raise MixerEdgeError(f"operator {_op_name(binding.value)} computes {dtype}, which WGSL cannot hold (it "
                                 "has no 64-bit types): build for a CPU or CUDA target, or export the model so it "
                                 "computes that in 32 bits")
    mod = mod.clone()
    mod.update_func(mod.get_global_var("main"), func)
    return mod


def _constant_step(const, out: int) -> dict:
    """A constant of the lowered graph as a `constant` step: its little-endian bytes, base64."""
    array = const.value.numpy()
    if str(array.dtype) not in STORABLE:
        raise MixerEdgeError(f"the lowered graph passes a {array.dtype} constant {list(array.shape)} to a kernel, "
                             "which WGSL storage cannot hold: build for a CPU or CUDA target")
    data = np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes()
    return {"op": "constant", "out": out, "dtype": str(array.dtype), "shape": list(array.shape),
            "data": base64.b64encode(data).decode("ascii")}


def program(mod, target) -> dict:
    """Lower a static-shape Relax module for WebGPU into a replayable program (kernels + plan)."""
    import tvm

    lowered, host, device_mod, device_target = launch_plan.lower(for_wgsl(mod), target, "WGSL")
    try:
        wgsl = tvm.get_global_func("target.build.webgpu")(device_mod, device_target)
    except Exception as exc:
        raise MixerEdgeError(f"TVM could not generate WGSL for the model ({reason(exc, last=True)}): build it for a "
                             "CPU or CUDA target, or report it with the model") from exc
    kernels = split_wgsl(str(wgsl.inspect_source()))
    steps, output = launch_plan.steps(lowered, host, wgsl_launch, _constant_step, "WebGPU")
    used = launch_plan.kernels_used(steps)
    missing = used - set(kernels)
    if missing:
        raise MixerEdgeError(f"TVM emitted no WGSL for {', '.join(sorted(missing))}")
    return {"format": PROGRAM_FORMAT, "steps": steps, "output": output,
            "kernels": {name: kernels[name] for name in sorted(used)}}


def dispatch_count(prog: dict) -> int:
    return sum(len(step["launches"]) for step in prog["steps"] if step["op"] == "call")

