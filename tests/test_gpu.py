"""CUDA artifacts on a real GPU: predictions against torch on the same GPU. Skipped where there is no GPU."""

from pathlib import Path

import numpy as np
import pytest

from conftest import agreement

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not Path("/dev/nvidia0").exists(),
                                                  reason="needs an NVIDIA GPU and its driver (none on this machine)")]


@pytest.mark.parametrize("target", ["cuda", "h100", "a100", "l4"])
def test_cuda_artifact_matches_torch(build_artifact, digits_source, digits_test, target):
    import torch

    from mixer_edge import runtime

    try:
        model = runtime.load(build_artifact(target))
    except runtime.MixerEdgeError as exc:
        if "this GPU is" in str(exc):
            pytest.skip(f"this GPU is not a {target} device: {exc}")
        raise
    x = digits_test[0]
    with torch.no_grad():
        reference = digits_source.torch_model.cuda()(torch.from_numpy(x).cuda()).cpu().numpy()
    digits_source.torch_model.cpu()
    logits = model(x)
    assert agreement(logits, reference) == 1.0
    assert np.abs(logits - reference).max() < 1e-3


def test_the_cuda_driver_plan_matches_torch_and_tvms_runtime(build_artifact, digits_source, digits_test, tmp_path):
    """The `cuda` preset with cuda_runtime = "driver": the launch plan through libcuda alone, from Python and from
    the native runner, against torch on the same GPU; its latency beside TVM's CUDA runtime on the same kernels is
    printed (a measurement, not an assert)."""
    import subprocess

    import torch

    from mixer_edge import bundle, runtime
    from mixer_edge.bench import artifact_candidate, interleaved
    from mixer_edge.compiler import compile_model, resolve_target

    from conftest import quiet

    preset = tmp_path / "cuda-driver.toml"
    preset.write_text(Path(resolve_target("cuda").source).read_text().replace("[build]\n",
                                                                              "[build]\ncuda_runtime = \"driver\"\n"))
    try:
        compile_model(digits_source, str(preset), tmp_path / "plan", progress=quiet)
        plan = runtime.load(tmp_path / "plan")
    except runtime.MixerEdgeError as exc:
        if "this GPU is" in str(exc):
            pytest.skip(f"this GPU is not one the cuda preset has code for: {exc}")
        raise
    x = digits_test[0]
    with torch.no_grad():
        reference = digits_source.torch_model.cuda()(torch.from_numpy(x).cuda()).cpu().numpy()
    digits_source.torch_model.cpu()
    logits = plan(x)
    assert agreement(logits, reference) == 1.0 and np.abs(logits - reference).max() < 1e-3
    packed = bundle.package(tmp_path / "plan", tmp_path / "bundle", progress=quiet)
    np.save(tmp_path / "x.npy", x)
    proc = subprocess.run([str(packed / "bin" / "mixer-edge-run"), str(packed / "artifact"), "--input",
                           str(tmp_path / "x.npy"), "--show", "0", "--save", str(tmp_path / "native.npy")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_allclose(np.load(tmp_path / "native.npy"), logits, rtol=0, atol=1e-6)
    tvm_runtime = runtime.load(build_artifact("cuda"))
    driver, tvm_time = interleaved([artifact_candidate("driver plan", plan, x), artifact_candidate("TVM runtime",
                                                                                                  tvm_runtime, x)])
    print(f"digits on the GPU, median ms: driver plan {driver.median_ms:.4f}, TVM's CUDA runtime "
          f"{tvm_time.median_ms:.4f} ({driver.median_ms / tvm_time.median_ms:.2f}x)")


def test_the_gpu_peers_agree_with_pytorch_and_cuda_int8_with_onnxruntime(digits_source, digits_test, tmp_path):
    """Issue 20 on a real GPU: the digits model's float16 and int8 CUDA artifacts benched at batch 1 beside the
    GPU peers (torch.compile max-autotune float16, TensorRT float16 and int8; those not installed are named and
    left out): every float16 candidate agrees with PyTorch float32 on top-1 (>= 99%), and the CUDA int8 artifact
    with onnxruntime running the same QDQ ONNX over the digits test split (>= 99%)."""
    from mixer_edge import bench, peers, runtime
    from mixer_edge.compiler import compile_model
    from mixer_edge.data import in_batches
    from mixer_edge.quant import quantize_for_build

    from conftest import quiet

    quantization = quantize_for_build(digits_source, progress=quiet)
    paths = [tmp_path / precision for precision in ("float16", "int8")]
    try:
        for path in paths:
            compile_model(digits_source, "cuda", path, precision=path.name,
                          quantized=quantization if path.name == "int8" else None, progress=quiet)
        int8 = runtime.load(paths[1])
    except runtime.MixerEdgeError as exc:
        if "this GPU is" in str(exc):
            pytest.skip(f"this GPU is not one the cuda preset has code for: {exc}")
        raise
    said = []
    rows = bench.compare(digits_source, paths, rounds=2, qdq=quantization.qdq, calibration=quantization,
                         peers=(peers.TORCH_MAX_AUTOTUNE, peers.TENSORRT), progress=said.append)
    print(bench.format_rows(rows))
    assert [(row.batch, row.precision) for row in rows] == [(1, "float16"), (1, "int8")]
    expected = {"float16": {peers.TORCH_MAX_AUTOTUNE: "torch", peers.TENSORRT: "tensorrt"},
                "int8": {peers.TENSORRT: "tensorrt"}}
    for row in rows:
        timed = {t.engine for t in row.timings}
        for engine, module in expected[row.precision].items():
            note = next((n for n in row.left_out if n.startswith(engine + " ")), None)
            assert (engine in timed) != bool(note), (engine, row.left_out)
            if module == "tensorrt" and peers.unavailable(module) is None:
                assert engine in timed, row.left_out  # installed: it must build and run here
        for t in row.timings:
            assert t.vs_torch_fp32 is not None and np.isfinite(t.latency.median_ms)
            if t.precision == "float16":
                assert t.vs_torch_fp32.top1_agreement >= 0.99, t
    x = digits_test[0]
    sess = bench.onnxruntime_session(quantization.qdq, 4)
    name = sess.get_inputs()[0].name
    reference = in_batches(lambda chunk: sess.run(None, {name: chunk})[0], x, 1)
    assert agreement(int8(x), reference) >= 0.99
