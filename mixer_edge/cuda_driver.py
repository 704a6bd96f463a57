"""Run a `cuda-driver` artifact through the CUDA driver API alone (libcuda.so.1): no CUDA runtime, NVRTC or TVM.

The artifact's host side is data, cuda_plan.json (`CudaPlan`, written by compiler/cuda.py's `plan`): which
buffers to allocate, which tensors lie where in them, and every kernel launch with its parameters in order.
`CudaProgram` replays it once at load: the weights it uses and its constants are uploaded as they are, its
storages allocated, kernels.fatbin loaded and every launch's parameter array built. An inference then copies
the input in, launches every kernel on one stream and copies only the logits back: nothing is allocated per
inference. `check_gpu` refuses, before any kernel code is loaded, a machine without an NVIDIA driver, an older
driver than the kernels' CUDA, or a GPU the fat binary has no code for. The plan is validated (`CudaPlan`) and
checked against the weights before the driver is touched, so a forged one is refused in one line. Needs only
numpy, pydantic and ctypes (the native runtime's src/cuda_engine.cc does the same in C++).
"""

from __future__ import annotations

import ctypes
import threading
import time
import tomllib
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import AfterValidator, Field, model_validator
from pydantic_core import PydanticCustomError

from .errors import MixerEdgeError, reason
from .formats import Schema, refuse, safe_text
from .vulkan import DTYPES, IDENTIFIER, ConstantStep, StorageStep, ValueId, ViewStep, _scalar, read_program

PLAN_FORMAT = 1  # compiler/cuda.py's PLAN_FORMAT writes it
LIBCUDA = "libcuda.so.1"
KERNELS = "kernels.fatbin"
STATIC_SHARED_LIMIT = 49152  # dynamic shared memory past this needs the kernel's attribute raised
CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75
CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76
CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
CU_STREAM_NON_BLOCKING = 1
CUDA_ERROR_NOT_FOUND = 500


# ---- cuda_plan.json's schema ----------------------------------------------------------------------

def _param(value: list) -> tuple[str, int | float]:
    """A kernel parameter: ["buffer", k] (the device pointer of the call's args[k]), ["i32", v], ["i64", v] or
    ["f32", v]."""
    if len(value) == 2 and value[0] == "buffer" and type(value[1]) is int and 0 <= value[1] < 2**31:
        return "buffer", value[1]
    if len(value) == 2 and value[0] == "i64" and type(value[1]) is int and -2**63 <= value[1] < 2**63:
        return "i64", value[1]
    try:
        return _scalar(value)
    except PydanticCustomError:
        raise PydanticCustomError("param", "a kernel parameter is [\"buffer\", a position in the call's args], "
                                  "[\"i32\", an int32], [\"i64\", an int64] or [\"f32\", a finite float32]") from None


Param = Annotated[list, AfterValidator(_param)]
Dim3 = list[Annotated[int, Field(ge=1, le=2**31 - 1)]]


class CudaLaunch(Schema):
    """One kernel launch of a `call` step (cuLaunchKernel on the model's stream)."""

    kernel: str = Field(pattern=IDENTIFIER, description="the `__global__` function in kernels.fatbin "
                        "(cuModuleGetFunction); the runtime refuses a name the fat binary lacks")
    params: list[Param] = Field(max_length=1024, description="the kernel's parameters in order: `[\"buffer\", k]` "
                                "the device pointer of the call's `args[k]`, `[\"i32\", v]` an int32, `[\"i64\", "
                                "v]` an int64, `[\"f32\", v]` a float")
    grid: Dim3 = Field(min_length=3, max_length=3, description="the grid's size in blocks along x, y, z")
    block: Dim3 = Field(min_length=3, max_length=3, description="a block's size in threads along x, y, z")
    shared_bytes: int = Field(ge=0, le=2**31 - 1, description=f"dynamic shared memory in bytes; over "
                              f"{STATIC_SHARED_LIMIT} the runtime raises the kernel's "
                              "CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES to it at load")


