"""The embeddings checksum of a teacher cache, verified once per version of the file.

Opening a cache checks labels and keys (small, read anyway); the embeddings are the bulk of the file, so their
sha256 is streamed in blocks (a progress bar for big files) when a command opens the cache for a run, and a
success is remembered in `$EKD_CACHE_DIR` (default ~/.cache/ekd-pipeline) under the file's identity: resolved
path, device, inode, size, mtime_ns, ctime_ns and the cache fingerprint. Any write to the file, a rename over
it or a restored mtime (which still moves ctime) changes that identity, so the next open verifies again; a
rerun, a resumed training or the ranks of one machine (which wait for the first to finish) do not re-read it.
What a memo cannot see is a disk that flips bits without any write: `pipeline cache-info --recheck` reads
the file again whatever is remembered.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

from pipeline.cache.contract import READ_ROWS
from pipeline.formats.labels_cache import cache_dir
from pipeline.progress import progress_bar
from pipeline.storage.io import array_sha256, write_text_atomic

PROGRESS_BYTES = 256 * 2**20  # a bar only for files that take seconds to read


def _identity(path: Path, fingerprint: str) -> dict:
    stat = os.stat(path)
    return {"path": str(path.resolve()), "device": stat.st_dev, "inode": stat.st_ino, "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns, "fingerprint": fingerprint}


def memo_path(path: Path) -> Path:
    """Where the verification of the cache at `path` is remembered (one small JSON file per cache path)."""
    token = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:32]
    return cache_dir() / f"verified-{token}.json"


def _remembered(memo: Path, identity: dict) -> bool:
    try:
        return json.loads(memo.read_text()) == identity
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _one_verifier(memo: Path) -> Iterator[None]:
    """Processes verifying the same cache take turns (the later ones then find the memo); without a writable
    cache folder each one verifies on its own."""
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(memo.with_suffix(".lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def embeddings_sha256(cache) -> str:
    """sha256 of the stored embeddings as the writer hashed them (C order, native byte order), streamed."""
    digest = hashlib.sha256()
    rows = len(cache)
    with progress_bar(total=rows, desc=f"verify {cache.path.name}", unit="row", unit_scale=True,
                      show=cache.nbytes() >= PROGRESS_BYTES) as bar:
        for start in range(0, rows, READ_ROWS):
            block = cache.stored_rows(start, min(start + READ_ROWS, rows))
            array_sha256(block.astype(block.dtype.newbyteorder("="), copy=False), digest=digest)
            bar.update(len(block))
    return digest.hexdigest()


def verify_embeddings(cache, recheck: bool = False) -> bool:
    """Compare the embeddings with their checksum unless this version of the file was verified before
    (`recheck`: read it anyway); returns whether it was read now. A mismatch raises the cache's DataError."""
    memo = memo_path(cache.path)
    identity = _identity(cache.path, cache.fingerprint)
    if not recheck and _remembered(memo, identity):
        return False
    with _one_verifier(memo):
        if not recheck and _remembered(memo, identity):  # another process verified it while this one waited
            return False
        if embeddings_sha256(cache) != cache.attrs["embeddings_sha256"]:
            raise cache.checksum_error("embeddings")
        if _identity(cache.path, cache.fingerprint) == identity:  # not written to while it was read
            with contextlib.suppress(Exception):  # remembering is an optimisation: a full disk only costs a re-read
                write_text_atomic(memo, json.dumps(identity, sort_keys=True) + "\n")
    return True
