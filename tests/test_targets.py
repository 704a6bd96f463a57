import json
import platform

import pytest

from mixer_edge.compiler.targets import list_presets, resolve_target
from mixer_edge.errors import MixerEdgeError
from mixer_edge.runtime import machine_cpu_features, physical_cores

REQUIRED = {"x86-avx2", "x86-avx512", "rpi4", "rpi5", "jetson-orin", "jetson-xavier", "cuda", "a100", "h100",
            "android-vulkan", "rpi5-vulkan"}


def test_every_shipped_preset_loads_and_validates():
    presets = list_presets()
    assert REQUIRED <= set(presets)
    assert presets["rpi5"].cpu_features() == ["asimd", "asimddp", "asimdhp"]
    assert presets["rpi4"].cpu_features() == ["asimd"]
    assert presets["jetson-orin"].arch == "aarch64" and presets["jetson-orin"].cuda_archs == ("sm_87",)
    assert presets["h100"].cuda_archs == ("sm_90",) and presets["a100"].cuda_archs == ("sm_80",)


def test_host_picks_a_preset_this_cpu_runs():
    preset = resolve_target("host")
    assert preset.arch == platform.machine()
    assert set(preset.cpu_features()) <= machine_cpu_features()
    assert preset.target["num-cores"] == physical_cores()


def test_host_is_sized_for_this_machine_so_other_core_counts_get_no_records(monkeypatch):
    """A database tuned on 2 cores (the shipped ones) is not applied on a 16-core machine: the key differs."""
    from mixer_edge.compiler import targets, tuning

    shipped = [tuning.TuningKey.stored_at(path) for path in tuning.shipped_root().iterdir() if path.is_dir()]
    assert all(json.loads(key.target)["num-cores"] == 2 for key in shipped)
    monkeypatch.setattr(targets, "physical_cores", lambda: 16)
    sixteen = resolve_target("host")
    assert sixteen.target["num-cores"] == 16
    for key in shipped:
        moved = tuning.TuningKey(key.graph, json.dumps(sixteen.target, sort_keys=True), key.precision)
        assert tuning.find_database(moved) is None and tuning.same_target(moved) == []  # nor by workload


def test_raw_json_target():
    target = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a55"}
    preset = resolve_target(json.dumps(target))
    assert preset.name.startswith("custom-") and preset.kind == "cpu" and preset.arch == "aarch64"
    assert resolve_target(json.dumps(target, indent=2)).name == preset.name  # one name per target, however written
    assert resolve_target(json.dumps({**target, "mcpu": "cortex-a76"})).name != preset.name


@pytest.mark.parametrize("toml, message", [
    ('kind = "cpu"\n[target]\nkind = "llvm"\nmcpu = "cortex-a99"\nmtriple = "aarch64-linux-gnu"\n', "mcpu 'cortex-a99'"),
    ('kind = "cpu"\n[target]\nkind = "llvm"\nmcpu = "cortex-a72"\nmtriple = "aarch64-linux-gnu"\nmattr = ["+dotprd"]\n',
     "mattr '\\+dotprd'"),
    ('kind = "npu"\n[target]\nkind = "llvm"\n', "kind 'npu'"),
    ('kind = "cpu"\n', "missing \\[target\\]"),
    ('kind = "cpu"\n[target]\nkind = "llvmx"\n', "not a valid TVM target"),
    ('kind = "cuda"\n[target]\nkind = "cuda"\narch = "sm_87"\n[build]\ncuda_archs = ["ampere"]\n', "CUDA arch 'ampere'"),
    ('kind = [cpu\n', "could not be read"),
])
def test_bad_preset_files_are_refused(tmp_path, toml, message):
    (tmp_path / "board.toml").write_text(toml)
    with pytest.raises(MixerEdgeError, match=message):
        resolve_target(str(tmp_path / "board.toml"))


@pytest.mark.parametrize("spec, message", [
    ("rpi6", "unknown target 'rpi6'"),
    ('{"kind": "llvm", ', "JSON is malformed"),
    ('{"mcpu": "znver4"}', 'must be an object with a "kind"'),
    ("nowhere/board.toml", "does not exist"),
])
def test_bad_target_arguments_are_refused(spec, message):
    with pytest.raises(MixerEdgeError, match=message):
        resolve_target(spec)
