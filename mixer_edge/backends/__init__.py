"""One backend per kind of build, and the table that picks it.

A backend is everything mixer-edge does differently for one kind of compiled model, from the
compiler to the device: the toolchain it needs, how it compiles the Relax program, the files it
writes, what the device must have, how the runtime checks that device and loads the files, and
how a loaded model runs and is timed. Everything else (import, precision, int8 lowering, the
manifest, verification, bench, report) is shared and never asks which backend it has.

| backend      | preset kind | artifact files            | runs through                        | module         |
| ------------ | ----------- | ------------------------- | ----------------------------------- | -------------- |
| `cpu`        | cpu         | model.so                  | TVM's runtime (Relax VM), CPU       | native.py      |
| `cuda`       | cuda        | model.so + kernels.fatbin | TVM's runtime, CUDA                 | cuda.py        |
| `cuda-driver`| cuda        | cuda_plan.json +          | the CUDA driver API alone (Jetson:  | cuda_driver.py |
|              |             | kernels.fatbin            | [build] cuda_runtime = "driver")    |                |
| `tvm-vulkan` | vulkan      | model.so                  | TVM's runtime, Vulkan (needs a TVM  | tvm_vulkan.py  |
|              |             |                           | built with its Vulkan codegen)      |                |
| `wgpu`       | vulkan      | program.json              | wgpu (WGSL + launch plan), any GPU  | wgsl.py        |

The compiler side imports TVM's compiler lazily: on a device, `mixer_edge.runtime` imports this
package with only TVM's runtime, numpy and pydantic installed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np

from ..errors import MixerEdgeError


class Session:
    """A model loaded on its device: `session(x)` returns the logits of one batch."""

    device: object  # what it runs on, for messages (a TVM device, or the Vulkan adapter's info)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def timer(self, x: np.ndarray) -> Callable[[], None]:
        """A callable that runs one synchronised inference on batch `x`, which is put on the device once, here."""
        raise NotImplementedError

    def device_times(self, x: np.ndarray, number: int, repeat: int) -> list[float]:
        """Seconds per call on batch `x`, `repeat` times the mean of `number` calls of `timer(x)`."""
        run, times = self.timer(x), []
        for _ in range(repeat):
            start = time.perf_counter()
            for _ in range(number):
                run()
            times.append((time.perf_counter() - start) / number)
        return times

    def kernel_times(self, x: np.ndarray, repeat: int = 10) -> list[tuple[str, float]]:
        """(kernel, median milliseconds) of each kernel launch of one inference on batch `x`, in call order."""
        raise NotImplementedError

    def kernel_outputs(self, x: np.ndarray) -> list[tuple[str, np.ndarray]]:
        """(kernel, what it wrote, flat) for each kernel launch of one inference on batch `x`, in call order: the
        intermediate tensors, the last of them the logits."""
        raise NotImplementedError


class Backend:
    """What one kind of build does. The class attributes are data; the methods, one step each."""

    name: ClassVar[str]  # the table's key, in messages
    kind: ClassVar[str]  # the preset kind (and manifest target.device.kind) it serves
    tvm_kind: ClassVar[str]  # the TVM target kind of such a preset's [target]
    device_backend: ClassVar[str | None] = None  # manifest target.device.backend that names it (None: by kind)
    files: ClassVar[tuple[str, ...]]  # the artifact's model files besides params.npz
    device_fields: ClassVar[tuple[str, ...]] = ()  # the fields of target.device it writes and checks
    section: ClassVar[str | None] = None  # its own manifest section (CudaInfo, VulkanInfo), if any
    runs_on_cpu: ClassVar[bool] = False  # CPU schedules: fast-math GELU, weight layouts prepacked at build time
    runs_in_passes: ClassVar[bool] = False  # a large batch runs in passes of a few images (compiler.build.in_passes)
    int8_dot_product: ClassVar[str | None] = None  # the int8 instruction; None: the CPU's (compiler/int8.py)
    baseline_device: ClassVar[str] = "cpu"  # where PyTorch and onnxruntime run beside it
    pipeline: ClassVar[str] = "tvm default"  # the build, in words (manifest build.pipeline)

    # ---- compiler side ----
    def serves(self, preset) -> bool:
        """Whether this backend builds `preset` (a preset of its kind), with the TVM installed here."""
        return True

    def validate(self, preset) -> None:
        """Refuse a preset this backend cannot build, naming the field (called when the preset is loaded)."""
        cuda_only = {"cuda_runtime": preset.cuda_runtime != "tvm", "cuda_driver_major": preset.cuda_driver_major}
        for field, given in cuda_only.items():
            if given and self.kind != "cuda":
                raise MixerEdgeError(f"{preset.source}: [build] {field} is for CUDA presets, and this one is kind "
                                     f"{self.kind}: remove it")

    def check_toolchain(self, preset) -> None:
        """Refuse, before any work, a preset whose tools are missing here."""

    def check_tunable(self, preset) -> None:
        """Refuse MetaSchedule tuning for `preset` when this backend's kernels are not tuned."""

    def device_requirements(self, preset) -> dict:
        """The manifest's target.device: what the runtime checks before loading the artifact."""
        raise NotImplementedError

    def compile(self, mod, params: dict, preset, key, tuning, model: str, progress, passes: int = 1):
        """(what to write, the weights it takes, the tuning it applied: compiler.tuning.AppliedTuning or None) for
        the Relax program `mod` (its weights `params`, its tuning key `key`); `passes` > 1 (backends that
        run in passes): `mod` takes one pass of images, and what is written that many passes, one after another."""
        raise NotImplementedError

    def write(self, compiled, stage: Path, preset, progress) -> dict:
        """Write the model files into `stage`; returns the manifest sections they need."""
        raise NotImplementedError

    # ---- device side ----
    def check_requirements(self, device, refuse) -> None:
        """Refuse (through formats.refuse) a target.device record this backend could not honour."""

    def check_device(self, manifest, root: Path) -> None:
        """Refuse an artifact this machine cannot run, before any of its code is loaded."""

    def load(self, root: Path, manifest, weights: list[np.ndarray]) -> Session:
        """The artifact's model files loaded on this machine's device, with the weights resident."""
        raise NotImplementedError

    def load_remote(self, root: Path, manifest, weights: list[np.ndarray], board) -> Session:
        """The artifact loaded on a board over TVM RPC (`board`, an RPC session)."""
        raise MixerEdgeError(f"{root} is a {self.name} artifact, which runs only where it is: time it on the device "
                             "with mixer-edge bench there")

    def describe(self, manifest) -> str:
        """What the device must have, in words (for `inspect`)."""
        raise NotImplementedError


