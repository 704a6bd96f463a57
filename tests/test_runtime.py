"""The device-side loader: needs no torch/onnx, and refuses tampered or foreign artifacts before loading them."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mixer_edge import runtime
from mixer_edge.errors import MixerEdgeError

BLOCK_TORCH_AND_ONNX = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "onnx", "onnxruntime", "onnxsim", "sklearn"):
            raise ImportError(f"{name} is not on the device")
sys.meta_path.insert(0, Block())
"""


def test_runtime_needs_neither_torch_nor_onnx(build_artifact, digits_test, torch_logits, tmp_path):
    np.save(tmp_path / "x.npy", digits_test[0][:16])
    script = BLOCK_TORCH_AND_ONNX + textwrap.dedent(f"""
        import numpy as np
        from mixer_edge import runtime
        logits = runtime.load({str(build_artifact("host"))!r})(np.load({str(tmp_path / "x.npy")!r}))
        np.save({str(tmp_path / "out.npy")!r}, logits)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnx", "onnxruntime", "sklearn"))
        assert not loaded, loaded
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert np.abs(np.load(tmp_path / "out.npy") - torch_logits[:16]).max() < 1e-4


def test_cuda_artifact_without_a_gpu_fails_clearly(build_artifact):
    if runtime.Path("/dev/nvidia0").exists():
        pytest.skip("this machine has an NVIDIA GPU: tests/test_gpu.py runs the artifact instead")
    with pytest.raises(MixerEdgeError, match="needs an NVIDIA GPU"):
        runtime.load(build_artifact("cuda"))


def test_input_shape_is_checked(build_artifact):
    model = runtime.load(build_artifact("host"))
    with pytest.raises(MixerEdgeError, match="does not match the artifact's"):
        model(np.zeros((1, 3, 8, 8), np.float32))


def test_tvm_threads_default_to_every_core():
    """TVM alone would take half the CPUs on x86 (it assumes SMT): one thread on a 2-core machine."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    code = ("from mixer_edge import runtime; import tvm; "
            "print(runtime.physical_cores(), tvm.get_global_func('runtime.NumThreads')())")
    cores, tvm_threads = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                        check=True).stdout.split()
    assert cores == tvm_threads
