"""Post-training int8 quantization of a Mixer ONNX into a standard QDQ ONNX and a calibration table.

Every MatMul/Gemm/Conv with a constant weight (token- and channel-mixing MLPs, stem, head) gets
int8 weights, symmetric per output channel, behind a DequantizeLinear, and its activation input a
QuantizeLinear -> DequantizeLinear pair with the recipe's observer's range (int8 per tensor).
LayerNorm, GELU and the residual adds stay float. onnxruntime runs the result as is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import MixerEdgeError
from .calibration import Recipe
from .observers import Histogram, activation_qparams, observe, quantize, weight_qparams

QUANTIZABLE = ("MatMul", "Gemm", "Conv")


@dataclass(frozen=True)
class Layer:
    """One quantizable operator: its weight and the activation it multiplies."""

    name: str  # the model's layer name, e.g. blocks.0.mlp_channels.fc1
    node: str
    activation: str
    weight: str
    axis: int  # the weight's output-channel axis


def layers(proto) -> list[Layer]:
    """The quantizable operators of `proto`, in graph order."""
    from onnx import helper

    inits = {i.name for i in proto.graph.initializer}
    found = []
    for node in proto.graph.node:
        if node.op_type not in QUANTIZABLE or len(node.input) < 2:
            continue
        data, weight = node.input[0], node.input[1]
        if weight not in inits or data in inits:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Conv":
            axis = 0
        elif node.op_type == "Gemm":
            axis = 0 if attrs.get("transB", 0) else 1
        else:
            axis = -1
        named = [n for n in node.input if n in inits and n.rsplit(".", 1)[-1] in ("weight", "bias")]
        name = named[0].rsplit(".", 1)[0] if named else node.name
        found.append(Layer(name, node.name, data, weight, axis))
    if not found:
        raise MixerEdgeError("the model has no MatMul/Gemm/Conv with constant weights to quantize: is it a Mixer?")
    return found


def kept_in_float(layer: Layer, recipe: Recipe) -> bool:
    return any(layer.name == p or layer.name.startswith(p) for p in recipe.float_layers)


def activation_histograms(proto, tensors: list[str], x: np.ndarray, symmetric: bool, progress=print) -> dict:
    """A Histogram per tensor over the calibration inputs `x` (two onnxruntime passes: range, then counts)."""
    import onnx
    import onnxruntime as ort
    from tqdm import tqdm

    from ..export import input_spec

    if not tensors:
        return {}
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in tensors)
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    spec = input_spec(proto)
    if isinstance(spec.shape[0], int):  # a static batch: whole batches only
        batch = spec.shape[0]
        if len(x) < batch:
            raise MixerEdgeError(f"the model's static batch is {batch}: calibrate with at least {batch} samples")
        chunks = [x[i:i + batch] for i in range(0, len(x) - batch + 1, batch)]
    else:
        chunks = [x[i:i + 32] for i in range(0, len(x), 32)]

    def outputs(desc):
        for chunk in tqdm(chunks, desc=desc, unit="batch", leave=False, disable=None):
            yield sess.run(None, {spec.name: chunk})

    lo = {t: np.inf for t in tensors}
    hi = {t: -np.inf for t in tensors}
    for outs in outputs("calibration ranges"):
        for t, v in zip(tensors, outs):
            lo[t], hi[t] = min(lo[t], float(v.min())), max(hi[t], float(v.max()))
    hists = {t: Histogram.empty(lo[t], hi[t], symmetric) for t in tensors}
    for outs in outputs("calibration histograms"):
        for t, v in zip(tensors, outs):
            hists[t].add(v)
    progress(f"observed {len(tensors)} activations over {sum(len(c) for c in chunks)} samples")
    return hists


def with_node_names(proto):
    """A copy of `proto` whose nodes all have names (Q/DQ placement goes by node name)."""
    import onnx

    named = onnx.ModelProto()
    named.CopyFrom(proto)
    for i, node in enumerate(named.graph.node):
        node.name = node.name or f"{node.op_type}_{i}"
    return named


def quantize_model(proto, x: np.ndarray, recipe: Recipe, progress=print):
    """The QDQ ONNX of `proto` calibrated on `x` with `recipe`, and its calibration table."""
    proto = with_node_names(proto)
    found = layers(proto)
    chosen = [layer for layer in found if not kept_in_float(layer, recipe)]
    hists = activation_histograms(proto, list(dict.fromkeys(l.activation for l in chosen)), x, recipe.symmetric,
                                  progress)
    qdq, table = build_qdq(proto, chosen, hists, recipe)
    progress(f"quantized {len(chosen)} of {len(found)} layers to int8 ({recipe.name} recipe, "
             f"{recipe.observer} observer)")
    return qdq, table


def build_qdq(proto, chosen: list[Layer], hists: dict, recipe: Recipe):
    """`proto` (with node names) with the `chosen` layers in int8, activation ranges from `hists`."""
    import onnx
    from onnx import helper, numpy_helper

    activations = list(dict.fromkeys(layer.activation for layer in chosen))
    table: dict[str, dict] = {}
    inits = {i.name: i for i in proto.graph.initializer}
    new_inits, qdq_nodes = [], {}  # consumer node name -> Q/DQ nodes to emit before it
    rename = {}  # (node name, old input) -> new input

    for tensor in activations:
        lo, hi = observe(recipe.observer, hists[tensor], recipe.percentile)
        scale, zero = activation_qparams(lo, hi, recipe.symmetric)
        users = [layer for layer in chosen if layer.activation == tensor]
        table[tensor] = {"kind": "activation", "layers": [u.name for u in users], "scale": scale, "zero_point": zero,
                         "observer": recipe.observer, "range": [lo, hi], "observed": [hists[tensor].lo, hists[tensor].hi]}
        new_inits += [numpy_helper.from_array(np.array(scale, np.float32), f"{tensor}_scale"),
                      numpy_helper.from_array(np.array(zero, np.int8), f"{tensor}_zero_point")]
        qdq_nodes.setdefault(users[0].node, []).extend([
            helper.make_node("QuantizeLinear", [tensor, f"{tensor}_scale", f"{tensor}_zero_point"], [f"{tensor}_q"],
                             name=f"{tensor}_QuantizeLinear"),
            helper.make_node("DequantizeLinear", [f"{tensor}_q", f"{tensor}_scale", f"{tensor}_zero_point"],
                             [f"{tensor}_dq"], name=f"{tensor}_DequantizeLinear")])
        for u in users:
            rename[(u.node, tensor)] = f"{tensor}_dq"

    for layer in chosen:
        w = numpy_helper.to_array(inits[layer.weight]).astype(np.float32)
        axis = layer.axis % w.ndim
        scales = weight_qparams(w, axis)
        q = quantize(w, scales, np.zeros_like(scales), axis)
        prefix = f"{layer.weight}_{layer.node}"
        new_inits += [numpy_helper.from_array(q, f"{prefix}_q"), numpy_helper.from_array(scales, f"{prefix}_scale"),
                      numpy_helper.from_array(np.zeros(len(scales), np.int8), f"{prefix}_zero_point")]
        qdq_nodes.setdefault(layer.node, []).append(
            helper.make_node("DequantizeLinear", [f"{prefix}_q", f"{prefix}_scale", f"{prefix}_zero_point"],
                             [f"{prefix}_dq"], name=f"{prefix}_DequantizeLinear", axis=axis))
        rename[(layer.node, layer.weight)] = f"{prefix}_dq"
        table[layer.weight] = {"kind": "weight", "layers": [layer.name], "scheme": "symmetric per channel",
                               "axis": axis, "channels": len(scales), "scale_min": float(scales.min()),
                               "scale_max": float(scales.max()), "observer": "absmax", "range": [float(w.min()), float(w.max())]}

    out = onnx.ModelProto()
    out.CopyFrom(proto)
    nodes = []
    for node in out.graph.node:
        nodes.extend(qdq_nodes.get(node.name, []))
        for i, name in enumerate(node.input):
            node.input[i] = rename.get((node.name, name), name)
        nodes.append(node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    used = {n for node in out.graph.node for n in node.input}
    kept = [i for i in out.graph.initializer if i.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept + new_inits)
    onnx.checker.check_model(out)
    return out, table
