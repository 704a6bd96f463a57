"""The command line's value types (mixer_edge/options.py) and main()'s last line of defence."""

from __future__ import annotations

import warnings

import pytest

from mixer_edge import cli, runtime

from conftest import assert_one_line_error


@pytest.mark.parametrize("args, fragments", [
    (["compile", "--batch", "0"], ["argument --batch: takes a batch size from 1 to 4096, not 0"]),
    (["compile", "--batch", "1,,8"], ["argument --batch: takes comma-separated batch sizes with none empty"]),
    (["compile", "--batch", "1,8,1"], ["argument --batch: lists '1' twice"]),
    (["compile", "--batch", "100000"], ["argument --batch", "not 100000"]),
    (["compile", "--target", ","], ["argument --target: takes comma-separated target names with none empty, not ','"]),
    (["compile", "--target", "host,"], ["argument --target", "none empty"]),
    (["compile", "--precision", "int9"], ["argument --precision: takes float32, float16, int8, not 'int9'"]),
    (["compile", "--num-classes", "0"], ["argument --num-classes", "not 0"]),
    (["compile", "--calib-samples", "-5"], ["argument --calib-samples", "not -5"]),
    (["tune", "--trials", "0"], ["argument --trials", "not 0"]),
    (["tune", "--time-budget", "0s"], ["argument --time-budget: takes a duration longer than 0s"]),
    (["tune", "--time-budget=-5m"], ["argument --time-budget", "not '-5m'"]),
    (["bench", "--threads", "100000"], ["argument --threads: takes a thread count from 1 to", "not 100000"]),
    (["bench", "--threads", "0"], ["argument --threads", "not 0"]),
    (["bench", "--rounds", "0"], ["argument --rounds: takes a whole number from 1"]),
    (["report", "--rounds", "0"], ["argument --rounds"]),
    (["report", "--max-accuracy-drop", "nan"], ["argument --max-accuracy-drop: takes a number from 0 to 100, not nan"]),
    (["report", "--max-accuracy-drop", "inf"], ["argument --max-accuracy-drop", "not inf"]),
    (["calibrate", "-o", "q.onnx", "--max-accuracy-drop", "-1"], ["argument --max-accuracy-drop", "not -1"]),
    (["report", "--variants", "float32,,int8"], ["argument --variants", "none empty"]),
    (["run", "art", "--top", "0"], ["argument --top: takes a whole number from 1"]),
    (["run", "art", "--show", "-1"], ["argument --show"]),
    (["train", "--epochs", "0"], ["argument --epochs: takes a whole number from 1 to 10000, not 0"]),
    (["train", "--seed", "-1"], ["argument --seed", "not -1"]),
    (["train", "--seed", "1.5"], ["argument --seed", "not '1.5'"]),
    (["compile", "--target", "\x1b[31mred"], ["unknown target '\\x1b[31mred'"]),  # escaped, not sent to the terminal
])
def test_bad_values_are_refused_where_they_are_parsed(args, fragments, run_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(*args)
    assert_one_line_error(code, err, *fragments)
    assert "\x1b" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_json_target_is_taken_whole_commas_and_all(run_cli, tmp_path):
    """The README's raw-target example: the JSON is not split on its commas."""
    out = tmp_path / "zn"
    code, stdout, err = run_cli("compile", "--target", '{"kind": "llvm", "mcpu": "znver4", "num-cores": 8}', "-o", out)
    assert code == 0, err
    assert runtime.read_manifest(out)["target"]["tvm"] == {"kind": "llvm", "mcpu": "znver4", "num-cores": 8}
    assert f"{out}: custom-" in stdout


@pytest.fixture
def targets_command(monkeypatch):
    """targets_command(func): `mixer-edge targets` runs `func(args)` instead (main's handling is what is tested)."""
    def replace(func):
        parser = cli.build_parser

        def with_func():
            p = parser()
            p._subparsers._group_actions[0].choices["targets"].set_defaults(func=func)
            return p

        monkeypatch.setattr(cli, "build_parser", with_func)

    return replace


def test_an_internal_error_is_one_line_with_exit_code_70_and_debug_shows_it(run_cli, targets_command):
    def broken(args):
        raise ZeroDivisionError("a bug")

    targets_command(broken)
    code, _, err = run_cli("targets")
    assert code == 70
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "internal error in 'targets' (ZeroDivisionError: a bug)" in err and "--debug" in err
    for argv in (["--debug", "targets"], ["targets", "--debug"]):
        with pytest.raises(ZeroDivisionError):
            cli.main(argv)


def test_a_library_warning_is_a_progress_line_not_an_error(run_cli, targets_command):
    def warns(args):
        warnings.warn("something odd\nin two lines", UserWarning)

    targets_command(warns)
    code, _, err = run_cli("targets")
    assert code == 0
    assert err == "[mixer-edge] warning: UserWarning: something odd in two lines\n"


@pytest.mark.parametrize("targets, fragment", [
    (["--target", "host", "--target", "host"], "--target names"),
    (["--target", "host,x86-amx,x86-avx512-vnni,x86-avx2,x86-avx512"], "--target names"),  # host is one of them
])
def test_a_target_named_twice_is_refused(targets, fragment, run_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli("compile", *targets)
    assert_one_line_error(code, err, fragment, "name each target once")
    assert list(tmp_path.iterdir()) == []


def test_tuning_db_list_of_a_directory_without_databases_is_refused(run_cli, tmp_path):
    code, _, err = run_cli("tuning-db", "list", tmp_path)
    assert_one_line_error(code, err, "holds no mixer-edge tuning database", "pass a directory `mixer-edge tune` wrote")


def test_a_closed_pipe_ends_the_command_quietly(build_artifact):
    """`mixer-edge run ... | head`: more output than a pipe holds (64 KiB), after its reader has gone."""
    import subprocess
    import sys

    argv = ["run", str(build_artifact("host")), "--input", "digits-train", "--show", "2000"]  # ~100 KB of lines
    script = f"import sys; from mixer_edge import cli; sys.exit(cli.main({argv!r}))"
    proc = subprocess.run(["bash", "-c", 'set -o pipefail; "$0" -c "$1" | head -c 1', sys.executable, script],
                          capture_output=True, text=True)
    assert proc.stdout == "#" and proc.stderr == "" and proc.returncode == 141
