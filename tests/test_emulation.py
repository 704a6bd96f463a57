"""Cross-compiled artifacts run on the emulated Raspberry Pi boards (qemu-user, real aarch64 code)."""

import numpy as np
import pytest

from mixer_edge import emulator
from mixer_edge.compiler import compile_model
from mixer_edge.errors import MixerEdgeError

from conftest import agreement, quiet

pytestmark = pytest.mark.emulation


@pytest.mark.parametrize("target, cpu", [("rpi4", "cortex-a72"), ("rpi5", "cortex-a76")])
def test_board_reproduces_torch(board, build_artifact, digits_test, torch_logits, target, cpu):
    logits = emulator.run_artifact(build_artifact(target), digits_test[0], cpu, board)
    assert agreement(logits, torch_logits) == 1.0
    assert np.abs(logits - torch_logits).max() < 1e-4
    assert (logits.argmax(1) == digits_test[1]).mean() >= 0.95


def test_rpi5_build_is_refused_on_an_rpi4(board, build_artifact, digits_test):
    with pytest.raises(MixerEdgeError, match="needs CPU features this CPU lacks \\(asimddp, asimdhp\\)"):
        emulator.run_artifact(build_artifact("rpi5"), digits_test[0][:1], "cortex-a72", board)


def test_sve_build_is_refused_on_a_cortex_a76(board, digits_source, digits_test, tmp_path):
    (tmp_path / "graviton3.toml").write_text(
        'kind = "cpu"\n[target]\nkind = "llvm"\nmtriple = "aarch64-linux-gnu"\nmcpu = "neoverse-v1"\n'
        'mattr = ["+sve"]\n[build]\ncross_compiler = "aarch64-linux-gnu-g++"\n')
    compile_model(digits_source, str(tmp_path / "graviton3.toml"), tmp_path / "art", progress=quiet)
    with pytest.raises(MixerEdgeError, match="lacks \\(.*sve.*\\)"):
        emulator.run_artifact(tmp_path / "art", digits_test[0][:1], "cortex-a76", board)


def test_paths_reach_the_board_as_data_never_as_code(board, build_artifact, digits_test, torch_logits, tmp_path,
                                                     monkeypatch):
    """A temporary directory (or artifact path) holding Python syntax is a path on the board, not code."""
    monkeypatch.chdir(tmp_path)  # where the board's process starts
    marker = tmp_path / "pwned"
    evil = tmp_path / "tmp-{open('pwned','w')}-'\"{x}"
    evil.mkdir()
    monkeypatch.setattr(emulator.tempfile, "tempdir", str(evil))
    logits = emulator.run_artifact(build_artifact("rpi5"), digits_test[0][:8], "cortex-a76", board)
    assert not marker.exists()
    assert np.abs(logits - torch_logits[:8]).max() < 1e-4
