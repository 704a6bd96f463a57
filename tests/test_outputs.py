"""The output-path policy (mixer_edge/atomic.py): what mixer-edge may write over, checked before any slow work.

Every refusal goes through the real CLI in process: exit 2, one line naming the path, and nothing under the
test's directory written, changed or left behind (a snapshot that does not follow symbolic links), and no
device or FIFO opened.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import socket
import stat
import tempfile
from pathlib import Path

import numpy as np
import pytest

from mixer_edge import atomic, export, report, runtime, train
from mixer_edge.atomic import ARTIFACT, BOARD, REPORT, TUNING_DB, VULKAN_ROOT, Marker, atomic_dir, atomic_file, check_destination
from mixer_edge.compiler import tuning
from mixer_edge.errors import MixerEdgeError

from conftest import assert_one_line_error, leftovers

DEV_NULL = Path("/dev/null")
KEY = {"graph": "ab" * 32, "target": "host", "precision": "float32", "model": "m"}


def state(root: Path) -> dict:
    """Every path under `root` (links not followed) with its type, size, mtime, inode and link target, and the
    loader's temporary directories; /dev/null's identity too."""
    files = {}
    for p in sorted(root.rglob("*")):
        info = os.lstat(p)
        files[str(p.relative_to(root))] = (stat.S_IFMT(info.st_mode), info.st_size, info.st_mtime_ns, info.st_ino,
                                           os.readlink(p) if p.is_symlink() else None)
    null = os.lstat(DEV_NULL)
    return {"files": files, "tmp": sorted(Path(tempfile.gettempdir()).glob("mixer-edge-*")),
            "dev_null": (stat.S_ISCHR(null.st_mode), null.st_rdev)}


@pytest.fixture(scope="session")
def host_artifact(build_artifact):
    """The digits model built for the host, before `refused` replaces the loader."""
    return build_artifact("host")


@pytest.fixture
def refused(run_cli, tmp_path, monkeypatch):
    """refused(*argv, fragments=[...]): the command is refused in one line and changes nothing. Runs in
    tmp_path, with the slow work of every command replaced by a failure: the refusal must come first."""
    def slow(*_, **__):
        pytest.fail("slow work started before the output path was refused")

    monkeypatch.chdir(tmp_path)
    for module, name in ((export, "open_model"), (train, "train_digits"), (runtime, "load")):
        monkeypatch.setattr(module, name, slow)

    def run(*argv, fragments=()):
        before = state(tmp_path)
        code, _, err = run_cli(*argv)
        assert_one_line_error(code, err, *fragments)
        assert state(tmp_path) == before, "the refused command wrote, changed or left files behind"
        return err

    return run


def fake_database(path: Path, key: dict = KEY) -> Path:
    path.mkdir(parents=True)
    (path / tuning.KEY).write_text(json.dumps(key))
    (path / tuning.WORKLOADS).write_text(json.dumps(["0", "mod0"]) + "\n")
    (path / tuning.RECORDS).write_text(json.dumps([0, [["t", []], [1.0], {"kind": "llvm"}, []]]) + "\n")
    return path


def foreign(path: Path, marker: str | None = None, content: str | None = None) -> Path:
    """A directory mixer-edge did not write: someone's files, and maybe a file named like the marker."""
    path.mkdir()
    (path / "bg.js").write_text("years of work\n")
    if marker:
        (path / marker).write_text(content)
    return path


# ---- the markers ----------------------------------------------------------------------------------

def test_each_marker_names_what_its_writer_writes(host_artifact, board, tmp_path):
    assert ARTIFACT.file == runtime.MANIFEST and ARTIFACT.proves(host_artifact)
    assert TUNING_DB.file == tuning.KEY
    key = tuning.TuningKey("ab" * 32, "host", "float32")
    tuning.create_database(tmp_path / "db", key, "m")
    assert TUNING_DB.proves(tmp_path / "db")
    written = inspect.getsource(report.make_report)
    assert REPORT.file == "report.json" and all(f'"{k}":' in written for k in REPORT.keys)
    assert BOARD.proves(board)  # the emulated board setup() built


@pytest.mark.parametrize("content, proves", [
    ('{"format_version": 2, "manifest_sha256": "x"}', True),
    ("{}", False),
    ('{"format_version": 2}', False),
    ('["format_version", "manifest_sha256"]', False),
    ('{"format_version": 2, "files": {', False),
    ("\xff\xfe", False),
])
def test_a_marker_is_proven_by_content(tmp_path, content, proves):
    (tmp_path / "manifest.json").write_text(content, encoding="latin-1")
    assert ARTIFACT.proves(tmp_path) is proves


