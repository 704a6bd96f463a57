"""The file formats read through schemas (mixer_edge/formats.py): target presets, calibration recipes and
tuning databases. A malformed file is refused in one line naming the file and the field (or line), never
with a traceback; every shipped preset and recipe, with any one field broken, loads or is refused that way."""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import assert_one_line_error, examples
from mixer_edge.compiler import tuning
from mixer_edge.compiler.targets import TargetPreset, load_preset_file, resolve_target
from mixer_edge.errors import MixerEdgeError
from mixer_edge.quant.calibration import Recipe, load_recipe_file, resolve_recipe
from mixer_edge.resources import data_dir

HOST = 'kind = "cpu"\n[target]\nkind = "llvm"\nmtriple = "x86_64-linux-gnu"\nmcpu = "haswell"\n'
CUDA = 'kind = "cuda"\n[target]\nkind = "cuda"\narch = "sm_87"\n[target.host]\nkind = "llvm"\n'
DEEP = 100_000


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


# ---- target presets -------------------------------------------------------------------------------

@pytest.mark.parametrize("toml, fragments", [
    ('build = "gcc"\n' + HOST, ["field 'build'", "valid dictionary"]),
    (CUDA + '[build]\ncuda_archs = 87\n', ["field 'build.cuda_archs'", "valid list"]),
    (CUDA + '[build]\ncuda_archs = ["sm_8"]\n', ["field 'build.cuda_archs.0'", "CUDA arch 'sm_8'"]),
    (CUDA + '[build]\ncuda_archs = ["sm_87", "sm_1000"]\n', ["field 'build.cuda_archs.1'", "sm_1000"]),
    (HOST + '[tune]\ntrials_per_task = "x"\n', ["field 'tune.trials_per_task'", "valid integer"]),
    (HOST + '[tune]\ntrials_per_task = 0\n', ["field 'tune.trials_per_task'", "greater than or equal to 1"]),
    (HOST + '[tune]\ntrials_per_task = 10000000000\n', ["field 'tune.trials_per_task'", "less than or equal"]),
    (HOST + '[tune]\ntime_budget = "soon"\n', ["field 'tune.time_budget'", "not a positive duration"]),
    (HOST + '[tune]\ntime_budget = "0s"\n', ["field 'tune.time_budget'", "not a positive duration"]),
    (HOST + '[tune]\ntrials = 5\n', ["unknown field 'trials' in [tune]", "trials_per_task"]),
    (HOST + '[build]\ncross_compile = "aarch64-linux-gnu-g++"\n',
     ["unknown field 'cross_compile' in [build]", "cross_compiler"]),
    (HOST + '[build]\ncross_compiler = 5\n', ["field 'build.cross_compiler'", "valid string"]),
    (HOST + '[device]\nemulator_cpu = ["cortex-a72"]\n', ["field 'device.emulator_cpu'"]),
    ('descripton = "typo"\n' + HOST, ["unknown field 'descripton'", "description"]),
    (HOST + 'num-cores = 0\n', ["field 'target.num-cores'", "greater than or equal to 1"]),
    (HOST + 'num-cores = 4096\n', ["field 'target.num-cores'", "less than or equal to 1024"]),
    (HOST + 'num-cores = "8"\n', ["field 'target.num-cores'", "valid integer"]),
    (HOST + 'num-cores = true\n', ["field 'target.num-cores'", "valid integer"]),
    (HOST + 'mattr = "+avx2"\n', ["field 'target.mattr'", "valid list"]),
    (HOST.replace("x86_64-linux-gnu", "sm_87"), ["mtriple 'sm_87' is not a target triple LLVM builds for"]),
    (HOST + 'mattr = [2]\n', ["field 'target.mattr.0'"]),
    ('[target]\nkind = 3\n', ["field 'target.kind'", "valid string"]),
    ('target = "llvm"\n', ["field 'target'"]),
    ('precision = "fp16"\n' + HOST, ["field 'precision'", "precision 'fp16'"]),
    ('precisions = ["float32", 16]\n' + HOST, ["field 'precisions.1'", "precision 16"]),
    ('precisions = []\n' + HOST, ["field 'precisions'"]),
    ('precision = "int8"\nprecisions = ["float32"]\n' + HOST, ["default precision 'int8' is not in precisions"]),
    ('host_candidate = "yes"\n' + HOST, ["field 'host_candidate'", "valid boolean"]),
    ('description = "two\\nlines"\n' + HOST, ["field 'description'"]),
    (HOST.replace('kind = "cpu"', 'kind = "cuda"'), ["kind 'cuda' does not match [target] kind 'llvm'"]),
    (CUDA.replace('[target.host]\nkind = "llvm"', '[target.host]\nkind = "c"'), ["[target.host] kind 'c'"]),
    ('x = ' + "[" * DEEP + "]" * DEEP + "\n" + HOST, ["could not be read", "nested too deeply"]),
])
def test_bad_preset_fields_are_refused_in_one_line(run_cli, tmp_path, toml, fragments):
    (tmp_path / "bad.toml").write_text(toml)
    before = snapshot(tmp_path)
    code, _, err = run_cli("compile", "--target", tmp_path / "bad.toml", "-o", tmp_path / "out")
    assert_one_line_error(code, err, "bad.toml", *fragments)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("spec, fragments", [
    ('{"kind": "llvm", "num-cores": 0}', ["--target JSON", "field 'target.num-cores'"]),
    ('{"kind": "llvm", "mcpu": 3}', ["--target JSON", "field 'target.mcpu'"]),
    ('{"kind": "llvm", "host": "llvm"}', ["--target JSON", "field 'target.host'"]),
    ('{"kind": "llvm", "x": ' + "[" * DEEP + "]" * DEEP + "}", ["--target JSON", "nested too deeply"]),
])
def test_bad_json_targets_are_refused_in_one_line(run_cli, tmp_path, spec, fragments):
    code, _, err = run_cli("compile", "--target", spec, "-o", tmp_path / "out")
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "out").exists()


