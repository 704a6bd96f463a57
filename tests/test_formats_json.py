"""The JSON an artifact carries (manifest.json, program.json) and the weights it is made from, forged.

A forger who edits a manifest and recomputes its digest gets past the tamper check, so the schema
(runtime.Manifest, vulkan.Program) is what stands between the edit and the loader: every such
forgery must be refused in one line naming the field, never a KeyError or a wgpu traceback. NaN and
Infinity never reach a manifest, a verification never passes on NaN, and non-finite weights are
refused where they enter (checkpoint, ONNX, params.npz) naming the tensor.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper
from safetensors.torch import save_file

from mixer_edge import artifact, cli, runtime
from mixer_edge.checkpoints import checkpoint_metadata, load_checkpoint, read_state_dict
from mixer_edge.compiler import compile_model
from mixer_edge.compiler.webgpu import wgsl_identifier
from mixer_edge.errors import MixerEdgeError
from mixer_edge.formats import json_text
from mixer_edge.model import create_model, preset

from conftest import assert_one_line_error, examples, quiet


def forge(root: Path, change, name: str = runtime.MANIFEST) -> None:
    """Apply `change` to the artifact's manifest (or to program.json, then re-hashed in the manifest) and reseal
    the manifest's digest, as a forger would."""
    path = root / name
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    manifest = json.loads((root / runtime.MANIFEST).read_text())
    if name != runtime.MANIFEST:
        manifest["files"][name] = runtime.sha256(path)
    manifest["manifest_sha256"] = runtime.manifest_digest(manifest)
    (root / runtime.MANIFEST).write_text(json.dumps(manifest))


def setter(dotted: str, value):
    """A change that sets the field at `dotted` (list indexes as numbers) to `value`."""
    *parents, last = dotted.split(".")

    def change(doc):
        for part in parents:
            doc = doc[int(part)] if isinstance(doc, list) else doc[part]
        doc[int(last) if isinstance(doc, list) else last] = value

    return change


# ---- manifest.json ---------------------------------------------------------------------------------

MANIFEST_FORGERIES = [  # (id, change, fragments of the one-line refusal)
    ("preprocess-empty", setter("preprocess", {}), ["missing field 'preprocess.size'"]),
    ("batch-zero", setter("input.shape.0", 0), ["field 'input.shape.0'", "greater than or equal to 1"]),
    ("batch-negative", setter("input.shape.0", -3), ["field 'input.shape.0'"]),
    ("shape-string", setter("input.shape.2", "8"), ["field 'input.shape.2'", "valid integer"]),
    ("shape-float", setter("input.shape.3", 8.0), ["field 'input.shape.3'", "valid integer"]),
    ("shape-bool", setter("output.shape.1", True), ["field 'output.shape.1'"]),
    ("shape-length", setter("input.shape", [1, 1, 8]), ["field 'input.shape'"]),
    ("fewer-labels", lambda m: m["labels"].pop(), ["field 'labels'", "has 9 labels but output.shape[1] says 10"]),
    ("more-classes", setter("output.shape.1", 11), ["field 'labels'", "has 10 labels but output.shape[1] says 11"]),
    ("output-batch", setter("output.shape.0", 2), ["field 'output.shape'", "batch 2 but input.shape has 1"]),
    ("params-not-strings", setter("params.3", 7), ["field 'params.3'", "valid string"]),
    ("params-not-a-list", setter("params", "lv1"), ["field 'params'", "valid list"]),
    ("params-twice", lambda m: m["params"].append(m["params"][0]), ["field 'params'", "lists a weight twice"]),
    ("sha256-short", lambda m: m["files"].update({runtime.PARAMS: "abc"}), ["field 'files.params.npz'"]),
    ("sha256-not-hex", lambda m: m["files"].update({runtime.PARAMS: "z" * 64}), ["field 'files.params.npz'"]),
    ("device-kind", setter("target.device.kind", "tpu"), ["field 'target.device.kind'"]),
    ("device-arch-missing", lambda m: m["target"]["device"].pop("arch"), ["field 'target.device.arch'", "missing"]),
    ("wgpu-on-cpu", setter("target.device.backend", "wgpu"), ["field 'target.device.kind'", "backend wgpu runs on vulkan"]),
    ("std-zero", setter("preprocess.std.0", 0), ["field 'preprocess.std.0'", "greater than 0"]),
    ("mean-per-channel", setter("preprocess.mean", [0.5, 0.5, 0.5]), ["field 'preprocess.mean'",
                                                                      "has 3 values but channels is 1"]),
    ("channels", lambda m: m["preprocess"].update(channels=3, mean=[0.5] * 3, std=[0.5] * 3),
     ["field 'preprocess.channels'", "is 3 but input.shape[1] is 1"]),
    ("size", setter("preprocess.size", [16, 16]), ["field 'preprocess.size'", "input.shape[2:] is [8, 8]"]),
    ("resample", setter("preprocess.resample", "cubic!"), ["field 'preprocess.resample'"]),
    ("nan", setter("verification.max_abs_logit_diff", math.nan), ["field 'verification.verified.max_abs_logit_diff'",
                                                                  "finite number"]),
    ("infinity-in-target", setter("target.tvm.num-cores", math.inf), ["field 'target.tvm.num-cores'",
                                                                        "not a finite number"]),
    ("huge-number", setter("build.seconds", 1e400), ["field 'build.seconds'", "finite number"]),
    ("pass-zero", setter("build.images_per_pass", 0), ["field 'build.images_per_pass'", "greater than or equal to 1"]),
    ("pass-not-dividing", setter("build.images_per_pass", 3), ["field 'build.images_per_pass'",
                                                               "does not divide the batch 1"]),
    ("unknown-field", setter("signed_by", "me"), ["unknown field 'signed_by'"]),
    ("unknown-nested", setter("input.color", "grey"), ["unknown field 'color' in [input]"]),
    ("verified-without-data", lambda m: m["verification"].pop("data"), ["verification.verified.data"]),
    ("status", setter("verification.status", "trust me"), ["field 'verification'"]),
    ("model-config", setter("model.config.num_classes", 11), ["field 'model.config'", "11 classes"]),
    ("quantization-without-int8", setter("quantization", {"layers": 1}), ["'quantization."]),
    ("no-library", lambda m: m["files"].pop(runtime.LIBRARY), ["field 'files'", "lists params.npz of the model's"]),
    ("preset-type", setter("target.preset", 7), ["field 'target.preset'"]),
    ("label-type", setter("labels.0", None), ["field 'labels.0'"]),
    ("created", setter("created", "yesterday"), ["field 'created'"]),
]


