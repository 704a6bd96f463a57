"""Input data: the bundled digits set, image folders, single images, .npy/.npz arrays.

All sources end as float32 NCHW arrays preprocessed the way the model was trained; that
preprocessing is a small record (`Preprocess`) carried in the artifact's manifest, so the device
side can repeat it with numpy alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import MixerEdgeError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
DIGITS = "digits"  # names the bundled data set wherever a data path is accepted (digits-train, digits-test)


@dataclass(frozen=True)
class Preprocess:
    """Image -> model input: resize to `size`, scale pixels to [0, 1], then (x - mean) / std."""

    size: tuple[int, int] = (224, 224)
    channels: int = 3
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    resample: str = "bilinear"

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        return cls(size=tuple(d["size"]), channels=d["channels"], mean=tuple(d["mean"]),
                   std=tuple(d["std"]), resample=d.get("resample", "bilinear"))

    def normalize(self, unit: np.ndarray) -> np.ndarray:
        """[0, 1] NCHW pixels -> model input."""
        mean = np.asarray(self.mean, np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(self.std, np.float32).reshape(1, -1, 1, 1)
        return ((unit.astype(np.float32) - mean) / std).astype(np.float32)


DIGITS_PREPROCESS = Preprocess(size=(8, 8), channels=1, mean=(0.5,), std=(0.5,))
DIGITS_LABELS = [str(i) for i in range(10)]


def digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits, split 80/20 stratified with a fixed seed (no download).

    Returns model inputs (N, 1, 8, 8) float32, preprocessed with DIGITS_PREPROCESS, and int64 labels.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test"):
        raise MixerEdgeError(f"unknown digits split '{split}': use digits-train or digits-test")
    bunch = load_digits()
    unit = (bunch.images / 16.0).astype(np.float32)[:, None]  # pixel values are 0..16
    x_train, x_test, y_train, y_test = train_test_split(
        unit, bunch.target, test_size=0.2, random_state=0, stratify=bunch.target
    )
    x, y = (x_train, y_train) if split == "train" else (x_test, y_test)
    return DIGITS_PREPROCESS.normalize(x), y.astype(np.int64)


def read_image(path: Path, pre: Preprocess) -> np.ndarray:
    """One image file -> (1, C, H, W) [0, 1] pixels, resized to the model's input."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("L" if pre.channels == 1 else "RGB")
            img = img.resize((pre.size[1], pre.size[0]), getattr(Image.Resampling, pre.resample.upper()))
            arr = np.asarray(img, dtype=np.float32) / 255.0
    except OSError as exc:
        raise MixerEdgeError(f"image {path} could not be read ({exc}): pass a PNG/JPEG file") from exc
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return arr[None]


def in_batches(fn, x: np.ndarray, batch: int) -> np.ndarray:
    """`fn` (a static-batch model) over all of `x`, `batch` rows at a time, the last chunk zero-padded."""
    outs = []
    for start in range(0, len(x), batch):
        chunk = x[start:start + batch]
        if len(chunk) < batch:
            chunk = np.concatenate([chunk, np.zeros((batch - len(chunk), *chunk.shape[1:]), chunk.dtype)])
        outs.append(fn(chunk))
    return np.concatenate(outs)[:len(x)]


def load_inputs(source: str | Path, pre: Preprocess) -> tuple[np.ndarray, np.ndarray | None]:
    """Model inputs (and labels where the source has them) from any supported source.

    `source` is `digits-train` / `digits-test`, an image file, an ImageFolder directory
    (one sub-directory per class, sorted names = label order), or a .npy/.npz array file.
    Arrays of uint8 are pixels and get preprocessed; float arrays are taken as model inputs.
    """
    text = str(source)
    if text.startswith(DIGITS + "-"):
        return digits_split(text.split("-", 1)[1])
    path = Path(source)
    if not path.exists():
        raise MixerEdgeError(f"input {path} does not exist: pass an image, a folder of images, a .npy/.npz, or digits-test")
    if path.is_dir():
        x, y = _image_folder(path, pre)
    elif path.suffix.lower() in (".npy", ".npz"):
        x, y = _array_file(path, pre)
    elif path.suffix.lower() in IMAGE_SUFFIXES:
        x, y = pre.normalize(read_image(path, pre)), None
    else:
        raise MixerEdgeError(f"input {path} has an unknown type: use an image, a folder, .npy or .npz")
    expected = (pre.channels, *pre.size)
    if x.ndim != 4 or tuple(x.shape[1:]) != expected:
        raise MixerEdgeError(f"input {path} has shape {tuple(x.shape)}; the model expects (N, {', '.join(map(str, expected))}): "
                             "pass arrays of that shape, or images (they are resized)")
    if not np.isfinite(x).all():
        raise MixerEdgeError(f"input {path} contains NaN or Inf values: clean the data")
    return x, y


def _image_folder(root: Path, pre: Preprocess) -> tuple[np.ndarray, np.ndarray | None]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if classes:
        files = [(f, i) for i, c in enumerate(classes) for f in sorted((root / c).iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    else:
        files = [(f, -1) for f in sorted(root.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise MixerEdgeError(f"folder {root} holds no images: use class sub-folders of .png/.jpg files")
    x = np.concatenate([read_image(f, pre) for f, _ in files])
    y = np.array([label for _, label in files], np.int64) if classes else None
    return pre.normalize(x), y


def _array_file(path: Path, pre: Preprocess) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        if path.suffix.lower() == ".npy":
            x, y = np.load(path, allow_pickle=False), None
        else:
            with np.load(path, allow_pickle=False) as npz:
                xkey = next((k for k in ("x", "images", "inputs") if k in npz.files), None)
                if xkey is None:
                    raise MixerEdgeError(f"{path} has no array named x, images or inputs (it has {', '.join(npz.files)})")
                x = npz[xkey]
                ykey = next((k for k in ("y", "labels") if k in npz.files), None)
                y = npz[ykey].astype(np.int64) if ykey else None
    except MixerEdgeError:
        raise
    except Exception as exc:
        raise MixerEdgeError(f"array file {path} could not be read ({exc}): save it with numpy.save/savez") from exc
    if x.ndim == 3:
        x = x[None]
    if x.dtype == np.uint8:
        if x.shape[-1] == pre.channels and x.shape[1] != pre.channels:  # NHWC pixels
            x = x.transpose(0, 3, 1, 2)
        x = pre.normalize(x / 255.0)
    return x.astype(np.float32), y
