import pytest
import torch

from mixer_edge.errors import MixerEdgeError
from mixer_edge.model import PRESETS, count_params, create_model, preset

# Table 1 of Tolstikhin et al. (2021): parameters in millions, classifier head excluded.
PAPER_MILLIONS = {"mixer_s32": 19, "mixer_s16": 18, "mixer_b32": 60, "mixer_b16": 59,
                  "mixer_l32": 206, "mixer_l16": 207, "mixer_h14": 431}


@pytest.mark.parametrize("name", sorted(PAPER_MILLIONS))
def test_paper_presets_match_table_1(name):
    with torch.device("meta"):  # shapes only: H/14 would need 1.7 GB of real weights
        model = create_model(name)
    assert round(count_params(model) / 1e6) == PAPER_MILLIONS[name]


def test_timm_state_dict_names():
    keys = set(create_model("mixer_tiny").state_dict())
    for key in ("stem.proj.weight", "blocks.0.norm1.weight", "blocks.1.mlp_tokens.fc1.weight",
                "blocks.1.mlp_channels.fc2.bias", "norm.weight", "head.weight"):
        assert key in keys


def test_token_and_channel_widths_follow_the_paper():
    block = create_model("mixer_b16").blocks[0]
    assert block.mlp_tokens.fc1.out_features == 384  # D_S
    assert block.mlp_channels.fc1.out_features == 3072  # D_C
    assert block.mlp_tokens.fc1.in_features == 196  # (224 / 16) ** 2 patches


def test_forward_shape_and_overrides():
    model = create_model("mixer_tiny", num_classes=7).eval()
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)
    assert set(PRESETS) >= {"mixer_digits", "mixer_tiny"}


def test_unknown_preset_is_refused():
    with pytest.raises(MixerEdgeError, match="unknown model preset 'mixer_x9'"):
        preset("mixer_x9")
