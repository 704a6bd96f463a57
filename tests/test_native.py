"""The native runtime: the C API and mixer-edge-run, built by the test itself, in bundles for x86_64 (CPU and
Vulkan) and for the emulated aarch64 board with no Python in its root; tampered artifacts refused in the
Python loader's words."""

from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixer_edge import bundle, runtime
from mixer_edge.errors import MixerEdgeError

from conftest import examples, quiet
from test_bad_inputs import CASES, Corpus

CROSS_ROOT = Path("/usr/aarch64-linux-gnu")  # the cross toolchain's libc and libstdc++: a root with no Python
@pytest.fixture(scope="module")
def host_bundle(build_artifact, tmp_path_factory):
    """package(ARTIFACT) -> a bundle of the digits model built for that target (made once per target)."""
    made = {}

    def make(target: str, precision: str = "float32") -> Path:
        if (target, precision) not in made:
            root = tmp_path_factory.mktemp("bundles")
            artifact = build_artifact(target) if precision == "float32" else _built(target, precision, root)
            made[target, precision] = bundle.package(artifact, root / "bundle", progress=quiet)
        return made[target, precision]

    return make


def _built(target: str, precision: str, root: Path) -> Path:
    from mixer_edge.compiler import compile_model
    from mixer_edge.export import open_model

    compile_model(open_model(progress=quiet), target, root / f"art-{precision}", precision=precision, progress=quiet)
    return root / f"art-{precision}"


def needed_libraries(elf: Path) -> list[str]:
    """The DT_NEEDED entries of an ELF file (readelf, from binutils beside the compiler)."""
    out = subprocess.run(["readelf", "-d", str(elf)], capture_output=True, text=True, check=True).stdout
    return [line.split("[")[1].split("]")[0] for line in out.splitlines() if "(NEEDED)" in line]


def run_native(bundle_dir: Path, *args, emulated_cpu: str | None = None, timeout: float = 300):
    """(exit code, stdout, stderr) of the bundle's mixer-edge-run; aarch64 bundles under qemu-user, with an
    environment and a root that hold no Python.

    Emulated, the runner keeps to one thread: with the cross toolchain's C library (the root without Python)
    under qemu-user, TVM's thread pool spins without end at 2 threads once a kernel has a parallel loop (the
    default schedules give every rpi5 kernel one), while the same binary on the emulated board's Debian root
    runs the digits test batch with 2 threads in 1.5 s (measured 2026-11-30)."""
    runner = str(bundle_dir / "bin" / "mixer-edge-run")
    cmd = ["qemu-aarch64-static", "-cpu", emulated_cpu, "-L", str(CROSS_ROOT), runner] if emulated_cpu else [runner]
    proc = subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={"PATH": "/usr/bin:/bin", **({"TVM_NUM_THREADS": "1"} if emulated_cpu else {})})
    return proc.returncode, proc.stdout, proc.stderr


def native_logits(bundle_dir: Path, x: np.ndarray, tmp: Path, **kw) -> np.ndarray:
    np.save(tmp / "x.npy", x)
    code, out, err = run_native(bundle_dir, bundle_dir / "artifact", "--input", tmp / "x.npy", "--show", 0,
                                "--save", tmp / "logits.npy", **kw)
    assert code == 0, err
    return np.load(tmp / "logits.npy")


@pytest.mark.parametrize("precision", ["float32", pytest.param("int8", marks=pytest.mark.slow)])  # int8: calibrates
def test_host_bundle_matches_the_python_runtime(host_bundle, digits_test, precision, tmp_path):
    """float32 within 1e-6 of the Python runtime; int8 bit-identical (the same integer kernels)."""
    root = host_bundle("host", precision)
    reference = runtime.load(root / "artifact")(digits_test[0])
    logits = native_logits(root, digits_test[0], tmp_path)
    if precision == "int8":
        np.testing.assert_array_equal(logits, reference)
    else:
        np.testing.assert_allclose(logits, reference, rtol=0, atol=1e-6)
    assert (logits.argmax(1) == digits_test[1]).mean() > 0.9