class CudaCallStep(Schema):
    """Run one compiled function: its kernel launches, in order."""

    op: Literal["call"] = Field(description="`call`")
    func: str = Field(description="the function's name, for reading")
    args: list[ValueId] = Field(description="the values it takes (its tensors, inputs then outputs), by id")
    launches: list[CudaLaunch] = Field(description="the kernels it launches")

    @model_validator(mode="after")
    def _bound(self) -> "CudaCallStep":
        for i, launch in enumerate(self.launches):
            for j, (kind, position) in enumerate(launch.params):
                if kind == "buffer" and position >= len(self.args):
                    refuse(f"launches.{i}.params.{j}", "passes argument {position} but the call has {n} args",
                           list(launch.params[j]), position=position, n=len(self.args))
        return self


class CudaConstantStep(ConstantStep):
    """A tensor the compiled graph holds as a constant, uploaded once at load as it is (any element type)."""

    dtype: Literal[DTYPES] = Field(description="its element type")


class CudaPlan(Schema):
    """An artifact's `cuda_plan.json` (CUDA through the driver API alone): the host side of the compiled model,
    replayed once at load; the kernels are in kernels.fatbin. Values are numbered: 0 is the input (float32, the
    manifest's input.shape), 1 to N the weights in the manifest's `params` order (uploaded as params.npz holds
    them), then whatever the steps create. An inference copies the input in, launches every kernel in order on
    one stream and copies the output back. Checked before any kernel code is loaded."""

    format: Literal[PLAN_FORMAT] = Field(description="the plan format")
    driver_version_min: int = Field(ge=0, le=2**31 - 1, description="the oldest driver that runs the kernels, as "
                                    "cuDriverGetVersion says it (major * 1000 + minor * 10; the CUDA that compiled "
                                    "them)")
    steps: list[Annotated[CudaCallStep | StorageStep | ViewStep | CudaConstantStep, Field(discriminator="op")]] = \
        Field(description="the plan, in order")
    output: ValueId = Field(description="the id of the logits (float32, the manifest's output.shape)")

    @model_validator(mode="after")
    def _consistent(self) -> "CudaPlan":
        created: set[int] = set()
        for i, step in enumerate(self.steps):
            out = getattr(step, "out", None)
            if out is not None:
                if out in created:
                    refuse(f"steps.{i}.out", "reuses the id of an earlier step's value", out)
                created.add(out)
        return self


def read_plan(path: str | Path) -> CudaPlan:
    """cuda_plan.json at `path`, validated (its structure; the ids and sizes are checked at load)."""
    return read_program(Path(path), CudaPlan)


# ---- the driver ------------------------------------------------------------------------------------

_P = ctypes.POINTER
_INT, _UINT, _PTR, _DPTR, _SIZE = ctypes.c_int, ctypes.c_uint, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t
# The functions used, by their symbols (the _v2 ABI where cuda.h maps the name), with their argument types.
# CUdevice is an int; CUcontext, CUmodule, CUfunction and CUstream are pointers; CUdeviceptr a 64-bit integer.
FUNCTIONS = {
    "cuInit": (_UINT,),
    "cuDriverGetVersion": (_P(_INT),),
    "cuDeviceGetCount": (_P(_INT),),
    "cuDeviceGet": (_P(_INT), _INT),
    "cuDeviceGetAttribute": (_P(_INT), _INT, _INT),
    "cuDeviceGetName": (ctypes.c_char_p, _INT, _INT),
    "cuDevicePrimaryCtxRetain": (_P(_PTR), _INT),
    "cuDevicePrimaryCtxRelease_v2": (_INT,),
    "cuCtxPushCurrent_v2": (_PTR,),
    "cuCtxPopCurrent_v2": (_P(_PTR),),
    "cuModuleLoadData": (_P(_PTR), _PTR),
    "cuModuleUnload": (_PTR,),
    "cuModuleGetFunction": (_P(_PTR), _PTR, ctypes.c_char_p),
    "cuFuncSetAttribute": (_PTR, _INT, _INT),
    "cuMemAlloc_v2": (_P(_DPTR), _SIZE),
    "cuMemFree_v2": (_DPTR,),
    "cuMemcpyHtoD_v2": (_DPTR, _PTR, _SIZE),
    "cuMemcpyHtoDAsync_v2": (_DPTR, _PTR, _SIZE, _PTR),
    "cuMemcpyDtoHAsync_v2": (_PTR, _DPTR, _SIZE, _PTR),
    "cuStreamCreate": (_P(_PTR), _UINT),
    "cuStreamDestroy_v2": (_PTR,),
    "cuStreamSynchronize": (_PTR,),
    "cuLaunchKernel": (_PTR, _UINT, _UINT, _UINT, _UINT, _UINT, _UINT, _UINT, _PTR, _P(_PTR), _P(_PTR)),
    "cuGetErrorString": (_INT, _P(ctypes.c_char_p)),
}


