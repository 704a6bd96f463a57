"""See inside a compiled model: each kernel named after the model's layers, timed (`profile`) and compared with the
float ONNX reference (`compare`).

No layer name survives TVM's ONNX import, so kernels are named by matching what they write to the float ONNX
graph's tensors on the same input. Kernels and ONNX nodes both run in topological order: `align` assigns each
kernel call i a node output j_i, j strictly increasing, among the tensors with as many elements, maximising the
total similarity (dynamic programming). Similarity is the Pearson correlation of the *sorted* values, which a
transpose or reshape does not change and an affine map (uint8 activations, int32 accumulators) hardly does; the
flat order's correlation breaks ties. A kernel with no candidate above `SIMILARITY_FLOOR` stays unmatched and is
named after the kernel before it.

A node's layer is the prefix of its own `X.weight`/`X.bias` initializer (qdq.param_layer; one that several
nodes share, as onnxsim makes of an untrained model's equal LayerNorm weights, names none of them), else the
module path of a scoped node name (`/blocks/blocks.0/mlp_tokens/fc1/MatMul` -> `blocks.0.mlp_tokens.fc1`), else the last named
layer before it followed by ` · OP` (`blocks.0.mlp_tokens.fc1 · Erf`, `norm · ReduceMean`). A kernel covers the
nodes after the previous matched kernel's node up to its own; it takes the layer of the parametrised node in that
span (MatMul/Gemm/Conv/LayerNorm), else that of its principal op (activation > reduction > arithmetic > shape op).

Cost convention, per kernel span: MatMul/Gemm 2*M*N*K, Conv 2*out*Cin*kh*kw/groups, LayerNorm 8 FLOPs per
element, other element-wise ops and reductions 1 per element, shape ops 0. Bytes: the span's inputs from outside
it (activations at the dtype of the kernel that wrote them, weights 1 byte in int8 layers, else 4) plus the
kernel's own output at its dtype: an estimate of the traffic, not a measurement. No preset states a peak, so no
"% of peak" is given.
"""

from __future__ import annotations

import collections
import itertools
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict

from .errors import MixerEdgeError

SIMILARITY_FLOOR = 0.9  # sorted-value correlation below which a kernel is left unmatched
JUMP_DB = 6.0  # first jump: a compared layer's SQNR this many dB below the previous compared layer's ...
JUMP_FLOOR_DB = 40.0  # ... and under this (float rounding noise never counts as a jump)
SUGGESTED = 3  # int8 layers suggested for float_layers
SHAPE_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Expand", "Slice", "Concat")
PARAM_OPS = ("MatMul", "Gemm", "Conv", "LayerNormalization", "BatchNormalization", "InstanceNormalization",
             "GroupNormalization")
PRINCIPAL = [("Erf", "Gelu", "Tanh", "Sigmoid", "Relu", "Softmax"), ("ReduceMean", "ReduceSum", "GlobalAveragePool"),
             ("Add", "Sub", "Mul", "Div", "Pow", "Sqrt")]  # which op names a span without parameters, in order


# ---- records -----------------------------------------------------------------------------------------------

class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KernelTime(Record):
    """One kernel call of one inference: what it computes and how long it takes."""

    index: int
    kernel: str  # the compiled kernel's symbol
    layer: str  # the model layer it computes (see the module docstring)
    tensor: str | None  # the ONNX tensor its output matched; None: unmatched
    similarity: float | None  # sorted-value correlation with that tensor
    ms: float  # median time of one call
    share: float  # of the sum of every kernel's time
    flops: int  # FLOPs (integer ops in int8 layers) of its span, by the module's convention
    bytes: int  # estimated bytes read and written
    int8: bool  # an integer kernel: `gflops` is GOP/s
    gflops: float | None  # flops / time


class LayerTime(Record):
    """The kernels of one layer together."""

    layer: str
    kernels: int
    ms: float
    share: float
    flops: int
    int8: bool
    gflops: float | None


class Profile(Record):
    """`mixer-edge profile`: per-kernel latency of one inference, mapped to the model's layers."""

    artifact: str
    model: str
    target: str
    precision: str
    where: str  # "this machine" or "emulated cortex-a76 (rpi5)"
    emulated: bool  # emulated times rank kernels against each other; they are not the board's speed
    repeat: int
    kernels: list[KernelTime]
    layers: list[LayerTime]  # in order of first call
    kernel_sum_ms: float
    inference_ms: float  # whole inference (Model.device_times, median)
    matched: int  # kernels matched to an ONNX tensor

    def slowest(self, n: int = 5) -> list[LayerTime]:
        return sorted(self.layers, key=lambda r: -r.ms)[:n]


class LayerError(Record):
    """One layer's output in the compiled model against the float reference (its last compared kernel)."""

    layer: str
    kernel: str | None
    tensor: str | None  # the ONNX tensor it is compared with
    compared: str  # float, dequantized, accumulator (int32: not compared), unmatched, layout (order not found),
    #                 no scale (an integer output the table has no scale for)
    cosine: float | None = None
    sqnr_db: float | None = None  # None: not compared, or identical (then cosine is 1 and max_abs_error 0)
    max_abs_error: float | None = None
    drop_db: float | None = None  # the previous compared layer's SQNR minus this one's
    added_sqnr_db: float | None = None  # int8 layers: the SQNR of the noise its int8 input adds to the last
    #   float output before it (noise powers subtract): what quantizing this layer alone costs, estimated
    scale: float | None = None  # int8: the calibration table's scale of the layer's input activation
    range: list[float] | None = None  # ... its quantized range
    observed: list[float] | None = None  # ... and the range seen in calibration


