"""`pipeline export`: the deployable student as ONNX, checked against torch before it is kept."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import typer

from pipeline.errors import PipelineError
from pipeline.io import atomic_path
from pipeline.models.loading import export_onnx, load_embedder
from pipeline.models.model_file import load_model


def command(
    model: Annotated[Path, typer.Option("--model", help="A run's model.pt (train-teacher / train-student).")],
    onnx: Annotated[Path, typer.Option("--onnx", help="Where to write the ONNX model.")],
    tolerance: Annotated[float, typer.Option("--tolerance", help="Largest allowed |torch - onnxruntime| embedding difference.")] = 1e-4,
):
    """Export a trained model to ONNX (NCHW RGB, (x-127.5)/127.5, raw embeddings) and verify it."""
    net, meta = load_model(model)
    size = int(meta["arch_kwargs"].get("input_size", 112))
    with atomic_path(onnx, suffix=".onnx") as tmp:  # removed whatever fails: export, onnxruntime, parity
        export_onnx(net, tmp, size)
        difference = max_difference(net, tmp, size)
        if difference > tolerance:
            raise PipelineError(f"{onnx}: onnxruntime differs from torch by {difference:.2e} > {tolerance:.0e}; "
                                "not written")
    print(f"wrote {onnx} ({meta['arch']}, input {size}x{size}); max |torch - onnxruntime| = {difference:.2e}")


def max_difference(net: torch.nn.Module, onnx_path: Path, size: int, batch: int = 4, seed: int = 0) -> float:
    """Largest absolute embedding difference between torch and onnxruntime on random normalised inputs."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, size, size, generator=generator) * 2 - 1
    with torch.no_grad():
        expected = net.eval()(images)
    got = load_embedder(onnx_path)(images)
    return float((expected - got).abs().max())


COMMANDS = {"export": command}