def no_gpu(preset: str, why: str) -> MixerEdgeError:
    return MixerEdgeError(f"artifact target {preset} needs an NVIDIA GPU and its driver ({LIBCUDA}), and this "
                          f"machine has none ({safe_text(why, 200)}): run it on the device")


class Driver:
    """libcuda.so.1 through ctypes, initialised (cuInit): each function of FUNCTIONS is an attribute of the same
    name returning a CUresult, which `check` turns into a MixerEdgeError. `preset` names the artifact's target
    in the refusal where there is no driver or no GPU."""

    def __init__(self, preset: str):
        self.preset = preset
        try:
            self.lib = ctypes.CDLL(LIBCUDA)
        except OSError as exc:
            raise no_gpu(preset, reason(exc)) from None
        for name, argtypes in FUNCTIONS.items():
            try:
                function = getattr(self.lib, name)
            except AttributeError:
                raise MixerEdgeError(f"artifact target {preset} needs a CUDA 11.4 driver or newer; this {LIBCUDA} "
                                     f"has no {name}: update the driver (JetPack)") from None
            function.argtypes, function.restype = argtypes, ctypes.c_int
            setattr(self, name, function)
        result = self.cuInit(0)
        if result:
            raise no_gpu(preset, f"cuInit: {self.error_text(result)}")

    def error_text(self, result: int) -> str:
        """cuGetErrorString's words for `result`, with its number."""
        text = ctypes.c_char_p()
        if self.cuGetErrorString(result, ctypes.byref(text)) or not text.value:
            return f"CUDA error {result}"
        return f"{text.value.decode('utf-8', 'replace')}, CUDA error {result}"

    def check(self, result: int, what: str, fix: str = "") -> None:
        """Raise a MixerEdgeError if `result` (a CUresult) is not CUDA_SUCCESS: `what` failed, why, and `fix`."""
        if result:
            raise MixerEdgeError(f"{what} failed ({self.error_text(result)})" + (f": {fix}" if fix else ""))

    def get(self, function, ctype, *args, what: str = ""):
        """The value `function(&out, *args)` writes into a new `ctype`, checked."""
        out = ctype()
        self.check(function(ctypes.byref(out), *args), what or function.__name__)
        return out.value


def version_text(version: int) -> str:
    """A cuDriverGetVersion number as CUDA's M.m (12020 -> 12.2)."""
    return f"{version // 1000}.{version % 1000 // 10}"


def preset_with(arch: str) -> str | None:
    """The first preset shipped in `targets/` whose [build] cuda_archs holds `arch`, if one can be read."""
    from .resources import data_dir

    for path in sorted(data_dir("targets").glob("*.toml")):
        try:
            build = tomllib.loads(path.read_text(encoding="utf-8")).get("build")
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError):
            continue
        archs = build.get("cuda_archs") if isinstance(build, dict) else None
        if isinstance(archs, list) and arch in archs:
            return path.stem
    return None


