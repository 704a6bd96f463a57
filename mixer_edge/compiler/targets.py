"""Target presets: `targets/NAME.toml` files (a TVM target dict plus how to build for and find the device).

`--target` takes a preset name, `host` (the best x86 preset this machine runs), a path to a
.toml file of the same form, or a raw TVM target dict as JSON. Every preset is validated here: first
against its schema (`PresetFile`: types, ranges, unknown keys), then by TVM and LLVM, since TVM itself
only logs a warning for an unknown CPU or feature and builds generic code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import sys
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

from .. import backends
from ..errors import MixerEdgeError, reason
from ..formats import Schema, one_of, parse, safe_text
from ..options import seconds
from ..resources import data_dir
from ..runtime import CUDA_ARCH, machine_cpu_features, physical_cores

KINDS = tuple(backends.kinds())  # every preset kind some backend builds
TUNING_DEFAULTS = {"trials_per_task": 64, "time_budget": "15m"}  # a preset's [tune] table overrides these
PRECISIONS = ("float32", "float16", "int8")  # float16: fp16 compute, fp32 accumulation; int8: compiler/int8.py
# LLVM feature name -> the name Linux reports (x86 /proc/cpuinfo flags, arm64 HWCAP names).
# These are the features a build may use that older CPUs of the same ISA lack.
LLVM_TO_LINUX_FEATURE = {
    "avx2": "avx2", "fma": "fma", "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512vl": "avx512vl",
    "avx512dq": "avx512dq", "avx512cd": "avx512cd", "avx512vnni": "avx512_vnni", "avxvnni": "avx_vnni",
    "avx512bf16": "avx512_bf16", "avx512fp16": "avx512_fp16", "amx-tile": "amx_tile", "amx-int8": "amx_int8",
    "amx-bf16": "amx_bf16",
    "neon": "asimd", "fullfp16": "asimdhp", "dotprod": "asimddp", "sve": "sve", "sve2": "sve2",
    "i8mm": "i8mm", "bf16": "bf16",
}


@dataclass(frozen=True)
class TargetPreset:
    name: str
    kind: str
    target: dict
    description: str = ""
    cross_compiler: str | None = None
    cuda_archs: tuple[str, ...] = ()
    cuda_ptx: bool = False
    cuda_runtime: str = "tvm"  # CUDA: "tvm" (model.so, TVM's CUDA runtime) or "driver" (a launch plan, libcuda alone)
    cuda_driver_major: int | None = None  # CUDA: the board's driver's CUDA major version; None: any
    emulator_cpu: str | None = None
    host_candidate: bool = False
    precision: str = "float32"  # the default
    precisions: tuple[str, ...] = ("float32",)  # what the device runs well
    webgpu_target: dict | None = None  # Vulkan presets: the WGSL route when TVM has no Vulkan codegen
    tuning: dict = field(default_factory=lambda: dict(TUNING_DEFAULTS))  # MetaSchedule budget per model
    source: str = ""  # the file it came from, for error messages

    @property
    def cpu_target(self) -> dict:
        """The LLVM target that runs the host side (the whole model, for CPU targets)."""
        return self.target if self.target.get("kind") == "llvm" else self.target.get("host", {"kind": "llvm"})

    @property
    def backend(self):
        """The backend that builds this preset (mixer_edge.backends), given what the installed TVM can do."""
        return backends.for_preset(self)

    @property
    def arch(self) -> str:
        """The device's CPU architecture as `platform.machine()` names it."""
        triple = self.cpu_target.get("mtriple", f"{platform.machine()}-linux-gnu")
        return triple.split("-")[0]

    def resolve_precision(self, precision: str | None) -> str:
        """`precision`, or the preset's default; refused if the target does not build it."""
        precision = precision or self.precision
        if precision not in self.precisions:
            raise MixerEdgeError(f"target {self.name} builds {' or '.join(self.precisions)}, not {precision}: "
                                 "choose another --precision or target")
        return precision

    def tvm_target(self):
        import tvm

        return tvm.target.Target(self.target)

    def cpu_features(self) -> list[str]:
        """Linux names of the ISA extensions the generated code may use."""
        import tvm
        from tvm.target import codegen

        llvm = codegen.llvm_get_cpu_features(tvm.target.Target(self.cpu_target))
        return sorted(LLVM_TO_LINUX_FEATURE[f] for f in llvm if f in LLVM_TO_LINUX_FEATURE)

    def device_requirements(self) -> dict:
        """What the runtime checks before it loads an artifact built for this preset."""
        return self.backend.device_requirements(self)


# ---- the preset file's schema ----------------------------------------------------------------------

