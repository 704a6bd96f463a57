"""The mixer-edge command: the main job end to end, and option mistakes (files: tests/test_bad_inputs.py)."""

import json
import shutil
import subprocess
import sys

import pytest

from conftest import assert_one_line_error


def test_targets_lists_every_preset(run_cli):
    code, out, _ = run_cli("targets")
    assert code == 0
    for name in ("x86-avx512", "rpi4", "rpi5", "jetson-orin", "cuda", "h100", "android-vulkan"):
        assert f"\n{name} " in "\n" + out


def test_compile_run_inspect(run_cli, tmp_path):
    code, out, err = run_cli("compile", "--target", "host,rpi5", "-o", tmp_path)
    assert code == 0, err
    host = next(tmp_path.glob("mixer_digits-x86-*"))
    assert "top-1 agreement 100.00%" in out and (tmp_path / "mixer_digits-rpi5" / "model.so").is_file()
    code, out, _ = run_cli("run", host, "--show", "1")
    assert code == 0 and "top-1 accuracy on digits-test: 98.61% (360 samples)" in out
    code, out, _ = run_cli("inspect", tmp_path / "mixer_digits-rpi5")
    assert code == 0 and "rpi5" in out and "asimddp" in out
    code, out, _ = run_cli("inspect", "--json", host)
    assert json.loads(out)["verification"]["top1_agreement"] == 1.0


def test_export_command(run_cli, tmp_path):
    code, out, err = run_cli("export", "-o", tmp_path / "digits.onnx", "--dynamic-batch")
    assert code == 0, err
    assert "opset 18" in out
    assert [p.name for p in tmp_path.iterdir()] == ["digits.onnx"]


def test_train_command(run_cli, tmp_path):
    code, out, _ = run_cli("train", "--epochs", "1", "-o", tmp_path / "d.safetensors")
    assert code == 0 and "test accuracy" in out
    code, out, err = run_cli("compile", "--checkpoint", tmp_path / "d.safetensors", "-o", tmp_path / "art")
    assert code == 0, err


def test_precisions_and_batches_make_one_artifact_each(run_cli, tmp_path):
    code, out, err = run_cli("compile", "--target", "cuda", "--precision", "float32,float16", "--batch", "1,4",
                             "-o", tmp_path)
    assert code == 0, err
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["mixer_digits-cuda", "mixer_digits-cuda-b4", "mixer_digits-cuda-fp16", "mixer_digits-cuda-fp16-b4"]
    code, out, _ = run_cli("inspect", tmp_path / "mixer_digits-cuda-fp16-b4")
    assert "float16 compute, float32 accumulation" in out and "batch 4" in out


def test_bench_reports_ratios_beside_pytorch_and_onnxruntime(run_cli, tmp_path):
    code, out, err = run_cli("bench", "--target", "host", "--rounds", "2", "--json", tmp_path / "b.json", "--no-peers")
    assert code == 0, err  # the peers: tests/test_peers.py
    assert "openvino" not in out and "executorch" not in out
    assert "| mixer-edge float32 |" in out and "| pytorch eager float32 |" in out and "onnxruntime CPU" in out
    assert "| torch.compile float32 |" in out
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert rows[0]["vs_torch_fp32"]["top1_agreement"] == 1.0
    latency = rows[0]["latency"]
    assert latency["pytorch eager float32"]["speedup_vs_pytorch_fp32"] == 1.0
    for t in latency.values():  # every call of 2 rounds x 5 timed on its own
        assert t["calls"] == 10 and t["min_ms"] <= t["median_ms"] <= t["p90_ms"] <= t["p99_ms"]
        assert t["throughput_per_s"] == pytest.approx(1e3 / t["median_ms"])


def test_int8_compile_and_bench(run_cli, tmp_path):
    code, out, err = run_cli("compile", "--precision", "int8", "--calibration", "minmax", "--calib-samples", "128",
                             "-o", tmp_path / "art")
    assert code == 0, err
    assert "layers on int8" in err and "against onnxruntime on the same QDQ model" in err
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["quantization"]["recipe"]["name"] == "minmax" and manifest["quantization"]["samples"] == 128
    code, out, err = run_cli("bench", "--precision", "float32,int8", "--rounds", "2", "--no-torch-compile",
                             "--no-peers")
    assert code == 0, err
    assert "| mixer-edge int8 |" in out and "| onnxruntime CPU int8 (QDQ) |" in out
    assert "batch 1: mixer-edge int8 is" in out and "onnxruntime int8" in out
    assert "against the fastest int8 peer, onnxruntime CPU int8 (QDQ)," in out  # the only int8 peer here


@pytest.mark.parametrize("args, message", [
    (("compile", "--batch", "1,x"), "argument --batch: takes a batch size from 1 to 4096, not 'x'"),
    (("compile", "--target", "rpi5-vulkan", "--precision", "int8"), "target rpi5-vulkan builds float32, not int8"),
    (("compile", "--calibration", "minmax"), "apply to --precision int8 only"),
    (("compile", "--precision", "int8", "--calibration", "nope"), "nope"),
    (("compile", "--precision", "int8", "--calib-samples", "0"), "argument --calib-samples: takes a whole number from 1"),
    (("tune", "--calib-data", "digits-train"), "apply to --precision int8 only"),
    (("compile", "--target", "cuda", "--precision", "bfloat16"), "takes float32, float16, int8, not 'bfloat16'"),
    (("bench", "--model", "other.onnx"), "not an ONNX file"),
    (("export", "-o", "x.onnx", "--batch", "1,8"), "give one --batch"),
    (("run", "nowhere", "--board", "x86-avx2"), "does not exist"),
])
def test_bad_build_arguments(run_cli, args, message):
    code, _, err = run_cli(*args)
    assert_one_line_error(code, err, message)


def test_installed_command_prints_no_traceback(tmp_path):
    exe = shutil.which("mixer-edge")
    assert exe, "install the package (pip install -e .) so the console script exists"
    proc = subprocess.run([exe, "inspect", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"mixer-edge: error: {tmp_path} is not a mixer-edge artifact (no manifest.json): " \
                                  "pass the directory `compile` wrote"


def test_module_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mixer_edge.cli", "run", str(tmp_path / "x")], capture_output=True, text=True)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
