"""timm .pth / .safetensors and official Flax .npz checkpoints, written by the tests in those layouts."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mixer_edge.checkpoints import load_checkpoint, read_metadata, read_state_dict
from mixer_edge.errors import MixerEdgeError
from mixer_edge.model import create_model, preset


@pytest.fixture
def reference():
    torch.manual_seed(0)
    return create_model("mixer_tiny").eval()


def same_outputs(a, b):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        return torch.allclose(a(x), b(x), atol=1e-6)


def official_npz(model) -> dict:
    """The layout of google-research/vision_transformer's Mixer .npz files, written independently."""
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    out = {
        "stem/kernel": sd["stem.proj.weight"].transpose(2, 3, 1, 0),  # OIHW -> HWIO
        "stem/bias": sd["stem.proj.bias"],
        "pre_head_layer_norm/scale": sd["norm.weight"],
        "pre_head_layer_norm/bias": sd["norm.bias"],
        "head/kernel": sd["head.weight"].T,
        "head/bias": sd["head.bias"],
    }
    for i in range(model.cfg.depth):
        b = f"blocks.{i}."
        out.update({
            f"MixerBlock_{i}/LayerNorm_0/scale": sd[b + "norm1.weight"],
            f"MixerBlock_{i}/LayerNorm_0/bias": sd[b + "norm1.bias"],
            f"MixerBlock_{i}/LayerNorm_1/scale": sd[b + "norm2.weight"],
            f"MixerBlock_{i}/LayerNorm_1/bias": sd[b + "norm2.bias"],
        })
        for flax, timm in (("token_mixing", "mlp_tokens"), ("channel_mixing", "mlp_channels")):
            for j in (0, 1):
                out[f"MixerBlock_{i}/{flax}/Dense_{j}/kernel"] = sd[f"{b}{timm}.fc{j + 1}.weight"].T
                out[f"MixerBlock_{i}/{flax}/Dense_{j}/bias"] = sd[f"{b}{timm}.fc{j + 1}.bias"]
    return out


def test_timm_pth(reference, tmp_path):
    torch.save(reference.state_dict(), tmp_path / "m.pth")
    assert same_outputs(reference, load_checkpoint(tmp_path / "m.pth", preset("mixer_tiny")))


def test_timm_pth_wrapped_in_training_state(reference, tmp_path):
    torch.save({"model": reference.state_dict(), "epoch": 3}, tmp_path / "m.pth")
    assert same_outputs(reference, load_checkpoint(tmp_path / "m.pth", preset("mixer_tiny")))


def test_timm_safetensors(reference, tmp_path):
    save_file(reference.state_dict(), tmp_path / "m.safetensors")
    assert same_outputs(reference, load_checkpoint(tmp_path / "m.safetensors", preset("mixer_tiny")))


def test_timm_safetensors_with_timm_metadata_through_open_model(reference, tmp_path):
    from mixer_edge.export import open_model

    save_file(reference.state_dict(), tmp_path / "m.safetensors", metadata={"format": "pt"})
    source = open_model("mixer_tiny", str(tmp_path / "m.safetensors"), progress=lambda *_: None)
    assert same_outputs(reference, source.torch_model) and source.export["max_abs_diff_vs_torch"] < 1e-4


def test_official_flax_npz(reference, tmp_path):
    np.savez(tmp_path / "m.npz", **official_npz(reference))
    assert same_outputs(reference, load_checkpoint(tmp_path / "m.npz", preset("mixer_tiny")))


def test_wrong_preset_names_first_mismatch(reference, tmp_path):
    torch.save(reference.state_dict(), tmp_path / "m.pth")
    with pytest.raises(MixerEdgeError, match=r"'stem.proj.weight' is \(32, 3, 8, 8\) in the checkpoint"):
        load_checkpoint(tmp_path / "m.pth", preset("mixer_tiny", patch_size=4))


def test_missing_and_extra_keys(reference, tmp_path):
    sd = reference.state_dict()
    del sd["blocks.1.norm2.bias"]
    torch.save(sd, tmp_path / "missing.pth")
    with pytest.raises(MixerEdgeError, match="key 'blocks.1.norm2.bias'.* is missing"):
        load_checkpoint(tmp_path / "missing.pth", preset("mixer_tiny"))
    sd = {**reference.state_dict(), "blocks.2.norm1.weight": torch.zeros(32)}
    torch.save(sd, tmp_path / "extra.pth")
    with pytest.raises(MixerEdgeError, match="unexpected key 'blocks.2.norm1.weight'"):
        load_checkpoint(tmp_path / "extra.pth", preset("mixer_tiny"))


def test_deeper_checkpoint_is_refused(tmp_path):
    torch.save(create_model("mixer_tiny", depth=3).state_dict(), tmp_path / "deep.pth")
    with pytest.raises(MixerEdgeError, match="unexpected key 'blocks.2"):
        load_checkpoint(tmp_path / "deep.pth", preset("mixer_tiny"))


def test_corrupt_and_unknown_files(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(MixerEdgeError, match="could not be read"):
        read_state_dict(tmp_path / "bad.safetensors")
    with pytest.raises(MixerEdgeError, match="could not be read"):
        read_metadata(tmp_path / "bad.safetensors")
    (tmp_path / "m.ckpt").write_bytes(b"")
    with pytest.raises(MixerEdgeError, match="unknown suffix"):
        read_state_dict(tmp_path / "m.ckpt")
    with pytest.raises(MixerEdgeError, match="does not exist"):
        read_state_dict(tmp_path / "nope.pth")


def test_pickled_objects_are_not_executed(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("owned",))

    torch.save({"state_dict": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(MixerEdgeError, match="could not be read"):
        read_state_dict(tmp_path / "evil.pth")
