"""Preprocessing is stated or said to be assumed, never silently assumed: --mean/--std/--size/--interpolation/
--crop-pct and --preprocessing FILE, the paper presets' own, the `assumed` record, and the center crop in the
Python decoder and the native runner."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import onnx
import pytest
from PIL import Image

from mixer_edge import bundle, cli, runtime
from mixer_edge.data import DIGITS_PREPROCESS, Preprocess, load_inputs
from mixer_edge.export import preset_preprocess
from mixer_edge.model import PREPROCESSING, preset

from conftest import quiet

ASSUMED_LINE = ("preprocessing assumed: mean 0.5, std 0.5, bilinear, no crop; pass --mean/--std/--interpolation/"
                "--crop-pct or --preprocessing FILE if the model was trained otherwise")
CROPPED = ["--mean", "0.4", "--std", "0.3", "--crop-pct", "0.5", "--interpolation", "box"]


@pytest.fixture(scope="module")
def onnx_file(digits_source, tmp_path_factory):
    """A user's ONNX: the digits Mixer (8x8 grey), which records no preprocessing."""
    path = tmp_path_factory.mktemp("onnx") / "digits.onnx"
    onnx.save(digits_source.onnx_model, str(path))
    return path


@pytest.fixture(scope="module")
def cropped_artifact(onnx_file, tmp_path_factory):
    """The ONNX compiled for this machine with its preprocessing stated, a crop among it."""
    out = tmp_path_factory.mktemp("cropped") / "art"
    assert cli.main(["compile", "--model", str(onnx_file), *CROPPED, "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A 48x32 grey picture: a digit-like blob in the middle, bright clutter at the left and right edges."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 60, (32, 48)).astype(np.uint8)
    pixels[8:24, 16:32] = 200
    pixels[:, :6] = pixels[:, -6:] = 255
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    Image.fromarray(pixels).save(path)
    return path


def stated(*argv: str):
    """The preprocessing the model options `argv` give (the command line's own path, without a build)."""
    args = cli.build_parser().parse_args(["compile", *argv])
    lines = []
    return cli._model(args).open(progress=lines.append).preprocess, lines


# ---- where the preprocessing comes from ---------------------------------------------------------

@pytest.mark.parametrize("name", ["mixer_s16", "mixer_s32", "mixer_b16", "mixer_b32", "mixer_l16", "mixer_l32"])
def test_paper_presets_carry_the_preprocessing_of_their_official_weights(name):
    """timm's per-model config of the paper Mixers: Inception mean/std, bicubic, crop 0.875; stated, not assumed."""
    pre = preset_preprocess(name, preset(name))
    assert (pre.mean, pre.std, pre.resample, pre.crop_pct, pre.assumed) == ((0.5,) * 3, (0.5,) * 3, "bicubic",
                                                                            0.875, False)
    assert pre.size == (224, 224) and PREPROCESSING[name]["crop_pct"] == 0.875


def test_a_preset_without_official_preprocessing_is_assumed_and_digits_is_its_own():
    assert preset_preprocess("mixer_tiny", preset("mixer_tiny")).assumed
    assert preset_preprocess("mixer_digits", preset("mixer_digits")) == DIGITS_PREPROCESS


def test_the_bundled_checkpoint_states_its_own(digits_source):
    assert digits_source.preprocess == DIGITS_PREPROCESS and not digits_source.preprocess.assumed


def test_an_onnx_without_statements_is_assumed_and_said_so(onnx_file):
    pre, lines = stated("--model", str(onnx_file))
    assert pre.assumed and (pre.mean, pre.std, pre.resample, pre.crop_pct) == ((0.5,), (0.5,), "bilinear", 1.0)
    assert lines == [ASSUMED_LINE]


def test_a_toml_and_a_json_file_state_it_and_options_override_the_file(onnx_file, tmp_path):
    (tmp_path / "pre.toml").write_text('mean = [0.1]\nstd = [0.2]\ninterpolation = "bicubic"\ncrop_pct = 0.875\n'
                                       "size = [8, 8]\n")
    (tmp_path / "pre.json").write_text(json.dumps({"mean": [0.1], "std": [0.2], "interpolation": "bicubic",
                                                   "crop_pct": 0.875}))
    for name in ("pre.toml", "pre.json"):
        pre, lines = stated("--model", str(onnx_file), "--preprocessing", str(tmp_path / name))
        assert (pre.mean, pre.std, pre.resample, pre.crop_pct, pre.assumed) == ((0.1,), (0.2,), "bicubic", 0.875,
                                                                                False)
        assert lines == []
    pre, _ = stated("--model", str(onnx_file), "--preprocessing", str(tmp_path / "pre.toml"), "--std", "0.25",
                    "--crop-pct", "1")
    assert (pre.mean, pre.std, pre.resample, pre.crop_pct) == ((0.1,), (0.25,), "bicubic", 1.0)


def test_a_partial_statement_names_what_stays_assumed(onnx_file):
    pre, lines = stated("--model", str(onnx_file), "--mean", "0.4", "--std", "0.3")
    assert pre.assumed and pre.mean == (0.4,)
    assert len(lines) == 1 and "(--interpolation, --crop-pct not stated)" in lines[0], lines


def test_options_override_a_preset_s_own(tmp_path):
    """A checkpoint trained otherwise: the options state it over the preset's."""
    pre, lines = stated("--model", "mixer_digits", "--std", "0.25")  # random weights: its own, not assumed
    assert (pre.mean, pre.std, pre.assumed) == ((0.5,), (0.25,), False) and not any("assumed" in x for x in lines)


# ---- the artifact records it, the runtime repeats it -------------------------------------------

def test_stated_preprocessing_is_recorded_and_run_crops_as_pil_by_hand(cropped_artifact, photo, run_cli, tmp_path):
    assert runtime.read_manifest(cropped_artifact)["preprocess"] == {
        "size": [8, 8], "channels": 1, "mean": [0.4], "std": [0.3], "resample": "box", "crop_pct": 0.5,
        "assumed": False}
    # by hand: the shorter side (32) to floor(8 / 0.5) = 16, so 48x32 -> 24x16; the center 8x8 is [4:12, 8:16]
    small = np.asarray(Image.open(photo).resize((24, 16), Image.Resampling.BOX), np.float32)[4:12, 8:16]
    expected = ((small / 255.0 - 0.4) / 0.3)[None, None]
    model = runtime.load(cropped_artifact)
    x, _ = load_inputs(photo, model.preprocess)
    np.testing.assert_allclose(x, expected, rtol=0, atol=1e-6)
    code, out, err = run_cli("run", cropped_artifact, "--input", photo, "--save", tmp_path / "logits.npy")
    assert code == 0, err
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), model(expected.astype(np.float32)), atol=1e-5)
    code, out, err = run_cli("inspect", cropped_artifact)
    assert "preprocess mean 0.4, std 0.3, box, crop 0.5, to 8x8\n" in out and "assumed" not in out


