"""plan: what compile, bench, tune, export and report ask for, expanded and refused before any slow work
(real presets and recipes; nothing is built)."""

import pytest

from mixer_edge.compiler import Budget, RpcBoard, Tuning, resolve_target
from mixer_edge.errors import MixerEdgeError
from mixer_edge.plan import (BuildRequest, ExportRequest, ModelRequest, ReportRequest, Variant, default_variants,
                             resolve_targets)
from mixer_edge.quant import Calibration, list_recipes


def names(request: BuildRequest, model: str = "m") -> list[str]:
    return [build.name(model) for build in request.builds]


def test_targets_times_precisions_times_batches_one_artifact_each():
    request = BuildRequest(("cuda",), (Variant("float32"), Variant("float16")), (1, 4))
    assert names(request) == ["m-cuda", "m-cuda-b4", "m-cuda-fp16", "m-cuda-fp16-b4"]
    assert [(b.preset.name, b.variant.precision, b.batch) for b in request.builds] == [
        ("cuda", "float32", 1), ("cuda", "float32", 4), ("cuda", "float16", 1), ("cuda", "float16", 4)]


def test_no_precision_is_each_targets_default():
    request = BuildRequest(("h100", "rpi5"))
    assert names(request) == ["m-h100-fp16", "m-rpi5"]


def test_host_and_presets_are_taken_as_names_or_presets():
    host = resolve_target("host")
    assert BuildRequest((host, "rpi4")).presets == (host, resolve_target("rpi4"))
    assert names(BuildRequest(("host",), (Variant("int8"),))) == [f"m-{host.name}-int8"]


def test_every_int8_build_of_a_variant_shares_one_quantization():
    request = BuildRequest(("host", "rpi5"), (Variant("float32"), Variant("int8")), (1, 8),
                           Calibration("minmax", "digits-train", 64))
    assert len(request.builds) == 8 and request.int8_variants == [Variant("int8")]
    assert request.calibration_of(Variant("int8")) == Calibration("minmax", "digits-train", 64)
    assert request.calibration_of(Variant("int8", "entropy")).recipe == "entropy"  # a variant's recipe comes first


def test_variants_name_their_artifacts_and_report_rows():
    assert [(v.name, v.suffix) for v in map(Variant.parse, ("float32", "float16", "int8", "int8:minmax",
                                                             "int8-mixed", "int8-mixed:entropy"))] == [
        ("float32", ""), ("float16", "-fp16"), ("int8:default", "-int8"), ("int8:minmax", "-int8-minmax"),
        ("int8-mixed:default", "-int8-mixed"), ("int8-mixed:entropy", "-int8-mixed-entropy")]


def test_report_builds_each_targets_own_variants():
    request = ReportRequest(("host", "rpi5-vulkan", "android-vulkan"))
    builds = request.builds(labelled=True).builds
    recipes = [f"int8:{name}" for name in list_recipes()]
    host = resolve_target("host").name
    assert [(b.preset.name, b.variant.name) for b in builds] == [
        *[(host, v) for v in ["float32", *recipes, "int8-mixed:default"]], ("rpi5-vulkan", "float32"),
        ("android-vulkan", "float32"), ("android-vulkan", "float16")]
    assert Variant("int8", None, True) not in default_variants(resolve_targets(("host",)), labelled=False)
    asked = ReportRequest(("host", "cuda"), (Variant("float32"), Variant("float16")))
    assert [(b.preset.name, b.variant.name) for b in asked.builds(labelled=False).builds] == [
        (host, "float32"), ("cuda", "float32"), ("cuda", "float16")]  # a target builds what it has


def test_report_calibration_data_is_for_its_int8_variants_only():
    data = Calibration(None, "digits-train", 32)
    assert ReportRequest(("host",), calibration=data).builds(labelled=True).calibration == data
    assert ReportRequest(("rpi5-vulkan",), calibration=data).builds(labelled=True).calibration is None


def test_model_request_knows_an_onnx_file():
    assert ModelRequest("their.ONNX").is_onnx and not ModelRequest("mixer_s16").is_onnx and not ModelRequest().is_onnx


@pytest.mark.parametrize("make, message", [
    (lambda: BuildRequest(("host", "rpi5", "host")), "twice (host is one of the presets)"),
    (lambda: BuildRequest(("rpi6",)), "unknown target 'rpi6'"),
    (lambda: BuildRequest(("rpi5-vulkan",), (Variant("int8"),)), "target rpi5-vulkan builds float32, not int8"),
    (lambda: BuildRequest(calibration=Calibration("minmax")), "apply to --precision int8 only"),
    (lambda: BuildRequest(variants=(Variant("int8"),), calibration=Calibration("nope")), "nope"),
    (lambda: BuildRequest(tuning=Tuning(budget=Budget(trials=5))), "add --tune"),
    (lambda: BuildRequest(tuning=Tuning(rpc=RpcBoard("localhost", 9190, "rpi5"))), "add --tune"),
    (lambda: BuildRequest(batches=(1, 8), tuning=Tuning("db")), "--tuning-db holds one"),
    (lambda: BuildRequest(("rpi5-vulkan",), (Variant("float16"),), where_built=True), "no target builds any"),
    (lambda: Variant("float32", mixed=True), "goes with int8"),
    (lambda: Variant.parse("int9"), "'int9' is not a variant"),
    (lambda: Variant.parse("int8:nope"), "nope"),
    (lambda: ReportRequest(batches=(1, 8)), "report times one batch size"),
    (lambda: ReportRequest(("rpi5", "rpi5")), "names rpi5 twice"),
    (lambda: ReportRequest(tuning=Tuning(budget=Budget(seconds=60))), "add --tune"),
    (lambda: ReportRequest(("host",), (Variant("int8", None, True),)).builds(labelled=False), "int8-mixed needs labelled"),
    (lambda: ReportRequest(("host",), tuning=Tuning("db")).builds(labelled=True), "--tuning-db holds one"),
    (lambda: ExportRequest(ModelRequest("m.onnx")), "not an ONNX file: it is already exported"),
    (lambda: ExportRequest(batches=(1, 8)), "give one --batch, or --dynamic-batch"),
])
def test_a_request_no_build_can_do_is_refused_when_made(make, message):
    with pytest.raises(MixerEdgeError) as refused:
        make()
    assert message in str(refused.value) and "\n" not in str(refused.value)
