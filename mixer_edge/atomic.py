"""Every file and directory mixer-edge writes: where it may go, and how it is written.

How: work is staged beside the destination under a name carrying the writer's pid
(`.NAME.PID-XXXXXXXX.tmp`) and renamed into place when complete, a directory swapped in one step
(Linux renameat2 RENAME_EXCHANGE), so a reader sees the old version or the new one, never half of
one. A writer killed with SIGKILL cannot clean up, so every later write to the same destination
first removes the stages of writers that are no longer alive. A full disk, or a place that cannot
be written, is one line naming the destination and leaves the old version.

Where (`check_destination`; the commands call it before any slow work, and the writers again
before they start and just before they rename):

- A directory output replaces an existing directory only if it is empty or mixer-edge wrote it,
  proven by content: its marker file (a `Marker`, one per kind of output: ARTIFACT, TUNING_DB,
  REPORT, BOARD, VULKAN_ROOT, BUNDLE, and bundle.py's caches NATIVE_BUILD and RUNTIME_LIBS) is a regular file
  that parses as a JSON object holding that kind's keys. A marker file of the right name but other
  content proves nothing.
- A file output replaces an existing regular file: the files mixer-edge writes (.onnx, .npy, .json,
  .safetensors, .tar) are regenerated outputs, and the path was named for this output, as with
  `cc -o`. Never a directory, and never a file that is also an input of the command.
- Symbolic links: a destination that is itself a symbolic link is refused, whatever it points to
  (pass the path it points to); symbolic links among the directories above it are followed.
- Character and block devices, named pipes and sockets are refused: an output is a regular file or
  a directory.
- An output never overlaps an input of the command (compared by resolved path and by inode, so
  `./x`, `x`, a hard link and a symbolic link to the same file are one): it is not an input, does
  not contain one (it would be replaced) and does not lie inside an input directory.
- A name longer than the filesystem allows (PC_NAME_MAX, with room for the staging name's
  `.` + `.PID-XXXXXXXX.tmp`), or a path longer than PC_PATH_MAX (a directory output leaves
  DIRECTORY_ROOM bytes for what it holds), is one line naming the path; so is a place under a
  file, or a directory that is not writable (nor, for a directory being replaced, the old one).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from .errors import MixerEdgeError

DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.EEXIST, errno.ENOTDIR}
PID_DIGITS = 7  # Linux pids are at most 4194304: the staging name's length does not depend on the pid
STAGE_EXTRA = len("..") + PID_DIGITS + len("-XXXXXXXX.tmp")  # `.NAME.PID-XXXXXXXX.tmp` minus NAME
DIRECTORY_ROOM = 128  # bytes of path a directory output keeps for the files and stages inside it
MARKER_MAX_BYTES = 16 * 2**20  # a marker file larger than this is not one mixer-edge wrote


@dataclass(frozen=True)
class Marker:
    """What proves a directory is one mixer-edge wrote: `file` in it parses as a JSON object with all `keys`."""

    file: str
    keys: tuple[str, ...]
    kind: str  # what the directory is, for messages: "artifact", "tuning database", ...

    def proves(self, directory: str | Path) -> bool:
        """True if `directory` holds this marker: a regular file whose JSON object carries every key."""
        file = Path(directory) / self.file
        try:
            info = os.lstat(file)
            if not stat.S_ISREG(info.st_mode) or info.st_size > MARKER_MAX_BYTES:
                return False
            content = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # missing, unreadable, not UTF-8, not JSON
            return False
        return isinstance(content, dict) and all(key in content for key in self.keys)


# The kinds of directory mixer-edge writes (tests/test_outputs.py checks them against their writers).
ARTIFACT = Marker("manifest.json", ("format_version", "manifest_sha256"), "artifact")  # artifact.py
TUNING_DB = Marker("key.json", ("graph", "target", "precision"), "tuning database")  # compiler/tuning.py
REPORT = Marker("report.json", ("model", "evaluation", "score", "rows"), "report")  # report.py
BOARD = Marker("board.json", ("python", "debs", "wheels"), "emulated board")  # emulator.py
BUNDLE = Marker("bundle.json", ("format", "arch", "backend", "files"), "native bundle")  # bundle.py
NATIVE_BUILD = Marker("native.json", ("arch", "backends", "key"), "native runtime build")  # bundle.py's cache
RUNTIME_LIBS = Marker("runtime.json", ("arch", "wheels"), "runtime library cache")  # bundle.py's cache
VULKAN_ROOT = Marker("vulkan-root.json", ("mesa", "debs"), "emulated Vulkan root")  # vulkan_root.py
MARKERS = {m.file: m for m in (ARTIFACT, TUNING_DB, REPORT, BOARD, BUNDLE, NATIVE_BUILD, RUNTIME_LIBS, VULKAN_ROOT)}

Inputs = Iterable["str | Path | None"]


@contextlib.contextmanager
def atomic_file(path: str | Path, inputs: Inputs = ()) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it over `path`, on error delete it.

    `path` must pass check_destination (with the command's `inputs`), before and again at the rename."""
    inputs = list(inputs)
    path = _prepare(path, None, inputs)
    with _write_errors(path, creating=True):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_stage_prefix(path), suffix=".tmp")
    os.close(fd)
    try:
        with _write_errors(path):
            yield Path(tmp)
            os.chmod(tmp, 0o644)
            check_destination(path, None, inputs)  # nothing took its place meanwhile
            os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | Path, mark: Marker | str, inputs: Inputs = ()) -> Iterator[Path]:
    """Yield an empty staging directory beside `path`; on success it replaces `path` whole.

    `mark` (a Marker; a marker file's name is looked up in MARKERS) says what proves an existing
    `path` is one of this writer's: one that holds files but not that proof is refused, never replaced.
    """
    inputs = list(inputs)
    marker = _marker(mark)
    path = _prepare(path, marker, inputs)
    with _write_errors(path, creating=True):
        stage = Path(tempfile.mkdtemp(dir=path.parent, prefix=_stage_prefix(path), suffix=".tmp"))
    try:
        with _write_errors(path):
            yield stage
            stage.chmod(0o755)
            check_destination(path, marker, inputs)  # nothing took its place meanwhile
            if not os.path.lexists(path):
                os.replace(stage, path)
            elif not _exchange(stage, path):  # a filesystem without RENAME_EXCHANGE: two renames
                old = path.with_name(f".{path.name}.old-{os.getpid()}")
                os.replace(path, old)
                os.replace(stage, path)
                shutil.rmtree(old)
    finally:
        if stage.exists() and not stage.is_symlink():
            shutil.rmtree(stage)  # the failed stage, or the old version swapped out of `path`