@pytest.mark.parametrize("change, fragments", [pytest.param(c, f, id=i) for i, c, f in MANIFEST_FORGERIES])
def test_forged_and_resealed_manifest_is_refused_naming_the_field(copy_artifact, run_cli, change, fragments):
    root = copy_artifact("host")
    forge(root, change)
    for command in ("inspect", "run"):
        code, out, err = run_cli(command, root)
        assert_one_line_error(code, err, "manifest.json", *fragments, "rebuild the artifact")
        assert out == ""


@pytest.mark.parametrize("name", ["../model.so", "sub/x", "..", "", "a\nb", "a\x00b"])
def test_a_listed_file_that_is_not_a_plain_name_is_refused(copy_artifact, run_cli, name):
    root = copy_artifact("host")
    forge(root, lambda m: m["files"].update({name: "0" * 64}))
    code, _, err = run_cli("inspect", root)
    assert_one_line_error(code, err, "which is not a file inside the artifact", "rebuild it")


def test_a_deeply_nested_forgery_is_one_line(copy_artifact, run_cli):
    """Nesting deeper than Python's parser goes: not valid JSON, in one line."""
    root = copy_artifact("host")
    manifest = json.loads((root / runtime.MANIFEST).read_text())
    manifest["target"]["tvm"]["mattr"] = "DEEP"
    deep = "[" * 100_000 + "]" * 100_000
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).replace('"DEEP"', deep)
    manifest["manifest_sha256"] = hashlib.sha256(canonical.encode()).hexdigest()
    (root / runtime.MANIFEST).write_text(json.dumps(manifest).replace('"DEEP"', deep))
    code, _, err = run_cli("inspect", root)
    assert_one_line_error(code, err, "is not valid JSON", "rebuild the artifact")