def test_a_marker_file_that_is_a_link_or_a_directory_proves_nothing(host_artifact, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "manifest.json").symlink_to(host_artifact / "manifest.json")
    (tmp_path / "b" / "manifest.json").mkdir(parents=True)
    assert not ARTIFACT.proves(tmp_path / "a") and not ARTIFACT.proves(tmp_path / "b")


# ---- directories mixer-edge did not write are never replaced --------------------------------------

@pytest.mark.parametrize("content, fragments", [
    ("{}", ["manifest.json that is not a mixer-edge artifact's", "format_version, manifest_sha256"]),
    ('{"format_version": 2}', ["manifest.json that is not a mixer-edge artifact's"]),
    ("not json", ["manifest.json that is not a mixer-edge artifact's"]),
    (None, ["already holds other files and no manifest.json"]),
])
def test_compile_never_replaces_a_directory_it_did_not_write(refused, tmp_path, content, fragments):
    """The browser extension case: a manifest.json by NAME is not one mixer-edge wrote."""
    ext = foreign(tmp_path / "ext", "manifest.json" if content is not None else None, content)
    refused("compile", "-o", ext, fragments=[str(ext), *fragments, "choose a new path"])


def test_compile_never_replaces_a_directory_whose_manifest_is_a_link_to_a_real_one(refused, host_artifact, tmp_path):
    ext = foreign(tmp_path / "ext")
    (ext / "manifest.json").symlink_to(host_artifact / "manifest.json")
    refused("compile", "-o", ext, fragments=["not a mixer-edge artifact's"])


def test_report_never_replaces_a_directory_it_did_not_write(refused, tmp_path):
    out = foreign(tmp_path / "r", "report.json", '{"rows": []}')
    refused("report", "-o", out, fragments=[str(out), "report.json that is not a mixer-edge report's"])


def test_merge_never_replaces_a_directory_it_did_not_write(refused, tmp_path):
    a = fake_database(tmp_path / "a")
    out = foreign(tmp_path / "out", "key.json", '{"target": "host"}')
    refused("tuning-db", "merge", a, "-o", out, fragments=[str(out), "not a mixer-edge tuning database's"])


def test_tune_never_fills_a_directory_it_did_not_write(refused, tmp_path):
    out = foreign(tmp_path / "db")
    refused("tune", "--tuning-db", out, fragments=[str(out), "no key.json"])


def test_the_emulator_setup_never_replaces_a_directory_it_did_not_write(refused, tmp_path):
    out = foreign(tmp_path / "board")
    refused("emulator", "setup", "--dir", out, fragments=[str(out), "no board.json"])


# ---- what mixer-edge wrote, or nothing, is replaced -----------------------------------------------

def test_a_recompile_replaces_the_artifact_mixer_edge_wrote(host_artifact, tmp_path, run_cli):
    out = tmp_path / "art"
    shutil.copytree(host_artifact, out)
    old = json.loads((out / runtime.MANIFEST).read_text())
    code, _, err = run_cli("compile", "--no-verify", "-o", out)
    assert code == 0, err
    new = json.loads((out / runtime.MANIFEST).read_text())
    assert new["manifest_sha256"] != old["manifest_sha256"] and "verification" not in new
    runtime.load(out)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("marker, content", [
    (REPORT, {"model": "m", "evaluation": {}, "score": "top1", "rows": []}),
    (TUNING_DB, KEY),
    (BOARD, {"python": "python3.11", "debs": [], "wheels": []}),
    (VULKAN_ROOT, {"mesa": "22.3.6", "debs": []}),
    (ARTIFACT, {"format_version": 2, "manifest_sha256": "0" * 64}),
])
def test_a_directory_with_a_proven_marker_is_replaced(tmp_path, marker, content):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / marker.file).write_text(json.dumps(content))
    (out / "sub" / "old.bin").write_bytes(b"old")
    with atomic_dir(out, marker) as stage:
        (stage / "new.bin").write_bytes(b"new")
    assert sorted(p.name for p in out.iterdir()) == ["new.bin"] and leftovers(tmp_path) == []


def test_an_empty_directory_is_replaced_and_a_marker_name_still_works(tmp_path):
    (tmp_path / "out").mkdir()
    with atomic_dir(tmp_path / "out", mark="manifest.json") as stage:  # a name: looked up in atomic.MARKERS
        (stage / "x").write_text("x")
    assert (tmp_path / "out" / "x").is_file()
    with pytest.raises(ValueError, match="no Marker"):
        check_destination(tmp_path / "y", "notes.txt")


