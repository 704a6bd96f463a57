"""The `tvm-vulkan` backend: model.so with SPIR-V kernels from TVM's own Vulkan code generator, run by TVM's
Vulkan runtime. The PyPI wheel has neither; a Vulkan preset gets this backend when the installed TVM can
build it, or when the preset has no [build.webgpu] table (then the build is refused naming the fix)."""

from __future__ import annotations

from pathlib import Path

from ..errors import MixerEdgeError
from .native import TvmLibrary


def has_vulkan_codegen() -> bool:
    import tvm

    return tvm.get_global_func("target.build.vulkan", allow_missing=True) is not None


class TvmVulkan(TvmLibrary):
    name = "tvm-vulkan"
    kind = tvm_kind = "vulkan"
    device_type = "vulkan"

    def serves(self, preset) -> bool:
        return preset.webgpu_target is None or has_vulkan_codegen()

    def check_toolchain(self, preset) -> None:
        if not has_vulkan_codegen():
            raise MixerEdgeError(f"target {preset.name} needs TVM's Vulkan code generator, which this TVM build lacks "
                                 "(the PyPI wheel has none): build TVM with USE_VULKAN=ON, or add a [build.webgpu] "
                                 "table to the preset to run WGSL through wgpu")

    def check_device(self, manifest, root: Path) -> None:
        import tvm

        super().check_device(manifest, root)
        if not tvm.vulkan(0).exist:
            raise MixerEdgeError(f"artifact target {manifest.target.preset} needs a Vulkan GPU and a TVM runtime "
                                 "built with Vulkan")