def test_runner_prints_predictions_and_benchmarks(host_bundle, digits_test, tmp_path):
    root = host_bundle("host")
    np.save(tmp_path / "x.npy", digits_test[0][:3])
    code, out, err = run_native(root, root / "artifact", "--input", tmp_path / "x.npy", "--top", 2, "--bench", 20)
    assert code == 0, err
    lines = out.splitlines()
    labels = json.loads((root / "artifact" / "manifest.json").read_text())["labels"]
    assert [line.split(":")[0] for line in lines[:3]] == ["#0", "#1", "#2"]
    assert lines[0].split(": ")[1].split(" (")[0] in labels
    assert "median" in lines[3] and "p90" in lines[3] and "peak resident memory" in lines[3]


RUNNER_INPUTS = {  # a bad input -> what the runner's one error line must say
    "missing.png": "does not exist or cannot be opened",
    "truncated.png": "could not be read",
    "notes.txt": "could not be read",
    "wrong-shape.npy": "the model expects float32 (N, 1, 8, 8)",
    "text.npy": "could not be read",
}


@pytest.mark.parametrize("name", RUNNER_INPUTS)
def test_runner_refuses_bad_inputs_in_one_line(host_bundle, tmp_path, name):
    from PIL import Image

    Image.new("L", (8, 8)).save(tmp_path / "whole.png")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "whole.png").read_bytes()[:40])
    (tmp_path / "notes.txt").write_text("not an image")
    np.save(tmp_path / "wrong-shape.npy", np.zeros((2, 3, 8, 8), np.float32))
    (tmp_path / "text.npy").write_text("not an array")
    root = host_bundle("host")
    code, out, err = run_native(root, root / "artifact", "--input", tmp_path / name)
    assert code == 2 and out == "" and len(err.splitlines()) == 1, err
    assert err.startswith("mixer-edge-run: error: ") and name in err and RUNNER_INPUTS[name] in err, err


