"""torch -> ONNX, and other people's Mixer ONNX graphs compiled by TVM."""

import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from mixer_edge import runtime
from mixer_edge.compiler import compile_model
from mixer_edge.errors import MixerEdgeError
from mixer_edge.export import export_onnx, load_onnx, open_model, run_onnxruntime
from mixer_edge.model import create_model
from mixer_edge.runtime import load

from conftest import quiet


class ForeignMixer(nn.Module):
    """A Mixer written the way lucidrains/mlp-mixer-pytorch does it: reshape-based patch embedding
    (einops rearrange), Conv1d(kernel 1) token mixing over the patch axis, and a Reduce-mean head."""

    def __init__(self, image=16, patch=4, chans=3, dim=24, depth=2, classes=5):
        super().__init__()
        self.patch, tokens = patch, (image // patch) ** 2
        self.embed = nn.Linear(patch * patch * chans, dim)
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            self.blocks.append(nn.ModuleList([
                nn.LayerNorm(dim),
                nn.Sequential(nn.Conv1d(tokens, tokens * 4, 1), nn.GELU(), nn.Conv1d(tokens * 4, tokens, 1)),
                nn.LayerNorm(dim),
                nn.Sequential(nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim)),
            ]))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x):
        b, c, h, w = x.shape
        p = self.patch  # 'b c (h p1) (w p2) -> b (h w) (p1 p2 c)'
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)
        x = self.embed(x)
        for norm1, tokens, norm2, channels in self.blocks:
            x = x + tokens(norm1(x))
            x = x + channels(norm2(x))
        return self.head(self.norm(x).mean(dim=1))  # Reduce('b n c -> b c', 'mean')


def export_foreign(path, dynamo: bool):
    torch.manual_seed(0)
    model = ForeignMixer().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, 16, 16),), str(path), dynamo=dynamo, opset_version=18 if dynamo else 17,
                          input_names=["pixels"], output_names=["scores"], external_data=False)
    return model


@pytest.mark.parametrize("dynamo", [True, False], ids=["torch.export-opset18", "torchscript-opset17"])
def test_foreign_mixer_onnx_compiles_and_matches_onnxruntime(tmp_path, dynamo):
    export_foreign(tmp_path / "foreign.onnx", dynamo)
    ops = {n.op_type for n in onnx.load(tmp_path / "foreign.onnx").graph.node}
    assert "Conv" in ops and "ReduceMean" in ops  # Conv1d token mixing, mean head
    source = open_model(str(tmp_path / "foreign.onnx"), progress=quiet)
    assert source.input.name == "pixels" and len(source.labels) == 5
    manifest = compile_model(source, "host", tmp_path / "art", progress=quiet)
    assert manifest["verification"]["reference"] == "onnxruntime"
    x = np.random.default_rng(1).standard_normal((6, 3, 16, 16)).astype(np.float32)
    expected = np.concatenate([run_onnxruntime(source.onnx_model, x[i:i + 1]) for i in range(6)])
    got = load(tmp_path / "art")(x)
    assert np.abs(got - expected).max() < 1e-4


def test_export_parity_and_dynamic_batch(tmp_path):
    model = create_model("mixer_tiny").eval()
    report = export_onnx(model, tmp_path / "t.onnx", dynamic_batch=True)
    assert report["opset"] >= 17 and report["max_abs_diff_vs_torch"] < 1e-4
    proto = load_onnx(tmp_path / "t.onnx")
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        assert np.abs(run_onnxruntime(proto, x) - model(torch.from_numpy(x)).numpy()).max() < 1e-4
    assert [p.name for p in tmp_path.iterdir()] == ["t.onnx"]


def test_static_batch_graph_runs_another_batch_only_in_passes(tmp_path, digits_source, digits_test, torch_logits):
    """A graph fixed at batch 1 builds batch 4 for a CPU (four passes of one image); a GPU build refuses it."""
    manifest = compile_model(digits_source, "host", tmp_path / "a", batch=4, progress=quiet)
    assert manifest["build"]["images_per_pass"] == 1 and manifest["input"]["shape"][0] == 4
    np.testing.assert_allclose(runtime.load(tmp_path / "a")(digits_test[0]), torch_logits, rtol=0, atol=1e-4)
    with pytest.raises(MixerEdgeError, match="fixed batch of 1, not 4"):
        compile_model(digits_source, "android-vulkan", tmp_path / "b", batch=4, progress=quiet)
    assert not (tmp_path / "b").exists()


def test_batched_build(tmp_path, digits_test, torch_logits):
    source = open_model(batch=8, dynamic_batch=True, progress=quiet)
    compile_model(source, "host", tmp_path / "b8", batch=8, progress=quiet)
    model = load(tmp_path / "b8")
    assert model.batch == 8
    assert np.abs(model(digits_test[0]) - torch_logits).max() < 1e-4  # 360 = 45 x 8, last chunk padded


