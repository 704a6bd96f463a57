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
