"""The `cpu` backend: a shared library of the model's kernels and its Relax VM executable, run by TVM's runtime.

`TvmLibrary` is what every backend that ships `model.so` shares (cpu, cuda, tvm-vulkan): the build
(MetaSchedule records where a tuning database has them, weight transforms run once at build time),
the library written with the preset's cross compiler, the ELF and CPU-feature checks, and the
session (the Relax VM with the weights resident on the device).
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import MixerEdgeError, reason
from . import Backend, Session


@dataclass
class Library:
    """A compiled Relax VM executable, and the CUDA fat binary built for its kernels (cuda backend)."""

    executable: object  # tvm.relax.VMExecutable
    kernels: object | None = None  # compiler.cuda.CudaKernels


class TvmSession(Session):
    """The Relax VM's `main` on a TVM device, the weights resident there. Kernels are timed and read in `kernels`:
    `main`, or the function main calls once per pass where it runs its batch in passes (then on one pass)."""

    def __init__(self, library, device, weights: list[np.ndarray], kernels: str = "main"):
        import tvm
        from tvm.runtime.vm import VirtualMachine

        self.device, self.kernels = device, kernels
        self.vm = VirtualMachine(library, device)
        self.weights = [tvm.runtime.tensor(w, device) for w in weights]

    def _on_device(self, x: np.ndarray):
        import tvm

        return tvm.runtime.tensor(np.ascontiguousarray(x, np.float32), self.device)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.vm["main"](self._on_device(x), *self.weights).numpy()

    def timer(self, x: np.ndarray):
        data, main, weights, device = self._on_device(x), self.vm["main"], self.weights, self.device

        def run():
            main(data, *weights)
            device.sync()

        return run

    def device_times(self, x: np.ndarray, number: int, repeat: int) -> list[float]:
        """Seconds per call, `repeat` times the mean of `number` calls, timed where the device is (TVM's
        time_evaluator: over RPC, on the board itself)."""
        evaluate = self.vm.time_evaluator("main", self.device, number=number, repeat=repeat)
        return list(evaluate(self._on_device(x), *self.weights).results)

    def kernel_times(self, x: np.ndarray, repeat: int = 10) -> list[tuple[str, float]]:
        """Each kernel call of `self.kernels` timed on its own (the VM's instrument hook, the device synchronised
        around each call); the median of `repeat` inferences."""
        data, calls, started = self._on_device(x), [], []

        def instrument(func, symbol, before_run, *_):
            self.device.sync()
            if before_run:
                started.append(time.perf_counter())
            elif not symbol.startswith("vm.builtin."):
                calls.append((symbol, time.perf_counter() - started[-1]))
            return 0  # VMInstrumentReturnKind.NO_OP

        self.vm.set_instrument(instrument)
        try:
            for _ in range(repeat):
                self.vm[self.kernels](data, *self.weights)
        finally:
            self.vm.set_instrument(lambda *_: 0)
        per_run = len(calls) // repeat
        return [(calls[i][0], 1e3 * float(np.median([calls[r * per_run + i][1] for r in range(repeat)])))
                for i in range(per_run)]


    def kernel_outputs(self, x: np.ndarray) -> list[tuple[str, np.ndarray]]:
        """The output (a kernel's last argument: TVM kernels write into their last buffer) of each kernel call of
        `self.kernels`, copied off the device by the VM's instrument hook right after the call."""
        outputs = []

        def instrument(func, symbol, before_run, ret_value, *args):
            if not before_run and not symbol.startswith("vm.builtin.") and args and hasattr(args[-1], "numpy"):
                outputs.append((symbol, args[-1].numpy().ravel()))
            return 0

        self.vm.set_instrument(instrument)
        try:
            self.vm[self.kernels](self._on_device(x), *self.weights)
        finally:
            self.vm.set_instrument(lambda *_: 0)
        return outputs


class TvmLibrary(Backend):
    """A model.so for a TVM device (`device_type`), built by TVM's default pipeline for the preset's target."""

    files = ("model.so",)
    device_fields = ("arch", "cpu_features")
    device_type = "cpu"  # TVM's name of the device the library's kernels run on

    def compile(self, mod, params: dict, preset, key, tuning, model: str, progress, passes: int = 1):
        import tvm

        from ..compiler import tuning as tuning_lib
        from ..compiler.build import in_passes, run_transform_params

        database = applied = None
        if self.runs_on_cpu or tuning.wanted or tuning_lib.find_database(key) or tuning_lib.same_target(key):
            mod = tuning_lib.prepare(mod, preset)
            database, applied = tuning_lib.database_for(key, preset, tuning, mod, model, progress)
        if database is not None or self.runs_on_cpu:
            mod = tuning_lib.apply(mod, preset, database)
        mod, params = run_transform_params(mod, params)
        if passes > 1:
            mod = in_passes(mod, passes)
        target = preset.tvm_target()
        with target:
            try:
                executable = tvm.compile(mod, target)
            except Exception as exc:
                raise MixerEdgeError(f"TVM could not compile the model for {preset.name} ({reason(exc, last=True)}): "
                                     "report it with the model and target") from exc
        return Library(executable), params, applied

    def write(self, compiled: Library, stage: Path, preset, progress) -> dict:
        from ..runtime import LIBRARY

        cross = f" with {preset.cross_compiler}" if preset.cross_compiler else ""
        progress(f"writing {LIBRARY}{cross}")
        try:
            if preset.cross_compiler:
                from tvm.support.cc import cross_compiler

                compiled.executable.export_library(str(stage / LIBRARY),
                                                   fcompile=cross_compiler(preset.cross_compiler))
            else:
                compiled.executable.export_library(str(stage / LIBRARY))
        except Exception as exc:
            raise MixerEdgeError(f"linking {LIBRARY} for {preset.name} failed ({reason(exc, last=True)})") from exc
        return {}

    def device_requirements(self, preset) -> dict:
        return {"kind": self.kind, "arch": preset.arch, "cpu_features": preset.cpu_features()}

    def check_device(self, manifest, root: Path) -> None:
        from ..runtime import LIBRARY, library_arch, machine_cpu_features, request_amx_tiles

        req, preset = manifest.target.device, manifest.target.preset
        here = platform.machine()
        built_for = library_arch(root / LIBRARY)
        if built_for != req.arch:
            raise MixerEdgeError(f"{root / LIBRARY} is built for {built_for} but the manifest says {req.arch}: "
                                 "the artifact was edited; rebuild it")
        if req.arch != here:
            raise MixerEdgeError(f"artifact is built for {req.arch} (target {preset}) but this machine is {here}: "
                                 "run it on the device or rebuild with --target host")
        missing = sorted(set(req.cpu_features or ()) - machine_cpu_features())
        if missing:
            raise MixerEdgeError(f"artifact target {preset} needs CPU features this CPU lacks ({', '.join(missing)}): "
                                 "rebuild for this board's preset")
        if "amx_tile" in (req.cpu_features or ()):
            request_amx_tiles()

    def load(self, root: Path, manifest, weights: list[np.ndarray]) -> TvmSession:
        import tvm

        from ..runtime import LIBRARY

        return TvmSession(tvm.runtime.load_module(str(root / LIBRARY)), tvm.device(self.device_type, 0), weights,
                          _kernels(manifest))

    def load_remote(self, root: Path, manifest, weights: list[np.ndarray], board) -> TvmSession:
        from ..runtime import LIBRARY

        board.upload(str(root / LIBRARY))
        return TvmSession(board.load_module(LIBRARY), board.device(self.device_type, 0), weights, _kernels(manifest))

    def describe(self, manifest) -> str:
        device = manifest.target.device
        return f"{device.arch}, needs {', '.join(device.cpu_features or ()) or 'no extensions'}"


def _kernels(manifest) -> str:
    """The VM function whose kernels profile and compare look at: one pass (see compiler.build.in_passes)."""
    from ..compiler.build import ONE_PASS

    return ONE_PASS if manifest.kernel_batch != manifest.input.shape[0] else "main"


class CpuLibrary(TvmLibrary):
    name = kind = "cpu"
    tvm_kind = "llvm"
    runs_on_cpu = runs_in_passes = True