class Comparison(Record):
    """`mixer-edge compare`: every layer's output in the compiled model beside the float ONNX reference."""

    artifact: str
    model: str
    target: str
    precision: str
    where: str
    emulated: bool
    data: str
    samples: int
    layers: list[LayerError]
    first_jump: str | None  # the first compared layer whose SQNR falls JUMP_DB below the previous one's,
    #                         under JUMP_FLOOR_DB
    jump_db: float = JUMP_DB
    jump_floor_db: float = JUMP_FLOOR_DB
    suggested_float_layers: list[str] = []  # int8: the layers with the lowest added_sqnr_db

    def worst(self, n: int = 5) -> list[LayerError]:
        rows = [r for r in self.layers if r.compared in ("float", "dequantized") and r.sqnr_db is not None]
        return sorted(rows, key=lambda r: r.sqnr_db)[:n]


# ---- the float reference: every node's output --------------------------------------------------------------

@dataclass
class Node:
    """One ONNX node (or the graph input) with its float output on the reference inputs."""

    name: str
    op: str
    output: str
    value: np.ndarray  # as onnxruntime returned it
    layer: str
    param: bool  # a layer with parameters (MatMul/Gemm/Conv/LayerNorm ...)
    flops: int
    inputs: list[tuple[str, int]] = field(default_factory=list)  # (tensor, elements) read
    weights: list[tuple[str, int]] = field(default_factory=list)  # (initializer, bytes at float32)


def scope_layer(node_name: str) -> str | None:
    """`/blocks/blocks.0/mlp_tokens/fc1/MatMul` -> `blocks.0.mlp_tokens.fc1`; None for an unscoped name."""
    parts = [p for p in node_name.split("/")[:-1] if p]
    if not node_name.startswith("/") or not parts:
        return None
    name = ""
    for part in parts:
        name = part if not name or part.startswith(name + ".") else f"{name}.{part}"
    return name


def _flops(op: str, attrs: dict, shapes: list[tuple], out: tuple) -> int:
    n = int(np.prod(out)) if out else 1
    if op == "MatMul" and shapes and shapes[0]:
        return 2 * n * int(shapes[0][-1])
    if op == "Gemm" and shapes and len(shapes[0]) == 2:
        return 2 * n * int(shapes[0][0] if attrs.get("transA", 0) else shapes[0][1])
    if op == "Conv" and len(shapes) > 1:
        return 2 * n * int(np.prod(shapes[1][1:]))
    if op in PARAM_OPS:
        return 8 * n
    if op in SHAPE_OPS:
        return 0
    if op.startswith("Reduce") or op == "GlobalAveragePool":
        return int(np.prod(shapes[0])) if shapes and shapes[0] else n
    return n


