"""The `cuda` backend: model.so for TVM's CUDA runtime, its kernels compiled ahead of time into kernels.fatbin
(compiler/cuda.py), which the runtime hands to TVM when it asks to compile the library's CUDA source."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import MixerEdgeError, reason
from ..formats import safe_text
from .native import Library, TvmLibrary, TvmSession


class CudaLibrary(TvmLibrary):
    name = kind = tvm_kind = "cuda"
    device_type = "cuda"
    files = ("model.so", "kernels.fatbin")
    device_fields = ("arch", "cpu_features", "cuda_archs", "cuda_ptx")
    section = "cuda"
    int8_dot_product = "dp4a"
    baseline_device = "cuda"

    def serves(self, preset) -> bool:
        return preset.cuda_runtime == "tvm"

    def validate(self, preset) -> None:
        from ..runtime import CUDA_ARCH

        arch = preset.target.get("arch")
        if not preset.cuda_archs and not (isinstance(arch, str) and re.fullmatch(CUDA_ARCH, arch)):
            raise MixerEdgeError(f"{preset.source}: CUDA arch '{safe_text(str(arch), 40)}' should look like sm_87: "
                                 "set [target] arch or [build] cuda_archs")

    def check_toolchain(self, preset) -> None:
        from ..compiler.cuda import check_compilers

        check_compilers(preset)

    def compile(self, mod, params: dict, preset, key, tuning, model: str, progress, passes: int = 1):
        from ..compiler.build import module_source
        from ..compiler.cuda import compile_kernels

        library, params, record = super().compile(mod, params, preset, key, tuning, model, progress, passes)
        library.kernels = compile_kernels(module_source(library.executable, "cuda"), preset)
        return library, params, record

    def write(self, compiled: Library, stage: Path, preset, progress) -> dict:
        from ..runtime import CUDA_KERNELS

        super().write(compiled, stage, preset, progress)
        (stage / CUDA_KERNELS).write_bytes(compiled.kernels.fat_binary)
        return {"cuda": {"file": CUDA_KERNELS, "format": "fatbin", "source_sha256": compiled.kernels.source_sha256,
                         "archs": list(preset.cuda_archs), "ptx": preset.cuda_ptx,
                         "compiler": compiled.kernels.compiler}}

    def device_requirements(self, preset) -> dict:
        return {**super().device_requirements(preset), "cuda_archs": list(preset.cuda_archs),
                "cuda_ptx": preset.cuda_ptx}

    def check_requirements(self, device, refuse) -> None:
        if not device.cuda_archs and not device.cuda_ptx:
            refuse("cuda_archs", "is empty and cuda_ptx is false: the artifact would run on no GPU", device.cuda_archs)

    def check_device(self, manifest, root: Path) -> None:
        import tvm

        super().check_device(manifest, root)
        req, preset = manifest.target.device, manifest.target.preset
        _load_cuda_runtime(preset)
        dev = tvm.cuda(0)
        if not dev.exist:
            raise MixerEdgeError(f"artifact target {preset} needs an NVIDIA GPU and CUDA driver; none is present here")
        sm = "sm_" + dev.compute_version.replace(".", "")
        if sm not in req.cuda_archs and not req.cuda_ptx:
            raise MixerEdgeError(f"artifact holds code for {', '.join(req.cuda_archs)} but this GPU is {sm}: "
                                 "rebuild for this GPU's preset")

    def load(self, root: Path, manifest, weights: list[np.ndarray]) -> TvmSession:
        from ..runtime import CUDA_KERNELS

        mismatch = []
        _serve_cuda_kernels(root / CUDA_KERNELS, manifest.cuda.source_sha256, mismatch)
        try:
            return super().load(root, manifest, weights)
        except Exception as exc:
            if mismatch:  # raised inside TVM's callback, which wraps it: say it plainly
                raise MixerEdgeError(mismatch[0]) from exc
            raise

    def describe(self, manifest) -> str:
        return f"{super().describe(manifest)}; CUDA {', '.join(manifest.cuda.archs)}"


def _load_cuda_runtime(preset: str) -> None:
    """Load TVM's CUDA runtime library: `import tvm` skips it in runtime-only installs (TVM_USE_RUNTIME_LIB=1)."""
    from tvm.base import _LOADED_LIBS
    from tvm_ffi.libinfo import load_lib_ctypes

    if "tvm_runtime_cuda" in _LOADED_LIBS:
        return
    runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    try:
        _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(package="tvm", target_name="tvm_runtime_cuda",
                                                           extra_lib_paths=[runtime_dir], mode="RTLD_LOCAL")
    except (OSError, RuntimeError) as exc:
        raise MixerEdgeError(f"artifact target {preset} needs an NVIDIA GPU and its CUDA driver, but TVM's CUDA "
                             f"runtime could not be loaded here ({reason(exc, last=True)})") from exc


def _serve_cuda_kernels(fat_binary: Path, source_sha256: str, mismatch: list) -> None:
    """Answer TVM's request to compile the library's CUDA source with the fat binary built for it."""
    import tvm

    from ..runtime import sha256_text

    binary = fat_binary.read_bytes()

    def precompiled(code, *_):
        if sha256_text(str(code)) != source_sha256:
            mismatch.append(f"{fat_binary} was not built from this library's CUDA source: rebuild the artifact")
            raise MixerEdgeError(mismatch[0])
        return binary

    tvm.register_global_func("tvm_callback_cuda_compile", precompiled, override=True)
