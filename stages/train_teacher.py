"""`pipeline train-teacher`: train a face recogniser with a margin loss only (the demo teacher, or the
no-KD baseline student with `--arch mbf`)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pipeline.formats import open_face_source
from pipeline.training import train
from stages import training_options as opt


def command(
    data: opt.Data,
    out: Annotated[Path, typer.Option("--out", help="Run folder: model.pt, checkpoint.pt, dvclive/.")],
    arch: opt.Arch = "r50",
    input_size: opt.InputSize = None,
    width: opt.Width = 1.0,
    embedding_size: opt.EmbeddingSize = 512,
    epochs: opt.Epochs = 20,
    batch_size: opt.BatchSize = 128,
    lr: opt.LR = 0.1,
    momentum: opt.Momentum = 0.9,
    weight_decay: opt.WeightDecay = 5e-4,
    warmup_epochs: opt.Warmup = 0.0,
    lr_schedule: opt.Schedule = "poly",
    lr_milestones: opt.Milestones = "",
    margin: opt.Margin = "arcface",
    margin_s: opt.MarginS = 64.0,
    margin_m: opt.MarginM = None,
    sample_rate: opt.SampleRate = 1.0,
    seed: opt.Seed = 0,
    workers: opt.Workers = 2,
    preload: opt.Preload = False,
    device: opt.Device = "auto",
    amp: opt.Amp = True,
    resume: opt.Resume = True,
    stop_after_epochs: opt.StopAfter = None,
):
    """Train a backbone with ArcFace/CosFace on a training folder (use torchrun for several GPUs)."""
    source = open_face_source(data)
    knobs = {k: v for k, v in locals().items() if k not in ("data", "out", "arch", "input_size", "width", "embedding_size", "source")}
    cfg = opt.make_config(out, source, arch, input_size, width, embedding_size, **knobs)
    summary = train(cfg, source, source.num_classes)
    opt.print_summary(out, summary)


COMMANDS = {"train-teacher": command}