def check_destination(path: str | Path, mark: Marker | str | None = None, inputs: Inputs = ()) -> Path:
    """Refuse, in one line, a destination the write would have to refuse or that the policy above forbids;
    returns `path` as a Path. `mark` None: a file is written there; a Marker: a directory of that kind.
    `inputs`: the paths the command reads (None and paths that do not exist are skipped).

    Call it before any slow work: it only looks, it changes nothing."""
    path = Path(path)
    marker = _marker(mark)
    directory = marker is not None
    if path.name in ("", ".", ".."):
        raise MixerEdgeError(f"{path} names no {'directory' if directory else 'file'} of its own: give the output "
                             "a name, such as out/NAME")
    parent = _nearest_existing_parent(path)
    _check_lengths(path, parent, directory)
    if not parent.is_dir():
        raise MixerEdgeError(f"{parent} is a file, so {path} cannot be written under it: choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MixerEdgeError(f"cannot write {path}: {parent} is not writable for you; choose a location you can "
                             "write to")
    info = _lstat(path)
    if info is not None and not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
        if stat.S_ISLNK(info.st_mode):
            raise MixerEdgeError(f"{path} is a symbolic link; pass the path it points to "
                                 "(mixer-edge does not write through links)")
        raise MixerEdgeError(f"{path} is {_kind(info.st_mode)}, not a regular "
                             f"{'directory' if directory else 'file'}: mixer-edge writes outputs only to "
                             "regular files and directories; choose another path")
    _check_inputs(path, inputs)
    if info is None:
        return path
    if stat.S_ISDIR(info.st_mode) != directory:
        raise MixerEdgeError(f"{path} exists and is {'a file' if directory else 'a directory'}, not the "
                             f"{'directory' if directory else 'file'} this writes: choose another path or remove it")
    if directory and _holds_files(path) and not marker.proves(path):
        if not os.path.lexists(path / marker.file):
            raise MixerEdgeError(f"{path} already holds other files and no {marker.file}, so mixer-edge did not "
                                 "write it: choose a new path (mixer-edge only replaces what it wrote)")
        raise MixerEdgeError(f"{path} already holds other files and a {marker.file} that is not a mixer-edge "
                             f"{marker.kind}'s (a JSON object with {', '.join(marker.keys)}), so mixer-edge did not "
                             "write it: choose a new path (mixer-edge only replaces what it wrote)")
    _check_replaceable(path, directory)
    return path


