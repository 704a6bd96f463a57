"""A batch on a CPU runs in passes of a few images (compiler.build.in_passes), and a dynamic-batch export compiles
to the kernels a fixed-batch one does (compiler.build.sink_row_reshapes)."""

import sys

import numpy as np
import pytest

from mixer_edge import bundle, layers, runtime
from mixer_edge.compiler import compile_model
from mixer_edge.compiler.build import import_onnx, sink_row_reshapes
from mixer_edge.export import open_model

from conftest import quiet
from test_native import native_logits


@pytest.fixture(scope="module")
def dynamic_digits():
    """The digits Mixer exported with a symbolic batch, as `compile --batch 8` exports it."""
    return open_model(batch=8, dynamic_batch=True, progress=quiet)


@pytest.fixture(scope="module")
def image_by_image(dynamic_digits, tmp_path_factory):
    """The digits Mixer at batch 4 in passes of one image (the pass budget shrunk to make it so)."""
    out = tmp_path_factory.mktemp("passes") / "b4"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys.modules["mixer_edge.compiler.build"], "PASS_BYTES", 1)
        compile_model(dynamic_digits, "host", out, batch=4, progress=quiet)
    return out


def test_a_batch_in_passes_gives_the_logits_of_the_whole_batch(image_by_image, dynamic_digits, digits_test,
                                                                  torch_logits, run_cli):
    model = runtime.load(image_by_image)
    assert model.manifest["build"]["images_per_pass"] == 1 and model.batch == 4 and model.kernel_batch == 1
    code, out, _ = run_cli("inspect", image_by_image)
    assert code == 0 and "; batch 4 in passes of 1" in out
    assert model.manifest["verification"]["top1_agreement"] == 1.0
    logits = model(digits_test[0][:40])
    np.testing.assert_allclose(logits, torch_logits[:40], rtol=0, atol=1e-4)
    whole = compile_model(dynamic_digits, "host", image_by_image.parent / "one-pass", batch=4, progress=quiet)
    assert whole["build"]["images_per_pass"] == 4  # the small model: its whole batch fits a pass
    np.testing.assert_allclose(runtime.load(image_by_image.parent / "one-pass")(digits_test[0][:40]), logits,
                               rtol=0, atol=1e-5)


def test_profile_and_compare_look_at_one_pass(image_by_image, dynamic_digits, digits_test):
    profile, comparison = layers.look_inside(image_by_image, dynamic_digits, digits_test[0][:8], repeat=2)
    kernels = runtime.load(image_by_image).kernel_outputs(digits_test[0])
    assert len(profile.kernels) == len(kernels) and kernels[-1][1].shape == (10,)  # one image's kernels
    assert profile.matched == len(profile.kernels) and profile.inference_ms > 0
    assert comparison.samples == 8 and min(r.cosine for r in comparison.layers) > 0.9999


def test_the_native_runtime_runs_a_batch_in_passes(image_by_image, digits_test, tmp_path):
    packed = bundle.package(image_by_image, tmp_path / "bundle", progress=quiet)
    reference = runtime.load(image_by_image)(digits_test[0][:12])
    np.testing.assert_allclose(native_logits(packed, digits_test[0][:12], tmp_path), reference, rtol=0, atol=1e-6)


def test_a_dynamic_batch_export_compiles_to_the_kernels_of_a_fixed_batch_one(digits_source, dynamic_digits,
                                                                             digits_test, tmp_path):
    """The export's reshapes around each linear layer ([B, T, C] -> [B*T, C] and back) are sunk and cancel: the
    epilogues fuse into the matmuls as they do in the fixed-batch graph, kernel for kernel."""
    compile_model(digits_source, "host", tmp_path / "fixed", progress=quiet)
    compile_model(dynamic_digits, "host", tmp_path / "dynamic", progress=quiet)
    fixed, dynamic = runtime.load(tmp_path / "fixed"), runtime.load(tmp_path / "dynamic")
    x = digits_test[0][:1]
    assert len(dynamic.kernel_outputs(x)) == len(fixed.kernel_outputs(x))
    np.testing.assert_allclose(dynamic(digits_test[0]), fixed(digits_test[0]), rtol=0, atol=1e-5)
    mod, _ = import_onnx(dynamic_digits.onnx_model, 1)
    before = str(mod["main"]).count("R.reshape(")
    after = str(sink_row_reshapes(mod)["main"]).count("R.reshape(")
    assert before >= 16 and after <= 2  # the stem's and its bias's are all that are left