def reference_nodes(proto, batches: list[np.ndarray]) -> list[list[Node]]:
    """For each input batch, the graph input and every node with a float output, in graph (topological) order,
    run by onnxruntime (one session) with every output exposed."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    from .export import input_spec
    from .quant.qdq import param_layer

    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.output]}
    wanted = [n.output[0] for n in graph.node if n.output and types.get(n.output[0]) == onnx.TensorProto.FLOAT]
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in wanted)
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    spec = input_spec(proto)
    return [_nodes(graph, inits, spec.name, {spec.name: np.asarray(x, np.float32), **dict(zip(
        wanted, sess.run(None, {spec.name: np.ascontiguousarray(x, np.float32)})))}, param_layer) for x in batches]


def _nodes(graph, inits: dict, input_name: str, values: dict[str, np.ndarray], param_layer) -> list[Node]:
    import onnx
    from onnx import helper

    shapes = {name: tuple(v.shape) for name, v in values.items()}
    shapes.update({name: tuple(i.dims) for name, i in inits.items()})
    uses = collections.Counter(i for node in graph.node for i in set(node.input))
    own = {name for name in inits if uses[name] == 1}  # a shared parameter (onnxsim merges equal ones) names none
    nodes = [Node(input_name, "Input", input_name, values[input_name], "", False, 0)]
    last_named = ""
    for node in graph.node:
        if not node.output or node.output[0] not in values:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        from_params = param_layer(node, own)
        scoped = scope_layer(node.name)
        param = node.op_type in PARAM_OPS and any(i in inits for i in node.input[1:]) or from_params is not None
        if from_params or scoped:
            layer = from_params or scoped
            last_named = layer.split(" · ")[0]
        else:
            layer = f"{last_named} · {node.op_type}" if last_named else ""
        weights = [(i, 4 * int(np.prod(inits[i].dims))) for i in node.input if i in inits
                   and inits[i].data_type == onnx.TensorProto.FLOAT]
        inputs = [(i, int(np.prod(shapes[i]))) for i in node.input if i in values]
        out = node.output[0]
        nodes.append(Node(node.name or out, node.op_type, out, values[out], layer, param,
                          _flops(node.op_type, attrs, [shapes.get(i, ()) for i in node.input], shapes[out]),
                          inputs, weights))
    first = next((n.layer.split(" · ")[0] for n in nodes if n.layer), "model")
    for n in nodes:  # before any named layer (the input, a first reshape): the first layer's
        if not n.layer:
            n.layer = f"{first} · {n.op}"
    return nodes


# ---- alignment ---------------------------------------------------------------------------------------------

QUANTILES = 2048  # the sorted vectors are compared at this many quantiles
FLAT_PROBES = 4096  # and the flat ones at this many fixed positions


def _standardised(v: np.ndarray) -> np.ndarray | None:
    v = v.astype(np.float64)
    v = v - v.mean()
    norm = np.linalg.norm(v)
    return None if norm == 0 else v / norm


def _profile(flat: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray]:
    """(standardised quantile function, standardised values at fixed positions, raw quantiles) of a flat tensor."""
    flat = flat.astype(np.float64).ravel()
    s = np.sort(flat)
    q = s[np.linspace(0, len(s) - 1, min(QUANTILES, len(s))).astype(int)]
    probes = flat[np.random.default_rng(0).choice(len(flat), min(FLAT_PROBES, len(flat)), replace=False)] \
        if len(flat) > FLAT_PROBES else flat
    return _standardised(q), _standardised(probes), q


def similarity_matrix(kernels: list[np.ndarray], nodes: list[np.ndarray]) -> np.ndarray:
    """similarity[i, j]: sorted-value correlation of kernel output i and node output j (-inf: other size), plus
    1e-3 times the flat order's absolute correlation, minus 1e-3 times the relative distance of the raw quantiles
    for a float output (tie-breaks: `x` and `0.5 * x`, a GELU's last two products, correlate alike)."""
    sim = np.full((len(kernels), len(nodes)), -np.inf)
    kp = [_profile(k) for k in kernels]
    np_ = [_profile(n) for n in nodes]
    for i, k in enumerate(kernels):
        for j, n in enumerate(nodes):
            if k.size != n.size:
                continue
            (ks, kf, kq), (ns, nf, nq) = kp[i], np_[j]
            if ks is None or ns is None:
                sim[i, j] = 1.0 if ks is None and ns is None and np.allclose(k.ravel()[:1], n.ravel()[:1]) else 0.0
                continue
            scale = 0.0 if k.dtype.kind in "iu" else min(np.linalg.norm(kq - nq) / (np.linalg.norm(nq) or 1.0), 1.0)
            sim[i, j] = float(ks @ ns) + 1e-3 * abs(float(kf @ nf)) - 1e-3 * scale
    return sim


def align(sim: np.ndarray, floor: float = SIMILARITY_FLOOR) -> list[int | None]:
    """For each kernel i the node j_i (strictly increasing over matched kernels) maximising the summed
    similarity, None where a kernel is left unmatched (no candidate at least `floor`)."""
    k, n = sim.shape
    gain = np.where(sim >= floor, sim, -np.inf)
    best = np.zeros((k + 1, n + 1))
    for i in range(1, k + 1):
        for j in range(1, n + 1):
            best[i, j] = max(best[i, j - 1], best[i - 1, j], best[i - 1, j - 1] + gain[i - 1, j - 1])
    match: list[int | None] = [None] * k
    i, j = k, n
    while i > 0 and j > 0:
        if best[i, j] == best[i - 1, j]:
            i -= 1
        elif best[i, j] == best[i, j - 1]:
            j -= 1
        else:
            match[i - 1] = j - 1
            i, j = i - 1, j - 1
    return match


def _principal(span: list[Node]) -> Node:
    for ops in PRINCIPAL:
        found = [n for n in span if n.op in ops]
        if found:
            return found[0]
    return span[-1]


@dataclass
class Mapped:
    """A kernel call and what it was matched to."""

    kernel: str
    output: np.ndarray  # what it wrote, flat (first inference)
    node: Node | None
    similarity: float | None
    span: list[Node]
    layer: str


def int8_pins(outputs: list[tuple[str, np.ndarray]], nodes: list[Node], record, proto) -> dict[int, int]:
    """int8 builds: kernel -> node matches known without measuring. The k-th integer kernel call (an int32
    accumulator, or an `int8_dense` kernel with its float epilogue fused in, as CPU builds have) is the k-th int8
    layer's (when the counts agree); an accumulator is that layer's MatMul/Gemm/Conv, and the last uint8/int8
    output before an integer kernel is the quantized input of that kernel's layer: the calibration table names
    that tensor. (An 8-bit output before it, a LayerNorm quantizing ahead of a transpose, is left to matching.)"""
    from .quant.qdq import layers as quantizable

    q = record.quantization
    if q is None or not q.table:
        return {}
    weights = {name for e in q.table.values() if e.kind == "weight" for name in e.layers}
    int8 = [layer for layer in quantizable(proto) if layer.name in weights]
    accumulators = [i for i, (symbol, out) in enumerate(outputs) if out.dtype == np.int32 or "int8_dense" in symbol]
    if len(accumulators) != len(int8):
        return {}
    index = {n.output: j for j, n in enumerate(nodes)}
    by_name = {n.name: j for j, n in enumerate(nodes)}
    pins = {i: by_name[layer.node] for i, layer in zip(accumulators, int8)
            if outputs[i][1].dtype == np.int32 and layer.node in by_name
            and nodes[by_name[layer.node]].value.size == outputs[i][1].size}
    eight_bit = [i for i, (_, out) in enumerate(outputs) if out.dtype.kind in "iu" and out.dtype != np.int32]
    for i in eight_bit:
        k = next((k for k, a in enumerate(accumulators) if a > i), None)
        if k is not None and any(i < h < accumulators[k] for h in eight_bit):
            continue
        tensor = next((t for t, e in q.table.items() if k is not None and e.kind == "activation"
                       and int8[k].name in e.layers), None)
        if tensor in index:
            pins[i] = index[tensor]
    return pins


def map_kernels(outputs: list[tuple[str, np.ndarray]], nodes: list[Node],
                pins: dict[int, int]) -> list[Mapped]:
    """Each kernel call named after the reference nodes its output matched (see the module docstring).

    An int32 output is an integer matmul's accumulator (per-channel weight scales still to apply): it may match
    only a MatMul/Gemm/Conv output, which it then does whatever its correlation. An unmatched kernel takes the
    layer of the next matched kernel where that one computes a layer with parameters (the accumulator, the
    quantized input of a layer), else of the one before."""
    sim = similarity_matrix([o for _, o in outputs], [n.value for n in nodes])
    matmuls = np.array([n.op in ("MatMul", "Gemm", "Conv") for n in nodes])
    for i, (_, out) in enumerate(outputs):
        if out.dtype == np.int32:
            sim[i] = np.where(matmuls & np.isfinite(sim[i]), np.maximum(sim[i], SIMILARITY_FLOOR), -np.inf)
    if outputs and outputs[-1][1].size == nodes[-1].value.size:  # the last kernel writes the logits
        pins = {**pins, len(outputs) - 1: len(nodes) - 1}
    for i, j in pins.items():  # known matches outweigh any measured one
        sim[i] = -np.inf
        sim[i, j] = 2.0
    match = align(sim)
    mapped, previous = [], -1
    for i, ((kernel, out), j) in enumerate(zip(outputs, match)):
        if j is None:
            mapped.append(Mapped(kernel, out, None, None, [], ""))
            continue
        span = nodes[previous + 1:j + 1]
        params = [n for n in span if n.param]
        layer = params[-1].layer if params else _principal(span).layer
        similarity = 1.0 if i in pins else round(float(min(sim[i, j], 1.0)), 6)
        mapped.append(Mapped(kernel, out, nodes[j], similarity, span, layer))
        previous = j
    for i, m in enumerate(mapped):
        if m.node is None:
            after = next((n for n in mapped[i + 1:] if n.node is not None), None)
            before = next((n for n in reversed(mapped[:i]) if n.node is not None), None)
            m.layer = after.layer if after and any(n.param for n in after.span) or before is None else before.layer
    return mapped


# ---- running the artifact here or on the emulated board ----------------------------------------------------

@dataclass
class Run:
    """What one artifact did on the inputs: its kernels' outputs per batch, and with timing, their times."""

    outputs: list[list[tuple[str, np.ndarray]]]  # per kernel batch (runtime.Manifest.kernel_batch)
    times: list[tuple[str, float]] | None = None
    inference_ms: float | None = None  # of one kernel batch: a whole inference, or its share per pass


def measure(model, x: np.ndarray, batches: int, repeat: int, number: int) -> Run:
    """What a loaded runtime.Model does on `x`: the kernel outputs of each of `batches` kernel batches (the
    artifact's batch, or one pass where it runs its batch in passes) and, with `repeat`, the median time of each
    kernel on the first and of whole inferences on the first batch (per kernel batch)."""
    size = model.kernel_batch
    run = Run([model.kernel_outputs(x[b * size:(b + 1) * size]) for b in range(batches)])
    if repeat:
        run.times = model.kernel_times(x, repeat)
        run.inference_ms = 1e3 * float(np.median(model.device_times(x, number, repeat))) * size / model.batch
    return run


def board_job(job: dict) -> None:
    """On the device (the emulated board's script; a board's mixer_edge.rpc_server.inside over RPC): `measure`
    artifact job["artifact"] on job["inputs"] (.npy), written into directory job["output"] for `_read_run`."""
    from . import runtime

    model = runtime.load(job["artifact"])
    run = measure(model, np.load(job["inputs"]), job["batches"], job["repeat"], job["number"])
    out = Path(job["output"])
    np.savez(out / "outputs.npz", **{f"b{b}k{i}": value for b, calls in enumerate(run.outputs)
                                     for i, (_, value) in enumerate(calls)})
    (out / "result.json").write_text(json.dumps({"symbols": [s for s, _ in run.outputs[0]], "times": run.times,
                                                 "inference_ms": run.inference_ms}))


def _read_run(out: Path, batches: int) -> Run:
    result = json.loads((out / "result.json").read_text())
    with np.load(out / "outputs.npz") as npz:
        outputs = [[(s, npz[f"b{b}k{i}"]) for i, s in enumerate(result["symbols"])] for b in range(batches)]
    times = [(s, float(ms)) for s, ms in result["times"]] if result["times"] else None
    return Run(outputs, times, result["inference_ms"])


# The board-side script is constant: its data (paths, repeat) comes as one JSON argument, never as source text.
_INSIDE = """
import json, sys
from mixer_edge.errors import MixerEdgeError
from mixer_edge.layers import board_job
try:
    board_job(json.loads(sys.argv[1]))
except MixerEdgeError as exc:
    print(exc, file=sys.stderr)
    sys.exit(3)
"""


def _run_here(artifact, x: np.ndarray, batches: int, repeat: int, number: int) -> Run:
    from . import runtime

    return measure(runtime.load(artifact), x, batches, repeat, number)


def _run_on_board(artifact, x: np.ndarray, batches: int, repeat: int, number: int, cpu: str) -> Run:
    from . import emulator

    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "x.npy", x)
        job = json.dumps({"artifact": str(Path(artifact).resolve()), "inputs": str(Path(tmp) / "x.npy"),
                          "output": tmp, "repeat": repeat, "number": number, "batches": batches})
        proc = emulator.python(_INSIDE, cpu, timeout=1800, args=(job,))
        if proc.returncode:
            last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
            raise MixerEdgeError(last if proc.returncode == 3 else
                                 f"the emulated {cpu} board failed running {Path(artifact).name} ({last})")
        return _read_run(Path(tmp), batches)