def test_merge_replaces_a_database_of_the_same_key(tmp_path, run_cli):
    a, out = fake_database(tmp_path / "a"), fake_database(tmp_path / "out")
    (out / tuning.RECORDS).write_text("")
    code, _, err = run_cli("tuning-db", "merge", a, "-o", out)
    assert code == 0, err
    assert tuning.summary(out)["records"] == 1 and leftovers(tmp_path) == []


def test_merge_refuses_to_replace_a_database_of_another_key(refused, tmp_path):
    a = fake_database(tmp_path / "a")
    out = fake_database(tmp_path / "out", {**KEY, "target": "rpi5"})
    refused("tuning-db", "merge", a, "-o", out, fragments=[str(out), "another key", "rpi5", "new path"])


def test_run_replaces_a_regular_file(host_artifact, tmp_path, run_cli):
    (tmp_path / "logits.npy").write_text("an older run\n")
    code, _, err = run_cli("run", host_artifact, "--save", tmp_path / "logits.npy")
    assert code == 0, err
    assert np.load(tmp_path / "logits.npy").shape == (360, 10) and leftovers(tmp_path) == []


# ---- links, devices, FIFOs, sockets ---------------------------------------------------------------

def special(tmp_path: Path, kind: str) -> Path:
    target = tmp_path / "target.npy"
    target.write_text("my data\n")
    path = tmp_path / "out.npy"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        path = Path(tempfile.mkdtemp(dir=tmp_path)) / "s"  # short enough for a socket's address
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))
        server.close()
    elif kind == "link":
        path.symlink_to(target)
    elif kind == "dangling link":
        path.symlink_to(tmp_path / "nowhere.npy")
    elif kind == "link to a directory":
        (tmp_path / "d").mkdir()
        path.symlink_to(tmp_path / "d")
    elif kind == "char device":
        path = DEV_NULL
    return path


SPECIAL_FILES = [
    ("char device", "is a character device"),
    ("fifo", "is a named pipe (FIFO)"),
    ("socket", "is a socket"),
    ("link", "is a symbolic link; pass the path it points to"),
    ("dangling link", "is a symbolic link; pass the path it points to"),
    ("link to a directory", "is a symbolic link; pass the path it points to"),
]


# The calibration table goes beside its QDQ model, which /dev/null (the char device) has no writable place for.
@pytest.mark.parametrize("kind, fragment, command", [
    (kind, fragment, command) for kind, fragment in SPECIAL_FILES
    for command in ("run", "bench", "train", "export", "calibrate-table")
    if not (command == "calibrate-table" and kind == "char device")])
def test_a_file_output_that_is_a_link_device_fifo_or_socket_is_refused(refused, tmp_path, kind, fragment, command):
    path = special(tmp_path, kind)
    if command == "calibrate-table":  # the table beside the QDQ model
        table = path.with_name("q.calibration.json")
        path.rename(table)
        path = table
        argv = ["calibrate", "-o", path.with_name("q.onnx")]
    else:
        argv = {"run": ["run", tmp_path / "art", "--save", path], "bench": ["bench", "--json", path],
                "train": ["train", "-o", path], "export": ["export", "-o", path]}[command]
    refused(*argv, fragments=[str(path), fragment])


@pytest.mark.parametrize("kind, fragment", [
    ("char device", "is a character device"),
    ("fifo", "is a named pipe (FIFO)"),
    ("link to a directory", "is a symbolic link"),
])
def test_a_directory_output_that_is_a_link_device_or_fifo_is_refused(refused, tmp_path, kind, fragment):
    path = special(tmp_path, kind)
    refused("compile", "-o", path, fragments=[str(path), fragment])


def test_a_link_to_an_artifact_mixer_edge_wrote_is_refused(refused, host_artifact, tmp_path):
    shutil.copytree(host_artifact, tmp_path / "art")
    (tmp_path / "link").symlink_to(tmp_path / "art")
    refused("compile", "-o", tmp_path / "link", fragments=["link is a symbolic link"])


def test_a_tar_output_that_is_a_fifo_is_refused(refused, tmp_path):
    os.mkfifo(tmp_path / "a.tar")
    refused("compile", "-o", tmp_path / "a.tar", fragments=["a.tar is a named pipe"])


def test_links_above_the_output_are_followed(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "via").symlink_to(tmp_path / "real")
    with atomic_file(tmp_path / "via" / "x.npy") as tmp:
        tmp.write_text("x")
    assert (tmp_path / "real" / "x.npy").read_text() == "x"


# ---- an output is never an input ------------------------------------------------------------------

