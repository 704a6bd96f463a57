"""The device-side loader: verify an artifact, load it with the TVM runtime, and predict.

Needs only `tvm` (runtime) and numpy: copy this package (or just this file, errors.py and
data.py) to the board. Before anything is loaded, the manifest's format version and its own
digest (any edit shows), the sha256 of every file and the device's CPU/GPU are checked, so a
tampered artifact or one built for another board is refused with one clear line instead of a
crash or an illegal instruction. Nothing in an artifact is unpickled.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import platform
import shutil
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from .data import Preprocess, in_batches
from .errors import MixerEdgeError, reason

FORMAT_VERSION = 2  # 2: the manifest carries its own digest (manifest_sha256)
MANIFEST = "manifest.json"
LIBRARY = "model.so"
PARAMS = "params.npz"
CUDA_KERNELS = "kernels.fatbin"
PROGRAM = "program.json"  # WebGPU route: WGSL kernels + launch plan, run by wgpu (mixer_edge.vulkan)

# arm64 Linux HWCAP bits (uapi/asm/hwcap.h): (auxv entry, bit) per feature name. Read through
# getauxval, which also tells the truth under qemu-user, where /proc/cpuinfo is the host's.
_AT_HWCAP, _AT_HWCAP2 = 16, 26
_ARM64_HWCAPS = {
    "fp": (_AT_HWCAP, 0), "asimd": (_AT_HWCAP, 1), "asimdhp": (_AT_HWCAP, 10), "asimddp": (_AT_HWCAP, 20),
    "sve": (_AT_HWCAP, 22), "sve2": (_AT_HWCAP2, 1), "i8mm": (_AT_HWCAP2, 13), "bf16": (_AT_HWCAP2, 14),
}


def physical_cores() -> int:
    """The CPUs this process may run on, SMT siblings counted once."""
    siblings = set()
    for cpu in os.sched_getaffinity(0):
        try:
            siblings.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip())
        except OSError:
            siblings.add(str(cpu))
    return max(1, len(siblings))


# TVM's thread pool, unless told, takes half the logical CPUs on x86 (it assumes 2-way SMT): one
# thread on a 2-core machine without SMT, which halves the speed of tuned CPU code. Its size is
# fixed when the pool first starts, so this must happen before any TVM code runs.
os.environ.setdefault("TVM_NUM_THREADS", str(physical_cores()))


def machine_cpu_features() -> set[str]:
    """ISA extensions of this CPU, by their Linux names (x86 cpuinfo flags, arm64 HWCAP names)."""
    if platform.machine() == "aarch64":
        getauxval = ctypes.CDLL(None).getauxval
        getauxval.restype = ctypes.c_ulong
        words = {key: getauxval(key) for key in (_AT_HWCAP, _AT_HWCAP2)}
        return {name for name, (key, bit) in _ARM64_HWCAPS.items() if words[key] >> bit & 1}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def manifest_digest(manifest: dict) -> str:
    """The sha256 of a manifest's content (canonical JSON), its own `manifest_sha256` left out."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return sha256_text(json.dumps(body, sort_keys=True, separators=(",", ":")))


# What the loader reads from a manifest: (dotted key, type). A manifest whose digest checks out
# always has them; one forged with a recomputed digest is still refused in one line, not a KeyError.
REQUIRED_FIELDS = [("input.shape", list), ("output.shape", list), ("preprocess", dict), ("labels", list),
                   ("params", list), ("target.device.kind", str)]


