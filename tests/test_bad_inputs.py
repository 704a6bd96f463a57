"""The bad-input corpus: every broken file and wrong option we know users hand the toolkit.

Each case builds its bad input in a fresh directory (nothing is downloaded) and returns the command
line that receives it. Every case must be refused the same way: exit code 2, one line on stderr that
names the problem and the fix, no traceback, and nothing in the directory written, changed or left
half-written (an artifact already at the output path stays as it was).
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from mixer_edge import runtime, vulkan
from mixer_edge.compiler import compile_model, cuda
from mixer_edge.model import create_model, preset

from conftest import assert_one_line_error, quiet

CASES = []


def case(*fragments: str, native: bool = True):
    """Register a corpus case: `make(tmp, corpus) -> argv`; `fragments` must all be in the error line. `native`:
    an artifact case the native runtime meets too (False: it fakes this machine inside the Python process, or it
    is a .tar, which only the Python runtime unpacks)."""
    def register(make):
        make.native = native
        CASES.append(pytest.param(make, fragments, id=make.__name__.replace("_", "-")))
        return make

    return register


class Corpus:
    """What the cases build their bad inputs from, made on first use."""

    def __init__(self, request, monkeypatch):
        self.request, self.monkeypatch = request, monkeypatch

    @property
    def digits_onnx(self) -> Path:
        return self.request.getfixturevalue("digits_onnx")

    def artifact(self, tmp: Path, target: str = "host") -> Path:
        """A private copy of the digits model built for `target`, at tmp/art."""
        dest = tmp / "art"
        shutil.copytree(self.request.getfixturevalue("build_artifact")(target), dest)
        return dest


@pytest.fixture(scope="module")
def digits_onnx(digits_source, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "digits.onnx"
    onnx.save(digits_source.onnx_model, str(path))
    return path


def snapshot(root: Path) -> dict:
    """Every path under `root` with its size and modification time, and the loader's temporary directories."""
    files = {str(p.relative_to(root)): (p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}
    return {"files": files, "tmp": sorted(Path(tempfile.gettempdir()).glob("mixer-edge-*"))}


@pytest.mark.parametrize("make, fragments", CASES)
def test_bad_input_is_refused_in_one_line_and_writes_nothing(make, fragments, tmp_path, run_cli, request, monkeypatch):
    argv = make(tmp_path, Corpus(request, monkeypatch))
    before = snapshot(tmp_path)
    code, _, err = run_cli(*argv)
    assert_one_line_error(code, err, *fragments)
    assert snapshot(tmp_path) == before, "the refused command wrote, changed or left files behind"


def test_the_corpus_is_at_least_thirty_distinct_bad_inputs():
    assert len({c.id for c in CASES}) == len(CASES) >= 30


# ---- ONNX files ---------------------------------------------------------------------------------

def compile_onnx(tmp: Path, graph, name: str = "bad", domains=()) -> list:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), *domains])
    onnx.save(model, str(tmp / f"{name}.onnx"))
    return ["compile", "--model", tmp / f"{name}.onnx", "-o", tmp / "out"]


def image(shape=(1, 1, 8, 8), dtype=TensorProto.FLOAT, name="x"):
    return helper.make_tensor_value_info(name, dtype, list(shape))


def logits(shape=(1, 10)):
    return helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))


def weight(name: str, *shape: int):
    return numpy_helper.from_array(np.random.default_rng(0).random(shape, dtype=np.float32), name)