def _duration(text: str) -> str:
    """`text` if options.seconds reads it as a positive, finite number of seconds."""
    try:
        seconds(text)
    except ValueError:
        raise PydanticCustomError("duration", "not a positive duration: write e.g. \"90s\", \"10m\" or \"1h30m\"")
    return text


Kind = Annotated[Literal[KINDS], one_of("kind", KINDS)]
Precision = Annotated[Literal[PRECISIONS], one_of("precision", PRECISIONS)]


def _cuda_arch(arch: str) -> str:
    if not re.fullmatch(CUDA_ARCH, arch):
        raise PydanticCustomError("cuda_arch", "CUDA arch {arch} should look like sm_87 (sm_NN, sm_NNa or sm_NNf)",
                                  {"arch": safe_text(repr(arch), 40)})
    return arch


CudaArch = Annotated[str, AfterValidator(_cuda_arch)]
NAME = r"^[A-Za-z0-9_.+-]+$"  # an LLVM CPU or triple name, a QEMU CPU name
ONE_LINE = r"^[^\x00-\x1f\x7f]*$"


class TvmTarget(Schema):
    """A TVM target table ([target], [target.host], [build.webgpu]), handed to `tvm.target.Target` as it is.
    The keys listed here are checked first; any other key is an attribute of the TVM target kind, which TVM
    checks (an unknown attribute or a wrongly typed value is refused)."""

    model_config = ConfigDict(extra="allow")

    kind: str = Field(pattern=r"^[a-z][a-z0-9_-]*$", description="TVM target kind: `llvm` (CPU), `cuda`, `vulkan`; "
                      "`webgpu` in [build.webgpu]")
    mtriple: str | None = Field(None, pattern=NAME, description="LLVM target triple of the CPU, e.g. "
                                "`aarch64-linux-gnu`; absent: this machine's")
    mcpu: str | None = Field(None, pattern=NAME, description="LLVM CPU name, e.g. `cortex-a76` or `skylake-avx512`; "
                             "must be one LLVM knows for the triple")
    mattr: list[Annotated[str, Field(pattern=r"^[+-][A-Za-z0-9_.-]+$")]] | None = Field(
        None, description="LLVM features to add (`+dotprod`) or remove (`-neon`); each added one must be known to LLVM")
    num_cores: int | None = Field(None, alias="num-cores", ge=1, le=1024,
                                  description="CPU cores the generated code's thread pool is sized for")
    arch: str | None = Field(None, description="CUDA: the GPU architecture, e.g. `sm_87` (used when [build] "
                             "has no cuda_archs)")
    host: TvmTarget | None = Field(None, description="GPU targets: the LLVM target of the host CPU (kind `llvm`)")


class BuildTable(Schema):
    """[build]: how mixer-edge builds for the device, beyond the TVM target."""

    cross_compiler: str | None = Field(None, pattern=r"^[A-Za-z0-9_.+/-]+$", description="C++ compiler that links "
                                       "the model library for the device, e.g. `aarch64-linux-gnu-g++`; absent: "
                                       "the library is built for this machine")
    cuda_archs: list[CudaArch] = Field([], max_length=32, description="CUDA: the GPU architectures the fat binary "
                                       "holds code for (`sm_NN`, `sm_NNa`, `sm_NNf`); empty: [target] arch")
    cuda_ptx: bool = Field(False, description="CUDA: also pack PTX of the newest arch, for GPUs newer than all of them")
    cuda_runtime: Literal["tvm", "driver"] = Field("tvm", description="CUDA: what runs the kernels on the device: "
                                                   "`tvm` (model.so through TVM's CUDA runtime, which needs the CUDA "
                                                   "13 runtime) or `driver` (the host side as a launch plan, "
                                                   "cuda_plan.json, run through the CUDA driver API alone: all a "
                                                   "JetPack board has)")
    cuda_driver_major: int | None = Field(None, ge=11, le=99, description="CUDA: the CUDA major version of the "
                                          "board's driver (JetPack 5: 11, JetPack 6: 12); the kernels come from a "
                                          "compiler no newer, whose cubins that driver loads; absent: any")
    webgpu: TvmTarget | None = Field(None, description="Vulkan: the WebGPU target whose WGSL kernels run through "
                                     "wgpu when TVM has no Vulkan code generator")


class DeviceTable(Schema):
    """[device]: the device the build runs on."""

    emulator_cpu: str | None = Field(None, pattern=NAME, description="QEMU CPU model of the emulated board "
                                     "(`mixer-edge emulator`), e.g. `cortex-a76`; absent: not emulated")


