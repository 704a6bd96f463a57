"""The backend interface: one table, every preset served, no kind branches outside the backends, and what each
backend's session does (run, time, per-kernel times) on real artifacts; verification that fails writes nothing."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from conftest import quiet
from mixer_edge import backends, runtime
from mixer_edge.backends.wgsl import Wgsl
from mixer_edge.compiler import compile_model
from mixer_edge.compiler.targets import list_presets
from mixer_edge.errors import MixerEdgeError

PACKAGE = Path(backends.__file__).parent.parent


def test_every_preset_has_one_backend_and_every_device_record_names_one():
    table = backends.table()
    assert len({(b.kind, b.device_backend) for b in table}) == len(table)  # a manifest names exactly one
    for preset in list_presets().values():
        backend = preset.backend
        assert backend.kind == preset.kind and backend.tvm_kind == preset.target["kind"]
        device = preset.device_requirements()
        assert backends.for_device(device["kind"], device.get("backend")) is backend
        assert set(device) - {"kind", "backend"} == set(backend.device_fields)


def test_no_code_outside_the_backends_asks_which_kind_it_has():
    branch = re.compile(r'kind [!=]= "(cpu|cuda|vulkan)"|\.kind in \(|uses_wgpu|backend == "wgpu"|\._vm\b|\._params\b')
    found = [f"{path.relative_to(PACKAGE)}:{n}: {line.strip()}"
             for path in PACKAGE.rglob("*.py") if "backends" not in path.parts
             for n, line in enumerate(path.read_text().splitlines(), 1) if branch.search(line)]
    assert found == []


@pytest.mark.parametrize("target", ["host", "android-vulkan"])
def test_a_session_runs_times_and_times_each_kernel(build_artifact, digits_test, torch_logits, target):
    model = runtime.load(build_artifact(target))
    x = digits_test[0][: model.batch]
    np.testing.assert_allclose(model(x), torch_logits[: model.batch], atol=1e-4)
    model.timer(x)()  # one synchronised inference, the input already on the device
    kernels = model.kernel_times(x, repeat=2)
    assert kernels and all(name and np.isfinite(ms) and ms > 0 for name, ms in kernels)
    if model.record.vulkan:  # every dispatch of the plan, in order
        assert len(kernels) == model.record.vulkan.dispatches
    else:  # every kernel call of `main`, none of the VM's own builtins
        assert all(not name.startswith("vm.builtin") for name, _ in kernels)
    outputs = model.kernel_outputs(x)  # the intermediate tensors, in launch order: the last is the logits
    assert [name for name, _ in outputs] == [name for name, _ in kernels]
    np.testing.assert_allclose(outputs[-1][1], model(x).ravel(), rtol=1e-6, atol=1e-6)
    with pytest.raises(MixerEdgeError, match="is not one batch"):
        model.timer(x[:, :, :4])


@pytest.mark.parametrize("target", ["host", "android-vulkan"])  # TVM's time evaluator; whole timed calls
def test_device_times_are_measured_where_the_device_is(build_artifact, digits_test, target):
    model = runtime.load(build_artifact(target))
    seconds = model.device_times(digits_test[0], number=2, repeat=3)
    assert len(seconds) == 3 and all(np.isfinite(s) and s > 0 for s in seconds)


def test_a_wgpu_artifact_is_not_loaded_over_rpc(build_artifact):
    with pytest.raises(MixerEdgeError, match="runs only where it is"):
        runtime.load_remote(build_artifact("android-vulkan"), board=object())


def test_an_artifact_that_crashes_where_it_was_built_is_not_written(digits_source, tmp_path, monkeypatch):
    def broken(self, root, manifest, weights):
        raise RuntimeError("Shader validation error: identifier must not start with a digit")

    monkeypatch.setattr(Wgsl, "load", broken)
    with pytest.raises(MixerEdgeError, match="verification failed: it does not run here .*Shader validation error"
                       ".*was not written .*--keep-unverified"):
        compile_model(digits_source, "android-vulkan", tmp_path / "art", progress=quiet)
    assert list(tmp_path.iterdir()) == []


def test_an_artifact_that_computes_something_else_is_kept_only_when_asked(digits_source, tmp_path, monkeypatch):
    call = runtime.Model.__call__
    monkeypatch.setattr(runtime.Model, "__call__", lambda self, x: -call(self, x))  # finite, and wrong
    with pytest.raises(MixerEdgeError, match="least cosine similarity -1.0000, below 0.999 for float32"):
        compile_model(digits_source, "host", tmp_path / "art", progress=quiet)
    assert list(tmp_path.iterdir()) == []
    manifest = compile_model(digits_source, "host", tmp_path / "kept", keep_unverified=True, progress=quiet)
    assert manifest["verification"]["status"] == "failed"
    record = runtime.verified_manifest(tmp_path / "kept")[1]
    assert any(line.startswith("verified   no: failed (the artifact's logits differ")
               for line in runtime.describe(record, tmp_path / "kept"))


def test_keep_unverified_without_verification_is_refused(run_cli, tmp_path):
    code, _, err = run_cli("compile", "--no-verify", "--keep-unverified", "-o", tmp_path / "art")
    assert code == 2 and "--keep-unverified keeps an artifact that failed its verification: drop --no-verify" in err
    assert list(tmp_path.iterdir()) == []
