"""Long work killed with SIGKILL: nothing half-written is ever visible, and the next run starts clean.

(A killed tuning run resumes its database: tests/test_tuning.py, test_a_killed_tuning_run_resumes...)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mixer_edge import runtime
from mixer_edge.atomic import atomic_dir, atomic_file

from conftest import leftovers

CLI = [sys.executable, "-m", "mixer_edge.cli"]
DEAD_PID = 4194305  # above Linux's largest pid: never a live process


def kill_when(cmd: list[str], ready, log: Path, timeout: float = 300, sig: int = signal.SIGKILL) -> int:
    """Start `cmd` (stderr to `log`), send `sig` to it and its children as soon as `ready()` (fail if it ends
    first); returns its exit code."""
    with open(log, "w") as err:
        # SIGINT as a terminal delivers it: a shell's background job (a CI runner's, say) starts with it ignored
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        for _ in range(int(timeout / 0.01)):  # poll every 10 ms
            if ready():
                break
            assert proc.poll() is None, f"finished before the kill: {log.read_text()[-2000:]}"
            time.sleep(0.01)
        else:
            pytest.fail(f"never reached the point to kill it: {log.read_text()[-2000:]}")
        os.killpg(proc.pid, sig)
        return proc.wait(timeout=60)


def stages(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.name.startswith(".")]


def test_a_calibration_killed_midway_leaves_nothing_and_the_next_run_completes(tmp_path):
    out = tmp_path / "q.onnx"
    cmd = [*CLI, "calibrate", "--calibration", "entropy", "--calib-samples", "1437", "-o", str(out)]
    log = tmp_path / "log"
    kill_when(cmd, lambda: "calibration data:" in log.read_text(), log)  # observing activations now
    log.unlink()
    assert list(tmp_path.iterdir()) == []  # no QDQ model, no table, no temporary files
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert out.is_file() and json.loads(out.with_suffix(".calibration.json").read_text())["samples"] == 1437
    assert stages(tmp_path) == []


def test_an_artifact_write_killed_midway_keeps_the_old_artifact_and_the_next_run_cleans_up(build_artifact, tmp_path):
    out = tmp_path / "art"
    shutil.copytree(build_artifact("host"), out)
    old = (out / runtime.MANIFEST).read_text()
    cmd = [*CLI, "compile", "-o", str(out)]
    kill_when(cmd, lambda: bool(stages(tmp_path)), tmp_path.parent / f"{tmp_path.name}.log")  # the staging directory exists: the artifact is being written
    assert stages(tmp_path), "the kill should leave the writer's staging directory behind"
    assert (out / runtime.MANIFEST).read_text() == old
    runtime.load(out)  # the old artifact, whole and verified
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert stages(tmp_path) == []  # the dead writer's stage was swept
    assert (out / runtime.MANIFEST).read_text() != old
    runtime.load(out)


def test_ctrl_c_during_an_artifact_write_keeps_the_old_artifact_and_leaves_nothing(build_artifact, tmp_path):
    out = tmp_path / "art"
    shutil.copytree(build_artifact("host"), out)
    old = (out / runtime.MANIFEST).read_text()
    log = tmp_path.parent / f"{tmp_path.name}.log"
    code = kill_when([*CLI, "compile", "-o", str(out)], lambda: bool(stages(tmp_path)), log, sig=signal.SIGINT)
    last = log.read_text().strip().splitlines()[-1]
    assert code in (2, 130) and last.startswith("mixer-edge: "), log.read_text()  # interrupted, or its linker was
    assert "Traceback" not in log.read_text()
    assert stages(tmp_path) == [] and (out / runtime.MANIFEST).read_text() == old
    runtime.load(out)


def test_an_interrupt_ends_on_its_one_line(tmp_path):
    """A library object the signal left half-built (TVM's TempDirectory, interrupted in its constructor) fails in
    its finalizer when Python exits; nothing is printed after "interrupted"."""
    script = """if True:
        import sys
        from mixer_edge import cli

        class HalfBuilt:
            def __del__(self):
                raise AttributeError("'TempDirectory' object has no attribute 'temp_dir'")

        def interrupted(args):
            cli.left = HalfBuilt()  # collected at exit
            raise KeyboardInterrupt

        cli.cmd_targets = interrupted
        sys.exit(cli.main(["targets"]))
    """
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 130 and done.stderr.splitlines() == ["mixer-edge: interrupted"], done.stderr


def test_stages_of_dead_writers_are_swept_and_live_ones_kept(tmp_path):
    dead = tmp_path / f".art.{DEAD_PID}-x1.tmp"
    alive = tmp_path / f".art.{os.getppid()}-x2.tmp"  # pytest's parent: alive, maybe another writer
    dead_file = tmp_path / f".q.onnx.{DEAD_PID}-x3.tmp"
    for stage in (dead, alive):
        stage.mkdir()
        (stage / "model.so").write_bytes(b"half")
    dead_file.write_bytes(b"half")
    with atomic_dir(tmp_path / "art", mark=runtime.MANIFEST) as stage:
        (stage / runtime.MANIFEST).write_text("{}")
    with atomic_file(tmp_path / "q.onnx") as tmp:
        tmp.write_bytes(b"whole")
    assert not dead.exists() and not dead_file.exists() and alive.exists()
    assert (tmp_path / "q.onnx").read_bytes() == b"whole"


def test_a_replacement_killed_between_its_two_renames_is_restored(tmp_path):
    """Where the filesystem cannot swap directories atomically, atomic_dir renames the old one aside
    first; a kill right then leaves no artifact at the path, and the next writer puts it back."""
    lost = tmp_path / f".art.old-{DEAD_PID}"
    lost.mkdir()
    (lost / runtime.MANIFEST).write_text('{"old": true}')
    try:
        with atomic_dir(tmp_path / "art", mark=runtime.MANIFEST):
            assert (tmp_path / "art" / runtime.MANIFEST).read_text() == '{"old": true}'  # restored before the write
            raise KeyboardInterrupt  # and this write fails in turn
    except KeyboardInterrupt:
        pass
    assert (tmp_path / "art" / runtime.MANIFEST).read_text() == '{"old": true}'
    assert leftovers(tmp_path) == [] and not lost.exists()
