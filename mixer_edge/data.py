"""Input data: the bundled digits set, image folders, single images, .npy/.npz arrays.

All sources end as float32 NCHW arrays preprocessed the way the model was trained; that
preprocessing is a small record (`Preprocess`) carried in the artifact's manifest, so the device
side can repeat it with numpy alone.

Every image goes through `decode_image` and every array through `array_inputs`. Their rules:

- Images: PNG, JPEG, BMP, GIF, TIFF or WebP (by content); EXIF orientation applied; the first
  frame of an animation or multi-page TIFF. 8-bit modes (1, L, P, RGB, CMYK, YCbCr, LAB, HSV) are
  converted by Pillow; 16-bit ones (I;16*, I) are scaled by their bit depth (a TIFF's
  BitsPerSample, else 16), wider or out-of-range integers refused; float (F) pixels are taken as
  [0, 1], values outside it or NaN/Inf refused. Alpha and transparency keys are composited over
  black (value x alpha). Colour -> grey is Pillow's ITU-R 601 luma; grey -> colour repeats the grey.
  Resized (and center-cropped, with crop_pct < 1: Preprocess.crop_box) with the model's filter at the
  image's precision: 8-bit images in 8 bits (as PIL-based training pipelines do), the others as float32
  clipped to [0, 1]. Colour profiles are ignored.
- Arrays: uint8 is 0..255 pixels and uint16 0..65535 pixels (both get preprocessed); float16/32/64
  are model inputs, NaN/Inf refused; any other dtype is refused. 3-D is one sample; NHWC
  (last dim == channels, dim 1 != channels) is transposed to NCHW. .npz labels (`y` or `labels`)
  are 1-D integers, one per sample, >= -1 (-1: unknown).
- Folders: class sub-folders (sorted names = label order) or loose images, not both; hidden
  files and folders are skipped; an empty class folder or an unreadable image is refused.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import Field, model_validator

from .errors import MixerEdgeError, reason
from .formats import Schema, parse, refuse

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP")  # the only Pillow decoders ever used
MAX_SIDE = 16384  # the largest input height/width a preprocessing record may ask for
RESAMPLE = ("nearest", "box", "bilinear", "hamming", "bicubic", "lanczos")  # Pillow's resampling filters
DIGITS = "digits"  # names the bundled data set wherever a data path is accepted (digits-train, digits-test)


@dataclass(frozen=True)
class Preprocess:
    """Image -> model input: resize (and center-crop, with crop_pct < 1) to `size`, scale pixels to [0, 1],
    then (x - mean) / std. `assumed`: nobody stated it; mixer-edge assumed it."""

    size: tuple[int, int] = (224, 224)
    channels: int = 3
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    resample: str = "bilinear"
    crop_pct: float = 1.0
    assumed: bool = False

    def crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """An image of width x height -> (resized width, resized height, left, top) of the crop (timm's eval
        transform: shorter side to floor(size / crop_pct), then a center crop of `size`); crop_pct 1: the whole
        image resized to `size`, no crop."""
        out_h, out_w = self.size
        if self.crop_pct >= 1.0:
            return out_w, out_h, 0, 0
        scale_h, scale_w = math.floor(out_h / self.crop_pct), math.floor(out_w / self.crop_pct)
        if height * scale_w <= width * scale_h:  # the height reaches its scale first
            rh, rw = scale_h, int(scale_h * width / height)
        else:
            rw, rh = scale_w, int(scale_w * height / width)
        rw, rh = max(rw, out_w), max(rh, out_h)
        return rw, rh, int(round((rw - out_w) / 2.0)), int(round((rh - out_h) / 2.0))  # torchvision's CenterCrop

    def describe(self) -> str:
        """In words, as `inspect` and the 'assumed' line print it."""
        def values(v):
            return ", ".join(f"{x:g}" for x in v) if len(set(v)) > 1 else f"{v[0]:g}"

        crop = f"crop {self.crop_pct:g}" if self.crop_pct < 1 else "no crop"
        return f"mean {values(self.mean)}, std {values(self.std)}, {self.resample}, {crop}"

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def check(self) -> None:
        """Refuse a record (from a manifest or a caller) that cannot describe a model input (schema: Preprocessing)."""
        parse(Preprocessing, self.to_dict(), "the model's preprocessing record",
              "rebuild the artifact, or fix 'preprocess' in its manifest")

    def normalize(self, unit: np.ndarray) -> np.ndarray:
        """[0, 1] NCHW pixels -> model input."""
        mean = np.asarray(self.mean, np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(self.std, np.float32).reshape(1, -1, 1, 1)
        return ((unit.astype(np.float32) - mean) / std).astype(np.float32)


class Preprocessing(Schema):
    """Image -> model input, repeated on the device with numpy alone: resize (with `crop_pct` < 1: the shorter
    side to size / crop_pct, then a center crop of `size`), scale pixels to [0, 1], then (x - mean) / std per
    channel."""

    size: list[Annotated[int, Field(ge=1, le=MAX_SIDE)]] = Field(
        min_length=2, max_length=2, description="[height, width] of the model input the images become; equal to "
        "input.shape[2:]")
    channels: Annotated[int, Field(ge=1, le=4096)] = Field(description="1 (grey) or 3 (RGB); equal to input.shape[1]")
    mean: list[float] = Field(min_length=1, description="per-channel mean subtracted, one per channel")
    std: list[Annotated[float, Field(gt=0)]] = Field(min_length=1, description="per-channel divisor, one per "
                                                     "channel, each > 0")
    resample: Literal[RESAMPLE] = Field(description="the PIL filter that resizes images: "
                                        + ", ".join(f"`{r}`" for r in RESAMPLE))
    crop_pct: Annotated[float, Field(gt=0, le=1)] = Field(1.0, description="the fraction of the resized image kept: "
                                                          "the shorter side is resized to floor(size / crop_pct), "
                                                          "then `size` is cut from the center (timm's eval "
                                                          "transform); 1: the whole image resized to `size`, no crop")
    assumed: bool = Field(False, description="true: mixer-edge assumed (some of) it, as the build said: neither the "
                          "user (--mean, --std, ...) nor a checkpoint or the preset's official weights stated it")

    @model_validator(mode="after")
    def _per_channel(self) -> "Preprocessing":
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) != self.channels:
                refuse(name, "has {n} values but channels is {channels}: one per channel", values,
                       n=len(values), channels=self.channels)
        with np.errstate(all="ignore"):
            pixels = (np.array([0.0, 1.0], np.float32)[:, None] - np.float32(self.mean)) / np.float32(self.std)
        if not np.isfinite(pixels).all():
            refuse("std", "maps [0, 1] pixels outside float32 (a zero or tiny std)", self.std)
        return self

    def to_preprocess(self) -> Preprocess:
        """The `data.Preprocess` that repeats this preprocessing."""
        return Preprocess(size=tuple(self.size), channels=self.channels, mean=tuple(self.mean), std=tuple(self.std),
                          resample=self.resample, crop_pct=self.crop_pct, assumed=self.assumed)


# The options that state a preprocessing field (the file's key, the manifest's field), in the order they are named.
STATED = (("size", "--size", "size"), ("mean", "--mean", "mean"), ("std", "--std", "std"),
          ("interpolation", "--interpolation", "resample"), ("crop_pct", "--crop-pct", "crop_pct"))


class PreprocessingFile(Schema):
    """How the model's training images became its inputs, as the --size, --mean, --std, --interpolation and
    --crop-pct options state it; each field optional, an option given beside the file overrides it. The
    manifest records the result (Preprocessing)."""

    size: Annotated[list[Annotated[int, Field(ge=1, le=MAX_SIDE)]], Field(min_length=2, max_length=2)] | None = \
        Field(None, description="[height, width] of the model input; must equal the model's")
    mean: Annotated[list[float], Field(min_length=1)] | None = Field(None, description="per-channel mean of [0, 1] "
                                                                     "pixels, one per channel")
    std: Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=1)] | None = Field(
        None, description="per-channel divisor, one per channel, each > 0")
    interpolation: Literal[RESAMPLE] | None = Field(None, description="the resize filter: "
                                                    + ", ".join(f"`{r}`" for r in RESAMPLE))
    crop_pct: Annotated[float, Field(gt=0, le=1)] | None = Field(None, description="the fraction kept by the "
                                                                 "center crop (timm's crop_pct; 1: no crop)")


@dataclass(frozen=True)
class StatedPreprocessing:
    """What the user stated about the preprocessing (None: not stated), and where (named in refusals)."""

    size: tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str | None = None
    crop_pct: float | None = None
    source: str = field(default="", compare=False)

    @classmethod
    def read(cls, path: str | Path) -> "StatedPreprocessing":
        """A --preprocessing file: .toml or .json holding PreprocessingFile's fields."""
        import json
        import tomllib

        path = Path(path)
        kind = {".toml": "TOML", ".json": "JSON"}.get(path.suffix.lower())
        if kind is None:
            raise MixerEdgeError(f"--preprocessing {path}: takes a .toml or .json file (fields: "
                                 f"{', '.join(key for key, _, _ in STATED)})")
        try:
            text = path.read_text(encoding="utf-8")
            data = tomllib.loads(text) if kind == "TOML" else json.loads(text)
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, ValueError, RecursionError) as exc:
            raise MixerEdgeError(f"preprocessing file {path} could not be read ({reason(exc)}): "
                                 f"pass a readable {kind} file") from None
        doc = parse(PreprocessingFile, data, f"preprocessing file {path}", "fix the file")
        return cls(**{key: tuple(v) if isinstance(v, list) else v for key, v in doc.model_dump().items()},
                   source=f"--preprocessing {path}")

    def over(self, base: "StatedPreprocessing") -> "StatedPreprocessing":
        """These statements, with `base`'s where these say nothing (options over a file)."""
        keys = [key for key, _, _ in STATED]
        merged = {key: getattr(self, key) if getattr(self, key) is not None else getattr(base, key) for key in keys}
        return StatedPreprocessing(**merged, source=", ".join(s for s in (base.source, self.source) if s))

    def settle(self, base: Preprocess, progress=print) -> Preprocess:
        """`base` (the model's own or assumed preprocessing) with these statements over it, checked as the manifest
        record; where `base` was assumed and a field stays unstated, says so in one line and records `assumed`."""
        if self.size is not None and tuple(self.size) != tuple(base.size):
            raise MixerEdgeError(f"{self.source or '--size'}: size {list(self.size)} is not the model's input size "
                                 f"{list(base.size)}: state [{base.size[0]}, {base.size[1]}] or leave it out")
        record = base.to_dict()
        record.update({name: list(v) if isinstance(v, tuple) else v for key, _, name in STATED
                       if (v := getattr(self, key)) is not None})
        pre = parse(Preprocessing, record, f"the preprocessing stated by {self.source or 'the caller'}",
                    f"state one mean and one std per channel of the model's input ({base.channels})").to_preprocess()
        left = [option for key, option, _ in STATED[1:] if getattr(self, key) is None] if base.assumed else []
        if left:
            how = "pass --mean/--std/--interpolation/--crop-pct or --preprocessing FILE" if len(left) == 4 else \
                "pass " + "/".join(left)
            progress(f"preprocessing assumed{'' if len(left) == 4 else ' in part'}: {pre.describe()}"
                     + ("" if len(left) == 4 else f" ({', '.join(left)} not stated)")
                     + f"; {how} if the model was trained otherwise")
        return replace(pre, assumed=bool(left))


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