def test_image_input_is_preprocessed(host_bundle, tmp_path):
    """A PNG goes through the artifact's preprocessing (decode, resize, normalise) to a prediction."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = host_bundle("host")
    digit = (load_digits().images[0] * 255 / 16).astype(np.uint8)  # a 0, scaled up as a user's photo would be
    Image.fromarray(digit).resize((64, 64), Image.Resampling.NEAREST).save(tmp_path / "digit.png")
    code, out, err = run_native(root, root / "artifact", "--input", tmp_path / "digit.png", "--top", 1)
    assert code == 0, err
    assert out.startswith("#0: 0 (")


def test_c_program_links_against_the_bundle_with_cmake(host_bundle, digits_test, tmp_path):
    """The bundle's example CMake project builds a C program against include/ and lib/ that classifies."""
    root = host_bundle("host")
    build = tmp_path / "build"
    for cmd in (["cmake", "-S", root / "example", "-B", build], ["cmake", "--build", build]):
        proc = subprocess.run(list(map(str, cmd)), capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    np.save(tmp_path / "x.npy", digits_test[0][:20])
    proc = subprocess.run([str(build / "classify"), str(root / "artifact"), str(tmp_path / "x.npy")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    expected = runtime.load(root / "artifact").classify(digits_test[0][:20])
    assert proc.stdout.split() == [str(label) for label in expected]


@pytest.mark.emulation
@pytest.mark.slow  # cross-compiles the aarch64 runtime: CI's pytest -m slow
def test_rpi5_bundle_runs_on_the_emulated_board_without_python(host_bundle, build_artifact, digits_test, tmp_path):
    assert not list(CROSS_ROOT.rglob("python*")), "the emulated root must hold no Python"
    root = host_bundle("rpi5")
    assert not [p for p in root.rglob("*") if "python" in p.name.lower()]
    x = digits_test[0][:64]
    logits = native_logits(root, x, tmp_path, emulated_cpu="cortex-a76")
    reference = runtime.load(build_artifact("host"))(x)
    np.testing.assert_allclose(logits, reference, rtol=0, atol=1e-4)
    code, _, err = run_native(root, root / "artifact", "--input", tmp_path / "x.npy", emulated_cpu="cortex-a72")
    assert code == 2 and "needs CPU features this CPU lacks (asimddp, asimdhp)" in err  # a Pi 4 is refused


def test_vulkan_bundle_runs_through_wgpu_native(host_bundle, build_artifact, digits_test, tmp_path):
    """The WGSL artifact through wgpu-native from C on Mesa's software Vulkan device, as the Python runner."""
    root = host_bundle("android-vulkan")
    x = digits_test[0][:32]
    reference = runtime.load(build_artifact("android-vulkan"))(x)
    np.testing.assert_allclose(native_logits(root, x, tmp_path), reference, rtol=0, atol=1e-5)


@pytest.mark.slow  # cross-compiles the aarch64 runtime: CI's pytest -m slow
def test_bundle_manifest_lists_every_file_and_needs_nothing_else(host_bundle):
    for target in ("host", "rpi5", "android-vulkan"):
        root = host_bundle(target)
        record = json.loads((root / "bundle.json").read_text())
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != "bundle.json")
        assert sorted(record["files"]) == files
        assert record["total_bytes"] == sum((root / f).stat().st_size for f in files)
        for name, digest in record["files"].items():
            assert runtime.sha256(root / name) == digest
        bundled = {p.name for p in (root / "lib").iterdir()}
        system = {"libc.so.6", "libm.so.6", "libdl.so.2", "libpthread.so.0", "librt.so.1", "libstdc++.so.6",
                  "libgcc_s.so.1", "ld-linux-x86-64.so.2", "ld-linux-aarch64.so.1"}
        for elf in [root / "bin" / "mixer-edge-run", *(root / "lib").iterdir()]:
            needed = set(needed_libraries(elf))
            assert needed <= bundled | system, (elf.name, needed - bundled - system)
            assert not any(n.startswith(("libcudart", "libnvrtc", "libtvm_runtime_cuda", "libpython")) for n in needed)


@pytest.mark.emulation
@pytest.mark.slow  # cross-compiles the aarch64 runtime: CI's pytest -m slow
def test_rpi5_vulkan_bundle_runs_on_emulated_lavapipe_without_python(build_artifact, digits_test, tmp_path):
    """The aarch64 wgpu bundle on Debian's arm64 Mesa lavapipe under qemu-user, in a root with no Python:
    the host lavapipe's logits."""
    from mixer_edge import vulkan_root

    root = vulkan_root.setup(progress=quiet)
    assert not any("python" in deb for deb in json.loads((root / "vulkan-root.json").read_text())["debs"])
    assert not list((root / "sysroot").glob("usr/bin/python*")) and not list((root / "sysroot").glob("usr/lib/python3*"))
    artifact = build_artifact("rpi5-vulkan")
    packed = bundle.package(artifact, tmp_path / "bundle", progress=quiet, arch="aarch64")
    x = digits_test[0][:32]
    np.save(tmp_path / "x.npy", x)
    proc = vulkan_root.run(packed, [packed / "artifact", "--input", tmp_path / "x.npy", "--show", 0,
                                    "--save", tmp_path / "logits.npy"], "cortex-a76")
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), runtime.load(artifact)(x), rtol=0, atol=1e-5)
    proc = vulkan_root.run(packed, [packed / "artifact"], "cortex-a76")  # opened, no inputs: the device it found
    assert proc.returncode == 0 and "on Vulkan llvmpipe" in proc.stdout, proc.stdout + proc.stderr