def read_manifest(path: str | Path) -> dict:
    """The manifest of artifact directory `path`, after checking its format version, digest and file hashes."""
    root = Path(path)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise MixerEdgeError(f"{root} is not a mixer-edge artifact (no {MANIFEST}): pass the directory `compile` wrote")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MixerEdgeError(f"{manifest_path} is not valid JSON ({exc}): rebuild the artifact") from exc
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise MixerEdgeError(f"{root} has artifact format version {version!r}; this runtime reads version "
                             f"{FORMAT_VERSION}: rebuild it with this mixer-edge")
    if manifest.get("manifest_sha256") != manifest_digest(manifest):
        raise MixerEdgeError(f"{manifest_path} was edited after the build (its manifest_sha256 does not match its "
                             "content): copy the artifact again or rebuild it")
    for key, kind in REQUIRED_FIELDS:
        value = manifest
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if not isinstance(value, kind):
            raise MixerEdgeError(f"{manifest_path} lacks {key} ({kind.__name__}): rebuild the artifact")
    files = manifest.get("files")
    if not isinstance(files, dict) or not ({LIBRARY, PROGRAM} & set(files)) or PARAMS not in files:
        raise MixerEdgeError(f"{manifest_path} lists no files to verify: rebuild the artifact")
    for name, expected in files.items():
        file = root / name
        if Path(name).name != name:
            raise MixerEdgeError(f"{manifest_path} lists {name}, which is not a file inside the artifact: rebuild it")
        if not file.is_file():
            raise MixerEdgeError(f"{root} is missing {name}: copy the whole artifact directory")
        if sha256(file) != expected:
            raise MixerEdgeError(f"{file} does not match its sha256 in the manifest (modified or corrupt): "
                                 "copy the artifact again or rebuild it")
    return manifest


ELF_MACHINES = {62: "x86_64", 183: "aarch64"}  # e_machine of an ELF header


def library_arch(path: Path) -> str:
    """The CPU architecture a shared library was compiled for, read from its ELF header."""
    with open(path, "rb") as f:
        header = f.read(20)
    if header[:4] != b"\x7fELF":
        raise MixerEdgeError(f"{path} is not an ELF shared library: rebuild the artifact")
    machine = int.from_bytes(header[18:20], "little")
    return ELF_MACHINES.get(machine, f"ELF machine {machine}")


def check_device(manifest: dict, root: Path) -> None:
    """Refuse an artifact whose target this machine cannot run, before loading any code."""
    req = manifest["target"]["device"]
    preset = manifest["target"].get("preset", "?")
    if req.get("backend") == "wgpu":  # WGSL and a plan: no native code, any CPU; the Vulkan device is
        return  # chosen (or refused) first thing when the program is created, before anything is uploaded
    here = platform.machine()
    built_for = library_arch(root / LIBRARY)
    if built_for != req.get("arch"):
        raise MixerEdgeError(f"{root / LIBRARY} is built for {built_for} but the manifest says {req['arch']}: "
                             "the artifact was edited; rebuild it")
    if req["arch"] != here:
        raise MixerEdgeError(f"artifact is built for {req['arch']} (target {preset}) but this machine is {here}: "
                             "run it on the device or rebuild with --target host")
    missing = sorted(set(req.get("cpu_features", ())) - machine_cpu_features())
    if missing:
        raise MixerEdgeError(f"artifact target {preset} needs CPU features this CPU lacks ({', '.join(missing)}): "
                             "rebuild for this board's preset")
    if req["kind"] == "cuda":
        import tvm

        _load_cuda_runtime(preset)
        dev = tvm.cuda(0)
        if not dev.exist:
            raise MixerEdgeError(f"artifact target {preset} needs an NVIDIA GPU and CUDA driver; none is present here")
        sm = "sm_" + dev.compute_version.replace(".", "")
        archs = req.get("cuda_archs", [])
        if sm not in archs and not req.get("cuda_ptx"):
            raise MixerEdgeError(f"artifact holds code for {', '.join(archs)} but this GPU is {sm}: "
                                 "rebuild for this GPU's preset")
    elif req["kind"] == "vulkan":  # built by a TVM with its Vulkan code generator: TVM's Vulkan runtime
        import tvm

        if not tvm.vulkan(0).exist:
            raise MixerEdgeError(f"artifact target {preset} needs a Vulkan GPU and a TVM runtime built with Vulkan")
    elif req["kind"] != "cpu":
        raise MixerEdgeError(f"artifact target kind '{req['kind']}' is not runnable by this runtime")


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


