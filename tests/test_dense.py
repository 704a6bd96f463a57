"""Float32 layers on register-tiled kernels (compiler/dense.py): which targets get them, what they lower, and
that a build computes what the ONNX says."""

import re

import numpy as np
import pytest
import tvm
from tvm import relax

from mixer_edge.compiler import dense, resolve_target, tuning
from mixer_edge.compiler.build import build, import_onnx, module_source, run_transform_params
from mixer_edge.export import load_onnx, run_onnxruntime
from mixer_edge.runtime import machine_cpu_features

from conftest import quiet

AVX512 = pytest.mark.skipif("avx512f" not in machine_cpu_features(), reason="needs an AVX-512 CPU")


@pytest.fixture(scope="module")
def weight_left(tmp_path_factory):
    """W.X (a weight on the left, as lucidrains' Conv1d token mixing becomes), then X.W, with a GELU between."""
    import torch

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(24, 10))
            self.fc = torch.nn.Linear(16, 5)

        def forward(self, x):  # [B, 1, 10, 16]: an image, as mixer-edge takes
            return self.fc(torch.nn.functional.gelu(torch.matmul(self.w, x[:, 0]))).flatten(1)

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("left") / "left.onnx"
    torch.onnx.export(Model().eval(), (torch.randn(3, 1, 10, 16),), str(path), input_names=["x"], dynamo=False)
    return load_onnx(path)


@pytest.mark.parametrize("target, expected", [("x86-amx", True), ("x86-avx512-vnni", True), ("x86-avx512", True),
                                              ("x86-avx2", False), ("rpi5", False), ("cuda", False)])
def test_float_kernels_are_for_avx512_cpus(target, expected):
    assert dense.applies(resolve_target(target)) is expected


def test_every_linear_layer_and_the_stem_get_a_scheduled_kernel(odd_mixer):
    preset = resolve_target("x86-avx512")
    mod, params = import_onnx(odd_mixer, 2)
    mod, params = run_transform_params(dense.lower(mod, params), params)
    funcs = {gv.name_hint: f for gv, f in tuning.prepare(mod, preset).functions.items()
             if isinstance(f, tvm.tirx.PrimFunc)}
    kernels = [name for name in funcs if "dense_f32" in name]
    # the stem, token fc1/fc2, channel fc1/fc2 and the head; GELU and the bias adds fused into them
    assert len(kernels) == 6 and all(funcs[name].attrs.get("tirx.is_scheduled") for name in kernels)
    assert not [name for name in funcs if "matmul" in name or "conv2d" in name]
    assert sum("fast_erf" in name for name in kernels) == 2
    # packed once at build time: [N rounded up to 32 / 16, K, 16]
    packed = [p for p in params.values() if p.ndim == 3 and p.shape[2] == 16]
    assert len(packed) == 6 and all(p.shape[0] % 2 == 0 for p in packed)


@AVX512
@pytest.mark.parametrize("model", ["odd_mixer", "weight_left"])
def test_float_kernels_compute_what_the_onnx_says(model, request):
    proto = request.getfixturevalue(model)
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value
    shape = [batch, *(d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim[1:])]
    built = build(proto, resolve_target("x86-avx512"), batch=batch, progress=quiet)
    asm = module_source(built.compiled.executable, "llvm", "asm")
    # W.X and the token MLP's Y^T.W read the input as it is, and the token MLP writes its output transposed back:
    # the one transpose left is the stem's, from the image's layout to tokens
    transposes = set(re.findall(r"__tvm_ffi_(\w*transpose\w*):", asm))
    assert "dense_f32" in asm and transposes == ({"fused_reshape_transpose1"} if model == "odd_mixer" else set())
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    vm = relax.VirtualMachine(built.compiled.executable, tvm.cpu())
    ours = vm["main"](tvm.runtime.tensor(x), *map(tvm.runtime.tensor, built.params.values())).numpy()
    want = run_onnxruntime(proto, x)
    np.testing.assert_allclose(ours, want, rtol=0, atol=1e-5 * np.abs(want).max())


@AVX512
@pytest.mark.parametrize("k, depth", [(196, 49), (197, 197), (40, 40)])  # a prime K: one block
def test_transposed_input_reduces_in_blocks_of_k_whose_weights_fit_in_l1(k, depth):
    from tvm import s_tir

    m, n = 512, 48  # rows (channels) read transposed, N padded to 64: tiles of 4 rows x 4 vectors
    func = dense.fusable_dense_func([1, k, m], n, None, dense.TRANSPOSED).with_attr("global_symbol", "main")
    sch = s_tir.Schedule(func)
    dense.schedule(sch, sch.get_sblock("dense"), sch.get_sblock("store"))
    extents = [int(sch.get(loop).extent) for loop in sch.get_loops(sch.get_sblock("dense_update"))]
    # tasks (strips x blocks of 128 rows), K blocks, tiles per task, steps per K block, rows, vectors, lanes
    assert extents == [4, k // depth, 32, depth, 4, 4, 16]
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((1, k, m)).astype(np.float32), rng.standard_normal((n, k)).astype(np.float32)
    packed = np.pad(w, [(0, 16), (0, 0)]).reshape(4, 16, k).transpose(0, 2, 1).copy()  # [N/16, K, 16]
    out = tvm.runtime.tensor(np.zeros((1, m, n), np.float32))
    tvm.compile(sch.mod, resolve_target("x86-avx512").tvm_target())["main"](
        tvm.runtime.tensor(x), tvm.runtime.tensor(packed), out)
    np.testing.assert_allclose(out.numpy()[0], x[0].T @ w.T, rtol=1e-5, atol=1e-4)
