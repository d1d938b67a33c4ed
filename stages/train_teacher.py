"""`pipeline train-teacher`: train a face recogniser with a margin loss only (the demo teacher, or the
no-KD baseline student with `--arch mbf`)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from pipeline.formats import open_face_source
from pipeline.models import BackboneShape
from pipeline.training import TrainConfig, train
from stages import options

Data = Annotated[Path, typer.Option("--data", help="Training folder: train.rec/.idx/property (or an image folder).")]


def run_config(cfg: TrainConfig, shape: BackboneShape, out: Path, source) -> TrainConfig:
    """`cfg` completed with the run folder and the backbone's shape (input size: the data's by default)."""
    return replace(cfg, out_dir=out, arch_kwargs=shape.arch_kwargs(source.image_size, where=source))


def print_summary(out: Path, summary: dict) -> None:
    """Say how training ended and what it wrote."""
    last = summary["history"][-1] if summary["history"] else {}
    state = "finished" if summary["finished"] else f"stopped after epoch {summary['epochs_done']}"
    print(f"training {state}: loss {last.get('loss', float('nan')):.4f}, {last.get('images_per_s', 0):.0f} img/s")
    if summary["finished"]:
        print(f"wrote {out / 'model.pt'}")
    print(f"wrote {out / 'checkpoint.pt'} (resume point)")


def train_teacher(
    data: Data,
    out: Annotated[Path, typer.Option("--out", help="Run folder: model.pt, checkpoint.pt, dvclive/.")],
    train_cfg: TrainConfig,
    shape: BackboneShape,
):
    """Train a backbone with ArcFace/CosFace on a training folder (use torchrun for several GPUs)."""
    source = open_face_source(data)
    summary = train(run_config(train_cfg, shape, out, source), source, source.num_classes)
    print_summary(out, summary)


COMMANDS = {"train-teacher": options.command(train_teacher, train_cfg=TrainConfig, shape=BackboneShape)}
