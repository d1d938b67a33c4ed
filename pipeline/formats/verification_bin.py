"""insightface verification sets (`lfw.bin`, `cfp_fp.bin`, ...): a pickle of `(bins, issame_list)`.

`bins` holds 2N encoded images (byte strings, or uint8 arrays of the encoded bytes), pair k being images
2k and 2k+1; `issame_list` holds N booleans. Many files were written by Python 2, whose byte strings only
load with `encoding="bytes"`. Loading never runs arbitrary pickle code: a restricted unpickler resolves
only the few globals these files need (numpy array/scalar reconstruction, bytes via `_codecs.encode`) and
refuses everything else with a DataError naming the file and the global.
"""
from __future__ import annotations

import codecs
import importlib
import os
import pickle
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.errors import DataError
from pipeline.formats.jpeg import decode_image, encode_jpeg
from pipeline.storage.io import atomic_path


def _numpy_attribute(modules: Sequence[str], name: str):
    for module in modules:  # numpy 2 moved numpy.core to numpy._core; import the new one first (no warning)
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"numpy has no {name} in {modules}")


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """What Python 3 pickles (protocol < 3) call to rebuild bytes; any codec other than latin-1 is refused."""
    if codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"_codecs.encode with codec {encoding!r} is not allowed")
    return codecs.encode(text, "latin1")


def _allowed_globals() -> dict[tuple[str, str], object]:
    multiarray = ("numpy._core.multiarray", "numpy.core.multiarray")
    numeric = ("numpy._core.numeric", "numpy.core.numeric")
    found = {
        "_reconstruct": _numpy_attribute(multiarray, "_reconstruct"),
        "scalar": _numpy_attribute(multiarray, "scalar"),
        "_frombuffer": _numpy_attribute(numeric, "_frombuffer"),
    }
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
        ("builtins", "bytearray"): bytearray,
        ("__builtin__", "bytearray"): bytearray,
    }
    for name, module_names in (("_reconstruct", multiarray), ("scalar", multiarray), ("_frombuffer", numeric)):
        for module in module_names:
            allowed[(module, name)] = found[name]
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only allow-listed globals; anything else raises DataError."""

    def __init__(self, file, source: str, **kwargs):
        super().__init__(file, **kwargs)
        self._source = source
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise DataError(
                f"{self._source}: refusing pickle global {module}.{name} (a verification .bin may only hold "
                "images and booleans)"
            ) from None

    def persistent_load(self, pid):
        raise DataError(f"{self._source}: refusing a pickle persistent id")


def load_verification_bin(path: str | os.PathLike, decode: bool = False) -> tuple[list, np.ndarray]:
    """Load a .bin: (images, issame bool (N,)), pair k = images 2k and 2k+1.

    Images are the encoded bytes as stored (uint8 arrays of encoded bytes become bytes; already-decoded
    uint8 (H, W, 3) arrays stay arrays), which keeps a 12,000-image set near its file size; with
    `decode=True` every image is decoded to uint8 RGB (H, W, 3) now."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            content = RestrictedUnpickler(handle, str(path), encoding="bytes").load()
    except DataError:
        raise
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error.strerror or error})") from None
    except Exception as error:  # the pickle module raises many types on damaged input
        raise DataError(f"{path}: not a verification pickle ({type(error).__name__}: {error})") from None
    bins, issame = _split_content(path, content)
    images = [_image_entry(path, index, entry) for index, entry in enumerate(bins)]
    if decode:
        images = [
            image if isinstance(image, np.ndarray) else decode_image(image, where=f"{path} image {index}")
            for index, image in enumerate(images)
        ]
    return images, issame


def _split_content(path: Path, content) -> tuple[Sequence, np.ndarray]:
    if not isinstance(content, (tuple, list)) or len(content) != 2:
        raise DataError(f"{path}: expected a pickled (bins, issame_list) pair, got {type(content).__name__}")
    bins, issame = content
    if not isinstance(bins, (list, tuple)) and not (isinstance(bins, np.ndarray) and bins.ndim >= 1):
        raise DataError(f"{path}: bins is a {type(bins).__name__}, expected a list of images")
    flags = []
    for index, value in enumerate(list(issame) if isinstance(issame, (list, tuple, np.ndarray)) else [None]):
        if isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer)) and value in (0, 1)):
            flags.append(bool(value))
        else:
            raise DataError(f"{path}: issame_list entry {index} is {value!r}, expected a boolean")
    if len(bins) != 2 * len(flags):
        raise DataError(f"{path}: {len(bins)} images for {len(flags)} pairs (expected {2 * len(flags)})")
    return bins, np.asarray(flags, dtype=bool)


def _image_entry(path: Path, index: int, entry) -> bytes | np.ndarray:
    if isinstance(entry, (bytes, bytearray)):
        return bytes(entry)
    if isinstance(entry, np.ndarray) and entry.dtype == np.uint8:
        if entry.ndim == 1:
            return entry.tobytes()  # encoded bytes kept as an array, as mx.image.imdecode accepts
        if entry.ndim == 3 and entry.shape[2] == 3:
            return entry
    description = f"{type(entry).__name__} {getattr(entry, 'dtype', '')} {getattr(entry, 'shape', '')}".strip()
    raise DataError(f"{path}: image {index} is a {description}, expected encoded image bytes")


def write_verification_bin(
    path: str | os.PathLike, images: Sequence[bytes | np.ndarray], issame: Sequence[bool]
) -> None:
    """Write `(bins, issame_list)` as insightface does: encoded images (uint8 RGB arrays are JPEG-encoded
    at quality 95) and a list of Python bools, pickled with protocol 4, atomically."""
    path = Path(path)
    issame_list = [bool(value) for value in issame]
    if len(images) != 2 * len(issame_list):
        raise ValueError(f"{len(images)} images for {len(issame_list)} pairs (expected {2 * len(issame_list)})")
    bins = [bytes(image) if isinstance(image, (bytes, bytearray)) else encode_jpeg(image) for image in images]
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        pickle.dump((bins, issame_list), handle, protocol=4)
