"""Run a WebGPU-path artifact on any Vulkan GPU through wgpu-native (PyPI `wgpu`).

The program (see `compiler/webgpu.py`) is replayed once at load into GPU objects: the weights it
uses and its constants are uploaded once (integers and bools as 32-bit: see STORED_AS), every
intermediate tensor gets its GPU buffer, every kernel launch its pipeline and bind group. An
inference then writes the input, records all dispatches into one compute pass, and reads back
only the logits: nothing else crosses between host and GPU. Needs numpy, pydantic and
wgpu, not TVM. program.json is validated (`Program`) and checked against the weights before any of
it reaches the GPU, so a forged one is refused in one line.
"""

from __future__ import annotations

import base64
import json
import os
import re
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import AfterValidator, Field, model_validator
from pydantic_core import PydanticCustomError

from .errors import MixerEdgeError, reason
from .formats import S, Schema, parse, refuse, safe_text

_STORAGE_KIND = {"": "read-only-storage", "read": "read-only-storage", "read_write": "storage"}
PROGRAM_FORMAT = 1  # compiler/webgpu.py writes it
IDENTIFIER = r"^[A-Za-z_][A-Za-z0-9_]*$"  # a WGSL identifier (names from compiler/webgpu.py are sanitised)
DTYPES = ("float32", "float16", "float64", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
          "bool")
# WGSL storage buffers hold 32-bit scalars and f16 (STORABLE): integer and bool tensors of other sizes live there
# as STORED_AS says.
STORABLE = ("float32", "float16", "int32", "uint32")
STORED_AS = {"int64": "int32", "uint64": "uint32", "bool": "int32", "int8": "int32", "int16": "int32",
             "uint8": "uint32", "uint16": "uint32"}
MAX_WORKGROUPS = 65535  # per grid dimension, WebGPU's maxComputeWorkgroupsPerDimension
_F32_MAX = float(np.finfo(np.float32).max)


def stored(array: np.ndarray, what: str) -> np.ndarray:
    """`array` as a GPU buffer holds it (STORED_AS): 64-bit integers narrowed, refused where a value does not fit;
    bool and 8- or 16-bit integers widened."""
    dtype = STORED_AS.get(str(array.dtype))
    if dtype is None:
        return array
    info = np.iinfo(dtype)
    if array.size and (array.min() < info.min or array.max() > info.max):
        raise MixerEdgeError(f"{what} holds {array.dtype} values beyond {dtype} ({array.min()} to {array.max()}), "
                             "which WGSL cannot hold (it has no 64-bit integers): build for a CPU or CUDA target")
    return array.astype(dtype)


# ---- program.json's schema ------------------------------------------------------------------------

def _scalar(value: list) -> tuple[str, int | float]:
    """A kernel's scalar argument: ["i32", an integer in int32's range] or ["f32", a finite number in float32's]."""
    if len(value) == 2 and value[0] == "i32" and type(value[1]) is int and -2**31 <= value[1] < 2**31:
        return "i32", value[1]
    if len(value) == 2 and value[0] == "f32" and type(value[1]) in (int, float) and abs(value[1]) <= _F32_MAX:
        return "f32", float(value[1])
    raise PydanticCustomError("scalar", "a scalar is [\"i32\", an int32] or [\"f32\", a finite float32]")


ValueId = Annotated[int, Field(ge=0, le=2**31 - 1)]
Scalar = Annotated[list, AfterValidator(_scalar)]


class Launch(Schema):
    """One kernel launch of a `call` step."""

    kernel: str = Field(pattern=IDENTIFIER, description="the WGSL kernel (a key of `kernels`), also its entry point")
    buffers: list[Annotated[int, Field(ge=0)]] = Field(description="the storage buffers it binds, in binding order: "
                                                       "positions in the step's `args`")
    scalars: list[Scalar] = Field(description="its scalar arguments, each `[\"i32\", integer]` or `[\"f32\", "
                                  "number]`, passed in its uniform buffer before the grid's x size")
    grid: list[Annotated[int, Field(ge=1, le=2**31 - 1)]] = Field(
        min_length=3, max_length=3, description=f"workgroups along x, y, z (the runtime refuses more than "
        f"{MAX_WORKGROUPS} in one dimension, WebGPU's limit)")


