"""Reading `pools.h5` and `thresholds.json` (written by pipeline/search/pools.py, whose docstring describes
them) and checking that they are complete, well-formed and a pair. Apart from the search, so that what reads
the pools (train-student, report) does not import it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np

from pipeline.errors import DataError, PipelineError
from pipeline.storage.hdf5 import open_artifact
from pipeline.storage.io import array_sha256

FORMAT_VERSION = 2  # 2: thresholds_json_sha256, cache_fingerprint
DATASETS = ("centres", "class_sizes", "neighbours", "neighbour_sims", "neg_pairs", "neg_sims")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pools_fingerprint(pools: dict) -> str:
    """What a student run takes from pools.h5 (neighbours, hardest pairs, thresholds), as one sha256."""
    thresholds = np.frombuffer(str(pools["attrs"].get("thresholds", "")).encode(), np.uint8)
    return array_sha256(pools["neighbours"], pools["neg_pairs"], thresholds)


def check_pair(pools: dict, pools_path: Path, thresholds_path: Path) -> dict[str, float]:
    """thresholds.json's thresholds, refused unless it is the file written with this pools.h5."""
    thresholds = load_thresholds(thresholds_path)
    if pools["attrs"].get("thresholds_json_sha256") != sha256_hex(thresholds_path.read_bytes()):
        raise DataError(f"{thresholds_path}: not the thresholds.json written with {pools_path} (edited, or a "
                        "build-pools run was interrupted between the two files); rerun `pipeline build-pools`")
    return thresholds


def load_pools(path: str | os.PathLike) -> dict:
    """pools.h5 as {dataset name: array, "attrs": dict}; DataError unless complete and well-formed."""
    path = Path(path)
    with open_artifact(path, "pools file", "build-pools") as handle:
        complete = handle.attrs.get("complete", False)
        if not (isinstance(complete, (bool, np.bool_)) and complete):
            raise DataError(f"{path}: pools file is incomplete (interrupted write?); rerun `pipeline build-pools`")
        version = _plain(handle.attrs.get("format_version"))
        if version != FORMAT_VERSION:
            raise DataError(f"{path}: pools format version {version}, this code reads version {FORMAT_VERSION}; "
                            "rerun `pipeline build-pools`")
        missing = [name for name in DATASETS if name not in handle]
        if missing:
            raise DataError(f"{path}: pools file lacks dataset(s) {', '.join(missing)}")
        pools = {name: handle[name][()] for name in DATASETS}
        pools["attrs"] = {name: _plain(value) for name, value in handle.attrs.items()}
    _check_shapes(path, pools)
    return pools


def _plain(value):
    if isinstance(value, bytes):
        return value.decode()
    return value.item() if isinstance(value, np.generic) else value


def _check_shapes(path: Path, pools: dict) -> None:
    classes, pairs = pools["centres"].shape[0], pools["neg_sims"].shape[0]
    neighbours = pools["neighbours"]
    expected = {
        "class_sizes": (classes,),
        "neighbours": (classes, neighbours.shape[-1] if neighbours.ndim else 0),
        "neighbour_sims": neighbours.shape,
        "neg_pairs": (pairs, 2),
    }
    for name, shape in expected.items():
        if pools[name].shape != shape:
            raise DataError(f"{path}: dataset {name!r} has shape {pools[name].shape}, expected {shape}")


def load_thresholds(path: str | os.PathLike) -> dict[str, float]:
    """{"1e-1": t, ...} from thresholds.json (the numeric top-level entries); DataError if malformed or if a
    lower FPR has a lower threshold (exact order statistics never do: the file was edited or reordered)."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path}: thresholds file not found (run `pipeline build-pools` first)")
    try:
        document = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(document, dict):
        raise DataError(f"{path}: expected a JSON object of thresholds")
    thresholds = {}
    for key, value in document.items():
        if isinstance(value, dict):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise DataError(f"{path}: threshold {key!r} is not a finite number ({value!r})")
        thresholds[key] = float(value)
    if not thresholds:
        raise DataError(f"{path}: no thresholds in the file")
    _check_monotonic(path, thresholds)
    return thresholds


def _check_monotonic(path: Path, thresholds: dict[str, float]) -> None:
    try:
        levels = sorted(thresholds, key=lambda key: -float(key))  # FPR 1e-1 first
    except ValueError:
        bad = next(key for key in thresholds if not _is_number(key))
        raise DataError(f"{path}: key {bad!r} is not an FPR level like '1e-3'") from None
    for higher, lower in zip(levels, levels[1:]):
        if thresholds[lower] < thresholds[higher]:
            raise DataError(f"{path}: threshold at FPR {lower} ({thresholds[lower]:.6g}) is below the one at FPR "
                            f"{higher} ({thresholds[higher]:.6g}); thresholds must not decrease as the FPR falls "
                            "(edited file?); rerun `pipeline build-pools`")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
