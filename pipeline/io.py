"""Writing and opening the pipeline's files safely.

Every output is written under a temporary name in its own folder (`<name>.tmp-<pid>-<random>`, no dot in
the suffix so that tools which derive names from the file stem, like torch.save, see the final name), flushed
to disk, and renamed into place; on any failure the temporary is removed. A reader never sees a half-written
file under a final name. HDF5 artifacts are opened with one-line errors naming the file and its producer.
"""
from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Iterator, Mapping

import h5py

from pipeline.errors import DataError, PipelineError

TEMPORARY_MARK = ".tmp-"


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


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete temporaries of `path` left by processes of this machine that no longer run (killed writers);
    returns what was removed. Temporaries of live processes are left alone."""
    path = Path(path)
    removed = []
    for candidate in path.parent.glob(f"{path.name}{TEMPORARY_MARK}*"):
        pid_text = candidate.name[len(path.name) + len(TEMPORARY_MARK):].split("-", 1)[0]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and not _process_alive(int(pid_text)):
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


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
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = temporary_name(path, suffix)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def open_artifact(path: str | os.PathLike, what: str, command: str) -> h5py.File:
    """`path` opened read-only; a missing file names the `command` that writes it, a broken one says so."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path}: {what} not found (run `pipeline {command}` first)")
    try:
        return h5py.File(path, "r")
    except OSError as error:
        raise DataError(f"{path}: not a readable HDF5 {what} ({error})") from None


def refuse_mismatch(path: str | os.PathLike, found: Mapping, expected: Mapping, problem: str, remedy: str) -> None:
    """PipelineError naming every key whose value in `found` (an artifact's provenance) differs from `expected`.

    The one check behind every "this file was made from something else" refusal (cache, shards, pools).
    """
    problems = [f"{name} {found.get(name)} (found) != {value} (expected)"
                for name, value in expected.items() if found.get(name) != value]
    if problems:
        raise PipelineError(f"{path}: {problem}: {'; '.join(problems)}; {remedy}")
