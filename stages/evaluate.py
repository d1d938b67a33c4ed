"""`pipeline evaluate`: embed a data folder's verification sets and test set with a model; write
`metrics.json` and `roc.csv` into a run folder."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.machine.devices import resolve_device
from pipeline.evaluation.verification import (
    DEFAULT_FPRS,
    EvalConfig,
    evaluate_folder,
    write_metrics,
)
from pipeline.models.finite import check_finite_embedder
from pipeline.models.loading import load_embedder
from stages import options


def format_table(metrics: dict) -> str:
    """One line per evaluated set with its scalar metrics."""
    lines = []
    for name, values in metrics.items():
        if name == "roc":
            continue
        cells = [f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}" for key, value in values.items()]
        lines.append(f"{name:>12}  " + "  ".join(cells))
    return "\n".join(lines)


def evaluate(
    model: Annotated[Path, typer.Option(
        "--model", help="Model file: this project's model.pt, an arcface_torch .pt, TorchScript or ONNX.")],
    data: Annotated[Path, typer.Option("--data", help="Data folder holding *.bin verification sets and/or test.rec/.idx.")],
    out: Annotated[Path, typer.Option("--out", help="Run directory for metrics.json and roc.csv.")],
    cfg: EvalConfig,
) -> None:
    """Evaluate a model on every *.bin and the test.rec of a data folder."""
    size = {} if cfg.input_size is None else {"input_size": cfg.input_size}
    embedder = load_embedder(model, arch=cfg.arch, device=resolve_device(cfg.device), **size)
    check_finite_embedder(embedder)  # NaN weights give NaN metrics that look like a result
    metrics = evaluate_folder(embedder, data, fprs=DEFAULT_FPRS, batch_size=cfg.batch_size, flip=cfg.flip,
                              method=cfg.tpr_method)
    metrics["model"] = embedder.describe()
    written = write_metrics(metrics, out)
    typer.echo(format_table(metrics))
    for path in written:
        typer.echo(f"wrote {path}")


COMMANDS = {"evaluate": options.command(evaluate, cfg=EvalConfig)}