def test_the_manifest_of_every_kind_of_build_passes_the_schema(build_artifact, digits_source, tmp_path):
    """cpu (verified), cuda and aarch64 (not verified here, with a reason), wgpu, and an int8 build with its
    calibration table: what artifact.py writes is what the runtime reads."""
    roots = [build_artifact(t) for t in ("host", "cuda", "rpi5", "android-vulkan")]
    compile_model(digits_source, "host", tmp_path / "int8", precision="int8", progress=quiet)
    kinds = set()
    for root in [*roots, tmp_path / "int8"]:
        manifest, record = runtime.verified_manifest(root)
        assert record.model_dump(mode="json", by_alias=True, exclude_unset=True) == manifest  # nothing lost
        kinds.add((record.target.device.kind, record.precision.compute,
                   record.verification.status if record.verification else None))
    assert record.quantization.table and {e.kind for e in record.quantization.table.values()} == {"activation",
                                                                                                   "weight"}
    assert ("cuda", "float32", "not run on this machine") in kinds and ("cpu", "int8", "verified") in kinds
    assert ("vulkan", "float32", "verified") in kinds


@pytest.fixture(scope="module")
def pristine(build_artifact, tmp_path_factory):
    """A copy of the host and Vulkan artifacts each hypothesis example rewrites the manifest of."""
    out = {}
    for target in ("host", "android-vulkan"):
        root = tmp_path_factory.mktemp("pristine") / target
        shutil.copytree(build_artifact(target), root)
        out[target] = (root, json.loads((root / runtime.MANIFEST).read_text()))
    return out


def paths(doc, prefix=()):
    """Every path (a tuple of keys and indexes) inside a JSON document, the document's own () excluded."""
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in items:
        yield prefix + (key,)
        yield from paths(value, prefix + (key,))


scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.sampled_from([0, -1, 1, 2**31, 2**63])
           | st.floats() | st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e308])
           | st.text(max_size=20) | st.sampled_from(["", "\x00", "\n\r\x1b[2J", "../../etc/passwd", "0" * 64]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                           max_size=4), max_leaves=12)
deep = st.integers(1, 400).map(lambda n: json.loads("[" * n + "]" * n))