def decode_image(path: Path, pre: Preprocess) -> np.ndarray:
    """One image file -> (C, H, W) float32 [0, 1] pixels of the model's size and channels (rules: above)."""
    from PIL import Image, ImageOps

    path = Path(path)
    pre.check()
    if pre.channels not in (1, 3):
        raise MixerEdgeError(f"image {path} cannot feed a {pre.channels}-channel model (images give 1 or 3 "
                             "channels): pass a .npy/.npz array")
    if not path.is_file():
        raise MixerEdgeError(f"image {path} is not a regular file (a folder, FIFO, device or broken link): "
                             "pass an image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's remarks on odd files are not the user's business ...
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # ... its size limit is
            Image.init()
            with Image.open(path, formats=[f for f in IMAGE_FORMATS if f in Image.OPEN]) as img:
                img.load()  # Pillow decodes lazily: make every decoding error happen here
                depth = int(np.ravel(getattr(img, "tag_v2", {}).get(258, 16))[0])  # a TIFF's BitsPerSample
                ImageOps.exif_transpose(img, in_place=True)
                plane = _plane(img, depth, path)
    except MixerEdgeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise MixerEdgeError(f"image {path} is too large to decode safely ({reason(exc)}): "
                             "downscale it to the model's input size or near it") from exc
    except Exception as exc:
        if isinstance(exc, ValueError) and "MAX_TEXT" in str(exc):
            raise MixerEdgeError(f"image {path} has more PNG text/ICC metadata than is safe to decode "
                                 f"({reason(exc)}): re-save it without metadata") from exc
        raise MixerEdgeError(f"image {path} could not be read ({reason(exc)}): "
                             "pass a valid PNG, JPEG, BMP, GIF, TIFF or WebP file") from exc
    height, width = pre.size
    target = "L" if pre.channels == 1 else "RGB"
    if plane.mode not in ("F", target):
        plane = plane.convert(target)  # Pillow's ITU-R 601 luma, or the grey repeated
    rw, rh, left, top = pre.crop_box(*plane.size)
    resized = np.asarray(plane.resize((rw, rh), Image.Resampling[pre.resample.upper()]), np.float32)
    small = resized[top:top + height, left:left + width]
    small = small[None] if small.ndim == 2 else small.transpose(2, 0, 1)
    unit = np.repeat(small, pre.channels // len(small), 0) / (1.0 if plane.mode == "F" else 255.0)
    return np.clip(unit, 0.0, 1.0).astype(np.float32)


def _plane(img, depth: int, path: Path):
    """A decoded PIL image -> one ready to resize: 8-bit L or RGB with any alpha composited over black,
    or one float (F) band of [0, 1] pixels."""
    from PIL import Image, ImageMode

    if img.mode == "F" or img.mode == "I" or img.mode.startswith("I;16"):
        values = np.asarray(img)
        if img.mode == "F":
            if not np.isfinite(values).all() or values.min() < 0 or values.max() > 1:
                raise MixerEdgeError(f"image {path} is a float image with values outside [0, 1] or NaN/Inf: "
                                     "float images must hold [0, 1] pixels; rescale it or save it as 8/16-bit")
            unit = values.astype(np.float32)
        else:
            if not 1 <= depth <= 16:
                raise MixerEdgeError(f"image {path} has {depth}-bit integer pixels: save it as an 8- or 16-bit image "
                                     "or a [0, 1] float TIFF")
            top = 2 ** depth - 1
            if values.min() < 0 or values.max() > top:
                raise MixerEdgeError(f"image {path} has pixel values outside its {depth}-bit range 0..{top}: "
                                     "save it as an 8- or 16-bit image or a [0, 1] float TIFF")
            unit = values.astype(np.float32) / top
        key = img.info.get("transparency")
        if isinstance(key, numbers.Integral):  # a 16-bit PNG's tRNS colour
            unit = unit * (values != key)
        return Image.fromarray(np.ascontiguousarray(unit, np.float32))
    mode = "L" if ImageMode.getmode(img.mode).basemode == "L" else "RGB"
    if not img.has_transparency_data:
        return img if img.mode == mode else img.convert(mode)
    with_alpha = img.convert(mode + "A")
    flat = Image.new(mode, img.size, 0)
    flat.paste(with_alpha.convert(mode), mask=with_alpha.getchannel("A"))
    return flat


def read_image(path: Path, pre: Preprocess) -> np.ndarray:
    """One image file -> (1, C, H, W) [0, 1] pixels, resized to the model's input."""
    return decode_image(path, pre)[None]


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
    """
    pre.check()
    text = str(source)
    if text.startswith(DIGITS + "-"):
        x, y = digits_split(text.split("-", 1)[1])
        return array_inputs(x, pre, text), y
    path = Path(source)
    if not path.exists():
        raise MixerEdgeError(f"input {path} does not exist: pass an image, a folder of images, a .npy/.npz, or digits-test")
    if path.is_dir():
        return _image_folder(path, pre)
    if path.suffix.lower() in (".npy", ".npz"):
        return _array_file(path, pre)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return pre.normalize(read_image(path, pre)), None
    raise MixerEdgeError(f"input {path} has an unknown type: use an image, a folder, .npy or .npz")


def _image_folder(root: Path, pre: Preprocess) -> tuple[np.ndarray, np.ndarray | None]:
    def images(folder: Path) -> list[Path]:
        return sorted(f for f in folder.iterdir() if not f.name.startswith(".")
                      and f.suffix.lower() in IMAGE_SUFFIXES and not f.is_dir())

    try:
        classes = sorted(d for d in root.iterdir() if not d.name.startswith(".") and d.is_dir())
        loose = images(root)
        members = [images(d) for d in classes]
    except OSError as exc:
        raise MixerEdgeError(f"folder {root} could not be listed ({reason(exc)}): check its permissions") from exc
    if classes and loose:
        raise MixerEdgeError(f"folder {root} holds both class sub-folders and loose images ({loose[0].name}, ...): "
                             "move the images into class folders")
    empty = [d.name for d, files in zip(classes, members) if not files]
    if empty:
        raise MixerEdgeError(f"class folders {', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''} in {root} "
                             "hold no images: add .png/.jpg files or remove them")
    files = [f for group in members for f in group] if classes else loose
    if not files:
        raise MixerEdgeError(f"folder {root} holds no images: use class sub-folders of .png/.jpg files")
    x = pre.normalize(np.stack([decode_image(f, pre) for f in files]))
    return x, (np.array([i for i, group in enumerate(members) for _ in group], np.int64) if classes else None)


def _array_file(path: Path, pre: Preprocess) -> tuple[np.ndarray, np.ndarray | None]:
    if not path.is_file():
        raise MixerEdgeError(f"array file {path} is not a regular file (a FIFO, device or broken link): "
                             "pass a .npy/.npz file")
    try:
        loaded, y = np.load(path, allow_pickle=False), None  # .npy or .npz by content, whatever the suffix
        if isinstance(loaded, np.ndarray):
            x = loaded
        else:
            with loaded:
                xkey = next((k for k in ("x", "images", "inputs") if k in loaded.files), None)
                if xkey is None:
                    raise MixerEdgeError(f"{path} has no array named x, images or inputs "
                                         f"(it has {', '.join(loaded.files) or 'none'}): save the inputs as x")
                ykey = next((k for k in ("y", "labels") if k in loaded.files), None)
                x, y = loaded[xkey], (loaded[ykey] if ykey else None)
    except MixerEdgeError:
        raise
    except Exception as exc:
        raise MixerEdgeError(f"array file {path} could not be read ({reason(exc)}): save it with numpy.save/savez") from exc
    x = array_inputs(x, pre, path)
    if y is not None and not (y.ndim == 1 and y.dtype.kind in "iu" and len(y) == len(x)
                              and y.min() >= -1 and y.max() <= np.iinfo(np.int64).max):
        raise MixerEdgeError(f"{path} has labels of {y.dtype} {y.shape}, not {len(x)} integers >= -1 "
                             f"(one per sample, -1 = unknown): save y as an int64 array of length {len(x)}")
    return x, (None if y is None else y.astype(np.int64))


def array_inputs(x: np.ndarray, pre: Preprocess, path: Path | str) -> np.ndarray:
    """An array from `path` (named in refusals) -> float32 NCHW model inputs (rules: above)."""
    scale = {"uint8": 255, "uint16": 65535}.get(x.dtype.name) if x.dtype.kind == "u" else None
    if scale is None and x.dtype.kind != "f":
        raise MixerEdgeError(f"input {path} has dtype {x.dtype}: save uint8 (or uint16) pixels, "
                             "or float32 model inputs")
    if x.ndim not in (3, 4):
        raise MixerEdgeError(f"input {path} has {x.ndim} dimensions {tuple(x.shape)}: pass (N, C, H, W) or "
                             "(N, H, W, C) samples, or one (C, H, W) sample")
    x = x[None] if x.ndim == 3 else x
    if len(x) == 0:
        raise MixerEdgeError(f"input {path} is empty (0 samples): pass at least one sample")
    if x.shape[-1] == pre.channels and x.shape[1] != pre.channels:  # NHWC
        x = x.transpose(0, 3, 1, 2)
    expected = (pre.channels, *pre.size)
    if tuple(x.shape[1:]) != expected:
        raise MixerEdgeError(f"input {path} has shape {tuple(x.shape)}; the model expects (N, {', '.join(map(str, expected))}): "
                             "pass arrays of that shape, or images (they are resized)")
    with np.errstate(over="ignore", invalid="ignore"):
        x = pre.normalize(x.astype(np.float32) / scale) if scale else x.astype(np.float32)
    if not np.isfinite(x).all():
        raise MixerEdgeError(f"input {path} contains NaN or Inf values (or values beyond float32): clean the data")
    return x
