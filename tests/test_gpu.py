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
