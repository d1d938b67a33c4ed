"""Small face data for the tests: data sets written in the real formats, in-memory face sources, random
encoded images, and teacher caches written by hand."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

from pipeline.formats.jpeg import encode_jpeg
from pipeline.formats.recordio import write_face_recordio

FACE_SIZE = 16  # side in pixels of the images of write_random_faces and MirroredFaces


def random_image_bytes(seed: int, shape: tuple[int, int], fmt: str = "JPEG", **save_options) -> bytes:
    """A (height, width) image of uniformly random RGB pixels, encoded by PIL as `fmt` with `save_options`."""
    pixels = np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **save_options)
    return buffer.getvalue()


def write_gradient_faces(folder: Path, n: int = 120, size: int = 32, classes: int = 10, seed: int = 0) -> Path:
    """A RecordIO training set of `n` random-noise-plus-gradient JPEGs, sorted labels over `classes`.

    The gradient runs left to right, so a horizontal flip changes every image."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    items = []
    for i in range(n):
        base = (ramp[None, :, None] * rng.uniform(0.2, 1.0, size=3)).astype(np.float32)  # left-right asymmetric
        image = np.clip(base + rng.normal(0, 40, size=(size, size, 3)), 0, 255).astype(np.uint8)
        items.append((encode_jpeg(image, quality=90), i * classes // n))
    write_face_recordio(folder, items, num_classes=classes, image_size=(size, size))
    return folder


def write_random_faces(out_dir: Path, classes: int = 16, per_class: int = 3, seed: int = 0) -> Path:
    """A RecordIO training folder of random (not mirror-symmetric) FACE_SIZE x FACE_SIZE JPEGs, `per_class`
    per class."""
    rng = np.random.default_rng(seed)
    items = [(encode_jpeg(rng.integers(0, 256, (FACE_SIZE, FACE_SIZE, 3), dtype=np.uint8)), c)
             for c in range(classes) for _ in range(per_class)]
    write_face_recordio(out_dir, items)
    return out_dir


class MirroredFaces:
    """An in-memory face source of mirror-symmetric images: a flip leaves every image unchanged."""

    def __init__(self, classes: int = 8, per_class: int = 4, seed: int = 0):
        rng = np.random.default_rng(seed)
        left = rng.integers(0, 256, (classes * per_class, FACE_SIZE, FACE_SIZE // 2, 3), dtype=np.uint8)
        self.images = np.concatenate([left, left[:, :, ::-1]], axis=2)
        self.labels = np.repeat(np.arange(classes), per_class)
        self.num_classes = classes

    def __len__(self) -> int:
        return len(self.labels)

    def decode(self, i: int) -> np.ndarray:
        return self.images[i]


TEACHER_FP = "a" * 64
DATASET_FP = "b" * 64


def sha256_of(array):
    """The documented checksum: sha256 of the array's little-endian bytes in C order."""
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def write_cache_by_hand(path, rows=50, dim=8, seed=0, dtype="float16", complete=True, skip_attr=None,
                        layout: dict | None = None, userblock_size: int = 0, written: bool = True):
    """A teacher cache written directly with h5py from the documented key names (independent of the writer).

    `complete`: the value of the `complete` attribute (None: no attribute). `layout`: h5py create_dataset
    options for `embeddings` (e.g. chunks, compression: an older or foreign cache); `written=False` creates
    `embeddings` without ever writing it."""
    rng = np.random.default_rng(seed)
    embeddings = (rng.normal(size=(rows, 2, dim)) * 3).astype(dtype)
    labels = np.arange(rows, dtype=np.int64) // 5
    keys = np.arange(rows, dtype=np.int64) + 1
    attrs = {
        "format_version": 2,
        "teacher_fingerprint": TEACHER_FP,
        "teacher_name": "r18",
        "dataset_fingerprint": DATASET_FP,
        "preprocessing": json.dumps({"size": 112, "mean": 0.5, "std": 0.5, "flip": "horizontal"}),
        "rows": rows,
        "dim": dim,
        "views": 2,
        "view_names": json.dumps(["original", "flipped"]),
        "dtype": dtype,
        "embeddings_sha256": sha256_of(embeddings),
        "labels_sha256": sha256_of(labels),
        "keys_sha256": sha256_of(keys),
    }
    with h5py.File(path, "w", userblock_size=userblock_size) as f:
        f.create_dataset("embeddings", data=embeddings if written else None, shape=embeddings.shape,
                         dtype=embeddings.dtype, **(layout or {}))
        f["labels"], f["keys"] = labels, keys
        for name, value in attrs.items():
            if name != skip_attr:
                f.attrs[name] = value
        if complete is not None:
            f.attrs["complete"] = complete
    return embeddings, labels, keys
