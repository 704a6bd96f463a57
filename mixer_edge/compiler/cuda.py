"""The model's CUDA kernels compiled ahead of time into one fat binary for the preset's architectures.

TVM 0.27 keeps CUDA kernels as source inside the library and compiles them when it is loaded; we
compile them here, so the device never needs a CUDA compiler. nvcc does it wherever it supports
every arch of the preset and the board's driver loads what it compiles ([build] cuda_driver_major).
Neither holds for the Jetsons: CUDA 13 dropped Volta (Xavier's sm_72), and JetPack's drivers are CUDA
11.4 (JetPack 5) and 12.6 (JetPack 6), which refuse CUDA 13 cubins. Their kernels go through NVRTC 11.8
from NVIDIA's PyPI wheels (the `jetson` extra), whose cubins both drivers load, and nvcc's
`fatbinary` packs them.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.util
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import MixerEdgeError, reason
from .targets import TargetPreset

NVRTC_EXTRA = "pip install 'mixer-edge[jetson]' (NVRTC 11.8 and its headers from PyPI)"


@dataclass
class CudaKernels:
    """The fat binary the runtime hands to TVM at load, and what built it."""

    fat_binary: bytes
    source_sha256: str  # of the CUDA source TVM will ask to compile
    compiler: str  # "nvcc 13.0" or "nvrtc 11.8"

    @property
    def driver_version_min(self) -> int:
        """The oldest CUDA driver that loads these cubins (CUDA_VERSION form, 11000): its major's first release."""
        return _major(self.compiler) * 1000


@functools.cache
def nvcc_archs() -> tuple[str, ...]:
    """The real architectures (sm_XX) the nvcc on PATH compiles for."""
    listing = subprocess.run(["nvcc", "--list-gpu-code"], capture_output=True, text=True).stdout.split()
    return tuple(arch for arch in listing if arch.startswith("sm_"))


def check_compilers(preset: TargetPreset) -> None:
    """Fail before any work when no compiler here can build the preset's archs for its board's driver."""
    if shutil.which("nvcc") is None:
        raise MixerEdgeError(f"target {preset.name} needs nvcc (the CUDA toolkit) on PATH to compile its kernels: "
                             "install the CUDA toolkit and put its bin/ on PATH")
    nvcc_unfit = _unfit(_nvcc_version(), nvcc_archs(), preset)
    if nvcc_unfit is None:
        return
    nvrtc = Nvrtc.find()
    if nvrtc is None:
        toolkit = f"a CUDA {preset.cuda_driver_major}" if preset.cuda_driver_major else "an older CUDA"
        raise MixerEdgeError(f"target {preset.name}: {nvcc_unfit}: {NVRTC_EXTRA}, or put {toolkit} toolkit first "
                             "on PATH")
    nvrtc_unfit = _unfit(nvrtc.version, nvrtc.archs, preset)
    if nvrtc_unfit is not None:
        raise MixerEdgeError(f"target {preset.name}: {nvcc_unfit}, and {nvrtc_unfit}: split the preset in two, or use "
                             "a CUDA toolkit that builds all of it")


def _unfit(compiler: str, archs: tuple[str, ...] | list[str], preset: TargetPreset) -> str | None:
    """Why `compiler` (with the real archs it compiles for) cannot build the preset's kernels; None if it can."""
    missing = [arch for arch in preset.cuda_archs if arch not in archs]
    if missing:
        supported = f"{archs[0]}..{archs[-1]}" if archs else "none"
        return f"{compiler} cannot compile for {', '.join(missing)} (it supports {supported})"
    if preset.cuda_driver_major is not None and _major(compiler) > preset.cuda_driver_major:
        return (f"the board's CUDA {preset.cuda_driver_major} driver ([build] cuda_driver_major) cannot load kernels "
                f"from {compiler}")
    return None


def _major(compiler: str) -> int:
    return int(re.search(r"(\d+)\.", compiler).group(1))


def compile_kernels(source: str, preset: TargetPreset) -> CudaKernels:
    """One fat binary: SASS for each of the preset's archs (+ PTX of the newest, if asked)."""
    from .. import runtime

    if _unfit(_nvcc_version(), nvcc_archs(), preset) is None:
        fat_binary, compiler = _nvcc_fat_binary(source, preset), _nvcc_version()
    else:
        nvrtc = Nvrtc.find()
        fat_binary, compiler = nvrtc.fat_binary(source, preset), nvrtc.version
    return CudaKernels(fat_binary, runtime.sha256_text(source), compiler)


