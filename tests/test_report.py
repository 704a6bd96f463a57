"""`mixer-edge report`: every number in it is checked against the artifacts and baselines themselves."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from conftest import assert_one_line_error, leftovers, quiet
from mixer_edge import layers, peers, runtime
from mixer_edge.bench import Latency
from mixer_edge.compiler import resolve_target, tuning
from mixer_edge.export import run_onnxruntime
from mixer_edge.plan import ReportRequest, Variant
from mixer_edge.report import INSIDE_SAMPLES, Metrics, Row, make_report, pareto_front


def dominated(row, rows, score):
    """Some other row of the device is at least as fast and as accurate, and better in one."""
    t, s = row["latency"]["median_ms"], row[score]
    return any(o is not row and o["device"] == row["device"] and o["latency"]["median_ms"] <= t and o[score] >= s
               and (o["latency"]["median_ms"] < t or o[score] > s) for o in rows if o["latency"])


def test_pareto_marks_exactly_the_undominated_rows_of_each_device():
    def row(device, ms, top1):
        return Row("mixer-edge", "float32", "float32", device, latency=Latency(ms, ms, ms, ms, 1),
                   metrics=Metrics(top1, top1, 1.0, 1.0, None))

    rows = [row("a", 1.0, 0.90), row("a", 2.0, 0.95), row("a", 3.0, 0.94), row("a", 0.5, 0.80),
            row("a", 2.0, 0.95), row("b", 9.0, 0.10), Row("mixer-edge", "int8:default", "int8", "a")]
    # 3.0/0.94 loses to 2.0/0.95; two identical rows are both optimal; device b has its own front; untimed: never
    assert pareto_front(rows, "top1") == [True, True, False, True, True, True, False]
    assert pareto_front(rows, "agreement") == [False, False, False, True, False, True, False]


def test_metrics_of_known_logits():
    ref = np.array([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0]])
    got = np.array([[1.0, 2.0, 0.0], [0.0, 1.0, 3.0]])
    m = Metrics.of(got, ref, np.array([0, 2]))
    assert m.top1 == 0.5 and m.top5 == 1.0 and m.agreement == 0.5
    assert m.sqnr_db == pytest.approx(10 * np.log10(15 / 2))
    assert m.cosine == pytest.approx((0.8 + 1.0) / 2)
    unlabelled = Metrics.of(got, ref, np.array([-1, -1]))
    assert unlabelled.top1 is None and unlabelled.top5 is None and unlabelled.agreement == 0.5
    assert Metrics.of(ref, ref, None).sqnr_db is None  # identical: infinite SQNR


def test_a_row_in_report_json_has_every_field_in_order():
    row = Row("onnxruntime", "int8:default (QDQ)", "int8", latency=Latency(1.0, 2.0, 3.0, 0.5, 10),
              metrics=Metrics(0.9, 1.0, 0.95, 0.999, 30.0))
    assert row.to_json(7, True) == {
        "engine": "onnxruntime", "target": None, "variant": "int8:default (QDQ)", "precision": "int8", "artifact": None,
        "size_bytes": None, "build_s": None, "tune_s": None, "calibrate_s": None, "tuning_db_records": None,
        "float_layers": None, "device": "this machine", "emulated": False,
        "latency": {"median_ms": 1.0, "p90_ms": 2.0, "p99_ms": 3.0, "min_ms": 0.5, "calls": 10},
        "top1": 0.9, "top5": 1.0, "agreement": 0.95, "cosine": 0.999, "sqnr_db": 30.0, "pareto": True, "id": 7}
    assert list(Row("mixer-edge", "float32", "float32", "not run: no GPU").to_json(1, False).values())[11:] == \
        ["not run: no GPU", False, None, None, None, None, None, None, False, 1]


@pytest.fixture(scope="module")
def host_report(digits_source, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "r"
    variants = tuple(Variant.parse(v) for v in ("float32", "int8", "int8:minmax"))
    request = ReportRequest(("host",), variants, rounds=3, torch_compile=False,
                            peers=(peers.OPENVINO, peers.ORT_INT8))  # ExecuTorch's lowering: in test_peers' slow tests
    report = make_report(digits_source, request, out, progress=quiet)
    return out, report


def test_report_rows_are_what_the_artifacts_and_baselines_measure(host_report, digits_source, digits_test,
                                                                  torch_logits):
    out, report = host_report
    assert report == json.loads((out / "report.json").read_text())
    x, y = digits_test
    rows = {(r["engine"], r["variant"]): r for r in report["rows"]}
    peer_rows = {(peers.ORT_INT8, peers.ORT_INT8_VARIANT)} | ({(peers.OPENVINO, "float32"), (
        peers.OPENVINO, "int8:default (QDQ)"), (peers.OPENVINO, "int8:minmax (QDQ)")} if not peers.unavailable("openvino")
        else set())
    assert set(rows) == {("mixer-edge", "float32"), ("mixer-edge", "int8:default"), ("mixer-edge", "int8:minmax"),
                         ("pytorch eager", "float32"), ("onnxruntime", "float32"),
                         ("onnxruntime", "int8:default (QDQ)"), ("onnxruntime", "int8:minmax (QDQ)")} | peer_rows
    for key in peer_rows:  # each peer's logits on the whole evaluation data, checked like the others'
        assert rows[key]["latency"]["calls"] == 15 and rows[key]["agreement"] >= 0.98 and rows[key]["top1"] >= 0.95
    if (peers.OPENVINO, "float32") in rows:
        assert rows[peers.OPENVINO, "float32"]["agreement"] == 1.0
    for variant, suffix in (("float32", ""), ("int8:default", "-int8"), ("int8:minmax", "-int8-minmax")):
        row = rows["mixer-edge", variant]
        assert row["artifact"] == f"artifacts/mixer_digits-{row['target']}{suffix}"  # named as compile names it
        artifact = out / row["artifact"]
        logits = runtime.load(artifact)(x)
        assert row["top1"] == pytest.approx((logits.argmax(1) == y).mean())
        assert row["agreement"] == pytest.approx((logits.argmax(1) == torch_logits.argmax(1)).mean())
        assert row["size_bytes"] == sum(f.stat().st_size for f in artifact.iterdir())
        assert row["latency"]["calls"] == 15 and row["device"] == "this machine" and not row["emulated"]
        assert runtime.read_manifest(artifact)["precision"]["compute"] == row["precision"]
    assert rows["mixer-edge", "float32"]["agreement"] == 1.0
    target = json.dumps(resolve_target(report["rows"][0]["target"]).target, sort_keys=True)
    shipped = [tuning.summary(p)["records"] for p in tuning.shipped_root().iterdir()  # x86-avx512-vnni and x86-amx
               if tuning.read_key(p)["model"] == "mixer_digits" and tuning.TuningKey.stored_at(p).target == target
               and tuning.TuningKey.stored_at(p).precision == "float32"]
    if shipped:  # the report's float32 build applied it
        assert rows["mixer-edge", "float32"]["tuning_db_records"] == shipped[0]
    assert rows["mixer-edge", "int8:default"]["top1"] >= rows["mixer-edge", "float32"]["top1"] - 0.005
    ort = run_onnxruntime(digits_source.onnx_model, x)
    assert rows["onnxruntime", "float32"]["top1"] == pytest.approx((ort.argmax(1) == y).mean())
    assert rows["pytorch eager", "float32"]["top1"] == pytest.approx((torch_logits.argmax(1) == y).mean())
    assert report["score"] == "top1" and report["evaluation"]["samples"] == len(x)
    assert report["threads"] >= 1 and report["versions"]["apache-tvm"] and report["machine"]["physical_cores"] >= 1


def test_report_marks_the_pareto_front_and_writes_it_everywhere(host_report):
    out, report = host_report
    rows = report["rows"]
    marked = [r for r in rows if r["pareto"]]
    assert marked and all(not dominated(r, rows, "top1") for r in marked)
    assert all(dominated(r, rows, "top1") for r in rows if not r["pareto"])
    md = (out / "report.md").read_text()
    table = [line for line in md.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(table) == len(rows)
    assert [line.endswith("| ★ |") for line in table] == [r["pareto"] for r in rows]
    for r, line in zip(rows, table):
        assert f"| {r['latency']['median_ms']:.3f} |" in line and f"| {r['top1']:.2%} |" in line
    for r in (r for r in rows if r["engine"] == "mixer-edge"):  # against the fastest peer, not the slowest
        fastest = min((o for o in rows if o["engine"] != "mixer-edge" and o["precision"] == r["precision"]),
                      key=lambda o: o["latency"]["median_ms"])
        assert (f"- #{r['id']} mixer-edge {r['target']} {r['variant']}: "
                f"{fastest['latency']['median_ms'] / r['latency']['median_ms']:.2f}x the speed of the fastest "
                f"{r['precision']} peer, #{fastest['id']} {fastest['engine']} {fastest['variant']}") in md
    page = (out / "report.html").read_text()
    assert page.count('<tr class="pareto">') == len(marked)
    assert "data:image/png;base64," in page and 'src="http' not in page  # self-contained
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not leftovers(out.parent)


def test_report_looks_inside_every_variant_it_ran(host_report, digits_source, digits_test):
    """Each mixer-edge variant's five slowest layers, five worst-SQNR layers and per-layer chart, in report.json,
    report.md and report.html, are what profile and compare measure on the report's own artifact."""
    out, report = host_report
    page, md = (out / "report.html").read_text(), (out / "report.md").read_text()
    built = [r for r in report["rows"] if r["engine"] == "mixer-edge"]
    assert sorted(report["inside"]) == sorted(f"{r['target']} {r['variant']}" for r in built)
    for row in built:
        section = report["inside"][f"{row['target']} {row['variant']}"]
        names = [r["layer"] for r in section["layers"]]
        assert {"stem.proj", "blocks.0.mlp_tokens.fc1", "head"} <= set(names)
        assert [r["ms"] for r in section["slowest"]] == sorted((r["ms"] for r in section["layers"]), reverse=True)[:5]
        compared = [r["sqnr_db"] for r in section["layers"] if r["sqnr_db"] is not None]
        assert len(section["worst_sqnr"]) == 5 and section["worst_sqnr"][0]["sqnr_db"] <= min(compared)
        if row["precision"] == "int8":  # int8 noise is tens of dB, float rounding over a hundred
            assert section["worst_sqnr"][0]["sqnr_db"] < 60
        else:
            assert section["worst_sqnr"][0]["sqnr_db"] > 100
        again = layers.compare(out / row["artifact"], digits_source, digits_test[0][:INSIDE_SAMPLES])
        assert section["worst_sqnr"] == [{"layer": r.layer, "sqnr_db": r.sqnr_db} for r in again.worst()]
        own = page.split(f"Inside {row['target']} {row['variant']}")[1].split("<h2>")[0]  # this variant's chart
        chart = dict(re.findall(r'data-layer="([^"]+)" data-ms="([^"]+)"', own))
        for r in section["layers"]:
            assert float(chart[r["layer"]]) == pytest.approx(r["ms"], rel=1e-5)
        assert f"## Inside {row['target']} {row['variant']}" in md
        assert f"{section['slowest'][0]['layer']} ({section['slowest'][0]['ms']:.4f} ms" in md