def test_a_preset_with_every_table_loads(tmp_path):
    (tmp_path / "full.toml").write_text(
        'description = "full"\nkind = "cpu"\nprecision = "int8"\nprecisions = ["float32", "int8"]\n'
        'host_candidate = false\n[target]\nkind = "llvm"\nmtriple = "aarch64-linux-gnu"\nmcpu = "cortex-a76"\n'
        'mattr = ["+neon", "-dotprod"]\nnum-cores = 1024\n[build]\ncross_compiler = "aarch64-linux-gnu-g++"\n'
        '[device]\nemulator_cpu = "cortex-a76"\n[tune]\ntrials_per_task = 8\ntime_budget = "1h30m"\n')
    preset = resolve_target(str(tmp_path / "full.toml"))
    assert preset.precision == "int8" and preset.precisions == ("float32", "int8")
    assert preset.tuning == {"trials_per_task": 8, "time_budget": "1h30m"}
    assert preset.target["num-cores"] == 1024 and preset.arch == "aarch64"


# ---- calibration recipes --------------------------------------------------------------------------

@pytest.mark.parametrize("toml, fragments", [
    ('percentile = "99.9"\n', ["field 'percentile'", "valid number"]),
    ('percentile = 50\n', ["field 'percentile'", "greater than 50"]),
    ('percentile = 100.5\n', ["field 'percentile'", "less than or equal to 100"]),
    ('percentile = nan\n', ["field 'percentile'"]),
    ('percentile = true\n', ["field 'percentile'", "valid number"]),
    ('samples = 2.5\n', ["field 'samples'", "valid integer"]),
    ('samples = 1000000000\n', ["field 'samples'", "less than or equal"]),
    ('seed = -1\n', ["field 'seed'", "greater than or equal to 0"]),
    ('seed = 4294967296\n', ["field 'seed'", "less than 4294967296"]),
    ('observer = 5\n', ["field 'observer'", "observer 5 is not one of"]),
    ('activations = ["affine"]\n', ["field 'activations'"]),
    ('float_layer = ["head"]\n', ["unknown field 'float_layer'", "float_layers"]),
    ('float_layers = "head"\n', ["field 'float_layers'", "float_layers must be a list of strings"]),
    ('float_layers = [""]\n', ["field 'float_layers.0'"]),
    ('float_layers = ["head", 3]\n', ["field 'float_layers.1'", "valid string"]),
    ('int8_ops = ["gelu", 3]\n', ["field 'int8_ops.1'", "valid string"]),
    ('int8_ops = ["softmax:blocks.0."]\n',
     ["field 'int8_ops.0'", "int8_ops entry 'softmax:blocks.0.' names no op kind"]),
    ('description = 3\n', ["field 'description'"]),
    ('x = ' + "[" * DEEP + "]" * DEEP + "\n", ["could not be read", "nested too deeply"]),
])
def test_bad_recipe_fields_are_refused_in_one_line(run_cli, tmp_path, toml, fragments):
    (tmp_path / "bad.toml").write_text(toml)
    before = snapshot(tmp_path)
    code, _, err = run_cli("calibrate", "--calibration", tmp_path / "bad.toml", "-o", tmp_path / "x.onnx")
    assert_one_line_error(code, err, "bad.toml", *fragments)
    assert "exporting" not in err  # refused before the slow work
    assert snapshot(tmp_path) == before