def _run_over_rpc(artifact, x: np.ndarray, batches: int, repeat: int, number: int, rpc) -> Run:
    """On a board taken from a TVM RPC tracker that runs mixer_edge.rpc_server: the artifact and the inputs are
    uploaded, rpc_server.inside measures there, the results come back."""
    from . import runtime
    from .bench import connect
    from .errors import reason
    from .rpc_server import INSIDE_FUNCTION

    session = connect(rpc)
    try:
        inside = session.get_function(INSIDE_FUNCTION)
    except Exception as exc:
        raise MixerEdgeError(f"the board under key '{rpc.key}' does not serve {INSIDE_FUNCTION} "
                             f"({reason(exc, last=True)}): run mixer-edge's own server on it, python -m "
                             "mixer_edge.rpc_server") from exc
    workpath = session.get_function("tvm.rpc.server.workpath")
    with runtime.artifact_dir(artifact) as root, tempfile.TemporaryDirectory() as tmp:
        files = {}
        for path in sorted(p for p in root.iterdir() if p.is_file()):  # flat: the workspace has no folders
            session.upload(str(path), f"inside-artifact-{path.name}")
            files[path.name] = workpath(f"inside-artifact-{path.name}")
        np.save(Path(tmp) / "x.npy", x)
        session.upload(str(Path(tmp) / "x.npy"), "inside-x.npy")
        job = {"files": files, "artifact": workpath("inside-artifact"), "inputs": workpath("inside-x.npy"),
               "output": workpath("."), "repeat": repeat, "number": number, "batches": batches}
        refusal = inside(json.dumps(job))
        if refusal:
            raise MixerEdgeError(refusal)
        for name in ("result.json", "outputs.npz"):
            (Path(tmp) / name).write_bytes(bytes(session.download(name)))
        return _read_run(Path(tmp), batches)


