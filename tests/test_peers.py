"""The peers beside mixer-edge (OpenVINO, onnxruntime's own int8, ExecuTorch/XNNPACK): real runs on the digits model."""

from __future__ import annotations

import math
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from mixer_edge import bench, peers
from mixer_edge.compiler import compile_model
from mixer_edge.quant import quantize_for_build

from conftest import quiet

# every peer engine, and whether it is optional (named as missing when its package is absent)
PEER_ENGINES = {peers.OPENVINO: "openvino", peers.ORT_INT8: None, peers.EXECUTORCH: "executorch"}


@pytest.fixture(scope="module")
def quantization(digits_source):
    return quantize_for_build(digits_source, progress=quiet)


FAST = (peers.OPENVINO, peers.ORT_INT8)  # seconds to build; ExecuTorch's lowering takes a minute: slow tests


@pytest.fixture(scope="module")
def int8_path(digits_source, quantization, tmp_path_factory):
    path = tmp_path_factory.mktemp("peers") / "int8"
    compile_model(digits_source, "host", path, precision="int8", quantized=quantization, progress=quiet)
    return path


def bench_with(engines, digits_source, build_artifact, quantization, int8_path):
    """The digits model benched in float32 and int8 on the host beside the peers `engines` (2 rounds), and what
    the run said."""
    said = []
    result = bench.compare(digits_source, [build_artifact("host"), int8_path], rounds=2, threads=2,
                           qdq=quantization.qdq, calibration=quantization, peers=engines, progress=said.append)
    return result, said


@pytest.fixture(scope="module")
def rows(digits_source, build_artifact, quantization, int8_path):
    return bench_with(FAST, digits_source, build_artifact, quantization, int8_path)


@pytest.fixture(scope="module")
def all_rows(digits_source, build_artifact, quantization, int8_path):
    return bench_with(tuple(PEER_ENGINES), digits_source, build_artifact, quantization, int8_path)


def expected(precision: str, engines=tuple(PEER_ENGINES)) -> dict[str, str | None]:
    """The peer engines of `precision` among `engines`, each with why it is missing here (None: installed)."""
    of = [peers.OPENVINO, peers.EXECUTORCH] + ([peers.ORT_INT8] if precision == "int8" else [])
    return {e: PEER_ENGINES[e] and peers.unavailable(PEER_ENGINES[e]) for e in of if e in engines}


@pytest.mark.parametrize("index, precision", [(0, "float32"), (1, "int8")])
def test_each_installed_peer_is_timed_and_agrees_with_pytorch(rows, index, precision):
    check_peers(rows[0][index], precision, FAST)


@pytest.mark.slow
@pytest.mark.parametrize("index, precision", [(0, "float32"), (1, "int8")])
def test_every_peer_with_executorch_is_timed_and_agrees_with_pytorch(all_rows, index, precision):
    check_peers(all_rows[0][index], precision, tuple(PEER_ENGINES))
    check_fastest(all_rows[0])


def check_peers(row, precision, engines):
    assert row.precision == precision
    for engine, missing in expected(precision, engines).items():
        timed = [t for t in row.timings if t.engine == engine]
        if missing:
            assert not timed and any(missing in note for note in row.left_out), row.left_out
            continue
        assert timed, f"{engine} not timed: {row.left_out}"
        for t in timed:
            assert t.precision == precision and math.isfinite(t.latency.median_ms) and t.latency.median_ms > 0
            assert t.latency.calls == 10
            a = t.vs_torch_fp32
            if precision == "float32":
                assert a.top1_agreement == 1.0 and a.max_abs_diff < 1e-4, (t.candidate, a)
            else:  # int8: the same digits, logits a quantization step or so away
                assert a.top1_agreement == 1.0 and a.max_abs_diff < 1.0 and a.min_cosine > 0.99, (t.candidate, a)
    assert not [note for note in row.left_out if "fails on this model" in note], row.left_out


def test_the_ratio_is_against_the_fastest_peer_of_the_same_precision(rows):
    check_fastest(rows[0])


def check_fastest(result):
    text = bench.format_rows(result)
    for row in result:
        others = [t for t in row.timings if t.engine != "mixer-edge" and t.precision == row.precision]
        fastest = row.fastest_peer()
        assert fastest.latency.median_ms == min(t.latency.median_ms for t in others)
        mine = row.timing("mixer-edge").latency.median_ms
        assert row.vs_fastest_peer() == pytest.approx(fastest.latency.median_ms / mine)
        assert f"against the fastest {row.precision} peer, {fastest.candidate}," in text
        assert row.to_json()["fastest_peer"]["candidate"] == fastest.candidate
    int8 = result[1]
    if not any(expected("int8", FAST).values()):  # the peers here: the int8 headline is not onnxruntime's QDQ run
        slowest = max((t for t in int8.timings if t.peer and t.precision == "int8"), key=lambda t: t.latency.median_ms)
        assert int8.fastest_peer().candidate != slowest.candidate