def test_a_toml_integer_is_a_percentile(tmp_path):
    (tmp_path / "r.toml").write_text('percentile = 99\nseed = 4294967295\nint8_ops = ["gelu:"]\n')
    recipe = resolve_recipe(str(tmp_path / "r.toml"))
    assert recipe.percentile == 99.0 and isinstance(recipe.percentile, float) and recipe.seed == 2**32 - 1
    assert recipe.to_dict()["int8_ops"] == ["gelu:"] and recipe.symmetric


def test_float_layers_that_match_no_layer_are_refused(run_cli, tmp_path):
    (tmp_path / "r.toml").write_text('samples = 64\nfloat_layers = ["head", "haed"]\n')
    code, _, err = run_cli("calibrate", "--calibration", tmp_path / "r.toml", "-o", tmp_path / "q.onnx")
    assert_one_line_error(code, err, "r.toml", "float_layers entry 'haed' matches no layer", "stem.proj", "head")
    assert not (tmp_path / "q.onnx").exists()


# ---- tuning databases -----------------------------------------------------------------------------

GRAPH = "0" * 64


def record(workload: int = 0, secs=1.0) -> list:
    return [workload, [[["t", []], []], [secs], {"kind": "llvm"}, []]]


def database(path: Path, records: list[str], workloads: list[str] | None = None, key: dict | None = None) -> Path:
    """A database directory with TVM's line format; `records` and `workloads` are the files' lines."""
    path.mkdir(parents=True)
    key = {"graph": GRAPH, "target": '{"kind": "llvm"}', "precision": "float32", "model": "m"} if key is None else key
    (path / tuning.KEY).write_text(json.dumps(key))
    workloads = [json.dumps([str(i), f"mod{i}"]) for i in range(2)] if workloads is None else workloads
    (path / tuning.WORKLOADS).write_text("".join(w + "\n" for w in workloads))
    (path / tuning.RECORDS).write_text("".join(r + "\n" for r in records))
    return path


GOOD = json.dumps(record(0))
DEEP_ROW = "[" * DEEP + "]" * DEEP


@pytest.mark.parametrize("row, fragments", [
    ("[]", ["a row is [WORKLOAD, [TRACE, RUN_SECS, TARGET, ARGS_INFO]]"]),
    ("[0]", ["a row is [WORKLOAD"]),
    ('{"a": 1}', ["a row is [WORKLOAD"]),
    ('[0, {"run_secs": "x"}]', ["a row is [WORKLOAD"]),
    ('[0, [[], ["x"], {}, []]]', ["field 'run_secs.0'", "valid number"]),
    ('[0, [[], [NaN], {}, []]]', ["field 'run_secs.0'", "finite number"]),
    ('[0, [[], [Infinity], {}, []]]', ["field 'run_secs.0'", "finite number"]),
    ('[0, [[], [-1.0], {}, []]]', ["field 'run_secs.0'", "greater than or equal to 0"]),
    ('["0", [[], [1.0], {}, []]]', ["field 'workload'", "valid integer"]),
    ('[-1, [[], [1.0], {}, []]]', ["field 'workload'", "greater than or equal to 0"]),
    ('[2, [[], [1.0], {}, []]]', ["workload 2 is out of range", "has 2"]),
    ('[0, [[], [1.0], "llvm", []]]', ["field 'target'", "valid dictionary"]),
    ("[0, [[[[", ["not JSON"]),
    (DEEP_ROW, ["nested too deeply"]),
    ("[" * 500 + "]" * 500, ["nested more than 64 deep"]),
])
@pytest.mark.parametrize("command", ["list", "merge"])
def test_odd_record_rows_are_refused_naming_file_and_line(run_cli, tmp_path, row, fragments, command):
    db = database(tmp_path / "db", [GOOD, row, GOOD])
    before = snapshot(tmp_path)
    argv = ["tuning-db", "list", db] if command == "list" else ["tuning-db", "merge", db, "-o", tmp_path / "out"]
    code, _, err = run_cli(*argv)
    assert_one_line_error(code, err, f"{tuning.RECORDS} line 2", *fragments)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("row, fragments", [
    ('["x", "mod"]', ["field 'shash'"]),
    ("[1, 2]", ["field 'shash'", "valid string"]),
    ('["1", "mod", 3]', ["a row is [SHASH, MODULE]"]),
    ('["1", ""]', ["field 'module'"]),
    (DEEP_ROW, ["nested too deeply"]),
])
def test_odd_workload_rows_are_refused_naming_file_and_line(run_cli, tmp_path, row, fragments):
    db = database(tmp_path / "db", [GOOD], workloads=[json.dumps(["0", "m"]), row, json.dumps(["2", "m"])])
    before = snapshot(tmp_path)
    code, _, err = run_cli("tuning-db", "list", db)
    assert_one_line_error(code, err, f"{tuning.WORKLOADS} line 2", *fragments)
    assert snapshot(tmp_path) == before


