"""IJB-B / IJB-C 1:1 template verification, as insightface's arcface_torch `eval_ijbc.py` computes it.

- image feature: embedding(aligned crop) + embedding(its mirror image) (F1; F0: the crop alone), NOT
  normalised (N1: the norm is a quality weight; N0: L2-normalised), times the faceness score (D1; D0: not);
- template feature: the sum over the template's media of the mean of that media's image features (a video's
  frames are one media), then L2-normalised; a pair's score is the dot product of its two template features;
- TPR at FPR 1e-6 .. 1e-1 read off the ROC with insightface's convention (sklearn's roc_curve with its
  intermediate points dropped, the point of nearest FPR, ties to the higher TPR) or exactly (`exact`: the
  best TPR at FPR <= target), see `metrics.Roc.tpr_at`;
- an ensemble of models (`models.ensemble`): every member pooled as above, its template features normalised
  member by member and concatenated times sqrt(share), so a pair's score is the weighted mean of the
  members' scores.

Alignment and features: `alignment.py`, `ijb_features.py`. At IJB-C scale (469k images, 23k templates,
15.7M pairs) everything after the forward passes is vectorised and memory-bounded: image features are read
from the feature file in blocks and added straight into the template sums (a media mean summed over media is
the sum of its images' features each divided by its media's size), pair scores are dot products of gathered
template features, tile by tile of the template Gram matrix. Sums and scores are float64, as in the reference.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.evaluation.ijb_features import (
    cached_features,
    extract_features,
    feature_key,
    image_set_fingerprint,
    read_features,
)
from pipeline.evaluation.metrics import Roc, downsample_roc, l2_normalize
from pipeline.evaluation.uncertainty import readout_uncertainty
from pipeline.formats.ijb import IjbMeta, IjbPaths, IjbTarget, ijb_target, read_ijb
from pipeline.fpr import FPR_LEVELS, fpr_key
from pipeline.progress import progress_bar
from pipeline.storage.io import atomic_path, output_lock, write_text_atomic
from pipeline.machine.resources import processes_bound
from pipeline.models.ensemble import Blocks, member_blocks, unit_blocks
from pipeline.settings import check, setting

IJB_FPRS = tuple(sorted(FPR_LEVELS))  # 1e-6 .. 1e-1, the columns of the insightface IJB table
SCORE_BLOCK_BYTES = 1 << 27  # one float64 tile of the template Gram matrix (4096 x 4096)


@dataclass
class IjbConfig:
    """The IJB-specific knobs of `pipeline evaluate-ijb` (model, batch, device, flip and TPR read-out are
    EvalConfig's)."""

    target: str = setting("IJBC", "IJBC or IJBB (any case): the meta files' prefix (<target>_*.txt) and the "
                                  "output names (RUN/<target>.json, ...).", choices=IjbTarget)
    workers: int = setting(2, "DataLoader worker processes that decode and align the crops (0: in this "
                              "process).", min=0,
                           validate=processes_bound)
    norm_score: bool = setting(True, "N1: keep each image feature's norm as its quality weight (--no-norm-score, "
                                     "N0: L2-normalise image features before pooling).")
    detector_score: bool = setting(True, "D1: multiply each image feature by its faceness score "
                                         "(--no-detector-score, D0: ignore the scores).")

    def __post_init__(self):
        self.target = ijb_target(self.target)
        check(self)


def mode_name(flip: bool, norm_score: bool, detector_score: bool) -> str:
    """insightface's name of the test mode, e.g. "F1 N1 D1"."""
    return f"F{int(flip)} N{int(norm_score)} D{int(detector_score)}"


def image_features(views: np.ndarray, faceness: np.ndarray, flip: bool, norm_score: bool,
                   detector_score: bool, blocks: Blocks | None = None) -> np.ndarray:
    """(n, D) float32 image features from (n, 2, D) raw embeddings (crop, mirror) and faceness scores; an
    ensemble's (`blocks`, `models.ensemble.member_blocks`) normalised member by member for N0."""
    feats = views[:, 0] + views[:, 1] if flip else views[:, 0].copy()
    if not norm_score:
        feats = (feats / np.sqrt(np.sum(feats**2, -1, keepdims=True)) if blocks is None
                 else unit_blocks(feats, blocks).astype(np.float32))
    if detector_score:
        feats = feats * np.asarray(faceness, np.float32)[:, None]
    return feats


def media_weights(templates: np.ndarray, medias: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(unique_templates, template index of each image, 1 / size of each image's (template, media) group)`."""
    unique, template_index = np.unique(templates, return_inverse=True)
    groups = np.stack([template_index.astype(np.int64), np.asarray(medias, np.int64)], 1)
    _, group, counts = np.unique(groups, axis=0, return_inverse=True, return_counts=True)
    return unique, template_index, 1.0 / counts[group.reshape(-1)]


def template_features(blocks, meta: IjbMeta, flip: bool = True, norm_score: bool = True,
                      detector_score: bool = True, members: Blocks | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`(unique template ids, (T, D) float64 L2-normalised template features)` from `(start, views)` blocks of
    image features in row order (`ijb_features.read_features`). An ensemble's features (`members`: its
    `member_blocks`) are pooled member by member and each member's template feature L2-normalised times
    sqrt(its share) (`unit_blocks`): a pair's score is the weighted mean of the members' template cosines."""
    unique, template_index, weights = media_weights(meta.templates, meta.medias)
    sums = None
    for start, views in blocks:
        stop = start + len(views)
        feats = image_features(views, meta.faceness[start:stop], flip, norm_score, detector_score, members)
        if sums is None:
            sums = np.zeros((unique.size, feats.shape[1]), np.float64)
        np.add.at(sums, template_index[start:stop], feats.astype(np.float64) * weights[start:stop, None])
    if sums is None:
        raise PipelineError("IJB: no image features to pool")
    return unique, (l2_normalize(sums) if members is None else unit_blocks(sums, members))


def pair_scores(unique: np.ndarray, features: np.ndarray, pairs: np.ndarray,
                block_bytes: int = SCORE_BLOCK_BYTES) -> np.ndarray:
    """(P,) float64 dot products of the two templates of each pair, in pair order.

    The pairs are grouped by tile of the template Gram matrix (tiles of `block_bytes`): a tile with many pairs
    is one matrix product of two blocks of template features, a sparse one a dot product per pair of gathered
    rows. At IJB-C density (15.7M of 267M template pairs) that is a few BLAS calls instead of reading two
    feature rows per pair."""
    index = np.searchsorted(unique, pairs)
    low, high = np.minimum(index[:, 0], index[:, 1]), np.maximum(index[:, 0], index[:, 1])  # scores are symmetric
    side = max(1, int((block_bytes // 8) ** 0.5))
    tiles_per_row = -(-len(unique) // side)
    tile = (low // side) * tiles_per_row + high // side
    order = np.argsort(tile, kind="stable")
    bounds = np.r_[0, np.flatnonzero(np.diff(tile[order])) + 1, len(order)]
    scores = np.empty(len(pairs), np.float64)
    for start, stop in progress_bar(list(zip(bounds[:-1], bounds[1:])), desc="pair scores", unit="tile"):
        rows = order[start:stop]
        r0, c0 = divmod(int(tile[rows[0]]), tiles_per_row)
        r0, c0 = r0 * side, c0 * side
        first, second = features[r0:r0 + side], features[c0:c0 + side]
        if len(rows) * 64 >= len(first) * len(second):  # dense: the whole tile at once
            scores[rows] = (first @ second.T)[low[rows] - r0, high[rows] - c0]
        else:
            scores[rows] = np.einsum("ij,ij->i", features[low[rows]], features[high[rows]])
    return scores


def verification_metrics(scores: np.ndarray, labels: np.ndarray, method: str, roc_points: int = 2000
                         ) -> tuple[dict, dict]:
    """`({"tpr@fpr=1e-6": ..., ..., "tpr_se": ..., "resolved": ..., "impostor_pairs": ...}, {"fpr", "tpr",
    "threshold"} lists of a log-FPR-spaced ROC)`: each TPR with its standard error and whether the impostor
    pairs resolve its FPR (`uncertainty.readout_uncertainty`)."""
    roc = Roc.from_scores(scores, labels)
    tprs = roc.tpr_at(IJB_FPRS, method)
    metrics = {f"tpr@fpr={fpr_key(f)}": tpr for f, tpr in tprs.items()}
    genuine = int(np.count_nonzero(labels))
    metrics.update(readout_uncertainty(tprs, genuine, len(labels) - genuine))
    fpr, tpr, thresholds = roc.curve()
    keep = downsample_roc(fpr, tpr, thresholds, roc_points)
    return metrics, {"fpr": fpr[keep].tolist(), "tpr": tpr[keep].tolist(), "threshold": thresholds[keep].tolist()}


def output_paths(out: Path, target: str) -> dict[str, Path]:
    prefix = target.lower()
    return {"json": out / f"{prefix}.json", "scores": out / f"{prefix}_scores.npy", "roc": out / f"{prefix}_roc.csv",
            "features": out / f"{prefix}_features.h5"}


def evaluate_ijb(embedder, ijb_dir: str | os.PathLike, out_dir: str | os.PathLike, config: IjbConfig | None = None,
                 batch_size: int = 64, flip: bool = True, method: str = "nearest") -> tuple[dict, list[Path], bool]:
    """Run the protocol of `embedder` (a `models.loading.Embedder`) on the IJB folder `ijb_dir` and write
    `<target>.json` (last), `<target>_scores.npy` (float32, pair-file order), `<target>_roc.csv` and the feature
    file into `out_dir`. Returns `(metrics, paths written, whether the feature file was reused)`.

    Any existing `<target>.json` is removed first, so after a failure none is left."""
    cfg = config or IjbConfig()
    files = output_paths(Path(out_dir), cfg.target)
    with output_lock(files["json"]):  # one evaluate-ijb per run folder and target
        return _evaluate(embedder, IjbPaths(Path(ijb_dir), cfg.target), files, cfg, batch_size, flip, method)


def _evaluate(embedder, paths: IjbPaths, files: dict[str, Path], cfg: IjbConfig, batch_size: int, flip: bool,
              method: str) -> tuple[dict, list[Path], bool]:
    files["json"].unlink(missing_ok=True)
    meta = read_ijb(paths.folder, cfg.target)
    key = feature_key(embedder, image_set_fingerprint(paths, meta))
    reused = cached_features(files["features"], key, len(meta.names))
    if not reused:
        extract_features(embedder, paths, meta, files["features"], key, batch_size, cfg.workers)
    unique, features = template_features(read_features(files["features"]), meta, flip, cfg.norm_score,
                                         cfg.detector_score, member_blocks(embedder))
    scores = pair_scores(unique, features, meta.pairs)
    metrics, roc = verification_metrics(scores, meta.labels, method)
    positive = int(np.count_nonzero(meta.labels))
    metrics.update(target=cfg.target, mode=mode_name(flip, cfg.norm_score, cfg.detector_score),
                   flags={"flip": flip, "norm_score": cfg.norm_score, "detector_score": cfg.detector_score},
                   tpr_method=method, images=len(meta.names), templates=int(unique.size),
                   media=int(np.unique(np.stack([meta.templates, meta.medias], 1), axis=0).shape[0]),
                   pairs=int(len(scores)), positive_pairs=positive, negative_pairs=int(len(scores)) - positive,
                   model=embedder.describe())
    with atomic_path(files["scores"], suffix=".npy") as tmp, open(tmp, "wb") as handle:
        np.save(handle, scores.astype(np.float32))
    rows = zip(roc["fpr"], roc["tpr"], roc["threshold"])
    write_text_atomic(files["roc"], "fpr,tpr,threshold\n" + "".join(f"{f!r},{t!r},{h!r}\n" for f, t, h in rows))
    write_text_atomic(files["json"], json.dumps(metrics, indent=2) + "\n")
    return metrics, [files["features"], files["scores"], files["roc"], files["json"]], reused


__all__ = ["IJB_FPRS", "IjbConfig", "IjbTarget", "evaluate_ijb", "image_features", "media_weights", "mode_name",
           "output_paths", "pair_scores", "template_features", "verification_metrics"]
