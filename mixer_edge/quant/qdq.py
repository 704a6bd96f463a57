"""Post-training int8 quantization of a Mixer ONNX into a standard QDQ ONNX and a calibration table.

Every MatMul/Gemm/Conv with a constant weight (token- and channel-mixing MLPs, stem, head; a weight on
the left, W.X, included) gets
int8 weights, symmetric per output channel, behind a DequantizeLinear, and its activation input a
QuantizeLinear -> DequantizeLinear pair with the recipe's observer's range (int8 per tensor).
LayerNorm, GELU and the residual adds stay float unless a recipe's `int8_ops` names them (per kind
and layer-name prefix): then their input (LayerNorm, GELU) or output (residual add) gets a Q/DQ
pair too, so the op sees int8-rounded values, as an integer kernel would. onnxruntime runs the
result as is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import MixerEdgeError
from .calibration import Recipe
from .observers import Histogram, activation_qparams, observe, quantize, weight_qparams

QUANTIZABLE = ("MatMul", "Gemm", "Conv")
SHAPE_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten")


@dataclass(frozen=True)
class Layer:
    """One quantizable operator: its weight and the activation it multiplies."""

    name: str  # the model's layer name, e.g. blocks.0.mlp_channels.fc1
    node: str
    activation: str
    weight: str
    axis: int  # the weight's output-channel axis


def param_layer(node, inits) -> str | None:
    """The layer a node belongs to by its parameters' names: X for an input initializer X.weight or X.bias."""
    named = [n for n in node.input if n in inits and n.rsplit(".", 1)[-1] in ("weight", "bias")]
    return named[0].rsplit(".", 1)[0] if named else None


def layers(proto) -> list[Layer]:
    """The quantizable operators of `proto`, in graph order."""
    from onnx import helper

    inits = {i.name for i in proto.graph.initializer}
    found = []
    for node in proto.graph.node:
        if node.op_type not in QUANTIZABLE or len(node.input) < 2:
            continue
        data, weight = node.input[0], node.input[1]
        if node.op_type == "MatMul" and data in inits and weight not in inits:
            data, weight = weight, data  # W.X: the weight on the left (export.linear_forms)
        if weight not in inits or data in inits:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Conv" or weight == node.input[0]:
            axis = 0
        elif node.op_type == "Gemm":
            axis = 0 if attrs.get("transB", 0) else 1
        else:
            axis = -1
        found.append(Layer(param_layer(node, inits) or node.name, node.name, data, weight, axis))
    if not found:
        raise MixerEdgeError("the model has no MatMul/Gemm/Conv with constant weights to quantize: is it a Mixer?")
    return found


@dataclass(frozen=True)
class OpSite:
    """A float op that a recipe's `int8_ops` can put in int8: the tensor that gets Q/DQ and who reads it."""

    name: str  # e.g. blocks.0.norm1, blocks.0.mlp_tokens.act (GELU), blocks.0.mlp_tokens.residual
    kind: str  # layernorm, gelu or residual (calibration.INT8_OPS)
    tensor: str  # LayerNorm's and GELU's input, the residual add's output
    consumers: tuple[str, ...]  # the nodes that then read its int8 version


def op_sites(proto, found: list[Layer]) -> list[OpSite]:
    """The LayerNorms, GELUs (Gelu, or the Erf form torch exports) and residual adds of `proto` (named nodes),
    named after the model's layers where the weights have names."""
    graph = proto.graph
    constants = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.name)
    position = {layer.node: i for i, layer in enumerate(found)}

    def layer_above(tensor):  # the quantizable layer that computed `tensor`, through reshapes and transposes
        node = producer.get(tensor)
        while node is not None and node.name not in position and node.op_type in SHAPE_OPS:
            node = producer.get(node.input[0])
        return found[position[node.name]] if node is not None and node.name in position else None

    sites = []
    for node in graph.node:
        if node.op_type == "LayerNormalization":
            weight = node.input[1] if len(node.input) > 1 else ""
            sites.append(OpSite(weight.removesuffix(".weight") if weight.endswith(".weight") else node.name,
                                "layernorm", node.input[0], (node.name,)))
        elif node.op_type in ("Gelu", "Erf"):
            x = node.input[0]
            if node.op_type == "Erf":  # x * 0.5 * (1 + erf(x / sqrt(2))): x is the scaled input's other operand
                x = next((i for i in producer[x].input if i not in constants), x) if x in producer else x
            fc = layer_above(x)
            name = fc.name.rsplit(".", 1)[0] + ".act" if fc and "." in fc.name else node.name
            sites.append(OpSite(name, "gelu", x, tuple(readers[x])))
        elif node.op_type == "Add" and len(node.input) == 2 and not constants & set(node.input) \
                and all(i in producer for i in node.input):
            branch = max((layer for layer in map(layer_above, node.input) if layer), key=lambda l: position[l.node],
                         default=None)  # the residual branch is the one computed last
            name = branch.name.rsplit(".", 1)[0] + ".residual" if branch and "." in branch.name else node.name
            sites.append(OpSite(name, "residual", node.output[0], tuple(readers.get(node.output[0], ()))))
    return [site for site in sites if site.consumers]