class CallStep(Schema):
    """Run one compiled function: its kernel launches, in order."""

    op: Literal["call"] = Field(description="`call`")
    func: str = Field(description="the function's name, for reading")
    args: list[ValueId] = Field(description="the values it takes (its tensors, input and output), by id")
    launches: list[Launch] = Field(description="the kernels it launches")

    @model_validator(mode="after")
    def _bound(self) -> "CallStep":
        for i, launch in enumerate(self.launches):
            for position in launch.buffers:
                if position >= len(self.args):
                    refuse(f"launches.{i}.buffers", "binds argument {position} but the call has {n} args",
                           launch.buffers, position=position, n=len(self.args))
        return self


class StorageStep(Schema):
    """Allocate a GPU buffer that later `view` steps carve tensors from."""

    op: Literal["storage"] = Field(description="`storage`")
    out: ValueId = Field(description="the id of the new buffer")
    bytes: int = Field(ge=1, le=2**40, description="its size in bytes")


class ViewStep(Schema):
    """A tensor inside an earlier value (a storage buffer, a weight or another view): a reshape or an allocation."""

    op: Literal["view"] = Field(description="`view`")
    out: ValueId = Field(description="the id of the new tensor")
    src: ValueId = Field(description="the id of the value it lies in")
    offset: int = Field(ge=0, le=2**40, description="its byte offset inside `src`")
    shape: list[Annotated[int, Field(ge=0, le=2**31 - 1)]] = Field(max_length=16, description="its shape")
    dtype: Literal[DTYPES] | None = Field(None, description="its element type; absent: `src`'s")


class ConstantStep(Schema):
    """A tensor the compiled graph holds as a constant (e.g. an ONNX Constant node's weight, a folded index),
    uploaded once at load."""

    op: Literal["constant"] = Field(description="`constant`")
    out: ValueId = Field(description="the id of the new tensor")
    dtype: Literal[STORABLE] = Field(description="its element type (one WGSL storage holds)")
    shape: list[Annotated[int, Field(ge=0, le=2**31 - 1)]] = Field(max_length=16, description="its shape")
    data: str = Field(max_length=2**32, description="its bytes, little-endian, in base64 (finite numbers only)")

    @model_validator(mode="after")
    def _decodes(self) -> "ConstantStep":
        self.array()
        return self

    def array(self) -> np.ndarray:
        """The tensor, checked against its dtype and shape."""
        try:
            raw = base64.b64decode(self.data, validate=True)
        except ValueError:
            refuse("data", "is not base64", self.data[:40])
        dtype = np.dtype(self.dtype).newbyteorder("<")
        size = int(np.prod(self.shape, dtype=np.int64)) * dtype.itemsize
        if len(raw) != size:
            refuse("data", "holds {n} bytes, but {dtype}{shape} is {size}", self.data[:40], n=len(raw),
                   dtype=self.dtype, shape=self.shape, size=size)
        array = np.frombuffer(raw, dtype).reshape(self.shape)
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            refuse("data", "holds NaN or Inf", self.data[:40])
        return array


class Program(Schema):
    """An artifact's `program.json` (Vulkan through wgpu): the WGSL kernels TVM generated and the host's plan,
    replayed once at load. Values are numbered: 0 is the input, 1 to N the weights in the manifest's `params`
    order (integer and bool weights as 32-bit integers: WGSL storage holds no others), then whatever the steps
    create.
    Checked before anything reaches the GPU."""

    format: Literal[PROGRAM_FORMAT] = Field(description="the program format")
    steps: list[Annotated[CallStep | StorageStep | ViewStep | ConstantStep, Field(discriminator="op")]] = Field(
        description="the plan, in order")
    output: ValueId = Field(description="the id of the logits")
    kernels: dict[Annotated[str, Field(pattern=IDENTIFIER)], str] = Field(
        description="WGSL source of each kernel, by name (its entry point)")

    @model_validator(mode="after")
    def _consistent(self) -> "Program":
        created: set[int] = set()
        for i, step in enumerate(self.steps):
            for j, launch in enumerate(getattr(step, "launches", ())):
                if launch.kernel not in self.kernels:
                    refuse(f"steps.{i}.launches.{j}.kernel", "names no kernel of `kernels`", launch.kernel)
            out = getattr(step, "out", None)
            if out is not None:
                if out in created:
                    refuse(f"steps.{i}.out", "reuses the id of an earlier step's value", out)
                created.add(out)
        return self