def _table() -> tuple[Backend, ...]:
    from .cuda import CudaLibrary
    from .cuda_driver import CudaDriver
    from .native import CpuLibrary
    from .tvm_vulkan import TvmVulkan
    from .wgsl import Wgsl

    return CpuLibrary(), CudaLibrary(), CudaDriver(), TvmVulkan(), Wgsl()


_BACKENDS: list[Backend] = []


def table() -> tuple[Backend, ...]:
    """Every backend, in the order they are tried for a preset."""
    if not _BACKENDS:
        _BACKENDS.extend(_table())
    return tuple(_BACKENDS)


def for_preset(preset) -> Backend:
    """The backend that builds `preset`: the first of its kind that serves it."""
    return next(b for b in table() if b.kind == preset.kind and b.serves(preset))


def for_device(kind: str, device_backend: str | None) -> Backend:
    """The backend an artifact's target.device (kind, backend) names."""
    for backend in table():
        if backend.kind == kind and backend.device_backend == device_backend:
            return backend
    raise MixerEdgeError(f"no backend runs kind {kind!r} with backend {device_backend!r}: rebuild the artifact")


def kinds() -> dict[str, str]:
    """Preset kind -> the TVM target kind of its [target], for every kind a backend serves."""
    return {b.kind: b.tvm_kind for b in table()}


def sections() -> set[str]:
    """Every backend's own manifest section."""
    return {b.section for b in table() if b.section}


def model_files() -> set[str]:
    """Every backend's model files."""
    return {f for b in table() for f in b.files}
