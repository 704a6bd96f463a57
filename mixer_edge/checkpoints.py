"""Load Mixer weights from timm checkpoints (.pth / .safetensors) and the official Flax .npz.

Every loader returns a timm-named state_dict of tensors; `load_into` checks it against a model key
by key and names the first mismatch (or the first tensor holding NaN or Inf), so a checkpoint for
another preset, or a broken one, is refused, never half-loaded.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from pydantic import Field, model_validator

from .errors import MixerEdgeError, reason
from .formats import Schema, parse, refuse, safe_text
from .model import MixerConfig, MlpMixer
from .data import Preprocessing
from .runtime import ModelConfig

# Official Flax names (google-research/vision_transformer) -> timm names, and how to lay out the
# array: Dense kernels are (in, out) where torch Linear wants (out, in); the stem is HWIO.
_FLAX_BLOCK = {
    "LayerNorm_0/scale": "norm1.weight",
    "LayerNorm_0/bias": "norm1.bias",
    "token_mixing/Dense_0/kernel": "mlp_tokens.fc1.weight",
    "token_mixing/Dense_0/bias": "mlp_tokens.fc1.bias",
    "token_mixing/Dense_1/kernel": "mlp_tokens.fc2.weight",
    "token_mixing/Dense_1/bias": "mlp_tokens.fc2.bias",
    "LayerNorm_1/scale": "norm2.weight",
    "LayerNorm_1/bias": "norm2.bias",
    "channel_mixing/Dense_0/kernel": "mlp_channels.fc1.weight",
    "channel_mixing/Dense_0/bias": "mlp_channels.fc1.bias",
    "channel_mixing/Dense_1/kernel": "mlp_channels.fc2.weight",
    "channel_mixing/Dense_1/bias": "mlp_channels.fc2.bias",
}
_FLAX_TOP = {
    "stem/kernel": "stem.proj.weight",
    "stem/bias": "stem.proj.bias",
    "pre_head_layer_norm/scale": "norm.weight",
    "pre_head_layer_norm/bias": "norm.bias",
    "head/kernel": "head.weight",
    "head/bias": "head.bias",
}


def flax_to_timm(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Rename and re-lay-out an official Mixer .npz (flattened with '/') into timm's state_dict."""
    out = {}
    for key, value in arrays.items():
        match = re.fullmatch(r"MixerBlock_(\d+)/(.+)", key)
        if match and match.group(2) in _FLAX_BLOCK:
            name = f"blocks.{match.group(1)}.{_FLAX_BLOCK[match.group(2)]}"
        elif key in _FLAX_TOP:
            name = _FLAX_TOP[key]
        else:
            name = key  # left as is: load_into reports it as unexpected
        if key == "stem/kernel":
            value = value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
        elif key.endswith("/kernel"):
            value = value.T
        out[name] = torch.from_numpy(np.ascontiguousarray(value))
    return out


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint by its suffix, without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise MixerEdgeError(f"checkpoint {path} does not exist: pass the path of a .pth, .safetensors or .npz file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                return flax_to_timm({k: npz[k] for k in npz.files})
        if suffix in (".pth", ".pt", ".bin"):
            obj = torch.load(path, map_location="cpu", weights_only=True)
            for wrapper in ("state_dict", "model", "state_dict_ema"):
                if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
                    obj = obj[wrapper]
                    break
            return _tensors_only(obj, path)
    except MixerEdgeError:
        raise
    except Exception as exc:  # corrupt or truncated file: say which file, not where it broke
        raise MixerEdgeError(f"checkpoint {path} could not be read ({type(exc).__name__}: {reason(exc)}): check "
                             "that it is a whole, unmodified copy") from exc
    raise MixerEdgeError(f"checkpoint {path} has an unknown suffix '{suffix}': use .pth, .safetensors or .npz")


def _tensors_only(obj, path: Path) -> dict[str, torch.Tensor]:
    """`obj` if it is a state_dict (names -> tensors); else one line naming what is not a tensor."""
    fix = "save the model's state_dict (names -> tensors) alone, or wrapped as {'state_dict': ...}"
    if not isinstance(obj, dict):
        raise MixerEdgeError(f"checkpoint {path} holds a {type(obj).__name__}, not a state_dict: {fix}")
    for key, value in obj.items():
        if not isinstance(key, str):
            raise MixerEdgeError(f"checkpoint {path}: key {safe_text(repr(key), 60)} is a {type(key).__name__}, not a "
                                 f"name: {fix}")
        if not isinstance(value, torch.Tensor):
            raise MixerEdgeError(f"checkpoint {path}: entry {safe_text(repr(key), 60)} holds a {type(value).__name__}, "
                                 f"not a tensor: {fix}")
    return obj


class CheckpointMetadata(Schema):
    """The metadata `mixer-edge train` writes into a .safetensors header (each value JSON-encoded), so that
    `--checkpoint FILE` alone is enough to compile it. It is mixer-edge's when it has a `preset`; then it is
    validated strictly (unknown keys refused). Other tools' metadata, such as timm's `{"format": "pt"}`, has no
    `preset` and is ignored: the weights still load, with --model naming their preset."""

    preset: str = Field(min_length=1, description="the preset the model was trained as (its name for --model)")
    config: ModelConfig | None = Field(None, description="its architecture (used instead of the preset's when "
                                       "--model is absent or names the same preset)")
    preprocess: Preprocessing | None = Field(None, description="how its training images became inputs; absent: "
                                             "the preset's official one, else assumed (mean 0.5, std 0.5, "
                                             "bilinear, no crop) and said so")
    labels: list[str] | None = Field(None, description="class names, one per class; absent: 0, 1, 2, ...")
    dataset: str | None = Field(None, description="what it was trained on, in words (`sklearn digits ...` also "
                                "makes the digits test split its verification data)")
    test_accuracy: float | None = Field(None, ge=0, le=1, description="its top-1 accuracy on the test split")
    epochs: int | None = Field(None, ge=1, description="training epochs")
    format: str | None = Field(None, description="what timm and safetensors tools write (`pt`); ignored")

    @model_validator(mode="after")
    def _consistent(self) -> "CheckpointMetadata":
        cfg = self.config
        if cfg is not None and self.labels is not None and len(self.labels) != cfg.num_classes:
            refuse("labels", "has {n} labels but config.num_classes is {classes}: one label per class", self.labels,
                   n=len(self.labels), classes=cfg.num_classes)
        if cfg is not None and self.preprocess is not None and (self.preprocess.channels, self.preprocess.size) != (
                cfg.in_chans, [cfg.img_size] * 2):
            refuse("preprocess", "makes {channels}-channel {size} inputs but config says {chans} channels of "
                   "{img}x{img}", self.preprocess.model_dump(), channels=self.preprocess.channels,
                   size=self.preprocess.size,
                   chans=cfg.in_chans, img=cfg.img_size)
        return self


def checkpoint_metadata(path: str | Path) -> CheckpointMetadata | None:
    """The mixer-edge metadata of checkpoint `path`, validated; None for a checkpoint of another tool (no
    `preset` in its metadata: timm's {"format": "pt"}, or none at all) or another format than .safetensors."""
    meta = read_metadata(path)
    if "preset" not in meta:
        return None
    return parse(CheckpointMetadata, meta, f"checkpoint {path} metadata",
                 "re-save it with mixer-edge (mixer_edge.train.save_checkpoint), or pass --model with a checkpoint "
                 "without it")


def read_metadata(path: str | Path) -> dict:
    """The metadata of a .safetensors header, JSON values decoded (empty for other files), unvalidated: see
    `checkpoint_metadata`.

    mixer-edge stores its preset, config, preprocessing and labels there; timm stores {"format": "pt"}.
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise MixerEdgeError(f"checkpoint {path} could not be read ({type(exc).__name__}: {reason(exc)}): check "
                             "that it is a whole, unmodified copy") from exc
    return {k: _json_or_text(v) for k, v in meta.items()}


def _json_or_text(value: str):
    try:
        return json.loads(value)
    except (ValueError, RecursionError):
        return value


def load_into(model: MlpMixer, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> MlpMixer:
    """Copy `state_dict` into `model` after checking every key and shape."""
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key not in state_dict:
            raise MixerEdgeError(f"{source} does not fit this model: key '{key}' {tuple(tensor.shape)} is missing: "
                                 "choose the preset it was trained as (--model)")
        got = tuple(state_dict[key].shape)
        if got != tuple(tensor.shape):
            raise MixerEdgeError(
                f"{source} does not fit this model: '{key}' is {got} in the checkpoint but the model expects "
                f"{tuple(tensor.shape)} (choose the preset it was trained as, or set --num-classes)"
            )
    extra = sorted(set(state_dict) - set(expected))
    if extra:
        raise MixerEdgeError(f"{source} does not fit this model: unexpected key '{extra[0]}' ({len(extra)} in all): "
                             "choose the preset it was trained as (--model)")
    for key in expected:
        tensor = state_dict[key]
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
            raise MixerEdgeError(f"{source}: tensor '{key}' holds NaN or Inf values: the checkpoint is corrupt or its "
                                 "training diverged; use an earlier checkpoint")
    model.load_state_dict({k: v.float() for k, v in state_dict.items()})
    return model.eval()


def load_checkpoint(path: str | Path, cfg: MixerConfig) -> MlpMixer:
    """A Mixer of config `cfg` with the weights of checkpoint `path`."""
    return load_into(MlpMixer(cfg), read_state_dict(path), source=f"checkpoint {path}")