def test_the_crop_rounds_and_resizes_as_torchvision_does(tmp_path):
    """A 50x37 photo at crop 0.875 to 8x8: shorter side 37 -> floor(8 / 0.875) = 9, the longer int(9 * 50 / 37)
    = 12; the crop starts at round(4 / 2) = 2 and round(1 / 2) = 0 (half to even, as torchvision's CenterCrop)."""
    pixels = np.random.default_rng(1).integers(0, 256, (37, 50, 3)).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "odd.png")
    pre = Preprocess(size=(8, 8), channels=3, resample="bicubic", crop_pct=0.875)
    assert pre.crop_box(50, 37) == (12, 9, 2, 0)
    small = np.asarray(Image.fromarray(pixels).resize((12, 9), Image.Resampling.BICUBIC), np.float32)[0:8, 2:10]
    x, _ = load_inputs(tmp_path / "odd.png", pre)
    np.testing.assert_allclose(x[0], pre.normalize((small / 255.0).transpose(2, 0, 1)[None])[0], atol=1e-6)


def test_without_statements_the_manifest_says_assumed_and_the_line_is_printed(onnx_file, run_cli, tmp_path):
    out = tmp_path / "art"
    code, _, err = run_cli("compile", "--model", onnx_file, "--no-verify", "-o", out)
    assert code == 0, err
    assert f"[mixer-edge] {ASSUMED_LINE}" in err.splitlines()
    assert runtime.read_manifest(out)["preprocess"]["assumed"] is True
    code, stdout, _ = run_cli("inspect", out)
    assert "preprocess mean 0.5, std 0.5, bilinear, no crop, to 8x8 (assumed: nobody stated it)" in stdout