def _where(board: str | None, rpc) -> tuple[str, str | None]:
    """(where the artifact runs, in words; the emulated CPU or None)."""
    if board and rpc:
        raise MixerEdgeError("--board (the emulated board) and --rpc-tracker (a real one) name two places: pass one")
    if rpc:
        return f"rpc:{rpc.key}", None
    if not board:
        return "this machine", None
    from .compiler.targets import resolve_target

    cpu = resolve_target(board).emulator_cpu
    if not cpu:
        raise MixerEdgeError(f"--board {board} has no emulated CPU: use an ARM board preset such as rpi4 or rpi5")
    return f"emulated {cpu} ({board})", cpu


def _manifest(artifact):
    from . import runtime

    with runtime.artifact_dir(artifact) as root:
        return runtime.verified_manifest(root)[1]


def check_reference(record, reference) -> None:
    """Refuse a reference model (an export.ModelSource) whose input or classes differ from the artifact's."""
    from .export import input_spec

    spec = input_spec(reference.onnx_model)
    classes = reference.onnx_model.graph.output[0].type.tensor_type.shape.dim[-1].dim_value
    if list(spec.shape[1:]) != record.input.shape[1:] or classes != record.output.shape[1]:
        raise MixerEdgeError(f"the reference model {reference.name} takes {list(spec.shape[1:])} inputs with "
                             f"{classes} classes but the artifact ({record.model.name}) takes "
                             f"{record.input.shape[1:]} with {record.output.shape[1]}: pass the model it was "
                             "compiled from (--model/--checkpoint)")


@dataclass
class Execution:
    """An artifact run on the inputs, beside the float reference on the same batches, its kernels named."""

    record: object  # the artifact's runtime.Manifest
    where: str
    emulated: bool
    samples: int
    run: Run
    per_batch: list[list[Node]]  # the reference's nodes on each batch
    mapped: list[Mapped]  # the first batch's kernel calls


