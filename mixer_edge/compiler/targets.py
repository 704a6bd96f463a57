"""Target presets: `targets/NAME.toml` files (a TVM target dict plus how to build for and find the device).

`--target` takes a preset name, `host` (the best x86 preset this machine runs), a path to a
.toml file of the same form, or a raw TVM target dict as JSON. Every preset is validated here,
since TVM itself only logs a warning for an unknown CPU or feature and builds generic code.
"""

from __future__ import annotations

import json
import platform
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MixerEdgeError, reason
from ..resources import data_dir
from ..runtime import machine_cpu_features

KINDS = ("cpu", "cuda", "vulkan")
TUNING_DEFAULTS = {"trials_per_task": 64, "time_budget": "15m"}  # a preset's [tune] table overrides these
PRECISIONS = ("float32", "float16", "int8")  # float16: fp16 compute, fp32 accumulation; int8: compiler/int8.py
# LLVM feature name -> the name Linux reports (x86 /proc/cpuinfo flags, arm64 HWCAP names).
# These are the features a build may use that older CPUs of the same ISA lack.
LLVM_TO_LINUX_FEATURE = {
    "avx2": "avx2", "fma": "fma", "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512vl": "avx512vl",
    "avx512dq": "avx512dq", "avx512cd": "avx512cd", "avx512vnni": "avx512_vnni", "avxvnni": "avx_vnni",
    "avx512bf16": "avx512_bf16",
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
        return self.target if self.kind == "cpu" else self.target.get("host", {"kind": "llvm"})

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

    @property
    def uses_wgpu(self) -> bool:
        """True when this Vulkan preset builds WGSL for wgpu, because TVM has no Vulkan code generator."""
        import tvm

        return self.kind == "vulkan" and self.webgpu_target is not None and \
            tvm.get_global_func("target.build.vulkan", allow_missing=True) is None

    def device_requirements(self) -> dict:
        """What the runtime checks before it loads an artifact built for this preset."""
        if self.uses_wgpu:  # no native code at all: any CPU, any Vulkan GPU
            return {"kind": "vulkan", "backend": "wgpu"}
        req = {"kind": self.kind, "arch": self.arch, "cpu_features": self.cpu_features()}
        if self.kind == "cuda":
            req["cuda_archs"] = list(self.cuda_archs)
            req["cuda_ptx"] = self.cuda_ptx
        return req


def _preset_from_dict(name: str, data: dict, source: str) -> TargetPreset:
    if not isinstance(data.get("target"), dict):
        raise MixerEdgeError(f"{source}: missing [target] table: give a TVM target dict, e.g. kind = \"llvm\"")
    tvm_kinds = {"llvm": "cpu", "cuda": "cuda", "vulkan": "vulkan"}
    if "kind" not in data and data["target"].get("kind") not in tvm_kinds:
        raise MixerEdgeError(f"{source}: TVM target kind '{data['target'].get('kind')}' is not one mixer-edge builds "
                             f"for: use {', '.join(tvm_kinds)}")
    kind = data.get("kind") or tvm_kinds[data["target"]["kind"]]
    if kind not in KINDS:
        raise MixerEdgeError(f"{source}: kind '{kind}' is not one of {', '.join(KINDS)}: fix the preset's kind")
    build, device = data.get("build", {}), data.get("device", {})
    preset = TargetPreset(
        name=name, kind=kind, target=data["target"], description=data.get("description", ""),
        cross_compiler=build.get("cross_compiler"), cuda_archs=tuple(build.get("cuda_archs", ())),
        cuda_ptx=bool(build.get("cuda_ptx", False)), emulator_cpu=device.get("emulator_cpu"),
        host_candidate=bool(data.get("host_candidate", False)), source=source,
        precision=data.get("precision", "float32"), precisions=tuple(data.get("precisions", ("float32",))),
        webgpu_target=build.get("webgpu"), tuning={**TUNING_DEFAULTS, **data.get("tune", {})},
    )
    validate(preset)
    return preset


def validate(preset: TargetPreset) -> None:
    """Refuse what TVM would accept with only a log line: an unknown CPU, feature or CUDA arch."""
    import tvm
    from tvm.target import codegen

    src = preset.source
    for precision in (preset.precision, *preset.precisions):
        if precision not in PRECISIONS:
            raise MixerEdgeError(f"{src}: precision '{precision}' is not one of {', '.join(PRECISIONS)}")
    if preset.precision not in preset.precisions:
        raise MixerEdgeError(f"{src}: the default precision '{preset.precision}' is not in precisions")
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
    llvm = preset.cpu_target
    triple = llvm.get("mtriple", codegen.llvm_get_system_triple())
    if "mcpu" in llvm and not codegen.llvm_is_valid_cpu(llvm["mcpu"], triple):
        raise MixerEdgeError(f"{src}: mcpu '{llvm['mcpu']}' is not a CPU LLVM knows for {triple}: "
                             "use a name such as cortex-a76 or skylake-avx512")
    known = codegen.llvm_get_cpu_features(tvm.target.Target(llvm))
    for attr in llvm.get("mattr", []):
        if attr.startswith("+") and attr[1:] not in known:
            raise MixerEdgeError(f"{src}: mattr '{attr}' is not a feature LLVM knows for {triple}: fix or remove it")
    if set(preset.tuning) - set(TUNING_DEFAULTS) or not isinstance(preset.tuning["trials_per_task"], int) \
            or preset.tuning["trials_per_task"] < 1:
        raise MixerEdgeError(f"{src}: [tune] takes trials_per_task (a positive integer) and time_budget (e.g. \"15m\")")
    if preset.kind == "cuda":
        archs = preset.cuda_archs or (preset.target.get("arch"),)
        for arch in archs:
            if not re.fullmatch(r"sm_\d+[af]?", str(arch)):
                raise MixerEdgeError(f"{src}: CUDA arch '{arch}' should look like sm_87")


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
        raise MixerEdgeError(f"target preset {path} could not be read ({exc}): fix the TOML") from exc
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
        if not isinstance(target, dict) or "kind" not in target:
            raise MixerEdgeError("--target JSON must be an object with a \"kind\" (llvm, cuda, vulkan)")
        return _preset_from_dict("custom", {"target": target}, "--target JSON")
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
    """The host candidate with the most CPU features that this machine has."""
    have = machine_cpu_features()
    runnable = [p for p in presets.values()
                if p.host_candidate and p.arch == platform.machine() and set(p.cpu_features()) <= have]
    if not runnable:
        raise MixerEdgeError(f"no host preset runs on this {platform.machine()} machine: pass --target with a "
                             "JSON target dict such as '{\"kind\": \"llvm\"}'")
    return max(runnable, key=lambda p: len(p.cpu_features()))
