"""Default CPU schedules (compiler/cpu_schedules.py): every untuned task scheduled, the results unchanged."""

import numpy as np
import pytest
import tvm
from tvm import relax

from mixer_edge.compiler import tuning as tuning_lib
from mixer_edge.compiler.build import import_onnx, run_transform_params
from mixer_edge.compiler.cpu_schedules import Rule, schedule_untuned, vector_lanes
from mixer_edge.compiler.targets import resolve_target
from mixer_edge.export import export_onnx, load_onnx, run_onnxruntime
from mixer_edge.model import MixerConfig, create_model

HOST = resolve_target("host")
AVX512 = resolve_target("x86-avx512-vnni")  # the target of the shipped digits tuning database


@pytest.fixture(scope="module")
def stem_mixer(tmp_path_factory):
    """Mixer-S/16's stem (224x224, 16x16 patches) in a one-block Mixer at batch 8: the patch convolution's
    lane sums (rfactor over the fused batch, channel and grid axes) once overflowed a per-thread stack tile."""
    import torch

    torch.manual_seed(0)
    cfg = MixerConfig(img_size=224, patch_size=16, num_classes=7, embed_dim=512, depth=1, mlp_ratio=(0.5, 0.5))
    path = tmp_path_factory.mktemp("stem") / "stem.onnx"
    export_onnx(create_model(cfg).eval(), path, batch=8)
    return load_onnx(path)


def prepared(proto, preset=HOST):
    """The fp32 program as a build hands it to MetaSchedule (no cross compiler needed), its weights and key."""
    mod, params = import_onnx(proto, proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value)
    return tuning_lib.prepare(mod, preset), params, tuning_lib.graph_key(mod, preset, "float32")


def prim_funcs(mod):
    return {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}


def compiled(mod, params, preset):
    mod, params = run_transform_params(mod, params)
    with preset.tvm_target():
        return tvm.compile(mod, preset.tvm_target()), params


@pytest.mark.parametrize("model, target", [("digits", "host"), ("odd", "host"), ("odd", "x86-avx2"),
                                           ("odd", "rpi5"), ("stem", "host")])
def test_every_task_gets_a_parallel_schedule_and_the_same_outputs(model, target, digits_source, odd_mixer,
                                                                   stem_mixer):
    """The schedules build for AVX-512, AVX2 and NEON, and the x86 builds (run here) agree with onnxruntime."""
    proto = {"digits": digits_source.onnx_model, "odd": odd_mixer, "stem": stem_mixer}[model]
    preset = resolve_target(target)
    mod, params, _ = prepared(proto, preset)
    with preset.tvm_target() as tvm_target:
        scheduled = schedule_untuned(mod, tvm_target)
    assert not any(f.attrs.get("tirx.is_scheduled") for f in prim_funcs(mod).values())  # the input is kept
    for name, func in prim_funcs(scheduled).items():
        assert func.attrs.get("tirx.is_scheduled"), name
        text = func.script()
        assert "T.parallel(" in text, name
        if "matmul" in name:
            assert "T.vectorized(" in text, name
    executable, params = compiled(scheduled, params, preset)
    if preset.tvm_target().attrs["mtriple"].startswith("x86_64"):
        shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        want = run_onnxruntime(proto, x)
        vm = relax.VirtualMachine(executable, tvm.cpu())
        got = vm["main"](tvm.runtime.tensor(x), *map(tvm.runtime.tensor, params.values())).numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_tuned_tasks_are_left_as_the_database_scheduled_them(digits_source):
    mod, _, key = prepared(digits_source.onnx_model, AVX512)
    tuned = tuning_lib.apply(mod, AVX512, tuning_lib.open_database(tuning_lib.find_database(key), key))
    target = AVX512.tvm_target()
    with target:
        scheduled = schedule_untuned(tuned, target)
    before = prim_funcs(tuned)
    for name, func in prim_funcs(scheduled).items():
        if before[name].attrs.get("tirx.is_scheduled"):
            assert func.same_as(before[name]), name
        assert func.attrs.get("tirx.is_scheduled"), name


@pytest.mark.parametrize("target, lanes", [
    (AVX512.tvm_target(), 16),
    ({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"}, 8),
    ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}, 4),
])
def test_vector_width_follows_the_target(target, lanes):
    assert vector_lanes(tvm.target.Target(target)) == lanes


def test_a_rule_that_fails_leaves_the_function_to_the_next():
    class Broken(Rule):
        def schedule(self, sch, target):
            raise RuntimeError("no")

    func = tvm.te.create_prim_func([a := tvm.te.placeholder((4,)), tvm.te.compute((4,), lambda i: a[i] + 1)])
    assert Broken().apply(func, HOST.tvm_target(), False) is None
