"""The teacher cache's on-disk contract: datasets, attributes in their fixed order, `complete` last.

One row per training image, in dataset order: `embeddings` (N, views, D) raw teacher outputs (float16 by
default) with views = (original, horizontally flipped), `labels` (N,) int64, `keys` (N,) int64, and
attributes that say which teacher, which dataset and which preprocessing produced them, and sha256 checksums
of the three datasets. `complete=True` (the boolean) is written last, so a file without it is never trusted.
"""
from __future__ import annotations

import json

import h5py
import numpy as np

from pipeline.errors import PipelineError
from pipeline.settings import Choice

FORMAT_VERSION = 2  # 2: checksums of embeddings, labels and keys
VIEW_NAMES = ("original", "flipped")


class CacheDtype(Choice):
    """How teacher embeddings are stored."""

    float16 = "float16"
    float32 = "float32"


DTYPES = CacheDtype.values()
DATASETS = ("embeddings", "labels", "keys")
CHECKSUM_ATTRS = tuple(f"{name}_sha256" for name in DATASETS)
# Written in this order; `complete` is not part of it because it must come after everything else.
CONTRACT_ATTRS = (
    "format_version",
    "teacher_fingerprint",
    "teacher_name",
    "dataset_fingerprint",
    "preprocessing",
    "rows",
    "dim",
    "views",
    "view_names",
    "dtype",
    *CHECKSUM_ATTRS,
)
READ_ROWS = 65536  # rows per HDF5 read when streaming


def contract_attrs(
    *,
    teacher_fingerprint: str,
    teacher_name: str,
    dataset_fingerprint: str,
    preprocessing: dict,
    rows: int,
    dim: int,
    dtype: str,
) -> dict:
    """The cache attributes (everything but the checksums, which the merge adds, and `complete`) in their
    on-disk form and order."""
    if dtype not in DTYPES:
        raise PipelineError(f"unsupported cache dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    values = {
        "format_version": FORMAT_VERSION,
        "teacher_fingerprint": str(teacher_fingerprint),
        "teacher_name": str(teacher_name),
        "dataset_fingerprint": str(dataset_fingerprint),
        "preprocessing": json.dumps(preprocessing, sort_keys=True),
        "rows": int(rows),
        "dim": int(dim),
        "views": len(VIEW_NAMES),
        "view_names": json.dumps(list(VIEW_NAMES)),
        "dtype": dtype,
    }
    return {name: values[name] for name in CONTRACT_ATTRS if name in values}


def write_attrs(target: h5py.HLObject, attrs: dict) -> None:
    """Write attributes in a fixed order (same bytes on every run)."""
    for name, value in attrs.items():
        target.attrs[name] = value


def mark_complete(target: h5py.HLObject) -> None:
    """The very last write: from now on readers trust the file."""
    target.attrs["complete"] = True


def is_marked_complete(target: h5py.HLObject) -> bool:
    """Only the boolean True counts (a string "no" is truthy, and means nothing)."""
    value = target.attrs.get("complete", False)
    return isinstance(value, (bool, np.bool_)) and bool(value)
