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
_SKIPPED_PACKED = {"vm.builtin.check_tensor_info", "vm.builtin.match_shape", "vm.builtin.null_value"}


def _children(node) -> list:
    """The sub-nodes of a TIR statement or expression (the fields the lowered host code uses)."""
    out = []
    for field in ("seq", "body", "value", "args", "condition", "then_case", "else_case", "a", "b",
                  "true_value", "false_value", "message", "extent", "min"):
        child = getattr(node, field, None)
        if child is None or isinstance(child, (str, int, float)):
            continue
        if hasattr(child, "__len__") and not hasattr(child, "dtype"):  # an Array of nodes, not a PrimExpr
            out.extend(child)
        else:
            out.append(child)
    return out


def _walk(node, visit) -> None:
    stack = [node]
    while stack:
        current = stack.pop()
        visit(current)
        stack.extend(_children(current))


def kernel_launches(host_func) -> list[dict]:
    """The kernels a lowered host PrimFunc launches: name, argument positions, scalars, grid."""
    from tvm import ir, tirx

    lets, calls = {}, []  # lets: variable or buffer -> the expression that defines it

    def visit(node):
        if isinstance(node, (tirx.LetStmt, tirx.stmt.Bind)):
            lets[node.var] = node.value
        elif isinstance(node, tirx.stmt.DeclBuffer) and node.data is not None:
            lets[node.buffer] = node.data
        elif isinstance(node, ir.Call) and getattr(node.op, "name", "") == "tirx.call_ffi_kernel":
            calls.append(node)

    _walk(host_func.body, visit)

    def packed_index(expr) -> int:
        """Which packed argument a kernel buffer comes from, following the let-bindings."""
        found, seen, stack = set(), set(), [expr]
        while stack:
            expr = stack.pop()

            def visit_expr(n):
                if isinstance(n, ir.Call) and getattr(n.op, "name", "") == "tirx.tvm_struct_get" \
                        and isinstance(n.args[0], tirx.Var) and n.args[0].name == "args":
                    found.add(int(n.args[1]))
                elif isinstance(n, (tirx.Var, tirx.stmt.Buffer)) and n in lets and n not in seen:
                    seen.add(n)
                    stack.append(lets[n])

            _walk(expr, visit_expr)
        if len(found) != 1:
            raise MixerEdgeError(f"cannot tell which argument kernel buffer {expr} binds ({sorted(found)}): report this model")
        return found.pop()

    launches = []
    for call in calls:
        name = str(call.args[0].value)
        tags = [str(t) for t in call.attrs.launch_params]
        rest = list(call.args[1:])
        extents, values = rest[len(rest) - len(tags):] if tags else [], rest[: len(rest) - len(tags)]
        buffers, scalars = [], []
        for value in values:
            if isinstance(getattr(value, "ty", None), ir.PointerType):
                buffers.append(packed_index(value))
            elif isinstance(value, tirx.IntImm):
                scalars.append(("i32", int(value.value)))
            elif isinstance(value, tirx.FloatImm):
                scalars.append(("f32", float(value.value)))
            else:
                raise MixerEdgeError(f"kernel {name} takes a run-time scalar ({value}): only static shapes are supported")
        grid = [1, 1, 1]
        for tag, extent in zip(tags, extents):
            if not isinstance(extent, tirx.IntImm):
                raise MixerEdgeError(f"kernel {name} has a run-time launch size: only static shapes are supported")
            if tag.startswith("blockIdx."):
                grid["xyz".index(tag[-1])] = int(extent.value)
        launches.append({"kernel": name, "buffers": buffers, "scalars": scalars, "grid": grid})
    return launches


def split_wgsl(source: str) -> dict[str, str]:
    """TVM emits every kernel into one text, each after a `// Function: NAME` header."""
    parts = re.split(r"^// Function: (\w+)\n//-+\n", source, flags=re.M)
    return {name: body for name, body in zip(parts[1::2], parts[2::2]) if body.strip()}


