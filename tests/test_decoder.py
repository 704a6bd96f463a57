"""The one image decoder and the one array normaliser (mixer_edge/data.py): real files, every mode and dtype."""

import os
import tempfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image, PngImagePlugin

from mixer_edge.data import Preprocess, _plane, decode_image, load_inputs
from mixer_edge.errors import MixerEdgeError

from conftest import examples

GREY = Preprocess(size=(4, 6), channels=1, mean=(0.5,), std=(0.5,))
RGB = Preprocess(size=(4, 6), channels=3)
PIXELS = np.random.default_rng(0).integers(0, 256, (4, 6, 3), dtype=np.uint8)


def refused(source, pre, *words):
    """load_inputs(source) is one MixerEdgeError line holding `words`, with no warning printed."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(MixerEdgeError) as info:
            load_inputs(source, pre)
    message = str(info.value)
    assert "\n" not in message and not caught, (message, [str(w.message) for w in caught])
    for word in words:
        assert word in message, message
    return message


# ---- images --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, array", [
    ("g16.png", np.full((4, 6), 40000, np.uint16)),           # Pillow mode I;16
    ("g16b.tif", np.full((4, 6), 40000, ">u2")),              # I;16B
])
def test_16_bit_images_are_scaled_by_their_depth_not_clipped(tmp_path, name, array):
    Image.fromarray(array).save(tmp_path / name)
    assert np.allclose(decode_image(tmp_path / name, GREY), 40000 / 65535)
    assert np.allclose(decode_image(tmp_path / name, RGB), 40000 / 65535) and decode_image(tmp_path / name, RGB).shape == (3, 4, 6)
    x, _ = load_inputs(tmp_path / name, GREY)
    assert np.allclose(x, (40000 / 65535 - 0.5) / 0.5, atol=1e-6)


def test_32_bit_integer_images_are_refused(tmp_path):
    Image.fromarray(np.full((4, 6), 70000, np.int32)).save(tmp_path / "i32.tif")  # Pillow mode I
    refused(tmp_path / "i32.tif", GREY, "i32.tif", "32-bit integer pixels")


def test_16_bit_png_transparency_key_is_composited_over_black(tmp_path):
    array = np.full((4, 6), 40000, np.uint16)
    array[0, 0] = 7
    Image.fromarray(array).save(tmp_path / "t.png", transparency=7)
    unit = decode_image(tmp_path / "t.png", GREY)
    assert unit[0, 0, 0] == 0 and np.allclose(unit[0].flat[1:], 40000 / 65535)


def test_float_images_are_unit_pixels_and_out_of_range_is_refused(tmp_path):
    array = np.linspace(0, 1, 24, dtype=np.float32).reshape(4, 6)
    Image.fromarray(array).save(tmp_path / "f.tif")  # Pillow mode F
    assert np.allclose(decode_image(tmp_path / "f.tif", GREY)[0], array)
    for name, bad in (("over.tif", 1.5), ("nan.tif", np.nan), ("neg.tif", -0.1)):
        Image.fromarray(np.full((4, 6), bad, np.float32)).save(tmp_path / name)
        refused(tmp_path / name, GREY, name, "[0, 1]")


def test_exif_orientation_is_applied(tmp_path):
    grey = PIXELS[..., 0]
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: rotate 90 degrees clockwise to display
    Image.fromarray(grey).save(tmp_path / "turned.png", exif=exif)
    upright = decode_image(tmp_path / "turned.png", Preprocess(size=(6, 4), channels=1, mean=(0.5,), std=(0.5,)))
    assert np.allclose(upright[0], np.rot90(grey, -1) / 255)


def test_palette_images_equal_their_rgb_conversion(tmp_path):
    palette = Image.fromarray(PIXELS).quantize(16)
    palette.save(tmp_path / "p.png")
    assert np.allclose(decode_image(tmp_path / "p.png", RGB), np.asarray(palette.convert("RGB")).transpose(2, 0, 1) / 255)
    palette.save(tmp_path / "pt.png", transparency=0)  # palette entry 0 is transparent
    rgb = np.asarray(palette.convert("RGB")).transpose(2, 0, 1) / 255
    hidden = np.asarray(palette) == 0
    assert hidden.any()
    assert np.allclose(decode_image(tmp_path / "pt.png", RGB), np.where(hidden, 0.0, rgb))


@pytest.mark.parametrize("mode, name", [("RGBA", "a.png"), ("LA", "la.png"), ("PA", "pa.tif"), ("RGBA", "a.webp")])
def test_alpha_is_composited_over_black(tmp_path, mode, name):
    rgba = np.concatenate([PIXELS, np.array([0, 64, 128, 255, 255, 255], np.uint8)[None, :, None].repeat(4, 0)], -1)
    image = Image.fromarray(rgba).convert(mode)
    image.save(tmp_path / name, **({"lossless": True} if name.endswith("webp") else {}))
    colour = np.asarray(image.convert("RGBA"), np.float32) / 255
    expected = (colour[..., :3] * colour[..., 3:]).transpose(2, 0, 1)
    assert np.allclose(decode_image(tmp_path / name, RGB), expected, atol=0.5 / 255 + 1e-6)  # composited in 8 bits
    assert np.allclose(decode_image(tmp_path / name, RGB)[:, :, 0], 0)  # the fully transparent column


@pytest.mark.parametrize("mode, name", [("CMYK", "c.tif"), ("CMYK", "c.jpg"), ("YCbCr", "y.tif"), ("LAB", "lab.tif"),
                                        ("1", "b.png"), ("L", "l.bmp"), ("RGB", "rgb.gif")])
def test_colour_modes_equal_pillows_rgb_conversion(tmp_path, mode, name):
    image = Image.fromarray(PIXELS).convert(mode)
    image.save(tmp_path / name)
    with Image.open(tmp_path / name) as saved:
        expected = np.asarray(saved.convert("RGB"), np.float32).transpose(2, 0, 1) / 255
    assert np.allclose(decode_image(tmp_path / name, RGB), expected, atol=1e-6)


def test_hsv_converts_to_rgb():  # no file format stores HSV: the decoder's mode step, on the image itself
    hsv = Image.fromarray(PIXELS).convert("HSV")
    assert np.array_equal(np.asarray(_plane(hsv, 8, Path("hsv"))), np.asarray(hsv.convert("RGB")))


def test_colour_to_grey_is_luma_and_grey_to_colour_repeats(tmp_path):
    Image.fromarray(PIXELS).save(tmp_path / "c.png")
    luma = PIXELS.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32) / 255
    assert np.allclose(decode_image(tmp_path / "c.png", GREY)[0], luma, atol=0.5 / 255 + 1e-6)  # 8-bit luma
    Image.fromarray(PIXELS[..., 0]).save(tmp_path / "g.png")
    assert np.allclose(decode_image(tmp_path / "g.png", RGB), PIXELS[..., 0][None].repeat(3, 0) / 255)


def test_first_frame_of_animations_and_multipage_tiffs(tmp_path):
    frames = [Image.new("RGB", (6, 4), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    for name in ("anim.gif", "pages.tif"):
        frames[0].save(tmp_path / name, save_all=True, append_images=frames[1:])
        with Image.open(tmp_path / name) as image:
            assert image.n_frames == 2
        assert np.allclose(decode_image(tmp_path / name, RGB), np.array([1, 0, 0])[:, None, None])


def test_resizing_uses_the_model_size_and_stays_in_unit_range(tmp_path):
    Image.fromarray(np.kron(PIXELS, np.ones((5, 5, 1), np.uint8))).save(tmp_path / "big.png")
    for resample in ("nearest", "bilinear", "bicubic", "lanczos"):
        pre = Preprocess(size=(7, 3), channels=3, resample=resample)
        unit = decode_image(tmp_path / "big.png", pre)
        assert unit.shape == (3, 7, 3) and unit.dtype == np.float32 and 0 <= unit.min() and unit.max() <= 1


@pytest.mark.parametrize("limit", [10, 20])  # 24 pixels: over twice the limit (Pillow's error), over it (its warning)
def test_decompression_bombs_are_one_line(tmp_path, monkeypatch, limit):
    Image.fromarray(PIXELS).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    refused(tmp_path / "bomb.png", RGB, "bomb.png", "too large to decode safely", "downscale")


@pytest.mark.parametrize("limit", ["MAX_TEXT_CHUNK", "MAX_TEXT_MEMORY"])
def test_png_text_chunk_limits_are_one_line(tmp_path, monkeypatch, limit):
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "x" * 5000, zip=True)
    Image.fromarray(PIXELS).save(tmp_path / "meta.png", pnginfo=info)
    monkeypatch.setattr(PngImagePlugin, limit, 100)
    refused(tmp_path / "meta.png", RGB, "meta.png", "metadata", "re-save it")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """A PNG chunk with a correct CRC (so only its content is wrong)."""
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def encoded(image: Image.Image, suffix: str = ".png", **options) -> bytes:
    path = Path(tempfile.mkdtemp()) / f"image{suffix}"
    image.save(path, **options)
    return path.read_bytes()


def png_bytes() -> bytes:
    return encoded(Image.fromarray(PIXELS))


@pytest.mark.parametrize("name, content", [
    ("cut.png", lambda: png_bytes()[:-30]),                                  # truncated in IDAT
    ("crc.png", lambda: png_bytes()[:40] + bytes([png_bytes()[40] ^ 1]) + png_bytes()[41:]),
    ("zeros.png", lambda: b"\x89PNG\r\n\x1a\n" + b"\x00" * 20),
    ("text.jpg", lambda: b"hello"),
    ("empty.gif", lambda: b""),
    ("cut.jpg", lambda: encoded(Image.fromarray(PIXELS), ".jpg")[:200]),
    ("eps.png", lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 6 4\n"),  # never handed to Ghostscript
    ("zlib.png", lambda: png_bytes()[:33] + png_chunk(b"IDAT", b"\x78\x9cnot deflate") + png_chunk(b"IEND", b"")),
])
def test_corrupt_images_are_one_line(tmp_path, name, content):
    (tmp_path / name).write_bytes(content())
    refused(tmp_path / name, RGB, name, "could not be read")


def test_images_only_feed_one_or_three_channel_models(tmp_path):
    Image.fromarray(PIXELS).save(tmp_path / "c.png")
    refused(tmp_path / "c.png", Preprocess(size=(4, 6), channels=2, mean=(0.5,) * 2, std=(0.5,) * 2),
            "c.png", "2-channel", ".npy")


@pytest.mark.parametrize("pre, words", [
    (Preprocess(size=(0, 6), channels=1, mean=(0.5,), std=(0.5,)), "size"),
    (Preprocess(size=(-4, 6), channels=1, mean=(0.5,), std=(0.5,)), "size"),
    (Preprocess(size=(10 ** 9, 6), channels=1, mean=(0.5,), std=(0.5,)), "size"),
    (Preprocess(size=(4.5, 6), channels=1, mean=(0.5,), std=(0.5,)), "size"),
    (Preprocess(size=(4, 6), channels=1, mean=(0.5,), std=(0.0,)), "std"),
    (Preprocess(size=(4, 6), channels=3, mean=(0.5,), std=(0.5,)), "mean"),
    (Preprocess(size=(4, 6), channels=1, mean=(0.5,), std=(0.5,), resample="cubic"), "resample"),
])
def test_bad_preprocessing_records_are_refused_before_any_resize(tmp_path, pre, words):
    Image.fromarray(PIXELS).save(tmp_path / "c.png")
    refused(tmp_path / "c.png", pre, "preprocessing record", words)
    np.save(tmp_path / "x.npy", np.zeros((1, 1, 4, 6), np.float32))
    refused(tmp_path / "x.npy", pre, "preprocessing record", words)


# ---- folders -------------------------------------------------------------------------------------

def test_folder_names_the_image_it_cannot_decode(tmp_path):
    (tmp_path / "cat").mkdir()
    Image.fromarray(PIXELS).save(tmp_path / "cat" / "0.png")
    (tmp_path / "cat" / "1.png").write_bytes(png_bytes()[:-30])
    refused(tmp_path, RGB, "1.png", "could not be read")


def test_folder_skips_hidden_files_and_folders(tmp_path):
    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        Image.fromarray(PIXELS).save(tmp_path / label / "0.png")
        (tmp_path / label / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
        (tmp_path / label / ".DS_Store").write_bytes(b"Bud1")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    (tmp_path / ".DS_Store").write_bytes(b"Bud1")
    x, y = load_inputs(tmp_path, RGB)
    assert x.shape == (2, 3, 4, 6) and list(y) == [0, 1]


def test_folder_refuses_empty_classes_by_name_and_mixed_layouts(tmp_path):
    for label in ("cat", "dog", "emu"):
        (tmp_path / label).mkdir()
    Image.fromarray(PIXELS).save(tmp_path / "cat" / "0.png")
    (tmp_path / "emu" / "notes.txt").write_text("no images")
    message = refused(tmp_path, RGB, "dog", "emu", "hold no images")
    assert "cat" not in message.split(" in ")[0]
    Image.fromarray(PIXELS).save(tmp_path / "dog" / "0.png")
    Image.fromarray(PIXELS).save(tmp_path / "emu" / "0.png")
    Image.fromarray(PIXELS).save(tmp_path / "stray.png")
    refused(tmp_path, RGB, "stray.png", "both class sub-folders and loose images")


def test_folder_symlink_loops_and_fifos_end(tmp_path):
    (tmp_path / "cat").mkdir()
    Image.fromarray(PIXELS).save(tmp_path / "cat" / "0.png")
    (tmp_path / "cat" / "loop").symlink_to(tmp_path / "cat")       # a folder inside itself: not descended
    (tmp_path / "up").symlink_to(tmp_path)                          # a class folder that is the root
    (tmp_path / "up2").symlink_to(tmp_path / "up")
    (tmp_path / "self").symlink_to(tmp_path / "self")               # a link to itself
    refused(tmp_path, RGB, "up", "hold no images")                   # `up` holds folders, not images
    os.remove(tmp_path / "up")
    os.remove(tmp_path / "up2")
    x, y = load_inputs(tmp_path, RGB)
    assert x.shape == (1, 3, 4, 6) and list(y) == [0]
    (tmp_path / "cat" / "self.png").symlink_to(tmp_path / "cat" / "self.png")
    refused(tmp_path, RGB, "self.png", "not a regular file")
    os.remove(tmp_path / "cat" / "self.png")
    os.mkfifo(tmp_path / "cat" / "pipe.png")
    refused(tmp_path, RGB, "pipe.png", "not a regular file")
    os.mkfifo(tmp_path / "pipe.npy")
    refused(tmp_path / "pipe.npy", RGB, "pipe.npy", "not a regular file")


# ---- arrays --------------------------------------------------------------------------------------

def test_uint16_arrays_are_16_bit_pixels_in_either_layout(tmp_path):
    np.save(tmp_path / "nhwc.npy", np.full((2, 4, 6, 3), 40000, np.uint16))
    x, _ = load_inputs(tmp_path / "nhwc.npy", RGB)
    assert x.shape == (2, 3, 4, 6) and np.allclose(x, (40000 / 65535 - 0.5) / 0.5, atol=1e-6)
    np.save(tmp_path / "nchw.npy", np.full((2, 1, 4, 6), 65535, np.uint16))
    assert np.allclose(load_inputs(tmp_path / "nchw.npy", GREY)[0], 1.0)


def test_float_arrays_are_model_inputs_in_either_layout(tmp_path):
    nchw = np.random.default_rng(1).standard_normal((2, 3, 4, 6)).astype(np.float16)
    np.save(tmp_path / "nhwc.npy", nchw.transpose(0, 2, 3, 1))
    x, _ = load_inputs(tmp_path / "nhwc.npy", RGB)
    assert x.dtype == np.float32 and np.array_equal(x, nchw.astype(np.float32))
    np.save(tmp_path / "one.npy", nchw[0].astype(np.float64))  # one (C, H, W) sample
    assert load_inputs(tmp_path / "one.npy", RGB)[0].shape == (1, 3, 4, 6)
    np.save(tmp_path / "huge.npy", np.full((1, 3, 4, 6), 1e300))
    refused(tmp_path / "huge.npy", RGB, "huge.npy", "NaN or Inf")


@pytest.mark.parametrize("array", [
    np.zeros((1, 3, 4, 6), np.int16), np.zeros((1, 3, 4, 6), np.int64), np.zeros((1, 3, 4, 6), np.uint32),
    np.zeros((1, 3, 4, 6), np.int8), np.zeros((1, 3, 4, 6), bool), np.zeros((1, 3, 4, 6), np.complex64),
    np.zeros((1, 3, 4, 6), "datetime64[s]"), np.zeros((1, 3, 4, 6), "timedelta64[s]"), np.zeros((1, 3, 4, 6), "U3"),
    np.zeros((1, 3, 4, 6), "S3"), np.zeros((1, 3, 4, 6), [("a", np.float32)]), np.zeros((1, 3, 4, 6), "V4"),
], ids=lambda a: str(a.dtype))
def test_other_dtypes_are_refused_naming_the_dtype(tmp_path, array):
    np.save(tmp_path / "a.npy", array)
    refused(tmp_path / "a.npy", RGB, "a.npy", f"dtype {array.dtype}", "uint8", "float32")


def test_object_arrays_are_never_unpickled(tmp_path):
    np.save(tmp_path / "o.npy", np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    refused(tmp_path / "o.npy", RGB, "o.npy", "could not be read")


@pytest.mark.parametrize("shape, words", [
    ((0, 3, 4, 6), "empty (0 samples)"), ((0, 4, 6, 3), "empty (0 samples)"), ((4, 6), "2 dimensions"),
    ((), "0 dimensions"), ((1, 1, 3, 4, 6), "5 dimensions"), ((2, 3, 6, 4), "has shape"),
])
def test_bad_array_shapes_are_one_line(tmp_path, shape, words):
    np.save(tmp_path / "s.npy", np.zeros(shape, np.uint8))
    refused(tmp_path / "s.npy", RGB, "s.npy", words)


def test_npz_keys_and_labels(tmp_path):
    x = np.zeros((3, 3, 4, 6), np.float32)
    np.savez(tmp_path / "ok.npz", inputs=x, y=np.array([0, 1, 2], np.uint8))
    assert list(load_inputs(tmp_path / "ok.npz", RGB)[1]) == [0, 1, 2]
    np.savez(tmp_path / "ok.npz", inputs=x, labels=np.array([0, -1, 2], np.int32))
    got, y = load_inputs(tmp_path / "ok.npz", RGB)
    assert got.shape == (3, 3, 4, 6) and y.dtype == np.int64 and list(y) == [0, -1, 2]
    np.savez(tmp_path / "nokey.npz", pixels=x)
    refused(tmp_path / "nokey.npz", RGB, "nokey.npz", "no array named x", "pixels")
    for name, labels in (("float.npz", np.array([0.0, 1.0, 2.0])), ("short.npz", np.array([0, 1])),
                         ("neg.npz", np.array([0, -2, 1])), ("flat.npz", np.zeros((3, 1), np.int64)),
                         ("bool.npz", np.array([True, False, True])),
                         ("big.npz", np.array([0, 1, 2 ** 64 - 1], np.uint64))):
        np.savez(tmp_path / name, x=x, y=labels)
        refused(tmp_path / name, RGB, name, "labels", "one per sample")


def test_the_digits_set_is_checked_against_the_model_like_any_array():
    refused("digits-test", RGB, "digits-test", "has shape (360, 1, 8, 8)", "(N, 3, 4, 6)")


def test_array_files_are_read_by_content_whatever_the_suffix(tmp_path):
    np.savez(tmp_path / "zip.npz", x=np.ones((2, 3, 4, 6), np.float32))
    os.rename(tmp_path / "zip.npz", tmp_path / "zip.npy")
    assert load_inputs(tmp_path / "zip.npy", RGB)[0].shape == (2, 3, 4, 6)
    (tmp_path / "cut.npy").write_bytes((tmp_path / "zip.npy").read_bytes()[:100])
    refused(tmp_path / "cut.npy", RGB, "cut.npy", "could not be read")


# ---- properties: whatever the bytes, a model input or one line -----------------------------------

def model_input_or_one_line(path: Path, pre: Preprocess) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning printed for a bad input fails the test
        try:
            x, _ = load_inputs(path, pre)
        except MixerEdgeError as exc:
            assert "\n" not in str(exc) and path.name in str(exc)
            event("refused")
            return
    event("accepted")
    assert x.dtype == np.float32 and x.ndim == 4 and len(x) >= 1 and x.shape[1:] == (pre.channels, *pre.size)
    assert np.isfinite(x).all()


PIXEL_DTYPES = st.sampled_from([np.dtype(t) for t in (np.uint8, np.uint16, np.float16, np.float32, np.float64, ">f4")])
OTHER_DTYPES = st.one_of(hnp.scalar_dtypes(), hnp.byte_string_dtypes(max_len=3), hnp.unicode_string_dtypes(max_len=3),
                         hnp.array_dtypes(max_size=2))
DTYPES = st.integers(0, 2).flatmap(lambda i: PIXEL_DTYPES if i else OTHER_DTYPES)  # 2/3 pixel or input dtypes


def shapes(pre: Preprocess):
    """Shapes around the model's: NCHW, NHWC, one sample, any batch (0 too), and anything else."""
    c, (h, w) = pre.channels, pre.size
    batch = st.integers(0, 3)
    return st.one_of(batch.map(lambda n: (n, c, h, w)), batch.map(lambda n: (n, h, w, c)), st.just((c, h, w)),
                     st.lists(st.sampled_from([0, 1, 2, 3, 4, 6]), max_size=5).map(tuple))