@pytest.mark.slow  # about 90 s: builds, runs and looks inside four variants, two of them under qemu
@pytest.mark.emulation
def test_report_on_host_and_emulated_rpi5_with_torch_compile(digits_source, board, tmp_path):
    variants = tuple(Variant.parse(v) for v in ("float32", "int8"))
    report = make_report(digits_source, ReportRequest(("host", "rpi5"), variants, rounds=2, peers=False), tmp_path / "r",
                         progress=quiet)
    rows = report["rows"]
    board_rows = [r for r in rows if r["target"] == "rpi5"]
    assert [r["variant"] for r in board_rows] == ["float32", "int8:default"]
    assert all(r["emulated"] and r["device"] == "emulated rpi5 (cortex-a76)" and r["latency"]["calls"] == 10
               for r in board_rows)
    host = {r["variant"]: r for r in rows if r["target"] == resolve_target("host").name or r["engine"] != "mixer-edge"}
    assert board_rows[0]["agreement"] == 1.0 and board_rows[1]["top1"] >= 0.98
    assert board_rows[1]["agreement"] == pytest.approx(host["int8:default"]["agreement"], abs=0.01)
    assert any(r["engine"] == "torch.compile" and r["agreement"] == 1.0 for r in rows)
    md = (tmp_path / "r" / "report.md").read_text()
    assert md.count("| emulated rpi5 (cortex-a76) | mixer-edge |") == 2 and "not the board's speed" in md


