"""The device-side loader: verify an artifact, load it with the TVM runtime, and predict.

Needs only `tvm` (runtime), numpy and pydantic: copy this package (or just this file, errors.py,
formats.py and data.py) to the board. Before anything is loaded, the manifest's format version,
its own digest (any edit shows), its schema (`Manifest`: a forgery with a recomputed digest is
refused naming the field), the sha256 of every file and the device's CPU/GPU are checked, so a
tampered artifact or one built for another board is refused with one clear line instead of a
crash or an illegal instruction. Nothing in an artifact is unpickled, and no logits that are not
finite are ever returned.
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
from typing import Annotated, Literal

import numpy as np
from pydantic import Field, model_validator

from .data import Preprocessing, in_batches
from .errors import MixerEdgeError, reason
from .formats import JsonData, Schema, parse, refuse, safe_text

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


# Linux hands a process AMX's tile data state only when it asks (arch_prctl, kernel 5.16 on): tile
# instructions fault (SIGILL) until then. The permission covers every thread of the process.
_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA = 158, 0x1023, 18


def request_amx_tiles() -> None:
    """Ask Linux for AMX tile state for this process (x86-64); refused in one line where it says no."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) != 0:
        raise MixerEdgeError(f"the Linux kernel refused this process AMX tiles "
                             f"({os.strerror(ctypes.get_errno())}; Linux 5.16 or newer grants them): rebuild with "
                             "--target x86-avx512-vnni")


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


# ---- the manifest's schema ------------------------------------------------------------------------
# Checked after the format version and the digest, before any field is used: a manifest forged with a
# recomputed digest is refused in one line naming the field, never a KeyError or a crash in TVM or wgpu.

SHA256 = r"^[0-9a-f]{64}$"
CUDA_ARCH = r"^sm_[1-9][0-9]{1,2}[af]?$"
MAX_DIM = 2**31 - 1  # any tensor dimension: what an int32 index reaches

Dim = Annotated[int, Field(ge=1, le=MAX_DIM)]
Sha256 = Annotated[str, Field(pattern=SHA256)]
CudaArch = Annotated[str, Field(pattern=CUDA_ARCH)]
Fraction = Annotated[float, Field(ge=0, le=1)]




class ModelConfig(Schema):
    """The Mixer's architecture (a `MixerConfig`): what fixes its weights' shapes."""

    img_size: Dim = Field(description="input images are img_size x img_size pixels")
    patch_size: Dim = Field(description="the stem cuts patch_size x patch_size patches")
    in_chans: Dim = Field(description="image channels (1 grey, 3 RGB)")
    num_classes: Dim = Field(description="classifier outputs")
    embed_dim: Dim = Field(description="channels of each patch token")
    depth: Dim = Field(description="mixer blocks")
    mlp_ratio: list[Annotated[float, Field(gt=0)]] = Field(
        min_length=2, max_length=2, description="hidden size of the token-mixing and the channel-mixing MLP, as "
        "multiples of embed_dim")


class ModelInfo(Schema):
    """The model the artifact was compiled from."""

    name: str = Field(description="its preset name, or the ONNX file's name")
    config: ModelConfig | None = Field(description="its architecture; null for a model given as ONNX")
    from_: Literal["torch", "onnx"] = Field(alias="from", description="what the compiler was given: a PyTorch "
                                            "model (then torch is the reference) or an ONNX file (onnxruntime is)")


class InputTensor(Schema):
    """The model's input: one batch of float32 NCHW images, preprocessed (see `preprocess`)."""

    name: str = Field(description="the ONNX graph's input name")
    shape: list[Dim] = Field(min_length=4, max_length=4, description="[batch, channels, height, width]; the batch "
                             "is static: the runtime pads the last chunk of a larger input")
    dtype: Literal["float32"] = Field(description="element type")
    layout: Literal["NCHW"] = Field(description="dimension order")


class OutputTensor(Schema):
    """The model's output: one row of logits per image, one column per class (see `labels`)."""

    name: Literal["logits"] = Field(description="always `logits`")
    shape: list[Dim] = Field(min_length=2, max_length=2, description="[batch, classes]; batch as in input.shape")
    dtype: Literal["float32"] = Field(description="element type")