def test_a_missing_peer_is_named_once_and_left_out(rows, digits_source, monkeypatch):
    result, said = rows
    for note in {n for row in result for n in row.left_out}:
        assert said.count(note) == 1  # said once in the run, whichever rows it left
    for module in ("openvino", "executorch"):  # `import openvino` now fails as if it were not installed
        monkeypatch.setitem(sys.modules, module, None)
    message = peers.unavailable("openvino")
    assert message == "openvino not installed: pip install 'mixer-edge[peers]'"
    assert peers.unavailable("mixer_edge_no_such_peer_module").startswith("mixer_edge_no_such_peer_module not installed")
    notes = []
    others = peers.Peers(2, None, notes.append)
    for _ in range(2):
        assert others.float32(digits_source, (1, *digits_source.input.shape[1:])) == []
        assert others.last_left_out == [f"openvino left out: {message}",
                                        "executorch xnnpack left out: executorch not installed: "
                                        "pip install 'mixer-edge[peers]'"]
    assert notes == others.last_left_out  # each said once


def test_onnxruntime_quantizes_as_its_documentation_recommends_for_x86(digits_source, quantization):
    """QOperator (integer operators, no QDQ pairs around the matmuls), uint8 activations, int8 weights per channel,
    calibrated on the inputs mixer-edge calibrated on."""
    calib = peers.calibration_inputs(digits_source, quantization)
    assert calib.shape == (quantization.summary["samples"], *digits_source.input.shape[1:])
    model = peers.ort_quantize(digits_source.onnx_model, calib, progress=quiet)
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert "MatMul" not in ops and "Gemm" not in ops and "Conv" not in ops
    assert {"QGemm", "QLinearConv"} <= set(ops) or {"QLinearMatMul", "QLinearConv"} <= set(ops)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    integer = [n for n in model.graph.node if n.op_type in ("QGemm", "QLinearMatMul", "QLinearConv")]
    assert len(integer) == 18  # every layer the mixer-edge recipe quantizes
    for node in integer:
        x_zero, w, w_scale = node.input[2], node.input[3], node.input[4]
        assert inits[x_zero].dtype == np.uint8  # U8 activations
        assert inits[w].dtype == np.int8  # S8 weights
        assert 1 < inits[w_scale].size in inits[w].shape  # one scale per output channel
    x = calib[:1]
    got = bench.onnxruntime_session(model, 2).run(None, {digits_source.input.name: x})[0]
    import torch

    with torch.no_grad():
        ref = digits_source.torch_model(torch.from_numpy(x)).numpy()
    assert got.argmax(1).tolist() == ref.argmax(1).tolist()


@pytest.mark.slow
def test_bench_cli_times_the_peers_and_names_the_fastest(run_cli, tmp_path):
    """`bench` as a user runs it: the calibration inputs of its own int8 build reach onnxruntime's and ExecuTorch's
    quantizers; the JSON and the table name the fastest peer of each precision."""
    import json

    code, out, err = run_cli("bench", "--precision", "float32,int8", "--rounds", "2", "--no-torch-compile",
                             "--threads", "2", "--json", tmp_path / "b.json")
    assert code == 0, err
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    for row in rows:
        peer_names = [name for name in row["latency"] if not name.startswith("mixer-edge")
                      and not name.startswith("pytorch eager")]
        for engine, missing in expected(row["precision"]).items():
            assert missing or any(name.startswith(engine) for name in peer_names), (engine, row["left_out"])
        for name in peer_names:
            assert row["latency"][name]["vs_torch_fp32"]["top1_agreement"] == 1.0
        fastest = row["fastest_peer"]["candidate"]
        assert fastest in row["latency"] and not fastest.startswith("mixer-edge")
        same = [t["median_ms"] for name, t in row["latency"].items()  # int8 candidates say so in their names
                if not name.startswith("mixer-edge") and (row["precision"] == "int8") == ("int8" in name)]
        assert row["latency"][fastest]["median_ms"] == min(same)
        assert f"against the fastest {row['precision']} peer, {fastest}," in out


def test_a_batch_runs_beside_openvinos_throughput_mode(tmp_path):
    """At batch 4 OpenVINO runs twice: latency mode on the batch, and throughput mode (one image per request, as
    many requests in flight as it picks) timed per whole batch; both agree with PyTorch. Throughput mode needs the
    ONNX's batch symbolic (several batch sizes export it so); a fixed one leaves it out, saying why."""
    from mixer_edge.export import open_model

    fixed = peers.Peers(2, None, quiet, (peers.OPENVINO,))
    assert len(fixed.float32(open_model(batch=4, progress=quiet), (4, 1, 8, 8))) == 1
    assert fixed.left_out == [f"{peers.OPENVINO} float32 throughput mode left out: the ONNX has a fixed batch (bench "
                              "more than one batch size, e.g. --batch 1,8, for an ONNX with a symbolic one)"]
    source = open_model(batch=4, dynamic_batch=True, progress=quiet)
    quantized = quantize_for_build(source, progress=quiet)
    compile_model(source, "host", tmp_path / "b4", batch=4, progress=quiet)
    compile_model(source, "host", tmp_path / "b4-int8", batch=4, precision="int8", quantized=quantized,
                  progress=quiet)
    result = bench.compare(source, [tmp_path / "b4", tmp_path / "b4-int8"], rounds=2, threads=2, qdq=quantized.qdq,
                           calibration=quantized, peers=(peers.OPENVINO,), progress=quiet)
    for row, precision in zip(result, ("float32", "int8")):
        modes = {t.candidate: t for t in row.timings if t.engine == peers.OPENVINO}
        assert len(modes) == 2 and any(name.endswith("throughput mode") for name in modes), list(modes)
        for timing in modes.values():
            assert timing.precision == precision and timing.latency.median_ms > 0
            assert timing.vs_torch_fp32.top1_agreement == 1.0
