"""The device-side loader: needs no torch/onnx, and refuses tampered or foreign artifacts before loading them."""

import json
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


def edit_manifest(root, change):
    manifest = json.loads((root / "manifest.json").read_text())
    change(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_tampered_params_are_refused(copy_artifact):
    root = copy_artifact("host")
    with np.load(root / "params.npz") as npz:
        params = {k: npz[k] for k in npz.files}
    first = next(iter(params))
    params[first] = params[first] + 1e-3
    np.savez(root / "params.npz", **params)
    with pytest.raises(MixerEdgeError, match="params.npz does not match its sha256"):
        runtime.load(root)


def test_swapped_library_is_refused(copy_artifact):
    root = copy_artifact("host")
    (root / "model.so").write_bytes((copy_artifact("rpi5") / "model.so").read_bytes())
    with pytest.raises(MixerEdgeError, match="model.so does not match its sha256"):
        runtime.load(root)


def test_manifest_edited_to_hide_the_library_arch(copy_artifact):
    root = copy_artifact("rpi5")
    edit_manifest(root, lambda m: m["target"]["device"].update(arch="x86_64", cpu_features=[]))
    with pytest.raises(MixerEdgeError, match="built for aarch64 but the manifest says x86_64"):
        runtime.load(root)


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(format_version=99), "format version 99"),
    (lambda m: m.pop("files"), "lists no files"),
    (lambda m: m["files"].update({"../etc/passwd": "0" * 64}), "missing ../etc/passwd"),
])
def test_bad_manifests_are_refused(copy_artifact, change, message):
    root = copy_artifact("host")
    edit_manifest(root, change)
    with pytest.raises(MixerEdgeError, match=message):
        runtime.load(root)


def test_missing_and_corrupt_artifacts(copy_artifact, tmp_path):
    with pytest.raises(MixerEdgeError, match="does not exist"):
        runtime.load(tmp_path / "nothing")
    with pytest.raises(MixerEdgeError, match="not a mixer-edge artifact"):
        runtime.load(tmp_path)
    root = copy_artifact("host")
    (root / "manifest.json").write_text("{not json")
    with pytest.raises(MixerEdgeError, match="not valid JSON"):
        runtime.load(root)


def test_arm_artifact_is_refused_on_x86_before_loading(build_artifact):
    if runtime.platform.machine() != "x86_64":
        pytest.skip("needs an x86_64 device: this check is an x86_64 machine refusing an aarch64 artifact")
    with pytest.raises(MixerEdgeError, match="built for aarch64 \\(target rpi5\\) but this machine is x86_64"):
        runtime.load(build_artifact("rpi5"))


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
