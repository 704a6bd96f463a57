"""The `cuda-driver` backend: CUDA kernels in kernels.fatbin and the host side as a launch plan (cuda_plan.json,
compiler/cuda.py's `plan`), run through the CUDA driver API alone (mixer_edge/cuda_driver.py; the native runtime's
src/cuda_engine.cc). The device needs only its driver, libcuda.so.1, which every JetPack ships: no CUDA runtime,
no NVRTC, no TVM. The presets that set [build] cuda_runtime = "driver" (the Jetsons) build it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import MixerEdgeError
from . import Backend, Session
from .cuda import CudaLibrary

PLAN = "cuda_plan.json"


class CudaDriverSession(Session):
    """A plan set up on the GPU: weights uploaded once, intermediates allocated once, one stream."""

    def __init__(self, program, kernels: list[str]):
        self.program, self.kernels = program, kernels
        self.device = program.device_name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.program(x).reshape(self.program.output_shape)

    def timer(self, x: np.ndarray):
        """A whole synchronised call: the input's copy, every launch and the logits' copy back."""
        return lambda: self.program(x)

    def kernel_times(self, x: np.ndarray, repeat: int = 10) -> list[tuple[str, float]]:
        return self.program.kernel_times(x, repeat)

    def kernel_outputs(self, x: np.ndarray) -> list[tuple[str, np.ndarray]]:
        return self.program.kernel_outputs(x)


class CudaDriver(Backend):
    name = "cuda-driver"
    kind = tvm_kind = "cuda"
    device_backend = "cuda-driver"
    files = (PLAN, "kernels.fatbin")
    device_fields = ("arch", "cuda_archs", "cuda_ptx")  # arch: the board's CPU, for its bundle
    section = "cuda"
    int8_dot_product = "dp4a"
    baseline_device = "cuda"
    pipeline = "tvm default, host side as a launch plan (CUDA driver API)"

    def serves(self, preset) -> bool:
        return preset.cuda_runtime == "driver"

    def validate(self, preset) -> None:
        CudaLibrary.validate(self, preset)

    def check_toolchain(self, preset) -> None:
        CudaLibrary.check_toolchain(self, preset)

    def check_tunable(self, preset) -> None:
        raise MixerEdgeError(f"target {preset.name} runs its kernels through the CUDA driver with TVM's default GPU "
                             "schedules; MetaSchedule CUDA tuning needs a GPU to measure on (tune a cuda_runtime = "
                             "\"tvm\" preset there)")

    def compile(self, mod, params: dict, preset, key, tuning, model: str, progress, passes: int = 1):
        from ..compiler.cuda import plan

        if tuning.wanted:
            self.check_tunable(preset)
        return plan(mod, preset), params, None

    def write(self, compiled, stage: Path, preset, progress) -> dict:
        from ..formats import json_text
        from ..runtime import CUDA_KERNELS

        document, kernels = compiled
        progress(f"writing {PLAN} ({sum(len(s['launches']) for s in document['steps'] if s['op'] == 'call')} "
                 f"launches) and {CUDA_KERNELS}")
        (stage / PLAN).write_text(json_text(document, indent=None, name=PLAN))
        (stage / CUDA_KERNELS).write_bytes(kernels.fat_binary)
        return {"cuda": {"file": CUDA_KERNELS, "format": "fatbin", "source_sha256": kernels.source_sha256,
                         "archs": list(preset.cuda_archs), "ptx": preset.cuda_ptx, "compiler": kernels.compiler}}

    def device_requirements(self, preset) -> dict:
        return {"kind": self.kind, "backend": self.device_backend, "arch": preset.arch,
                "cuda_archs": list(preset.cuda_archs), "cuda_ptx": preset.cuda_ptx}

    def check_requirements(self, device, refuse) -> None:
        CudaLibrary.check_requirements(self, device, refuse)

    def check_device(self, manifest, root: Path) -> None:
        from ..cuda_driver import check_gpu, read_plan

        device = manifest.target.device
        check_gpu(read_plan(root / PLAN), device.cuda_archs, device.cuda_ptx, manifest.target.preset)

    def load(self, root: Path, manifest, weights: list[np.ndarray]) -> CudaDriverSession:
        from ..cuda_driver import CudaProgram, read_plan
        from ..runtime import CUDA_KERNELS

        plan = read_plan(root / PLAN)
        program = CudaProgram(plan, weights, tuple(manifest.input.shape), tuple(manifest.output.shape),
                              (root / CUDA_KERNELS).read_bytes(), str(root / PLAN), preset=manifest.target.preset)
        kernels = [launch.kernel for step in plan.steps if step.op == "call" for launch in step.launches]
        return CudaDriverSession(program, kernels)

    def describe(self, manifest) -> str:
        device = manifest.target.device
        return (f"an NVIDIA GPU with its driver alone (libcuda.so.1), CUDA {', '.join(device.cuda_archs)}"
                + (" + PTX" if device.cuda_ptx else ""))
