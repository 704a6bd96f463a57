"""Write files and directories so a reader sees the old version or the new one, never half of one.

Work is staged beside the destination under a name carrying the writer's pid
(`.NAME.PID-XXXX.tmp`) and renamed into place when complete. A writer killed with SIGKILL cannot
clean up, so every later write to the same destination first removes the stages of writers that
are no longer alive. A full disk, or a place that cannot be written, is one line naming the destination.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import MixerEdgeError

DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.EEXIST, errno.ENOTDIR}


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it over `path`, on error delete it."""
    path = _prepare(path)
    with _write_errors(path, creating=True):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_stage_prefix(path), suffix=".tmp")
    os.close(fd)
    try:
        with _write_errors(path):
            yield Path(tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | Path, mark: str) -> Iterator[Path]:
    """Yield an empty staging directory beside `path`; on success it replaces `path` whole.

    `mark` is the file that makes a directory one of this writer's (manifest.json for an artifact):
    an existing `path` that holds other files but not `mark` is refused, never replaced.
    """
    path = _prepare(path, mark)
    with _write_errors(path, creating=True):
        stage = Path(tempfile.mkdtemp(dir=path.parent, prefix=_stage_prefix(path), suffix=".tmp"))
    try:
        with _write_errors(path):
            yield stage
            stage.chmod(0o755)
            if not path.exists():
                os.replace(stage, path)
            elif not _exchange(stage, path):  # a filesystem without RENAME_EXCHANGE: two renames
                old = path.with_name(f".{path.name}.old-{os.getpid()}")
                os.replace(path, old)
                os.replace(stage, path)
                shutil.rmtree(old)
    finally:
        if stage.exists():
            shutil.rmtree(stage)  # the failed stage, or the old version swapped out of `path`


def check_destination(path: str | Path, mark: str | None = None) -> Path:
    """Refuse a destination the write would have to refuse (call it before slow work): a directory
    where a file goes, a file where a directory goes (`mark` given, see atomic_dir), or a directory
    holding files but not `mark`."""
    path = Path(path)
    directory = mark is not None
    existing = next(p for p in path.absolute().parents if p.exists())  # the nearest existing parent
    if not existing.is_dir():
        raise MixerEdgeError(f"{existing} is a file, so {path} cannot be written under it: choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise MixerEdgeError(f"cannot write {path}: {existing} is not writable for you; choose a location you can "
                             "write to")
    if path.exists() and path.is_dir() != directory:
        raise MixerEdgeError(f"{path} exists and is {'a file' if directory else 'a directory'}, not the "
                             f"{'directory' if directory else 'file'} this writes: choose another path or remove it")
    if directory and path.is_dir() and not (path / mark).is_file() and any(path.iterdir()):
        raise MixerEdgeError(f"{path} already holds other files and no {mark}, so mixer-edge did not write it: "
                             "choose a new path (mixer-edge only replaces what it wrote)")
    return path


def _prepare(path: str | Path, mark: str | None = None) -> Path:
    """Check the destination, create its parent and sweep dead writers' stages."""
    path = check_destination(path, mark)
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
        if match[2] and not path.exists():
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
    return True


@contextlib.contextmanager
def _write_errors(path: Path, creating: bool = False) -> Iterator[None]:
    """One line, naming the destination, for a full disk (or a file too large for it) and, while the
    stage is `creating`, for a place that cannot be written."""
    try:
        yield
    except OSError as exc:
        if exc.errno in DISK_FULL:
            raise MixerEdgeError(f"writing {path} failed ({os.strerror(exc.errno)}); nothing was changed there: "
                                 "free some space on that disk or write somewhere else") from exc
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
