"""JPEG (and PNG, for image folders) encoding and decoding with Pillow; images are uint8 RGB (H, W, 3)."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from pipeline.errors import DataError

JPEG_SOI = b"\xff\xd8"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def encode_jpeg(rgb: np.ndarray, quality: int = 95) -> bytes:
    """Encode a uint8 RGB (H, W, 3) array as a baseline JPEG."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"encode_jpeg expects uint8 (H, W, 3) RGB, got {rgb.dtype} {rgb.shape}")
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def decode_jpeg(data: bytes, where: str | None = None) -> np.ndarray:
    """Decode JPEG bytes to uint8 RGB (H, W, 3); anything that is not a JPEG raises DataError naming `where`."""
    if not bytes(data[:2]) == JPEG_SOI:
        raise DataError(f"{where or 'image payload'}: not a JPEG (starts with {bytes(data[:4]).hex() or 'nothing'})")
    return _decode(data, where)


def decode_image(data: bytes, where: str | None = None) -> np.ndarray:
    """Decode JPEG or PNG bytes to uint8 RGB (H, W, 3); other payloads raise DataError naming `where`."""
    if not (bytes(data[:2]) == JPEG_SOI or bytes(data[:8]) == PNG_SIGNATURE):
        raise DataError(f"{where or 'image payload'}: not a JPEG or PNG (starts with {bytes(data[:4]).hex()})")
    return _decode(data, where)


def image_size(data: bytes, where: str | None = None) -> tuple[int, int]:
    """(H, W) of an encoded image, read from its header without decoding the pixels."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Exception as error:  # Pillow raises many types for bad data
        raise DataError(f"{where or 'image payload'}: cannot read the image header ({error})") from None
    return height, width


def _decode(data: bytes, where: str | None) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as image:
            rgb = np.asarray(image.convert("RGB"))
    except Exception as error:  # truncated/corrupt data surfaces as OSError, SyntaxError, ValueError...
        raise DataError(f"{where or 'image payload'}: cannot decode the image ({error})") from None
    return rgb