def test_the_vulkan_root_runs_only_aarch64_bundles(host_bundle, tmp_path):
    from mixer_edge import vulkan_root

    with pytest.raises(MixerEdgeError, match="is an x86_64 bundle: the emulated Vulkan root runs aarch64 bundles"):
        vulkan_root.run(host_bundle("host"), [], "cortex-a76", tmp_path / "root")


# ---- the C API itself, called from Python through ctypes ---------------------------------------------

@pytest.fixture(scope="module")
def c_api(host_bundle):
    lib = ctypes.CDLL(str(host_bundle("host") / "lib" / "libmixer_edge.so"))
    lib.mixer_edge_last_error.restype = ctypes.c_char_p
    lib.mixer_edge_label.restype = ctypes.c_char_p
    lib.mixer_edge_backend.restype = ctypes.c_char_p
    return lib


def open_model(c_api, path: Path):
    model = ctypes.c_void_p()
    status = c_api.mixer_edge_open(str(path).encode(), None, ctypes.byref(model))
    return status, model


def test_c_api_reports_errors_as_codes_and_one_line(c_api, tmp_path):
    status, model = open_model(c_api, tmp_path)
    assert status == 2 and not model.value
    assert c_api.mixer_edge_last_error().decode() == (f"{tmp_path} is not a mixer-edge artifact (no manifest.json): "
                                                      "pass the directory `compile` wrote")
    assert c_api.mixer_edge_open(None, None, ctypes.byref(model)) == 1


def test_c_api_runs_any_count_and_one_model_per_thread(c_api, host_bundle, digits_test):
    root = host_bundle("host")
    x = np.ascontiguousarray(digits_test[0][:37])
    reference = runtime.load(root / "artifact")(x)
    status, model = open_model(c_api, root / "artifact")
    assert status == 0, c_api.mixer_edge_last_error()
    try:
        assert c_api.mixer_edge_backend(model) == b"cpu" and c_api.mixer_edge_num_classes(model) == 10
        assert c_api.mixer_edge_label(model, 3) == b"3" and c_api.mixer_edge_label(model, 10) is None
        out = np.empty((37, 10), np.float32)
        assert c_api.mixer_edge_run(model, ctypes.c_void_p(x.ctypes.data), 0, ctypes.c_void_p(out.ctypes.data)) == 1
        assert c_api.mixer_edge_run(model, ctypes.c_void_p(x.ctypes.data), 37, ctypes.c_void_p(out.ctypes.data)) == 0
        np.testing.assert_allclose(out, reference, rtol=0, atol=1e-6)
    finally:
        c_api.mixer_edge_close(model)

    results = {}

    def worker(i: int) -> None:  # ctypes releases the GIL: the threads run the C API at the same time
        status, own = open_model(c_api, root / "artifact")
        mine = np.empty((37, 10), np.float32)
        for _ in range(5):
            c_api.mixer_edge_run(own, ctypes.c_void_p(x.ctypes.data), 37, ctypes.c_void_p(mine.ctypes.data))
        c_api.mixer_edge_close(own)
        results[i] = (status, mine)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for status, mine in results.values():
        assert status == 0
        np.testing.assert_allclose(mine, reference, rtol=0, atol=1e-6)


# Any JSON value Python writes into a manifest: unicode and control characters in keys and strings, floats of every
# magnitude (repr's shortest digits, exponents), integers past 64 bits, nesting.
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70) | st.floats(allow_nan=False,
    allow_infinity=False) | st.text(st.characters(exclude_categories=["Cs"]), max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(st.characters(exclude_categories=["Cs"]),
                                                                        max_size=6), inner, max_size=4),
    max_leaves=12)