def gpu_arch(driver: Driver, device: int) -> str:
    """The device's compute capability as an arch name (sm_87)."""
    major = driver.get(driver.cuDeviceGetAttribute, _INT, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, device)
    minor = driver.get(driver.cuDeviceGetAttribute, _INT, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, device)
    return f"sm_{major}{minor}"


def check_gpu(plan_or_min_version: CudaPlan | int, cuda_archs: list[str], cuda_ptx: bool, preset: str) -> str:
    """Refuse, in one line, a machine that cannot run the artifact's kernels, before any is loaded: no driver or
    no GPU, a driver older than `driver_version_min`, a GPU whose arch is not in `cuda_archs` (unless the fat
    binary has PTX, `cuda_ptx`). Returns the GPU's arch (sm_87); device 0 is the one used."""
    minimum = plan_or_min_version.driver_version_min if isinstance(plan_or_min_version, CudaPlan) \
        else int(plan_or_min_version)
    driver = Driver(preset)
    if driver.get(driver.cuDeviceGetCount, _INT) < 1:
        raise no_gpu(preset, "cuDeviceGetCount: no CUDA device")
    version = driver.get(driver.cuDriverGetVersion, _INT)
    if version < minimum:
        raise MixerEdgeError(f"artifact target {preset} needs a CUDA {version_text(minimum)} driver or newer; this "
                             f"one is {version_text(version)}: update the driver (JetPack) or rebuild with an older "
                             "CUDA")
    arch = gpu_arch(driver, driver.get(driver.cuDeviceGet, _INT, 0))
    if arch not in cuda_archs and not cuda_ptx:
        known = preset_with(arch)
        raise MixerEdgeError(f"this artifact has {', '.join(cuda_archs)} code; this GPU is {arch}: rebuild for a "
                             f"preset with {arch} in its cuda_archs" + (f" (e.g. --target {known})" if known else ""))
    return arch


# ---- the plan, checked against the weights, then set up on the GPU --------------------------------

def _itemsize(dtype: str) -> int:
    return np.dtype(dtype).itemsize


def layout(plan: CudaPlan, weights: list[np.ndarray], input_shape: tuple, output_shape: tuple,
           source: str) -> tuple[dict, list]:
    """Every value of `plan` as (its root allocation, byte offset in it, bytes, dtype), and per launch (step
    index, launch): checked against the weights without any GPU (every id defined before use, every view inside
    its source and aligned for its dtype, the output float32 of the logits' size); one MixerEdgeError naming
    `source` otherwise. A root is ("input",), ("weight", id), ("storage", id) or ("constant", id)."""
    values = {0: (("input",), 0, int(np.prod(input_shape)) * 4, "float32")}

    def value(ref: int, where: str) -> tuple:
        if ref not in values and 1 <= ref <= len(weights):
            weight = weights[ref - 1]
            values[ref] = (("weight", ref), 0, weight.nbytes, weight.dtype.name)
        if ref not in values:
            raise MixerEdgeError(f"{source} {where} uses value {ref}, which is neither the input (0), a weight "
                                 f"(1 to {len(weights)}) nor made by an earlier step: rebuild the artifact")
        return values[ref]

    launches = []
    for i, step in enumerate(plan.steps):
        where = f"step {i} ({step.op})"
        out = getattr(step, "out", None)
        if out is not None and (out <= len(weights) or out in values):
            raise MixerEdgeError(f"{source} {where} redefines value {out} (the input or a weight): rebuild the "
                                 "artifact")
        if step.op == "storage":
            values[out] = (("storage", out), 0, step.bytes, "uint8")
        elif step.op == "constant":
            values[out] = (("constant", out), 0, int(np.prod(step.shape, dtype=np.int64)) * _itemsize(step.dtype),
                           step.dtype)
        elif step.op == "view":
            root, offset, available, dtype = value(step.src, where)
            dtype = step.dtype or dtype
            size = int(np.prod(step.shape, dtype=np.int64)) * _itemsize(dtype)
            if step.offset + size > available:
                raise MixerEdgeError(f"{source} {where} views {size} bytes at offset {step.offset} of value "
                                     f"{step.src}, which holds {available}: rebuild the artifact")
            if (offset + step.offset) % _itemsize(dtype):  # cuMemAlloc's pointers are 256-byte aligned
                raise MixerEdgeError(f"{source} {where} puts a {dtype} view at byte {offset + step.offset} of its "
                                     f"buffer, not a multiple of {_itemsize(dtype)}: rebuild the artifact")
            values[out] = (root, offset + step.offset, size, dtype)
        else:
            for ref in step.args:
                value(ref, where)
            launches.extend((i, launch) for launch in step.launches)
    output = value(plan.output, "output")
    expected = int(np.prod(output_shape)) * 4
    if output[2:] != (expected, "float32"):
        raise MixerEdgeError(f"{source} output (value {plan.output}) is {output[2]} bytes of {output[3]}, but the "
                             f"logits {list(output_shape)} are {expected} bytes of float32: rebuild the artifact")
    return values, launches


