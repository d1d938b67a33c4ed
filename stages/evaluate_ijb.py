"""`pipeline evaluate-ijb`: IJB-B / IJB-C 1:1 template verification of a model, or of an ensemble of models
(`--model` repeated: a pair's score is the weighted mean of the members' scores), by insightface's eval_ijbc
protocol; writes `<target>.json`, `<target>_scores.npy`, `<target>_roc.csv` and the reusable feature file."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.machine.devices import resolve_device
from pipeline.evaluation.ijb import IjbConfig, evaluate_ijb
from pipeline.evaluation.verification import EvalConfig
from pipeline.weights import parse_weights
from pipeline.models.loading import load_ensemble
from stages import options


def command(
    model: Annotated[list[Path], typer.Option(
        "--model", help="Model file: this project's model.pt, an arcface_torch .pt/.pth, TorchScript or ONNX. "
                        "Repeat it to score several models as one ensemble: a pair's score is the weighted mean "
                        "of the members' cosine similarities (each member with its own flip TTA; members take "
                        "the same input size; --arch and --input-size apply to each).")],
    ijb: Annotated[Path, typer.Option(
        "--ijb", help="The insightface IJB folder of the target: meta/<target>_face_tid_mid.txt, "
                      "meta/<target>_template_pair_label.txt, meta/<target>_name_5pts_score.txt, loose_crop/.")],
    out: Annotated[Path, typer.Option(
        "--out", help="Run directory for <target>.json, <target>_scores.npy, <target>_roc.csv and the feature "
                      "file <target>_features.h5 (reused when model and images are the same).")],
    cfg: EvalConfig,
    ijb_cfg: IjbConfig,
    model_weights: Annotated[Optional[str], typer.Option(
        "--model-weights", help="Ensemble member weights, one per --model, e.g. 1,2 (finite, > 0; default "
                                "equal).")] = None,
) -> None:
    """IJB-B/IJB-C template verification: align, embed (with flips), pool media and templates, score the pairs,
    TPR at FPR 1e-6 .. 1e-1."""
    size = {} if cfg.input_size is None else {"input_size": cfg.input_size}
    models = [model] if isinstance(model, (str, Path)) else list(model)  # a call from Python may give one path
    weights = parse_weights(model_weights, len(models), "--model-weights", "--model")
    embedder = load_ensemble(models, weights, arch=cfg.arch, device=resolve_device(cfg.device), **size)
    metrics, written, reused = evaluate_ijb(embedder, ijb, out, ijb_cfg, batch_size=cfg.batch_size, flip=cfg.flip,
                                            method=cfg.tpr_method)
    if reused:
        typer.echo(f"reused the image features of {written[0]} (same model and images)")
    tprs = "  ".join(f"{key.split('=')[1]} {value:.4f}" for key, value in metrics.items() if key.startswith("tpr@"))
    typer.echo(f"{metrics['target']} {metrics['mode']} ({metrics['tpr_method']}): {metrics['images']} images, "
               f"{metrics['templates']} templates, {metrics['pairs']} pairs ({metrics['positive_pairs']} genuine)")
    typer.echo(f"TPR@FPR  {tprs}")
    for path in written:
        typer.echo(f"wrote {path}")


COMMANDS = {"evaluate-ijb": options.command(command, cfg=EvalConfig, ijb_cfg=IjbConfig)}