class Model:
    """A loaded artifact: `model(x)` returns logits for a float32 NCHW batch of any size."""

    def __init__(self, root: Path, manifest: dict):
        self.root, self.manifest = root, manifest
        self.preprocess = Preprocess.from_dict(manifest["preprocess"])
        self.labels = manifest["labels"]
        self.input_shape = tuple(manifest["input"]["shape"])
        self.output_shape = tuple(manifest["output"]["shape"])
        weights = read_params(root, manifest)
        if manifest["target"]["device"].get("backend") == "wgpu":
            from .vulkan import WgpuProgram

            self.program = WgpuProgram(json.loads((root / PROGRAM).read_text()), weights, self.input_shape)
            self.device = self.program.adapter_info
            self._run = lambda x: self.program(x).reshape(self.output_shape)
        else:
            self._load_tvm(root, manifest, weights)

    def _load_tvm(self, root: Path, manifest: dict, weights: list[np.ndarray]) -> None:
        import tvm
        from tvm.runtime.vm import VirtualMachine

        kind = manifest["target"]["device"]["kind"]
        self.device = {"cuda": tvm.cuda, "vulkan": tvm.vulkan, "cpu": tvm.cpu}[kind](0)
        mismatch = []
        if kind == "cuda":
            _serve_cuda_kernels(root / CUDA_KERNELS, manifest["cuda"]["source_sha256"], mismatch)
        try:
            library = tvm.runtime.load_module(str(root / LIBRARY))
        except Exception as exc:
            if mismatch:  # raised inside TVM's callback, which wraps it: say it plainly
                raise MixerEdgeError(mismatch[0]) from exc
            raise
        self._vm = VirtualMachine(library, self.device)
        self._params = [tvm.runtime.tensor(w, self.device) for w in weights]
        self._run = lambda x: self._vm["main"](tvm.runtime.tensor(x, self.device), *self._params).numpy()

    @property
    def batch(self) -> int:
        return self.input_shape[0]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.shape[1:] != self.input_shape[1:]:
            raise MixerEdgeError(f"input shape {x.shape} does not match the artifact's {self.input_shape}")
        return in_batches(self._run, x, self.batch)  # the artifact has a static batch

    def classify(self, x: np.ndarray) -> np.ndarray:
        return self(x).argmax(axis=1)


def read_params(root: Path, manifest: dict) -> list[np.ndarray]:
    """The weights in params.npz, in the order the manifest lists them; never unpickles anything."""
    try:
        with np.load(root / PARAMS, allow_pickle=False) as npz:
            return [npz[name] for name in manifest["params"]]
    except (ValueError, KeyError, OSError, zipfile.BadZipFile) as exc:
        raise MixerEdgeError(f"{root / PARAMS} does not hold the plain arrays the manifest lists ({reason(exc)}): "
                             "rebuild the artifact") from exc


def _serve_cuda_kernels(fat_binary: Path, source_sha256: str, mismatch: list) -> None:
    """Answer TVM's request to compile the library's CUDA source with the fat binary built for it."""
    import tvm

    binary = fat_binary.read_bytes()

    def precompiled(code, *_):
        if sha256_text(str(code)) != source_sha256:
            mismatch.append(f"{fat_binary} was not built from this library's CUDA source: rebuild the artifact")
            raise MixerEdgeError(mismatch[0])
        return binary

    tvm.register_global_func("tvm_callback_cuda_compile", precompiled, override=True)


def load(path: str | Path) -> Model:
    """Verify and load an artifact directory or .tar (see the module docstring)."""
    with artifact_dir(path) as root:  # Model reads every file it needs while it is built
        manifest = read_manifest(root)
        check_device(manifest, root)
        return Model(root, manifest)


@contextlib.contextmanager
def artifact_dir(path: str | Path):
    """The directory of an artifact: `path` itself, or a .tar unpacked into a temporary directory that is
    deleted when the block ends."""
    root = Path(path)
    if not root.exists():
        raise MixerEdgeError(f"artifact {root} does not exist: pass the directory or .tar that `compile` wrote")
    if not (root.is_file() and root.suffix == ".tar"):
        yield root
        return
    dest = Path(tempfile.mkdtemp(prefix="mixer-edge-"))
    try:
        try:
            with tarfile.open(root) as tar:
                tar.extractall(dest, filter="data")  # regular files and directories inside dest only
        except (tarfile.TarError, OSError) as exc:
            raise MixerEdgeError(f"artifact {root} could not be unpacked ({reason(exc)}): copy the .tar that `compile` "
                                 "wrote again") from exc
        inner = [p for p in dest.iterdir() if p.is_dir()]
        yield inner[0] if len(inner) == 1 and not (dest / MANIFEST).exists() else dest
    finally:
        shutil.rmtree(dest, ignore_errors=True)
