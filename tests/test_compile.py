"""Builds for every kind of target: host (run and compared here), ARM (ELF checked), CUDA (fat binary checked)."""

import locale
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from mixer_edge.compiler import build, compile_model, resolve_target
from mixer_edge.errors import MixerEdgeError
from mixer_edge.export import export_onnx, load_onnx
from mixer_edge.model import create_model, preset
from mixer_edge.runtime import library_arch, load, read_manifest

from conftest import leftovers, quiet

CUDA_PRESETS = {"cuda": {"sm_75", "sm_80", "sm_86", "sm_89", "sm_90"}, "jetson-orin": {"sm_87"},
                "jetson-xavier": {"sm_72"}, "a100": {"sm_80"}, "l4": {"sm_89"}, "h100": {"sm_90"}}


CUDA_TOOLS = Path(sys.prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages" / \
    "nvidia" / "cu13" / "bin"  # cuobjdump and nvdisasm, from the test extra's wheels


def cuobjdump(*args: str) -> str:
    """cuobjdump's output (the wheels' copy, else one on PATH); --dump-sass also needs nvdisasm."""
    tool = CUDA_TOOLS / "cuobjdump"
    found = str(tool) if tool.is_file() else shutil.which("cuobjdump")
    assert found, "install the test extra: pip install -e '.[test]'"
    env = {**os.environ, "PATH": f"{CUDA_TOOLS}:{os.environ['PATH']}"}
    return subprocess.run([found, *args], capture_output=True, text=True, check=True, env=env).stdout


def tensor_core_ops(fat_binary: bytes, tmp_path: Path) -> int:
    (tmp_path / "k.fatbin").write_bytes(fat_binary)
    return cuobjdump("--dump-sass", str(tmp_path / "k.fatbin")).count("HMMA")


def test_host_artifact_reproduces_torch(build_artifact, digits_test, torch_logits):
    model = load(build_artifact("host"))
    logits = model(digits_test[0])
    assert (logits.argmax(1) == torch_logits.argmax(1)).mean() == 1.0
    assert np.abs(logits - torch_logits).max() < 1e-4
    check = model.manifest["verification"]
    assert check["status"] == "verified" and check["samples"] == 360 and check["top1_agreement"] == 1.0


@pytest.mark.parametrize("target", ["rpi4", "rpi5"])
def test_arm_artifacts_are_aarch64_libraries(build_artifact, target):
    root = build_artifact(target)
    assert library_arch(root / "model.so") == "aarch64"
    needed = subprocess.run(["aarch64-linux-gnu-readelf", "-d", str(root / "model.so")], capture_output=True,
                            text=True).stdout
    libs = {line.split("[")[1].split("]")[0] for line in needed.splitlines() if "(NEEDED)" in line}
    assert libs <= {"libc.so.6", "libm.so.6", "libstdc++.so.6", "libgcc_s.so.1", "ld-linux-aarch64.so.1"}


@pytest.mark.parametrize("target", sorted(CUDA_PRESETS))
def test_cuda_artifacts_hold_a_fat_binary_for_the_preset(build_artifact, target):
    root = build_artifact(target)
    listing = cuobjdump("--list-elf", "--list-ptx", str(root / "kernels.fatbin"))
    cubins = {line.split(".")[-2] for line in listing.splitlines() if line.startswith("ELF file")}
    assert cubins == CUDA_PRESETS[target]
    assert ("PTX file" in listing) == (target == "cuda")  # the generic preset adds PTX for newer GPUs
    if target.startswith("jetson"):  # the driver route: a launch plan, no host code (tests/test_cuda_driver.py)
        assert not (root / "model.so").exists() and (root / "cuda_plan.json").is_file()
    else:
        assert library_arch(root / "model.so") == "x86_64"


@pytest.mark.parametrize("target, arch", [("jetson-orin", "sm_87"), ("jetson-xavier", "sm_72")])
def test_jetson_cubins_hold_the_model_kernels(build_artifact, target, arch):
    """Both Jetsons' kernels come from NVRTC 11.8 (the jetson extra): JetPack's drivers (CUDA 11.4, 12.6) refuse
    nvcc 13's cubins, and CUDA 13 dropped Xavier's sm_72."""
    root = build_artifact(target)
    elf = cuobjdump("--dump-elf", str(root / "kernels.fatbin"))
    kernels = {line.split(".text.")[1].strip() for line in elf.splitlines() if ".text." in line}
    assert f"arch = {arch}" in elf
    assert any("matmul" in k for k in kernels) and any("layer_norm" in k for k in kernels), kernels
    assert read_manifest(root)["cuda"]["compiler"] == "nvrtc 11.8"


def test_xavier_int8_kernels_use_dp4a(digits_source, tmp_path):
    manifest = compile_model(digits_source, "jetson-xavier", tmp_path / "x", precision="int8", progress=quiet)
    assert manifest["quantization"]["dot_product"] == "dp4a" and manifest["cuda"]["archs"] == ["sm_72"]
    elf = cuobjdump("--dump-elf", str(tmp_path / "x" / "kernels.fatbin"))
    assert "arch = sm_72" in elf and "int8_dense_dp4a" in elf
    # NVRTC 11 leaves its calling thread in the C locale (ASCII text files after it); the build undoes it
    global_locale = []  # what a fresh thread sees
    thread = threading.Thread(target=lambda: global_locale.append(locale.getpreferredencoding(False)))
    thread.start()
    thread.join()
    assert locale.getpreferredencoding(False) == global_locale[0]


@pytest.fixture(scope="module")
def s16_block(tmp_path_factory):
    """One Mixer-S/16 block (full-size shapes: 196 tokens x 512 channels) as ONNX."""
    path = tmp_path_factory.mktemp("s16") / "s16-1block.onnx"
    export_onnx(create_model(preset("mixer_s16", depth=1)).eval(), path)
    return load_onnx(path)


@pytest.mark.slow  # DLight's tensor-core rule imports tvm.s_tir.tensor_intrin: 1.5 to 4 minutes here
def test_float16_server_build_uses_tensor_cores(s16_block, tmp_path):
    fp16 = build(s16_block, resolve_target("h100"), precision="float16")
    fp32 = build(s16_block, resolve_target("h100"), precision="float32")
    assert tensor_core_ops(fp16.compiled.kernels.fat_binary, tmp_path) > 0  # HMMA: fp16 multiply, fp32 accumulate
    assert tensor_core_ops(fp32.compiled.kernels.fat_binary, tmp_path) == 0
    assert {str(a.dtype) for a in fp16.params.values()} == {"float16", "float32"}  # weights cast at build time
    assert {str(a.dtype) for a in fp32.params.values() if a.dtype.kind == "f"} == {"float32"}


def test_precision_and_batch_are_recorded(digits_source, tmp_path):
    manifest = compile_model(digits_source, "jetson-orin", tmp_path / "orin", precision="float16", progress=quiet)
    assert manifest["precision"]["compute"] == "float16" and manifest["precision"]["accumulation"] == "float32"
    assert manifest["input"]["shape"][0] == 1 and manifest["output"]["shape"] == [1, 10]
    assert resolve_target("h100").precision == "float16" and resolve_target("jetson-orin").precision == "float32"


def test_nvrtc_route_adds_ptx_when_the_preset_asks(digits_source, tmp_path):
    text = Path(resolve_target("jetson-xavier").source).read_text().replace("[build]\n", "[build]\ncuda_ptx = true\n")
    (tmp_path / "xavier-ptx.toml").write_text(text)
    compile_model(digits_source, str(tmp_path / "xavier-ptx.toml"), tmp_path / "x", progress=quiet)
    listing = cuobjdump("--list-elf", "--list-ptx", str(tmp_path / "x" / "kernels.fatbin"))
    assert "sm_72.cubin" in listing and "sm_72.ptx" in listing


def test_float16_is_refused_where_the_target_lacks_it(digits_source, tmp_path):
    with pytest.raises(MixerEdgeError, match="target rpi5 builds float32 or int8, not float16"):
        compile_model(digits_source, "rpi5", tmp_path / "x", precision="float16", progress=quiet)


def test_missing_cross_compiler_is_named(digits_source, tmp_path):
    preset = tmp_path / "board.toml"
    preset.write_text(Path(resolve_target("rpi4").source).read_text().replace("aarch64-linux-gnu-g++", "aarch64-nowhere-g++"))
    with pytest.raises(MixerEdgeError, match="cross compiler aarch64-nowhere-g\\+\\+, not on PATH"):
        compile_model(digits_source, str(preset), tmp_path / "out", progress=quiet)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_tar_artifact(digits_source, tmp_path, digits_test, torch_logits):
    manifest = compile_model(digits_source, "host", tmp_path / "digits.tar", progress=quiet)
    assert manifest["verification"]["top1_agreement"] == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits.tar"]
    assert np.abs(load(tmp_path / "digits.tar")(digits_test[0][:5]) - torch_logits[:5]).max() < 1e-4


def test_rebuild_replaces_the_artifact_whole(digits_source, tmp_path):
    out = tmp_path / "a"
    compile_model(digits_source, "host", out, verify=False, progress=quiet)
    (out / "stale.txt").write_text("from an older build")
    compile_model(digits_source, "host", out, verify=False, progress=quiet)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.so", "params.npz"]
    assert leftovers(tmp_path) == []
