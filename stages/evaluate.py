"""`pipeline evaluate`: embed a data folder's verification sets and test set with a model (or an ensemble of
models, `--model` repeated: scored by the weighted mean of their cosines, models/ensemble.py); write
`metrics.json` and `roc.csv` into a run folder."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.machine.devices import resolve_device
from pipeline.evaluation.verification import (
    DEFAULT_FPRS,
    EvalConfig,
    evaluate_folder,
    write_metrics,
)
from pipeline.weights import parse_weights
from pipeline.models.loading import load_ensemble
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
    model: Annotated[list[Path], typer.Option(
        "--model", help="Model file: this project's model.pt, an arcface_torch .pt, TorchScript or ONNX. "
                        "Repeat it to score several models as one ensemble: a pair's score is the weighted mean "
                        "of the members' cosine similarities (each member with its own flip TTA; members take "
                        "the same input size; --arch and --input-size apply to each).")],
    data: Annotated[Path, typer.Option("--data", help="Data folder holding *.bin verification sets and/or test.rec/.idx.")],
    out: Annotated[Path, typer.Option("--out", help="Run directory for metrics.json and roc.csv.")],
    cfg: EvalConfig,
    model_weights: Annotated[Optional[str], typer.Option(
        "--model-weights", help="Ensemble member weights, one per --model, e.g. 1,2 (finite, > 0; default "
                                "equal).")] = None,
) -> None:
    """Evaluate a model (or an ensemble: --model repeated) on every *.bin and the test.rec of a data folder."""
    size = {} if cfg.input_size is None else {"input_size": cfg.input_size}
    models = [model] if isinstance(model, (str, Path)) else list(model)  # a call from Python may give one path
    weights = parse_weights(model_weights, len(models), "--model-weights", "--model")
    embedder = load_ensemble(models, weights, arch=cfg.arch, device=resolve_device(cfg.device), **size)
    metrics = evaluate_folder(embedder, data, fprs=DEFAULT_FPRS, batch_size=cfg.batch_size, flip=cfg.flip,
                              method=cfg.tpr_method)
    metrics["model"] = embedder.describe()
    written = write_metrics(metrics, out)
    typer.echo(format_table(metrics))
    for path in written:
        typer.echo(f"wrote {path}")


COMMANDS = {"evaluate": options.command(evaluate, cfg=EvalConfig)}