class DeviceRequirements(Schema):
    """What the runtime checks on the device before it loads any code of the artifact."""

    kind: str = Field(pattern=r"^[a-z0-9_-]+$", description="the processor the model runs on: a preset kind "
                      "(`cpu`, `cuda`, `vulkan`)")
    backend: str | None = Field(None, pattern=r"^[a-z0-9_-]+$", description="the backend that runs it, where the "
                                "kind alone does not say: `wgpu` (WGSL kernels run through wgpu on any Vulkan GPU "
                                "and any CPU: program.json, no native code); absent: TVM's runtime loads model.so")
    arch: str | None = Field(None, pattern=r"^[A-Za-z0-9_]+$", description="the CPU architecture of the device, as "
                             "`uname -m` names it (`x86_64`, `aarch64`): model.so's; for backend cuda-driver the "
                             "board's (its bundle is built for it; the plan has no host code); absent with backend "
                             "wgpu")
    cpu_features: list[Annotated[str, Field(pattern=r"^[a-z0-9_]+$")]] | None = Field(
        None, description="ISA extensions the code uses, by their Linux names (x86 cpuinfo flags, arm64 HWCAP "
        "names); the device's CPU must have all; absent with backend wgpu")
    cuda_archs: list[CudaArch] | None = Field(None, description="kind cuda: the GPU architectures kernels.fatbin "
                                              "holds code for (`sm_NN`)")
    cuda_ptx: bool | None = Field(None, description="kind cuda: kernels.fatbin also holds PTX, which newer GPUs "
                                  "compile at load")

    @model_validator(mode="after")
    def _consistent(self) -> "DeviceRequirements":
        from . import backends

        named = [b for b in backends.table() if b.device_backend == self.backend]
        if not named:
            refuse("backend", "is {backend}, which no backend is: rebuild with this mixer-edge", self.backend,
                   backend=repr(self.backend))
        if self.kind not in backends.kinds():
            refuse("kind", "is {kind}, not one of {kinds}", self.kind, kind=repr(self.kind),
                   kinds=", ".join(backends.kinds()))
        backend = next((b for b in named if b.kind == self.kind), None)
        if backend is None:
            refuse("kind", "is {kind}, but backend {backend} runs on {kinds}", self.kind, kind=repr(self.kind),
                   backend=self.backend, kinds=" or ".join(b.kind for b in named))
        for name in [name for name in type(self).model_fields if name not in ("kind", "backend")]:
            needed, value = name in backend.device_fields, getattr(self, name)
            if needed and value is None:
                refuse(name, "is missing: a {backend} artifact needs it", None, backend=backend.name)
            if value is not None and not needed:
                refuse(name, "is set, but a {backend} artifact has no use for it", value, backend=backend.name)
        backend.check_requirements(self, refuse)
        return self

    @property
    def runner(self):
        """The backend that runs an artifact with these requirements (mixer_edge.backends)."""
        from . import backends

        return backends.for_device(self.kind, self.backend)


class TargetInfo(Schema):
    """The target preset the artifact was built for."""

    preset: str = Field(description="the preset's name (`targets/NAME.toml`, `custom` for a JSON --target)")
    description: str = Field(description="the preset's one-line description")
    tvm: dict[str, JsonData] = Field(description="the TVM target it was compiled with, as TVM takes it")
    device: DeviceRequirements = Field(description="what the device must have")


class PrecisionInfo(Schema):
    """The arithmetic of the compiled model."""

    compute: Literal["float32", "float16", "int8"] = Field(description="the precision of the matmul and "
                                                            "convolution kernels")
    accumulation: Literal["float32", "int32"] = Field(description="the precision of their sums: int32 for int8 "
                                                      "compute, else float32")
    weights: list[str] = Field(min_length=1, description="the element types of the arrays in params.npz")

    @model_validator(mode="after")
    def _accumulation(self) -> "PrecisionInfo":
        expected = "int32" if self.compute == "int8" else "float32"
        if self.accumulation != expected:
            refuse("accumulation", "is {got} but {compute} compute accumulates in {expected}", self.accumulation,
                   got=self.accumulation, compute=self.compute, expected=expected)
        return self


