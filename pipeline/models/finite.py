"""NaN/inf weights refused before a model is used: a diverged run's model gives NaN embeddings, and the
metrics or export made from them would look like a result (NaN compares as "no difference")."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.errors import DataError


def _refuse(source: str | Path, key: str):
    raise DataError(f"{source}: {key} holds NaN/inf values (a diverged run?); refusing to use it")


def check_finite_weights(model: nn.Module, source: str | Path) -> None:
    """Refuse a model with NaN/inf in a weight or buffer, naming the first such key."""
    for key, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            _refuse(source, key)


def check_finite_embedder(embedder) -> None:
    """The same for a `models.loading.Embedder` of any kind: its torch module, or an ONNX file's initializers."""
    if embedder.module is not None:
        check_finite_weights(embedder.module, embedder.path)
    elif embedder.kind == "onnx":
        try:
            import onnx
            from onnx import numpy_helper
        except ImportError:  # onnxruntime runs without it; its NaN outputs are then refused by the metrics
            return
        for tensor in onnx.load(str(embedder.path), load_external_data=False).graph.initializer:
            values = numpy_helper.to_array(tensor)
            if values.dtype.kind in "fc" and not np.isfinite(values).all():
                _refuse(embedder.path, tensor.name)
