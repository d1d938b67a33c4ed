"""Evaluate any embedding model on a data folder: every verification `*.bin` and the `test.rec` set.

`embed` is any callable mapping a float32 NCHW batch normalised as `(x/255 - 0.5) / 0.5` (on the CPU) to
(B, D) embeddings (a `pipeline.models.loading.Embedder` moves it to its device). Images are embedded with
their horizontal flips (flip TTA); the two embeddings are summed before L2 normalisation (an ensemble's,
`models.ensemble`, member by member: a score is then the weighted mean of the members' cosines).

- `.bin` files: insightface's 10-fold verification accuracy (`metrics.verification_accuracy`).
- `test.rec`: every pair i < j of the test images is scored (cosine), positive when the identities match;
  TPR at fixed FPRs over all pairs, and the ROC curve.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from pipeline.machine.devices import device_setting
from pipeline.errors import DataError, PipelineError
from pipeline.evaluation.metrics import (
    Roc,
    TprMethod,
    downsample_roc,
    l2_normalize,
    verification_accuracy,
)
from pipeline.evaluation.uncertainty import readout_uncertainty
from pipeline.formats.jpeg import decode_image
from pipeline.formats.recordio import FaceRecordIO
from pipeline.formats.verification_bin import load_verification_bin
from pipeline.fpr import TEST_FPRS, fpr_key
from pipeline.progress import progress_bar
from pipeline.storage.io import write_text_atomic
from pipeline.models import Arch
from pipeline.models.ensemble import Blocks, member_blocks, unit_blocks
from pipeline.settings import check, setting

DEFAULT_FPRS = TEST_FPRS
Embed = Callable[[torch.Tensor], "torch.Tensor | np.ndarray"]


def _rgb(item, where: str) -> np.ndarray:
    """A uint8 (H, W, 3) array from an array or encoded (JPEG/PNG) bytes."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        return decode_image(bytes(item), where=where)
    image = np.asarray(item)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise DataError(f"{where}: expected a uint8 (H, W, 3) RGB image, got {image.dtype} {image.shape}")
    return image


