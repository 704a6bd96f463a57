"""Run a WebGPU-path artifact on any Vulkan GPU through wgpu-native (PyPI `wgpu`).

The program (see `compiler/webgpu.py`) is replayed once at load into GPU objects: weights are
uploaded once, every intermediate tensor gets its GPU buffer, every kernel launch its pipeline and
bind group. An inference then writes the input, records all dispatches into one compute pass, and
reads back only the logits: nothing else crosses between host and GPU. Needs numpy and wgpu, not TVM.
"""

from __future__ import annotations

import re
import struct

import numpy as np

from .errors import MixerEdgeError

_STORAGE_KIND = {"read": "read-only-storage", "read_write": "storage"}


def _aligned(nbytes: int) -> int:
    return max(4, (nbytes + 3) // 4 * 4)


_PREFERENCE = {"DiscreteGPU": 0, "IntegratedGPU": 1, "VirtualGPU": 2, "CPU": 3}


def adapter():
    """The best Vulkan device wgpu sees (a real GPU before a software one), or a clear error."""
    try:
        import wgpu
    except ImportError as exc:
        raise MixerEdgeError("Vulkan artifacts need the wgpu package: pip install wgpu") from exc
    adapters = wgpu.gpu.enumerate_adapters_sync()
    vulkan = [a for a in adapters if a.info["backend_type"] == "Vulkan"]
    if not vulkan:
        others = ", ".join(f"{a.info['backend_type']} {a.info['device']}" for a in adapters) or "none"
        raise MixerEdgeError(f"no Vulkan device found by wgpu (it sees: {others}): install the GPU's Vulkan driver "
                             "(a software device: apt-get install mesa-vulkan-drivers libvulkan1)")
    return min(vulkan, key=lambda a: _PREFERENCE.get(a.info["adapter_type"], len(_PREFERENCE)))


def _bind_group_layout(device, wgsl: str):
    """The layout the kernel's WGSL declares: storage buffers (read or read_write), then one uniform."""
    import wgpu

    entries = []
    for binding, space, access in re.findall(r"@binding\((\d+)\)\s*var<(\w+)(?:,\s*(\w+))?>", wgsl):
        kind = "uniform" if space == "uniform" else _STORAGE_KIND[access]
        entries.append({"binding": int(binding), "visibility": wgpu.ShaderStage.COMPUTE, "buffer": {"type": kind}})
    return device.create_bind_group_layout(entries=entries)


def _features(program: dict, gpu) -> list[str]:
    """The device features the kernels need: shader-f16 for float16 builds (WGSL `enable f16;`)."""
    if not any(re.search(r"^\s*enable f16;", wgsl, re.M) for wgsl in program["kernels"].values()):
        return []
    if "shader-f16" not in gpu.features:
        raise MixerEdgeError(f"this artifact computes in float16, which the Vulkan device {gpu.info['device']} "
                             "cannot (no shader-f16): rebuild it with --precision float32")
    return ["shader-f16"]


class WgpuProgram:
    def __init__(self, program: dict, weights: list[np.ndarray], input_shape: tuple):
        import wgpu

        gpu = adapter()
        self.adapter_info = dict(gpu.info)
        limits = gpu.limits
        self.device = gpu.request_device_sync(required_features=_features(program, gpu), required_limits={
            "max-storage-buffers-per-shader-stage": limits["max-storage-buffers-per-shader-stage"]})
        device = self.device
        storage = wgpu.BufferUsage.STORAGE
        nbytes = int(np.prod(input_shape)) * 4
        self.input = device.create_buffer(size=_aligned(nbytes), usage=storage | wgpu.BufferUsage.COPY_DST)
        values = {0: (self.input, 0, nbytes, "float32")}  # id -> (buffer, offset, bytes, dtype)
        for i, weight in enumerate(weights, start=1):
            data = np.ascontiguousarray(weight).tobytes()
            data += b"\0" * (_aligned(len(data)) - len(data))
            values[i] = (device.create_buffer_with_data(data=data, usage=storage), 0, weight.nbytes, str(weight.dtype))
        kernels = {}
        for name, wgsl in program["kernels"].items():
            layout = _bind_group_layout(device, wgsl)
            pipeline = device.create_compute_pipeline(
                layout=device.create_pipeline_layout(bind_group_layouts=[layout]),
                compute={"module": device.create_shader_module(code=wgsl), "entry_point": name})
            kernels[name] = (pipeline, layout)
        self.dispatches = []
        for step in program["steps"]:
            if step["op"] == "storage":
                buffer = device.create_buffer(size=_aligned(step["bytes"]), usage=storage | wgpu.BufferUsage.COPY_SRC)
                values[step["out"]] = (buffer, 0, step["bytes"], "uint8")
            elif step["op"] == "view":
                buffer, offset, _, dtype = values[step["src"]]
                dtype = step.get("dtype", dtype)
                size = int(np.prod(step["shape"])) * np.dtype(dtype).itemsize
                values[step["out"]] = (buffer, offset + step["offset"], size, dtype)
            else:
                for launch in step["launches"]:
                    self.dispatches.append(self._dispatch(kernels[launch["kernel"]], launch,
                                                          [values[step["args"][i]] for i in launch["buffers"]]))
        self.output = values[program["output"]]

    def _dispatch(self, kernel, launch: dict, buffers: list) -> tuple:
        import wgpu

        pipeline, layout = kernel
        grid = launch["grid"]
        if max(grid) > 65535:
            raise MixerEdgeError(f"kernel {launch['kernel']} launches {max(grid)} workgroups in one dimension; "
                                 "WebGPU allows 65535: build with a smaller batch")
        # The kernel's scalar arguments, then packGridDimX: it returns early past blockIdx.x == grid x - 1.
        pods = [struct.pack("<i" if kind == "i32" else "<f", value) for kind, value in launch["scalars"]]
        pod = b"".join(pods) + struct.pack("<I", grid[0] - 1)
        pod += b"\0" * (-len(pod) % 16)
        uniform = self.device.create_buffer_with_data(data=pod, usage=wgpu.BufferUsage.UNIFORM)
        entries = [{"binding": i, "resource": {"buffer": buffer, "offset": offset, "size": _aligned(size)}}
                   for i, (buffer, offset, size, _) in enumerate(buffers)]
        entries.append({"binding": len(buffers), "resource": {"buffer": uniform, "offset": 0, "size": len(pod)}})
        return pipeline, self.device.create_bind_group(layout=layout, entries=entries), tuple(grid)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        queue = self.device.queue
        queue.write_buffer(self.input, 0, np.ascontiguousarray(x, np.float32).tobytes())
        encoder = self.device.create_command_encoder()
        compute = encoder.begin_compute_pass()
        for pipeline, bind_group, grid in self.dispatches:
            compute.set_pipeline(pipeline)
            compute.set_bind_group(0, bind_group)
            compute.dispatch_workgroups(*grid)
        compute.end()
        queue.submit([encoder.finish()])
        buffer, offset, size, dtype = self.output
        return np.frombuffer(queue.read_buffer(buffer, offset, size), dtype=dtype).copy()