class TuneTable(Schema):
    """[tune]: the MetaSchedule budget of `mixer-edge tune` for one model (--trials and --time-budget override it)."""

    trials_per_task: int = Field(TUNING_DEFAULTS["trials_per_task"], ge=1, le=100_000,
                                 description="measured schedules per tuning task")
    time_budget: Annotated[str, AfterValidator(_duration)] = Field(
        TUNING_DEFAULTS["time_budget"], description="wall-clock limit of the tuning (> 0): seconds or a duration "
        "such as `90s`, `10m`, `1h30m`")


class PresetFile(Schema):
    """A target preset (`targets/NAME.toml`, or a .toml given to --target): the TVM target plus how to build for
    and find the device. A JSON --target is the [target] table alone, every other field at its default."""

    description: str = Field("", pattern=ONE_LINE, max_length=300, description="one line for `mixer-edge targets`")
    kind: Kind | None = Field(None, description="what the device is; absent: from [target] kind (llvm: cpu)")
    precision: Precision = Field("float32", description="the default --precision; must be in precisions")
    precisions: list[Precision] = Field(["float32"], min_length=1, max_length=3,
                                        description="the precisions the device runs well (--precision)")
    host_candidate: bool = Field(False, description="x86 presets: `--target host` may pick this one when this "
                                 "machine's CPU has every feature its code uses")
    target: TvmTarget = Field(description="the TVM target")
    build: BuildTable = Field(BuildTable(), description="how to build for the device")
    device: DeviceTable = Field(DeviceTable(), description="the device itself")
    tune: TuneTable = Field(TuneTable(), description="the tuning budget")


TVM_KINDS = {tvm: kind for kind, tvm in backends.kinds().items()}  # [target] kind -> preset kind


def _preset_from_dict(name: str, data: dict, source: str) -> TargetPreset:
    """The preset a parsed TOML document (or {"target": JSON dict}) describes, validated; else MixerEdgeError."""
    if not isinstance(data, dict) or "target" not in data:
        raise MixerEdgeError(f"{source}: missing [target] table: give a TVM target dict, e.g. kind = \"llvm\"")
    doc = parse(PresetFile, data, source, "fix the preset")
    tvm_kind = doc.target.kind
    if doc.kind is None and tvm_kind not in TVM_KINDS:
        raise MixerEdgeError(f"{source}: TVM target kind '{tvm_kind}' is not one mixer-edge builds for: "
                             f"use {', '.join(TVM_KINDS)}")
    kind = doc.kind or TVM_KINDS[tvm_kind]
    preset = TargetPreset(
        name=name, kind=kind, target=data["target"], description=doc.description,
        cross_compiler=doc.build.cross_compiler, cuda_archs=tuple(doc.build.cuda_archs), cuda_ptx=doc.build.cuda_ptx,
        cuda_runtime=doc.build.cuda_runtime, cuda_driver_major=doc.build.cuda_driver_major,
        emulator_cpu=doc.device.emulator_cpu, host_candidate=doc.host_candidate, source=source,
        precision=doc.precision, precisions=tuple(doc.precisions),
        webgpu_target=data.get("build", {}).get("webgpu"),
        tuning={"trials_per_task": doc.tune.trials_per_task, "time_budget": doc.tune.time_budget},
    )
    validate(preset)
    return preset


def validate(preset: TargetPreset) -> None:
    """Refuse what TVM would accept with only a log line: an unknown triple, CPU, feature or CUDA arch.

    TVM's own log lines about the target (an unknown CPU, a CUDA version it cannot detect) are kept off the
    terminal meanwhile: the refusal says it in one line."""
    with _quiet_stderr():
        _validate(preset)