@pytest.mark.fuzz
@settings(max_examples=examples(120), suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_single_field_forgery_is_read_or_refused_with_a_mixer_edge_error(pristine, data):
    target = data.draw(st.sampled_from(sorted(pristine)))
    root, original = pristine[target]
    manifest = json.loads(json.dumps(original))
    path = data.draw(st.sampled_from(sorted(paths(manifest), key=repr)))
    parent = manifest
    for key in path[:-1]:
        parent = parent[key]
    if data.draw(st.booleans()):
        del parent[path[-1]]
    else:
        parent[path[-1]] = data.draw(values | deep)
    manifest["manifest_sha256"] = runtime.manifest_digest(manifest)  # resealed: past the tamper check
    (root / runtime.MANIFEST).write_text(json.dumps(manifest))
    try:
        runtime.read_manifest(root)
    except MixerEdgeError as exc:
        assert "\n" not in str(exc)
    else:  # what passed the schema: inspect and load it (refused here at most with a MixerEdgeError)
        with contextlib.redirect_stdout(io.StringIO()):
            cli.cmd_inspect(argparse.Namespace(artifact=root, json=False))
        try:
            runtime.load(root)
        except MixerEdgeError as exc:
            assert "\n" not in str(exc)
    (root / runtime.MANIFEST).write_text(json.dumps(original))


# ---- program.json ----------------------------------------------------------------------------------

def first_call(program: dict) -> dict:
    return next(step for step in program["steps"] if step["op"] == "call")


PROGRAM_FORGERIES = [
    ("format", setter("format", 2), ["program.json", "field 'format'", "rebuild"]),
    ("unknown-kernel", lambda p: first_call(p)["launches"][0].update(kernel="nope"),
     ["program.json", "names no kernel of `kernels`", "rebuild"]),
    ("kernel-name", lambda p: p["kernels"].update({"0.bad name": "fn x() {}"}),
     ["program.json", "field 'kernels.", "rebuild"]),
    ("undefined-value", lambda p: first_call(p)["args"].__setitem__(0, 10_000),
     ["program.json", "uses value 10000", "rebuild"]),
    ("binding-out-of-range", lambda p: first_call(p)["launches"][0]["buffers"].__setitem__(0, 99),
     ["program.json", "binds argument 99", "rebuild"]),
    ("scalar", lambda p: first_call(p)["launches"][0]["scalars"].append(["i32", 2**40]),
     ["program.json", "scalars.0", "int32", "rebuild"]),
    ("scalar-nan", lambda p: first_call(p)["launches"][0]["scalars"].append(["f32", math.nan]),
     ["program.json", "scalars.0", "rebuild"]),
    ("grid", lambda p: first_call(p)["launches"][0].update(grid=[1, 1]), ["program.json", "grid", "rebuild"]),
    ("too-many-workgroups", lambda p: first_call(p)["launches"][0].update(grid=[70000, 1, 1]),
     ["70000 workgroups", "WebGPU allows 65535", "build with a smaller batch"]),
    ("step-op", lambda p: p["steps"][0].update(op="exec"), ["program.json", "field 'steps.0'", "rebuild"]),
    ("view-past-its-buffer", lambda p: next(s for s in p["steps"] if s["op"] == "view").update(offset=1 << 30),
     ["program.json", "views", "which holds", "rebuild"]),
    ("view-dtype", lambda p: next(s for s in p["steps"] if s["op"] == "view").update(dtype="object"),
     ["program.json", "dtype", "rebuild"]),
    ("fewer-buffers", lambda p: first_call(p)["launches"][0]["buffers"].pop(),
     ["program.json", "which declares", "rebuild"]),
    ("output", lambda p: p.update(output=1), ["program.json output (value 1)", "the logits [1, 10]", "rebuild"]),
    ("wgsl", lambda p: p["kernels"].update({k: "this is not WGSL" for k in list(p["kernels"])[:1]}),
     ["program.json", "rebuild"]),
    ("entry-point", lambda p: p["kernels"].update({k: v.replace(f"fn {k}(", f"fn other_{k}(")
                                                   for k, v in list(p["kernels"].items())[:1]}),
     ["program.json", "rebuild"]),
]


@pytest.mark.parametrize("change, fragments", [pytest.param(c, f, id=i) for i, c, f in PROGRAM_FORGERIES])
def test_forged_program_is_refused_in_one_line(copy_artifact, run_cli, change, fragments):
    root = copy_artifact("android-vulkan")
    forge(root, change, runtime.PROGRAM)
    code, out, err = run_cli("run", root)
    assert_one_line_error(code, err, *fragments)
    assert "Traceback" not in err and out == ""


def test_inspect_prints_text_from_the_manifest_with_its_control_characters_escaped(copy_artifact, run_cli):
    root = copy_artifact("host")

    def escapes(m):
        m["model"]["name"] = "digits\x1b]0;owned\x07"
        m["target"]["description"] = "\x1b[2Jcleared"
        m["versions"]["apache-tvm"] = "0.27\r\x1b[31m"

    forge(root, escapes)
    code, out, err = run_cli("inspect", root)
    assert code == 0, err
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out
    assert "digits\\x1b]0;owned\\x07" in out and "\\x1b[2Jcleared" in out


def test_params_with_nan_give_no_result(copy_artifact, run_cli):
    root = copy_artifact("host")
    manifest = json.loads((root / runtime.MANIFEST).read_text())
    with np.load(root / runtime.PARAMS) as npz:
        arrays = {k: npz[k] for k in npz.files}
    name = max((k for k in manifest["params"] if arrays[k].dtype == np.float32), key=lambda k: arrays[k].size)
    arrays[name] = np.full_like(arrays[name], np.inf)  # the largest weight matrix
    np.savez(root / runtime.PARAMS, **arrays)
    forge(root, lambda m: m["files"].update({runtime.PARAMS: runtime.sha256(root / runtime.PARAMS)}))
    code, _, err = run_cli("run", root)
    assert_one_line_error(code, err, "computed NaN or Inf logits", "rebuild it from a finite checkpoint")


# ---- WGSL names from the graph ---------------------------------------------------------------------

def test_wgsl_identifiers_are_valid_and_unique():
    taken: set[str] = set()
    names = [wgsl_identifier(n, taken) for n in ["0.stem.proj.weight", "0_stem_proj_weight", "__b", "_b", "x",
                                                  "fn", "input.1", "a-b", "", "é"]]
    assert names == ["v_0_stem_proj_weight", "v_0_stem_proj_weight_2", "v___b", "_b", "x", "v_fn", "input_1",
                     "a_b", "v_", "v__"]
    assert len(set(names)) == len(names)


def test_mixer_built_as_nn_sequential_runs_on_a_vulkan_device(tmp_path):
    """Its ONNX weights are named `0.stem.proj.weight`...: TVM would name WGSL buffers `0_stem_proj_weight_ptr`,
    which no WGSL compiler takes, unless they are renamed."""
    import onnxruntime as ort
    import warnings

    from mixer_edge.export import open_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(create_model("mixer_tiny")).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto = torch.onnx.export(model, (torch.zeros(1, 3, 32, 32),), dynamo=True, opset_version=18,
                                  input_names=["input"], output_names=["logits"], external_data=False,
                                  verbose=False).model_proto
    assert proto.graph.initializer[0].name[0].isdigit()
    onnx.save(proto, str(tmp_path / "seq.onnx"))
    source = open_model(str(tmp_path / "seq.onnx"), progress=quiet)
    manifest = compile_model(source, "android-vulkan", tmp_path / "art", progress=quiet)
    assert manifest["verification"]["status"] == "verified" and manifest["params"][0][0].isdigit()
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = np.concatenate([session.run(None, {"input": x[i:i + 1]})[0] for i in range(3)])
    got = runtime.load(tmp_path / "art")(x)
    assert np.abs(got - expected).max() < 1e-4


# ---- weights: checkpoints and ONNX -----------------------------------------------------------------

@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return create_model("mixer_tiny").eval()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_checkpoint_with_nan_is_refused_naming_the_tensor(tiny, tmp_path, run_cli, suffix):
    sd = {k: v.clone() for k, v in tiny.state_dict().items()}
    sd["blocks.1.mlp_channels.fc2.weight"][3, 4] = math.nan
    path = tmp_path / f"m{suffix}"
    torch.save(sd, path) if suffix == ".pth" else save_file(sd, str(path))
    with pytest.raises(MixerEdgeError, match=r"tensor 'blocks.1.mlp_channels.fc2.weight' holds NaN or Inf"):
        load_checkpoint(path, preset("mixer_tiny"))
    code, _, err = run_cli("compile", "--model", "mixer_tiny", "--checkpoint", path, "-o", tmp_path / "out")
    assert_one_line_error(code, err, "'blocks.1.mlp_channels.fc2.weight' holds NaN or Inf", "earlier checkpoint")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, fragment", [
    (lambda sd: {**sd, "epoch": 3}, "entry 'epoch' holds a int, not a tensor"),
    (lambda sd: {**sd, "norm.bias": [0.0] * 32}, "entry 'norm.bias' holds a list, not a tensor"),
    (lambda sd: 3, "holds a int, not a state_dict"),
    (lambda sd: {"state_dict": {**sd, 7: torch.zeros(1)}}, "key 7 is a int, not a name"),
])
def test_checkpoint_of_other_things_than_tensors_is_one_line(tiny, tmp_path, run_cli, content, fragment):
    torch.save(content(tiny.state_dict()), tmp_path / "m.pth")
    with pytest.raises(MixerEdgeError, match="not a"):
        read_state_dict(tmp_path / "m.pth")
    code, _, err = run_cli("compile", "--model", "mixer_tiny", "--checkpoint", tmp_path / "m.pth", "-o",
                           tmp_path / "out")
    assert_one_line_error(code, err, fragment, "state_dict")