SAME_FILE = [
    pytest.param(lambda t: t / "w.pth", id="same path"),
    pytest.param(lambda t: Path(".") / "w.pth", id="relative"),
    pytest.param(lambda t: t / "sub" / ".." / "w.pth", id="dot-dot"),
    pytest.param(lambda t: os.link(t / "w.pth", t / "hard.pth") or t / "hard.pth", id="hard link"),
    pytest.param(lambda t: (t / "via").symlink_to(t) or t / "via" / "w.pth", id="through a linked directory"),
]


@pytest.mark.parametrize("spell", SAME_FILE)
def test_export_refuses_to_write_over_its_checkpoint(refused, tmp_path, spell):
    (tmp_path / "w.pth").write_bytes(b"weights")
    (tmp_path / "sub").mkdir()
    out = spell(tmp_path)
    refused("export", "--checkpoint", "w.pth", "-o", out, fragments=[str(out), "is also an input", "another path"])


def overlap(argv, *fragments, id):
    return pytest.param(argv, fragments, id=id)


@pytest.mark.parametrize("argv, fragments", [
    overlap(lambda t: ["compile", "--model", t / "m.onnx", "-o", t / "m.onnx"], "m.onnx is also an input",
            id="compile over its model"),
    overlap(lambda t: ["compile", "--model", t / "d" / "m.onnx", "-o", t / "d"], "d holds", "m.onnx, an input",
            id="compile over the directory of its model"),
    overlap(lambda t: ["compile", "--tuning-db", t / "db", "-o", t / "db"], "db is also an input",
            id="compile over its tuning database"),
    overlap(lambda t: ["calibrate", "--model", t / "m.onnx", "-o", t / "m.onnx"], "m.onnx is also an input",
            id="calibrate over its model"),
    overlap(lambda t: ["calibrate", "--calib-data", t / "q.calibration.json", "-o", t / "q.onnx"],
            "q.calibration.json is also an input", id="calibrate's table over its data"),
    overlap(lambda t: ["calibrate", "--calib-data", t / "d", "-o", t / "d" / "q.onnx"], "lies inside",
            "write the output outside it", id="calibrate into its data folder"),
    overlap(lambda t: ["tuning-db", "merge", t / "db", t / "db2", "-o", t / "db"], "db is also an input",
            id="merge over a source"),
    overlap(lambda t: ["tuning-db", "merge", t / "db", "-o", "./db"], "db is also an input",
            id="merge over its only source, spelled relative"),
    overlap(lambda t: ["tune", "--checkpoint", t / "db" / "w.pth", "--tuning-db", t / "db"], "db holds", "w.pth",
            id="tune into the directory of its checkpoint"),
    overlap(lambda t: ["run", t / "art", "--save", t / "art"], "art is also an input", id="run over its artifact"),
    overlap(lambda t: ["run", t / "art", "--save", t / "art" / "logits.npy"], "lies inside",
            id="run into its artifact"),
    overlap(lambda t: ["run", t / "art", "--input", t / "d", "--save", t / "d" / "logits.npy"], "lies inside",
            id="run into its image folder"),
    overlap(lambda t: ["run", t / "m.tar", "--save", t / "m.tar"], "m.tar is also an input",
            id="run over its .tar"),
    overlap(lambda t: ["run", t / "art", "--input", t / "x.npy", "--save", t / "x.npy"], "x.npy is also an input",
            id="run over its inputs"),
    overlap(lambda t: ["bench", "--checkpoint", t / "w.pth", "--json", t / "w.pth"], "w.pth is also an input",
            id="bench over its checkpoint"),
    overlap(lambda t: ["report", "--eval-data", t / "d" / "x.npy", "-o", t / "d"], "d holds",
            id="report over the folder of its data"),
])
def test_an_output_that_is_holds_or_lies_in_an_input_is_refused(refused, tmp_path, argv, fragments):
    for name in ("m.onnx", "w.pth", "x.npy", "m.tar", "q.calibration.json"):
        (tmp_path / name).write_bytes(b"input")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.npy").write_bytes(b"input")
    (tmp_path / "d" / "m.onnx").write_bytes(b"input")
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "manifest.json").write_text(json.dumps({"format_version": 2, "manifest_sha256": "0"}))
    fake_database(tmp_path / "db")
    fake_database(tmp_path / "db2")
    (tmp_path / "db" / "w.pth").write_bytes(b"input")
    refused(*argv(tmp_path), fragments=fragments)


# ---- names and paths too long, places that cannot be written --------------------------------------

