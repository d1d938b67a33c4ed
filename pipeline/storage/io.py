"""Writing and opening the pipeline's files safely.

Every output is written under a temporary name in its own folder (`<name>.tmp-<pid>-<random>`, no dot in
the suffix so that tools which derive names from the file stem, like torch.save, see the final name), flushed
to disk, and renamed into place; on any failure the temporary is removed. A reader never sees a half-written
file under a final name. Temporaries left by killed writers (their PID no longer runs) are removed by the
next write of the same output. A full disk is reported as one line naming the file and how much was written.
Output locks and deletions never follow a symlink out of the output (`refuse_symlink`).
HDF5 files are opened and written through `pipeline/storage/hdf5.py`.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Mapping

import numpy as np

from pipeline.errors import DataError, PipelineError

TEMPORARY_MARK = ".tmp-"
# after the final name: temporary_name's ".tmp-<pid>-<random>", or an older writer's ".tmp-<pid>"
TEMPORARY_PATTERN = re.compile(r"\.tmp-(\d+)(?=$|[-.])")
DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


def temporary_name(path: Path, suffix: str = "") -> Path:
    """A fresh temporary path beside `path`, unique across processes and hosts (`suffix` appended, for
    readers that go by the extension)."""
    return path.with_name(f"{path.name}{TEMPORARY_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _writer_is_dead(candidate: Path, prefix: str) -> bool:
    """True if `candidate` is `prefix` + a temporary suffix whose writer PID no longer runs here."""
    match = TEMPORARY_PATTERN.match(candidate.name, len(prefix))
    if match is None or not candidate.name.startswith(prefix):
        return False
    pid = int(match.group(1))
    return pid != os.getpid() and not _process_alive(pid)


def _remove(candidate: Path) -> None:
    if candidate.is_dir() and not candidate.is_symlink():
        shutil.rmtree(candidate, ignore_errors=True)
    else:
        candidate.unlink(missing_ok=True)


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete temporaries (files or folders) of `path` left by processes of this machine that no longer run
    (killed writers); returns what was removed. Temporaries of live processes are left alone."""
    path = Path(path)
    removed = []
    for candidate in path.parent.glob(f"{path.name}{TEMPORARY_MARK}*"):
        if _writer_is_dead(candidate, path.name):
            _remove(candidate)
            removed.append(candidate)
    return removed


def remove_stale_temporaries_under(folder: str | os.PathLike) -> list[Path]:
    """Every temporary of a dead writer anywhere under `folder` (a run folder: model, checkpoint, history)."""
    removed = []
    for candidate in sorted(Path(folder).rglob(f"*{TEMPORARY_MARK}*"), reverse=True):  # files before folders
        prefix = candidate.name[: candidate.name.rfind(TEMPORARY_MARK)]
        if _writer_is_dead(candidate, prefix):
            _remove(candidate)
            removed.append(candidate)
    return removed


# ------------------------------------------------------------------------------------ symlinks in outputs
def refuse_symlink(path: str | os.PathLike, what: str) -> None:
    """PipelineError when `path` is a symlink: an output the command writes, removes or empties must not lead
    it to files elsewhere."""
    if Path(path).is_symlink():
        raise PipelineError(f"{path}: is a symlink to {os.readlink(path)}; refusing to write or delete {what} "
                            "through it (remove the link, or give the real folder)")


def refuse_symlinks_under(folder: str | os.PathLike, what: str) -> None:
    """`refuse_symlink` for `folder` and everything in it (a folder a library empties or rewrites)."""
    refuse_symlink(folder, what)
    for root, dirs, files in os.walk(folder):  # does not descend into symlinked folders: they are reported
        for name in dirs + files:
            refuse_symlink(Path(root) / name, what)


def remove_tree(folder: str | os.PathLike, what: str) -> None:
    """Delete `folder`, a folder this pipeline wrote; a symlink in its place is refused (rmtree would fail on
    it, and the caller would then write through it), links inside are removed as links."""
    refuse_symlink(folder, what)
    shutil.rmtree(folder, ignore_errors=True)


# ----------------------------------------------------------------------------------------- a full disk
def is_disk_full(error: BaseException) -> bool:
    """True for ENOSPC / EDQUOT, also when a library (HDF5) only puts the errno into its message."""
    if isinstance(error, OSError) and error.errno in DISK_FULL:
        return True
    text = str(error)
    return "No space left on device" in text or "Disk quota exceeded" in text