def test_onnx_with_nan_is_refused_naming_the_initializer(digits_source, tmp_path, run_cli):
    proto = onnx.ModelProto()
    proto.CopyFrom(digits_source.onnx_model)
    init = next(i for i in proto.graph.initializer if numpy_helper.to_array(i).dtype == np.float32
                and numpy_helper.to_array(i).size > 1)
    array = numpy_helper.to_array(init).copy()
    array.flat[1] = math.nan
    init.CopyFrom(numpy_helper.from_array(array, init.name))
    onnx.save(proto, str(tmp_path / "nan.onnx"))
    code, _, err = run_cli("compile", "--model", tmp_path / "nan.onnx", "-o", tmp_path / "out")
    assert_one_line_error(code, err, f"initializer '{init.name}' holds NaN or Inf", "re-export it")
    assert not (tmp_path / "out").exists()


def mixer_edge_metadata(**extra) -> dict:
    """What mixer_edge.train.save_checkpoint writes, for mixer_tiny, with `extra` keys."""
    meta = {"preset": "mixer_tiny", "config": preset("mixer_tiny").to_dict(),
            "preprocess": {"size": [32, 32], "channels": 3, "mean": [0.5] * 3, "std": [0.5] * 3,
                           "resample": "bilinear"}, "labels": [f"c{i}" for i in range(10)], "epochs": 1, **extra}
    return {k: json.dumps(v) for k, v in meta.items()}


