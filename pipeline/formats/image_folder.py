"""Face sets stored as one sub-folder per identity (`root/<identity>/<image>.jpg|png`).

Identities are the sub-folders sorted by name, labelled 0..C-1; images are sorted by name within each.
The API matches FaceRecordIO: `len`, `labels`, `keys`, `num_classes`, `image_size`, `read`, `decode`,
`fingerprint`.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from pipeline.errors import DataError
from pipeline.formats.jpeg import decode_image
from pipeline.formats.jpeg import image_size as encoded_image_size

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def is_image_name(name: str) -> bool:
    """True for the file names an image folder's identities may hold."""
    return name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith(".")


class ImageFolderFaces:
    """Random access to a folder-per-identity face set; `read(i)` returns the file's bytes."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: not a folder")
        identities = sorted(entry.name for entry in os.scandir(self.root) if entry.is_dir())
        if not identities:
            raise DataError(f"{self.root}: no identity sub-folders")
        paths, labels = [], []
        for label, identity in enumerate(identities):
            names = sorted(e.name for e in os.scandir(self.root / identity) if e.is_file() and is_image_name(e.name))
            paths.extend(f"{identity}/{name}" for name in names)
            labels.extend([label] * len(names))
        if not paths:
            raise DataError(f"{self.root}: no .jpg/.jpeg/.png images in {len(identities)} identity folders")
        self.identities = identities
        self.paths = paths  # relative to root, "identity/name"
        self.labels = np.asarray(labels, dtype=np.int64)
        self.keys = np.arange(len(paths), dtype=np.int64)
        self.num_classes = len(identities)
        self.has_header = False
        first = (self.root / paths[0]).read_bytes()
        self.image_size: tuple[int, int] | None = encoded_image_size(first, where=str(self.root / paths[0]))

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int) -> tuple[bytes, int]:
        """The file bytes and label of image `i`."""
        path = self.root / self.paths[i]
        try:
            return path.read_bytes(), int(self.labels[i])
        except OSError as error:
            raise DataError(f"{path}: cannot read image {i} ({error.strerror or error})") from None

    def decode(self, i: int) -> np.ndarray:
        """Image `i` decoded to uint8 RGB (H, W, 3) (JPEG or PNG)."""
        data, _ = self.read(i)
        return decode_image(data, where=str(self.root / self.paths[i]))

    def where(self, i: int) -> str:
        """Image `i` as error messages name it: its file."""
        return str(self.root / self.paths[i])

    def fingerprint(self) -> str:
        """sha256 hex over every image's relative path and size (cheap: no image is read)."""
        digest = hashlib.sha256()
        for relative in self.paths:
            digest.update(f"{relative}\t{(self.root / relative).stat().st_size}\n".encode())
        return digest.hexdigest()

    def __repr__(self) -> str:
        return f"ImageFolderFaces({self.root}, {len(self)} images, {self.num_classes} classes)"
