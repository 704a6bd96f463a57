"""Jetson artifacts through the CUDA driver API alone: the launch plan against the fat binary, the Python and the
native runner refusing cleanly where there is no driver, and a Jetson bundle that needs nothing of CUDA but
libcuda.so.1. The runs on a GPU are in test_gpu.py."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from mixer_edge import bundle, runtime
from mixer_edge.compiler import compile_model
from mixer_edge.errors import MixerEdgeError
from mixer_edge.resources import data_dir

from conftest import quiet
from test_compile import cuobjdump, tensor_core_ops

CROSS_ROOT = Path("/usr/aarch64-linux-gnu")  # the cross toolchain's libc and libstdc++: no CUDA, no Python


def launches(plan: dict) -> list[dict]:
    return [launch for step in plan["steps"] if step["op"] == "call" for launch in step["launches"]]


def fat_binary_kernels(fatbin: Path) -> dict[str, dict[str, int]]:
    """Each architecture's cubin in a fat binary -> its kernels -> how many parameters each takes, as cuobjdump
    reads them from the cubin's EIATTR_KPARAM_INFO records."""
    elf = cuobjdump("--dump-elf", str(fatbin))
    found, arch, section = {}, None, None
    for line in elf.splitlines():
        if m := re.search(r"arch = (sm_\w+)", line):
            arch = m[1]
            found.setdefault(arch, {})
        elif m := re.match(r"\s*\.nv\.info\.(\w+)", line):
            section = m[1]
            found[arch].setdefault(section, 0)
        elif "EIATTR_KPARAM_INFO" in line and section:
            found[arch][section] += 1
        elif line.strip().startswith(".") and not line.strip().startswith(".nv.info"):
            section = None
    return found


@pytest.mark.parametrize("target, arch", [("jetson-orin", "sm_87"), ("jetson-xavier", "sm_72")])
def test_jetson_artifacts_are_a_plan_and_a_fat_binary(build_artifact, target, arch):
    root = build_artifact(target)
    manifest = runtime.read_manifest(root)
    assert manifest["target"]["device"] == {"kind": "cuda", "backend": "cuda-driver", "arch": "aarch64",
                                            "cuda_archs": [arch], "cuda_ptx": False}
    assert set(manifest["files"]) == {"params.npz", "cuda_plan.json", "kernels.fatbin"}  # no model.so: no host code
    plan = json.loads((root / "cuda_plan.json").read_text())
    kernels = fat_binary_kernels(root / "kernels.fatbin")
    assert set(kernels) == {arch}
    for launch in launches(plan):  # every kernel the plan launches is in the cubin, taking the plan's parameters
        assert kernels[arch].get(launch["kernel"]) == len(launch["params"]), launch["kernel"]
        assert all(1 <= n for n in launch["grid"] + launch["block"])
    # NVRTC 11.8's cubins, which JetPack 5's CUDA 11.4 driver and JetPack 6's 12.6 both load
    assert plan["driver_version_min"] == 11000


def test_a_board_with_a_cuda_13_driver_gets_nvccs_cubins(digits_source, tmp_path):
    """cuda_driver_major picks the compiler: the Orin preset with a CUDA 13 driver builds with nvcc 13, whose cubins
    need that driver, and the plan says so."""
    preset = tmp_path / "orin-cuda13.toml"
    preset.write_text((data_dir("targets") / "jetson-orin.toml").read_text().replace("cuda_driver_major = 12",
                                                                                      "cuda_driver_major = 13"))
    manifest = compile_model(digits_source, str(preset), tmp_path / "out", progress=quiet)
    assert manifest["cuda"]["compiler"].startswith("nvcc 13.")
    assert json.loads((tmp_path / "out" / "cuda_plan.json").read_text())["driver_version_min"] == 13000
    assert set(fat_binary_kernels(tmp_path / "out" / "kernels.fatbin")) == {"sm_87"}


def test_the_python_runtime_refuses_a_jetson_artifact_without_a_driver(build_artifact):
    if Path("/dev/nvidia0").exists():
        pytest.skip("this machine has an NVIDIA GPU (test_gpu.py runs the artifact)")
    with pytest.raises(MixerEdgeError, match=r"needs an NVIDIA GPU and its driver \(libcuda\.so\.1\), and this machine "
                                             r"has none .*: run it on the device"):
        runtime.load(build_artifact("jetson-orin"))


@pytest.mark.slow  # cross-compiles the aarch64 runtime: CI's pytest -m slow
@pytest.mark.emulation
def test_the_jetson_bundle_needs_only_the_boards_driver(build_artifact, tmp_path):
    """Every ELF file of a Jetson bundle loads nothing of CUDA (libcuda.so.1 is opened at run time), and its runner,
    on the emulated Cortex-A78AE with no driver, refuses in one line."""
    packed = bundle.package(build_artifact("jetson-orin"), tmp_path / "bundle", progress=quiet)
    record = bundle.read_bundle(packed)
    assert (record.arch, record.backend) == ("aarch64", "cuda-driver")
    for elf in [packed / "bin" / "mixer-edge-run", *(packed / "lib").iterdir()]:
        out = subprocess.run(["readelf", "-d", str(elf)], capture_output=True, text=True, check=True).stdout
        needed = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)
        assert not [n for n in needed if re.match(r"lib(cuda|cudart|nvrtc|tvm)", n)], (elf.name, needed)
    assert {p.name for p in (packed / "lib").iterdir()} == {"libmixer_edge.so"}
    proc = subprocess.run(["qemu-aarch64-static", "-cpu", "cortex-a76", "-L", str(CROSS_ROOT),
                           str(packed / "bin" / "mixer-edge-run"), str(packed / "artifact")],
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "needs an NVIDIA GPU and its driver (libcuda.so.1), and this machine has none" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("target, arch", [("jetson-orin", "sm_87"), ("jetson-xavier", "sm_72")])
def test_the_s16_plan_matches_its_fat_binary(tmp_path, target, arch):
    """Mixer-S/16 for a Jetson in float16: a plan of tens of launches, each against its NVRTC 11.8 cubin, whose
    matmuls use the tensor cores (mma.h; the SASS checked on Orin: CUDA 13's disassembler reads no sm_72)."""
    from mixer_edge.export import open_model

    compile_model(open_model("mixer_s16", progress=quiet), target, tmp_path / "s16", precision="float16",
                  progress=quiet)
    plan = json.loads((tmp_path / "s16" / "cuda_plan.json").read_text())
    kernels = fat_binary_kernels(tmp_path / "s16" / "kernels.fatbin")[arch]
    assert len(launches(plan)) > 40
    for launch in launches(plan):
        assert kernels.get(launch["kernel"]) == len(launch["params"]), launch["kernel"]
    if arch != "sm_72":
        assert tensor_core_ops((tmp_path / "s16" / "kernels.fatbin").read_bytes(), tmp_path) > 0
