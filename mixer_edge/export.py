"""torch -> ONNX (+ onnxsim) with a parity check, and the one entry point for "a model".

`open_model` turns whatever the user names (nothing = the bundled digits model, a preset plus
checkpoint, a mixer-edge .safetensors, or any Mixer ONNX) into a simplified ONNX graph plus
what the artifact must record about it (preset, config, preprocessing, labels).
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atomic import atomic_file
from .data import Preprocess, StatedPreprocessing
from .errors import MixerEdgeError, reason
from .formats import safe_text

OPSET = 18  # torch's exporter emits 18 natively; converting down to 17 fails on LayerNormalization
BUNDLED_CHECKPOINT = Path(__file__).parent / "weights" / "mixer_digits.safetensors"


@dataclass
class InputSpec:
    name: str
    shape: tuple  # ints; a str for a dynamic dimension
    dtype: str = "float32"
    layout: str = "NCHW"

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "layout": self.layout}


@dataclass
class ModelSource:
    """A model ready to compile: its ONNX graph and what the manifest records about it."""

    onnx_model: object  # onnx.ModelProto
    name: str
    preprocess: Preprocess
    labels: list[str]
    config: dict | None = None
    torch_model: object | None = None  # the reference, when the model came from PyTorch
    eval_data: str | None = None  # a data source (see data.load_inputs) the model was trained for
    export: dict = field(default_factory=dict)  # parity report of the torch -> ONNX step

    @property
    def input(self) -> InputSpec:
        return input_spec(self.onnx_model)


def export_onnx(model, path: str | Path, batch: int = 1, dynamic_batch: bool = False,
                simplify: bool = True, atol: float = 1e-4) -> dict:
    """Export a torch Mixer to ONNX at `path` (atomically) and check it against torch.

    Returns the parity report: opset, max |onnxruntime - torch| on random inputs, simplified or not.
    Raises if the difference exceeds `atol`.
    """
    import onnx
    import torch

    cfg = model.cfg
    example = torch.zeros(max(batch, 2) if dynamic_batch else batch, cfg.in_chans, cfg.img_size, cfg.img_size)
    dynamic = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" notes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model.eval(), (example,), dynamo=True, opset_version=OPSET,
                                    input_names=["input"], output_names=["logits"],
                                    dynamic_shapes=dynamic, external_data=False, verbose=False)
    proto = program.model_proto
    if simplify:
        import onnxsim

        proto, ok = onnxsim.simplify(proto)
        if not ok:
            raise MixerEdgeError("onnxsim could not validate the simplified graph: export with --no-simplify")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, cfg.in_chans, cfg.img_size, cfg.img_size)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    diff = float(np.abs(run_onnxruntime(proto, x) - ref).max())
    if not diff <= atol:  # NaN included
        raise MixerEdgeError(f"ONNX export differs from torch by {diff:.2e} (> {atol:.0e}): report this model")
    with atomic_file(path) as tmp:
        onnx.save(proto, str(tmp))
    return {"opset": OPSET, "simplified": simplify, "dynamic_batch": dynamic_batch, "max_abs_diff_vs_torch": diff}


def run_onnxruntime(proto, x: np.ndarray) -> np.ndarray:
    """First output of an ONNX model on input `x`, run by onnxruntime on the CPU (in chunks of a static batch)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    name, batch = sess.get_inputs()[0].name, sess.get_inputs()[0].shape[0]
    if not isinstance(batch, int) or batch == len(x):
        return sess.run(None, {name: x})[0]
    if len(x) % batch:
        raise MixerEdgeError(f"the model's static batch {batch} does not divide the {len(x)} inputs")
    return np.concatenate([sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def load_onnx(path: str | Path):
    """Read and check a user's ONNX file: one 4-D float image input, one output."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise MixerEdgeError(f"ONNX file {path} does not exist: check the path")
    try:
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise MixerEdgeError(f"ONNX file {path} is not a valid model ({reason(exc)}): re-export it") from exc
    check_finite_weights(proto, path)
    initializers = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(proto.graph.output) != 1:
        raise MixerEdgeError(f"ONNX file {path} has {len(inputs)} inputs and {len(proto.graph.output)} outputs: "
                             "a Mixer classifier takes one image tensor and returns one logits tensor")
    spec = input_spec(proto)
    if len(spec.shape) != 4 or inputs[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise MixerEdgeError(f"ONNX file {path} input '{spec.name}' is {spec.dtype}{list(spec.shape)}: "
                             "expected a float32 NCHW image batch")
    if not all(isinstance(d, int) and d > 0 for d in spec.shape[1:]):
        raise MixerEdgeError(f"ONNX file {path} input '{spec.name}' has symbolic channels or size {list(spec.shape)}: "
                             "export it with a fixed image size (only the batch may be dynamic)")
    check_mixer(proto, path)
    return linear_forms(proto)


def linear_forms(proto):
    """`proto` with every linear layer spelled as a MatMul, the form int8 quantization and lowering know:
    constant tensors held by Constant nodes become initializers; a Conv with a 1-wide 1-D kernel (lucidrains'
    token mixing, `Conv1d(n, m, 1)`) becomes MatMul(W, x) (+ bias); an Einsum of an activation and a 2-D
    weight becomes MatMul with the transposes it needs. A weight another node also reads is left as it is."""
    import onnx
    from onnx import helper, numpy_helper

    graph = proto.graph
    for node in [n for n in graph.node if n.op_type == "Constant" and proto.ir_version >= 4]:
        value = next((a.t for a in node.attribute if a.name == "value"), None)
        if value is not None and len(value.dims) >= 1 and value.data_type == onnx.TensorProto.FLOAT:
            graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(value), node.output[0]))
            graph.node.remove(node)
    inits = {i.name: i for i in graph.initializer}
    reads: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            reads[name] = reads.get(name, 0) + 1

    def own(name: str):  # the node's weight as an array, if it is an initializer no other node reads
        return numpy_helper.to_array(inits[name]) if name in inits and reads[name] == 1 else None

    def replace(name: str, array: np.ndarray) -> None:  # a weight reshaped: so is any shape stated for it
        inits[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array), name))
        for info in [*graph.value_info, *graph.input]:
            if info.name == name:
                info.type.tensor_type.shape.CopyFrom(helper.make_tensor_type_proto(1, array.shape).tensor_type.shape)

    nodes = []
    for node in graph.node:
        rewritten = None
        if node.op_type == "Conv":
            rewritten = _conv1x1_as_matmul(node, own, replace, helper)
        elif node.op_type == "Einsum" and len(node.input) == 2:
            rewritten = _einsum_as_matmul(node, own, replace, helper)
        nodes.extend(rewritten or [node])
    del graph.node[:]
    graph.node.extend(nodes)
    return proto


def _conv1x1_as_matmul(node, own, replace, helper):
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    weight = own(node.input[1])
    if weight is None or weight.ndim != 3 or weight.shape[2] != 1 or attrs.get("group", 1) != 1 \
            or any(attrs.get("pads", [0])) or any(v != 1 for k in ("strides", "dilations") for v in attrs.get(k, [1])) \
            or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID"):
        return None
    replace(node.input[1], weight[:, :, 0])
    if len(node.input) < 3 or not node.input[2]:
        return [helper.make_node("MatMul", [node.input[1], node.input[0]], list(node.output), name=node.name)]
    bias = own(node.input[2])
    if bias is None:
        return None
    replace(node.input[2], bias.reshape(-1, 1))
    product = f"{node.output[0]}_matmul"
    return [helper.make_node("MatMul", [node.input[1], node.input[0]], [product], name=node.name),
            helper.make_node("Add", [product, node.input[2]], list(node.output), name=f"{node.name}_bias")]


def _einsum_as_matmul(node, own, replace, helper):
    equation = next(a.s.decode() for a in node.attribute if a.name == "equation").replace(" ", "")
    terms, _, out = equation.partition("->")
    terms = terms.split(",")
    which = [i for i in (0, 1) if own(node.input[i]) is not None and own(node.input[i]).ndim == 2]
    if len(terms) != 2 or len(which) != 1 or not all(t.isalpha() and len(set(t)) == len(t) for t in [*terms, out]):
        return None
    w_term, x_term, x = terms[which[0]], terms[1 - which[0]], node.input[1 - which[0]]
    shared = [c for c in w_term if c in x_term and c not in out]
    k = shared[0] if len(shared) == 1 else None
    m = next((c for c in w_term if c != k), None)
    rest = x_term.replace(k, "") if k else ""
    if k is None or m in x_term or m not in out or sorted(out) != sorted(rest + m):
        return None
    weight = own(node.input[which[0]])
    km = weight if w_term == k + m else weight.T  # [k, m]
    name, y = node.name or node.output[0], node.output[0]
    if x_term[-2:] == k + x_term[-1:] and len(x_term) >= 2 and out == x_term[:-2] + m + x_term[-1]:
        replace(node.input[which[0]], km.T)  # W.X: tokens mixed in place, no transposes
        return [helper.make_node("MatMul", [node.input[which[0]], x], [y], name=name)]
    replace(node.input[which[0]], km)
    made = []
    if x_term != rest + k:
        made.append(helper.make_node("Transpose", [x], [f"{y}_in"], name=f"{name}_in",
                                     perm=[x_term.index(c) for c in rest + k]))
        x = f"{y}_in"
    product = y if out == rest + m else f"{y}_matmul"
    made.append(helper.make_node("MatMul", [x, node.input[which[0]]], [product], name=name))
    if product != y:
        made.append(helper.make_node("Transpose", [product], [y], name=f"{name}_out",
                                     perm=[(rest + m).index(c) for c in out]))
    return made


def check_onnxruntime_runs(proto, path) -> None:
    """Refuse a graph onnxruntime cannot load: every build is checked against it, so it must run there."""
    import onnxruntime as ort

    try:
        ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise MixerEdgeError(f"ONNX file {path} is refused by onnxruntime ({reason(exc, last=True)}), which checks "
                             "every build: re-export it with a standard opset") from exc


def check_finite_weights(proto, path) -> None:
    """Refuse a graph whose weights (initializers, Constant nodes' tensors) hold NaN or Inf, naming the first."""
    from onnx import numpy_helper

    tensors = [(f"initializer '{i.name}'", i) for i in proto.graph.initializer]
    tensors += [(f"Constant node '{n.name or n.output[0]}'", a.t) for n in proto.graph.node if n.op_type == "Constant"
                for a in n.attribute if a.name == "value"]
    for what, tensor in tensors:
        try:
            array = numpy_helper.to_array(tensor)
        except Exception:  # a type numpy cannot hold (e.g. float8): onnxruntime and TVM judge it
            continue
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            raise MixerEdgeError(f"ONNX file {path}: {safe_text(what, 120)} holds NaN or Inf values: re-export it "
                                 "from finite weights")


def check_mixer(proto, path) -> None:
    """Refuse a graph that is not a Mixer classifier, naming what gives it away: logits that are not
    [batch, classes], a convolution with overlapping windows (a CNN), softmax attention (a transformer)."""
    fix = "mixer-edge compiles MLP-Mixer classifiers only: pass a Mixer's ONNX"
    output = proto.graph.output[0].type.tensor_type
    if output.HasField("shape") and len(output.shape.dim) != 2:
        raise MixerEdgeError(f"ONNX file {path} returns a {len(output.shape.dim)}-D tensor, not [batch, classes] "
                             f"logits: {fix}")
    weight_dims = {i.name: list(i.dims) for i in proto.graph.initializer}
    matmul_inputs = {name for n in proto.graph.node if n.op_type == "MatMul" for name in n.input}
    for i, node in enumerate(proto.graph.node):
        where = f"{node.op_type} '{node.name}'" if node.name else f"{node.op_type} node #{i}"
        if node.op_type == "Conv":
            attrs = {a.name: list(a.ints) for a in node.attribute}
            kernel = attrs.get("kernel_shape") or weight_dims.get(node.input[1], [])[2:]
            strides = attrs.get("strides") or [1] * len(kernel)
            if any(k > 1 for k in kernel) and kernel != strides:
                raise MixerEdgeError(f"ONNX file {path} is not an MLP-Mixer: {where} slides a "
                                     f"{'x'.join(map(str, kernel))} kernel with stride {'x'.join(map(str, strides))} "
                                     f"(a convolutional network; a Mixer's only convolution cuts whole patches): {fix}")
        if node.op_type == "Softmax" and node.output[0] in matmul_inputs:
            raise MixerEdgeError(f"ONNX file {path} is not an MLP-Mixer: {where} feeds a MatMul "
                                 f"(self-attention, a transformer): {fix}")


def input_spec(proto) -> InputSpec:
    import onnx

    initializers = {i.name for i in proto.graph.initializer}
    graph_input = next(i for i in proto.graph.input if i.name not in initializers)
    tensor_type = graph_input.type.tensor_type
    shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor_type.shape.dim)
    return InputSpec(graph_input.name, shape, onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name)


def assumed_preprocess(size: tuple[int, int], channels: int) -> Preprocess:
    """What mixer-edge assumes where nothing states the preprocessing: mean 0.5, std 0.5, bilinear, no crop."""
    return Preprocess(size=tuple(size), channels=channels, mean=(0.5,) * channels, std=(0.5,) * channels,
                      assumed=True)


def preset_preprocess(name: str, cfg) -> Preprocess:
    """The preprocessing of preset `name`'s official weights (model.PREPROCESSING) for a model of config `cfg`, else
    the assumed one."""
    from .model import PREPROCESSING

    own = PREPROCESSING.get(name)
    size = (cfg.img_size, cfg.img_size)
    if own and len(own["mean"]) == cfg.in_chans:
        return Preprocess(size=size, channels=cfg.in_chans, **own)
    return assumed_preprocess(size, cfg.in_chans)


def open_model(model: str | None = None, checkpoint: str | None = None, batch: int = 1,
               dynamic_batch: bool = False, num_classes: int | None = None, progress=print,
               preprocess: StatedPreprocessing | None = None) -> ModelSource:
    """Resolve the user's model arguments into a ModelSource (see the module docstring); `preprocess`: what the
    user stated about the preprocessing, over the model's own (a checkpoint's, a preset's) or the assumed one."""
    import torch

    from . import checkpoints
    from .model import MixerConfig, create_model, preset

    stated = preprocess or StatedPreprocessing()

    if model and model.lower().endswith(".onnx"):
        if checkpoint:
            raise MixerEdgeError("--checkpoint goes with a preset name, not with an ONNX file: drop one of them")
        proto = load_onnx(model)
        spec = input_spec(proto)
        channels, size = spec.shape[1], tuple(spec.shape[2:])
        out_dim = proto.graph.output[0].type.tensor_type.shape.dim[-1].dim_value
        if out_dim < 1:
            raise MixerEdgeError(f"ONNX file {model} has no fixed number of classes (its output is "
                                 f"{safe_text(str(proto.graph.output[0].type.tensor_type.shape.dim), 80)}): export it "
                                 "with a fixed classifier size")
        check_onnxruntime_runs(proto, model)
        pre = stated.settle(assumed_preprocess(size, channels), progress)
        return ModelSource(proto, Path(model).stem, pre, [str(i) for i in range(out_dim)])

    checkpoint = checkpoint or (None if model else str(BUNDLED_CHECKPOINT))
    meta = checkpoints.checkpoint_metadata(checkpoint) if checkpoint else None  # None: not written by mixer-edge
    name = model or (meta.preset if meta else None)
    if not name:
        raise MixerEdgeError(f"checkpoint {checkpoint} does not say its preset: pass --model PRESET")
    overrides = {"num_classes": num_classes} if num_classes else {}
    if meta and meta.config and name == meta.preset:
        cfg = MixerConfig.from_dict({**meta.config.model_dump(), **overrides})
    else:
        cfg = preset(name, **overrides)
    if checkpoint:
        progress(f"loading checkpoint {checkpoint}")
        torch_model = checkpoints.load_checkpoint(checkpoint, cfg)
    else:
        progress(f"no checkpoint given: {name} gets random weights, seed 0 (fine for latency, not for accuracy)")
        torch.manual_seed(0)  # the same weights in every build, so builds can be compared with each other
        torch_model = create_model(cfg).eval()
    # The checkpoint's preprocessing and labels, where they fit the model being built (another --model or
    # --num-classes than the checkpoint's makes a model they may not fit), else the preset's (its official
    # weights'), else the assumed one; what the user stated goes over it.
    fits = meta and meta.preprocess and (meta.preprocess.channels, meta.preprocess.size) == (cfg.in_chans,
                                                                                          [cfg.img_size] * 2)
    pre = stated.settle(meta.preprocess.to_preprocess() if fits else preset_preprocess(name, cfg), progress)
    labels = list(meta.labels) if meta and meta.labels and len(meta.labels) == cfg.num_classes else \
        [str(i) for i in range(cfg.num_classes)]
    progress(f"exporting {name} to ONNX (opset {OPSET}) and simplifying with onnxsim")
    with tempfile.TemporaryDirectory() as tmp:
        report = export_onnx(torch_model, Path(tmp) / "model.onnx", batch=batch, dynamic_batch=dynamic_batch)
        proto = load_onnx(Path(tmp) / "model.onnx")
    progress(f"ONNX parity vs torch: max |diff| = {report['max_abs_diff_vs_torch']:.2e}")
    eval_data = "digits-test" if meta and (meta.dataset or "").startswith("sklearn digits") else None
    return ModelSource(proto, name, pre, labels, config=cfg.to_dict(), torch_model=torch_model, export=report,
                       eval_data=eval_data)
