"""The preprocessing an exported ONNX model expects, written into the file's metadata_props.

insightface's client and other runtimes see only the graph: the input's colour order, normalisation, size and
whether to add the flipped view are not in it. Every key is a plain string (ONNX metadata is string to string);
`preprocessing` holds them all as one JSON object for programs, the other keys are for people (Netron, onnx).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from pipeline.errors import DataError, PipelineError
from pipeline.models.preprocess import MEAN, STD, preprocessing_attrs

NEEDS_ONNX = "writing ONNX metadata needs the onnx package; install it with `pip install ekd-pipeline[onnx]`"


def preprocessing_metadata(size: int, arch: str, embedding_size: int) -> dict[str, str]:
    """The metadata_props of an exported model whose input is `size` x `size`."""
    attrs = preprocessing_attrs(size)
    scale = 255.0 * STD  # (x/255 - MEAN) / STD = (x - 255 MEAN) / (255 STD) on 0..255 pixels
    described = {
        **attrs,
        "pixel_mean": 255.0 * MEAN,
        "pixel_std": scale,
        "normalisation": f"(x - {255.0 * MEAN:g}) / {scale:g} on 0..255 pixels",
        "alignment": f"ArcFace five-point template scaled to {size}x{size}",
        "flip_sum": "optional: embedding(x) + embedding(horizontal flip of x), as the evaluation does",
        "output": f"raw {embedding_size}-d embedding (not L2-normalised); compare by cosine",
    }
    return {
        "preprocessing": json.dumps(described, sort_keys=True),
        "input_color": attrs["color"],
        "input_layout": attrs["layout"],
        "input_size": f"{size}x{size}",
        "input_normalisation": described["normalisation"],
        "flip_sum": described["flip_sum"],
        "output": described["output"],
        "arch": arch,
        "embedding_size": str(embedding_size),
    }


def model_metadata(model, arch: str, size: int) -> dict[str, str]:
    """preprocessing_metadata for `model`, its embedding size read off one forward pass."""
    was_training = model.training
    try:
        with torch.no_grad():
            dim = model.eval()(torch.zeros(1, 3, size, size, device=next(model.parameters()).device)).shape[1]
    finally:
        model.train(was_training)
    return preprocessing_metadata(size, arch, int(dim))


def write_metadata(path: str | os.PathLike, props: dict[str, str]) -> None:
    """Set `props` as the model's metadata_props (replacing keys of the same name), in place."""
    try:
        import onnx
    except ImportError:
        raise PipelineError(NEEDS_ONNX) from None
    model = onnx.load(str(path))
    kept = [p for p in model.metadata_props if p.key not in props]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, str(value)
    onnx.save(model, str(path))


def read_preprocessing(path: str | os.PathLike) -> dict | None:
    """The `preprocessing` object of a file this project exported; None for a file without one."""
    try:
        import onnx
    except ImportError:
        return None
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    if "preprocessing" not in props:
        return None
    try:
        value = json.loads(props["preprocessing"])
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise DataError(f"{Path(path)}: metadata 'preprocessing' is not a JSON object")
    return value
