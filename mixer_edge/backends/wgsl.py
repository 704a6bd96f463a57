"""The `wgpu` backend: WGSL kernels from TVM's WebGPU code generator and the launch plan of `main`
(program.json, compiler/webgpu.py), replayed on any Vulkan GPU by wgpu (mixer_edge/vulkan.py). No native
code: the artifact runs on any CPU architecture. Used by Vulkan presets with a [build.webgpu] table when
the installed TVM has no Vulkan code generator."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..errors import MixerEdgeError
from . import Backend, Session


class WgpuSession(Session):
    """A program set up on the Vulkan device: weights uploaded once, one compute pass per inference."""

    def __init__(self, program, weights: list[np.ndarray], input_shape: tuple, output_shape: tuple, source: str):
        from ..vulkan import WgpuProgram

        self.kernels = [launch.kernel for step in program.steps if step.op == "call" for launch in step.launches]
        self.program = WgpuProgram(program, weights, input_shape, output_shape, source)
        self.device = self.program.adapter_info
        self.output_shape = output_shape

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.program(x).reshape(self.output_shape)

    def timer(self, x: np.ndarray):
        """A whole call: the input's upload, every dispatch and the logits' read-back."""
        return lambda: self.program(x)

    def kernel_times(self, x: np.ndarray, repeat: int = 10) -> list[tuple[str, float]]:
        """Each dispatch in a compute pass of its own, waited for on its own (by reading the logits back, a
        few bytes); the median of `repeat`."""
        self.program(x)  # the input in place, the pipelines warm
        device, (output, offset, size, _) = self.program.device, self.program.output
        times = np.empty((repeat, len(self.kernels)))
        for r in range(repeat):
            for i, dispatch in enumerate(self.program.dispatches):
                commands = self.program.commands([dispatch])
                start = time.perf_counter()
                device.queue.submit([commands])
                device.queue.read_buffer(output, offset, size)
                times[r, i] = time.perf_counter() - start
        return [(name, 1e3 * float(t)) for name, t in zip(self.kernels, np.median(times, axis=0))]

    def kernel_outputs(self, x: np.ndarray) -> list[tuple[str, np.ndarray]]:
        """What each dispatch wrote (its read_write bindings), read back right after it ran in a pass of its own."""
        self.program(x)  # the input in place
        device, outputs = self.program.device, []
        for name, dispatch, written in zip(self.kernels, self.program.dispatches, self.program.written):
            device.queue.submit([self.program.commands([dispatch])])
            for buffer, offset, size, dtype in written:
                data = device.queue.read_buffer(buffer, offset, -(-size // 4) * 4)[:size]
                outputs.append((name, np.frombuffer(data, dtype=dtype).copy()))
        return outputs


class Wgsl(Backend):
    name = device_backend = "wgpu"
    kind = tvm_kind = "vulkan"
    files = ("program.json",)
    section = "vulkan"
    pipeline = "tvm default, WGSL (webgpu codegen) for wgpu"

    def serves(self, preset) -> bool:
        return preset.webgpu_target is not None

    def check_tunable(self, preset) -> None:
        raise MixerEdgeError(f"target {preset.name} builds WGSL with DLight's schedules, which MetaSchedule does "
                             "not tune: drop --tune/--tuning-db")

    def compile(self, mod, params: dict, preset, key, tuning, model: str, progress, passes: int = 1):
        import tvm

        from ..compiler import webgpu

        if tuning.wanted:
            self.check_tunable(preset)
        target = tvm.target.Target({**preset.webgpu_target, "host": {"kind": "llvm"}})
        return webgpu.program(mod, target), params, None

    def write(self, compiled: dict, stage: Path, preset, progress) -> dict:
        from ..compiler.webgpu import dispatch_count
        from ..formats import json_text
        from ..runtime import PROGRAM

        section = {"backend": "wgpu", "dispatches": dispatch_count(compiled), "kernels": len(compiled["kernels"])}
        progress(f"writing {PROGRAM}: {section['dispatches']} dispatches of {section['kernels']} WGSL kernels")
        (stage / PROGRAM).write_text(json_text(compiled, indent=None, name=PROGRAM))
        return {"vulkan": section}

    def device_requirements(self, preset) -> dict:
        return {"kind": "vulkan", "backend": "wgpu"}  # no native code at all: any CPU, any Vulkan GPU

    def check_device(self, manifest, root: Path) -> None:
        """A Vulkan device, through wgpu (any CPU runs the host side: there is no native code)."""
        from ..vulkan import adapter

        adapter()

    def load(self, root: Path, manifest, weights: list[np.ndarray]) -> WgpuSession:
        from ..runtime import PROGRAM
        from ..vulkan import read_program

        return WgpuSession(read_program(root / PROGRAM), weights, tuple(manifest.input.shape),
                           tuple(manifest.output.shape), str(root / PROGRAM))

    def describe(self, manifest) -> str:
        return (f"any Vulkan GPU through wgpu, any CPU: {manifest.vulkan.dispatches} dispatches of "
                f"{manifest.vulkan.kernels} WGSL kernels per inference")
