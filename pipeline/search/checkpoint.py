"""Resumable pair scans: a scan over N^2/2 pairs (hours at MS1M scale) continues after a kill.

`ScanCheckpoint` writes, at most every `every_s` seconds, the position of the running scan (blocks done)
and the state of its consumers (threshold windows' histograms and counts, the coarse radix histogram, the
top-M pairs so far) to one `.npz` file, atomically (`io.atomic_path`: a kill while writing keeps the
previous one). A rerun whose scan has the same identity - the caller's (cache fingerprint, sampling, seed,
block size, ...) plus the scan's name, its size and every consumer's `key()` (the pilot windows' ranks and
bounds, M) - restores the consumers and starts at the next block; anything else starts the scan over.
The blocks are visited in a fixed order and every consumer's state after block b depends only on blocks
0..b, so a resumed scan gives exactly the uninterrupted scan's result.

Only the running scan is kept: when the exact path needs more than one scan (the pilot missed a window),
a rerun redoes the scans before the saved one. Consumers implement `key() -> list`, `state() -> dict of
arrays` and `restore(dict of arrays)`. No pickle: the file holds plain arrays and the identity as text, plus
a sha256 of them all: a damaged or edited file (truncated, a flipped byte, a forged position) is discarded
with a one-line note and the scan starts over.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import zipfile
from pathlib import Path

import numpy as np

from pipeline.errors import note
from pipeline.settings import EnvironmentVariable
from pipeline.storage.io import atomic_path

DIGEST = "digest"  # sha256 of every other array: a damaged or edited file is never resumed from

# seconds between saves (each writes the windows' histograms, up to ~200 MB)
SAVE_SECONDS = EnvironmentVariable("PIPELINE_SCAN_CHECKPOINT_S", 120.0, "seconds between two saves of "
                                   "build-pools' scan checkpoint; 0 saves after every block", max=86400.0)


class ScanCheckpoint:
    def __init__(self, path: str | os.PathLike, identity: dict, every_s: float | None = None):
        self.path = Path(path)
        self.identity = identity
        self.every_s = SAVE_SECONDS.value() if every_s is None else float(every_s)
        self._key = ""
        self._last = 0.0
        self.resumed_at: dict[str, int] = {}  # scan name -> block it resumed at (for messages and tests)

    def start(self, desc: str, consumers: list, blocks: int) -> int:
        """The first block to scan: 0, or where a saved scan of the same identity stopped (consumers restored)."""
        self._key = json.dumps({**self.identity, "scan": desc, "blocks": blocks,
                                "consumers": [c.key() for c in consumers]}, sort_keys=True, default=float)
        self._last = time.monotonic()
        saved = self._load(blocks)
        if saved is None or str(saved["identity"]) != self._key:
            return 0
        for index, consumer in enumerate(consumers):
            prefix = f"{index}."
            consumer.restore({k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)})
        start = int(saved["block"])
        self.resumed_at[desc] = start
        return start

    def after_block(self, blocks_done: int, consumers: list) -> None:
        if time.monotonic() - self._last >= self.every_s:
            self.save(blocks_done, consumers)

    def save(self, blocks_done: int, consumers: list) -> None:
        arrays = {"identity": np.array(self._key), "block": np.array(blocks_done, np.int64)}
        for index, consumer in enumerate(consumers):
            arrays.update({f"{index}.{k}": np.asarray(v) for k, v in consumer.state().items()})
        arrays[DIGEST] = np.array(_digest(arrays))
        with atomic_path(self.path) as tmp, open(tmp, "wb") as handle:  # np.savez needs a seekable file
            np.savez(handle, **arrays)
        self._last = time.monotonic()

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)

    def _load(self, blocks: int) -> dict | None:
        """The saved arrays, if the file is whole and consistent; a damaged one is removed with a note (the
        scan starts over: the uninterrupted result either way)."""
        if not self.path.exists():
            return None
        try:
            with np.load(self.path, allow_pickle=False) as stored:  # every member read: zip checks its CRC
                saved = {name: stored[name] for name in stored.files}
            problem = _problem(saved, blocks)
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as error:
            problem = f"unreadable ({type(error).__name__})"
        if problem is None:
            return saved
        note(f"{self.path}: damaged scan checkpoint ({problem}), discarded; the scan starts over")
        self.clear()
        return None


def _digest(arrays: dict) -> str:
    """sha256 over every array's name, dtype, shape and bytes (the digest itself excluded)."""
    digest = hashlib.sha256()
    for name in sorted(set(arrays) - {DIGEST}):
        value = np.ascontiguousarray(arrays[name])
        digest.update(f"{name} {value.dtype.str} {value.shape}\n".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def _problem(saved: dict, blocks: int) -> str | None:
    """What is wrong with a loaded checkpoint (None: nothing)."""
    if DIGEST not in saved or "identity" not in saved or "block" not in saved:
        return "entries missing"
    if str(saved[DIGEST]) != _digest(saved):
        return "its digest does not match its contents"
    if saved["block"].shape != () or not 0 <= int(saved["block"]) <= blocks:
        return f"block {saved['block']!r} outside 0..{blocks}"
    return None
