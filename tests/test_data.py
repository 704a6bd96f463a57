import numpy as np
import pytest
from PIL import Image

from mixer_edge.data import DIGITS_PREPROCESS, Preprocess, digits_split, load_inputs
from mixer_edge.errors import MixerEdgeError

RGB32 = Preprocess(size=(32, 32), channels=3)


def test_digits_split_is_deterministic_and_stratified():
    x_train, y_train = digits_split("train")
    x_test, y_test = digits_split("test")
    assert x_train.shape == (1437, 1, 8, 8) and x_test.shape == (360, 1, 8, 8)
    assert np.array_equal(digits_split("test")[1], y_test)
    assert np.bincount(y_test).min() >= 35  # every digit is in the test split
    assert -1.0 <= x_test.min() and x_test.max() <= 1.0  # [0, 1] pixels, normalised with mean/std 0.5


def test_image_folder_with_classes(tmp_path):
    for label, value in (("cat", 0), ("dog", 255)):
        (tmp_path / label).mkdir()
        for i in range(2):
            Image.fromarray(np.full((40, 50, 3), value, np.uint8)).save(tmp_path / label / f"{i}.png")
    x, y = load_inputs(tmp_path, RGB32)
    assert x.shape == (4, 3, 32, 32) and list(y) == [0, 0, 1, 1]
    assert np.allclose(x[0], -1.0) and np.allclose(x[3], 1.0)


def test_single_image_greyscale_resize(tmp_path):
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(tmp_path / "d.png")
    x, y = load_inputs(tmp_path / "d.png", DIGITS_PREPROCESS)
    assert x.shape == (1, 1, 8, 8) and y is None and np.allclose(x, 1.0)


def test_npz_pixels_and_float_inputs(tmp_path):
    np.savez(tmp_path / "px.npz", images=np.zeros((3, 32, 32, 3), np.uint8), labels=np.arange(3))
    x, y = load_inputs(tmp_path / "px.npz", RGB32)
    assert x.shape == (3, 3, 32, 32) and np.allclose(x, -1.0) and list(y) == [0, 1, 2]
    np.save(tmp_path / "f.npy", np.ones((2, 3, 32, 32), np.float32))
    x, _ = load_inputs(tmp_path / "f.npy", RGB32)
    assert np.allclose(x, 1.0)


@pytest.mark.parametrize("make, message", [
    (lambda p: np.save(p / "bad.npy", np.zeros((2, 1, 32, 32), np.float32)), "has shape"),
    (lambda p: np.save(p / "bad.npy", np.full((1, 3, 32, 32), np.nan, np.float32)), "NaN or Inf"),
    (lambda p: (p / "bad.npy").write_bytes(b"not numpy"), "could not be read"),
])
def test_bad_arrays_are_refused(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(MixerEdgeError, match=message):
        load_inputs(tmp_path / "bad.npy", RGB32)


def test_bad_sources_are_refused(tmp_path):
    with pytest.raises(MixerEdgeError, match="does not exist"):
        load_inputs(tmp_path / "missing.png", RGB32)
    with pytest.raises(MixerEdgeError, match="holds no images"):
        load_inputs(tmp_path, RGB32)
    (tmp_path / "x.png").write_bytes(b"not a png")
    with pytest.raises(MixerEdgeError, match="could not be read"):
        load_inputs(tmp_path / "x.png", RGB32)
    with pytest.raises(MixerEdgeError, match="unknown digits split"):
        load_inputs("digits-val", DIGITS_PREPROCESS)