def _marker(mark: Marker | str | None) -> Marker | None:
    if mark is None or isinstance(mark, Marker):
        return mark
    if mark not in MARKERS:
        raise ValueError(f"no Marker for {mark!r}: pass one of atomic.{', '.join(MARKERS)} or a Marker")
    return MARKERS[mark]


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise MixerEdgeError(f"cannot write {path} ({os.strerror(exc.errno)}): choose another path") from exc


def _holds_files(path: Path) -> bool:
    try:
        return any(path.iterdir())
    except OSError as exc:
        raise MixerEdgeError(f"cannot write {path}: it cannot be read ({os.strerror(exc.errno)}), so mixer-edge "
                             "cannot tell whether it wrote it; choose another path") from exc


def _nearest_existing_parent(path: Path) -> Path:
    """The nearest existing directory above `path` (or the file that is in the way), without failing on
    names too long to look up."""
    for parent in path.absolute().parents:
        try:
            os.stat(parent)
            return parent
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG, errno.ELOOP):
                raise MixerEdgeError(f"cannot write {path}: {parent} cannot be looked up "
                                     f"({os.strerror(exc.errno)}); choose another path") from exc
    return Path(path.absolute().anchor)


def _check_lengths(path: Path, parent: Path, directory: bool) -> None:
    """Refuse names the filesystem under `parent` cannot hold: a missing directory's name, the output's name
    with its staging name's extra bytes, and the whole path."""
    name_max, path_max = _limit(parent, "PC_NAME_MAX", 255), _limit(parent, "PC_PATH_MAX", 4096)
    full, shown = path.absolute(), _shorten(str(path), 300)
    missing = full.relative_to(parent).parts
    for part in missing[:-1]:
        if len(os.fsencode(part)) > name_max:
            raise MixerEdgeError(f"cannot write {shown}: the name '{_shorten(part, 32)}' is {len(os.fsencode(part))} "
                                 f"bytes, longer than the {name_max} the filesystem allows; choose a shorter name")
    size = len(os.fsencode(path.name))
    if size > name_max - STAGE_EXTRA:
        raise MixerEdgeError(f"cannot write {shown}: its name is {size} bytes and the filesystem allows "
                             f"{name_max}, {name_max - STAGE_EXTRA} for an output (it is staged beside it as "
                             f".NAME.PID-XXXXXXXX.tmp); choose a shorter name")
    total = len(os.fsencode(str(full))) + STAGE_EXTRA + (DIRECTORY_ROOM if directory else 0)
    if total >= path_max:
        raise MixerEdgeError(f"cannot write {shown}: the path is {len(os.fsencode(str(full)))} bytes long, too long "
                             f"for the {path_max} this system allows with the staging name"
                             f"{' and the files inside' if directory else ''}; choose a shorter path")


def _limit(directory: Path, name: str, default: int) -> int:
    try:
        value = os.pathconf(directory, name)
    except (OSError, ValueError, AttributeError):
        return default
    return value if value and value > 0 else default