def chosen_sites(proto, found: list[Layer], recipe: Recipe) -> list[OpSite]:
    """The op sites the recipe's `int8_ops` entries (KIND or KIND:NAME_PREFIX) select; refused if one selects none,
    as is a `float_layers` entry that names no layer of the model."""
    where = recipe.source or f"recipe {recipe.name}"
    for entry in recipe.float_layers:
        if not any(layer.name.startswith(entry) for layer in found):
            names = [layer.name for layer in found]
            names = names if len(names) <= 6 else [*names[:4], "...", names[-1]]
            raise MixerEdgeError(f"{where}: float_layers entry '{entry}' matches no layer of the model "
                                 f"(its layers: {', '.join(names)}): "
                                 "give a layer name or name prefix, e.g. \"head\" or \"blocks.0.\"")
    sites = op_sites(proto, found) if recipe.int8_ops else []
    chosen: dict[str, OpSite] = {}
    for entry in recipe.int8_ops:
        kind, _, prefix = entry.partition(":")
        matched = [s for s in sites if s.kind == kind and s.name.startswith(prefix)]
        if not matched:
            names = [s.name for s in sites if s.kind == kind]
            raise MixerEdgeError(f"recipe {recipe.name}: int8_ops entry '{entry}' matches no {kind} of the model "
                                 f"(its {kind} ops: {', '.join(names[:4]) or 'none'}{', ...' if len(names) > 4 else ''})")
        chosen.update((s.name + s.tensor, s) for s in matched)
    return list(chosen.values())


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
    sites = chosen_sites(proto, found, recipe)
    tensors = list(dict.fromkeys([l.activation for l in chosen] + [s.tensor for s in sites]))
    hists = activation_histograms(proto, tensors, x, recipe.symmetric, progress)
    qdq, table = build_qdq(proto, chosen, hists, recipe, sites)
    progress(f"quantized {len(chosen)} of {len(found)} layers to int8 ({recipe.name} recipe, "
             f"{recipe.observer} observer)" + (f"; int8 inputs/outputs for {len(sites)} LayerNorm/GELU/residual ops"
                                               if sites else ""))
    return qdq, table


def build_qdq(proto, chosen: list[Layer], hists: dict, recipe: Recipe, sites: list[OpSite] = ()):
    """`proto` (with node names) with the `chosen` layers in int8 and Q/DQ at the op `sites`, activation
    ranges from `hists`."""
    import onnx
    from onnx import helper, numpy_helper

    uses: dict[str, list[tuple[str, str]]] = {}  # activation -> (reading node, layer or op name)
    for layer in chosen:
        uses.setdefault(layer.activation, []).append((layer.node, layer.name))
    for site in sites:
        uses.setdefault(site.tensor, []).extend((node, site.name) for node in site.consumers)
    position = {node.name: i for i, node in enumerate(proto.graph.node)}
    table: dict[str, dict] = {}
    inits = {i.name: i for i in proto.graph.initializer}
    new_inits, qdq_nodes = [], {}  # consumer node name -> Q/DQ nodes to emit before it
    rename = {}  # (node name, old input) -> new input

    for tensor, users in uses.items():
        lo, hi = observe(recipe.observer, hists[tensor], recipe.percentile)
        scale, zero = activation_qparams(lo, hi, recipe.symmetric)
        table[tensor] = {"kind": "activation", "layers": list(dict.fromkeys(name for _, name in users)),
                         "scale": scale, "zero_point": zero, "observer": recipe.observer, "range": [lo, hi],
                         "observed": [hists[tensor].lo, hists[tensor].hi]}
        new_inits += [numpy_helper.from_array(np.array(scale, np.float32), f"{tensor}_scale"),
                      numpy_helper.from_array(np.array(zero, np.int8), f"{tensor}_zero_point")]
        first = min((node for node, _ in users), key=position.__getitem__)
        qdq_nodes.setdefault(first, []).extend([
            helper.make_node("QuantizeLinear", [tensor, f"{tensor}_scale", f"{tensor}_zero_point"], [f"{tensor}_q"],
                             name=f"{tensor}_QuantizeLinear"),
            helper.make_node("DequantizeLinear", [f"{tensor}_q", f"{tensor}_scale", f"{tensor}_zero_point"],
                             [f"{tensor}_dq"], name=f"{tensor}_DequantizeLinear")])
        for node, _ in users:
            rename[(node, tensor)] = f"{tensor}_dq"

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