@case("truncated.onnx is not a valid model", "re-export it")
def onnx_truncated(tmp, corpus):
    data = corpus.digits_onnx.read_bytes()
    (tmp / "truncated.onnx").write_bytes(data[: len(data) // 2])  # a copy cut short
    return ["compile", "--model", tmp / "truncated.onnx", "-o", tmp / "out"]


@case("corrupt.onnx is not a valid model", "re-export it")
def onnx_corrupt(tmp, corpus):
    data = bytearray(corpus.digits_onnx.read_bytes())
    data[100:4100] = os.urandom(4000)  # a bad sector in the middle
    (tmp / "corrupt.onnx").write_bytes(bytes(data))
    return ["compile", "--model", tmp / "corrupt.onnx", "-o", tmp / "out"]


@case("empty.onnx is not a valid model", "re-export it")
def onnx_empty(tmp, corpus):
    (tmp / "empty.onnx").write_bytes(b"")
    return ["compile", "--model", tmp / "empty.onnx", "-o", tmp / "out"]


@case("nope.onnx does not exist", "check the path")
def onnx_missing(tmp, corpus):
    return ["compile", "--model", tmp / "nope.onnx", "-o", tmp / "out"]


@case("split.onnx is not a valid model", "split.onnx.data", "re-export it")
def onnx_external_data_missing(tmp, corpus):
    model = onnx.load(str(corpus.digits_onnx))
    onnx.save(model, str(tmp / "split.onnx"), save_as_external_data=True, location="split.onnx.data")
    (tmp / "split.onnx.data").unlink()  # the weights file was not copied along
    return ["compile", "--model", tmp / "split.onnx", "-o", tmp / "out"]


@case("refused by onnxruntime", "Frobnicate", "re-export it with a standard opset")
def onnx_unsupported_op(tmp, corpus):  # onnxruntime checks every build, so it is asked first, before the build
    graph = helper.make_graph([helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example")], "g",
                              [image()], [logits()])
    return compile_onnx(tmp, graph, domains=[helper.make_opsetid("com.example", 1)])


@case("has 2 inputs and 1 outputs", "one image tensor")
def onnx_two_inputs(tmp, corpus):
    graph = helper.make_graph([helper.make_node("Add", ["x", "x2"], ["y"])], "g",
                              [image((1, 10)), image((1, 10), name="x2")], [logits()])
    return compile_onnx(tmp, graph)


@case("input 'x' is float32[1, 64]", "expected a float32 NCHW image batch")
def onnx_input_rank_2(tmp, corpus):
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [image((1, 64))], [logits()],
                              [weight("w", 64, 10)])
    return compile_onnx(tmp, graph)


@case("input 'x' is int64[1, 1, 8, 8]", "expected a float32 NCHW image batch")
def onnx_input_int64(tmp, corpus):
    graph = helper.make_graph([helper.make_node("Cast", ["x"], ["f"], to=TensorProto.FLOAT),
                               helper.make_node("ReduceMean", ["f"], ["y"], keepdims=0)], "g",
                              [image(dtype=TensorProto.INT64)], [logits((1, 1))])
    return compile_onnx(tmp, graph)


@case("symbolic channels or size", "fixed image size")
def onnx_symbolic_image_size(tmp, corpus):
    graph = helper.make_graph([helper.make_node("ReduceMean", ["x"], ["y"], axes=None, keepdims=0)], "g",
                              [image((1, 3, "height", "width"))], [logits((1,))])
    return compile_onnx(tmp, graph)


@case("is not an MLP-Mixer", "3x3 kernel with stride 1x1", "pass a Mixer's ONNX")
def onnx_convolutional_network(tmp, corpus):
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"], name="conv1", kernel_shape=[3, 3]),
                               helper.make_node("Relu", ["c"], ["r"]),
                               helper.make_node("GlobalAveragePool", ["r"], ["p"]),
                               helper.make_node("Flatten", ["p"], ["f"]),
                               helper.make_node("MatMul", ["f", "fc"], ["y"])], "resnet-ish",
                              [image()], [logits()], [weight("w", 4, 1, 3, 3), weight("fc", 4, 10)])
    return compile_onnx(tmp, graph)


