"""`profile` and `compare`: kernels named after the model's layers, timed, and compared with the float ONNX."""

import json

import numpy as np
import pytest

from mixer_edge import layers
from mixer_edge.compiler import compile_model
from mixer_edge.quant import Calibration, calibration_data, layer_sensitivity, quantize_for_build, resolve_recipe

from conftest import assert_one_line_error, built_once, quiet

BROKEN = 'description = "clips activations hard"\nobserver = "percentile"\npercentile = 90.0\n'


@pytest.fixture(scope="module")
def broken_recipe(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipe") / "clip90.toml"
    path.write_text(BROKEN)
    return path


@pytest.fixture(scope="module")
def broken_quantized(digits_source, broken_recipe):
    return quantize_for_build(digits_source, Calibration(recipe=str(broken_recipe)), progress=quiet)


@pytest.fixture(scope="module")
def broken_int8(digits_source, broken_quantized, tmp_path_factory):
    """broken_int8(target): the digits model in int8 with the clipping recipe (built once per target)."""
    return built_once(tmp_path_factory, "broken", lambda target, out: compile_model(
        digits_source, target, out, precision="int8", quantized=broken_quantized, progress=quiet))


@pytest.fixture(scope="module")
def sensitivity(digits_source, broken_recipe):
    """The layers `calibrate --sensitivity` ranks worst under the clipping recipe, worst first."""
    recipe = resolve_recipe(str(broken_recipe))
    x = calibration_data("digits-train", digits_source.preprocess, recipe.samples, recipe.seed, progress=quiet)
    rows = layer_sensitivity(digits_source.onnx_model, x, recipe, progress=quiet)[0]
    return [r["layer"] for r in sorted(rows, key=lambda r: r["sqnr_db"])]


def test_float_kernels_are_named_timed_and_exact(build_artifact, digits_source, digits_test):
    artifact = build_artifact("host")
    p = layers.profile(artifact, digits_source, digits_test[0], repeat=5)
    assert p.matched == len(p.kernels) and not p.emulated
    names = [r.layer for r in p.kernels]
    assert {"stem.proj", "blocks.0.mlp_tokens.fc1", "blocks.3.norm2", "head"} <= set(names)
    assert names[0] == "stem.proj" and names[-1] == "head"
    assert abs(sum(r.share for r in p.kernels) - 1) < 1e-6
    assert p.kernel_sum_ms == pytest.approx(sum(r.ms for r in p.kernels))
    fc1 = next(r for r in p.kernels if r.layer == "blocks.0.mlp_channels.fc1")
    assert fc1.flops >= 2 * 16 * 64 * 256 and fc1.gflops > 0 and not fc1.int8  # 16 tokens x 64 -> 256 channels
    # the VM between kernels costs most of a tiny model's inference: the figures are reported, not asserted
    print(f"digits fp32: kernels {p.kernel_sum_ms:.4f} ms, whole inference {p.inference_ms:.4f} ms")
    c = layers.compare(artifact, digits_source, digits_test[0][:16])
    assert all(r.compared == "float" and r.cosine > 0.9999 for r in c.layers)
    assert c.first_jump is None and c.suggested_float_layers == []


def test_broken_recipe_points_at_the_layers_sensitivity_blames(broken_int8, digits_source, digits_test,
                                                                 sensitivity):
    artifact = broken_int8("host")
    p = layers.profile(artifact, digits_source, digits_test[0], repeat=3)
    assert p.matched >= len(p.kernels) - 3  # the head's padded accumulator and its quantized input
    assert {"stem.proj", "blocks.0.mlp_tokens.fc1", "head"} <= {r.layer for r in p.kernels}
    assert all(r.int8 for r in p.kernels if r.kernel.startswith("int8_dense"))
    c = layers.compare(artifact, digits_source, digits_test[0][:32])
    kinds = {r.compared for r in c.layers}
    assert {"float", "dequantized", "accumulator"} <= kinds
    assert c.first_jump is not None and c.first_jump.startswith("blocks.0.")
    assert len(c.suggested_float_layers) == layers.SUGGESTED
    assert set(c.suggested_float_layers) & set(sensitivity[:layers.SUGGESTED]), (c.suggested_float_layers,
                                                                                 sensitivity)
    fc = next(r for r in c.layers if r.layer == "blocks.0.mlp_tokens.fc1")
    assert fc.scale is not None and fc.range is not None  # the calibration table's entry beside it


@pytest.mark.slow
@pytest.mark.emulation
def test_broken_recipe_on_the_emulated_rpi5(board, broken_int8, digits_source, digits_test, sensitivity):
    artifact = broken_int8("rpi5")
    c = layers.compare(artifact, digits_source, digits_test[0][:16], board="rpi5")
    assert c.emulated and "cortex-a76" in c.where
    assert set(c.suggested_float_layers) & set(sensitivity[:layers.SUGGESTED])
    p = layers.profile(artifact, digits_source, digits_test[0], board="rpi5", repeat=3)
    assert p.emulated and p.matched >= len(p.kernels) - 3


@pytest.mark.slow
@pytest.mark.emulation
def test_profile_and_compare_over_rpc(rpc_board, broken_int8, digits_source, digits_test, sensitivity):
    """A board over TVM RPC (here the emulated one, serving mixer_edge.rpc_server): the artifact is uploaded,
    measured there, and its kernels come back named."""
    artifact = broken_int8("rpi5")
    p = layers.profile(artifact, digits_source, digits_test[0], repeat=3, rpc=rpc_board)
    assert p.where == "rpc:rpi5" and not p.emulated and p.matched >= len(p.kernels) - 3
    assert {"stem.proj", "blocks.0.mlp_tokens.fc1", "head"} <= {r.layer for r in p.kernels}
    c = layers.compare(artifact, digits_source, digits_test[0][:8], rpc=rpc_board)
    assert set(c.suggested_float_layers) & set(sensitivity[:layers.SUGGESTED])


def test_cli_json_and_a_wrong_reference(run_cli, build_artifact):
    artifact = build_artifact("host")
    code, out, err = run_cli("profile", artifact, "--repeat", "2", "--json")
    assert code == 0, err
    record = json.loads(out)
    assert record["kernels"] and record["inference_ms"] > 0
    code, out, err = run_cli("compare", artifact, "--samples", "4")
    assert code == 0, err
    assert "blocks.0.mlp_tokens.fc1" in out and "first jump" in out
    code, out, err = run_cli("compare", artifact, "--model", "mixer_s16")
    assert_one_line_error(code, err, "reference model mixer_s16", "[3, 224, 224]")
    code, out, err = run_cli("profile", artifact, "--board", "rpi5", "--rpc-tracker", "127.0.0.1:9190",
                             "--rpc-key", "rpi5")
    assert_one_line_error(code, err, "--board", "--rpc-tracker", "pass one")


def test_alignment_is_monotone_and_leaves_strangers_out():
    sim = np.array([[0.99, 0.5, -np.inf], [0.98, 0.97, 0.2], [-np.inf, -np.inf, 0.3]])
    assert layers.align(sim) == [0, 1, None]
    assert layers.scope_layer("/blocks/blocks.0/mlp_tokens/fc1/MatMul") == "blocks.0.mlp_tokens.fc1"
    assert layers.scope_layer("Gemm_1") is None


def test_report_chart_shows_the_measured_layers(build_artifact, digits_source, digits_test):
    import re

    from mixer_edge.report import inside, inside_html

    artifact = build_artifact("host")
    p = layers.profile(artifact, digits_source, digits_test[0], repeat=3)
    c = layers.compare(artifact, digits_source, digits_test[0][:8])
    page = inside_html("float32", inside(p, c))
    times = dict(re.findall(r'data-layer="([^"]+)" data-ms="([^"]+)"', page))
    assert {k: float(v) for k, v in times.items()} == pytest.approx({r.layer: r.ms for r in p.layers}, rel=1e-5)
    sqnr = dict(re.findall(r'data-layer="([^"]+)" data-sqnr-db="([^"]+)"', page))
    assert {k: float(v) for k, v in sqnr.items()} == pytest.approx(
        {r.layer: r.sqnr_db for r in c.layers if r.layer in times and r.sqnr_db is not None}, rel=1e-5)  # None: exact
    for r in p.slowest():
        assert f"{r.layer}: {r.ms:.4f} ms" in page
    for r in c.worst():
        assert f"{r.layer}: {r.sqnr_db:.1f} dB" in page
