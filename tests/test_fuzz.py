"""Fuzzing the command line: generated argument vectors, run in process, must keep the CLI's promises.

For any argument vector: exit code 0 or 2 (never 70, an internal error), no traceback, at most one
error line, and nothing in the working directory changed except the output the command was asked to
write. The small models load for real; the slow stages (builds, calibration, tuning, benchmarks,
training, paper-size models, the emulated board) are replaced by a sentinel that stops the command
where its slow work would start: every check must have run by then, and nothing may have been
written yet.

The default run draws a fixed set of examples (derandomized); `pytest -m fuzz` draws many more
(conftest.py's `fuzz` profile, sized by MIXER_EDGE_FUZZ_EXAMPLES).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixer_edge import bench, cli, compiler, emulator, export, quant, report, train
from mixer_edge.model import PRESETS

from conftest import examples

pytestmark = pytest.mark.fuzz


class Reached(BaseException):
    """Raised where the command's slow work would start (a BaseException: main() must not swallow it)."""


def _stop(*_, **__):
    raise Reached


OPEN_MODEL = export.open_model
_opened = {}


def open_small_model(model=None, checkpoint=None, **options):
    """export.open_model for the small models (once per set of arguments); a paper-size preset is slow work."""
    if model in PRESETS and model not in ("mixer_digits", "mixer_tiny"):
        raise Reached
    key = (model, checkpoint, *sorted((k, v) for k, v in options.items() if k != "progress"))
    if key not in _opened:
        _opened[key] = OPEN_MODEL(model, checkpoint, **options)
    return _opened[key]


# What a user might type for a value: numbers in and out of range, lists, JSON, control characters,
# names of things that exist, long names, and paths to files of every kind in the working directory.
NUMBERS = st.sampled_from(["0", "1", "2", "-1", "3", "8", "1e3", "nan", "inf", "-inf", "0.5", "1e400", "4097",
                           "99999999999999999999", "1_0", " 4", "0x10", ""])
TEXT = st.sampled_from(["", ",", ",,", "host", "host,", "host,rpi5", "rpi5", "cuda", "jetson-xavier", "android-vulkan",
                        "x86-avx2", "nope", "{", '{"kind": "llvm"}', '{"kind": "llvm", "mcpu": "znver4", "num-cores": 8}',
                        '{"kind": "llvm", "num-cores": 0}', '{"kind": 3}', "[1]", '{"kind": "cuda"}', "float32",
                        "int8", "float16", "float32,int8", "float32,float32", "int8,", "default", "entropy", "mse",
                        "int8:minmax", "int8-mixed", "bogus:recipe", "digits-test", "digits-train", "digits-val",
                        "127.0.0.1:9190", "host:", ":9190", "127.0.0.1:99999", "10m", "0s", "1h30m", "5x", "-5m",
                        "mixer_digits", "mixer_s16", "mixer_tiny", "a" * 300, "\x1b[31mred\x1b[0m", "{x}", "%s",
                        "../..", "/", "/dev/null", "~", "-", "--help"])
PATHS = st.sampled_from(["art", "art/manifest.json", "missing.onnx", "text.onnx", "text.toml", "empty.npy",
                         "pixels.npy", "fifo", "link", "dir", "dir/", "data.npz", "out", "out.tar", "out.onnx",
                         "out.npy", "db", "image.png", "text.txt", "w.safetensors", "w.pth"])
VALUES = st.one_of(NUMBERS, TEXT, PATHS)

OPTIONS = {
    "compile": ["--model", "--checkpoint", "--num-classes", "--batch", "--target", "--precision", "-o",
                "--no-verify", "--calibration", "--calib-data", "--calib-samples", "--tune", "--tuning-db", "--trials",
                "--time-budget", "--rpc-tracker", "--rpc-key"],
    "bench": ["--model", "--checkpoint", "--batch", "--target", "--precision", "--rounds", "--json", "--threads",
              "--no-torch-compile", "--calibration", "--calib-data", "--calib-samples", "--tuning-db",
              "--rpc-tracker", "--rpc-key"],
    "report": ["--model", "--batch", "--target", "--variants", "--eval-data", "--max-accuracy-drop", "--rounds",
               "--threads", "-o", "--calib-data", "--calib-samples", "--tune", "--tuning-db"],
    "calibrate": ["--model", "--checkpoint", "--batch", "--calibration", "--calib-data", "--calib-samples",
                  "--sensitivity", "--max-accuracy-drop", "--val-data", "-o"],
    "tune": ["--model", "--batch", "--target", "--precision", "--calibration", "--calib-data", "--tuning-db",
             "--trials", "--time-budget", "--rpc-tracker", "--rpc-key"],
    "export": ["--model", "--checkpoint", "--batch", "-o", "--dynamic-batch", "--no-simplify"],
    "train": ["-o", "--epochs", "--seed"],
    "run": ["--input", "--board", "--top", "--show", "--save"],
    "inspect": ["--json"],
    "targets": [],
    "emulator": ["--board", "--tracker", "--key", "--dir"],
}
FLAGS = {"--no-verify", "--tune", "--no-torch-compile", "--sensitivity", "--dynamic-batch", "--no-simplify", "--json"}
OUTPUTS = {"-o", "--save", "--json"}
POSITIONAL = {"run": PATHS, "inspect": PATHS, "emulator": st.sampled_from(["setup", "serve", "bogus"]),
              "tuning-db": st.sampled_from(["list", "merge"])}