@pytest.mark.parametrize("make, fragment", [
    (lambda t: t / ("a" * 300 + ".npy"), "its name is 304 bytes"),
    (lambda t: t / ("a" * 240), "its name is 240 bytes and the filesystem allows 255, 233 for an output"),
    (lambda t: t / ("d" * 300) / "x.npy", "longer than the 255 the filesystem allows"),
    (lambda t: Path(str(t) + ("/" + "d" * 200) * 21) / "x.npy", "too long for the 4096"),
])
def test_a_name_or_path_too_long_is_one_line(refused, tmp_path, make, fragment):
    path = make(tmp_path)
    err = refused("run", tmp_path / "art", "--save", path, fragments=["cannot write", fragment, "shorter"])
    assert str(path)[:100] in err and str(path)[-100:] in err and len(err) < 1000  # named, its middle elided


def test_the_longest_name_an_output_may_have(tmp_path):
    limit = os.pathconf(tmp_path, "PC_NAME_MAX") - atomic.STAGE_EXTRA
    with atomic_file(tmp_path / ("a" * limit)) as tmp:
        tmp.write_text("x")
    with pytest.raises(MixerEdgeError, match="shorter name"):
        check_destination(tmp_path / ("a" * (limit + 1)))


@pytest.mark.parametrize("name", [".", ".."])
def test_an_output_named_dot_is_refused(refused, tmp_path, name):
    refused("compile", "-o", name, fragments=["names no directory"])  # in tmp_path, empty: replaceable if named


def deny_writes_to(monkeypatch, *directories: Path) -> None:
    """os.access as a user who may not write `directories` (the tests run as root, who may write anything)."""
    real = os.access
    denied = {str(d) for d in directories}
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) in denied and mode & os.W_OK
                        else real(p, mode, **kw))


def test_a_directory_that_cannot_be_written_is_one_line(refused, tmp_path, monkeypatch):
    (tmp_path / "ro").mkdir()
    deny_writes_to(monkeypatch, tmp_path / "ro")
    refused("run", tmp_path / "art", "--save", tmp_path / "ro" / "x.npy", fragments=["not writable for you"])


def test_an_old_version_that_could_not_be_removed_is_not_replaced(refused, tmp_path, monkeypatch):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / REPORT.file).write_text(json.dumps({"model": "m", "evaluation": {}, "score": "top1", "rows": []}))
    deny_writes_to(monkeypatch, out / "sub")
    refused("report", "-o", out, fragments=["cannot replace", "sub is not writable for you"])


def test_another_users_file_in_a_sticky_directory_is_not_replaced(refused, tmp_path, monkeypatch):
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared").chmod(0o1777)  # like /tmp: only a file's owner may replace it
    (tmp_path / "shared" / "b.json").write_text("someone else's\n")  # owned by root
    monkeypatch.setattr(os, "geteuid", lambda: 12345)
    refused("bench", "--json", tmp_path / "shared" / "b.json", fragments=["belongs to another user"])


def test_a_file_in_the_way_is_one_line(refused, tmp_path):
    (tmp_path / "notes.txt").write_text("my notes\n")
    refused("bench", "--json", tmp_path / "notes.txt" / "b.json", fragments=["notes.txt is a file, so"])


# ---- nothing takes the destination's place between the check and the rename ---------------------

def test_a_directory_that_appears_during_the_write_is_kept(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(MixerEdgeError, match="no manifest.json"):
        with atomic_dir(out, ARTIFACT) as stage:
            (stage / "manifest.json").write_text("{}")
            foreign(out)  # someone else's directory, made while the artifact was built
    assert sorted(p.name for p in out.iterdir()) == ["bg.js"] and leftovers(tmp_path) == []


def test_a_link_that_appears_during_the_write_is_kept(tmp_path):
    (tmp_path / "target").write_text("mine\n")
    with pytest.raises(MixerEdgeError, match="symbolic link"):
        with atomic_file(tmp_path / "x.npy") as tmp:
            tmp.write_text("x")
            (tmp_path / "x.npy").symlink_to(tmp_path / "target")
    assert (tmp_path / "target").read_text() == "mine\n" and (tmp_path / "x.npy").is_symlink()
    assert leftovers(tmp_path) == []


# ---- where the tuning cache is --------------------------------------------------------------------

def test_an_empty_cache_variable_means_the_default_cache(monkeypatch):
    monkeypatch.setenv("MIXER_EDGE_CACHE", "")
    assert tuning.cache_root() == Path.home() / ".cache" / "mixer-edge" / "tuning"
    monkeypatch.setenv("MIXER_EDGE_CACHE", "/somewhere")
    assert tuning.cache_root() == Path("/somewhere/tuning")


def test_marker_is_a_small_frozen_record():
    assert Marker("x.json", ("a",), "thing") == Marker("x.json", ("a",), "thing")
    with pytest.raises(AttributeError):
        ARTIFACT.file = "other.json"
