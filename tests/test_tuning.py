"""MetaSchedule tuning: databases keyed by graph/target/precision, resume after SIGKILL, merging,
and measurement over TVM RPC on the emulated aarch64 board."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import agreement, assert_one_line_error, quiet
from mixer_edge import bench, emulator, runtime
from mixer_edge.compiler import Budget, Tuning, compile_model, resolve_target, tune_model
from mixer_edge.compiler import dense, tuning
from mixer_edge.errors import MixerEdgeError

HOST_TRIALS = 30  # two per task: enough to exercise every path, not to be fast


def fake_database(path: Path, target: str, records: list[list], workloads: int = 2) -> Path:
    """A database directory with TVM's line format, for tests of the file handling alone."""
    path.mkdir(parents=True)
    key = {"graph": "0" * 64, "target": target, "precision": "float32", "model": "m"}
    (path / tuning.KEY).write_text(json.dumps(key))
    (path / tuning.WORKLOADS).write_text("".join(json.dumps([str(i), f"mod{i}"]) + "\n" for i in range(workloads)))
    (path / tuning.RECORDS).write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def record(workload: int, secs: float, trace: str = "t") -> list:
    return [workload, [[trace, []], [secs], {"kind": "llvm"}, []]]


def lines(path: Path) -> list:
    return [json.loads(ln) for ln in (path / tuning.RECORDS).read_text().splitlines()]


def test_time_budgets_parse():
    assert tuning.parse_duration("90s") == 90
    assert tuning.parse_duration("10m") == 600
    assert tuning.parse_duration("1h30m") == 5400
    assert tuning.parse_duration("45") == 45
    with pytest.raises(MixerEdgeError, match="--time-budget: takes a duration such as 90s, 10m or 1h30m, not '10 minutes'"):
        tuning.parse_duration("10 minutes")


def test_a_torn_last_line_is_dropped_and_every_complete_record_kept(tmp_path):
    db = fake_database(tmp_path / "db", "host", [record(0, 1.0), record(1, 2.0)])
    with open(db / tuning.RECORDS, "a") as f:
        f.write('[1, [["half a rec')  # what SIGKILL mid-append leaves
    assert tuning.summary(db)["records"] == 2
    assert lines(db) == [record(0, 1.0), record(1, 2.0)]
    assert not [p for p in db.iterdir() if p.name.startswith(".")]


def test_merge_combines_and_the_best_record_wins(tmp_path):
    a = fake_database(tmp_path / "a", "host", [record(0, 3.0, "slow"), record(1, 1.0)])
    b = fake_database(tmp_path / "b", "host", [record(0, 2.0, "fast"), record(1, 1.0)])
    merged = tuning.merge([a, b], tmp_path / "all")
    assert merged["records"] == 3  # the duplicate counted once
    best = tuning.merge([a, b], tmp_path / "best", best_only=True)
    assert best["records"] == 2
    assert record(0, 2.0, "fast") in lines(tmp_path / "best")


def test_merge_refuses_databases_of_different_targets(tmp_path, run_cli):
    a = fake_database(tmp_path / "a", "host", [record(0, 1.0)])
    b = fake_database(tmp_path / "b", "rpi5", [record(0, 1.0)])
    code, _, err = run_cli("tuning-db", "merge", a, b, "-o", tmp_path / "out")
    assert_one_line_error(code, err, "different keys", "rpi5")
    assert not (tmp_path / "out").exists()


