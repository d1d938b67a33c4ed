"""Every HDF5 file the pipeline opens or writes goes through here.

Reading: `open_hdf5` / `open_artifact` refuse a file that reaches outside itself. HDF5 follows external links,
external raw-data storage and virtual datasets to whatever path the file names (/etc/passwd read as float16
"embeddings"), so a file with any of them is refused, one line naming the file and the object; nothing the
pipeline writes uses them.

Writing: `write_hdf5` writes under a temporary name and renames (io.atomic_path). When a write fails (a full
disk), HDF5 still holds dirty metadata: the close has to flush it, fails again and leaves the file open inside
the library, whose exit handler then flushes it once more and crashes the interpreter (exit 139, no message).
So on any failure the file's descriptor is pointed at an anonymous in-memory file first: the close succeeds
and releases everything, and the partial temporary is removed as usual.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

import h5py

from pipeline.errors import DataError, PipelineError
from pipeline.storage.io import atomic_path


# ------------------------------------------------------------------------------------------------- reading
def _outside_reference(handle: h5py.File) -> str | None:
    """A description of the first object of `handle` that points at another file, or None."""
    found: list[str] = []

    def visit(name: str, link) -> bool | None:
        if isinstance(link, h5py.ExternalLink):
            found.append(f"{name!r} is an external link to {link.filename}:{link.path}")
        elif isinstance(link, h5py.HardLink):
            target = handle[name]
            if isinstance(target, h5py.Dataset):
                plist = target.id.get_create_plist()
                if plist.get_layout() == h5py.h5d.VIRTUAL:
                    found.append(f"dataset {name!r} is a virtual dataset (its data lives in other files)")
                elif plist.get_external_count():
                    found.append(f"dataset {name!r} stores its data in an external file "
                                 f"({plist.get_external(0)[0].decode(errors='replace')})")
        return True if found else None  # a true value stops the visit

    handle.visititems_links(visit)  # links, not objects: an external link is seen without being followed
    return found[0] if found else None


def check_self_contained(handle: h5py.File, path: str | os.PathLike) -> None:
    """DataError naming `path` and the object when the file links to, or stores data in, another file."""
    try:
        problem = _outside_reference(handle)
    except (RuntimeError, KeyError, ValueError, OSError) as error:  # a torn file: HDF5 cannot walk its objects
        raise DataError(f"{path}: not a readable HDF5 file ({error})") from None
    if problem is not None:
        raise DataError(f"{path}: {problem}; refusing to read data from outside the file")


def open_hdf5(path: str | os.PathLike) -> h5py.File:
    """`path` opened read-only and checked self-contained (OSError as h5py raises it when unreadable)."""
    handle = h5py.File(path, "r")
    try:
        check_self_contained(handle, path)
    except BaseException:
        handle.close()
        raise
    return handle


def open_artifact(path: str | os.PathLike, what: str, command: str) -> h5py.File:
    """`path` opened read-only (`open_hdf5`); a missing file names the `command` that writes it, a broken one
    says so."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path}: {what} not found (run `pipeline {command}` first)")
    try:
        return open_hdf5(path)
    except OSError as error:
        raise DataError(f"{path}: not a readable HDF5 {what} ({error})") from None


# ------------------------------------------------------------------------------------------------- writing
def _detach(fd: int) -> None:
    """Point descriptor `fd` at an anonymous file, so that whatever HDF5 still writes through it succeeds and
    goes nowhere (the partial temporary is deleted anyway)."""
    if hasattr(os, "memfd_create"):
        sink = os.memfd_create("discarded-hdf5")
    else:  # not Linux: an unlinked temporary file (sparse: HDF5 only extends it)
        sink = os.dup(tempfile.TemporaryFile().fileno())
    try:
        os.dup2(sink, fd)
    finally:
        os.close(sink)


METADATA_ROOM = 64 * 2**10  # reserved beyond the raw data for HDF5's own structures and the attributes


@contextlib.contextmanager
def write_hdf5(path: str | os.PathLike, suffix: str = "", data_bytes: int = 0, **options) -> Iterator[h5py.File]:
    """A new HDF5 file (h5py.File `options`) written to a temporary and renamed to `path` once it is complete,
    flushed and closed; on a failure nothing at `path` changes, a full disk is one line (io.atomic_path), and
    HDF5 is left with no half-closed file.

    `data_bytes` (about what the datasets will hold) is claimed on the disk first (fallocate): a disk without
    that room fails here, before HDF5 has buffered anything, and HDF5's later writes land in reserved blocks.
    A flush that fails inside HDF5 leaves its metadata cache unable to flush again (the file can then never
    be closed), so this is what keeps a full disk a clean error. The file is cut back to HDF5's own end once
    closed: the reservation changes no byte."""
    with atomic_path(path, suffix=suffix) as tmp:
        handle = h5py.File(tmp, "w", **options)
        fd = handle.id.get_vfd_handle()
        try:
            if data_bytes and hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, data_bytes + METADATA_ROOM + data_bytes // 100)
            yield handle
            handle.flush()  # what HDF5 buffered fails here, while the file can still be detached
            end = handle.id.get_filesize()  # HDF5's end of file: the reserved blocks past it are given back
            handle.close()
            if data_bytes:
                os.truncate(tmp, end)
        except BaseException:
            if handle.id.valid:
                _detach(fd)
                handle.close()
            raise
