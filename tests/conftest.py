"""Shared fixtures: the bundled digits model, built artifacts, the emulated board, a CLI runner."""

from __future__ import annotations

import os
import signal
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hypothesis import settings

from mixer_edge import cli, emulator
from mixer_edge.compiler import RpcBoard, compile_model
from mixer_edge.data import digits_split
from mixer_edge.export import export_onnx, load_onnx, open_model
from mixer_edge.model import MixerConfig, create_model


# Property tests draw the same examples on every run (a CI failure reproduces), more of them than by default.
settings.register_profile("mixer-edge", derandomize=True, max_examples=300, deadline=None)
settings.load_profile("mixer-edge")


FUZZING = {"examples": None}  # set by `pytest -m fuzz`


def pytest_configure(config):
    """`pytest -m fuzz`: the fuzz tests draw fresh examples, MIXER_EDGE_FUZZ_EXAMPLES of each (default 2000)."""
    if "fuzz" in (config.getoption("markexpr") or "").split():
        FUZZING["examples"] = int(os.environ.get("MIXER_EDGE_FUZZ_EXAMPLES", "2000"))
        settings.register_profile("fuzz", derandomize=False, deadline=None, print_blob=True)
        settings.load_profile("fuzz")


def examples(default: int) -> int:
    """How many examples a fuzz test draws: `default` (derandomized) in the default run, more under -m fuzz."""
    return FUZZING["examples"] or default


def quiet(*_):
    pass


@pytest.fixture(scope="session", autouse=True)
def private_tuning_cache(tmp_path_factory):
    """Tests never see (or fill) the user's tuning databases in ~/.cache/mixer-edge/tuning."""
    os.environ["MIXER_EDGE_CACHE"] = str(tmp_path_factory.mktemp("mixer-edge-cache"))


@pytest.fixture(scope="session")
def digits_source():
    """The bundled digits Mixer, exported to ONNX (the default model of every command)."""
    return open_model(progress=quiet)


@pytest.fixture(scope="session")
def digits_test():
    return digits_split("test")


@pytest.fixture(scope="session")
def torch_logits(digits_source, digits_test):
    import torch

    with torch.no_grad():
        return digits_source.torch_model(torch.from_numpy(digits_test[0])).numpy()


@pytest.fixture(scope="session")
def build_artifact(digits_source, tmp_path_factory):
    """build_artifact(target) -> path of the digits model compiled for that target (built once)."""
    return built_once(tmp_path_factory, "artifacts",
                      lambda target, out: compile_model(digits_source, target, out, progress=quiet))


def built_once(tmp_path_factory, folder: str, compile_to):
    """make(target) -> the fresh directory `compile_to(target, directory)` built for `target`, once per target."""
    built = {}

    def make(target: str) -> Path:
        if target not in built:
            out = tmp_path_factory.mktemp(folder) / target
            compile_to(target, out)
            built[target] = out
        return built[target]

    return make


@pytest.fixture
def copy_artifact(build_artifact, tmp_path):
    """A private copy of a built artifact, for tests that tamper with it."""
    def copy(target: str) -> Path:
        dest = tmp_path / f"copy-{target}"
        shutil.copytree(build_artifact(target), dest)
        return dest

    return copy


@pytest.fixture(scope="session")
def board():
    """The emulated aarch64 board (built on first use; CI builds it before the tests)."""
    return emulator.setup(progress=quiet)


@pytest.fixture
def run_cli(capsys):
    """run_cli(*args) -> (exit code, stdout, stderr) of the mixer-edge command, in process."""
    def run(*args: str):
        try:
            code = cli.main([str(a) for a in args])
        except SystemExit as exc:  # argparse's refusals
            code = exc.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    """A user mistake: exit code 2 and, after the progress lines, one line on stderr naming the problem."""
    lines = [line for line in err.splitlines() if not line.startswith("[mixer-edge] ")]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("mixer-edge: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def leftovers(directory: Path) -> list[str]:
    """Temporary files or directories an atomic write would leave behind if it failed badly."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".") and ".tmp" in p.name)


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(1) == b.argmax(1)).mean())


# ---- a board over TVM RPC: the emulated one, served by mixer_edge.rpc_server --------------------------------

def wait_for(ready, attempts: int, failure: str) -> None:
    """Poll `ready` once a second; fail the test after `attempts` tries."""
    for _ in range(attempts):
        try:
            if ready():
                return
        except Exception:
            pass
        time.sleep(1)
    pytest.fail(failure)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def rpc_board(board):
    """A TVM RPC tracker on loopback with the emulated Cortex-A76 board registered under 'rpi5'."""
    from tvm import rpc

    port = free_port()
    tracker = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port",
                                str(port), "--port-end", str(port + 50), "--silent"], start_new_session=True)
    server = None
    try:
        wait_for(lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close() is None, 60,
                 "the RPC tracker never started")
        server = subprocess.Popen([sys.executable, "-m", "mixer_edge.cli", "emulator", "serve", "--board", "rpi5",
                                   "--tracker", f"127.0.0.1:{port}", "--key", "rpi5"], start_new_session=True,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: rpc.connect_tracker("127.0.0.1", port).summary()["queue_info"].get("rpi5", {}).get("free"),
                 300, "the emulated board never registered with the tracker")
        yield RpcBoard("127.0.0.1", port, "rpi5")
    finally:
        for proc in (server, tracker):
            if proc is not None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="session")
def odd_mixer(tmp_path_factory):
    """A one-block Mixer, batch 2, with a 16x16 patch embedding and widths no vector divides (40, 2, 120, 7)."""
    import torch

    torch.manual_seed(0)
    cfg = MixerConfig(img_size=32, patch_size=16, num_classes=7, embed_dim=40, depth=1, mlp_ratio=(0.5, 3.0))
    path = tmp_path_factory.mktemp("odd") / "odd.onnx"
    export_onnx(create_model(cfg).eval(), path, batch=2)
    return load_onnx(path)
