"""Mixers written elsewhere, exported the way their users export them (torch.onnx, opset 17, constant folding,
onnxsim), through every route: host, an emulated Raspberry Pi 5, Vulkan (WGSL through wgpu on Mesa's software
device). Each artifact must match onnxruntime on the same ONNX."""

import base64
import json
import os
import re
import warnings

import numpy as np
import pytest
import torch
import tvm
from hypothesis import given, strategies as st
from torch import nn
from tvm import relax

from mixer_edge import bundle, emulator, layers, runtime
from mixer_edge.compiler import compile_model, webgpu
from mixer_edge.errors import MixerEdgeError
from mixer_edge.export import open_model, run_onnxruntime
from mixer_edge.vulkan import Program, WgpuProgram, read_program

from conftest import agreement, quiet
from test_native import native_logits

SIZE, CHANNELS = 16, 3
WGSL_TARGET = {"kind": "webgpu", "host": {"kind": "llvm"}}
# A WGSL identifier: not `_` alone, not starting with `__` (W3C WGSL, "Identifiers"), ASCII here.
VALID = re.compile(r"^([A-Za-z][A-Za-z0-9_]*|_[A-Za-z0-9][A-Za-z0-9_]*)$")


# ---- the two foreign models -------------------------------------------------------------------------

class Rearrange(nn.Module):
    """einops' `Rearrange('b c (h p1) (w p2) -> b (h w) (p1 p2 c)')`, which lucidrains' Mixer starts with."""

    def __init__(self, patch: int):
        super().__init__()
        self.patch = patch

    def forward(self, x):
        b, c, h, w = x.shape
        p = self.patch
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (h // p) * (w // p), p * p * c)


class Reduce(nn.Module):
    """einops' `Reduce('b n c -> b c', 'mean')`."""

    def forward(self, x):
        return x.mean(1)


class PreNormResidual(nn.Module):
    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.fn, self.norm = fn, nn.LayerNorm(dim)

    def forward(self, x):
        return self.fn(self.norm(x)) + x


def feed_forward(dim: int, expansion: float, dense) -> nn.Sequential:
    inner = int(dim * expansion)
    return nn.Sequential(dense(dim, inner), nn.GELU(), nn.Dropout(0.0), dense(inner, dim), nn.Dropout(0.0))


def sequential_mixer(patch: int = 4, dim: int = 24, depth: int = 2, classes: int = 10, size: int = SIZE,
                     expansion: float = 4, expansion_token: float = 0.5) -> nn.Sequential:
    """lucidrains' mlp-mixer-pytorch `MLPMixer`: a top-level nn.Sequential (ONNX weights named `2.0.fn.3.weight`),
    tokens mixed by `Conv1d(num_patches, num_patches * expansion, 1)`."""
    patches = (size // patch) ** 2
    conv1d = lambda i, o: nn.Conv1d(i, o, kernel_size=1)  # noqa: E731
    return nn.Sequential(
        Rearrange(patch), nn.Linear(patch * patch * CHANNELS, dim),
        *[nn.Sequential(PreNormResidual(dim, feed_forward(patches, expansion, conv1d)),
                        PreNormResidual(dim, feed_forward(dim, expansion_token, nn.Linear))) for _ in range(depth)],
        nn.LayerNorm(dim), Reduce(), nn.Linear(dim, classes))


class MixerBlock(nn.Module):
    """timm's MixerBlock: token mixing as transpose, Linear, transpose."""

    def __init__(self, tokens: int, dim: int, token_hidden: int | None = None, channel_hidden: int | None = None):
        super().__init__()
        token_hidden, channel_hidden = token_hidden or tokens * 2, channel_hidden or dim * 4
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.tokens = nn.Sequential(nn.Linear(tokens, token_hidden), nn.GELU(), nn.Linear(token_hidden, tokens))
        self.channels = nn.Sequential(nn.Linear(dim, channel_hidden), nn.GELU(), nn.Linear(channel_hidden, dim))

    def forward(self, x):
        x = x + self.tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channels(self.norm2(x))


class ClassTokenMixer(nn.Module):
    """A Mixer with a class token: `cat([cls, patches])`, classified from `out[:, 0]` (an int64 Gather in ONNX)."""

    def __init__(self, patch: int = 4, dim: int = 24, depth: int = 2, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(CHANNELS, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.blocks = nn.ModuleList(MixerBlock((SIZE // patch) ** 2 + 1, dim) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


class EinsumBlock(nn.Module):
    def __init__(self, tokens: int, dim: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.token_in = nn.Parameter(torch.randn(tokens * 2, tokens) / tokens ** 0.5)
        self.token_out = nn.Parameter(torch.randn(tokens, tokens * 2) / (2 * tokens) ** 0.5)
        self.channel_in = nn.Parameter(torch.randn(dim, dim * 4) / dim ** 0.5)
        self.channel_out = nn.Linear(dim * 4, dim)

    def forward(self, x):
        y = nn.functional.gelu(torch.einsum("bnc,mn->bmc", self.norm1(x), self.token_in))
        x = x + torch.einsum("bmc,nm->bnc", y, self.token_out)
        y = nn.functional.gelu(torch.einsum("bnc,cd->bdn", self.norm2(x), self.channel_in))  # (b, d, n)
        return x + self.channel_out(y.transpose(1, 2))


class EinsumMixer(nn.Module):
    """A Mixer written with `torch.einsum` and bare weight tensors, as JAX ports are (ONNX `Einsum` nodes)."""

    def __init__(self, patch: int = 4, dim: int = 24, depth: int = 2, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(CHANNELS, dim, patch, patch)
        self.blocks = nn.ModuleList(EinsumBlock((SIZE // patch) ** 2, dim) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(1))


class TimmStyleMixer(nn.Module):
    """timm's MlpMixer layout (stem conv, blocks, norm, mean over tokens, head), as its own code exports it."""

    def __init__(self, patch: int = 16, dim: int = 512, depth: int = 8, classes: int = 1000, size: int = 224,
                 token_hidden: int = 256, channel_hidden: int = 2048):
        super().__init__()
        self.stem = nn.Conv2d(CHANNELS, dim, patch, patch)
        self.blocks = nn.Sequential(*[MixerBlock((size // patch) ** 2, dim, token_hidden, channel_hidden)
                                      for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x):
        x = self.blocks(self.stem(x).flatten(2).transpose(1, 2))
        return self.head(self.norm(x).mean(1))


MODELS = {"sequential": sequential_mixer, "class-token": ClassTokenMixer, "einsum": EinsumMixer}
LINEAR_LAYERS = {"sequential": 10, "class-token": 10, "einsum": 10}  # stem or patch Linear, 4 per block, head


def export(model: nn.Module, path, size: int = SIZE) -> None:
    """torch.onnx's TorchScript exporter (opset 17, constant folding) and onnxsim, as these models' users run them."""
    import onnx
    import onnxsim

    with torch.no_grad():
        for module in model.modules():  # fresh LayerNorms are all ones and zeros, which the export would share
            if isinstance(module, nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.zeros(1, CHANNELS, size, size),), str(path), dynamo=False,
                          opset_version=17, do_constant_folding=True, input_names=["input"], output_names=["logits"])
    proto, ok = onnxsim.simplify(onnx.load(str(path)))
    assert ok
    onnx.save(proto, str(path))


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """name -> the model exported to ONNX and opened as a user's ONNX file."""
    root = tmp_path_factory.mktemp("foreign")
    torch.manual_seed(0)
    sources = {}
    for name, make in MODELS.items():
        export(make(), root / f"{name}.onnx")
        sources[name] = open_model(str(root / f"{name}.onnx"), progress=quiet)
    return sources


@pytest.fixture(scope="module")
def inputs():
    return np.random.default_rng(0).standard_normal((8, CHANNELS, SIZE, SIZE)).astype(np.float32)


@pytest.fixture(scope="module")
def reference(foreign, inputs):
    """name -> onnxruntime's logits on `inputs`."""
    return {name: run_onnxruntime(source.onnx_model, inputs) for name, source in foreign.items()}


@pytest.fixture(scope="module")
def built(foreign, tmp_path_factory):
    """built(name, target) -> the artifact (built once)."""
    artifacts = {}

    def build(name: str, target: str):
        if (name, target) not in artifacts:
            out = tmp_path_factory.mktemp("foreign-artifacts") / f"{name}-{target}"
            compile_model(foreign[name], target, out, progress=quiet)
            artifacts[name, target] = out
        return artifacts[name, target]

    return build


def assert_matches(logits: np.ndarray, expected: np.ndarray) -> None:
    """Measured (sequential, class-token): host and rpi5 1.2e-7, 3.3e-7; Vulkan on lavapipe 1.8e-7, 3.6e-7."""
    assert logits.shape == expected.shape == (8, 10)
    assert agreement(logits, expected) == 1.0
    assert np.abs(logits - expected).max() < 1e-4


# ---- every route --------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["host", "android-vulkan"])
@pytest.mark.parametrize("name", MODELS)
def test_foreign_mixer_matches_onnxruntime(built, inputs, reference, name, target):
    model = runtime.load(built(name, target))
    assert_matches(model(inputs), reference[name])
    assert model.manifest["verification"]["status"] == "verified"


@pytest.mark.parametrize("name, target", [("sequential", "host"), ("class-token", "android-vulkan")])
def test_foreign_mixer_runs_in_the_native_runtime(built, inputs, reference, name, target, tmp_path):
    """The bundle's C++ runtime (no Python) on the same artifacts: TVM's runtime on the host, wgpu-native on Vulkan."""
    packed = bundle.package(built(name, target), tmp_path / "bundle", progress=quiet)
    assert_matches(native_logits(packed, inputs, tmp_path), reference[name])


@pytest.mark.parametrize("name", MODELS)
def test_foreign_mixer_layers_are_named_and_compare_exactly(built, foreign, inputs, name):
    """`compare` on another implementation's float build: every kernel matched to its own tensor (a GELU's
    `x * cdf` and its `0.5 *` correlate alike: the scale decides), every layer at float rounding error."""
    c = layers.compare(built(name, "host"), foreign[name], inputs[:4])
    # on AVX-512 the stem's patches are cut from the image by a kernel of their own (compiler/dense.py): a layout
    # of the input, not compared
    assert all(r.compared == "float" or (r.compared == "layout" and r.layer.endswith("· Input")) for r in c.layers)
    assert all(r.sqnr_db is None or r.sqnr_db > 100 for r in c.layers), [(r.layer, r.sqnr_db) for r in c.layers]
    assert c.first_jump is None


@pytest.mark.parametrize("name", MODELS)
def test_foreign_mixer_int8_puts_every_linear_layer_on_integer_kernels(foreign, inputs, name, tmp_path):
    """Conv1d token mixing (W.X), einsum with bare weights and Linear alike: each layer the QDQ model quantized
    runs on the int8 kernel, none is left float, and the artifact follows its QDQ model."""
    from mixer_edge.quant import Calibration, quantize_for_build

    np.save(tmp_path / "calib.npy", np.random.default_rng(1).standard_normal((16, CHANNELS, SIZE, SIZE), np.float32))
    quantized = quantize_for_build(foreign[name], Calibration(data=str(tmp_path / "calib.npy"), samples=16),
                                   progress=quiet)
    manifest = compile_model(foreign[name], "host", tmp_path / "int8", precision="int8", quantized=quantized,
                             progress=quiet)
    lowered = manifest["quantization"]
    assert (lowered["layers"], lowered["float_layers"]) == (LINEAR_LAYERS[name], [])
    assert sum(entry["kind"] == "weight" for entry in quantized.table.values()) == LINEAR_LAYERS[name]
    logits, expected = runtime.load(tmp_path / "int8")(inputs), run_onnxruntime(quantized.qdq, inputs)
    assert agreement(logits, expected) >= 0.875
    assert np.abs(logits - expected).max() < 0.05 * np.abs(expected).max()


@pytest.mark.slow
def test_foreign_s16_mixers_untuned_keep_the_tuned_presets_speed(tmp_path):
    """A timm-style and a lucidrains-style Mixer-S/16 (the paper's widths), exported by their own code and compiled
    with no database of their own: the records of the preset's databases that match by workload apply, default
    schedules take the rest, every linear layer is on int8 kernels. Prints their latency beside the preset's build
    in one interleaved run (the README's figures); no time is asserted."""
    from mixer_edge import bench
    from mixer_edge.quant import Calibration

    torch.manual_seed(0)
    sources = {"mixer_s16 (preset)": open_model("mixer_s16", progress=quiet)}
    for name, model in (("timm-style", TimmStyleMixer()),
                        ("lucidrains-style", sequential_mixer(16, 512, 8, 1000, 224, 1.31, 4))):  # 256, 2048 hidden
        export(model, tmp_path / f"{name}.onnx", size=224)
        sources[name] = open_model(str(tmp_path / f"{name}.onnx"), progress=quiet)
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).standard_normal((16, CHANNELS, 224, 224), np.float32))
    calibration = Calibration(data=str(tmp_path / "calib.npy"), samples=16)
    x = np.random.default_rng(1).standard_normal((1, CHANNELS, 224, 224)).astype(np.float32)
    candidates, rows = [], []
    for name, source in sources.items():
        for precision in ("float32", "int8"):
            out = tmp_path / f"{name}-{precision}"
            manifest = compile_model(source, "host", out, precision=precision, progress=quiet,
                                     calibration=calibration if precision == "int8" else None)
            covered = manifest["build"]["tuning"]
            check = manifest["verification"]
            # int8 answers to its QDQ model; against the float model, random weights' near-tied logits may flip
            assert (check["onnxruntime_qdq"] if precision == "int8" else check)["top1_agreement"] == 1.0
            if precision == "int8":
                assert (manifest["quantization"]["layers"], manifest["quantization"]["float_layers"]) == (34, [])
            if name != "mixer_s16 (preset)":
                assert manifest["build"]["tuning_db"] is None  # none of its own: what is tuned came by workload
            candidates.append(bench.artifact_candidate(f"{name} {precision}", runtime.load(out), x))
            rows.append((name, precision, f"{covered['tuned']}/{covered['tasks']} ({covered['transferred']} transferred)"))
    latencies = bench.interleaved(candidates, rounds=15)
    preset = {precision: l.median_ms for (name, precision, _), l in zip(rows, latencies) if "preset" in name}
    print("\n| model | precision | tuned tasks | median ms | vs the preset |\n| --- | --- | --- | --- | --- |")
    for (name, precision, tuned), latency in zip(rows, latencies):
        print(f"| {name} | {precision} | {tuned} | {latency.median_ms:.2f} | "
              f"{latency.median_ms / preset[precision]:.2f}x |")


def test_class_token_mixer_in_float16_on_vulkan(foreign, inputs, reference, tmp_path):
    """A float16 build precomputes the Gather's `index < 0` into a bool weight, which WGSL storage cannot hold as
    such: it travels as int32."""
    compile_model(foreign["class-token"], "android-vulkan", tmp_path / "f16", precision="float16", progress=quiet)
    with np.load(tmp_path / "f16" / "params.npz") as params:
        assert any(params[k].dtype == bool for k in params.files)  # else this test no longer covers bool weights
    logits = runtime.load(tmp_path / "f16")(inputs)
    assert agreement(logits, reference["class-token"]) == 1.0
    assert np.abs(logits - reference["class-token"]).max() < 0.05  # fp16 products: 7.0e-4 measured


@pytest.mark.emulation
def test_foreign_mixers_match_onnxruntime_on_the_emulated_rpi5(board, built, inputs, reference):
    names = list(MODELS)
    logits, _ = emulator.run_artifacts([built(name, "rpi5") for name in names], inputs, "cortex-a76", root=board)
    for name, result in zip(names, logits):
        assert_matches(result, reference[name])


def declared_names(wgsl: str) -> list[str]:
    """Every name a kernel's WGSL declares: its buffers, workgroup and local variables, constants, the kernel."""
    return re.findall(r"\b(?:var(?:<[^>]*>)?|let|const|fn)\s+([^\s:(<]+)", wgsl)


def test_sequential_mixer_weights_get_valid_wgsl_names(built):
    """ONNX names such as `2.0.fn.0.weight` reach WGSL renamed (a leading digit is no identifier)."""
    kernels = json.loads((built("sequential", "android-vulkan") / "program.json").read_text())["kernels"]
    names = [n for wgsl in kernels.values() for n in declared_names(wgsl)]
    assert names and all(VALID.match(n) and n not in webgpu.WGSL_RESERVED for n in names)
    assert any(n.startswith("v_2_0_fn_0_weight") for n in names)


# ---- names, 64-bit integers and bools, from a hand-written graph ------------------------------------

HOSTILE = ["0.weight", "0_weight", "fn", "array", "", "__x", "a-b", "f32", "loop.1", "é"]


def hostile_module():
    """`main(input.1, one weight per HOSTILE name, a bool mask, an int64 index)`: y = x * w + w for each weight,
    negated where the mask is false, times a constant vector, sliced whole; then row `index` of y, as [1, 8]."""
    bb = relax.BlockBuilder()
    x = relax.Var("input.1", relax.TensorType((2, 8), "float32"))
    weights = [relax.Var(name, relax.TensorType((8,), "float32")) for name in HOSTILE]
    mask = relax.Var("mask", relax.TensorType((8,), "bool"))
    index = relax.Var("2.index", relax.TensorType((), "int64"))
    with bb.function("main", [x, *weights, mask, index], attrs={"num_input": 1}):
        with bb.dataflow():
            y = x
            for w in weights:
                y = bb.emit(relax.op.add(relax.op.multiply(y, w), w), name_hint="1.lv")
            y = bb.emit(relax.op.where(mask, y, relax.op.negative(y)), name_hint="var")
            y = bb.emit(relax.op.multiply(y, relax.const(np.arange(8, dtype=np.float32))), name_hint="while")
            y = bb.emit(relax.op.strided_slice(y, axes=[1], begin=[0], end=[8]))  # int64 scalars, not tensors
            out = bb.emit_output(relax.op.reshape(relax.op.take(y, index, axis=0), (1, 8)))
        bb.emit_func_output(out)
    return bb.get()


@pytest.fixture(scope="module")
def hostile_program():
    return webgpu.program(hostile_module(), tvm.target.Target(WGSL_TARGET))


def test_hostile_names_become_valid_unique_wgsl_identifiers_and_run(hostile_program):
    prog = Program.model_validate(hostile_program)
    for wgsl in prog.kernels.values():
        buffers = re.findall(r"var<storage[^>]*>\s+(\w+)", wgsl)
        assert len(set(buffers)) == len(buffers) and all(VALID.match(n) for n in declared_names(wgsl)), wgsl
    assert [s.op for s in prog.steps].count("constant") == 1  # the constant vector, uploaded with the program
    rng = np.random.default_rng(1)
    weights = [rng.standard_normal(8).astype(np.float32) for _ in HOSTILE]
    mask = rng.standard_normal(8) > 0  # a bool weight: uploaded as int32, cast back in the kernel
    x = rng.standard_normal((2, 8)).astype(np.float32)
    expected = x
    for w in weights:
        expected = expected * w + w
    expected = np.where(mask, expected, -expected) * np.arange(8, dtype=np.float32)
    for row in (0, 1):  # the int64 index weight, narrowed to int32 on the GPU
        run = WgpuProgram(prog, [*weights, mask, np.array(row, np.int64)], (2, 8), (1, 8))
        np.testing.assert_allclose(run(x), expected[row], rtol=1e-5, atol=1e-5)


def test_an_int64_weight_beyond_int32_is_refused_at_load(hostile_program):
    weights = [np.ones(8, np.float32) for _ in HOSTILE] + [np.ones(8, bool), np.array(2**40, np.int64)]
    with pytest.raises(MixerEdgeError, match=r"weight 12 holds int64 values beyond int32 .*build for a CPU"):
        WgpuProgram(Program.model_validate(hostile_program), weights, (2, 8), (1, 8))


@given(st.lists(st.text(max_size=12), max_size=30))
def test_wgsl_identifier_is_valid_unique_and_deterministic(names):
    taken: set[str] = set()
    out = [webgpu.wgsl_identifier(n, taken) for n in names]
    assert all(VALID.match(n) and n not in webgpu.WGSL_RESERVED for n in out)
    assert len(set(out)) == len(out) and set(out) == taken
    again: set[str] = set()
    assert [webgpu.wgsl_identifier(n, again) for n in names] == out


def graph(body):
    """`main(x: [4, 8] float32, i: int64 scalar)` returning body(bb, x, i)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 8), "float32"))
    i = relax.Var("i", relax.TensorType((), "int64"))
    with bb.function("main", [x, i], attrs={"num_input": 1}):
        with bb.dataflow():
            out = bb.emit_output(body(bb, x, i))
        bb.emit_func_output(out)
    return bb.get()


def _row(x, i):
    return relax.op.reshape(relax.op.take(x, i, axis=0), (1, 8))


@pytest.mark.parametrize("body, message", [
    (lambda bb, x, i: _row(x, bb.emit(relax.op.astype(relax.op.astype(i, "float32"), "int64"))),
     "operator relax.astype computes int64, which WGSL cannot hold"),
    (lambda bb, x, i: relax.op.astype(_row(x, i), "float64"),
     "operator relax.astype computes float64, which WGSL cannot hold"),
    (lambda bb, x, i: _row(x, bb.emit(relax.op.subtract(i, relax.const(2**40, "int64")))),
     "operator relax.subtract's constant holds int64 values beyond int32"),
    (lambda bb, x, i: _row(bb.emit(relax.op.where(relax.const(np.arange(8) % 2 == 0), x, relax.op.negative(x))), i),
     "the lowered graph passes a bool constant [8] to a kernel, which WGSL storage cannot hold"),
], ids=["int64-result", "float64-result", "int64-constant", "bool-constant"])
def test_what_wgsl_cannot_hold_is_refused_in_one_line(body, message):
    with pytest.raises(MixerEdgeError, match=re.escape(message) + ".*build for a CPU or CUDA target") as caught:
        webgpu.program(graph(body), tvm.target.Target(WGSL_TARGET))
    assert "\n" not in str(caught.value)


# ---- program.json's constant steps, forged ------------------------------------------------------------

def _constant(**change) -> dict:
    step = {"op": "constant", "out": 1, "dtype": "float32", "shape": [2],
            "data": base64.b64encode(np.ones(2, np.float32).tobytes()).decode()}
    return {**step, **change}


@pytest.mark.parametrize("step, fragment", [
    (_constant(data="not base64!"), "is not base64"),
    (_constant(shape=[3]), "holds 8 bytes, but float32[3] is 12"),
    (_constant(data=base64.b64encode(np.array([1, np.nan], np.float32).tobytes()).decode()), "holds NaN or Inf"),
    (_constant(dtype="int64"), "steps.0.constant.dtype"),
], ids=["base64", "size", "nan", "int64"])
def test_forged_constant_steps_are_refused_in_one_line(tmp_path, step, fragment):
    path = tmp_path / "program.json"
    path.write_text(json.dumps({"format": 1, "steps": [step], "output": 1, "kernels": {}}))
    with pytest.raises(MixerEdgeError, match=re.escape(fragment)) as caught:
        read_program(path)
    assert "\n" not in str(caught.value) and str(path) in str(caught.value) and "rebuild" in str(caught.value)


# ---- environment noise --------------------------------------------------------------------------------

@pytest.mark.parametrize("setting", [None, "relative/dir", "/an/absolute/path"])
def test_no_xdg_runtime_dir_noise_on_stderr(built, inputs, capfd, monkeypatch, setting):
    """libwayland's `XDG_RUNTIME_DIR is invalid or not set` (printed while the Vulkan loader looks for GPUs, where
    the variable is unset or relative) reads as an error: it is not printed, and the variable is as it was."""
    if setting is None:
        monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    else:
        monkeypatch.setenv("XDG_RUNTIME_DIR", setting)
    artifact = built("class-token", "android-vulkan")
    capfd.readouterr()
    runtime.load(artifact)(inputs[:1])
    err = capfd.readouterr().err
    assert "XDG_RUNTIME_DIR" not in err, err
    assert os.environ.get("XDG_RUNTIME_DIR") == setting