def test_a_database_for_another_target_is_refused(tmp_path, run_cli):
    host = json.dumps(resolve_target("host").target, sort_keys=True)
    db = fake_database(tmp_path / "host-db", host, [record(0, 1.0)])
    code, _, err = run_cli("compile", "--target", "x86-avx2", "--tuning-db", db, "-o", tmp_path / "a")
    assert_one_line_error(code, err, str(db), "another target", "haswell")
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("args, fragments", [
    (["compile", "--trials", "5"], ["add --tune"]),
    (["tune", "--rpc-tracker", "localhost", "--rpc-key", "k"], ["HOST:PORT"]),
    (["tune", "--rpc-tracker", "127.0.0.1:9190"], ["--rpc-key"]),
    (["tune", "--time-budget", "soon"], ["argument --time-budget: takes a duration such as 90s", "not 'soon'"]),
    (["tune", "--trials", "0"], ["--trials"]),
    (["tune", "--target", "rpi5"], ["rpi5", "--rpc-tracker"]),
    (["tune", "--target", "android-vulkan"], ["android-vulkan", "does not tune"]),
    (["tune", "--target", "cuda"], ["cuda", "has none", "--rpc-tracker"]),
    (["tune", "--target", "host,rpi5"], ["one target"]),
])
def test_bad_tuning_arguments(run_cli, args, fragments):
    assert_one_line_error(*run_cli(*args)[::2], *fragments)


@pytest.fixture(scope="module")
def host_db(digits_source, tmp_path_factory):
    """The digits model tuned for the host, a few trials per task."""
    path = tmp_path_factory.mktemp("tuning") / "host"
    tune_model(digits_source, "host", tuning=Tuning(path, tune=True, budget=Budget(trials=HOST_TRIALS)),
               progress=quiet)
    return path


@pytest.mark.slow
def test_tuning_writes_records_and_compile_applies_them(host_db, digits_source, digits_test, torch_logits, tmp_path):
    info = tuning.summary(host_db)
    assert info["target"] == json.dumps(resolve_target("host").target, sort_keys=True)
    manifest = compile_model(digits_source, "host", tmp_path / "a", tuning=Tuning(host_db), progress=quiet)
    assert manifest["build"]["tuning_db"]["sha256"] == info["sha256"]
    used = manifest["build"]["tuning"]  # every task the build has (hand-scheduled kernels aside) got a record
    assert used["tasks"] >= 3 and used["untuned"] == [] and info["workloads"] >= used["tasks"]
    assert info["records"] >= info["workloads"]
    assert "MetaSchedule" in manifest["build"]["pipeline"]
    logits = runtime.load(tmp_path / "a")(digits_test[0])
    assert agreement(logits, torch_logits) == 1.0


@pytest.mark.slow
def test_databases_are_found_only_for_their_own_target(host_db, digits_source, tmp_path, monkeypatch):
    from mixer_edge.compiler.build import import_onnx

    monkeypatch.setenv("MIXER_EDGE_CACHE", str(tmp_path))
    mod, _ = import_onnx(digits_source.onnx_model, 1)
    host_key = tuning.graph_key(mod, resolve_target("host"), "float32")
    avx2_key = tuning.graph_key(mod, resolve_target("x86-avx2"), "float32")
    (tuning.cache_root()).mkdir(parents=True)
    tuning.merge([host_db], tuning.cache_root() / host_key.digest)
    assert tuning.find_database(host_key) == tuning.cache_root() / host_key.digest
    assert tuning.find_database(avx2_key) is None
    manifest = compile_model(digits_source, "x86-avx2", tmp_path / "avx2", verify=False, progress=quiet)
    assert manifest["build"]["tuning_db"] is None
    manifest = compile_model(digits_source, "host", tmp_path / "host", verify=False, progress=quiet)
    assert manifest["build"]["tuning_db"]["records"] == tuning.summary(host_db)["records"]


