"""What a command asks for, as typed records that refuse a request no build can do, in one line each
(MixerEdgeError), when they are made: before any slow work.

`ModelRequest` names the model. `BuildRequest` names the builds: every target x variant x batch, one
artifact each, named MODEL-TARGET[-fp16|-int8[-mixed][-RECIPE]][-bBATCH]; each int8 variant is
quantized once, for every build of it. `build_all` builds them (compile, bench); `ExportRequest` and
`ReportRequest` are what export and report ask for. The command line only turns its options into these
records, so a library caller meets the same refusals with the same messages.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

from . import compiler, quant
from .compiler import Budget, TargetPreset, Tuning, resolve_target
from .data import StatedPreprocessing
from .errors import MixerEdgeError
from .quant import Calibration, Quantization, resolve_recipe


@dataclass(frozen=True)
class ModelRequest:
    """The model: a preset (with a checkpoint) or a Mixer .onnx file; all None: the bundled digits Mixer."""

    model: str | None = None  # a preset name or an .onnx path
    checkpoint: str | None = None  # timm .pth/.safetensors or official Flax .npz
    num_classes: int | None = None  # the checkpoint's classifier size, where it differs from the preset's
    preprocess: StatedPreprocessing | None = None  # what the user stated (--mean, --preprocessing FILE, ...)

    @property
    def is_onnx(self) -> bool:
        return bool(self.model) and self.model.lower().endswith(".onnx")

    def open(self, batches: tuple[int, ...] = (1,), dynamic_batch: bool = False, progress=print):
        """The model exported to ONNX (an export.ModelSource) at batch 1, or with a symbolic batch (`dynamic_batch`,
        or a batch above 1: one export serves every batch, and CPU builds compile it for a pass of a few images)."""
        from . import export

        return export.open_model(self.model, self.checkpoint, batch=max(batches),
                                 dynamic_batch=dynamic_batch or max(batches) > 1, num_classes=self.num_classes,
                                 progress=progress, preprocess=self.preprocess)


@dataclass(frozen=True)
class ExportRequest:
    """`export`: a preset's model to one ONNX file, at one batch size or a symbolic one."""

    model: ModelRequest = ModelRequest()
    batches: tuple[int, ...] = (1,)
    dynamic_batch: bool = False
    simplify: bool = True  # onnxsim

    def __post_init__(self):
        if self.model.is_onnx:
            raise MixerEdgeError("export takes a preset (and checkpoint), not an ONNX file: it is already exported")
        if len(self.batches) > 1:
            raise MixerEdgeError("export writes one ONNX file: give one --batch, or --dynamic-batch for any")

    def write(self, out: str | Path, progress=print) -> dict:
        """Export to `out`; returns the parity report (export.export_onnx)."""
        from .export import export_onnx

        source = self.model.open(self.batches, self.dynamic_batch, progress)
        return export_onnx(source.torch_model, out, batch=self.batches[0], dynamic_batch=self.dynamic_batch,
                           simplify=self.simplify)


@dataclass(frozen=True)
class Variant:
    """One way to build the model: a precision (None: each target's default) and, for int8, a calibration
    recipe (None: the request's calibration's, else the default) and mixed precision (the most sensitive
    layers kept float within the request's accuracy budget)."""

    precision: str | None = None
    recipe: str | None = None  # a name in calibration/ or a .toml path
    mixed: bool = False

    def __post_init__(self):
        if (self.recipe or self.mixed) and self.precision != "int8":
            raise MixerEdgeError(f"a calibration recipe or int8-mixed goes with int8, not {self.precision}")

    @classmethod
    def parse(cls, text: str) -> Variant:
        """float32, float16, int8[:RECIPE] or int8-mixed[:RECIPE] (report --variants)."""
        kind, _, recipe = text.partition(":")
        if kind in ("float32", "float16") and not recipe:
            return cls(kind)
        if kind in ("int8", "int8-mixed"):
            resolve_recipe(recipe or None)  # an unknown recipe is refused before any slow work
            return cls("int8", recipe or None, kind == "int8-mixed")
        raise MixerEdgeError(f"--variants: '{text}' is not a variant: use float32, float16, int8[:RECIPE] or "
                             "int8-mixed[:RECIPE] (RECIPE: a name in calibration/ or a .toml)")

    @property
    def name(self) -> str:
        """How reports name it: float32, float16, int8:RECIPE or int8-mixed:RECIPE."""
        if self.precision != "int8":
            return str(self.precision)
        return ("int8-mixed" if self.mixed else "int8") + ":" + (Path(self.recipe).stem if self.recipe else "default")

    @property
    def suffix(self) -> str:
        """What it adds to an artifact's name: nothing for float32, -fp16, or -int8[-mixed][-RECIPE]."""
        return ({"float16": "-fp16", "int8": "-int8"}.get(self.precision, "") + ("-mixed" if self.mixed else "")
                + (f"-{Path(self.recipe).stem}" if self.recipe else ""))