def read_program(path: Path, schema: type[S] = Program) -> S:
    """program.json at `path`, validated (its structure; the ids and sizes are checked at load); another launch
    plan given its `schema` (cuda_driver.read_plan: cuda_plan.json)."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise MixerEdgeError(f"{path} is not valid JSON ({safe_text(str(exc), 120)}): rebuild the artifact") from None
    except OSError as exc:
        raise MixerEdgeError(f"{path} could not be read ({reason(exc)}): copy the artifact again") from exc
    return parse(schema, data, str(path), "rebuild the artifact")


def _aligned(nbytes: int) -> int:
    return max(4, (nbytes + 3) // 4 * 4)


_PREFERENCE = {"DiscreteGPU": 0, "IntegratedGPU": 1, "VirtualGPU": 2, "CPU": 3}


@contextmanager
def _wayland_runtime_dir():
    """Looking for GPUs, the Vulkan loader asks libwayland for a display, which prints `error: XDG_RUNTIME_DIR is
    invalid or not set in the environment.` wherever that variable is unset or not an absolute path (a container,
    a service, ssh). Within this block it names an empty private directory instead: no display is found there
    either, silently. A valid setting is left alone; the variable is restored afterwards."""
    before = os.environ.get("XDG_RUNTIME_DIR")
    if before and os.path.isabs(before):
        yield
        return
    with tempfile.TemporaryDirectory(prefix="mixer-edge-xdg-") as empty:
        os.environ["XDG_RUNTIME_DIR"] = empty
        try:
            yield
        finally:
            if before is None:
                os.environ.pop("XDG_RUNTIME_DIR", None)
            else:
                os.environ["XDG_RUNTIME_DIR"] = before


def adapter():
    """The best Vulkan device wgpu sees (a real GPU before a software one), or a clear error."""
    try:
        import wgpu
    except ImportError as exc:
        raise MixerEdgeError("Vulkan artifacts need the wgpu package: pip install wgpu") from exc
    with _wayland_runtime_dir():
        adapters = wgpu.gpu.enumerate_adapters_sync()
    vulkan = [a for a in adapters if a.info["backend_type"] == "Vulkan"]
    if not vulkan:
        others = ", ".join(f"{a.info['backend_type']} {a.info['device']}" for a in adapters) or "none"
        raise MixerEdgeError(f"no Vulkan device found by wgpu (it sees: {others}): install the GPU's Vulkan driver "
                             "(a software device: apt-get install mesa-vulkan-drivers libvulkan1)")
    return min(vulkan, key=lambda a: _PREFERENCE.get(a.info["adapter_type"], len(_PREFERENCE)))


def _bindings(name: str, wgsl: str, source: str) -> list[str]:
    """The buffers kernel `name`'s WGSL declares, in binding order: storage ones ("read", "read_write") then one
    "uniform" (its scalars and grid size); refused if it declares anything else."""
    found = re.findall(r"@binding\((\d+)\)\s*var<(\w+)(?:,\s*(\w+))?>", wgsl)
    kinds = [("uniform" if space == "uniform" else access or "read") for _, space, access in
             sorted(found, key=lambda b: int(b[0]))]
    if [int(b) for b, _, _ in sorted(found, key=lambda b: int(b[0]))] != list(range(len(found))) or \
            kinds[-1:] != ["uniform"] or any(k not in ("read", "read_write") for k in kinds[:-1]):
        raise MixerEdgeError(f"{source} kernel {name} does not declare storage buffers then one uniform "
                             "(bindings 0, 1, ...): rebuild the artifact")
    return kinds


def _bind_group_layout(device, kinds: list[str]):
    """The layout of a kernel's bindings (see `_bindings`)."""
    import wgpu

    entries = [{"binding": i, "visibility": wgpu.ShaderStage.COMPUTE,
                "buffer": {"type": "uniform" if kind == "uniform" else _STORAGE_KIND[kind]}}
               for i, kind in enumerate(kinds)]
    return device.create_bind_group_layout(entries=entries)