@case("is not an MLP-Mixer", "self-attention", "pass a Mixer's ONNX")
def onnx_transformer(tmp, corpus):
    nodes = [helper.make_node("Conv", ["x", "w"], ["p"], kernel_shape=[4, 4], strides=[4, 4]),  # patches, as in ViT
             helper.make_node("Reshape", ["p", "tokens"], ["t"]),
             helper.make_node("Transpose", ["t"], ["tt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["t", "tt"], ["scores"]),
             helper.make_node("Softmax", ["scores"], ["attn"], name="attention", axis=-1),
             helper.make_node("MatMul", ["attn", "t"], ["mixed"]),
             helper.make_node("ReduceMean", ["mixed", "axis"], ["y"], keepdims=0)]
    graph = helper.make_graph(nodes, "vit-ish", [image()], [logits((1, 4))],
                              [weight("w", 4, 1, 4, 4), numpy_helper.from_array(np.array([1, 4, 4], np.int64), "tokens"),
                               numpy_helper.from_array(np.array([1], np.int64), "axis")])
    return compile_onnx(tmp, graph)


@case("returns a 4-D tensor, not [batch, classes] logits", "pass a Mixer's ONNX")
def onnx_segmentation_output(tmp, corpus):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [image()], [logits((1, 1, 8, 8))])
    return compile_onnx(tmp, graph)


@case("fixed batch of 1, not 4", "--dynamic-batch")
def onnx_static_batch_asked_for_another(tmp, corpus):  # a GPU build takes the batch in one pass (CPUs: one per image)
    return ["compile", "--model", corpus.digits_onnx, "--target", "android-vulkan", "--batch", "4", "-o", tmp / "out"]


@case("--checkpoint goes with a preset name, not with an ONNX file")
def onnx_with_a_checkpoint(tmp, corpus):
    return ["compile", "--model", corpus.digits_onnx, "--checkpoint", tmp / "w.pth", "-o", tmp / "out"]


# ---- checkpoints --------------------------------------------------------------------------------

def digits_state() -> dict:
    torch.manual_seed(0)
    return create_model(preset("mixer_digits")).state_dict()


def compile_checkpoint(tmp: Path, state, name: str = "w.pth") -> list:
    torch.save(state, tmp / name)
    return ["compile", "--model", "mixer_digits", "--checkpoint", tmp / name, "-o", tmp / "out"]


@case("key 'head.bias'", "is missing", "w.pth")
def checkpoint_missing_key(tmp, corpus):
    state = digits_state()
    del state["head.bias"]
    return compile_checkpoint(tmp, state)


@case("unexpected key 'blocks.0.extra'", "w.pth")
def checkpoint_extra_key(tmp, corpus):
    return compile_checkpoint(tmp, {**digits_state(), "blocks.0.extra": torch.zeros(3)})


@case("w.pth does not fit", "'head.weight' is (7, 64) in the checkpoint but the model expects (10, 64)")
def checkpoint_misshaped_key(tmp, corpus):
    state = digits_state()
    state["head.weight"] = torch.zeros(7, state["head.weight"].shape[1])
    return compile_checkpoint(tmp, state)


@case("w.pth could not be read")
def checkpoint_corrupt(tmp, corpus):
    (tmp / "w.pth").write_bytes(b"PK\x03\x04 a zip header and then nothing")
    return ["compile", "--model", "mixer_digits", "--checkpoint", tmp / "w.pth", "-o", tmp / "out"]


class Payload:
    """Unpickling this would create a file: the test checks that nothing was written."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@case("evil.pth could not be read")
def checkpoint_with_pickled_code(tmp, corpus):
    torch.save({"head.bias": Payload(tmp / "executed")}, tmp / "evil.pth")  # torch.load(weights_only) refuses it
    return ["compile", "--model", "mixer_digits", "--checkpoint", tmp / "evil.pth", "-o", tmp / "out"]


@case("unknown suffix", ".ckpt")
def checkpoint_unknown_format(tmp, corpus):
    (tmp / "w.ckpt").write_bytes(b"lightning")
    return ["compile", "--model", "mixer_digits", "--checkpoint", tmp / "w.ckpt", "-o", tmp / "out"]


@case("unknown model preset 'mixer_xl'", "mixer_s16")
def model_unknown_preset(tmp, corpus):
    return ["compile", "--model", "mixer_xl", "-o", tmp / "out"]


# ---- calibration data and recipes ---------------------------------------------------------------

def calibrate_on(tmp: Path, array: np.ndarray) -> list:
    np.save(tmp / "calib.npy", array)
    return ["calibrate", "--calib-data", tmp / "calib.npy", "-o", tmp / "q.onnx"]


RNG = np.random.default_rng(0)


@case("calib.npy", "empty")
def calibration_empty(tmp, corpus):
    return calibrate_on(tmp, np.zeros((0, 1, 8, 8), np.float32))


@case("calib.npy", "NaN")
def calibration_nan(tmp, corpus):
    return calibrate_on(tmp, np.where(RNG.random((300, 1, 8, 8)) < 0.01, np.nan, 0.5).astype(np.float32))


@case("calib.npy", "constant")
def calibration_constant(tmp, corpus):
    return calibrate_on(tmp, np.full((300, 1, 8, 8), 0.25, np.float32))


@case("shape", "(N, 1, 8, 8)")
def calibration_wrong_channels(tmp, corpus):
    return calibrate_on(tmp, RNG.standard_normal((300, 3, 8, 8)).astype(np.float32))


@case("shape", "(N, 1, 8, 8)")
def calibration_wrong_image_size(tmp, corpus):
    return calibrate_on(tmp, RNG.standard_normal((300, 1, 16, 16)).astype(np.float32))


@case("10 samples", "fewer than the 256")
def calibration_too_few_samples(tmp, corpus):
    return calibrate_on(tmp, RNG.standard_normal((10, 1, 8, 8)).astype(np.float32))


@case("holds no images")
def calibration_empty_folder(tmp, corpus):
    (tmp / "images").mkdir()
    return ["calibrate", "--calib-data", tmp / "images", "-o", tmp / "q.onnx"]


@case("could not be read", "0.png")
def calibration_unreadable_image(tmp, corpus):
    (tmp / "images").mkdir()
    (tmp / "images" / "0.png").write_bytes(b"\x89PNG but not really")
    return ["calibrate", "--calib-data", tmp / "images", "-o", tmp / "q.onnx"]


@case("recipe.toml", "could not be read")
def calibration_recipe_malformed(tmp, corpus):
    (tmp / "recipe.toml").write_text('observer = "minmax\n')
    return ["calibrate", "--calibration", tmp / "recipe.toml", "-o", tmp / "q.onnx"]


@case("observer 'kl'")
def calibration_recipe_unknown_observer(tmp, corpus):
    (tmp / "recipe.toml").write_text('observer = "kl"\n')
    return ["calibrate", "--calibration", tmp / "recipe.toml", "-o", tmp / "q.onnx"]


# ---- targets and toolchains ---------------------------------------------------------------------

@case("unknown target 'rpi6'", "rpi5")
def target_unknown_preset(tmp, corpus):
    return ["compile", "--target", "rpi6", "-o", tmp / "out"]


def compile_for_preset(tmp: Path, toml: str) -> list:
    (tmp / "board.toml").write_text(toml)
    return ["compile", "--target", tmp / "board.toml", "-o", tmp / "out"]


@case("board.toml", "could not be read")
def target_preset_malformed_toml(tmp, corpus):
    return compile_for_preset(tmp, 'kind = [cpu\n')


@case("mcpu 'cortex-a99'")
def target_preset_unknown_cpu(tmp, corpus):
    return compile_for_preset(tmp, 'kind = "cpu"\n[target]\nkind = "llvm"\nmcpu = "cortex-a99"\n'
                                   'mtriple = "aarch64-linux-gnu"\n')


@case("board.toml: [build] cuda_runtime is for CUDA presets, and this one is kind cpu", "remove it")
def target_preset_cpu_with_a_cuda_runtime(tmp, corpus):
    return compile_for_preset(tmp, '[target]\nkind = "llvm"\n[build]\ncuda_runtime = "driver"\n')


@case("board.toml: [build] cuda_driver_major is for CUDA presets, and this one is kind cpu", "remove it")
def target_preset_cpu_with_a_cuda_driver(tmp, corpus):
    return compile_for_preset(tmp, '[target]\nkind = "llvm"\n[build]\ncuda_driver_major = 12\n')


@case("missing [target]")
def target_preset_without_target_table(tmp, corpus):
    return compile_for_preset(tmp, 'kind = "cpu"\n')


@case("JSON is malformed")
def target_raw_json_malformed(tmp, corpus):
    return ["compile", "--target", '{"kind": "llvm", ', "-o", tmp / "out"]


@case('must be an object with a "kind"')
def target_raw_json_without_kind(tmp, corpus):
    return ["compile", "--target", '{"mcpu": "znver4"}', "-o", tmp / "out"]


@case("TVM target kind 'tpu9' is not one mixer-edge builds for", "use llvm, cuda, vulkan")
def target_raw_json_unknown_kind(tmp, corpus):
    return ["compile", "--target", '{"kind": "tpu9"}', "-o", tmp / "out"]


@case("target rpi4 builds float32 or int8, not float16")
def target_precision_it_lacks(tmp, corpus):
    return ["compile", "--target", "rpi4", "--precision", "float16", "-o", tmp / "out"]


@case("aarch64-linux-gnu-g++", "apt-get install g++-aarch64-linux-gnu")
def toolchain_missing_cross_compiler(tmp, corpus):
    corpus.monkeypatch.setenv("PATH", str(tmp / "empty-path"))
    return ["compile", "--target", "rpi4", "-o", tmp / "out"]


@case("needs nvcc", "install the CUDA toolkit")
def toolchain_missing_nvcc(tmp, corpus):
    corpus.monkeypatch.setenv("PATH", str(tmp / "empty-path"))
    return ["compile", "--target", "cuda", "-o", tmp / "out"]


@case("target jetson-xavier: nvcc 13", "cannot compile for sm_72", "pip install 'mixer-edge[jetson]'")
def toolchain_xavier_without_nvrtc(tmp, corpus):
    corpus.monkeypatch.setattr(cuda.Nvrtc, "find", staticmethod(lambda: None))  # the jetson extra not installed
    return ["compile", "--target", "jetson-xavier", "-o", tmp / "out"]


@case("target jetson-orin: the board's CUDA 12 driver ([build] cuda_driver_major) cannot load kernels from nvcc 13",
      "pip install 'mixer-edge[jetson]'", "or put a CUDA 12 toolkit first on PATH")
def toolchain_orin_without_nvrtc(tmp, corpus):
    corpus.monkeypatch.setattr(cuda.Nvrtc, "find", staticmethod(lambda: None))
    return ["compile", "--target", "jetson-orin", "-o", tmp / "out"]


# ---- command lines and output paths -------------------------------------------------------------

@case("argument --batch: takes a batch size from 1 to 4096, not 0", "see 'mixer-edge compile --help'")
def option_batch_zero(tmp, corpus):
    return ["compile", "--batch", "0", "-o", tmp / "out"]


@case("argument --time-budget: takes a duration such as 90s, 10m or 1h30m, not 'soon'")
def option_time_budget_unparsable(tmp, corpus):
    return ["tune", "--time-budget", "soon", "--tuning-db", tmp / "db"]


@case("argument --precision: expected one argument", "see 'mixer-edge compile --help'")
def option_without_its_value(tmp, corpus):
    return ["compile", "-o", tmp / "out", "--precision"]


# ---- preprocessing options and files --------------------------------------------------------------

@case("argument --std: takes comma-separated numbers > 0", "greater than 0, got -1.0")
def preprocessing_std_negative(tmp, corpus):
    return ["compile", "--model", corpus.digits_onnx, "--std", "-1", "-o", tmp / "out"]


@case("argument --crop-pct: takes a fraction in (0, 1]", "greater than 0, got 0.0")
def preprocessing_crop_zero(tmp, corpus):
    return ["compile", "--model", corpus.digits_onnx, "--crop-pct", "0", "-o", tmp / "out"]


@case("argument --crop-pct: takes a fraction in (0, 1]", "less than or equal to 1, got 1.5")
def preprocessing_crop_above_one(tmp, corpus):
    return ["compile", "--model", corpus.digits_onnx, "--crop-pct", "1.5", "-o", tmp / "out"]


@case("argument --interpolation: takes nearest, box, bilinear", "got 'cubic'")
def preprocessing_interpolation_unknown(tmp, corpus):
    return ["compile", "--model", corpus.digits_onnx, "--interpolation", "cubic", "-o", tmp / "out"]


@case("argument --mean: takes comma-separated numbers", "not '0.5,,0.5'")
def preprocessing_mean_not_numbers(tmp, corpus):
    return ["compile", "--model", corpus.digits_onnx, "--mean", "0.5,,0.5", "-o", tmp / "out"]


@case("the preprocessing stated by --mean: field 'mean': has 3 values but channels is 1",
      "state one mean and one std per channel")
def preprocessing_mean_per_channel(tmp, corpus):
    return ["compile", "--model", corpus.digits_onnx, "--mean", "0.485,0.456,0.406", "-o", tmp / "out"]


@case("--size: size [224, 224] is not the model's input size [8, 8]", "state [8, 8] or leave it out")
def preprocessing_size_not_the_model_s(tmp, corpus):
    return ["compile", "--model", corpus.digits_onnx, "--size", "224", "-o", tmp / "out"]


@case("preprocessing file", "missing.toml could not be read", "pass a readable TOML file")
def preprocessing_file_unreadable(tmp, corpus):
    return ["compile", "--model", corpus.digits_onnx, "--preprocessing", tmp / "missing.toml", "-o", tmp / "out"]


@case("pre.toml could not be read", "pass a readable TOML file")
def preprocessing_file_not_toml(tmp, corpus):
    (tmp / "pre.toml").write_text("mean = [0.5,\n")
    return ["compile", "--model", corpus.digits_onnx, "--preprocessing", tmp / "pre.toml", "-o", tmp / "out"]


@case("pre.json: unknown field 'resize'", "(known: crop_pct, interpolation, mean, size, std)", "fix the file")
def preprocessing_file_unknown_key(tmp, corpus):
    (tmp / "pre.json").write_text('{"mean": [0.5], "resize": 256}')
    return ["compile", "--model", corpus.digits_onnx, "--preprocessing", tmp / "pre.json", "-o", tmp / "out"]


@case("pre.toml: field 'std.0': Input should be greater than 0", "fix the file")
def preprocessing_file_std_zero(tmp, corpus):
    (tmp / "pre.toml").write_text("std = [0.0]\n")
    return ["compile", "--model", corpus.digits_onnx, "--preprocessing", tmp / "pre.toml", "-o", tmp / "out"]


@case("--preprocessing", "pre.yaml: takes a .toml or .json file")
def preprocessing_file_of_another_kind(tmp, corpus):
    (tmp / "pre.yaml").write_text("mean: [0.5]\n")
    return ["compile", "--model", corpus.digits_onnx, "--preprocessing", tmp / "pre.yaml", "-o", tmp / "out"]


@case("out exists and is a file", "choose another path")
def output_path_is_a_file(tmp, corpus):
    (tmp / "out").write_text("my notes\n")
    return ["compile", "-o", tmp / "out"]


@case("already holds other files and no manifest.json", "choose a new path")
def output_directory_holds_other_files(tmp, corpus):
    (tmp / "out").mkdir()
    (tmp / "out" / "thesis.tex").write_text("years of work\n")  # never replaced by an artifact
    return ["compile", "-o", tmp / "out"]


@case("notes.txt is a file, so", "cannot be written under it", "choose another path")
def output_path_under_a_file(tmp, corpus):
    (tmp / "notes.txt").write_text("my notes\n")
    return ["compile", "-o", tmp / "notes.txt" / "out"]


@case("No space left on device", "nothing was changed there", "free some space")
def disk_full_during_artifact_write(tmp, corpus):
    out = corpus.artifact(tmp)  # an earlier build at the output path: it must survive untouched

    def full_disk(file, **arrays):
        Path(file).write_bytes(b"PK\x03\x04" + b"\0" * 1000)  # the first blocks made it to disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))

    corpus.monkeypatch.setattr(np, "savez", full_disk)
    return ["compile", "--no-verify", "-o", out]


# ---- artifacts ----------------------------------------------------------------------------------

def edit(root: Path, change, reseal: bool = False) -> None:
    """Change an artifact's manifest; `reseal` also recomputes its digest, as a forger would."""
    manifest = json.loads((root / runtime.MANIFEST).read_text())
    change(manifest)
    if reseal:
        manifest["manifest_sha256"] = runtime.manifest_digest(manifest)
    (root / runtime.MANIFEST).write_text(json.dumps(manifest))


@case("manifest.json was edited after the build", "rebuild it")
def artifact_manifest_edited(tmp, corpus):
    root = corpus.artifact(tmp)
    edit(root, lambda m: m["input"].update(shape=[1, 1, 16, 16]))
    return ["run", root]


@case("manifest.json is not valid JSON", "rebuild the artifact")
def artifact_manifest_not_json(tmp, corpus):
    root = corpus.artifact(tmp)
    (root / runtime.MANIFEST).write_text('{"format_version": 2, "files": {')
    return ["inspect", root]


@case("artifact format version 1", "rebuild it with this mixer-edge")
def artifact_older_format_version(tmp, corpus):
    root = corpus.artifact(tmp)
    edit(root, lambda m: m.update(format_version=1), reseal=True)
    return ["inspect", root]


@case("missing field 'params'", "rebuild the artifact")
def artifact_manifest_forged_without_a_field(tmp, corpus):
    root = corpus.artifact(tmp)
    edit(root, lambda m: m.pop("params"), reseal=True)
    return ["run", root]


@case("field 'preprocess.crop_pct': Input should be less than or equal to 1", "rebuild the artifact")
def artifact_manifest_forged_crop_above_one(tmp, corpus):
    root = corpus.artifact(tmp)
    edit(root, lambda m: m["preprocess"].update(crop_pct=1.5), reseal=True)
    return ["run", root]


@case("model.so does not match its sha256", "copy the artifact again")
def artifact_swapped_library(tmp, corpus):
    root = corpus.artifact(tmp)
    shutil.copy(corpus.request.getfixturevalue("build_artifact")("rpi5") / runtime.LIBRARY, root / runtime.LIBRARY)
    return ["run", root]


@case("built for aarch64 but the manifest says x86_64", "rebuild it")
def artifact_swapped_library_with_forged_hashes(tmp, corpus):
    root = corpus.artifact(tmp)
    shutil.copy(corpus.request.getfixturevalue("build_artifact")("rpi5") / runtime.LIBRARY, root / runtime.LIBRARY)
    edit(root, lambda m: m["files"].update({runtime.LIBRARY: runtime.sha256(root / runtime.LIBRARY)}), reseal=True)
    return ["run", root]


@case("params.npz does not match its sha256")
def artifact_corrupt_params(tmp, corpus):
    root = corpus.artifact(tmp)
    with open(root / runtime.PARAMS, "r+b") as f:
        f.seek(200)
        f.write(b"\xff" * 8)
    return ["run", root]


@case("params.npz does not hold the plain arrays", "rebuild the artifact")
def artifact_params_hold_pickled_code(tmp, corpus):
    root = corpus.artifact(tmp)
    manifest = json.loads((root / runtime.MANIFEST).read_text())
    payload = np.array([Payload(tmp / "executed")], dtype=object)
    np.savez(root / runtime.PARAMS, **{name: payload for name in manifest["params"]})  # pickles the object arrays
    edit(root, lambda m: m["files"].update({runtime.PARAMS: runtime.sha256(root / runtime.PARAMS)}), reseal=True)
    return ["run", root]


@case("missing params.npz", "copy the whole artifact directory")
def artifact_missing_file(tmp, corpus):
    root = corpus.artifact(tmp)
    (root / runtime.PARAMS).unlink()
    return ["run", root]


@case("lists ../../etc/passwd, which is not a file inside the artifact", "rebuild it")
def artifact_lists_a_file_outside_itself(tmp, corpus):
    root = corpus.artifact(tmp)
    edit(root, lambda m: m["files"].update({"../../etc/passwd": "0" * 64}), reseal=True)
    return ["inspect", root]


@case("art.tar could not be unpacked", "outside the destination", native=False)
def artifact_tar_escaping_its_directory(tmp, corpus):
    with tarfile.open(tmp / "art.tar", "w") as tar:
        member = tarfile.TarInfo(f"../{tmp.name}-escaped.txt")  # would land beside the unpack directory
        member.size = 4
        tar.addfile(member, io.BytesIO(b"evil"))
    return ["run", tmp / "art.tar"]


@case("built for aarch64 (target rpi5) but this machine is x86_64", "run it on the device")
def artifact_for_another_board(tmp, corpus):
    if runtime.platform.machine() != "x86_64":
        pytest.skip("needs an x86_64 device: the case is an x86_64 machine refusing an aarch64 artifact")
    return ["run", corpus.artifact(tmp, "rpi5")]


@case("needs CPU features this CPU lacks", "rebuild for this board's preset", native=False)
def artifact_for_a_newer_cpu(tmp, corpus):
    root = corpus.artifact(tmp)
    corpus.monkeypatch.setattr(runtime, "machine_cpu_features", lambda: {"sse2", "avx"})  # an older x86 board
    return ["run", root]


@case("computes in float16, which the Vulkan device", "(no shader-f16)", "rebuild it with --precision float32",
      native=False)
def artifact_float16_on_a_vulkan_device_without_f16(tmp, corpus):
    compile_model(corpus.request.getfixturevalue("digits_source"), "android-vulkan", tmp / "art", precision="float16",
                  progress=quiet)

    class WithoutF16:  # the software device, as a Vulkan GPU without 16-bit floats
        def __init__(self, gpu):
            self.gpu = gpu

        def __getattr__(self, name):
            return getattr(self.gpu, name)

        features = property(lambda self: self.gpu.features - {"shader-f16"})

    real = vulkan.adapter
    corpus.monkeypatch.setattr(vulkan, "adapter", lambda: WithoutF16(real()))
    return ["run", tmp / "art"]


@case("is not a mixer-edge artifact (no manifest.json)", "pass the directory `compile` wrote")
def artifact_path_is_not_an_artifact(tmp, corpus):
    (tmp / "photos").mkdir()
    return ["inspect", tmp / "photos"]


@case("big.npy has shape (5, 1, 16, 16); the model expects (N, 1, 8, 8)", "pass arrays of that shape")
def run_input_of_another_shape(tmp, corpus):
    root = corpus.artifact(tmp)
    np.save(tmp / "big.npy", np.zeros((5, 1, 16, 16), np.float32))
    return ["run", root, "--input", tmp / "big.npy"]


# ---- tuning databases ---------------------------------------------------------------------------

@case("is not a mixer-edge tuning database", "pass the directory `mixer-edge tune` wrote")
def tuning_database_that_is_not_one(tmp, corpus):
    (tmp / "db").mkdir()
    (tmp / "db" / "key.json").write_text("{torn")
    return ["compile", "--tuning-db", tmp / "db", "-o", tmp / "out"]