class ExportReport(Schema):
    """How the PyTorch model was exported to ONNX; every field is absent for a model given as ONNX."""

    opset: int | None = Field(None, ge=1, description="the ONNX opset")
    simplified: bool | None = Field(None, description="whether onnxsim simplified the graph")
    dynamic_batch: bool | None = Field(None, description="whether the ONNX batch dimension was left symbolic")
    max_abs_diff_vs_torch: float | None = Field(None, ge=0, description="largest |onnxruntime - torch| logit "
                                                "difference on random inputs")

    @model_validator(mode="after")
    def _all_or_none(self) -> "ExportReport":
        given = [name for name, value in self if value is not None]
        if given and len(given) != len(type(self).model_fields):
            missing = next(name for name, value in self if value is None)
            refuse(missing, "is missing: an export report has every field or none", None)
        return self


class TuningDatabase(Schema):
    """The MetaSchedule tuning database a build applied."""

    graph: Sha256 = Field(description="sha256 of the tuned graph")
    precision: str = Field(description="the precision it was tuned for")
    records: int = Field(ge=0, description="measured schedules it holds")
    workloads: int = Field(ge=0, description="tuning tasks it covers")
    sha256: Sha256 = Field(description="sha256 of its records")


class TuningCoverage(Schema):
    """Which of the build's tuning tasks had a MetaSchedule record, and from where."""

    tasks: int = Field(ge=0, description="the build's tuning tasks (hand-scheduled int8 kernels left out)")
    tuned: int = Field(ge=0, description="tasks with a record, the model's own or another database's")
    transferred: int = Field(ge=0, description="tasks tuned by a record of another database for the same exact target "
                             "(another model, class count or precision), matched by workload")
    untuned: list[str] = Field(description="tasks no record covers: they run on default schedules")
    transferred_from: list[TuningDatabase] = Field(description="the other databases that gave records")


class BuildInfo(Schema):
    """How the artifact was built."""

    seconds: float = Field(ge=0, description="wall-clock time of the build")
    tuning_db: TuningDatabase | None = Field(description="the model's own tuning database applied; null: none "
                                             "(records of other models' databases may still apply: `tuning`)")
    tuning: TuningCoverage | None = Field(None, description="what the tuning records covered; null where the "
                                          "build looked for none (GPU builds without any database)")
    pipeline: str = Field(description="the TVM pipeline, in words")
    images_per_pass: int | None = Field(None, ge=1, description="where `main` runs its batch in passes (CPU builds: "
                                        "each pass's activations stay in cache from layer to layer), the images of "
                                        "one pass, whose kernels profile and compare look at; null: the batch")


class CudaInfo(Schema):
    """CUDA builds: the fat binary of GPU kernels shipped beside model.so."""

    file: Literal["kernels.fatbin"] = Field(description="its file name")
    format: Literal["fatbin"] = Field(description="its format")
    source_sha256: Sha256 = Field(description="sha256 of the CUDA source in model.so it was compiled from: the "
                                  "runtime refuses a fat binary of other kernels")
    archs: list[CudaArch] = Field(description="the GPU architectures it holds code for")
    ptx: bool = Field(description="whether it also holds PTX, for newer GPUs")
    compiler: str = Field(description="what compiled it (nvcc or NVRTC, with its version)")


class VulkanInfo(Schema):
    """Vulkan builds through wgpu: the size of program.json's plan."""

    backend: Literal["wgpu"] = Field(description="always `wgpu`")
    dispatches: Dim = Field(description="kernel launches per inference")
    kernels: Dim = Field(description="distinct WGSL kernels")


class CalibrationRecipe(Schema):
    """An int8 calibration recipe (`calibration/NAME.toml`), as it was applied."""

    name: str = Field(description="its name")
    observer: str = Field(description="how activation ranges were chosen (minmax, percentile, entropy, mse)")
    percentile: float = Field(ge=0, le=100, description="the percentile observer's percentile")
    samples: int = Field(ge=1, description="calibration samples it asks for")
    seed: int = Field(description="seed of the sample draw")
    activations: Literal["symmetric", "affine"] = Field(description="the activation quantization scheme")
    float_layers: list[str] = Field(description="layers (or name prefixes) kept in float")
    int8_ops: list[str] = Field(description="LayerNorm/GELU/residual ops put in int8")
    description: str = Field(description="the recipe in words")


class ActivationRange(Schema):
    """The calibration table's entry for one quantized activation tensor."""

    kind: Literal["activation"] = Field(description="`activation`")
    layers: list[str] = Field(description="the layers that read it")
    scale: float = Field(ge=0, description="quantization scale")
    zero_point: int = Field(ge=-128, le=255, description="quantization zero point")
    observer: str = Field(description="the observer that chose the range")
    range: list[float] = Field(min_length=2, max_length=2, description="[low, high] quantized range")
    observed: list[float] = Field(min_length=2, max_length=2, description="[low, high] seen in calibration")


