"""`pipeline train-teacher`: train a face recogniser with a margin loss only (the demo teacher, or the
no-KD baseline student with `--arch mbf`)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from pipeline.formats.source import open_face_source
from pipeline.models import BackboneShape
from pipeline.training.config import TrainConfig
from pipeline.training.loop import train
from stages import options

Data = Annotated[Path, typer.Option("--data", help="Training folder: train.rec/.idx/property (or an image folder).")]


def run_config(cfg: TrainConfig, shape: BackboneShape, out: Path, source) -> TrainConfig:
    """`cfg` completed with the run folder and the backbone's shape (input size: the data's by default)."""
    return replace(cfg, out_dir=out, arch_kwargs=shape.arch_kwargs(source.image_size, where=source))


def print_summary(out: Path, summary: dict) -> None:
    """Say how training ended and what it wrote (or that an earlier run had already finished it)."""
    if summary.get("already_finished"):
        print(f"training already finished: {out / 'model.pt'} was trained with these settings "
              f"({summary['epochs_done']} epochs); nothing to do (--no-resume trains it again)")
        return
    state = "finished" if summary["finished"] else f"stopped after epoch {summary['epochs_done']}"
    if summary["history"]:
        last = summary["history"][-1]
        print(f"training {state}: loss {last['loss']:.4f}, {last['images_per_s']:.0f} img/s")
    else:
        print(f"training {state}: every epoch was done by an earlier run")
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