def test_bad_onnx_files(tmp_path):
    with pytest.raises(MixerEdgeError, match="does not exist"):
        load_onnx(tmp_path / "missing.onnx")
    (tmp_path / "trunc.onnx").write_bytes(b"\x08\x07\x12\x04junk")
    with pytest.raises(MixerEdgeError, match="is not a valid model"):
        load_onnx(tmp_path / "trunc.onnx")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 10])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 10])])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]), tmp_path / "flat.onnx")
    with pytest.raises(MixerEdgeError, match="expected a float32 NCHW image batch"):
        load_onnx(tmp_path / "flat.onnx")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 3, "h", "w"])])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]), tmp_path / "sym.onnx")
    with pytest.raises(MixerEdgeError, match="symbolic channels or size"):
        load_onnx(tmp_path / "sym.onnx")


def _single_op_graph(op: str, weight: np.ndarray, x_shape, weight_first: bool = False, bias=None, **attrs):
    """A graph of one `op` on input `x` and the initializer `w` (the ONNX a user's exporter writes)."""
    from onnx import helper, numpy_helper

    inputs = ["w", "x"] if weight_first else ["x", "w"]
    inits = [numpy_helper.from_array(weight, "w")]
    if bias is not None:
        inputs.append("b")
        inits.append(numpy_helper.from_array(bias, "b"))
    graph = helper.make_graph([helper.make_node(op, inputs, ["y"], name="layer", **attrs)], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _outputs(proto, x):
    import onnxruntime as ort

    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("equation, weight_first, w_shape, expect", [
    ("bnc,mn->bmc", False, (6, 4), ["MatMul"]),  # token mixing as W.X: no transposes
    ("mn,bnc->bmc", True, (6, 4), ["MatMul"]),
    ("bnc,cm->bnm", False, (5, 7), ["MatMul"]),  # a Linear
    ("bnc,mc->bnm", False, (7, 5), ["MatMul"]),  # a Linear with [out, in] weights
    ("bnc,cd->bdn", False, (5, 7), ["MatMul", "Transpose"]),
    ("bcn,nm->bmc", False, (4, 6), ["MatMul", "Transpose"]),
    ("nbc,mn->bmc", False, (6, 4), ["Transpose", "MatMul", "Transpose"]),
    ("bnc,nc->bn", False, (4, 5), ["Einsum"]),  # two contracted axes: not a linear layer, left as it is
])
def test_linear_layers_spelled_otherwise_become_matmuls(equation, weight_first, w_shape, expect):
    """`load_onnx`'s linear_forms: Einsum with a 2-D weight, Conv1d(kernel 1) below; same outputs as the original."""
    from mixer_edge.export import linear_forms

    rng = np.random.default_rng(0)
    x_shape = {"bnc": (2, 4, 5), "bcn": (2, 5, 4), "nbc": (4, 2, 5)}[equation.replace(" ", "").split(",")[1 if
                                                                            weight_first else 0].split("-")[0]]
    x = rng.standard_normal(x_shape).astype(np.float32)
    proto = _single_op_graph("Einsum", rng.standard_normal(w_shape).astype(np.float32), x_shape, weight_first,
                             equation=equation)
    before = _outputs(proto, x)
    rewritten = linear_forms(proto)
    assert [n.op_type for n in rewritten.graph.node] == expect
    np.testing.assert_allclose(_outputs(rewritten, x), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attrs, bias, expect", [
    ({}, True, ["MatMul", "Add"]),
    ({"kernel_shape": [1], "strides": [1], "pads": [0, 0]}, False, ["MatMul"]),
    ({"strides": [2]}, True, ["Conv"]),  # not every token: left as it is
    ({"group": 2}, True, ["Conv"]),
])
def test_a_1_wide_conv1d_becomes_a_weight_left_matmul(attrs, bias, expect):
    from mixer_edge.export import linear_forms

    rng = np.random.default_rng(1)
    channels_in = 4 // attrs.get("group", 1)
    proto = _single_op_graph("Conv", rng.standard_normal((6, channels_in, 1)).astype(np.float32), (2, 4, 5),
                             bias=rng.standard_normal(6).astype(np.float32) if bias else None, **attrs)
    x = rng.standard_normal((2, 4, 5)).astype(np.float32)
    before = _outputs(proto, x)
    rewritten = linear_forms(proto)
    assert [n.op_type for n in rewritten.graph.node] == expect
    np.testing.assert_allclose(_outputs(rewritten, x), before, rtol=1e-5, atol=1e-5)
