"""Pools from the teacher cache: identity centres and neighbours, the hardest negative pairs, and the
teacher's exact global FPR thresholds -- and their files.

`pools.h5`: datasets `centres` (C, D) float32, `class_sizes` (C,) int64, `neighbours` (C, k) int64 (-1 for
identities without images), `neighbour_sims` (C, k) float32 (NaN there), `neg_pairs` (M, 2) int64 (cache
rows i < j), `neg_sims` (M,) float32 (order: sim desc, i asc, j asc); attributes describe how it was built
(k, m, views, cache fingerprints, format version, the sha256 of its thresholds.json) and `complete=True` is
written last.
`thresholds.json` (a DVC metrics file, numeric leaves only): {"1e-1": t, ..., "tpr": {"1e-1": ...},
"ranks": {...}, "counts": {...}}; "tpr" is left out when there are no positive pairs. The two files are a
pair: pools.h5 is renamed into place last and names its thresholds.json by checksum, so an interrupted
rewrite or an edited thresholds.json is refused (`check_pair`), never used silently.
Reading and checking the two files is pipeline/search/pool_files.py (what students and the report import,
without the search itself).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from pipeline.errors import DataError, PipelineError
from pipeline.machine.resources import require_memory
from pipeline.progress import progress_bar
from pipeline.storage.hdf5 import write_hdf5
from pipeline.storage.io import write_text_atomic
from pipeline.search.backends import Backend
from pipeline.search.knn import accumulate_centres, normalise_centres
from pipeline.search.pool_files import DATASETS, FORMAT_VERSION, sha256_hex
from pipeline.search.statistics import (
    DEFAULT_FPRS,
    identity_neighbours,
    negative_statistics,
    sample_rows,
)
from pipeline.settings import Choice, check, setting

VIEWS = {"original": (0,), "flipped": (1,), "both": (0, 1)}
READ_ROWS = 65536


class CentreViews(Choice):
    """Views averaged into identity centres."""

    original = "original"
    both = "both"


@dataclass
class PoolsConfig:
    """The knobs of `pipeline build-pools`."""

    neighbours: int = setting(16, "Nearest identities kept per identity (by class-centre similarity), for the "
                                  "neighbours sampler.", min=1)
    hard_pairs: int = setting(100_000, "Most similar negative image pairs kept (global, exact), for the hard-pairs "
                                       "sampler.", min=0)
    centre_views: str = setting("original", "Views averaged into class centres: original or both (original + "
                                            "flipped).", choices=CentreViews)
    backend: str = setting("auto", "Search backend: auto, faiss, torch or numpy.", choices=Backend)
    block_rows: int = setting(4096, "Rows per block: peak memory ~ 3 x block_rows^2 x 4 B, plus N x D x 4 B for "
                                    "the embeddings.", min=1)
    threshold_rows: int = setting(0, "Use a uniform sample of this many rows for the thresholds and negative pairs "
                                     "(when all N^2/2 pairs are too many); 0 = all rows (exact).", min=0)
    seed: int = setting(0, "Seed of --threshold-rows and of the threshold pilot.", min=0)

    def __post_init__(self):
        check(self)
        if self.threshold_rows == 1:
            raise PipelineError("--threshold-rows 1: need at least 2 rows (0 = all rows)")


@dataclass
class PoolResults:
    centres: np.ndarray
    class_sizes: np.ndarray
    neighbours: np.ndarray
    neighbour_sims: np.ndarray
    neg_pairs: np.ndarray
    neg_sims: np.ndarray
    thresholds: dict  # `negative_thresholds` result: thresholds, tpr, ranks, counts, method
    attrs: dict = field(default_factory=dict)


class _ArraySource:
    """An in-memory (N, V, D) array behind the same reading interface as `TeacherCache`."""

    def __init__(self, emb_views: np.ndarray, labels: np.ndarray):
        self.array = np.asarray(emb_views)
        if self.array.ndim == 2:
            self.array = self.array[:, None, :]
        if self.array.ndim != 3:
            raise PipelineError(f"embeddings: expected (N, V, D), got shape {self.array.shape}")
        self.labels = np.asarray(labels)
        self.keys = np.arange(self.array.shape[0], dtype=np.int64)
        self.path = "embeddings"

    def __len__(self) -> int:
        return self.array.shape[0]

    def embeddings(self, indices=None, views=(0,)) -> np.ndarray:
        rows = self.array if indices is None else self.array[np.asarray(indices)]
        return rows[:, list(views), :].astype(np.float32)


def _views(name: str, option: str) -> tuple[int, ...]:
    if name not in VIEWS:
        raise PipelineError(f"{option} {name!r}: use one of {', '.join(VIEWS)}")
    return VIEWS[name]


def read_normalised(source, rows: np.ndarray, views: tuple[int, ...], progress: bool = False):
    """Yield (chunk start, float32 (n, V, D) unit rows) for `rows`; DataError naming the file, the row
    and its key on NaN/inf or an all-zero embedding."""
    for start in progress_bar(range(0, rows.size, READ_ROWS), desc="reading cache", unit="chunk",
                              show=progress, leave=False):
        index = rows[start : start + READ_ROWS]
        chunk = np.asarray(source.embeddings(index, views=views), np.float32)
        flat = chunk.reshape(chunk.shape[0], -1)
        bad = ~np.isfinite(flat).all(axis=1)
        norms = np.linalg.norm(chunk, axis=-1)
        zero = (norms == 0).any(axis=1)
        if bad.any() or zero.any():
            at = int(np.flatnonzero(bad | zero)[0])
            row = int(index[at])
            what = "contains NaN or inf" if bad[at] else "is all zeros"
            raise DataError(f"{source.path}: embedding row {row} (key {int(source.keys[row])}) {what}")
        yield start, chunk / norms[..., None]


def scan_memory(classes: int, rows: int, dim: int, block_rows: int, hard_pairs: int) -> int:
    """Bytes build_pools holds at its peak: the class sums (float64), the rows' embeddings, three blocks of
    similarities and the kept hard pairs (two int64 indices and a float32 similarity, twice while selecting)."""
    block = min(block_rows, rows)
    pairs = min(hard_pairs, rows * (rows - 1) // 2)
    return 8 * classes * dim + 4 * rows * dim + 3 * 4 * block * block + 2 * 20 * pairs


def build_pools(emb_views, labels: np.ndarray | None = None, num_classes: int | None = None,
                config: PoolsConfig | None = None, threshold_view: str = "original", fprs=DEFAULT_FPRS,
                pilot_rows: int = 4096, progress: bool = False, checkpoint=None, **settings) -> PoolResults:
    """Everything in pools.h5 and thresholds.json, from an (N, V, D) array or a `TeacherCache`.

    `config` (or PoolsConfig fields given by name) sets the neighbours k, the hard pairs m, views, backend,
    block size and row sampling.
    Centres average the L2-normalised `centre_views` ("original" or "both"); thresholds and negative pairs
    use `threshold_view`. k / m beyond what the data allows are clamped with a warning. `checkpoint`
    (search/checkpoint.ScanCheckpoint) makes the pair scans resumable after a kill. Memory: N x D
    float32 for the threshold view (or `threshold_rows` x D), plus block buffers.
    """
    cfg = replace(config, **settings) if config is not None else PoolsConfig(**settings)
    k, m, centre_views, backend = cfg.neighbours, cfg.hard_pairs, cfg.centre_views, cfg.backend
    block_rows, sample, seed = cfg.block_rows, cfg.threshold_rows or None, cfg.seed
    source = emb_views if hasattr(emb_views, "embeddings") else _ArraySource(emb_views, labels)
    labels = np.asarray(source.labels if labels is None else labels).reshape(-1).astype(np.int64)
    n = len(source)
    if labels.size != n:
        raise PipelineError(f"{source.path}: {n} embedding rows but {labels.size} labels")
    if labels.size and labels.min() < 0:
        raise DataError(f"{source.path}: row {int(np.argmin(labels))} has a negative label")
    num_classes = int(labels.max()) + 1 if num_classes is None else int(num_classes)
    centre_idx, threshold_idx = _views(centre_views, "centre_views"), _views(threshold_view, "threshold_view")
    if len(threshold_idx) != 1:
        raise PipelineError(f"threshold_view {threshold_view!r}: pick one view (original or flipped)")

    sums = np.zeros((num_classes, 0), np.float64)
    sizes = np.zeros(num_classes, np.int64)
    every = np.arange(n, dtype=np.int64)
    chosen = sample_rows(n, sample, seed)
    pair_rows = every if chosen is None else chosen
    emb = None
    wanted = tuple(sorted(set(centre_idx) | set(threshold_idx)))
    for start, chunk in read_normalised(source, every, wanted, progress):
        if emb is None:
            dim = chunk.shape[-1]
            require_memory(f"{source.path}: build-pools of {pair_rows.size} rows x {dim} (--block-rows {block_rows}, "
                           f"--hard-pairs {m})", scan_memory(num_classes, pair_rows.size, dim, block_rows, m))
            sums = np.zeros((num_classes, dim), np.float64)
            emb = np.empty((pair_rows.size, dim), np.float32)
        part = labels[start : start + chunk.shape[0]]
        accumulate_centres(sums, sizes, chunk[:, [wanted.index(v) for v in centre_idx]], part)
        target = chunk[:, wanted.index(threshold_idx[0])]
        if chosen is None:
            emb[start : start + chunk.shape[0]] = target
        else:
            lo, hi = np.searchsorted(chosen, [start, start + chunk.shape[0]])
            emb[lo:hi] = target[chosen[lo:hi] - start]
    if emb is None:
        raise PipelineError(f"{source.path}: no embeddings")
    centres = normalise_centres(sums)
    neighbours, neighbour_sims = identity_neighbours(centres, k, sizes, backend=backend, block_rows=block_rows)
    result, pairs, sims = negative_statistics(emb, labels[pair_rows], m, fprs=fprs, seed=seed, backend=backend,
                                              block_rows=block_rows, pilot_rows=pilot_rows, progress=progress,
                                              checkpoint=checkpoint)
    pairs = pair_rows[pairs]
    result["counts"].update(N_total=n, sampled=int(chosen is not None))
    attrs = {
        "format_version": FORMAT_VERSION,
        "k": int(neighbours.shape[1]), "k_requested": int(k), "m": int(pairs.shape[0]), "m_requested": int(m),
        "centre_views": centre_views, "threshold_view": threshold_view,
        "views": json.dumps({"centres": list(centre_idx), "thresholds": list(threshold_idx)}),
        "teacher_fingerprint": str(getattr(source, "teacher_fingerprint", "")),
        "dataset_fingerprint": str(getattr(source, "dataset_fingerprint", "")),
        "cache_fingerprint": str(getattr(source, "fingerprint", "")),
        "cache": str(source.path), "rows": n, "num_classes": num_classes,
        "sample": int(pair_rows.size if chosen is not None else 0), "seed": int(seed),
        "engine": result["method"]["engine"], "thresholds": json.dumps(result["thresholds"]),
    }
    return PoolResults(centres, sizes, neighbours, neighbour_sims, pairs, sims, result, attrs)


def thresholds_document(result: dict) -> dict:
    """The thresholds.json content: numeric leaves only (no NaN: tpr is omitted without positives)."""
    doc = {key: float(value) for key, value in result["thresholds"].items()}
    if result["counts"]["n_pos"] > 0:
        doc["tpr"] = {key: float(value) for key, value in result["tpr"].items()}
    doc["ranks"] = {key: int(value) for key, value in result["ranks"].items()}
    doc["counts"] = {key: int(value) for key, value in result["counts"].items()}
    return doc


def describe(results: PoolResults, seconds: float) -> str:
    """Thresholds table (FPR, threshold, rank, teacher TPR), pair counts and how they were computed."""
    t = results.thresholds
    lines = [f"  {'FPR':>6}  {'threshold':>10}  {'rank':>14}  {'TPR':>8}"]
    for key, value in t["thresholds"].items():
        lines.append(f"  {key:>6}  {value:>10.6f}  {t['ranks'][key]:>14,}  {t['tpr'][key]:>8.4f}")
    c = t["counts"]
    sampled = f" (uniform sample of {c['N']:,} of {c['N_total']:,} rows)" if c["sampled"] else ""
    lines.append(f"  images {c['N']:,}{sampled}, identities {c['identities']:,} "
                 f"({c['single_image_identities']:,} with one image), negative pairs {c['n_neg']:,}, "
                 f"positive pairs {c['n_pos']:,}")
    method = t["method"]
    misses = f", pilot missed {', '.join(method['pilot_misses'])}" if method["pilot_misses"] else ""
    lines.append(f"  exact over every negative pair: {method['scans']} scan(s), engine {method['engine']}, "
                 f"pilot {'used' if method['pilot'] else 'not used'}{misses}; {seconds:.1f} s in total")
    return "\n".join(lines)


def write_pools(out_dir: str | os.PathLike, results: PoolResults) -> tuple[Path, Path]:
    """Write out_dir/pools.h5 and out_dir/thresholds.json: both complete under temporary names first, then
    thresholds.json renamed, then pools.h5 (which holds thresholds.json's checksum) last."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pools_path, thresholds_path = out / "pools.h5", out / "thresholds.json"
    document = json.dumps(thresholds_document(results.thresholds), indent=2, allow_nan=False) + "\n"
    with write_hdf5(pools_path, data_bytes=sum(getattr(results, name).nbytes for name in DATASETS)) as handle:
        for name in DATASETS:
            handle.create_dataset(name, data=getattr(results, name))
        for name, value in results.attrs.items():
            handle.attrs[name] = value
        handle.attrs["thresholds_json_sha256"] = sha256_hex(document.encode())
        handle.attrs["complete"] = True  # last: readers trust nothing without it
        write_text_atomic(thresholds_path, document)  # a kill from here on leaves a pair check_pair refuses
    return pools_path, thresholds_path
