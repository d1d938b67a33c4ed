"""`pipeline train-teacher`: train a face recogniser with a margin loss only (the demo teacher, or the
no-KD baseline student with `--arch mbf`)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.formats import open_face_source
from pipeline.training.loop import train
from stages import training_options as opt


def train_teacher(
    data: opt.Data,
    out: Annotated[Path, typer.Option("--out", help="Run folder: model.pt, checkpoint.pt, dvclive/.")],
    **options,
):
    """Train a backbone with ArcFace/CosFace on a training folder (use torchrun for several GPUs)."""
    source = open_face_source(data)
    cfg = opt.make_config(out, source, options)
    summary = train(cfg, source, source.num_classes)
    opt.print_summary(out, summary)


COMMANDS = {"train-teacher": opt.with_training_options(train_teacher)}