@pytest.mark.slow
def test_a_killed_tuning_run_resumes_without_losing_records(tmp_path):
    db = tmp_path / "db"
    cmd = [sys.executable, "-m", "mixer_edge.cli", "tune", "--tuning-db", str(db), "--trials", "2000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if (db / tuning.RECORDS).exists() and len((db / tuning.RECORDS).read_text().splitlines()) >= 8:
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.stderr.read().decode()
    os.killpg(proc.pid, signal.SIGKILL)  # the builder and runner workers too
    proc.wait()
    with open(db / tuning.RECORDS, "a") as f:
        f.write('[3, [["torn')  # as if the kill had landed mid-line
    before = [json.loads(ln) for ln in (db / tuning.RECORDS).read_text().splitlines()[:-1]]
    resumed = subprocess.run([*cmd[:-1], str(len(before) + 16)], capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    after = lines(db)  # every line parses
    for rec in before:
        assert rec in after
    assert len(after) > len(before)


@pytest.mark.slow
def test_a_spent_time_budget_ends_every_task_cleanly(run_cli, tmp_path):
    code, _, err = run_cli("tune", "--tuning-db", tmp_path / "db", "--time-budget", "1s")
    assert code == 0, err
    assert "tuning done in" in err
    lines(tmp_path / "db")  # what did land parses


@pytest.mark.slow
@pytest.mark.emulation
def test_tuning_over_rpc_on_the_emulated_board(rpc_board, board, digits_source, digits_test, torch_logits, tmp_path):
    db = tmp_path / "rpi5-db"
    info = tune_model(digits_source, "rpi5", tuning=Tuning(db, tune=True, budget=Budget(trials=20), rpc=rpc_board),
                      progress=quiet)
    assert info["records"] >= 5
    assert json.loads(info["target"])["mcpu"] == "cortex-a76"
    compile_model(digits_source, "rpi5", tmp_path / "a", tuning=Tuning(db), verify=False, progress=quiet)
    logits = emulator.run_artifact(tmp_path / "a", digits_test[0], "cortex-a76")
    assert agreement(logits, torch_logits) == 1.0
    # the same board times the artifact for bench: outputs come back from it, latency from time_evaluator
    row = bench.compare(digits_source, [tmp_path / "a"], rounds=3, rpc=rpc_board, progress=quiet)[0]
    assert row.device == "rpc:rpi5" and row.vs_torch_fp32.top1_agreement == 1.0
    assert row.vs_torch_fp32.max_abs_diff < 1e-4
    timing = row.timing("mixer-edge")
    assert timing.candidate == "mixer-edge float32 on rpi5"
    assert timing.latency.calls == 15 and 0 < timing.latency.min_ms <= timing.latency.median_ms
    assert "| mixer-edge float32 on rpi5 |" in bench.format_rows([row])


def test_default_schedules_are_measured_records_that_rebuild_the_same_kernels(digits_source, tmp_path):
    """Tuning measures each task's default schedule (cpu_schedules) as a record of its own, so a tuned schedule
    applies only where it beats the default; where the default record wins, its trace replays to the very
    kernel a build without records has."""
    import tvm
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    from mixer_edge.compiler.build import relax_program

    preset = resolve_target("host")
    mod, _, key, _ = relax_program(digits_source.onnx_model, preset, 1, "float32")
    prepared, target = tuning.prepare(mod, preset), preset.tvm_target()
    tasks = [t for t in ms.relax_integration.extract_tasks(prepared, target) if not tuning._scheduled(t.mod)]
    tuning.create_database(tmp_path / "db", key, "mixer_digits")
    database = tuning.open_database(tmp_path / "db", key)
    said = []
    tuning._commit_default_schedules(tasks, target, ms.builder.LocalBuilder(f_build=tuning._build_for_measure),
                                     ms.runner.LocalRunner(), database, said.append)
    assert said == [f"measuring the default schedules of {len(tasks)} tasks"]
    records = lines(tmp_path / "db")
    assert len(tasks) >= 3 and sorted(r[0] for r in records) == list(range(len(tasks)))  # one per task
    assert all(0 < secs < 1 for r in records for secs in r[1][1])
    replayed = tuning.apply(prepared, preset, tuning.open_database(tmp_path / "db", key))
    default = tuning.apply(prepared, preset, None)
    kernels = [gv.name_hint for gv, f in default.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(kernels) > len(tasks)
    assert all(tvm_ffi.structural_equal(replayed[name].body, default[name].body) for name in kernels)


def needs_shipped_database(model: str, precision: str) -> None:
    """Skip unless mixer-edge ships a database of `model` in `precision` for this machine's host target."""
    target = json.dumps(resolve_target("host").target, sort_keys=True)
    keys = [tuning.read_key(p) for p in tuning.shipped_root().iterdir() if (p / tuning.KEY).exists()]
    if not any(k["model"] == model and k["precision"] == precision and k["target"] == target for k in keys):
        pytest.skip(f"mixer-edge ships no {model} {precision} database for this CPU's host target ({target})")


def test_the_shipped_mixer_s16_database_applies_without_tuning(tmp_path):
    """The README's tuned Mixer-S/16 host figure is reproducible from the database in the package."""
    from mixer_edge.export import open_model

    needs_shipped_database("mixer_s16", "float32")
    source = open_model("mixer_s16", progress=quiet)
    manifest = compile_model(source, "host", tmp_path / "s16", progress=quiet)
    used = manifest["build"]["tuning_db"]
    shipped = [tuning.summary(p) for p in tuning.shipped_root().iterdir() if (p / tuning.KEY).exists()]
    assert used is not None and used["sha256"] in [s["sha256"] for s in shipped]
    assert manifest["verification"]["top1_agreement"] == 1.0


def test_the_shipped_mixer_s16_int8_database_applies_without_tuning(tmp_path):
    """So does the int8 one: any calibration of the default recipe gives the same graph (scales are inputs)."""
    from mixer_edge.export import open_model
    from mixer_edge.quant import Calibration

    needs_shipped_database("mixer_s16", "int8")
    source = open_model("mixer_s16", progress=quiet)
    np.save(tmp_path / "calib.npy", np.random.default_rng(1).standard_normal((16, 3, 224, 224)).astype(np.float32))
    manifest = compile_model(source, "host", tmp_path / "s16", precision="int8", progress=quiet,
                             calibration=Calibration(data=str(tmp_path / "calib.npy"), samples=16))
    assert manifest["build"]["tuning_db"]["precision"] == "int8"
    assert manifest["quantization"]["layers"] == 34
    assert manifest["verification"]["top1_agreement"] == 1.0


def test_records_transfer_by_workload_to_another_class_count(tmp_path, monkeypatch):
    """mixer_digits at 7 classes has no database of its own: the shipped 10-class one's records apply to every task
    whose workload matches (all but the head's), the build says which tasks stayed untuned, and a broken database
    of the same target in the cache is passed over in one line instead of failing the build."""
    from mixer_edge.export import open_model

    shipped = {tuning.TuningKey.stored_at(p).target: p for p in tuning.shipped_root().iterdir()
               if tuning.read_key(p).get("model") == "mixer_digits"}
    target = json.dumps(resolve_target("host").target, sort_keys=True)
    if target not in shipped:
        pytest.skip("the shipped digits databases are for 2-core x86-avx512-vnni and x86-amx machines: this CPU is another")
    monkeypatch.setenv("MIXER_EDGE_CACHE", str(tmp_path / "cache"))
    broken = fake_database(tuning.cache_root() / "broken", target, [record(0, 1e-3)])
    (broken / tuning.RECORDS).write_text("not json\n" + (broken / tuning.RECORDS).read_text())
    said = []
    manifest = compile_model(open_model("mixer_digits", num_classes=7, progress=quiet), "host", tmp_path / "a",
                             progress=said.append)
    used = manifest["build"]["tuning"]
    assert manifest["build"]["tuning_db"] is None and used["tasks"] >= 3
    assert used["transferred"] == used["tuned"] == used["tasks"] - len(used["untuned"]) >= used["tasks"] - 2
    if dense.applies(resolve_target("host")):  # the 7-class head is a float kernel of its own, not a task
        assert used["untuned"] == []
    else:
        assert any("matmul" in task for task in used["untuned"])  # the 7-class head
    assert [d["sha256"] for d in used["transferred_from"]] == [tuning.summary(shipped[target])["sha256"]]
    assert any(line.startswith(f"not using the tuning database {broken}") for line in said)
    assert any(line.startswith(f"tuning records cover {used['tuned']} of {used['tasks']} tasks") for line in said)
    assert manifest["verification"]["top1_agreement"] == 1.0
