"""Vulkan presets through TVM's WebGPU code generator and wgpu: real dispatches on Mesa's software device."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tvm
from tvm_ffi.registry import remove_global_func

from mixer_edge import runtime
from mixer_edge.compiler import compile_model, resolve_target
from mixer_edge.errors import MixerEdgeError

from conftest import agreement, quiet


@pytest.mark.parametrize("target", ["android-vulkan", "rpi5-vulkan"])
def test_vulkan_artifact_matches_torch_on_a_vulkan_device(build_artifact, digits_test, torch_logits, target):
    root = build_artifact(target)
    assert sorted(p.name for p in root.iterdir()) == ["manifest.json", "params.npz", "program.json"]  # no native code
    model = runtime.load(root)
    assert model.device["backend_type"] == "Vulkan"
    logits = model(digits_test[0])
    assert agreement(logits, torch_logits) == 1.0
    assert np.abs(logits - torch_logits).max() < 1e-4
    check = model.manifest["verification"]
    assert check["status"] == "verified" and check["top1_agreement"] == 1.0


def test_float16_vulkan_artifact_computes_in_f16_on_a_vulkan_device(digits_source, digits_test, torch_logits,
                                                                     tmp_path):
    manifest = compile_model(digits_source, "android-vulkan", tmp_path / "v", precision="float16", progress=quiet)
    assert manifest["precision"] == {"compute": "float16", "accumulation": "float32", "weights": ["float16", "float32"]}
    kernels = json.loads((tmp_path / "v" / "program.json").read_text())["kernels"]
    matmuls = [wgsl for name, wgsl in kernels.items() if "matmul" in name]
    assert matmuls and all(w.startswith("enable f16;") and "array<f16" in w for w in matmuls)
    model = runtime.load(tmp_path / "v")
    logits = model(digits_test[0])
    assert agreement(logits, torch_logits) == 1.0
    assert np.abs(logits - torch_logits).max() < 0.05  # fp16 products, fp32 sums: 5.4e-3 measured on lavapipe


def test_program_dispatches_and_kernels(build_artifact):
    root = build_artifact("android-vulkan")
    program = json.loads((root / "program.json").read_text())
    manifest = runtime.read_manifest(root)
    dispatches = [launch for step in program["steps"] if step["op"] == "call" for launch in step["launches"]]
    assert manifest["vulkan"]["dispatches"] == len(dispatches) > 0
    assert {launch["kernel"] for launch in dispatches} == set(program["kernels"])
    for launch in dispatches:  # every launch binds what its WGSL declares: storage buffers + one uniform
        wgsl = program["kernels"][launch["kernel"]]
        assert wgsl.count("var<storage") == len(launch["buffers"]) and wgsl.count("var<uniform>") == 1
        assert all(g >= 1 for g in launch["grid"])
    assert len(runtime.load(root).session.program.dispatches) == len(dispatches)


def test_no_vulkan_device_is_a_clear_error(build_artifact):
    env = {**os.environ, "VK_DRIVER_FILES": "/nonexistent.json", "VK_ICD_FILENAMES": "/nonexistent.json"}
    script = f"from mixer_edge import runtime; runtime.load({str(build_artifact('rpi5-vulkan'))!r})"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert proc.returncode != 0 and "no Vulkan device found by wgpu" in proc.stderr


def test_vulkan_preset_without_a_webgpu_route_needs_native_codegen(digits_source, tmp_path):
    text = open(resolve_target("rpi5-vulkan").source).read().split("\n# Without TVM's Vulkan")[0]
    (tmp_path / "native-only.toml").write_text(text)
    with pytest.raises(MixerEdgeError, match="Vulkan code generator"):
        compile_model(digits_source, str(tmp_path / "native-only.toml"), tmp_path / "v", progress=quiet)
    assert [p.name for p in tmp_path.iterdir()] == ["native-only.toml"]


def test_native_vulkan_codegen_is_preferred_when_tvm_has_it():
    preset = resolve_target("android-vulkan")
    assert preset.backend.name == "wgpu" and preset.device_requirements() == {"kind": "vulkan", "backend": "wgpu"}
    tvm.register_global_func("target.build.vulkan", lambda *args: None)  # stands in for a Vulkan-enabled TVM
    try:
        assert preset.backend.name == "tvm-vulkan"
        assert preset.device_requirements()["arch"] == "aarch64"
    finally:
        remove_global_func("target.build.vulkan")
    assert preset.backend.name == "wgpu"