def test_a_torn_last_line_is_dropped_but_a_bad_complete_one_is_refused(run_cli, tmp_path):
    torn = database(tmp_path / "torn", [GOOD, '[1, [["half a rec'])
    code, out, err = run_cli("tuning-db", "list", torn)
    assert code == 0 and "1 records for 2 workloads" in out, err
    assert (torn / tuning.RECORDS).read_text() == GOOD + "\n"
    bad_last = database(tmp_path / "bad-last", [GOOD, "[0]"])
    code, _, err = run_cli("tuning-db", "list", bad_last)
    assert_one_line_error(code, err, f"{tuning.RECORDS} line 2", "a row is")
    deep_last = database(tmp_path / "deep-last", [GOOD, DEEP_ROW])
    code, _, err = run_cli("tuning-db", "list", deep_last)
    assert_one_line_error(code, err, f"{tuning.RECORDS} line 2", "nested too deeply")


@pytest.mark.parametrize("key, fragments", [
    ({"graph": "g" * 64, "target": "t", "precision": "float32"}, ["field 'graph'"]),
    ({"graph": GRAPH, "target": "t", "precision": "fp32"}, ["field 'precision'", "precision 'fp32'"]),
    ({"graph": GRAPH, "target": {"kind": "llvm"}, "precision": "float32"}, ["field 'target'", "valid string"]),
    ({"graph": GRAPH, "target": "t"}, ["missing field 'precision'"]),
    ({"graph": GRAPH, "target": "t", "precision": "float32", "modle": "m"}, ["unknown field 'modle'", "model"]),
    ([], ["valid dictionary"]),
])
def test_a_bad_key_json_is_refused(run_cli, tmp_path, key, fragments):
    db = database(tmp_path / "db", [GOOD], key=key)
    code, _, err = run_cli("tuning-db", "list", db)
    assert_one_line_error(code, err, str(db / tuning.KEY), *fragments)


def test_a_deep_key_json_is_refused(run_cli, tmp_path):
    db = database(tmp_path / "db", [GOOD])
    (db / tuning.KEY).write_text(DEEP_ROW)
    code, _, err = run_cli("tuning-db", "list", db)
    assert_one_line_error(code, err, "is not a mixer-edge tuning database")


def test_compile_refuses_a_database_with_an_odd_row(run_cli, digits_source, tmp_path):
    from mixer_edge.compiler.build import import_onnx

    mod, _ = import_onnx(digits_source.onnx_model, 1)
    key = tuning.graph_key(mod, resolve_target("host"), "float32")
    db = database(tmp_path / "db", [GOOD, '[0, [[], ["x"], {}, []]]', GOOD], key={**key.__dict__, "model": "m"})
    code, _, err = run_cli("compile", "--tuning-db", db, "-o", tmp_path / "out")
    assert_one_line_error(code, err, f"{tuning.RECORDS} line 2", "field 'run_secs.0'")
    assert not (tmp_path / "out").exists()


# ---- every shipped document, one field broken at a time (hypothesis) ------------------------------

def toml_string(text: str) -> str:
    escaped = "".join('\\"' if ch == '"' else "\\\\" if ch == "\\" else
                      f"\\u{ord(ch):04x}" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch for ch in text)
    return f'"{escaped}"'