@pytest.mark.fuzz
@settings(max_examples=examples(60), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=JSON_VALUES, ascii=st.booleans())
def test_the_c_api_computes_the_manifest_digest_as_python_does(c_api, host_bundle, tmp_path, value, ascii):
    """A manifest resealed by Python's manifest_digest around any JSON value opens in C: the digest, recomputed from
    the text Python wrote (numbers as written, keys sorted, strings escaped as ensure_ascii), always matches."""
    root = tmp_path / "art"
    if not root.exists():
        shutil.copytree(host_bundle("host") / "artifact", root)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["versions"]["anything"] = value  # a field the C API does not read: only the digest can refuse it
    manifest["manifest_sha256"] = runtime.manifest_digest(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=ascii), encoding="utf-8")
    status, model = open_model(c_api, root)
    assert status == 0, c_api.mixer_edge_last_error()
    c_api.mixer_edge_close(model)


# ---- tampered artifacts: the corpus's artifact cases, refused in the Python loader's words -------------

# The artifact cases a native process meets too (not those faking this machine inside Python, nor .tar files);
# test_rpi5_bundle_runs_on_the_emulated_board_without_python has the native runtime refuse a Pi 4's CPU.
ARTIFACT_CASES = [case for case in CASES if case.id.startswith("artifact-") and case.values[0].native]


@pytest.mark.parametrize("make, fragments", ARTIFACT_CASES)
def test_tampered_artifacts_are_refused_as_the_python_loader_refuses_them(make, fragments, tmp_path, request,
                                                                          monkeypatch, host_bundle):
    argv = make(tmp_path, Corpus(request, monkeypatch))
    code, _, err = run_native(host_bundle("host"), argv[1])
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("mixer-edge-run: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ---- the native runner beside the Python runtime (measured for the README; no assert on time) -----------

COSTS = ("open_ms", "first_inference_ms", "median_ms", "p90_ms", "peak_rss_mib", "start_to_first_result_ms")


def test_compare_runtimes_reports_both_and_native_holds_less_memory(host_bundle):
    rows = bundle.compare_runtimes(host_bundle("host"), runs=20, threads=None, repeats=1, progress=quiet)
    assert [row.runtime for row in rows] == ["native", "python"]
    for row in rows:
        for field in COSTS:
            value = getattr(row, field)
            assert np.isfinite(value) and value > 0, (row.runtime, field, value)
    native, python = rows
    assert native.peak_rss_mib < python.peak_rss_mib  # the interpreter, numpy, pydantic and TVM's Python package


def test_compare_runtimes_refuses_a_bundle_for_another_arch(host_bundle):
    with pytest.raises(MixerEdgeError, match=r"built for aarch64, not this machine .*run bin/mixer-edge-run --bench N "
                                             r"on the device"):
        bundle.compare_runtimes(host_bundle("rpi5"), runs=5, threads=1, progress=quiet)


def test_package_bench_prints_the_table_and_the_ratios(run_cli, build_artifact, tmp_path):
    code, out, err = run_cli("package", build_artifact("host"), "-o", tmp_path / "bundle", "--bench", 5,
                             "--threads", 1)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"wrote {tmp_path / 'bundle'}: x86_64, cpu backend")
    assert [cell.strip() for cell in lines[1].split("|")] == [
        "runtime", "open ms", "first inference ms", "median ms", "p90 ms", "peak RSS MiB", "spawn to first result ms"]
    assert [line.split("|")[0].strip() for line in lines[3:5]] == ["native", "python"]
    assert all(float(cell) > 0 for line in lines[3:5] for cell in line.split("|")[1:])
    assert lines[5].startswith("native/python: median ")
    assert "peak RSS" in lines[5] and "spawn to first result" in lines[5]
    assert "round 3/3, python" in err


def test_package_bench_options_are_checked_before_packaging(run_cli, build_artifact, tmp_path):
    from conftest import assert_one_line_error

    code, _, err = run_cli("package", build_artifact("host"), "-o", tmp_path / "b", "--threads", 1)
    assert_one_line_error(code, err, "--threads sets the threads --bench times with: add --bench N")
    code, _, err = run_cli("package", build_artifact("host"), "-o", tmp_path / "b", "--bench", 0)
    assert code == 2 and "argument --bench: takes a whole number from 1" in err
    assert not (tmp_path / "b").exists()