@dataclass(frozen=True)
class Build:
    """One artifact: the model built for `preset` in `variant` (its precision resolved) at a static `batch`."""

    preset: TargetPreset
    variant: Variant
    batch: int

    def name(self, model: str) -> str:
        """MODEL-TARGET[-fp16|-int8[-mixed][-RECIPE]][-bBATCH]."""
        return f"{model}-{self.preset.name}{self.variant.suffix}" + (f"-b{self.batch}" if self.batch != 1 else "")


def resolve_targets(targets: tuple[str | TargetPreset, ...]) -> tuple[TargetPreset, ...]:
    """The presets `targets` name (compiler.resolve_target), none twice (`host` is one of the presets)."""
    found = tuple(resolve_target(t) if isinstance(t, str) else t for t in targets)
    names = [preset.name for preset in found]
    repeated = next((name for i, name in enumerate(names) if name in names[:i]), None)
    if repeated is not None:
        raise MixerEdgeError(f"--target names {repeated} twice (host is one of the presets): name each target once")
    return found


def check_tuning(tuning: Tuning) -> None:
    """A tuning budget or RPC boards without tuning is a mistake."""
    if not tuning.tune and (tuning.budget != Budget() or tuning.rpc is not None):
        raise MixerEdgeError("--trials, --time-budget and --rpc-tracker apply to tuning: add --tune")


@dataclass(frozen=True)
class BuildRequest:
    """Every target x variant x batch, one artifact each; checked when made.

    `where_built` (report): each target builds the variants it has, and only a request left with no build is
    refused; otherwise every target must build every variant."""

    targets: tuple[str | TargetPreset, ...] = ("host",)  # presets, or what compiler.resolve_target takes
    variants: tuple[Variant, ...] = (Variant(),)
    batches: tuple[int, ...] = (1,)
    calibration: Calibration | None = None  # int8: its data, samples, and the recipe of variants naming none
    tuning: Tuning = Tuning()
    max_accuracy_drop: float = 0.25  # int8-mixed: the accuracy budget, in percentage points
    where_built: bool = False

    def __post_init__(self):
        if not self.builds:
            raise MixerEdgeError("no target builds any of the variants asked for: see `mixer-edge targets` for each "
                                 "target's precisions")
        check_tuning(self.tuning)
        int8 = any(v.precision == "int8" for v in self.variants) or bool(self.int8_variants)
        if self.calibration is not None and not int8:
            raise MixerEdgeError("--calibration/--calib-data/--calib-samples apply to --precision int8 only")
        for variant in self.int8_variants:
            resolve_recipe(self.calibration_of(variant).recipe)
        if self.tuning.database and len(self.builds) > 1:
            raise MixerEdgeError("--tuning-db holds one model/target/precision/batch: compile one build with it")

    @cached_property
    def presets(self) -> tuple[TargetPreset, ...]:
        return resolve_targets(self.targets)

    @cached_property
    def builds(self) -> tuple[Build, ...]:
        """Every build, target by target, variant by variant, batch by batch."""
        return tuple(Build(preset, replace(variant, precision=precision), batch)
                     for preset in self.presets for variant in self.variants
                     for precision in [self._precision(preset, variant)] if precision for batch in self.batches)

    def _precision(self, preset: TargetPreset, variant: Variant) -> str | None:
        """The precision `preset` builds `variant` in; None: it does not (where_built), else refused."""
        if not self.where_built:
            return preset.resolve_precision(variant.precision)
        precision = variant.precision or preset.precision
        return precision if precision in preset.precisions else None

    @property
    def int8_variants(self) -> list[Variant]:
        """The int8 variants built, each quantized once for all its builds."""
        return sorted({b.variant for b in self.builds if b.variant.precision == "int8"}, key=lambda v: v.name)

    def calibration_of(self, variant: Variant) -> Calibration:
        calibration = self.calibration or Calibration()
        return replace(calibration, recipe=variant.recipe or calibration.recipe)

    def quantize(self, source, variant: Variant, val_data: str | None = None, progress=print) -> Quantization:
        """What every build of int8 `variant` of `source` (an export.ModelSource) compiles. int8-mixed keeps
        layers float until the accuracy drop on `val_data` (default: the model's evaluation data) fits."""
        calibration = self.calibration_of(variant)
        if not variant.mixed:
            return quant.quantize_for_build(source, calibration, progress)
        return Quantization(*quant.calibrate(source, calibration.recipe, calibration.data, calibration.samples,
                                             max_accuracy_drop=self.max_accuracy_drop, val_data=val_data,
                                             progress=progress))


