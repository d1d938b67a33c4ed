"""`pipeline export`: the deployable student as ONNX, checked against torch before it is kept."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.errors import PipelineError
from pipeline.storage.io import atomic_path
from pipeline.models.loading import export_onnx, load_embedder
from pipeline.models.model_file import load_model
from pipeline.models.finite import check_finite_weights
from pipeline.models.onnx_metadata import model_metadata
from pipeline.models.parity import check_tolerance, relative_difference


def command(
    model: Annotated[Path, typer.Option("--model", help="A run's model.pt (train-teacher / train-student).")],
    onnx: Annotated[Path, typer.Option("--onnx", help="Where to write the ONNX model.")],
    tolerance: Annotated[float, typer.Option("--tolerance", help="Largest allowed relative embedding difference "
                                             "|torch - onnxruntime| / |torch| (L2, per embedding).")] = 1e-4,
):
    """Export a trained model to ONNX (NCHW RGB, (x-127.5)/127.5, raw embeddings) and verify it.

    The file's metadata_props record that preprocessing (colour order, normalisation, input size, the optional
    flip-sum, the output), since runtimes see only the graph."""
    check_tolerance("--tolerance", tolerance)
    net, meta = load_model(model)
    check_finite_weights(net, model)
    size = int(meta["arch_kwargs"].get("input_size", 112))
    with atomic_path(onnx, suffix=".onnx") as tmp:  # removed whatever fails: export, onnxruntime, parity
        export_onnx(net, tmp, size, metadata=model_metadata(net, meta["arch"], size))
        difference = relative_difference(net, load_embedder(tmp), size, onnx)
        if difference > tolerance:
            raise PipelineError(f"{onnx}: onnxruntime differs from torch by {difference:.2e} (relative) > "
                                f"{tolerance:.0e}; not written")
    print(f"wrote {onnx} ({meta['arch']}, input {size}x{size}); "
          f"max |torch - onnxruntime| / |torch| = {difference:.2e}")


COMMANDS = {"export": command}
