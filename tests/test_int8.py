"""int8 builds: the calibrated QDQ model compiled to integer kernels (VNNI, sdot, dp4a) and checked."""

import numpy as np
import pytest

from mixer_edge import emulator
from mixer_edge.compiler import build, compile_model, resolve_target
from mixer_edge.compiler.build import module_source
from mixer_edge.errors import MixerEdgeError
from mixer_edge.quant import quantize_for_build
from mixer_edge.runtime import load, machine_cpu_features, read_manifest, request_amx_tiles

from conftest import agreement, built_once, quiet
from test_compile import cuobjdump

DIGITS_LAYERS = 18  # stem + 4 blocks x (2 token + 2 channel) + head


@pytest.fixture(scope="session")
def quantized(digits_source):
    """The digits Mixer calibrated with the default recipe on digits-train (the QDQ ONNX + table)."""
    return quantize_for_build(digits_source, progress=quiet)


@pytest.fixture(scope="session")
def int8_artifact(digits_source, quantized, tmp_path_factory):
    """int8_artifact(target) -> path of the digits model compiled in int8 for that target (built once)."""
    return built_once(tmp_path_factory, "int8", lambda target, out: compile_model(
        digits_source, target, out, precision="int8", quantized=quantized, progress=quiet))


def test_host_int8_keeps_the_digits_accuracy(int8_artifact):
    manifest = load(int8_artifact("host")).manifest
    check = manifest["verification"]
    assert check["samples"] == 360 and check["reference"] == "torch"
    assert check["reference_accuracy"] - check["accuracy"] <= 0.005  # <= 0.5 points lost on the digits test split
    assert check["top1_agreement"] >= 0.99
    # the integer kernels compute what the QDQ graph says (onnxruntime runs it in fake-quant float)
    assert check["onnxruntime_qdq"]["top1_agreement"] >= 0.99
    assert check["onnxruntime_qdq"]["max_abs_logit_diff"] < 0.1
    assert manifest["precision"] == {"compute": "int8", "accumulation": "int32", "weights": ["float32", "int32", "int8"]}
    quant = manifest["quantization"]
    assert quant["layers"] == DIGITS_LAYERS and quant["recipe"]["name"] == "default"
    assert quant["calibration_data"] == "digits-train" and quant["samples"] == 256
    weights = [t for t in quant["table"].values() if t["kind"] == "weight"]
    activations = [t for t in quant["table"].values() if t["kind"] == "activation"]
    assert len(weights) == DIGITS_LAYERS and all(t["scheme"] == "symmetric per channel" for t in weights)
    assert all(t["scale"] > 0 and t["zero_point"] == 0 for t in activations)


def test_int8_weights_ship_packed_in_int8(int8_artifact):
    params = np.load(int8_artifact("host") / "params.npz")
    weights = [params[k] for k in params.files if params[k].dtype == np.int8 and params[k].ndim]  # not zero points
    assert len(weights) == DIGITS_LAYERS
    assert all(w.ndim == 4 and w.shape[2:] == (16, 4) for w in weights)  # [N/16, K/4, 16 channels, 4 steps]


@pytest.mark.parametrize("target, dot_product, instruction", [
    ("x86-amx", "amx", "tdpbusd"),
    ("x86-avx512-vnni", "vnni", "vpdpbusd"),
    ("rpi5", "sdot", "sdot\tv"),
])
def test_cpu_int8_kernels_use_the_dot_product_instruction(quantized, target, dot_product, instruction):
    built = build(quantized.qdq, resolve_target(target), precision="int8", progress=quiet)
    assert built.int8 == {"layers": DIGITS_LAYERS, "float_layers": [], "dot_product": dot_product,
                          "activations": "int8" if dot_product == "sdot" else "uint8"}
    asm = module_source(built.compiled.executable, "llvm", "asm")
    kernels = {line.split(":")[0] for line in asm.splitlines()  # fused_int8_dense_...: with their epilogues
               if line.startswith(("int8_dense_", "fused_int8_dense_"))}
    assert len(kernels) >= 4  # one per distinct matmul shape (stem, token fc1/fc2, channel fc1/fc2, head)
    assert asm.count(instruction) >= len(kernels)