def _shorten(text: str, most: int) -> str:
    """`text`, its middle elided if it is longer than `most` characters (a message stays readable)."""
    return text if len(text) <= most else f"{text[:most // 2 - 2]}...{text[-(most // 2 - 2):]}"


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return kind
    return "not a regular file"


def _check_inputs(path: Path, inputs: Inputs) -> None:
    """Refuse an output that is an input, holds one, or lies inside an input directory."""
    dest = _resolve(path)
    for given in inputs:
        if given is None or str(given) == "":
            continue
        source = Path(given)
        real = _resolve(source)
        if real is None or dest is None or not os.path.exists(source):
            continue
        same = real == dest
        with contextlib.suppress(OSError):
            same = same or (os.path.lexists(path) and os.path.samefile(source, path))  # a hard link
        if same:
            also = "" if source == path else f" (as {source})"
            raise MixerEdgeError(f"{path} is also an input of this command{also}: writing it would destroy that "
                                 "input; write the output to another path")
        if real.is_relative_to(dest):
            raise MixerEdgeError(f"{path} holds {source}, an input of this command, and writing it would replace "
                                 "that input: write the output to another path")
        if dest.is_relative_to(real) and os.path.isdir(source):
            raise MixerEdgeError(f"{path} lies inside {source}, an input of this command, and writing it would "
                                 "change that input: write the output outside it")


def _resolve(path: Path) -> Path | None:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a symbolic link loop
        return None


def _check_replaceable(path: Path, directory: bool) -> None:
    """Refuse an existing `path` this user could not replace: in a sticky directory (like /tmp) it belongs to
    someone else, or (a directory) the old version could not be deleted after the swap."""
    uid = os.geteuid()
    if uid != 0:
        parent, info = os.stat(path.parent), os.lstat(path)
        if parent.st_mode & stat.S_ISVTX and uid not in (info.st_uid, parent.st_uid):
            raise MixerEdgeError(f"cannot replace {path}: it belongs to another user in a directory only its owner "
                                 "may replace files in; choose another path")
    if directory:
        for root, _, _ in os.walk(path):
            if not os.access(root, os.W_OK | os.X_OK):
                raise MixerEdgeError(f"cannot replace {path}: {root} is not writable for you, so the old version "
                                     "could not be removed; choose another path or fix its permissions")


def _prepare(path: str | Path, marker: Marker | None, inputs: list) -> Path:
    """Check the destination, create its parent and sweep dead writers' stages."""
    path = check_destination(path, marker, inputs)
    with _write_errors(path, creating=True):
        path.parent.mkdir(parents=True, exist_ok=True)
    _sweep(path)
    return path


def _stage_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}-"


def _sweep(path: Path) -> None:
    """Remove what writers of `path` killed mid-write left behind; restore `path` if it was lost in a swap."""
    stage = re.compile(rf"\.{re.escape(path.name)}\.(?:(\d+)-.*\.tmp|old-(\d+))")
    for entry in path.parent.iterdir():
        match = stage.fullmatch(entry.name)
        if not match or _alive(int(match[1] or match[2])):
            continue
        if match[2] and not os.path.lexists(path):
            os.replace(entry, path)  # killed between the two renames of atomic_dir's fallback
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    except OverflowError:
        return False
    return True


@contextlib.contextmanager
def _write_errors(path: Path, creating: bool = False) -> Iterator[None]:
    """One line, naming the destination, for a full disk (or a file too large for it) and, while the
    stage is `creating`, for a place that cannot be written or a name too long."""
    try:
        yield
    except OSError as exc:
        if exc.errno in DISK_FULL:
            raise MixerEdgeError(f"writing {path} failed ({os.strerror(exc.errno)}); nothing was changed there: "
                                 "free some space on that disk or write somewhere else") from exc
        if creating and exc.errno == errno.ENAMETOOLONG:
            raise MixerEdgeError(f"cannot write {path} ({os.strerror(exc.errno)}): choose a shorter path") from exc
        if creating and exc.errno in UNWRITABLE:
            raise MixerEdgeError(f"cannot write {path} ({os.strerror(exc.errno)}): choose a location you can "
                                 "write to") from exc
        raise


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2); False where the system cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))