def _features(program: Program, gpu) -> list[str]:
    """The device features the kernels need: shader-f16 for float16 builds (WGSL `enable f16;`)."""
    if not any(re.search(r"^\s*enable f16;", wgsl, re.M) for wgsl in program.kernels.values()):
        return []
    if "shader-f16" not in gpu.features:
        raise MixerEdgeError(f"this artifact computes in float16, which the Vulkan device {gpu.info['device']} "
                             "cannot (no shader-f16): rebuild it with --precision float32")
    return ["shader-f16"]


class WgpuProgram:
    """A `Program` set up on the best Vulkan device: `program(x)` runs one inference and returns the flat logits.

    The plan is checked against the weights first (every id defined before use, every view inside its buffer,
    every launch binding what its kernel declares, the output the size of the logits); whatever wgpu still
    refuses while the GPU objects are created is one MixerEdgeError too."""

    def __init__(self, program: Program, weights: list[np.ndarray], input_shape: tuple, output_shape: tuple,
                 source: str = "program.json"):
        self.source = source  # the file, for messages
        gpu = adapter()
        self.adapter_info = dict(gpu.info)
        try:
            self._setup(program, weights, input_shape, output_shape, gpu)
        except MixerEdgeError:
            raise
        except Exception as exc:  # wgpu's validation errors: a forged kernel or plan that passed the checks
            device = self.adapter_info.get("device")
            raise MixerEdgeError(f"{self.source} could not be set up on the Vulkan device {device} "
                                 f"({safe_text(reason(exc, last=True), 200)}): rebuild the artifact") from exc

    def _setup(self, program: Program, weights: list[np.ndarray], input_shape: tuple, output_shape: tuple,
               gpu) -> None:
        import wgpu

        limits = gpu.limits
        self.device = gpu.request_device_sync(required_features=_features(program, gpu), required_limits={
            "max-storage-buffers-per-shader-stage": limits["max-storage-buffers-per-shader-stage"]})
        device = self.device
        storage = wgpu.BufferUsage.STORAGE
        nbytes = int(np.prod(input_shape)) * 4
        self.input = device.create_buffer(size=_aligned(nbytes), usage=storage | wgpu.BufferUsage.COPY_DST)
        values = {0: (self.input, 0, nbytes, "float32")}  # id -> (buffer, offset, bytes, dtype)

        def upload(array: np.ndarray) -> tuple:
            data = np.ascontiguousarray(array).tobytes()
            data += b"\0" * (_aligned(len(data)) - len(data))
            return device.create_buffer_with_data(data=data, usage=storage), 0, array.nbytes, str(array.dtype)

        def value(ref: int, where: str) -> tuple:
            if ref not in values and 1 <= ref <= len(weights):  # weights reach the GPU when a step first uses them
                values[ref] = upload(stored(weights[ref - 1], f"{self.source}: weight {ref}"))
            if ref not in values:
                raise MixerEdgeError(f"{self.source} {where} uses value {ref}, which is neither the input (0), a "
                                     f"weight (1 to {len(weights)}) nor made by an earlier step: rebuild the artifact")
            return values[ref]

        kernels, bindings = {}, {}
        for name, wgsl in program.kernels.items():
            bindings[name] = _bindings(name, wgsl, self.source)
            layout = _bind_group_layout(device, bindings[name])
            pipeline = device.create_compute_pipeline(
                layout=device.create_pipeline_layout(bind_group_layouts=[layout]),
                compute={"module": device.create_shader_module(code=wgsl), "entry_point": name})
            kernels[name] = (pipeline, layout)
        self.dispatches, self.written = [], []  # per dispatch: what to record, and the views it writes
        for i, step in enumerate(program.steps):
            where = f"step {i} ({step.op})"
            out = getattr(step, "out", None)
            if out is not None and (out <= len(weights) or out in values):
                raise MixerEdgeError(f"{self.source} {where} redefines value {out} (the input or a weight): "
                                     "rebuild the artifact")
            if step.op == "storage":
                if step.bytes > limits["max-buffer-size"]:
                    raise MixerEdgeError(f"{self.source} {where} allocates {step.bytes} bytes, more than the Vulkan "
                                         f"device's largest buffer ({limits['max-buffer-size']}): rebuild the artifact")
                buffer = device.create_buffer(size=_aligned(step.bytes), usage=storage | wgpu.BufferUsage.COPY_SRC)
                values[step.out] = (buffer, 0, step.bytes, "uint8")
            elif step.op == "constant":
                values[step.out] = upload(step.array())
            elif step.op == "view":
                buffer, offset, available, dtype = value(step.src, where)
                dtype = step.dtype or dtype
                size = int(np.prod(step.shape, dtype=np.int64)) * np.dtype(dtype).itemsize
                if step.offset + size > available:
                    raise MixerEdgeError(f"{self.source} {where} views {size} bytes at offset {step.offset} of value "
                                         f"{step.src}, which holds {available}: rebuild the artifact")
                values[step.out] = (buffer, offset + step.offset, size, dtype)
            else:
                args = [value(ref, where) for ref in step.args]
                for launch in step.launches:
                    declared = len(bindings[launch.kernel]) - 1
                    if len(launch.buffers) != declared:
                        raise MixerEdgeError(f"{self.source} {where} binds {len(launch.buffers)} buffers to kernel "
                                             f"{launch.kernel}, which declares {declared}: rebuild the artifact")
                    bound = [args[j] for j in launch.buffers]
                    self.dispatches.append(self._dispatch(kernels[launch.kernel], launch, bound))
                    self.written.append([view for view, kind in zip(bound, bindings[launch.kernel])
                                         if kind == "read_write"])
        self.output = value(program.output, "output")
        expected = int(np.prod(output_shape)) * 4
        if self.output[2:] != (expected, "float32"):
            raise MixerEdgeError(f"{self.source} output (value {program.output}) is {self.output[2]} bytes of "
                                 f"{self.output[3]}, but the logits {list(output_shape)} are {expected} bytes of "
                                 "float32: rebuild the artifact")

    def _dispatch(self, kernel, launch: Launch, buffers: list) -> tuple:
        import wgpu

        pipeline, layout = kernel
        grid = launch.grid
        if max(grid) > MAX_WORKGROUPS:
            raise MixerEdgeError(f"kernel {launch.kernel} launches {max(grid)} workgroups in one dimension; "
                                 f"WebGPU allows {MAX_WORKGROUPS}: build with a smaller batch")
        # The kernel's scalar arguments, then packGridDimX: it returns early past blockIdx.x == grid x - 1.
        pods = [struct.pack("<i" if kind == "i32" else "<f", value) for kind, value in launch.scalars]
        pod = b"".join(pods) + struct.pack("<I", grid[0] - 1)
        pod += b"\0" * (-len(pod) % 16)
        uniform = self.device.create_buffer_with_data(data=pod, usage=wgpu.BufferUsage.UNIFORM)
        entries = [{"binding": i, "resource": {"buffer": buffer, "offset": offset, "size": _aligned(size)}}
                   for i, (buffer, offset, size, _) in enumerate(buffers)]
        entries.append({"binding": len(buffers), "resource": {"buffer": uniform, "offset": 0, "size": len(pod)}})
        return pipeline, self.device.create_bind_group(layout=layout, entries=entries), tuple(grid)

    def commands(self, dispatches: list[tuple]):
        """A command buffer running `dispatches` (some of `self.dispatches`) in one compute pass."""
        encoder = self.device.create_command_encoder()
        compute = encoder.begin_compute_pass()
        for pipeline, bind_group, grid in dispatches:
            compute.set_pipeline(pipeline)
            compute.set_bind_group(0, bind_group)
            compute.dispatch_workgroups(*grid)
        compute.end()
        return encoder.finish()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        queue = self.device.queue
        queue.write_buffer(self.input, 0, np.ascontiguousarray(x, np.float32).tobytes())
        queue.submit([self.commands(self.dispatches)])
        buffer, offset, size, dtype = self.output
        return np.frombuffer(queue.read_buffer(buffer, offset, size), dtype=dtype).copy()