def _validate(preset: TargetPreset) -> None:
    import tvm
    from tvm.target import codegen

    src = preset.source
    if preset.precision not in preset.precisions:
        raise MixerEdgeError(f"{src}: the default precision '{preset.precision}' is not in precisions "
                             f"({', '.join(preset.precisions)}): add it or change precision")
    try:
        tvm.target.Target(preset.target)
    except Exception as exc:
        raise MixerEdgeError(f"{src}: [target] is not a valid TVM target ({reason(exc)}): fix the table") from exc
    if preset.webgpu_target is not None:
        try:
            tvm.target.Target({**preset.webgpu_target, "host": {"kind": "llvm"}})
        except Exception as exc:
            raise MixerEdgeError(f"{src}: [build.webgpu] is not a valid TVM target ({reason(exc)}): "
                                 "fix the table") from exc
    tvm_kind = preset.target["kind"]
    if TVM_KINDS.get(tvm_kind) != preset.kind:
        wanted = next(k for k, v in TVM_KINDS.items() if v == preset.kind)
        raise MixerEdgeError(f"{src}: kind '{preset.kind}' does not match [target] kind '{tvm_kind}': a {preset.kind} "
                             f"preset's target is kind = \"{wanted}\"")
    llvm = preset.cpu_target
    if llvm.get("kind") != "llvm":
        raise MixerEdgeError(f"{src}: [target.host] kind '{llvm.get('kind')}' is not llvm: the host is an LLVM CPU "
                             "target")
    try:
        triple = llvm.get("mtriple") or codegen.llvm_get_system_triple()
        triple_ok = codegen.llvm_is_valid_cpu("generic", triple)  # else TVM crashes when it builds
        cpu_ok = triple_ok and ("mcpu" not in llvm or codegen.llvm_is_valid_cpu(llvm["mcpu"], triple))
        known = codegen.llvm_get_cpu_features(tvm.target.Target(llvm)) if cpu_ok else ()
    except Exception as exc:
        raise MixerEdgeError(f"{src}: LLVM refuses the CPU target {safe_text(json.dumps(llvm), 120)} "
                             f"({reason(exc)}): fix mtriple, mcpu or mattr") from exc
    if not triple_ok:
        raise MixerEdgeError(f"{src}: mtriple '{triple}' is not a target triple LLVM builds for: use e.g. "
                             "aarch64-linux-gnu or x86_64-linux-gnu")
    if not cpu_ok:
        raise MixerEdgeError(f"{src}: mcpu '{llvm['mcpu']}' is not a CPU LLVM knows for {triple}: "
                             "use a name such as cortex-a76 or skylake-avx512")
    for attr in llvm.get("mattr", []):
        if attr.startswith("+") and attr[1:] not in known:
            raise MixerEdgeError(f"{src}: mattr '{attr}' is not a feature LLVM knows for {triple}: fix or remove it")
    preset.backend.validate(preset)


@contextlib.contextmanager
def _quiet_stderr():
    """File descriptor 2 sent to /dev/null meanwhile (TVM's C++ logging writes there directly)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no stderr to quiet
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def list_presets() -> dict[str, TargetPreset]:
    """Every preset shipped in `targets/`, by name."""
    presets = {}
    for path in sorted(data_dir("targets").glob("*.toml")):
        presets[path.stem] = load_preset_file(path)
    return presets


def load_preset_file(path: Path) -> TargetPreset:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise MixerEdgeError(f"target preset {path} could not be read ({safe_text(exc)}): fix the TOML") from exc
    except RecursionError:
        raise MixerEdgeError(f"target preset {path} could not be read (nested too deeply): fix the TOML") from None
    return _preset_from_dict(path.stem, data, str(path))


def resolve_target(spec: str) -> TargetPreset:
    """A preset from a name, `host`, a .toml path or a JSON target dict."""
    spec = spec.strip()
    if spec.startswith("{"):
        try:
            target = json.loads(spec)
        except json.JSONDecodeError as exc:
            raise MixerEdgeError(f"--target JSON is malformed ({exc.msg} at char {exc.pos}): "
                                 "pass e.g. '{\"kind\": \"llvm\", \"mcpu\": \"znver4\"}'") from exc
        except RecursionError:
            raise MixerEdgeError("--target JSON is nested too deeply: pass a TVM target dict such as "
                                 "'{\"kind\": \"llvm\", \"mcpu\": \"znver4\"}'") from None
        if not isinstance(target, dict) or "kind" not in target:
            raise MixerEdgeError("--target JSON must be an object with a \"kind\" (llvm, cuda, vulkan)")
        digest = hashlib.sha256(json.dumps(target, sort_keys=True).encode()).hexdigest()[:8]
        return _preset_from_dict(f"custom-{digest}", {"target": target}, "--target JSON")  # one name per target
    if spec.endswith(".toml"):
        path = Path(spec)
        if not path.is_file():
            raise MixerEdgeError(f"target preset file {path} does not exist")
        return load_preset_file(path)
    presets = list_presets()
    if spec == "host":
        return host_preset(presets)
    if spec not in presets:
        raise MixerEdgeError(f"unknown target '{spec}': choose one of host, {', '.join(presets)} "
                             "(or a .toml file, or a JSON TVM target dict)")
    return presets[spec]


def host_preset(presets: dict[str, TargetPreset]) -> TargetPreset:
    """The host candidate with the most CPU features that this machine has, its thread pool sized for this
    machine's cores (so records tuned for another core count never apply: the target differs)."""
    have = machine_cpu_features()
    runnable = [p for p in presets.values()
                if p.host_candidate and p.arch == platform.machine() and set(p.cpu_features()) <= have]
    if not runnable:
        raise MixerEdgeError(f"no host preset runs on this {platform.machine()} machine: pass --target with a "
                             "JSON target dict such as '{\"kind\": \"llvm\"}'")
    best = max(runnable, key=lambda p: len(p.cpu_features()))
    return replace(best, target={**best.target, "num-cores": physical_cores()})
