"""IJB image features: every loose crop decoded and aligned in DataLoader workers, embedded with its
horizontal flip in batches, and kept in `RUN/<target>_features.h5` so that re-scoring with other flags does
not run the model again.

The feature file holds `features` (N, 2, D) float32 raw embeddings (views: aligned crop, its mirror image),
row i being line i of the landmarks file, and the key it was computed for: the model file's sha256 (an
ensemble's: a sha256 of all its members' in order, `models.ensemble`; its features are the members' raw
features side by side, whatever the weights), the input side, the alignment, and the image set (sha256 of the landmarks file plus every crop's name, size and
modification time). A file with another key is recomputed, never reused; `complete` is its last attribute
and it is written to a temporary name and renamed.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.errors import DataError, PipelineError
from pipeline.evaluation.alignment import (
    ALIGNMENT,
    reference_points,
    similarity_transforms,
    warp_face,
)
from pipeline.formats.ijb import IjbMeta, IjbPaths
from pipeline.formats.jpeg import JPEG_SOI
from pipeline.progress import progress_bar
from pipeline.storage.hdf5 import open_hdf5, write_hdf5
from pipeline.models.preprocess import forward_views, prepare_teacher

FORMAT = "ekd-ijb-features"
VERSION = 1
READ_ROWS = 1 << 15  # rows of the feature file read at a time when scoring


def _where(paths: IjbPaths, meta: IjbMeta, row: int) -> str:
    return f"{paths.landmarks} line {meta.line_of_image(row)}"


def alignment_matrices(paths: IjbPaths, meta: IjbMeta, size: int) -> np.ndarray:
    """(N, 2, 3) warps onto the template for a `size` input; DataError naming the line of coinciding points."""
    matrices, ok = similarity_transforms(meta.landmarks, reference_points(size))
    if not ok.all():
        row = int(np.flatnonzero(~ok)[0])
        raise DataError(f"{_where(paths, meta, row)}: the five landmarks of {meta.names[row]} coincide (no "
                        "alignment exists)")
    return matrices


def image_set_fingerprint(paths: IjbPaths, meta: IjbMeta) -> str:
    """sha256 of the landmarks file and of every crop's name, size and mtime; DataError for a missing crop."""
    digest = hashlib.sha256(paths.landmarks.read_bytes())
    for row, name in enumerate(meta.names):
        try:
            stat = os.stat(paths.crops / name)
        except OSError:
            raise DataError(f"{_where(paths, meta, row)}: image {name} not found in {paths.crops}") from None
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def feature_key(embedder, image_set: str) -> dict:
    """What a feature file must have been computed from to be reused."""
    return {"format": FORMAT, "version": VERSION, "model_sha256": embedder.fingerprint,
            "input_size": int(embedder.input_size), "alignment": ALIGNMENT, "image_set": image_set}


class AlignedCrops(Dataset):
    """Item i: (i, the aligned RGB crop of image i as uint8 (S, S, 3), "" or the one-line error).

    Errors are returned rather than raised, so that the main process reports them as they are (a worker's
    exception would arrive wrapped in its traceback)."""

    def __init__(self, paths: IjbPaths, meta: IjbMeta, matrices: np.ndarray, size: int):
        self.paths, self.meta, self.matrices, self.size = paths, meta, matrices, size

    def __len__(self) -> int:
        return len(self.meta.names)

    def __getitem__(self, i: int):
        path = self.paths.crops / self.meta.names[i]
        where = f"{path} ({_where(self.paths, self.meta, i)})"
        blank = np.zeros((self.size, self.size, 3), np.uint8)
        try:
            data = path.read_bytes()
        except OSError as error:
            return i, blank, f"{where}: cannot read the crop ({error.strerror})"
        if data[:2] != JPEG_SOI:
            return i, blank, f"{where}: not a JPEG (starts with {data[:4].hex() or 'nothing'})"
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)  # BGR, as cv2.imread
        if image is None:
            return i, blank, f"{where}: cannot decode the JPEG"
        return i, np.ascontiguousarray(warp_face(image, self.matrices[i], self.size)[:, :, ::-1]), ""


def extract_features(embedder, paths: IjbPaths, meta: IjbMeta, out: Path, key: dict, batch_size: int,
                     workers: int) -> Path:
    """Embed every crop and its mirror image into the feature file `out` (written atomically)."""
    # OpenCV's own thread pool off, here in the parent: the workers are forked, and a child that inherits a pool
    # whose threads it does not have deadlocks in cv2 (the parallelism is the workers')
    cv2.setNumThreads(1)
    embedder = prepare_teacher(embedder)
    size, n = embedder.input_size, len(meta.names)
    crops = AlignedCrops(paths, meta, alignment_matrices(paths, meta, size), size)
    loader = DataLoader(crops, batch_size=batch_size, num_workers=workers)
    with write_hdf5(out, suffix=".h5", data_bytes=n * 2 * embedder.dim * 4) as handle:
        features = handle.create_dataset("features", (n, 2, embedder.dim), np.float32,
                                         chunks=(min(n, 1024), 2, embedder.dim))
        pending = None

        def store(rows: torch.Tensor, embedded: torch.Tensor) -> None:
            values = embedded.cpu().numpy()
            bad = ~np.isfinite(values).reshape(len(values), -1).all(1)
            if bad.any():
                row = int(rows[int(np.flatnonzero(bad)[0])])
                raise PipelineError(f"{_where(paths, meta, row)}: the model's output for {meta.names[row]} is "
                                    "NaN or infinite")
            features[int(rows[0]):int(rows[-1]) + 1] = values

        with progress_bar(total=n, desc=f"embed {paths.target}", unit="img") as bar:
            for rows, images, errors in loader:
                problem = next((e for e in errors if e), None)
                if problem:
                    raise DataError(problem)
                current = (rows, forward_views(embedder, images.numpy()))  # queued before the last is read
                if pending is not None:
                    store(*pending)
                pending = current
                bar.update(len(rows))
            if pending is not None:
                store(*pending)
        handle.attrs.update({**key, "dim": embedder.dim, "views": "original,flipped", "images": n,
                             "device": str(embedder.device)})
        handle.attrs["complete"] = True
    return out


def cached_features(path: Path, key: dict, images: int) -> bool:
    """Whether `path` is a complete feature file computed for `key` with `images` rows."""
    if not path.is_file():
        return False
    try:
        with open_hdf5(path) as handle:  # a feature file that reaches outside itself raises DataError
            attrs = dict(handle.attrs)
            rows = handle["features"].shape[0] if "features" in handle else -1
    except (OSError, DataError):  # unreadable, or linking outside itself: recomputed and replaced
        return False
    same = all(str(attrs.get(name)) == str(value) for name, value in key.items())
    return bool(attrs.get("complete")) and same and rows == images


def read_features(path: Path, rows: int = READ_ROWS) -> Iterator[tuple[int, np.ndarray]]:
    """`(start, (n, 2, D) float32)` blocks of a feature file, in row order."""
    with open_hdf5(path) as handle:
        features = handle["features"]
        for start in range(0, features.shape[0], rows):
            yield start, features[start:start + rows]