def _execute(artifact, reference, x: np.ndarray, board: str | None, rpc, repeat: int,
             max_batches: int | None = None, number: int = 10) -> Execution:
    record = _manifest(artifact)
    check_reference(record, reference)
    whole, batch = record.input.shape[0], record.kernel_batch  # the artifact's batch; its kernels' (one pass)
    if len(x) < whole:
        raise MixerEdgeError(f"the artifact's batch is {whole}: give at least {whole} inputs")
    batches = min(len(x) // batch, max_batches or len(x))
    x = np.ascontiguousarray(x[:max(batches * batch, whole)], np.float32)
    where, cpu = _where(board, rpc)
    run = _run_over_rpc(artifact, x, batches, repeat, number, rpc) if rpc else \
        _run_on_board(artifact, x, batches, repeat, number, cpu) if cpu else \
        _run_here(artifact, x, batches, repeat, number)
    per_batch = reference_nodes(reference.onnx_model, [x[b * batch:(b + 1) * batch] for b in range(batches)])
    nodes = per_batch[0]
    mapped = map_kernels(run.outputs[0], nodes, int8_pins(run.outputs[0], nodes, record, reference.onnx_model))
    return Execution(record, where, cpu is not None, batches * batch, run, per_batch, mapped)


# ---- profile -----------------------------------------------------------------------------------------------

def _int8_layers(record) -> set[str]:
    q = record.quantization
    if q is None or not q.table:
        return set()
    return {name for entry in q.table.values() if entry.kind == "weight" for name in entry.layers}


def _bytes(m: Mapped, dtypes: dict[str, int], int8: bool) -> int:
    produced = {n.output for n in m.span}
    read = {t: e for n in m.span for t, e in n.inputs if t not in produced}
    weights = {w: b // 4 if int8 else b for n in m.span for w, b in n.weights}
    return int(sum(e * dtypes.get(t, 4) for t, e in read.items()) + sum(weights.values()) + m.output.nbytes)


def profile(artifact, reference, x: np.ndarray, board: str | None = None, repeat: int = 20, rpc=None) -> Profile:
    """Per-kernel latency of one inference of `artifact` on `x[:batch]` (here, on the emulated `board`, or on a
    board over `rpc`, a compiler.tuning.RpcBoard running mixer_edge.rpc_server), each kernel named after the
    layers of `reference` (an export.ModelSource of the float model)."""
    return _profile_of(_execute(artifact, reference, x, board, rpc, repeat, max_batches=1), artifact, repeat)


def look_inside(artifact, reference, x: np.ndarray, board: str | None = None, repeat: int = 20, rpc=None,
                data: str = "inputs") -> tuple[Profile, Comparison]:
    """`profile` and `compare` from one run of the artifact on `x` (timed on its first batch)."""
    done = _execute(artifact, reference, x, board, rpc, repeat)
    return _profile_of(done, artifact, repeat), _comparison_of(done, artifact, data)


def _profile_of(done: Execution, artifact, repeat: int) -> Profile:
    record, run, mapped = done.record, done.run, done.mapped
    if [s for s, _ in run.times] != [m.kernel for m in mapped]:
        raise MixerEdgeError(f"{artifact}: the kernels timed are not the kernels whose outputs were read")
    total = sum(ms for _, ms in run.times)
    int8_layers = _int8_layers(record)
    dtypes: dict[str, int] = {}
    rows = []
    for i, (m, (_, ms)) in enumerate(zip(mapped, run.times)):
        int8 = m.output.dtype == np.int32 or any(n.param and n.layer in int8_layers for n in m.span)
        flops = int(sum(n.flops for n in m.span))
        rows.append(KernelTime(index=i, kernel=m.kernel, layer=m.layer, tensor=m.node.output if m.node else None,
                               similarity=m.similarity, ms=ms, share=ms / total if total else 0.0, flops=flops,
                               bytes=_bytes(m, dtypes, int8), int8=int8,
                               gflops=flops / ms / 1e6 if ms > 0 and flops else None))
        if m.node is not None:
            dtypes[m.node.output] = m.output.dtype.itemsize
    layers: dict[str, list[KernelTime]] = {}
    for row in rows:
        layers.setdefault(row.layer, []).append(row)
    layer_rows = [LayerTime(layer=name, kernels=len(group), ms=sum(r.ms for r in group),
                            share=sum(r.share for r in group), flops=sum(r.flops for r in group),
                            int8=any(r.int8 for r in group),
                            gflops=sum(r.flops for r in group) / sum(r.ms for r in group) / 1e6
                            if sum(r.ms for r in group) > 0 and sum(r.flops for r in group) else None)
                  for name, group in layers.items()]
    return Profile(artifact=str(artifact), model=record.model.name, target=record.target.preset,
                   precision=record.precision.compute, where=done.where, emulated=done.emulated, repeat=repeat,
                   kernels=rows, layers=layer_rows, kernel_sum_ms=total, inference_ms=run.inference_ms,
                   matched=sum(m.node is not None for m in mapped))


# ---- compare -----------------------------------------------------------------------------------------------

def _in_reference_order(got: list[np.ndarray], refs: list[np.ndarray], floor: float) -> list[np.ndarray] | None:
    """Each of `refs` flattened in the order of `got` (one per batch): the axis permutation of their (squeezed)
    shape whose flat order correlates best with `got` over all batches; None if none correlates above `floor`
    (another layout, e.g. patches cut from an image)."""
    shapes = [np.squeeze(r) for r in refs]
    if shapes[0].ndim > 5:
        return None
    g = np.concatenate(got).astype(np.float64)
    best, best_cos = None, -1.0
    for perm in itertools.permutations(range(shapes[0].ndim)):
        flats = [np.transpose(r, perm).ravel().astype(np.float64) for r in shapes]
        cat = np.concatenate(flats)
        cos = _cosine(cat - cat.mean(), g - g.mean())
        if best is None or cos > best_cos:
            best, best_cos = flats, cos
    return best if best_cos > floor or shapes[0].ndim <= 1 else None


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return 1.0 if na == nb == 0 else 0.0 if na == 0 or nb == 0 else float(a @ b / na / nb)


def _aliases(node: Node, nodes: list[Node]) -> list[str]:
    """The node's output and the tensors that hold the same values through shape ops, either way."""
    names, by_output = [node.output], {n.output: n for n in nodes}
    for n in nodes:
        if n.op in SHAPE_OPS and n.inputs and n.inputs[0][0] in names:
            names.append(n.output)
    current = node
    while current.op in SHAPE_OPS and current.inputs and current.inputs[0][0] in by_output:
        current = by_output[current.inputs[0][0]]
        names.append(current.output)
    return names


def _dequantized(m: Mapped, nodes: list[Node], record, values: np.ndarray):
    """An integer kernel output in float, by the calibration table's scale and zero point of its tensor; None
    without one."""
    q = record.quantization
    table = q.table if q is not None and q.table else {}
    entry = next((table[t] for t in _aliases(m.node, nodes) if t in table and table[t].kind == "activation"), None)
    if entry is None:
        return None
    offset = 128 if m.output.dtype == np.uint8 and q.activations == "uint8" else 0  # uint8 = int8 + 128
    return (values.astype(np.float64) - offset - entry.zero_point) * entry.scale


def _input_entry(record, layer: str):
    q = record.quantization
    if q is None or not q.table:
        return None
    return next((e for e in q.table.values() if e.kind == "activation" and layer in e.layers), None)


COMPARED = ("float", "dequantized")


def _nsr(sqnr: float | None) -> float:
    return 0.0 if sqnr is None else 10 ** (-sqnr / 10)


def _db(nsr: float) -> float | None:
    return None if nsr <= 0 else float(-10 * np.log10(nsr))


def _consumer(record, tensor: str) -> str | None:
    q = record.quantization
    entry = q.table.get(tensor) if q is not None and q.table else None
    return entry.layers[0] if entry is not None and entry.kind == "activation" and entry.layers else None


def _kernel_error(i: int, m: Mapped, per_batch: list[list[Node]], run: Run, record) -> LayerError:
    """Kernel i's output on every batch against its matched reference tensor."""
    from .quant.sensitivity import sqnr_db

    base = dict(layer=m.layer, kernel=m.kernel, tensor=m.node.output if m.node else None)
    if m.node is None:
        return LayerError(**base, compared="unmatched")
    nodes = per_batch[0]
    j = nodes.index(m.node)
    got_parts, how = [], "float"
    for b in range(len(per_batch)):
        out = run.outputs[b][i][1]
        if out.dtype == np.int32:
            return LayerError(**base, compared="accumulator")
        if out.dtype.kind in "iu":
            out = _dequantized(m, nodes, record, out)
            if out is None:
                return LayerError(**base, compared="no scale")
            how = "dequantized"
        got_parts.append(out.astype(np.float64))
    # a kernel matched to the graph input only moved its values (a patch layout for the stem's matmul): it is
    # that input in some order of its axes, or a layout no axis order gives
    ref_parts = _in_reference_order(got_parts, [per_batch[b][j].value for b in range(len(per_batch))],
                                    floor=0.99 if m.node.op == "Input" else 0.2)
    if ref_parts is None:
        return LayerError(**base, compared="layout")
    got, ref = np.concatenate(got_parts), np.concatenate(ref_parts)
    return LayerError(**base, compared=how, cosine=_cosine(got, ref), sqnr_db=sqnr_db(ref, got),
                      max_abs_error=float(np.abs(got - ref).max()))


def compare(artifact, reference, x: np.ndarray, board: str | None = None, data: str = "inputs",
            rpc=None) -> Comparison:
    """Every layer's output of `artifact` on `x` (here, on the emulated `board` or over `rpc`) beside the float
    reference (`reference`, an export.ModelSource) on the same inputs: cosine, SQNR and max |error| per layer."""
    return _comparison_of(_execute(artifact, reference, x, board, rpc, repeat=0), artifact, data)


def _comparison_of(done: Execution, artifact, data: str) -> Comparison:
    record, run, mapped, per_batch = done.record, done.run, done.mapped, done.per_batch
    results = [_kernel_error(i, m, per_batch, run, record) for i, m in enumerate(mapped)]
    rows: dict[str, LayerError] = {}
    for row in results:  # a layer's row: its last compared kernel
        if row.layer not in rows or row.compared in COMPARED or rows[row.layer].compared not in COMPARED:
            rows[row.layer] = row
    # the int8 layers' added noise: where a layer's int8 input is compared (the kernel that quantizes it), the
    # noise power it adds over the last float output before it, as an SQNR (what the layer alone would cost)
    added, last_float = {}, None
    int8_layers = _int8_layers(record)
    for m, row in zip(mapped, results):
        if row.compared == "float":
            last_float = row
        elif row.compared == "dequantized" and m.node is not None:
            consumer = _consumer(record, m.node.output)
            if consumer in int8_layers and consumer not in added:
                before = _nsr(last_float.sqnr_db) if last_float is not None else 0.0
                added[consumer] = _db(max(_nsr(row.sqnr_db) - before, 0.0))
    ordered, previous, first_jump = [], None, None
    for row in rows.values():
        update = {}
        entry = _input_entry(record, row.layer)
        if entry is not None:
            update.update(scale=entry.scale, range=list(entry.range), observed=list(entry.observed))
        if row.layer in added:
            update["added_sqnr_db"] = added[row.layer]
        if row.compared in COMPARED:
            sqnr = row.sqnr_db if row.sqnr_db is not None else float("inf")
            if previous is not None and np.isfinite(previous):
                update["drop_db"] = previous - sqnr if np.isfinite(sqnr) else None
                if first_jump is None and update["drop_db"] is not None and update["drop_db"] > JUMP_DB \
                        and sqnr < JUMP_FLOOR_DB:
                    first_jump = row.layer
            previous = sqnr
        ordered.append(row.model_copy(update=update))
    worst = sorted((v if v is not None else float("inf"), k) for k, v in added.items())
    suggested = [k for v, k in worst[:SUGGESTED] if np.isfinite(v)]
    return Comparison(artifact=str(artifact), model=record.model.name, target=record.target.preset,
                      precision=record.precision.compute, where=done.where, emulated=done.emulated, data=data,
                      samples=done.samples, layers=ordered, first_jump=first_jump, suggested_float_layers=suggested)


# ---- the terminal's tables ---------------------------------------------------------------------------------

def _table(header: tuple, rows: list[tuple]) -> list[str]:
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    return ["  ".join(str(c).ljust(w) if k == 0 else str(c).rjust(w) for k, (c, w) in enumerate(zip(r, widths)))
            for r in (header, *rows)]


def _rate(value: float | None, int8: bool) -> str:
    return "" if value is None else f"{value:.2f} {'GOP/s' if int8 else 'GFLOP/s'}"


def format_profile(p: Profile) -> list[str]:
    """`mixer-edge profile`'s table: each kernel call, then each layer, then the totals."""
    mark = " (emulated: ranks kernels, not the board's speed)" if p.emulated else ""
    lines = [f"{p.artifact}: {p.model} {p.precision} for {p.target}, on {p.where}{mark}, median of {p.repeat}", ""]
    lines += _table(("#", "kernel", "layer", "ms", "share", "MFLOP", "KiB", "rate"),
                    [(r.index, r.kernel[:48], r.layer, f"{r.ms:.4f}", f"{r.share:.1%}", f"{r.flops / 1e6:.2f}",
                      f"{r.bytes / 1024:.1f}", _rate(r.gflops, r.int8)) for r in p.kernels])
    lines += [""] + _table(("layer", "kernels", "ms", "share", "rate"),
                           [(r.layer, r.kernels, f"{r.ms:.4f}", f"{r.share:.1%}", _rate(r.gflops, r.int8))
                            for r in p.layers])
    gap = p.kernel_sum_ms / p.inference_ms - 1 if p.inference_ms else 0.0
    lines += ["", f"kernels matched to the ONNX graph: {p.matched} of {len(p.kernels)}",
              f"sum of kernel times {p.kernel_sum_ms:.4f} ms; whole inference {p.inference_ms:.4f} ms "
              f"({gap:+.1%}; " + ("the rest is the runtime between kernels: dispatch, allocations)" if gap <= 0 else
                                  "each kernel timed alone pays its own launch and synchronisation)"),
              "slowest layers: " + ", ".join(f"{r.layer} ({r.ms:.3f} ms)" for r in p.slowest())]
    return lines


def _num(v, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def format_comparison(c: Comparison) -> list[str]:
    """`mixer-edge compare`'s table: each layer's error, then the first jump and the suggestion."""
    lines = [f"{c.artifact}: {c.model} {c.precision} for {c.target}, on {c.where}, against the float ONNX "
             f"(onnxruntime) on {c.samples} inputs of {c.data}", ""]
    lines += _table(("layer", "compared", "cosine", "SQNR dB", "max |err|", "added dB", "scale", "range"),
                    [(r.layer, r.compared, _num(r.cosine, ".6f"), "inf" if r.compared in ("float", "dequantized")
                      and r.sqnr_db is None else _num(r.sqnr_db, ".1f"), _num(r.max_abs_error, ".3g"),
                      _num(r.added_sqnr_db, ".1f"),
                      _num(r.scale, ".4g"), "" if r.range is None else f"[{r.range[0]:.3g}, {r.range[1]:.3g}]")
                     for r in c.layers])
    lines += ["", f"first jump (SQNR {c.jump_db:g} dB below the layer before, under {c.jump_floor_db:g} dB): "
              f"{c.first_jump or 'none'}",
              "worst SQNR: " + (", ".join(f"{r.layer} ({r.sqnr_db:.1f} dB)" for r in c.worst()) or "none")]
    if c.precision == "int8":
        lines.append("suggested float_layers (lowest added dB: the int8 inputs that add the most noise): "
                     + (json.dumps(c.suggested_float_layers) if c.suggested_float_layers else "none"))
    return lines