def _shape(expr) -> list[int]:
    return [int(v) for v in expr.values]


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
    from tvm import relax, tirx
    from tvm.tirx.build import split_host_device_mods

    mod = for_wgsl(mod)
    try:
        with target:
            lowered = relax.get_default_pipeline(target)(mod)
        prims = tvm.IRModule({gv: f for gv, f in lowered.functions.items() if isinstance(f, tirx.PrimFunc)})
        prims = tirx.transform.BindTarget(target.with_host(target.host))(prims)
        pipeline, _, finalize_device = tirx.get_default_tir_pipeline(target)
        host, devices = split_host_device_mods(pipeline(prims))
        ((device_target, device_mod),) = devices.items()
        wgsl = tvm.get_global_func("target.build.webgpu")(finalize_device()(device_mod), device_target)
    except Exception as exc:
        raise MixerEdgeError(f"TVM could not lower the model to WGSL ({reason(exc, last=True)}): build it for a CPU "
                             "or CUDA target, or report it with the model") from exc
    launches = {gv.name_hint: kernel_launches(f) for gv, f in host.functions.items()}
    kernels = split_wgsl(str(wgsl.inspect_source()))

    main = lowered["main"]
    ids = {var: i for i, var in enumerate(main.params)}  # 0 = the input, then the weights
    steps = []

    def ref(expr) -> int:
        if isinstance(expr, tvm.ir.GenericConst) and expr not in ids:  # a tensor the graph holds as a constant
            ids[expr] = len(ids)
            steps.append(_constant_step(expr, ids[expr]))
        if expr not in ids:
            raise MixerEdgeError(f"the WebGPU plan refers to an unknown value {expr}")
        return ids[expr]

    for block in main.body.blocks:
        for binding in block.bindings:
            value, out = binding.value, len(ids)
            op = getattr(value, "op", None)
            op_name = getattr(op, "name", None) or getattr(op, "name_hint", None)
            if isinstance(value, relax.Call) and isinstance(op, tvm.ir.GlobalVar):
                steps.append({"op": "call", "func": op_name, "args": [ref(a) for a in value.args],
                              "launches": launches[op_name]})
            elif op_name == "relax.call_packed" or (isinstance(value, relax.Call) and isinstance(op, relax.ExternFunc)):
                packed = str(op.global_symbol) if isinstance(op, relax.ExternFunc) else str(value.attrs.func_name)
                if packed in _SKIPPED_PACKED:
                    continue
                if packed != "vm.builtin.reshape":
                    raise MixerEdgeError(f"the WebGPU plan does not support {packed}")
                steps.append({"op": "view", "out": out, "src": ref(value.args[0]), "offset": 0,
                              "shape": _shape(value.args[1])})
                ids[binding.var] = out
            elif op_name == "relax.vm.alloc_storage":
                steps.append({"op": "storage", "out": out, "bytes": _shape(value.args[0])[0]})
                ids[binding.var] = out
            elif op_name == "relax.vm.alloc_tensor":
                dtype = str(value.args[3].value)
                steps.append({"op": "view", "out": out, "src": ref(value.args[0]), "offset": int(value.args[1].value),
                              "shape": _shape(value.args[2]), "dtype": dtype})
                ids[binding.var] = out
            elif isinstance(value, tvm.ir.GenericConst):
                ids[binding.var] = ref(value)
            elif op_name in ("relax.vm.kill_object", "relax.null_value"):
                ids[binding.var] = out
            else:
                raise MixerEdgeError(f"the WebGPU plan does not support {op_name or type(value).__name__}")
    used = {launch["kernel"] for step in steps if step["op"] == "call" for launch in step["launches"]}
    missing = used - set(kernels)
    if missing:
        raise MixerEdgeError(f"TVM emitted no WGSL for {', '.join(sorted(missing))}")
    return {"format": PROGRAM_FORMAT, "steps": steps, "output": ref(main.body.body),
            "kernels": {name: kernels[name] for name in sorted(used)}}


def dispatch_count(prog: dict) -> int:
    return sum(len(step["launches"]) for step in prog["steps"] if step["op"] == "call")