def normalize_batch(images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 NHWC images -> float32 NCHW in [-1, 1], as arcface_torch feeds its networks."""
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return (x / 255 - 0.5) / 0.5


def _run(embed: Embed, x: torch.Tensor, where: str) -> np.ndarray:
    out = embed(x)
    out = out.detach().float().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out, np.float32)
    if out.ndim != 2 or out.shape[0] != x.shape[0]:
        raise PipelineError(f"{where}: the model returned shape {out.shape} for a batch of {x.shape[0]} images")
    return out


def embed_images(
    embed: Embed,
    images: Sequence,
    batch_size: int = 64,
    flip: bool = True,
    source: str = "images",
) -> tuple[np.ndarray, np.ndarray | None]:
    """`(embeddings, flipped_embeddings or None)`, float32 (N, D), for uint8 RGB arrays or encoded JPEG/PNG bytes.

    `images` only needs `len()` and indexing, so a lazily decoding sequence keeps memory at one batch;
    `source` names the images in error messages."""
    n = len(images)
    if n == 0:
        raise DataError(f"{source}: no images to embed")
    outputs, flipped = [], []
    for start in progress_bar(range(0, n, batch_size), desc=f"embed {source}", unit="batch"):
        stop = min(n, start + batch_size)
        batch = [_rgb(images[i], f"{source}: image {i}") for i in range(start, stop)]
        for i, image in enumerate(batch):
            if image.shape != batch[0].shape:
                raise DataError(f"{source}: image {start + i} is {image.shape}, image {start} is {batch[0].shape}")
        x = normalize_batch(batch)
        outputs.append(_run(embed, x, source))
        if flip:
            flipped.append(_run(embed, torch.flip(x, dims=[3]), source))
    return np.concatenate(outputs), (np.concatenate(flipped) if flip else None)


def fuse_flips(embeddings: np.ndarray, flipped: np.ndarray | None, blocks: Blocks | None = None) -> np.ndarray:
    """Flip-sum (when flips are given) then L2-normalise, as float32 rows; an ensemble's raw rows (`blocks`,
    `models.ensemble.member_blocks`) member by member, each times sqrt(its share) (`unit_blocks`)."""
    total = embeddings if flipped is None else embeddings.astype(np.float64) + flipped
    return (l2_normalize(total) if blocks is None else unit_blocks(total, blocks)).astype(np.float32)


def evaluate_bin(embed: Embed, path: str | os.PathLike, batch_size: int = 64, flip: bool = True, folds: int = 10) -> dict:
    """Verification accuracy on one insightface `.bin` (`verification_accuracy`'s dict plus `pairs`)."""
    images, issame = load_verification_bin(path)
    emb, flipped = embed_images(embed, images, batch_size, flip, source=str(path))
    blocks = member_blocks(embed)
    if blocks is not None:  # an ensemble: its members' flips fused and normalised block by block first
        emb, flipped = fuse_flips(emb, flipped, blocks), None
    result = verification_accuracy(emb, issame, folds=folds, flipped=flipped)
    result["pairs"] = int(len(issame))
    return result


def _pair_counts(labels: np.ndarray) -> tuple[int, int]:
    n = labels.size
    per_class = np.unique(labels, return_counts=True)[1].astype(np.int64)
    positive = int(np.sum(per_class * (per_class - 1) // 2))
    return positive, n * (n - 1) // 2 - positive


def all_pairs_scores(
    embeddings: np.ndarray, labels: np.ndarray, block: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Dot-product scores of every pair i < j, split into `(positive, negative)` float32 arrays (same /
    different label), each in row-major (i, then j) order. Computed `block` rows at a time so that only a
    `block x N` float32 tile exists at once (default: about 16M scores per tile)."""
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    labels = np.asarray(labels).reshape(-1)
    n = emb.shape[0]
    if emb.ndim != 2 or labels.size != n:
        raise PipelineError(f"all-pairs scores: {labels.size} labels for embeddings of shape {emb.shape}")
    block = block or max(1, (1 << 24) // max(n, 1))
    n_pos, n_neg = _pair_counts(labels)
    positive, negative = np.empty(n_pos, np.float32), np.empty(n_neg, np.float32)
    filled_pos = filled_neg = 0
    for a in progress_bar(range(0, max(n - 1, 0), block), desc="pair scores", unit="block"):
        b = min(n, a + block)
        sims = emb[a:b] @ emb[a:].T  # rows i in [a, b), columns j in [a, n)
        upper = np.arange(n - a)[None, :] > np.arange(b - a)[:, None]
        same = labels[a:b, None] == labels[None, a:]
        tile_pos, tile_neg = sims[upper & same], sims[upper & ~same]
        positive[filled_pos : filled_pos + tile_pos.size] = tile_pos
        negative[filled_neg : filled_neg + tile_neg.size] = tile_neg
        filled_pos += tile_pos.size
        filled_neg += tile_neg.size
    return positive, negative


def evaluate_identities(
    embeddings: np.ndarray,
    labels: np.ndarray,
    flipped: np.ndarray | None = None,
    fprs: Sequence[float] = DEFAULT_FPRS,
    method: str = "nearest",
    roc_points: int = 2000,
    blocks: Blocks | None = None,
) -> tuple[dict, dict]:
    """All-pairs 1:1 verification on a labelled set: `(metrics, roc)`.

    `metrics` has `tpr@fpr=<f>` for each target (`metrics.tpr_at_fpr` with `method`), the image, identity
    and pair counts, and each TPR's standard error and resolution (`uncertainty.readout_uncertainty`); `roc` is `{"fpr", "tpr", "threshold"}` lists, at most ~`roc_points` points log-spaced in
    FPR. `blocks`: an ensemble's member blocks (`fuse_flips`)."""
    labels = np.asarray(labels).reshape(-1)
    positive, negative = all_pairs_scores(fuse_flips(embeddings, flipped, blocks), labels)
    roc = Roc.from_pos_neg(positive, negative)
    tprs = roc.tpr_at(fprs, method)
    metrics = {f"tpr@fpr={fpr_key(f)}": tpr for f, tpr in tprs.items()}
    metrics.update(
        images=int(labels.size),
        identities=int(np.unique(labels).size),
        positive_pairs=int(positive.size),
        negative_pairs=int(negative.size),
        **readout_uncertainty(tprs, positive.size, negative.size),
    )
    fpr, tpr, thresholds = roc.curve()
    keep = downsample_roc(fpr, tpr, thresholds, roc_points)
    curve = {"fpr": fpr[keep].tolist(), "tpr": tpr[keep].tolist(), "threshold": thresholds[keep].astype(float).tolist()}
    return metrics, curve


class _DecodedRecords:
    """A FaceRecordIO seen as a sequence of decoded images (decoded on access)."""

    def __init__(self, records):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.records.decode(i)


@dataclass
class EvalConfig:
    """The knobs of `pipeline evaluate`."""

    arch: Optional[str] = setting(None, "Backbone of a plain state dict when it cannot be inferred.", choices=Arch)
    batch_size: int = setting(64, "Images per forward pass.", min=1)
    device: str = device_setting()
    flip: bool = setting(True, "Add the embedding of the mirrored image (flip TTA).")
    tpr_method: str = setting("nearest", "TPR@FPR read-out: 'nearest' (insightface IJB tables) or 'exact' (best "
                                         "TPR with FPR <= target).", choices=TprMethod)
    input_size: Optional[int] = setting(None, "Input size of a TorchScript/ONNX model that does not declare it "
                                              "(default 112).", min=16)

    def __post_init__(self):
        check(self)


def evaluate_folder(
    embed: Embed,
    data_dir: str | os.PathLike,
    fprs: Sequence[float] = DEFAULT_FPRS,
    batch_size: int = 64,
    flip: bool = True,
    folds: int = 10,
    method: str = "nearest",
    roc_points: int = 2000,
    identities: str = "test",
) -> dict:
    """Metrics for every `*.bin` (keyed by file stem) and for `test.rec` (key `"test"`) in `data_dir`;
    `identities` names another RecordIO set of the folder to score all pairs of (e.g. "monitor").

    Each `.bin` entry holds `accuracy`, `std`, `threshold` (mean best squared-L2 threshold) and `pairs`;
    `"test"` holds `evaluate_identities`' metrics and the result's `"roc"` its curve (what `write_metrics`
    writes to roc.csv)."""
    data_dir = Path(data_dir)
    if method not in TprMethod.values():
        raise PipelineError(f"unknown TPR@FPR method {method!r} (use {' or '.join(TprMethod.values())})")
    bins = sorted(data_dir.glob("*.bin"))
    has_test = (data_dir / f"{identities}.rec").is_file()
    if not bins and not has_test:
        raise PipelineError(f"{data_dir}: nothing to evaluate (no *.bin and no {identities}.rec)")
    if has_test and any(path.stem in (identities, "roc") for path in bins):
        raise PipelineError(f"{data_dir}: a verification file named {identities}.bin/roc.bin clashes with the "
                            f"{identities}.rec results")
    metrics: dict = {}
    for path in bins:
        result = evaluate_bin(embed, path, batch_size, flip, folds)
        metrics[path.stem] = {
            "accuracy": result["accuracy"],
            "std": result["std"],
            "threshold": float(np.mean(result["thresholds"])),
            "pairs": result["pairs"],
        }
    if has_test:
        path = data_dir / f"{identities}.rec"
        records = FaceRecordIO(path, require_property=False)
        emb, flipped = embed_images(embed, _DecodedRecords(records), batch_size, flip, source=str(path))
        metrics[identities], metrics["roc"] = evaluate_identities(emb, records.labels, flipped, fprs, method, roc_points,
                                                                  member_blocks(embed))
    return metrics


def monitor_metrics(backbone: torch.nn.Module, folder: str | os.PathLike, device: torch.device,
                    batch_size: int = 256) -> dict[str, float]:
    """A training-time check of `backbone` on `folder` (its *.bin accuracy, TPR@FPR over all pairs of its
    monitor.rec when present), as flat {"val/accuracy": ..., "monitor/tpr@fpr=1e-3": ...}; the backbone is
    evaluated in eval mode without gradients (and without flip TTA: half the cost, and a training-time check
    needs no test-time trick) and put back in the mode it was in."""
    was_training = backbone.training
    backbone.eval()

    def embed(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return backbone(x.to(device)).float().cpu()

    try:
        metrics = evaluate_folder(embed, folder, batch_size=batch_size, flip=False, identities="monitor")
    finally:
        backbone.train(was_training)
    return {f"{name}/{key}": value for name, values in metrics.items() if name != "roc"
            for key, value in values.items() if key in ("accuracy",) or key.startswith("tpr@")}


def write_metrics(metrics: dict, out_dir: str | os.PathLike) -> list[Path]:
    """Write `metrics.json` (everything but `"roc"`) and `roc.csv` (columns fpr,tpr,threshold).

    Without a test set (e.g. real data with only `.bin` files) roc.csv holds just its header, so the file a
    pipeline declares always exists and never shows a stale curve. Returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    body = {name: value for name, value in metrics.items() if name != "roc"}
    write_text_atomic(out / "metrics.json", json.dumps(body, indent=2) + "\n")
    roc = metrics.get("roc") or {"fpr": [], "tpr": [], "threshold": []}
    rows = zip(roc["fpr"], roc["tpr"], roc["threshold"])
    write_text_atomic(out / "roc.csv", "fpr,tpr,threshold\n" + "".join(f"{f!r},{t!r},{h!r}\n" for f, t, h in rows))
    return [out / "metrics.json", out / "roc.csv"]