def test_report_cli_writes_four_files_and_prints_the_table(run_cli, tmp_path):
    code, out, err = run_cli("report", "--target", "host", "--variants", "float32,int8:entropy", "--rounds", "2",
                             "--no-torch-compile", "--no-peers", "-o", tmp_path / "rep")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == \
        ["artifacts", "report.html", "report.json", "report.md", "report.png"]
    assert "| 2 | this machine | mixer-edge | int8:entropy |" in out


@pytest.mark.parametrize("args, fragment", [
    (("--variants", "int9"), "'int9' is not a variant"),
    (("--variants", "int8:nope"), "nope"),
    (("--target", "rpi5", "--variants", "float16"), "no target builds"),
    (("--batch", "1,8"), "one batch size"),
    (("--rounds", "0"), "argument --rounds: takes a whole number from 1"),
    (("--variants", "int8-mixed", "--eval-data", "x.npy"), "int8-mixed needs labelled"),
    (("--tuning-db", "x.npy"), "--tuning-db holds one"),
])
def test_report_refuses_bad_requests_before_any_build(run_cli, tmp_path, args, fragment):
    np.save(tmp_path / "x.npy", np.zeros((4, 1, 8, 8), np.float32))
    code, _, err = run_cli("report", "--target", "host", *[str(tmp_path / a) if a == "x.npy" else a for a in args],
                           "-o", tmp_path / "rep")
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "rep").exists()


def test_report_without_a_board_says_how_to_make_one(run_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("MIXER_EDGE_BOARD", str(tmp_path / "no-board"))
    code, _, err = run_cli("report", "--target", "rpi5", "--variants", "float32", "-o", tmp_path / "rep")
    assert_one_line_error(code, err, "mixer-edge emulator setup")
    assert not (tmp_path / "rep").exists()