class WeightRange(Schema):
    """The calibration table's entry for one quantized weight."""

    kind: Literal["weight"] = Field(description="`weight`")
    layers: list[str] = Field(description="the layer it belongs to")
    scheme: str = Field(description="the quantization scheme, e.g. `symmetric per channel`")
    axis: int = Field(ge=0, description="the channel axis of the per-channel scales")
    channels: Dim = Field(description="number of scales")
    scale_min: float = Field(ge=0, description="smallest channel scale")
    scale_max: float = Field(ge=0, description="largest channel scale")
    observer: str = Field(description="how the scales were chosen")
    range: list[float] = Field(min_length=2, max_length=2, description="[min, max] of the float weight")


class QuantEvaluation(Schema):
    """The QDQ model against the float one under onnxruntime, on the model's evaluation data."""

    data: str = Field(description="the evaluation data")
    samples: int = Field(ge=0, description="its size")
    float_accuracy: Fraction = Field(description="top-1 accuracy of the float model")
    int8_accuracy: Fraction = Field(description="top-1 accuracy of the QDQ model")
    top1_agreement: Fraction = Field(description="share of inputs where both pick the same class")
    max_abs_logit_diff: float = Field(ge=0, description="largest |QDQ - float| logit difference")


class MixedPrecision(Schema):
    """int8 with the most sensitive layers kept in float until the accuracy drop fits a budget."""

    validation_data: str = Field(description="the labelled data the accuracy was measured on")
    max_accuracy_drop_points: float = Field(description="the budget, in percentage points")
    float_layers: list[str] = Field(description="the layers kept in float")
    float_accuracy: Fraction = Field(description="accuracy of the float model")
    int8_accuracy: Fraction = Field(description="accuracy of the mixed model")
    drop_points: float = Field(description="the accuracy drop, in percentage points")
    within_budget: bool = Field(description="whether the drop fits the budget")


class LayerSensitivity(Schema):
    """One layer's sensitivity to int8: the logits' SQNR with only that layer quantized."""

    layer: str = Field(description="the layer")
    sqnr_db: float | None = Field(description="signal-to-quantization-noise ratio in dB; null where it is "
                                  "infinite (the layer alone in int8 changes nothing)")


class FloatLayer(Schema):
    """A layer the QDQ model quantized that no integer kernel takes: it runs in float."""

    layer: str = Field(description="the layer (its quantized weight's name, else its operator)")
    reason: str = Field(description="why the integer lowering left it float")


class QuantizationInfo(Schema):
    """int8 builds: what was lowered to integer kernels, how it was calibrated, and the calibration table."""

    layers: Dim = Field(description="matmuls and convolutions lowered to integer kernels")
    float_layers: list[FloatLayer] = Field(default_factory=list, description="quantized layers left in float, "
                                           "with the reason (none where every layer is on integer kernels)")
    dot_product: str = Field(description="the int8 dot-product instruction used (amx, vnni, sdot, dp4a, plain)")
    activations: Literal["int8", "uint8"] = Field(description="the integer type of quantized activations")
    recipe: CalibrationRecipe | str = Field(description="the calibration recipe, or a sentence for a QDQ ONNX "
                                            "compiled as it was given")
    calibration_data: str | None = Field(None, description="the calibration data")
    samples: int | None = Field(None, ge=1, description="calibration samples drawn")
    evaluation: QuantEvaluation | None = Field(None, description="the QDQ model against the float one")
    mixed_precision: MixedPrecision | None = Field(None, description="the float fallback, with --max-accuracy-drop")
    sensitivity: list[LayerSensitivity] | None = Field(None, description="each layer's SQNR alone in int8")
    table: dict[str, Annotated[ActivationRange | WeightRange, Field(discriminator="kind")]] | None = Field(
        description="the calibration table: tensor name -> its quantization; null for a QDQ ONNX given as it was")


class OnnxruntimeQdq(Schema):
    """int8 builds: the artifact against onnxruntime running the same QDQ model."""

    top1_agreement: Fraction = Field(description="share of inputs where both pick the same class")
    max_abs_logit_diff: float = Field(ge=0, description="largest |artifact - onnxruntime| logit difference")


