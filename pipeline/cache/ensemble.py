"""An ensemble of cached teachers, read as one teacher: what build-pools reads from a single cache.

Members are teacher caches of the same training set (same rows, record keys in the same order, labels, views
and dataset fingerprint; anything else is refused in one line naming both caches and the first mismatch),
each opened with the validating reader `TeacherCache`. With member weights w_k (default equal) and shares
s_k = w_k / sum(w), the ensemble's embedding of a row is the concatenation of each member's L2-normalised
embedding times sqrt(s_k), a unit vector of dimension D_1 + ... + D_K whose inner products are

    <e(a), e(b)> = sum_k s_k cos_k(a, b),

the weighted mean of the members' cosine similarities. The concatenation is computed per chunk when read,
never written to disk. An ensemble of one cache is that cache: same embeddings, path and fingerprints (so
build-pools writes the same bytes).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Sequence

import numpy as np

from pipeline.cache.format import TeacherCache
from pipeline.errors import DataError, PipelineError
from pipeline.weights import checked_weights


def same_training_set(first: TeacherCache, other: TeacherCache) -> None:
    """DataError naming both caches and the first mismatch unless they cache the same training set."""
    def refuse(what: str) -> None:
        raise DataError(f"{first.path} and {other.path} are not caches of the same training set: {what}; an "
                        "ensemble needs every member extracted from the same data in the same order")

    if len(first) != len(other):
        refuse(f"{len(first)} rows != {len(other)} rows")
    if (first.views, first.view_names) != (other.views, other.view_names):
        refuse(f"views {list(first.view_names)} != {list(other.view_names)}")
    for name in ("keys", "labels"):
        mine, theirs = getattr(first, name), getattr(other, name)
        differ = np.flatnonzero(mine != theirs)
        if differ.size:
            row = int(differ[0])
            refuse(f"row {row} has {name[:-1]} {int(mine[row])} != {int(theirs[row])} ({differ.size} rows differ)")
    if first.dataset_fingerprint != other.dataset_fingerprint:
        refuse(f"dataset_fingerprint {first.dataset_fingerprint} != {other.dataset_fingerprint}")


def _digest(kind: str, fingerprints: list[str], shares: list[float]) -> str:
    document = {"ensemble": kind, "members": fingerprints, "shares": [repr(s) for s in shares]}
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


class TeacherEnsemble:
    """Several teacher caches of one training set read as one teacher (`TeacherEnsemble.open(paths, weights)`).

    Has what `search.pools.build_pools` reads from a `TeacherCache`: `len`, `.labels`, `.keys`, `.path`,
    `.views`, `.dim`, `embeddings(indices, views)`, `.fingerprint`, `.teacher_fingerprint`,
    `.dataset_fingerprint`, `close()`.
    """

    def __init__(self, members: Sequence[TeacherCache], weights: Sequence[float] | None = None):
        if not members:
            raise PipelineError("an ensemble needs at least one teacher cache")
        self.members = list(members)
        self.weights = checked_weights(weights, len(self.members))
        total = sum(self.weights)
        self.shares = [w / total for w in self.weights]
        self._scales = [np.float32(math.sqrt(s)) for s in self.shares]
        for other in self.members[1:]:
            same_training_set(self.members[0], other)
        first = self.members[0]
        self.labels, self.keys = first.labels, first.keys

    @classmethod
    def open(cls, paths: Sequence[str | os.PathLike], weights: Sequence[float] | None = None,
             verify: bool = True) -> "TeacherEnsemble":
        """Open every cache with `TeacherCache.open` (validated) and check them against each other."""
        checked_weights(weights, len(paths))  # before reading any file
        return cls([TeacherCache.open(path, verify=verify) for path in paths], weights)

    # ------------------------------------------------------------------ metadata
    @property
    def single(self) -> bool:
        return len(self.members) == 1

    def __len__(self) -> int:
        return len(self.members[0])

    @property
    def path(self):
        """The member's path for one cache; "A.h5 + B.h5" (what error lines and pools.h5's `cache` name)."""
        return self.members[0].path if self.single else " + ".join(str(m.path) for m in self.members)

    @property
    def paths(self) -> list[str]:
        return [str(m.path) for m in self.members]

    @property
    def dim(self) -> int:
        return sum(m.dim for m in self.members)

    @property
    def views(self) -> int:
        return self.members[0].views

    @property
    def view_names(self) -> tuple[str, ...]:
        return self.members[0].view_names

    @property
    def dataset_fingerprint(self) -> str:
        return self.members[0].dataset_fingerprint

    @property
    def teacher_fingerprint(self) -> str:
        """The member's for one cache; else a sha256 of the members' teacher fingerprints and weight shares."""
        if self.single:
            return self.members[0].teacher_fingerprint
        return _digest("teachers", [m.teacher_fingerprint for m in self.members], self.shares)

    @property
    def fingerprint(self) -> str:
        """The member's for one cache; else a sha256 of the members' cache fingerprints and weight shares
        (in member order: the order of the concatenated dimensions)."""
        if self.single:
            return self.members[0].fingerprint
        return _digest("caches", [m.fingerprint for m in self.members], self.shares)

    def pool_attrs(self) -> dict:
        """What pools.h5 records about the members (nothing extra for one cache: the single-cache bytes)."""
        if self.single:
            return {}
        return {"caches": json.dumps(self.paths), "cache_weights": json.dumps(self.weights),
                "cache_fingerprints": json.dumps([m.fingerprint for m in self.members])}

    # ------------------------------------------------------------------ reading
    def embeddings(self, indices: Sequence[int] | np.ndarray | None = None,
                   views: Sequence[int] = (0, 1)) -> np.ndarray:
        """float32 (n, len(views), D_1 + ... + D_K): each member's unit rows times sqrt(share), concatenated
        (one member: its raw rows, as `TeacherCache.embeddings`). DataError naming the member cache, the row
        and its key on NaN/inf or an all-zero embedding."""
        if self.single:
            return self.members[0].embeddings(indices, views)
        rows = np.arange(len(self)) if indices is None else np.asarray(indices, np.int64).reshape(-1)
        parts = []
        for member, scale in zip(self.members, self._scales):
            chunk = member.embeddings(rows, views)
            norms = np.linalg.norm(chunk, axis=-1, keepdims=True)
            bad = ~(np.isfinite(chunk).all(axis=-1) & (norms[..., 0] > 0)).all(axis=1)
            if bad.any():
                first = int(np.flatnonzero(bad)[0])
                row = int(rows[first])
                what = "contains NaN or inf" if not np.isfinite(chunk[first]).all() else "is all zeros"
                raise DataError(f"{member.path}: embedding row {row} (key {int(member.keys[row])}) {what}")
            parts.append(chunk * (scale / norms))
        return np.concatenate(parts, axis=-1).astype(np.float32, copy=False)

    def close(self) -> None:
        for member in self.members:
            member.close()