@st.composite
def argv(draw) -> list[str]:
    command = draw(st.sampled_from([*OPTIONS, "tuning-db"]))
    args = [command]
    if command in POSITIONAL:
        args.append(draw(POSITIONAL[command]))
    if command == "tuning-db":
        args += draw(st.lists(PATHS, max_size=3))
        if draw(st.booleans()):
            args += ["-o", draw(PATHS)]
        return args
    for option in draw(st.lists(st.sampled_from(OPTIONS[command]), max_size=4)) if OPTIONS[command] else []:
        if command == "inspect" or option in FLAGS and not (command == "bench" and option == "--json"):
            args.append(option)
        else:
            args += [option, draw(VALUES)]
    return args


def workspace(root: Path, artifact: Path) -> None:
    """The files the drawn paths name: an artifact, text where data should be, data of every kind, a FIFO, a link."""
    shutil.copytree(artifact, root / "art")
    (root / "text.onnx").write_text("not a model")
    (root / "text.toml").write_text("kind = 3\n[build\n")
    (root / "text.txt").write_text("hello")
    (root / "w.pth").write_bytes(b"\x80\x04K\x03.")
    (root / "w.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    np.save(root / "empty.npy", np.zeros((0, 1, 8, 8), np.float32))
    np.save(root / "pixels.npy", np.random.default_rng(0).integers(0, 256, (3, 8, 8, 1), dtype=np.uint8))
    np.savez(root / "data.npz", x=np.zeros((2, 1, 8, 8), np.float32), y=np.array([1.5, 2.5]))
    (root / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    (root / "dir").mkdir()
    (root / "dir" / "other.txt").write_text("someone's file")
    (root / "db").mkdir()
    (root / "db" / "key.json").write_text(json.dumps({"graph": "0" * 64, "target": "{}", "precision": "float32"}))
    os.mkfifo(root / "fifo")
    (root / "link").symlink_to(root / "text.txt")


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.is_dir(), p.lstat().st_size, p.lstat().st_mtime_ns) for p in root.rglob("*")}


NEVER_WRITTEN = {"fifo", "link", "/dev/null", "dir", "/"}  # no output may replace these
INPUTS = {"--model", "--checkpoint", "--calibration", "--calib-data", "--val-data", "--eval-data", "--input",
          "--tuning-db"}


def inputs_of(args: list[str]) -> set[str]:
    named = {args[i + 1] for i, a in enumerate(args[:-1]) if a in INPUTS}
    if args[0] in ("run", "inspect"):
        named.add(args[1])
    return {n.rstrip("/") for n in named if n and os.path.lexists(n)}


def outputs_of(args: list[str]) -> set[str]:
    """The paths (relative to the working directory) the command was asked to write (argparse keeps the last)."""
    last = {a: args[i + 1] for i, a in enumerate(args[:-1]) if a in OUTPUTS}
    return {path.rstrip("/") for path in last.values()}


@pytest.fixture(scope="module")
def host_artifact(build_artifact):
    return build_artifact("host")


@settings(max_examples=examples(150), suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(args=argv())
def test_any_argument_vector_keeps_the_cli_promises(args, host_artifact, monkeypatch, capsys):
    for module, name in ((compiler, "compile_model"), (compiler, "tune_model"), (quant, "calibrate"),
                         (quant, "quantize_for_build"), (report, "make_report"), (bench, "compare"),
                         (export, "export_onnx"), (train, "train_digits"), (emulator, "setup"), (emulator, "serve"),
                         (emulator, "run_artifacts")):
        monkeypatch.setattr(module, name, _stop)
    monkeypatch.setattr(export, "open_model", open_small_model)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        workspace(root, host_artifact)
        monkeypatch.chdir(root)
        before = snapshot(root)
        try:
            code = cli.main(args)
        except SystemExit as exc:
            code = exc.code
        except Reached:
            code = "reached"
        _, err = capsys.readouterr()
        assert "Traceback" not in err, (args, err)
        errors = [line for line in err.splitlines() if not line.startswith("[mixer-edge] ")]
        assert code in (0, 2, "reached"), (args, err)
        assert len(errors) <= 1, (args, err)
        if code == 2:
            assert errors and errors[0].startswith("mixer-edge: error: "), (args, err)
        if code == "reached":  # slow work started: the outputs must have passed the output policy by then
            refused = {o for o in outputs_of(args) if o in NEVER_WRITTEN or o in inputs_of(args)}
            assert not refused, (args, "slow work started before refusing", refused)
        allowed = outputs_of(args) if code == 0 else set()
        after = snapshot(root)
        changed = {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}
        unexpected = {p for p in changed if not any(p == o or p.startswith(o + "/") for o in allowed)}
        assert not unexpected, (args, code, err, sorted(unexpected))