def _nvcc_fat_binary(source: str, preset: TargetPreset) -> bytes:
    from tvm.support import nvcc

    gencode = []
    for arch in preset.cuda_archs:
        gencode += ["-gencode", f"arch=compute_{arch[3:]},code={arch}"]
    if preset.cuda_ptx:  # PTX of the newest arch lets later GPUs JIT the kernels
        newest = preset.cuda_archs[-1][3:]
        gencode += ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]
    try:
        with preset.tvm_target():  # TVM's nvcc wrapper reads the current target
            return bytes(nvcc.compile_cuda(source, target_format="fatbin", arch=gencode, compiler="nvcc"))
    except Exception as exc:
        raise MixerEdgeError(f"nvcc failed for {preset.name} ({reason(exc, last=True)})") from exc


@functools.cache
def _nvcc_version() -> str:
    banner = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout
    release = re.search(r"release (\d+\.\d+)", banner)
    if release is None:
        raise MixerEdgeError("nvcc --version names no release: check the CUDA toolkit's installation")
    return f"nvcc {release.group(1)}"


def _wheel_dir(package: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(f"nvidia.{package}")
    except ImportError:
        return None
    return Path(next(iter(spec.submodule_search_locations))) if spec else None


@contextlib.contextmanager
def _thread_locale_kept():
    """NVRTC 11 switches the calling thread to the C locale (uselocale) and leaves it there, after which
    Python writes text files in ASCII; put the thread's locale back."""
    libc = ctypes.CDLL(None)
    libc.uselocale.restype, libc.uselocale.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    before = libc.uselocale(None)
    try:
        yield
    finally:
        libc.uselocale(before)


class Nvrtc:
    """NVRTC 11.8 from the nvidia-cuda-*-cu11 wheels, through its C API."""

    def __init__(self, library: Path, includes: list[Path]):
        self.lib = ctypes.CDLL(str(library))
        self.includes = includes
        major, minor, count = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
        self.version = f"nvrtc {major.value}.{minor.value}"
        self.lib.nvrtcGetNumSupportedArchs(ctypes.byref(count))
        archs = (ctypes.c_int * count.value)()
        self.lib.nvrtcGetSupportedArchs(archs)
        self.archs = [f"sm_{a}" for a in archs]

    @staticmethod
    @functools.cache
    def find() -> Nvrtc | None:
        dirs = [_wheel_dir(p) for p in ("cuda_nvrtc", "cuda_runtime", "cuda_cccl", "cuda_nvcc")]
        if None in dirs:
            return None
        libraries = sorted((dirs[0] / "lib").glob("libnvrtc.so.*"))
        return Nvrtc(libraries[0], [d / "include" for d in dirs[1:]]) if libraries else None

    def compile(self, source: str, arch: str) -> bytes:
        """`source` as a cubin (arch sm_XX) or PTX (compute_XX); nvcc's defaults (-O3, IEEE math)."""
        options = [f"--gpu-architecture={arch}", "-default-device", "-std=c++17",
                   # NVRTC 11 declares the sm_61 intrinsics (dp4a) but only defines them in this header
                   "--pre-include=sm_61_intrinsics.hpp", *(f"-I{d}" for d in self.includes)]
        with _thread_locale_kept():
            return self._compile(source, arch, options)

    def _compile(self, source: str, arch: str, options: list[str]) -> bytes:
        program = ctypes.c_void_p()
        self._check(self.lib.nvrtcCreateProgram(ctypes.byref(program), source.encode(), b"kernels.cu", 0, None, None))
        try:
            argv = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
            if self.lib.nvrtcCompileProgram(program, len(options), argv) != 0:
                raise MixerEdgeError(f"{self.version} failed for {arch} ({self._log(program)}): report it with the "
                                     "model and target")
            get_size, get = ((self.lib.nvrtcGetCUBINSize, self.lib.nvrtcGetCUBIN) if arch.startswith("sm_") else
                             (self.lib.nvrtcGetPTXSize, self.lib.nvrtcGetPTX))
            size = ctypes.c_size_t()
            self._check(get_size(program, ctypes.byref(size)))
            out = ctypes.create_string_buffer(size.value)
            self._check(get(program, out))
            return out.raw
        finally:
            self.lib.nvrtcDestroyProgram(ctypes.byref(program))

    def fat_binary(self, source: str, preset: TargetPreset) -> bytes:
        """A cubin per arch (and the newest arch's PTX if asked), packed by nvcc's `fatbinary`."""
        images = [("elf", arch, self.compile(source, arch)) for arch in preset.cuda_archs]
        if preset.cuda_ptx:
            newest = preset.cuda_archs[-1][3:]
            images.append(("ptx", f"sm_{newest}", self.compile(source, f"compute_{newest}").rstrip(b"\0")))
        fatbinary = Path(shutil.which("nvcc")).parent / "fatbinary"
        with tempfile.TemporaryDirectory(prefix="mixer-edge-") as tmp:
            argv = [str(fatbinary), f"--create={tmp}/kernels.fatbin"]
            for n, (kind, arch, image) in enumerate(images):
                (Path(tmp) / str(n)).write_bytes(image)
                argv.append(f"--image3=kind={kind},sm={arch[3:]},file={tmp}/{n}")
            done = subprocess.run(argv, capture_output=True, text=True)
            if done.returncode:
                raise MixerEdgeError(f"fatbinary failed for {preset.name} ({reason(RuntimeError(done.stderr))}): "
                                     "check the CUDA toolkit's installation")
            return (Path(tmp) / "kernels.fatbin").read_bytes()

    def _log(self, program) -> str:
        size = ctypes.c_size_t()
        self.lib.nvrtcGetProgramLogSize(program, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        self.lib.nvrtcGetProgramLog(program, log)
        errors = [line for line in log.value.decode(errors="replace").splitlines() if "error" in line]
        return reason(RuntimeError("\n".join(errors or ["no log"])))

    def _check(self, result: int) -> None:
        if result != 0:
            self.lib.nvrtcGetErrorString.restype = ctypes.c_char_p
            raise MixerEdgeError(f"{self.version} failed: {self.lib.nvrtcGetErrorString(result).decode()}: "
                                 f"reinstall the jetson extra ({NVRTC_EXTRA})")


# ---- the launch plan of the cuda-driver backend -----------------------------------------------------------

PLAN_FORMAT = 1  # cuda_plan.json (mixer_edge.cuda_driver.CudaPlan)
_KERNEL = re.compile(r'extern "C" __global__ void(?: __launch_bounds__\(\d+\))? (\w+)\(([^)]*)\)')
_PARAM_TYPES = {"i32": ("int",), "i64": ("int64_t", "long long"), "f32": ("float",)}


def plan(mod, preset: TargetPreset) -> tuple[dict, CudaKernels]:
    """The model's host side as a launch plan (cuda_plan.json) and its kernels compiled into one fat binary: what
    the CUDA driver API alone runs. Each launch is checked against its kernel's signature in the CUDA source."""
    import base64

    import numpy as np
    import tvm

    from . import launch_plan

    lowered, host, device_mod, device_target = launch_plan.lower(mod, preset.tvm_target(), "CUDA")
    source = str(tvm.get_global_func("target.build.cuda")(device_mod, device_target).inspect_source())

    def constant(const, out: int) -> dict:
        array = const.value.numpy()
        data = np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes()
        return {"op": "constant", "out": out, "dtype": str(array.dtype), "shape": list(array.shape),
                "data": base64.b64encode(data).decode("ascii")}

    steps, output = launch_plan.steps(lowered, host, lambda launch: launch, constant, "CUDA")
    check_launches(steps, source)
    kernels = compile_kernels(source, preset)
    return {"format": PLAN_FORMAT, "driver_version_min": kernels.driver_version_min, "steps": steps,
            "output": output}, kernels


def check_launches(steps: list[dict], source: str) -> None:
    """Every kernel a plan launches is defined in the CUDA source and takes the plan's parameters: as many, each a
    pointer where the plan passes a buffer and a scalar of the plan's type elsewhere."""
    signatures = {name: [p.strip() for p in params.split(",") if p.strip()] for name, params in _KERNEL.findall(source)}
    for step in steps:
        for launch in step.get("launches", ()):
            name, params = launch["kernel"], launch["params"]
            declared = signatures.get(name)
            if declared is None:
                raise MixerEdgeError(f"the CUDA plan launches {name}, which TVM's CUDA source does not define: report "
                                     "this model")
            if len(declared) != len(params):
                raise MixerEdgeError(f"the CUDA plan passes {len(params)} parameters to {name}, which takes "
                                     f"{len(declared)}: report this model")
            for (kind, _), decl in zip(params, declared):
                pointer = "*" in decl
                if pointer != (kind == "buffer") or (not pointer and not decl.startswith(_PARAM_TYPES[kind])):
                    raise MixerEdgeError(f"the CUDA plan passes a {kind} to {name}'s parameter `{decl}`: report this "
                                         "model")