_HOLDERS = {"buffer": ctypes.c_uint64, "i32": ctypes.c_int32, "i64": ctypes.c_int64, "f32": ctypes.c_float}


class CudaProgram:
    """A `CudaPlan` set up on the GPU (device 0, its primary context, one stream): `program(x)` runs one inference
    and returns the flat float32 logits.

    The plan is checked against the weights first (`layout`), before the driver is touched; then kernels.fatbin
    (`fatbin`, its bytes) is loaded, every kernel looked up, the weights the plan uses and its constants uploaded
    and its storages allocated, once. `preset` names the artifact's target where there is no driver. `close()`
    frees it all (so does garbage collection)."""

    def __init__(self, plan: CudaPlan, weights: list[np.ndarray], input_shape: tuple, output_shape: tuple,
                 fatbin: bytes, source: str = "cuda_plan.json", preset: str = "cuda-driver"):
        self.source = source  # the file, for messages
        self.input_shape, self.output_shape = tuple(input_shape), tuple(output_shape)
        self.driver = self.context = self.module = self.stream = self.device = None
        self.device_name, self.arch = "?", "?"  # the GPU's name and arch (sm_87), once set up
        self.allocations: list[int] = []
        self.lock = threading.Lock()  # one stream and one set of intermediates: one inference at a time
        values, launches = layout(plan, weights, self.input_shape, self.output_shape, source)
        self.driver = Driver(preset)
        try:
            self._setup(plan, weights, values, launches, fatbin)
        except BaseException:
            self.close()
            raise

    @contextmanager
    def _current(self):
        """The program's context current on this thread for the block (restoring whatever was current)."""
        d = self.driver
        if d is None:
            raise MixerEdgeError(f"the model of {self.source} was closed: load it again")
        d.check(d.cuCtxPushCurrent_v2(self.context), "cuCtxPushCurrent")
        try:
            yield d
        finally:
            d.cuCtxPopCurrent_v2(ctypes.byref(_PTR()))

    def _alloc(self, nbytes: int, what: str) -> int:
        d = self.driver
        pointer = d.get(d.cuMemAlloc_v2, _DPTR, max(1, nbytes), what=f"cuMemAlloc of {nbytes} bytes for {what}")
        self.allocations.append(pointer)
        return pointer

    def _upload(self, array: np.ndarray, what: str) -> int:
        array = np.ascontiguousarray(array, array.dtype.newbyteorder("<"))  # as it is; little-endian, as CUDA's
        pointer = self._alloc(array.nbytes, what)
        if array.nbytes:
            self.driver.check(self.driver.cuMemcpyHtoD_v2(pointer, array.ctypes.data, array.nbytes),
                              f"cuMemcpyHtoD of {what}")
        return pointer

    def _setup(self, plan: CudaPlan, weights: list[np.ndarray], values: dict, launches: list, fatbin: bytes) -> None:
        d = self.driver
        device = d.get(d.cuDeviceGet, _INT, 0)
        name = ctypes.create_string_buffer(256)
        d.check(d.cuDeviceGetName(name, len(name), device), "cuDeviceGetName")
        self.device_name = safe_text(name.value.decode("utf-8", "replace"), 100)
        self.arch = gpu_arch(d, device)
        self.device = device
        self.context = d.get(d.cuDevicePrimaryCtxRetain, _PTR, device, what="cuDevicePrimaryCtxRetain")
        with self._current():
            self.stream = d.get(d.cuStreamCreate, _PTR, CU_STREAM_NON_BLOCKING, what="cuStreamCreate")
            image = ctypes.create_string_buffer(bytes(fatbin), len(fatbin) + 1)
            module = _PTR()
            result = d.cuModuleLoadData(ctypes.byref(module), image)
            fatbin_path = Path(self.source).with_name(KERNELS)
            d.check(result, f"loading {fatbin_path} on the {self.device_name} ({self.arch})", "rebuild the artifact")
            self.module = module.value
            functions = {}
            for _, launch in launches:
                if launch.kernel not in functions:
                    function = _PTR()
                    result = d.cuModuleGetFunction(ctypes.byref(function), self.module, launch.kernel.encode())
                    if result == CUDA_ERROR_NOT_FOUND:
                        raise MixerEdgeError(f"{KERNELS} has no kernel {launch.kernel}: rebuild the artifact")
                    d.check(result, f"cuModuleGetFunction {launch.kernel}")
                    functions[launch.kernel] = [function.value, STATIC_SHARED_LIMIT]
                entry = functions[launch.kernel]
                if launch.shared_bytes > entry[1]:
                    d.check(d.cuFuncSetAttribute(entry[0], CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                                 launch.shared_bytes),
                            f"raising kernel {launch.kernel}'s dynamic shared memory to {launch.shared_bytes} bytes")
                    entry[1] = launch.shared_bytes
            roots = {}  # root allocation -> device pointer
            self.input = roots[("input",)] = self._alloc(values[0][2], "the input")
            constants = {step.out: step for step in plan.steps if step.op == "constant"}
            for root, _, nbytes, _ in values.values():
                if root in roots:
                    continue
                kind, ref = root
                if kind == "weight":
                    roots[root] = self._upload(weights[ref - 1], f"weight {ref}")
                elif kind == "constant":
                    roots[root] = self._upload(constants[ref].array(), f"constant {ref}")
                else:
                    roots[root] = self._alloc(nbytes, f"storage {ref}")
            # cuMemcpyHtoD from pageable memory may return before its DMA lands: wait for it here, once, as the
            # model's stream does not wait on the legacy default stream.
            d.check(d.cuStreamSynchronize(None), "cuStreamSynchronize")

            def pointer(ref: int) -> tuple[int, int, str]:
                root, offset, nbytes, dtype = values[ref]
                return roots[root] + offset, nbytes, dtype

            self.launches, self.written = [], []  # per launch: what cuLaunchKernel takes, and the tensor it writes
            for i, launch in launches:
                args = [pointer(ref) for ref in plan.steps[i].args]
                holders = [_HOLDERS[kind](args[v][0] if kind == "buffer" else v) for kind, v in launch.params]
                params = (_PTR * len(holders))(*[ctypes.addressof(h) for h in holders]) if holders else None
                self.launches.append((launch.kernel, functions[launch.kernel][0], *launch.grid, *launch.block,
                                      launch.shared_bytes, params, holders))
                # TVM's CUDA kernels take their buffers sorted by name, so where the output is among them depends
                # on the names; Relax passes a call's output last (destination-passing style): what the kernel
                # writes is the call's last argument where the launch takes it, else its first buffer.
                buffers = [v for kind, v in launch.params if kind == "buffer"]
                written = len(args) - 1 if len(args) - 1 in buffers else (buffers[0] if buffers else None)
                self.written.append(None if written is None else args[written])
            self.output = pointer(plan.output)[:2]

    def _launch(self, launch: tuple) -> None:
        name, function, gx, gy, gz, bx, by, bz, shared, params, _ = launch
        self.driver.check(self.driver.cuLaunchKernel(function, gx, gy, gz, bx, by, bz, shared, self.stream, params,
                                                     None), f"launching kernel {name}")

    def _input(self, x: np.ndarray) -> np.ndarray:
        """`x` as float32 on the host, copied (asynchronously, on the stream) into the input's buffer."""
        x = np.ascontiguousarray(x, np.float32)
        if x.size != int(np.prod(self.input_shape)):
            raise MixerEdgeError(f"input shape {x.shape} is not the artifact's {list(self.input_shape)}")
        self.driver.check(self.driver.cuMemcpyHtoDAsync_v2(self.input, x.ctypes.data, x.nbytes, self.stream),
                          "copying the input to the GPU")
        return x

    def _sync(self) -> None:
        self.driver.check(self.driver.cuStreamSynchronize(self.stream), "running the kernels")

    def _read(self, pointer: int, nbytes: int, dtype: str) -> np.ndarray:
        """`nbytes` at device `pointer`, copied back once the stream has run (the caller synchronises)."""
        out = np.empty(nbytes // _itemsize(dtype), dtype)
        if nbytes:
            self.driver.check(self.driver.cuMemcpyDtoHAsync_v2(out.ctypes.data, pointer, nbytes, self.stream),
                              "copying back from the GPU")
        return out

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with self.lock, self._current():
            x = self._input(x)
            for launch in self.launches:
                self._launch(launch)
            logits = self._read(*self.output, "float32")
            self._sync()
        return logits

    def kernel_times(self, x: np.ndarray, repeat: int = 10) -> list[tuple[str, float]]:
        """(kernel, median ms) of each launch of one inference, in order: each launched alone and waited for
        (cuStreamSynchronize), timed on the host; the median of `repeat`."""
        self(x)  # the input in place, the kernels warm
        times = np.empty((repeat, len(self.launches)))
        with self.lock, self._current():
            for r in range(repeat):
                for i, launch in enumerate(self.launches):
                    start = time.perf_counter()
                    self._launch(launch)
                    self._sync()
                    times[r, i] = time.perf_counter() - start
        return [(launch[0], 1e3 * float(t)) for launch, t in zip(self.launches, np.median(times, axis=0))]

    def kernel_outputs(self, x: np.ndarray) -> list[tuple[str, np.ndarray]]:
        """(kernel, what it wrote, flat) of each launch of one inference, in order, copied back right after it
        ran: the compiled model's intermediate tensors, the last of them the logits."""
        outputs = []
        with self.lock, self._current():
            self._input(x)
            for launch, written in zip(self.launches, self.written):
                self._launch(launch)
                if written is not None:
                    data = self._read(*written)
                    self._sync()
                    outputs.append((launch[0], data))
            self._sync()
        return outputs

    def close(self) -> None:
        """Free the program's device memory, module and stream and release the context (errors ignored: the
        context may be broken already). Safe to call twice."""
        d, self.driver = self.driver, None
        if d is None or self.context is None:
            return
        if d.cuCtxPushCurrent_v2(self.context) == 0:
            if self.stream is not None:
                d.cuStreamSynchronize(self.stream)
            for pointer in self.allocations:
                d.cuMemFree_v2(pointer)
            if self.module is not None:
                d.cuModuleUnload(self.module)
            if self.stream is not None:
                d.cuStreamDestroy_v2(self.stream)
            d.cuCtxPopCurrent_v2(ctypes.byref(_PTR()))
        d.cuDevicePrimaryCtxRelease_v2(self.device)
        self.allocations, self.module, self.stream, self.context = [], None, None, None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: ctypes or the driver may be gone already
            pass