class Verified(Schema):
    """The artifact was loaded back on the build machine and compared with the reference model."""

    status: Literal["verified"] = Field(description="`verified`")
    data: str = Field(description="the inputs: an evaluation data set, or `2 random inputs`")
    samples: Dim = Field(description="how many inputs")
    top1_agreement: Fraction = Field(description="share of inputs where artifact and reference pick the same class")
    max_abs_logit_diff: float = Field(ge=0, description="largest |artifact - reference| logit difference")
    reference: Literal["torch", "onnxruntime"] = Field(description="the reference: the PyTorch model, or "
                                                       "onnxruntime on the ONNX graph")
    accuracy: Fraction | None = Field(None, description="top-1 accuracy of the artifact, where the data has labels")
    reference_accuracy: Fraction | None = Field(None, description="top-1 accuracy of the reference, likewise")
    onnxruntime_qdq: OnnxruntimeQdq | None = Field(None, description="int8 builds: against the QDQ model")


class NotVerified(Schema):
    """The artifact could not run on the build machine (another CPU or GPU), so it was not compared."""

    status: Literal["not run on this machine"] = Field(description="`not run on this machine`")
    reason: str = Field(description="why, as the runtime refused it")


class VerificationFailed(Schema):
    """The artifact failed its verification on the build machine and was written only because --keep-unverified
    asked for it (for a bug report)."""

    status: Literal["failed"] = Field(description="`failed`")
    reason: str = Field(description="what failed: the error it raised, or how far its logits were from the "
                        "reference")


