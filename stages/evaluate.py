"""`pipeline evaluate`: embed a data folder's verification sets and test set with a model; write
`metrics.json` and `roc.csv` into a run folder."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import torch
import typer

from pipeline.errors import PipelineError
from pipeline.evaluation.verification import DEFAULT_FPRS, evaluate_folder, write_metrics
from pipeline.models.loading import load_teacher

Model = Annotated[Path, typer.Option(
    "--model", help="Model file: this project's model.pt, an arcface_torch .pt, TorchScript or ONNX.")]
Data = Annotated[Path, typer.Option("--data", help="Data folder holding *.bin verification sets and/or test.rec/.idx.")]
Out = Annotated[Path, typer.Option("--out", help="Run directory for metrics.json and roc.csv.")]
Arch = Annotated[Optional[str], typer.Option(
    "--arch", help="Backbone of a plain state dict when it cannot be inferred (r18 ... r200, mbf).")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
Flip = Annotated[bool, typer.Option("--flip/--no-flip", help="Add the embedding of the mirrored image (flip TTA).")]
TprMethod = Annotated[str, typer.Option(
    "--tpr-method", help="TPR@FPR read-out: 'nearest' (insightface IJB tables) or 'exact' (best TPR with FPR <= target).")]
InputSize = Annotated[Optional[int], typer.Option(
    "--input-size", help="Input size of a TorchScript/ONNX model that does not declare it (default 112).")]


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when available, else 'cpu'; anything else unchanged."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def format_table(metrics: dict) -> str:
    """One line per evaluated set with its scalar metrics."""
    lines = []
    for name, values in metrics.items():
        if name == "roc":
            continue
        cells = [f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}" for key, value in values.items()]
        lines.append(f"{name:>12}  " + "  ".join(cells))
    return "\n".join(lines)


def command(
    model: Model,
    data: Data,
    out: Out,
    arch: Arch = None,
    batch_size: BatchSize = 64,
    device: Device = "auto",
    flip: Flip = True,
    tpr_method: TprMethod = "nearest",
    input_size: InputSize = None,
) -> None:
    """Evaluate a model on every *.bin and the test.rec of a data folder."""
    if tpr_method not in ("nearest", "exact"):
        raise PipelineError(f"--tpr-method {tpr_method!r}: use 'nearest' or 'exact'")
    size = {} if input_size is None else {"input_size": input_size}
    teacher = load_teacher(model, arch=arch, device=resolve_device(device), **size)
    metrics = evaluate_folder(teacher, data, fprs=DEFAULT_FPRS, batch_size=batch_size, flip=flip, method=tpr_method)
    written = write_metrics(metrics, out)
    typer.echo(format_table(metrics))
    for path in written:
        typer.echo(f"wrote {path}")


COMMANDS = {"evaluate": command}