def test_an_artifact_from_before_crop_and_assumed_still_loads(copy_artifact, digits_test):
    root = copy_artifact("host")
    manifest = json.loads((root / runtime.MANIFEST).read_text())
    for key in ("crop_pct", "assumed"):
        manifest["preprocess"].pop(key)
    manifest["manifest_sha256"] = runtime.manifest_digest(manifest)
    (root / runtime.MANIFEST).write_text(json.dumps(manifest))
    model = runtime.load(root)
    assert (model.preprocess.crop_pct, model.preprocess.assumed) == (1.0, False)
    assert model(digits_test[0][:1]).shape == (1, 10)


# ---- the native runner crops the same -----------------------------------------------------------

def test_the_native_runner_crops_as_the_python_runtime(cropped_artifact, photo, tmp_path):
    """stb's box filter halving the photo exactly, then the same crop: the runner's logits are the Python
    runtime's within float rounding (other filters are close to PIL's, not identical)."""
    root = bundle.package(cropped_artifact, tmp_path / "bundle", progress=quiet)
    proc = subprocess.run([str(root / "bin" / "mixer-edge-run"), str(root / "artifact"), "--input", str(photo),
                           "--show", "0", "--save", str(tmp_path / "logits.npy")], capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    model = runtime.load(cropped_artifact)
    reference = model(load_inputs(photo, model.preprocess)[0])
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), reference, rtol=0, atol=1e-4)
    uncropped = model(load_inputs(photo, Preprocess(size=(8, 8), channels=1, mean=(0.4,), std=(0.3,),
                                                    resample="box"))[0])
    assert np.abs(uncropped - reference).max() > 1e-2  # the crop is what made them agree


# ---- the README's example, as written -----------------------------------------------------------

def tiny_rgb_onnx(path):
    """A 3-channel 8x8 classifier small enough to build in a second: mean over the image, then a linear layer."""
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.random.default_rng(0).random((3, 10), dtype=np.float32), "w")
    axes = numpy_helper.from_array(np.array([2, 3], np.int64), "axes")
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x", "axes"], ["pooled"], keepdims=0),
         helper.make_node("MatMul", ["pooled", "w"], ["y"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], [weight, axes])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def test_the_readme_example_runs_as_written(run_cli, tmp_path, monkeypatch):
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    block = readme.split("cat > preprocessing.toml <<'EOF'\n", 1)[1].split("```", 1)[0]
    toml, command = block.split("\nEOF\n")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "preprocessing.toml").write_text(toml + "\n")
    tiny_rgb_onnx(tmp_path / "other_mixer.onnx")
    argv = command.split()
    assert argv[:2] == ["mixer-edge", "compile"]
    code, out, err = run_cli(*argv[1:], "--no-verify", "-o", "art")
    assert code == 0, err
    assert runtime.read_manifest(tmp_path / "art")["preprocess"] == {
        "size": [8, 8], "channels": 3, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
        "resample": "bicubic", "crop_pct": 0.9, "assumed": False}
    assert "assumed" not in err