def toml_value(value) -> str:
    """`value` as a TOML value (tables inline): enough of TOML for these tests, no tomli_w needed."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(map(toml_value, value)) + "]"
    return "{" + ", ".join(f"{toml_string(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def to_toml(doc: dict) -> str:
    return "".join(f"{toml_string(k)} = {toml_value(v)}\n" for k, v in doc.items())


def paths(doc, prefix=()) -> list[tuple]:
    """Every key path (and list index) in `doc`, tables and lists included."""
    found = []
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in items:
        found.append((*prefix, key))
        found += paths(value, (*prefix, key))
    return found


PRESETS = {p.stem: tomllib.loads(p.read_text()) for p in sorted(data_dir("targets").glob("*.toml"))}
RECIPES = {p.stem: tomllib.loads(p.read_text()) for p in sorted(data_dir("calibration").glob("*.toml"))}
SCALARS = (st.integers(-2**63, 2**63 - 1) | st.floats(allow_nan=True, allow_infinity=True) | st.booleans()
           | st.text(max_size=12) | st.sampled_from(["", "\x00", "a\nb", "\x1b[31m", "llvm", "cuda", "cpu", "sm_87",
                                                   "float16", "int8", "minmax", "gelu", "head", "15m", "+neon"]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8),
                                                                                           inner, max_size=3),
                      max_leaves=6)


def mutated(data, doc: dict) -> dict:
    """`doc` with one field deleted, replaced by a value of another type, or an unknown key added."""
    doc = json.loads(json.dumps(doc))  # a deep copy
    where = data.draw(st.sampled_from(paths(doc)))
    parent = doc
    for key in where[:-1]:
        parent = parent[key]
    action = data.draw(st.sampled_from(["delete", "replace", "add"]))
    if action == "delete":
        del parent[where[-1]]
    elif action == "replace":
        parent[where[-1]] = data.draw(VALUES)
    else:
        value = parent[where[-1]]
        table = value if isinstance(value, dict) else parent if isinstance(parent, dict) else doc
        table[data.draw(st.text(min_size=1, max_size=10))] = data.draw(VALUES)
    return doc


def test_the_toml_writer_round_trips_every_shipped_document():
    for doc in [*PRESETS.values(), *RECIPES.values()]:
        assert tomllib.loads(to_toml(doc)) == doc


def usable_preset(preset) -> bool:
    return isinstance(preset, TargetPreset) and preset.resolve_precision(None) in preset.precisions and \
        bool(preset.arch) and bool(preset.device_requirements())


def usable_recipe(recipe) -> bool:
    json.dumps(recipe.to_dict(), allow_nan=False)
    return isinstance(recipe, Recipe) and 50 < recipe.percentile <= 100 and recipe.samples >= 1


@pytest.mark.fuzz
@pytest.mark.parametrize("documents, load, usable", [(PRESETS, load_preset_file, usable_preset),
                                                      (RECIPES, load_recipe_file, usable_recipe)],
                         ids=["preset", "recipe"])
@settings(max_examples=examples(100))
@given(data=st.data())
def test_a_document_with_one_field_broken_loads_or_is_refused(tmp_path_factory, documents, load, usable, data):
    doc = mutated(data, documents[data.draw(st.sampled_from(sorted(documents)))])
    path = tmp_path_factory.mktemp("doc") / "doc.toml"
    path.write_text(to_toml(doc), encoding="utf-8")
    try:
        loaded = load(path)
    except MixerEdgeError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc)
        return
    assert usable(loaded)


JSON_VALUES = st.recursive(st.none() | SCALARS, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)


@pytest.mark.fuzz
@settings(max_examples=examples(100))
@given(st.data())
def test_a_record_row_with_one_part_broken_is_kept_or_refused(tmp_path_factory, data):
    row = record(1, 0.5)
    where = data.draw(st.sampled_from(paths(row)))
    parent = row
    for key in where[:-1]:
        parent = parent[key]
    if data.draw(st.booleans()):
        parent[where[-1]] = data.draw(JSON_VALUES)
    else:
        del parent[where[-1]]
    root = tmp_path_factory.mktemp("tuning")
    db = database(root / "db", [GOOD, json.dumps(row), GOOD])
    try:
        info = tuning.summary(db)
        merged = tuning.merge([db], root / "merged")
    except MixerEdgeError as exc:
        assert "\n" not in str(exc) and f"{tuning.RECORDS} line 2" in str(exc)
        return
    assert info["records"] == 3 and merged["workloads"] == 2


def test_the_readme_format_reference_is_generated_from_the_schemas():
    from mixer_edge import formats

    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    start, end = readme.index(formats.BEGIN), readme.index(formats.END) + len(formats.END)
    assert readme[start:end] == formats.readme_section(), "run: python -m mixer_edge.formats README.md"


def test_regenerating_the_reference_leaves_the_readme_whole_when_it_fails(tmp_path, monkeypatch):
    from mixer_edge import formats

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{formats.BEGIN}\nold\n{formats.END}\nrest\n", encoding="utf-8")
    before = readme.read_text(encoding="utf-8")

    def broken():
        raise ImportError("No module named 'torch'")  # as under a Python without the project's dependencies

    monkeypatch.setattr(formats, "readme_section", broken)
    with pytest.raises(ImportError):
        formats.main([str(readme)])
    assert readme.read_text(encoding="utf-8") == before
    monkeypatch.undo()
    formats.main([str(readme)])
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("intro\n") and text.endswith("\nrest\n") and formats.readme_section() in text