def test_checkpoint_metadata_of_mixer_edge_is_read_and_other_tools_ignored(tiny, tmp_path):
    save_file(tiny.state_dict(), str(tmp_path / "ours.safetensors"), metadata=mixer_edge_metadata())
    meta = checkpoint_metadata(tmp_path / "ours.safetensors")
    assert meta.preset == "mixer_tiny" and meta.labels[3] == "c3" and meta.preprocess.to_preprocess().channels == 3
    for other in ({"format": "pt"}, {"format": "pt", "author": "someone", "epoch": "12"}, {}):
        save_file(tiny.state_dict(), str(tmp_path / "theirs.safetensors"), metadata=other)
        assert checkpoint_metadata(tmp_path / "theirs.safetensors") is None
        load_checkpoint(tmp_path / "theirs.safetensors", preset("mixer_tiny"))


@pytest.mark.parametrize("extra, fragment", [
    ({"signature": "x"}, "unknown field 'signature'"),
    ({"labels": ["a", "b"]}, "field 'labels': has 2 labels but config.num_classes is 10"),
    ({"epochs": 0}, "field 'epochs'"),
    ({"test_accuracy": math.nan}, "field 'test_accuracy'"),
    ({"preprocess": {"size": [8, 8], "channels": 1, "mean": [0.5], "std": [0.5], "resample": "bilinear"}},
     "field 'preprocess'"),
    ({"config": {**preset("mixer_tiny").to_dict(), "depth": "2"}}, "field 'config.depth'"),
])
def test_forged_mixer_edge_metadata_is_one_line(tiny, tmp_path, run_cli, extra, fragment):
    save_file(tiny.state_dict(), str(tmp_path / "m.safetensors"), metadata=mixer_edge_metadata(**extra))
    code, _, err = run_cli("compile", "--checkpoint", tmp_path / "m.safetensors", "-o", tmp_path / "out")
    assert_one_line_error(code, err, "m.safetensors metadata", fragment)


# ---- verification never passes on NaN --------------------------------------------------------------

@pytest.mark.parametrize("side, fragment", [
    ("artifact", "the artifact built for"),
    ("reference", "the reference (torch) produced NaN"),
])
def test_verification_with_nan_logits_fails_and_writes_nothing(digits_source, tmp_path, monkeypatch, side, fragment):
    if side == "artifact":
        monkeypatch.setattr(runtime.Model, "__call__", lambda self, x: np.full((len(x), 10), np.nan, np.float32))
    else:
        monkeypatch.setattr(artifact, "reference_logits", lambda *a: np.full((len(a[2]), 10), np.nan, np.float32))
    with pytest.raises(MixerEdgeError, match="verification failed") as raised:
        compile_model(digits_source, "host", tmp_path / "art", progress=quiet)
    assert fragment in str(raised.value) and "was not written" in str(raised.value)
    assert list(tmp_path.iterdir()) == []


def test_non_finite_weights_never_become_an_artifact(digits_source, tmp_path):
    """An ONNX with Inf weights given through the API (the CLI refuses it at load): refused before the build,
    naming the weight."""
    proto = onnx.ModelProto()
    proto.CopyFrom(digits_source.onnx_model)
    init = next(i for i in proto.graph.initializer if numpy_helper.to_array(i).dtype == np.float32
                and numpy_helper.to_array(i).size > 1)
    init.CopyFrom(numpy_helper.from_array(np.full(numpy_helper.to_array(init).shape, np.inf, np.float32), init.name))
    source = dataclasses.replace(digits_source, onnx_model=proto)
    with pytest.raises(MixerEdgeError, match=f"initializer '{init.name}' holds NaN or Inf"):
        compile_model(source, "host", tmp_path / "art", progress=quiet)
    assert list(tmp_path.iterdir()) == []


def test_a_manifest_is_never_written_with_nan(tmp_path):
    with pytest.raises(MixerEdgeError, match=r"would hold NaN or Infinity at verification.max_abs_logit_diff"):
        json_text({"verification": {"max_abs_logit_diff": math.nan}}, indent=2, name=runtime.MANIFEST)
