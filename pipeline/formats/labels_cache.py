"""A small labels file for a RecordIO set, so that the one header scan of a big `.rec` happens once.

The file is an `.npz` (loaded with `allow_pickle=False`) holding `keys`, `labels` and a JSON stamp of the
`.idx` (size, mtime, sha256) and `.rec` (size, mtime) it was computed from; any difference means a rescan.
It lives beside the index (`train.idx` -> `train.labels.npz`); when that folder is read-only it goes to
`$EKD_CACHE_DIR` (default `~/.cache/ekd-pipeline/`) under a name hashed from the index path, size and mtime.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline.errors import PipelineError
from pipeline.storage.io import atomic_path

FORMAT_VERSION = 1


def cache_dir() -> Path:
    """Where derived files go when the data folder is read-only."""
    return Path(os.environ.get("EKD_CACHE_DIR") or Path.home() / ".cache" / "ekd-pipeline")


def labels_file_candidates(idx_path: Path) -> list[Path]:
    """The labels file beside the index first, then its place in the cache folder."""
    idx_path = Path(idx_path)
    stat = idx_path.stat()
    token = hashlib.sha256(f"{idx_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    return [idx_path.with_name(idx_path.stem + ".labels.npz"), cache_dir() / f"labels-{token[:24]}.npz"]


def source_stamp(idx_path: Path, rec_path: Path, idx_sha256: str) -> dict:
    """What the labels were computed from."""
    idx_stat, rec_stat = Path(idx_path).stat(), Path(rec_path).stat()
    return {
        "version": FORMAT_VERSION,
        "idx_size": idx_stat.st_size,
        "idx_mtime_ns": idx_stat.st_mtime_ns,
        "idx_sha256": idx_sha256,
        "rec_size": rec_stat.st_size,
        "rec_mtime_ns": rec_stat.st_mtime_ns,
    }


def load_labels(path: Path, stamp: dict, keys: np.ndarray) -> np.ndarray | None:
    """The stored labels if `path` holds a file for exactly this stamp and these keys, else None."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            if json.loads(stored["stamp"].tobytes().decode()) != stamp:
                return None
            if not np.array_equal(stored["keys"], keys):
                return None
            labels = stored["labels"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # a damaged cache is simply rebuilt
        return None
    return labels if labels.shape == keys.shape else None


def store_labels(path: Path, stamp: dict, keys: np.ndarray, labels: np.ndarray) -> None:
    """Write atomically: a temporary name in the same folder, then os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        np.savez(
            handle,
            keys=np.asarray(keys, dtype=np.int64),
            labels=np.asarray(labels, dtype=np.int64),
            stamp=np.frombuffer(json.dumps(stamp, sort_keys=True).encode(), dtype=np.uint8),
        )


def cached_labels(
    idx_path: Path, rec_path: Path, idx_sha256: str, keys: np.ndarray, compute: Callable[[], np.ndarray]
) -> tuple[np.ndarray, Path | None]:
    """Labels for `keys` from a valid labels file, or from `compute()` then stored; returns (labels, file)."""
    stamp = source_stamp(idx_path, rec_path, idx_sha256)
    candidates = labels_file_candidates(idx_path)
    for path in candidates:
        labels = load_labels(path, stamp, keys)
        if labels is not None:
            return labels, path
    labels = np.asarray(compute(), dtype=np.int64)
    failures = []
    for path in candidates:
        try:
            store_labels(path, stamp, keys, labels)
            return labels, path
        except OSError as error:  # read-only data folder: fall through to the cache folder
            failures.append(f"{path}: {error.strerror or error}")
        except PipelineError as error:  # a full disk (atomic_path's one line): the labels file is optional
            failures.append(str(error))
    warnings.warn(f"could not store the labels file ({'; '.join(failures)}); the next open rescans")
    return labels, None