class Manifest(Schema):
    """An artifact's `manifest.json`: what the model is, what it was built for and with, and the sha256 of every
    file. The runtime checks the format version, then the manifest's own digest, then this schema, then every
    file's sha256 and the device, before it loads anything."""

    format_version: Literal[FORMAT_VERSION] = Field(description="the artifact format; a runtime reads only its "
                                                    "own (rebuild older artifacts)")
    created: str = Field(pattern=r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", description="when it was built (ISO 8601, UTC)")
    model: ModelInfo = Field(description="the model it was compiled from")
    input: InputTensor = Field(description="the model's input tensor")
    output: OutputTensor = Field(description="the model's output tensor")
    preprocess: Preprocessing = Field(description="how images become inputs")
    labels: list[str] = Field(description="class names, one per output column (output.shape[1])")
    target: TargetInfo = Field(description="the target it was built for")
    precision: PrecisionInfo = Field(description="the arithmetic of the compiled model")
    params: list[str] = Field(description="the weights' names in params.npz, in the order the model takes them")
    export: ExportReport = Field(description="the PyTorch -> ONNX export; empty for an ONNX model")
    build: BuildInfo = Field(description="how it was built")
    versions: dict[str, str] = Field(description="versions of mixer-edge, Python and the libraries that built it")
    quantization: QuantizationInfo | None = Field(None, description="int8 builds: the quantization")
    vulkan: VulkanInfo | None = Field(None, description="wgpu builds: program.json's plan")
    cuda: CudaInfo | None = Field(None, description="CUDA builds: the fat binary")
    files: dict[str, Sha256] = Field(description="every file of the artifact (plain names, no directories) -> its "
                                     "sha256")
    manifest_sha256: Sha256 = Field(description="sha256 of this manifest's canonical JSON without this field: any "
                                    "edit shows")
    verification: Annotated[Verified | NotVerified | VerificationFailed, Field(discriminator="status")] | None = \
        Field(None, description="the check against the reference on the build machine; absent with --no-verify")

    @property
    def kernel_batch(self) -> int:
        """The batch of one kernel launch: the images of one pass (build.images_per_pass), else the input's."""
        return self.build.images_per_pass or self.input.shape[0]

    @model_validator(mode="after")
    def _consistent(self) -> "Manifest":
        batch, channels, *size = self.input.shape
        if self.output.shape[0] != batch:
            refuse("output.shape", "has batch {got} but input.shape has {batch}", self.output.shape,
                   got=self.output.shape[0], batch=batch)
        classes = self.output.shape[1]
        if len(self.labels) != classes:
            refuse("labels", "has {n} labels but output.shape[1] says {classes} classes: one label per class",
                   self.labels, n=len(self.labels), classes=classes)
        if self.preprocess.channels != channels:
            refuse("preprocess.channels", "is {got} but input.shape[1] is {channels}", self.preprocess.channels,
                   got=self.preprocess.channels, channels=channels)
        if self.preprocess.size != size:
            refuse("preprocess.size", "is {got} but input.shape[2:] is {size}", self.preprocess.size,
                   got=self.preprocess.size, size=size)
        config = self.model.config
        if config is not None and (config.num_classes, config.in_chans, [config.img_size] * 2) != (classes, channels,
                                                                                                 size):
            refuse("model.config", "({classes} classes, {chans} channels, {img}x{img} images) does not match "
                   "input.shape and output.shape", config.model_dump(), classes=config.num_classes,
                   chans=config.in_chans, img=config.img_size)
        if len(set(self.params)) != len(self.params):
            refuse("params", "lists a weight twice", self.params)
        from . import backends

        backend = self.target.device.runner
        per_pass = self.build.images_per_pass
        if per_pass is not None and per_pass != batch and (batch % per_pass or not backend.runs_in_passes):
            refuse("build.images_per_pass", "is {got}, which {why}", per_pass, got=per_pass,
                   why=f"does not divide the batch {batch}" if batch % per_pass else
                   f"the {backend.name} backend cannot do: it runs its batch in one pass")
        for name in sorted(backends.sections() | {"quantization"}):
            needed = self.precision.compute == "int8" if name == "quantization" else name == backend.section
            when = "precision.compute is int8" if name == "quantization" else f"the backend is {backend.name}"
            section = getattr(self, name)
            if needed and section is None:
                refuse(name, "is missing, but {when}", None, when=when)
            if section is not None and not needed:
                refuse(name, "is there, but belongs to other builds than this one ({when})", section.model_dump(),
                       when=when)
        expected = {PARAMS, *backend.files}
        model_files = set(self.files) & (backends.model_files() | {PARAMS})
        if model_files != expected:
            refuse("files", "lists {got} of the model's files, but this build has {expected}", sorted(self.files),
                   got=", ".join(sorted(model_files)) or "none", expected=", ".join(sorted(expected)))
        return self


def describe(m: Manifest, artifact: str | Path) -> list[str]:
    """The manifest in words, one line per topic (`mixer-edge inspect`). Every field comes from the artifact:
    control characters are escaped, so a line prints as itself."""
    device, check = m.target.device, m.verification
    lines = [f"artifact   {artifact} (format {m.format_version}, files verified by sha256)",
             f"model      {m.model.name} (from {m.model.from_}), input {m.input.name} {m.input.shape} "
             f"{m.input.dtype}, {len(m.labels)} classes",
             f"target     {m.target.preset}: {m.target.description}",
             f"device     {device.runner.describe(m)}",
             f"precision  {m.precision.compute} compute, {m.precision.accumulation} accumulation, weights "
             f"{'/'.join(m.precision.weights)}; batch {m.input.shape[0]}" +
             (f" in passes of {m.kernel_batch}" if m.kernel_batch != m.input.shape[0] else ""),
             f"preprocess {m.preprocess.to_preprocess().describe()}, to {m.preprocess.size[0]}x{m.preprocess.size[1]}"
             + (" (assumed: nobody stated it)" if m.preprocess.assumed else "")]
    if m.quantization:
        q = m.quantization
        recipe = q.recipe if isinstance(q.recipe, str) else q.recipe.name
        lines.append(f"int8       {q.layers} layers on {q.dot_product} kernels ({q.activations} activations); "
                     f"recipe {recipe}" + (f", {q.samples} samples of {q.calibration_data}" if q.samples is not None
                                           else ""))
        lines += [f"float      {f.layer}: {f.reason}" for f in q.float_layers]
    lines.append(f"built      {m.created} in {m.build.seconds}s with TVM {m.versions.get('apache-tvm')}")
    if m.build.tuning:
        t = m.build.tuning
        lines.append(f"tuning     {t.tuned} of {t.tasks} tasks tuned ({t.transferred} by other databases' records "
                     f"of this target)" + (f"; untuned: {', '.join(t.untuned)}" if t.untuned else ""))
    if check is not None and check.status == "verified":
        lines.append(f"verified   on {check.data}: top-1 agreement {check.top1_agreement:.2%}, max |logit diff| "
                     f"{check.max_abs_logit_diff:.1e}" + (f"; accuracy {check.accuracy:.2%}" if check.accuracy
                                                          is not None else "")
                     + (f" (reference {check.reference_accuracy:.2%})" if check.reference_accuracy is not None
                        else ""))
    if check is not None and check.status != "verified":
        lines.append(f"verified   no: {check.status} ({check.reason})")
    lines += [f"file       {name}  sha256 {digest[:16]}..." for name, digest in m.files.items()]
    return [safe_text(line, 2000) for line in lines]


def read_manifest(path: str | Path) -> dict:
    """The manifest of artifact directory `path` as written, after every check of `verified_manifest`."""
    return verified_manifest(path)[0]


def verified_manifest(path: str | Path) -> tuple[dict, Manifest]:
    """The manifest of artifact directory `path`, as written and as a validated `Manifest`, after checking its
    format version, its digest, its schema and the sha256 of every file it lists."""
    root = Path(path)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise MixerEdgeError(f"{root} is not a mixer-edge artifact (no {MANIFEST}): pass the directory `compile` wrote")
    try:
        manifest = json.loads(manifest_path.read_text())
        digest = manifest_digest(manifest) if isinstance(manifest, dict) else None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise MixerEdgeError(f"{manifest_path} is not valid JSON ({safe_text(str(exc), 120)}): rebuild the "
                             "artifact") from None
    except OSError as exc:
        raise MixerEdgeError(f"{manifest_path} could not be read ({reason(exc)}): copy the artifact again") from exc
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise MixerEdgeError(f"{root} has artifact format version {safe_text(repr(version), 40)}; this runtime reads "
                             f"version {FORMAT_VERSION}: rebuild it with this mixer-edge")
    if manifest.get("manifest_sha256") != digest:
        raise MixerEdgeError(f"{manifest_path} was edited after the build (its manifest_sha256 does not match its "
                             "content): copy the artifact again or rebuild it")
    record = parse(Manifest, manifest, str(manifest_path), "rebuild the artifact")
    for name, expected in record.files.items():
        if Path(name).name != name or name in ("", ".", "..") or not name.isprintable():
            raise MixerEdgeError(f"{manifest_path} lists {safe_text(name, 80)}, which is not a file inside the "
                                 "artifact: rebuild it")
        file = root / name
        if not file.is_file():
            raise MixerEdgeError(f"{root} is missing {name}: copy the whole artifact directory")
        if sha256(file) != expected:
            raise MixerEdgeError(f"{file} does not match its sha256 in the manifest (modified or corrupt): "
                                 "copy the artifact again or rebuild it")
    return manifest, record


ELF_MACHINES = {62: "x86_64", 183: "aarch64"}  # e_machine of an ELF header


def library_arch(path: Path) -> str:
    """The CPU architecture a shared library was compiled for, read from its ELF header."""
    with open(path, "rb") as f:
        header = f.read(20)
    if header[:4] != b"\x7fELF":
        raise MixerEdgeError(f"{path} is not an ELF shared library: rebuild the artifact")
    machine = int.from_bytes(header[18:20], "little")
    return ELF_MACHINES.get(machine, f"ELF machine {machine}")


def check_device(manifest: Manifest, root: Path) -> None:
    """Refuse an artifact whose target this machine cannot run, before loading any code (its backend checks)."""
    manifest.target.device.runner.check_device(manifest, root)


class Model:
    """A loaded artifact: `model(x)` returns logits for a float32 NCHW batch of any size.

    `record` is the validated manifest (a `Manifest`), `manifest` the same as written (a dict); `session` is the
    backend's (mixer_edge.backends.Session), which runs one batch on the device."""

    def __init__(self, root: Path, record: Manifest, manifest: dict | None = None, board=None):
        self.root, self.record = root, record
        self.manifest = manifest if manifest is not None else record.model_dump(mode="json", by_alias=True,
                                                                                exclude_none=True)
        self.preprocess = record.preprocess.to_preprocess()
        self.labels = list(record.labels)
        self.input_shape = tuple(record.input.shape)
        self.output_shape = tuple(record.output.shape)
        self.backend = record.target.device.runner
        weights = read_params(root, record)
        self.session = self.backend.load(root, record, weights) if board is None else \
            self.backend.load_remote(root, record, weights, board)
        self.device = self.session.device

    @property
    def batch(self) -> int:
        return self.input_shape[0]

    @property
    def kernel_batch(self) -> int:
        return self.record.kernel_batch

    @property
    def baseline_device(self) -> str:
        """Where PyTorch and onnxruntime run beside this artifact: "cuda" or "cpu"."""
        return self.backend.baseline_device

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.shape[1:] != self.input_shape[1:]:
            raise MixerEdgeError(f"input shape {x.shape} does not match the artifact's {self.input_shape}")
        logits = in_batches(self.session, x, self.batch)  # the artifact has a static batch
        if not np.isfinite(logits).all():  # a result that is not finite is never returned
            raise MixerEdgeError(f"the artifact {self.root} computed NaN or Inf logits on these inputs: its weights "
                                 "are not finite or it overflows; rebuild it from a finite checkpoint")
        return logits

    def classify(self, x: np.ndarray) -> np.ndarray:
        return self(x).argmax(axis=1)

    def _batch(self, x: np.ndarray, size: int | None = None) -> np.ndarray:
        """The first `size` (default: the artifact's batch) inputs of `x`, which must hold them."""
        shape = (size or self.batch, *self.input_shape[1:])
        x = np.ascontiguousarray(x[: shape[0]], dtype=np.float32)
        if x.shape != shape:
            raise MixerEdgeError(f"input shape {x.shape} is not one batch of the artifact's {shape}")
        return x

    def timer(self, x: np.ndarray):
        """A zero-argument callable running one synchronised inference on `x[:batch]`, which is put on the device
        once, here, beside the weights (a wgpu artifact: the whole call, upload and read-back included)."""
        return self.session.timer(self._batch(x))

    def device_times(self, x: np.ndarray, number: int, repeat: int) -> list[float]:
        """Seconds per call on `x[:batch]`, `repeat` times the mean of `number` calls, timed by TVM where the device
        is (over RPC: on the board)."""
        return self.session.device_times(self._batch(x), number, repeat)

    def kernel_times(self, x: np.ndarray, repeat: int = 10) -> list[tuple[str, float]]:
        """(kernel, median ms) of each kernel launch of one inference on `x[:kernel_batch]`, in the order they run."""
        return self.session.kernel_times(self._batch(x, self.kernel_batch), repeat)

    def kernel_outputs(self, x: np.ndarray) -> list[tuple[str, np.ndarray]]:
        """(kernel, its output, flat) of each kernel launch of one inference on `x[:kernel_batch]`, in the order
        they run: the compiled model's intermediate tensors, the last of them the logits."""
        return self.session.kernel_outputs(self._batch(x, self.kernel_batch))


def read_params(root: Path, manifest: Manifest | dict) -> list[np.ndarray]:
    """The weights in params.npz, in the order the manifest lists them; never unpickles anything.

    Refused: an array that is missing or not numeric. (NaN can be legitimate here: TVM's prepacked weight
    layouts have padding lanes that are never read; the logits are checked instead, see Model.__call__.)"""
    names = manifest.params if isinstance(manifest, Manifest) else manifest["params"]
    try:
        with np.load(root / PARAMS, allow_pickle=False) as npz:
            weights = [npz[name] for name in names]
    except (ValueError, KeyError, OSError, zipfile.BadZipFile) as exc:
        raise MixerEdgeError(f"{root / PARAMS} does not hold the plain arrays the manifest lists ({reason(exc)}): "
                             "rebuild the artifact") from exc
    for name, weight in zip(names, weights):
        if weight.dtype.kind not in "biuf":
            raise MixerEdgeError(f"{root / PARAMS}: array '{safe_text(name, 80)}' is {weight.dtype}, not a number "
                                 "array: rebuild the artifact")
    return weights


def load(path: str | Path) -> Model:
    """Verify and load an artifact directory or .tar (see the module docstring)."""
    with artifact_dir(path) as root:  # Model reads every file it needs while it is built
        manifest, record = verified_manifest(root)
        check_device(record, root)
        return Model(root, record, manifest)


def load_remote(root: str | Path, board) -> Model:
    """Verify artifact directory `root` here and load it on a board over TVM RPC (`board`: a tvm.rpc session):
    its library is uploaded, its weights copied to the board's device. Refused for backends that run only
    where they are (wgpu)."""
    root = Path(root)
    manifest, record = verified_manifest(root)
    return Model(root, record, manifest, board=board)


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