def _size(size: int) -> str:
    """Bytes as a person reads them: 512 B, 44.0 KiB, 3.2 MiB, 1.5 GiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def disk_full_error(path: str | os.PathLike | None, written: int | None = None) -> PipelineError:
    """The one-line message for a write of `path` (None: unknown) that ran out of space: how much got written
    and how much the device has free, and what to do."""
    path = Path(path) if path is not None else Path.cwd() / "(a file being written)"
    folder = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    try:
        free = f"{_size(shutil.disk_usage(folder).free)} free"
    except OSError:
        free = "free space unknown"
    so_far = f"{_size(written)} written, " if written else ""
    return PipelineError(f"{path}: no space left on the device ({so_far}{free} in {folder}); the partial file was "
                         f"removed: free more space there (or write elsewhere) and rerun")


@contextlib.contextmanager
def disk_full_is_one_line(path: str | os.PathLike, partial: Path | None = None) -> Iterator[None]:
    """Turn a full disk while writing `path` into `disk_full_error(path)`, with the size of the `partial`
    file (its temporary) when there is one."""
    try:
        yield
    except PipelineError:
        raise
    except Exception as error:
        if is_disk_full(error):
            written = partial.stat().st_size if partial is not None and partial.exists() else None
            raise disk_full_error(path, written) from None
        raise


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file, or a folder's entries, to disk so that a rename never exposes unwritten data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path to write `path`'s content to; on success it is fsynced and renamed to `path`.

    On an exception the temporary is deleted and nothing at `path` changes.
    """
    path = Path(path)
    if path.is_dir():  # checked first: the rename's error would name the temporary, not what the user gave
        raise PipelineError(f"{path}: is a directory; give the file to write")
    with disk_full_is_one_line(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = temporary_name(path, suffix)
    try:
        with disk_full_is_one_line(path):  # created here, never through a link planted under its name
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666))
        with disk_full_is_one_line(path, partial=tmp):
            yield tmp
            fsync_path(tmp)
            os.replace(tmp, path)
            fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


class _RecordingWriter:
    """A binary file for writers that swallow the OSError of a failed write (torch.save turns ENOSPC into
    'unexpected pos'): it keeps the error so that it can be raised instead."""

    def __init__(self, handle: BinaryIO):
        self.handle, self.error = handle, None

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.handle.flush()


def write_with(path: str | os.PathLike, dump: Callable[[BinaryIO], None]) -> Path:
    """Write `path` atomically by `dump(binary_file)` (e.g. `lambda f: torch.save(obj, f)`); returns the path."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        writer = _RecordingWriter(handle)
        try:
            dump(writer)
            handle.flush()
        except Exception:
            if writer.error is not None:
                raise writer.error from None
            raise
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


# ------------------------------------------------------------------------------------ one writer per output
def lock_path(path: str | os.PathLike) -> Path:
    """Where the lock of output `path` lives: `<path>.lock` beside it (outside a folder output, so that a
    lock never becomes part of what DVC hashes)."""
    path = Path(path).resolve()
    return path.with_name(path.name + ".lock")


def _holder(fd: int) -> str:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return text if text.isdigit() else "unknown"


def _open_lock(lock: Path, path: Path) -> int:
    """The lock file, never through a symlink (its target would be truncated)."""
    try:
        return os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise PipelineError(f"{lock}: is a symlink; refusing to write the lock of {path} through it (remove "
                                "the link)") from None
        raise


@contextlib.contextmanager
def output_lock(path: str | os.PathLike) -> Iterator[Path]:
    """Hold the advisory lock of output `path` (a file or a folder) while writing it.

    A second writer gets a one-line PipelineError naming the holder's PID. The lock (flock) dies with its
    process, so a killed writer never blocks a rerun. Once it is held, temporaries that dead writers left
    in `path` (a folder) or beside it (a file) are removed: nothing else of this pipeline writes there.
    """
    path, lock = Path(path), lock_path(path)
    with disk_full_is_one_line(lock):
        lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = _open_lock(lock, path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise PipelineError(f"{path}: another run (PID {holder}) is writing it (lock {lock}); wait for it to "
                                "finish or stop it") from None
        try:
            current = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)  # the previous holder removed the file as we opened it: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        if path.is_dir():
            remove_stale_temporaries_under(path)
        else:
            remove_stale_temporaries(path)
        yield lock
    finally:
        lock.unlink(missing_ok=True)  # while still held: a waiting opener notices the new inode
        os.close(fd)


def array_sha256(*arrays: np.ndarray, digest=None) -> str:
    """sha256 hex of the arrays' bytes in C order, one after the other; `digest` (a hashlib object) to
    continue, so that the chunks of one array hash like the whole array."""
    digest = digest if digest is not None else hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array).view(np.uint8).reshape(-1))
    return digest.hexdigest()


def refuse_mismatch(path: str | os.PathLike, found: Mapping, expected: Mapping, problem: str, remedy: str) -> None:
    """PipelineError naming every key whose value in `found` (an artifact's provenance) differs from `expected`.

    The one check behind every "this file was made from something else" refusal (cache, shards, pools).
    """
    problems = [f"{name} {found.get(name)} (found) != {value} (expected)"
                for name, value in expected.items() if found.get(name) != value]
    if problems:
        raise PipelineError(f"{path}: {problem}: {'; '.join(problems)}; {remedy}")
