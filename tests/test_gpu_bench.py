"""The GPU bench of issue 20 on a machine without a GPU: its command line builds every CUDA artifact and then
refuses in one line naming the missing GPU; the GPU peers (torch.compile max-autotune, TensorRT) are built from
tried and named as missing or failing in one line. What TensorRT and max-autotune build needs a GPU:
tests/test_gpu.py runs them there (no stand-in for TensorRT here: the real package is what is tested)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from mixer_edge import bench, peers

from conftest import assert_one_line_error

NO_GPU = pytest.mark.skipif(Path("/dev/nvidia0").exists(), reason="on a GPU the bench runs: see tests/test_gpu.py")
MISSING_TENSORRT = "tensorrt left out: tensorrt not installed: pip install tensorrt (on the GPU machine)"


def gpu_command(*extra: str) -> list[str]:
    """README's "On a lent GPU" command line at the digits model's size: batch 1, 2 rounds."""
    return ["bench", "--target", "h100", "--precision", "float32,float16,int8", "--batch", "1", "--rounds", "2",
            *extra]


@NO_GPU
def test_the_gpu_bench_builds_every_cuda_artifact_then_refuses_in_one_line(run_cli, monkeypatch):
    built = []
    real_compare = bench.compare

    def compare(source, artifacts, **kwargs):  # the artifacts exist here only while the bench runs
        built.extend((Path(a).name, sorted(p.name for p in Path(a).iterdir())) for a in artifacts)
        return real_compare(source, artifacts, **kwargs)

    monkeypatch.setattr(bench, "compare", compare)
    code, out, err = run_cli(*gpu_command())
    assert_one_line_error(code, err, "artifact target h100 needs an NVIDIA GPU and its CUDA driver")
    assert "Traceback" not in err and out == ""
    assert len(built) == 3  # float32, float16, int8
    for name, files in built:
        assert "kernels.fatbin" in files and "model.so" in files, (name, files)
    compiles = [line for line in err.splitlines() if line.startswith("[mixer-edge] compiling mixer_digits for h100")]
    assert [line.split("(")[1] for line in compiles] == [f"cuda, {p}, batch 1)" for p in ("float32", "float16", "int8")]


@NO_GPU
def test_the_tuned_gpu_bench_refuses_before_building(run_cli):
    """With --tune MetaSchedule measures every candidate kernel on the GPU: refused at the first build."""
    code, out, err = run_cli(*gpu_command("--tune", "--trials", "8"))
    assert_one_line_error(code, err, "tuning for h100 measures on a cuda device and this machine has none")
    assert "Traceback" not in err and "built in" not in err


def test_a_missing_tensorrt_is_named_once_and_left_out(digits_source, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as here: `import tensorrt` fails
    assert peers.unavailable("tensorrt") == "tensorrt not installed: pip install tensorrt (on the GPU machine)"
    notes, shape = [], (1, *digits_source.input.shape[1:])
    others = peers.Peers(2, None, notes.append, engines=(peers.TENSORRT,))
    for precision in ("float16", "int8", "int8"):
        assert others.beside(digits_source, object(), shape, "cuda", precision) == []
        assert others.last_left_out == [MISSING_TENSORRT]
    assert notes == [MISSING_TENSORRT]  # said once per bench


def test_a_gpu_peer_is_timed_on_a_batch_it_put_on_the_device_once():
    calls = []

    def timer(x):
        calls.append(("upload", x.shape))
        return lambda: calls.append("run")

    peer = peers.Peer(peers.TENSORRT, "float16", "float16", lambda x: x * 2, timer)
    x = np.ones((1, 1, 8, 8), np.float32)
    cand = peer.candidate(x)
    cand.run()
    cand.run()
    assert calls == [("upload", x.shape), "run", "run"]
    assert (cand.engine, cand.precision, cand.name) == ("tensorrt", "float16", "tensorrt float16")
    np.testing.assert_array_equal(cand.output(), x * 2)


@NO_GPU
def test_without_a_gpu_torch_compile_max_autotune_says_why_it_is_left_out(digits_source):
    notes = []
    others = peers.Peers(2, None, notes.append, engines=(peers.TORCH_MAX_AUTOTUNE,))
    assert others.beside(digits_source, None, (1, 1, 8, 8), "cuda", "float16") == []
    assert len(notes) == 1 and notes[0].startswith("torch.compile max-autotune float16 left out: fails on this model")