def test_register_tiles_fill_the_accumulators_and_divide_the_kernel():
    from mixer_edge.compiler.dense import FLOAT_TILES
    from mixer_edge.compiler.int8 import DOT_PRODUCTS

    vnni, sdot = DOT_PRODUCTS["vnni"].tiles, DOT_PRODUCTS["sdot"].tiles
    # S/16 on VNNI: channel MLP and stem (196 rows), token fc1 (512 x 256 channels), token fc2 (196 -> 13 vectors)
    assert vnni.fit(196, 128) == (7, 4) and vnni.fit(196, 32) == (7, 4)
    assert vnni.fit(512, 16) == (4, 4) and vnni.fit(512, 13) == (8, 1)
    assert sdot.fit(196, 128) == (4, 2) == sdot.fit(512, 16)  # NEON: 8 x 4 registers
    # float32 on AVX-512: 7 x 4 on the channel MLP; 14 rows where only 2 vectors divide (N = 196 padded to 224);
    # token fc1 (512 channel rows, 256) and fc2 (512 channel rows, 196 -> 224)
    assert FLOAT_TILES.fit(196, 128) == (7, 4) and FLOAT_TILES.fit(196, 14) == (14, 2)
    assert FLOAT_TILES.fit(512, 16) == (4, 4) and FLOAT_TILES.fit(512, 14) == (8, 2)
    for tiles in (vnni, sdot, DOT_PRODUCTS["plain"].tiles, FLOAT_TILES):
        for m in (1, 3, 7, 16, 49, 196, 197, 512):
            for vectors in (1, 2, 7, 13, 63, 128):
                rows, vecs = tiles.fit(m, vectors)
                assert m % rows == 0 and vectors % vecs == 0 and rows <= tiles.rows and vecs <= tiles.vectors
                assert rows * vecs <= tiles.accumulators


VNNI = pytest.mark.skipif("avx512_vnni" not in machine_cpu_features(), reason="needs a CPU with AVX-512 VNNI")


def assert_exact_int32_products(dot_product: str, target: str, m: int, k: int, n: int) -> None:
    """The uint8 x int8 kernel `int8.schedule` gives `dot_product`, built for `target` and run here on random
    [m, k] x [n, k] operands, equals numpy's int64 product exactly."""
    import tvm

    from mixer_edge.compiler import int8

    int8._register_intrinsics()
    dot = int8.DOT_PRODUCTS[dot_product]
    func = int8.schedule(int8.dense_func(m, k, n, dot.activation), dot)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                      target=resolve_target(target).tvm_target())
    rng = np.random.default_rng(m)
    x, w = rng.integers(0, 256, (m, k), dtype=np.uint8), rng.integers(-128, 128, (n, k), dtype=np.int8)
    packed = w.reshape(n // 16, 16, k // 4, 4).transpose(0, 2, 1, 3).copy()  # [N/16, K/4, 16, 4]
    out = tvm.runtime.tensor(np.zeros((m, n), np.int32))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(packed), out)
    np.testing.assert_array_equal(out.numpy(), x.astype(np.int64) @ w.astype(np.int64).T)


@VNNI
@pytest.mark.parametrize("m, k, n", [
    (196, 512, 2048),  # tiles of 7 rows x 4 vectors
    (512, 196, 256),  # 4 x 4
    (512, 256, 208),  # token fc2's 196 channels padded to 13 vectors: 8 x 1
    (1, 512, 1008),  # a head: 1 x 3
])
def test_vnni_kernels_compute_exact_int32_products(m, k, n):
    assert_exact_int32_products("vnni", "x86-avx512-vnni", m, k, n)


AMX = pytest.mark.skipif("amx_int8" not in machine_cpu_features(), reason="needs a CPU with AMX int8 tiles")


@AMX
@pytest.mark.parametrize("m, k, n", [
    (196, 512, 64),  # S/16's channel fc1 rows: tiles of 14 rows
    (512, 196, 256),  # token fc1 (W.X): 196 = 3 x 64 + a 4-byte tail of K
    (49, 768, 32),  # 7-row tiles
    (20, 2048, 96),
    (3, 64, 32),  # too few rows for a tile: VNNI
])
def test_amx_kernels_compute_exact_int32_products(m, k, n):
    request_amx_tiles()
    assert_exact_int32_products("amx", "x86-amx", m, k, n)


