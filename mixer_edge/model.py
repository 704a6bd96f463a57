"""MLP-Mixer (Tolstikhin et al., 2021) with timm's module and state_dict names.

Presets are registered by name, as in timm's `mlp_mixer.py`: the paper's S/32 ... H/14
(ImageNet, 224x224, 1000 classes) and small ones for the demo and the tests.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from .errors import MixerEdgeError


@dataclass(frozen=True)
class MixerConfig:
    """Everything that fixes a Mixer's architecture (and so its state_dict shapes)."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 512
    depth: int = 8
    mlp_ratio: tuple[float, float] = (0.5, 4.0)  # (token-mixing, channel-mixing) hidden / embed_dim

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mlp_ratio"] = list(self.mlp_ratio)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MixerConfig":
        return cls(**{**d, "mlp_ratio": tuple(d.get("mlp_ratio", (0.5, 4.0)))})


PRESETS: dict[str, MixerConfig] = {
    # Table 1 of the paper: patch resolution, hidden size C, depth; D_S = C/2, D_C = 4C.
    "mixer_s32": MixerConfig(patch_size=32, embed_dim=512, depth=8),
    "mixer_s16": MixerConfig(patch_size=16, embed_dim=512, depth=8),
    "mixer_b32": MixerConfig(patch_size=32, embed_dim=768, depth=12),
    "mixer_b16": MixerConfig(patch_size=16, embed_dim=768, depth=12),
    "mixer_l32": MixerConfig(patch_size=32, embed_dim=1024, depth=24),
    "mixer_l16": MixerConfig(patch_size=16, embed_dim=1024, depth=24),
    "mixer_h14": MixerConfig(patch_size=14, embed_dim=1280, depth=32),
    # The demo: 8x8 grey handwritten digits (scikit-learn's bundled set), 2x2 patches.
    "mixer_digits": MixerConfig(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=64, depth=4),
    # Small enough to build for every target in a unit test.
    "mixer_tiny": MixerConfig(img_size=32, patch_size=8, in_chans=3, num_classes=10, embed_dim=32, depth=2),
}


# The preprocessing of each preset's official weights, as timm's per-model pretrained config gives it (the paper's
# Mixers: Inception mean/std 0.5, bicubic, crop 0.875); the digits demo's is data.DIGITS_PREPROCESS. A preset not
# listed has none: a build of it says the preprocessing it assumed.
INCEPTION = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "resample": "bicubic", "crop_pct": 0.875}
PREPROCESSING: dict[str, dict] = {
    **{name: INCEPTION for name in ("mixer_s32", "mixer_s16", "mixer_b32", "mixer_b16", "mixer_l32", "mixer_l16")},
    "mixer_digits": {"mean": (0.5,), "std": (0.5,), "resample": "bilinear", "crop_pct": 1.0},
}


def preset(name: str, **overrides) -> MixerConfig:
    """The config registered as `name`, with fields replaced by `overrides` (e.g. num_classes)."""
    if name not in PRESETS:
        raise MixerEdgeError(f"unknown model preset '{name}': choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: MixerConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # B, tokens, channels


class MixerBlock(nn.Module):
    def __init__(self, dim: int, seq_len: int, mlp_ratio: tuple[float, float]):
        super().__init__()
        tokens_dim, channels_dim = (int(r * dim) for r in mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp_tokens = Mlp(seq_len, tokens_dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp_channels = Mlp(dim, channels_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.mlp_channels(self.norm2(x))


class MlpMixer(nn.Module):
    def __init__(self, cfg: MixerConfig):
        super().__init__()
        if cfg.img_size % cfg.patch_size:
            raise MixerEdgeError(f"img_size {cfg.img_size} is not a multiple of patch_size {cfg.patch_size}")
        self.cfg = cfg
        self.stem = PatchEmbed(cfg)
        self.blocks = nn.Sequential(
            *[MixerBlock(cfg.embed_dim, cfg.num_patches, cfg.mlp_ratio) for _ in range(cfg.depth)]
        )
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.blocks(self.stem(x)))
        return self.head(x.mean(dim=1))


def create_model(name_or_cfg: str | MixerConfig, **overrides) -> MlpMixer:
    """A randomly initialised Mixer for a preset name or an explicit config."""
    cfg = preset(name_or_cfg, **overrides) if isinstance(name_or_cfg, str) else replace(name_or_cfg, **overrides)
    return MlpMixer(cfg)


def count_params(model: nn.Module, exclude_head: bool = True) -> int:
    """Parameter count; the paper's Table 1 excludes the classifier head."""
    return sum(p.numel() for n, p in model.named_parameters() if not (exclude_head and n.startswith("head.")))
