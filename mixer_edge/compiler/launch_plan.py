"""A static-shape model's host side as data: the launch plan that replaces a host library.

For a static-shape model the host side of a GPU build is a fixed sequence of allocations, tensor
views and kernel launches. `lower` runs TVM's default pipeline for a GPU target and splits host from
device code; `steps` reads that sequence:

- from the lowered Relax `main`: storage allocations, tensor views, reshapes, PrimFunc calls and the
  graph's constants;
- from each PrimFunc's lowered host code (`kernel_launches`): the kernels it launches
  (`call_ffi_kernel`), each kernel parameter in order (which of the call's arguments a buffer is,
  scalars with their type) and the launch size (grid, block, dynamic shared memory), constants here.

The WebGPU route (webgpu.py, replayed by wgpu) and the CUDA driver route (cuda.py's `plan`, replayed
through libcuda alone) write it in their own file; a model whose host side is not such a fixed
sequence (a shape that depends on data) is refused in one line.
"""

from __future__ import annotations

from ..errors import MixerEdgeError, reason

SKIPPED_PACKED = {"vm.builtin.check_tensor_info", "vm.builtin.match_shape", "vm.builtin.null_value"}
DYNAMIC_SHARED = "tirx.use_dyn_shared_memory"  # the launch tag whose extent is the dynamic shared memory in bytes
SCALAR_TYPES = {"int32": "i32", "int64": "i64", "float32": "f32"}


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
    """The kernels a lowered host PrimFunc launches, in order: {"kernel", "params": [["buffer", k] or [type, value],
    in the kernel's parameter order; k a position among the function's arguments], "grid", "block",
    "shared_bytes"}."""
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
        params = []
        for value in values:
            if isinstance(getattr(value, "ty", None), ir.PointerType):
                params.append(["buffer", packed_index(value)])
            elif isinstance(value, (tirx.IntImm, tirx.FloatImm)) and str(value.dtype) in SCALAR_TYPES:
                kind = SCALAR_TYPES[str(value.dtype)]
                params.append([kind, float(value.value) if kind == "f32" else int(value.value)])
            else:
                raise MixerEdgeError(f"kernel {name} takes a run-time scalar ({value}): only static shapes are supported")
        launch = {"kernel": name, "params": params, "grid": [1, 1, 1], "block": [1, 1, 1], "shared_bytes": 0}
        for tag, extent in zip(tags, extents):
            if not isinstance(extent, tirx.IntImm):
                raise MixerEdgeError(f"kernel {name} has a run-time launch size: only static shapes are supported")
            if tag.startswith("blockIdx."):
                launch["grid"]["xyz".index(tag[-1])] = int(extent.value)
            elif tag.startswith("threadIdx."):
                launch["block"]["xyz".index(tag[-1])] = int(extent.value)
            elif tag == DYNAMIC_SHARED:
                launch["shared_bytes"] = int(extent.value)
        launches.append(launch)
    return launches


def lower(mod, target, what: str):
    """(lowered Relax module, host PrimFuncs, device module, device target) of `mod` through TVM's default
    pipeline for GPU `target`; `what` names the route in the refusal."""
    import tvm
    from tvm import relax, tirx
    from tvm.tirx.build import split_host_device_mods

    try:
        with target:
            lowered = relax.get_default_pipeline(target)(mod)
        prims = tvm.IRModule({gv: f for gv, f in lowered.functions.items() if isinstance(f, tirx.PrimFunc)})
        prims = tirx.transform.BindTarget(target.with_host(target.host))(prims)
        pipeline, _, finalize_device = tirx.get_default_tir_pipeline(target)
        host, devices = split_host_device_mods(pipeline(prims))
        ((device_target, device_mod),) = devices.items()
        return lowered, host, finalize_device()(device_mod), device_target
    except Exception as exc:
        raise MixerEdgeError(f"TVM could not lower the model to {what} ({reason(exc, last=True)}): build it for a "
                             "CPU target, or report it with the model") from exc


def _shape(expr) -> list[int]:
    return [int(v) for v in expr.values]


def steps(lowered, host, launch, constant, what: str) -> tuple[list[dict], int]:
    """(the plan's steps, the id of the logits) of `lowered`'s `main`. Values are numbered: 0 the input, 1 to N the
    weights, then what the steps make. `launch(record)` writes one of `kernel_launches`' records in the route's
    form; `constant(const, out)` is the step of a tensor the graph holds as a constant."""
    import tvm
    from tvm import relax

    launches = {gv.name_hint: [launch(record) for record in kernel_launches(f)] for gv, f in host.functions.items()}
    main = lowered["main"]
    ids = {var: i for i, var in enumerate(main.params)}  # 0 = the input, then the weights
    plan = []

    def ref(expr) -> int:
        if isinstance(expr, tvm.ir.GenericConst) and expr not in ids:
            ids[expr] = len(ids)
            plan.append(constant(expr, ids[expr]))
        if expr not in ids:
            raise MixerEdgeError(f"the {what} plan refers to an unknown value {expr}")
        return ids[expr]

    for block in main.body.blocks:
        for binding in block.bindings:
            value, out = binding.value, len(ids)
            op = getattr(value, "op", None)
            op_name = getattr(op, "name", None) or getattr(op, "name_hint", None)
            if isinstance(value, relax.Call) and isinstance(op, tvm.ir.GlobalVar):
                plan.append({"op": "call", "func": op_name, "args": [ref(a) for a in value.args],
                             "launches": launches[op_name]})
            elif op_name == "relax.call_packed" or (isinstance(value, relax.Call) and isinstance(op, relax.ExternFunc)):
                packed = str(op.global_symbol) if isinstance(op, relax.ExternFunc) else str(value.attrs.func_name)
                if packed in SKIPPED_PACKED:
                    continue
                if packed != "vm.builtin.reshape":
                    raise MixerEdgeError(f"the {what} plan does not support {packed}")
                plan.append({"op": "view", "out": out, "src": ref(value.args[0]), "offset": 0,
                             "shape": _shape(value.args[1])})
                ids[binding.var] = out
            elif op_name == "relax.vm.alloc_storage":
                plan.append({"op": "storage", "out": out, "bytes": _shape(value.args[0])[0]})
                ids[binding.var] = out
            elif op_name == "relax.vm.alloc_tensor":
                dtype = str(value.args[3].value)
                plan.append({"op": "view", "out": out, "src": ref(value.args[0]), "offset": int(value.args[1].value),
                             "shape": _shape(value.args[2]), "dtype": dtype})
                ids[binding.var] = out
            elif isinstance(value, tvm.ir.GenericConst):
                ids[binding.var] = ref(value)
            elif op_name in ("relax.vm.kill_object", "relax.null_value"):
                ids[binding.var] = out
            else:
                raise MixerEdgeError(f"the {what} plan does not support {op_name or type(value).__name__}")
    return plan, ref(main.body.body)


def kernels_used(plan: list[dict]) -> set[str]:
    return {launch["kernel"] for step in plan if step["op"] == "call" for launch in step["launches"]}