@pytest.mark.fuzz
@settings(max_examples=examples(300))
@given(pre=st.sampled_from([GREY, RGB]), data=st.data())
def test_any_array_is_a_model_input_or_one_line(tmp_path_factory, pre, data):
    array = data.draw(hnp.arrays(data.draw(DTYPES), data.draw(shapes(pre))))
    path = tmp_path_factory.mktemp("arr") / "a.npy"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy's note that unicode field names need format 3.0
        np.save(path, array)
    model_input_or_one_line(path, pre)


@pytest.mark.fuzz
@settings(max_examples=examples(300))
@given(pre=st.sampled_from([GREY, RGB]), data=st.data())
def test_any_mangled_png_is_a_model_input_or_one_line(tmp_path_factory, pre, data):
    content = bytearray(data.draw(st.sampled_from(VALID_PNGS)))
    for _ in range(data.draw(st.integers(0, 3))):
        content[data.draw(st.integers(0, len(content) - 1))] = data.draw(st.integers(0, 255))
    content = content[:data.draw(st.integers(0, len(content)))] if data.draw(st.booleans()) else content
    path = tmp_path_factory.mktemp("png") / "m.png"
    path.write_bytes(bytes(content) + data.draw(st.binary(max_size=8)))
    model_input_or_one_line(path, pre)


VALID_PNGS = [encoded(Image.fromarray(PIXELS)), encoded(Image.fromarray(PIXELS).convert("RGBA")),
              encoded(Image.fromarray(PIXELS).quantize(8), transparency=1),
              encoded(Image.fromarray(np.full((4, 6), 40000, np.uint16))),
              encoded(Image.fromarray(PIXELS[..., 0]).convert("1"))]