@dataclass(frozen=True)
class Artifact:
    """A build done: where its artifact is, its manifest, and the quantization it compiled (int8)."""

    build: Build
    path: Path
    manifest: dict
    quantization: Quantization | None = None


def build_all(request: BuildRequest, model: ModelRequest, output: str | Path | None = None,
              parent: str | Path = "artifacts", verify: bool = True, keep_unverified: bool = False, inputs=(),
              progress=print):
    """Open `model` and build every artifact of `request`: at `output` when it is one build, else under `output`
    (or `parent`), each by its Build.name. Every path is checked before the first build (`output` before the model
    is opened), none may be one of the command's `inputs`; each int8 variant is quantized once. An artifact that
    fails its verification is written only with `keep_unverified`. Returns (the export.ModelSource, the Artifacts)."""
    from .artifact import check_output

    if keep_unverified and not verify:
        raise MixerEdgeError("--keep-unverified keeps an artifact that failed its verification: drop --no-verify")

    single = output is not None and len(request.builds) == 1
    if single:
        check_output(output, inputs)
    source = model.open(request.batches, progress=progress)
    paths = [Path(output) if single else Path(output or parent) / b.name(source.name) for b in request.builds]
    for path in paths:
        check_output(path, inputs)
    quantized = {v: request.quantize(source, v, progress=progress) for v in request.int8_variants}
    artifacts = []
    for build, path in zip(request.builds, paths):
        quantization = quantized.get(build.variant)
        manifest = compiler.compile_model(source, build.preset, path, batch=build.batch,
                                          precision=build.variant.precision, verify=verify, tuning=request.tuning,
                                          quantized=quantization, keep_unverified=keep_unverified,
                                          progress=progress)
        artifacts.append(Artifact(build, path, manifest, quantization))
    return source, artifacts


def default_variants(targets: tuple[TargetPreset, ...], labelled: bool) -> tuple[Variant, ...]:
    """What report builds unless told: the targets' float precisions, int8 with every shipped recipe, and int8
    mixed precision where the evaluation data is labelled (it measures the accuracy drop); each target builds
    those it has."""
    have = {precision for preset in targets for precision in preset.precisions}
    variants = [Variant(p) for p in ("float32", "float16") if p in have]
    if "int8" in have:
        variants += [Variant("int8", None if name == "default" else name) for name in quant.list_recipes()]
        variants += [Variant("int8", None, True)] if labelled else []
    return tuple(variants)


@dataclass(frozen=True)
class ReportRequest:
    """`report`: every variant on every target at one batch size, run on the evaluation data and timed beside
    the baselines."""

    targets: tuple[str | TargetPreset, ...] = ("host", "rpi5")
    variants: tuple[Variant, ...] | None = None  # None: default_variants
    batches: tuple[int, ...] = (1,)
    calibration: Calibration | None = None  # the int8 variants' calibration data and samples
    tuning: Tuning = Tuning()
    eval_data: str | None = None  # labelled data for accuracy; None: the model's, else random inputs
    max_accuracy_drop: float = 0.25  # int8-mixed, in percentage points
    rounds: int = 20  # interleaved timing rounds
    threads: int | None = None  # CPU threads for every candidate; None: the physical cores
    torch_compile: bool = True  # time torch.compile beside PyTorch eager
    peers: bool | tuple[str, ...] = True  # the installed peers (peers.py) beside them; a tuple: those engines

    def __post_init__(self):
        resolve_targets(self.targets)
        if len(self.batches) != 1:
            raise MixerEdgeError("report times one batch size: give one --batch (bench takes several)")
        check_tuning(self.tuning)

    @property
    def batch(self) -> int:
        return self.batches[0]

    def builds(self, labelled: bool) -> BuildRequest:
        """The builds, for evaluation data that is `labelled` or not."""
        targets = resolve_targets(self.targets)
        variants = self.variants or default_variants(targets, labelled)
        int8 = any(v.precision == "int8" for v in variants)  # without int8 variants the calibration data goes unused
        request = BuildRequest(targets, variants, self.batches, self.calibration if int8 else None, self.tuning,
                               self.max_accuracy_drop, where_built=True)
        if not labelled and any(b.variant.mixed for b in request.builds):
            raise MixerEdgeError("int8-mixed needs labelled evaluation data (--eval-data) to measure the accuracy drop")
        return request