@AMX
def test_amx_int8_build_computes_what_the_qdq_graph_says(quantized, int8_artifact, digits_test):
    model = load(int8_artifact("x86-amx"))
    assert model.manifest["quantization"]["dot_product"] == "amx"
    x = digits_test[0]
    ours, vnni = model(x), load(int8_artifact("x86-avx512-vnni"))(x)
    # the same integer products on other instructions; the float epilogues around them are scheduled apart
    assert agreement(ours, vnni) == 1.0 and np.abs(ours - vnni).max() < 0.05


def test_cpu_without_a_dot_product_gets_plain_integer_kernels(quantized, int8_artifact, digits_test):
    built = build(quantized.qdq, resolve_target("rpi4"), precision="int8", progress=quiet)
    assert built.int8["dot_product"] == "plain"
    assert "sdot" not in module_source(built.compiled.executable, "llvm", "asm")
    # the same plain schedule on x86 (AVX2: no VNNI) runs here and matches the VNNI build
    x = digits_test[0]
    plain = load(int8_artifact("x86-avx2"))
    assert plain.manifest["quantization"]["dot_product"] == "plain"
    # the integer math is the same; the float epilogues around it are scheduled differently (records of the
    # host's float database transfer to its LayerNorm), which moves the odd value across an int8 rounding
    # edge: measured 0.0095 on 3 of the 360 images, every top-1 the same
    ours, vnni = plain(x), load(int8_artifact("host"))(x)
    assert agreement(ours, vnni) == 1.0 and np.abs(ours - vnni).max() < 0.05


@pytest.mark.parametrize("target, listing", [("cuda", "--dump-ptx"), ("jetson-orin", "--dump-sass")])
def test_cuda_int8_kernels_use_dp4a(int8_artifact, target, listing):
    root = int8_artifact(target)
    code = cuobjdump(listing, str(root / "kernels.fatbin"))
    instruction = "dp4a.s32.s32" if listing == "--dump-ptx" else "IDP.4A"
    assert code.count(instruction) >= 1
    assert read_manifest(root)["quantization"]["dot_product"] == "dp4a"


@pytest.mark.emulation
def test_rpi5_int8_on_the_board_agrees_with_the_host_int8_build(board, int8_artifact, digits_test):
    x, y = digits_test
    on_board = emulator.run_artifact(int8_artifact("rpi5"), x, "cortex-a76", board)
    on_host = load(int8_artifact("host"))(x)
    assert agreement(on_board, on_host) == 1.0
    # the integer parts are exact; the float epilogues (GELU, requantize) round differently on the two
    # CPUs now and then, and a value on a rounding edge moves one int8 step
    same = (np.abs(on_board - on_host).max(1) < 1e-4).mean()
    print(f"identical logits on {same:.1%} of the images, max |diff| {np.abs(on_board - on_host).max():.3g}")
    assert same >= 0.9
    assert np.abs(on_board - on_host).max() < 0.05
    assert (on_board.argmax(1) == y).mean() >= 0.98


def test_an_already_quantized_onnx_compiles_as_it_is(digits_source, quantized, tmp_path):
    from dataclasses import replace

    from mixer_edge.quant import Calibration

    given = replace(digits_source, onnx_model=quantized.qdq, torch_model=None)
    manifest = compile_model(given, "host", tmp_path / "a", precision="int8", progress=quiet)
    assert manifest["quantization"]["recipe"] == "given (pre-quantized QDQ ONNX)"
    assert manifest["quantization"]["table"] is None
    assert manifest["verification"]["onnxruntime_qdq"]["top1_agreement"] >= 0.99
    with pytest.raises(MixerEdgeError, match="already a QDQ ONNX"):
        compile_model(given, "host", tmp_path / "b", precision="int8", calibration=Calibration("minmax"),
                      progress=quiet)
    assert not (tmp_path / "b").exists()


def test_int8_ops_build_agrees_with_onnxruntime_on_the_same_qdq(digits_source, digits_test, tmp_path):
    """LayerNorm, GELU and residual adds put in int8 by a recipe: TVM computes what the QDQ graph says."""
    from mixer_edge.quant import Calibration

    recipe = tmp_path / "all-ops.toml"
    recipe.write_text('int8_ops = ["layernorm", "gelu", "residual"]\n')
    manifest = compile_model(digits_source, "host", tmp_path / "a", precision="int8",
                             calibration=Calibration(str(recipe)), progress=quiet)
    check = manifest["verification"]
    assert manifest["quantization"]["layers"] == DIGITS_LAYERS  # the matmuls still run on integer kernels
    assert check["onnxruntime_qdq"]["top1_agreement"] >= 0.99
    assert check["accuracy"] >= check["reference_accuracy"] - 0.02
    ops = [e for e in manifest["quantization"]["table"].values() if e["kind"] == "activation"]
    assert sum(name.endswith((".act", ".residual", "norm1", "norm2")) or name == "norm"
               for e in ops for name in e["layers"]) == 8 + 8 + 9


