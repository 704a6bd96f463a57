"""Load Mixer weights from timm checkpoints (.pth / .safetensors) and the official Flax .npz.

Every loader returns a timm-named state_dict; `load_into` checks it against a model key by key
and names the first mismatch, so a checkpoint for another preset is refused, never half-loaded.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from .errors import MixerEdgeError, reason
from .model import MixerConfig, MlpMixer

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
            if not isinstance(obj, dict):
                raise MixerEdgeError(f"checkpoint {path} holds a {type(obj).__name__}, not a state_dict")
            return obj
    except MixerEdgeError:
        raise
    except Exception as exc:  # corrupt or truncated file: say which file, not where it broke
        raise MixerEdgeError(f"checkpoint {path} could not be read ({type(exc).__name__}: {reason(exc)}): check "
                             "that it is a whole, unmodified copy") from exc
    raise MixerEdgeError(f"checkpoint {path} has an unknown suffix '{suffix}': use .pth, .safetensors or .npz")


def read_metadata(path: str | Path) -> dict:
    """The metadata of a .safetensors header, JSON values decoded (empty for other files).

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
    except ValueError:
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
    model.load_state_dict({k: v.float() for k, v in state_dict.items()})
    return model.eval()


def load_checkpoint(path: str | Path, cfg: MixerConfig) -> MlpMixer:
    """A Mixer of config `cfg` with the weights of checkpoint `path`."""
    return load_into(MlpMixer(cfg), read_state_dict(path), source=f"checkpoint {path}")