def test_int8_needs_quantized_matmuls(digits_source, tmp_path):
    from mixer_edge.compiler import int8
    from mixer_edge.compiler.build import import_onnx

    mod, params = import_onnx(digits_source.onnx_model, 1)
    with pytest.raises(MixerEdgeError, match="found no quantized matmul"):
        int8.lower(mod, params, resolve_target("host"))


def test_cpu_int8_kernels_carry_their_float_epilogues(quantized, int8_artifact, digits_test):
    """Dequantize, bias, GELU and the next quantize run in the integer kernel's tiles, not a kernel after it."""
    import tvm

    from mixer_edge.compiler import int8, tuning
    from mixer_edge.compiler.build import import_onnx, run_transform_params
    from mixer_edge.export import run_onnxruntime

    preset = resolve_target("host")
    mod, params = import_onnx(quantized.qdq, 1)
    mod, _ = int8.lower(mod, params, preset)
    mod, params = run_transform_params(mod, params)
    prepared = tuning.prepare(mod, preset)
    kernels = {gv.name_hint: f for gv, f in prepared.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    dense = {name for name, f in kernels.items() if 'sblock("dense' in f.script()}
    fused = {name for name in dense if "erf" in name}  # token/channel fc1: GELU and the next quantize too
    assert len(dense) >= 5 and len(fused) >= 2
    assert all(kernels[name].attrs.get("tirx.is_scheduled") for name in dense)
    # a pure reshape (AMX reads its input as [M, K]) becomes a view when the build lowers it: not a kernel
    calls = [line for line in prepared["main"].script().splitlines()
             if "R.call_tir(" in line and not line.split("R.call_tir(")[1].startswith("reshape")]
    # before: per quantized layer an int8 kernel and a float epilogue kernel after it, 56 calls (46 now). The
    # stem keeps that (its output is a patch layout); the 17 matmuls' kernels take their epilogue and write
    # floats or the next layer's int8 input: no int32 accumulator leaves them
    assert len(calls) <= 56 - 8
    assert sum('dtype="int32"' in line for line in calls if "int8_dense" in line) == 1
    # what runs is still what the QDQ graph says
    x = digits_test[0][:128]
    ours, reference = load(int8_artifact("host"))(x), run_onnxruntime(quantized.qdq, x)
    assert agreement(ours, reference) >= 0.99 and np.abs(ours - reference).max() < 0.1


@pytest.mark.parametrize("target", ["host", "rpi5"])
def test_layer_norms_quantize_before_the_token_transpose(quantized, target):
    """A quantize with one scale per tensor runs before the transposes and reshapes between it and what it
    quantizes: each block's two LayerNorms write int8 (VNNI: uint8) from their own kernel, and the transpose into
    the token MLP moves those bytes instead of float32; only the final LayerNorm, which feeds the float mean,
    writes float32."""
    import re

    from mixer_edge.compiler import int8, tuning
    from mixer_edge.compiler.build import import_onnx

    preset = resolve_target(target)
    mod, params = import_onnx(quantized.qdq, 1)
    prepared = tuning.prepare(int8.lower(mod, params, preset)[0], preset)
    calls = re.findall(r'R\.call_tir\((\w+), .*dtype="(\w+)"\)\)', prepared["main"].script())
    norms = [dtype for name, dtype in calls if "layer_norm" in name]
    eight_bit = "uint8" if int8.dot_product(preset).offset else "int8"
    assert norms == [eight_bit] * 2 * 4 + ["float32"]  # 4 blocks
    layout_only = [dtype for name, dtype in calls  # kernels of transposes and reshapes alone
                   if re.fullmatch(r"(fused_)?((transpose|reshape)\d*_?)+", name) and "transpose" in name]
    assert layout_only == [eight_bit] * 4
