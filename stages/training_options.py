"""Command-line options shared by `train-teacher` and `train-student` (declared once, used by both)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.errors import PipelineError
from pipeline.training import TrainConfig

Data = Annotated[Path, typer.Option("--data", help="Training folder: train.rec/.idx/property (or an image folder).")]
Arch = Annotated[str, typer.Option("--arch", help="Backbone: r18 r34 r50 r100 r200 (iresnet) or mbf (MobileFaceNet).")]
InputSize = Annotated[Optional[int], typer.Option("--input-size", help="Input size (multiple of 16); default: the data's image size.")]
Width = Annotated[float, typer.Option("--width", help="Channel multiplier (1.0 = arcface_torch's model).")]
EmbeddingSize = Annotated[int, typer.Option("--embedding-size", help="Embedding dimension.")]
Epochs = Annotated[int, typer.Option("--epochs", help="Epochs over the training set.")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Images per step per process.")]
LR = Annotated[float, typer.Option("--lr", help="Base learning rate (SGD).")]
Momentum = Annotated[float, typer.Option("--momentum", help="SGD momentum.")]
WeightDecay = Annotated[float, typer.Option("--weight-decay", help="Weight decay (not applied to BatchNorm).")]
Warmup = Annotated[float, typer.Option("--warmup-epochs", help="Linear LR warmup, in epochs.")]
Schedule = Annotated[str, typer.Option("--lr-schedule", help="poly (arcface_torch), step or cosine.")]
Milestones = Annotated[str, typer.Option("--lr-milestones", help="Comma-separated epochs where the step schedule decays x0.1.")]
Margin = Annotated[str, typer.Option("--margin", help="Margin head: arcface or cosface.")]
MarginS = Annotated[float, typer.Option("--margin-s", help="Logit scale s.")]
MarginM = Annotated[Optional[float], typer.Option("--margin-m", help="Margin m (default 0.5 ArcFace, 0.4 CosFace).")]
SampleRate = Annotated[float, typer.Option("--sample-rate", help="Partial-FC class sampling rate (1.0 = full softmax).")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed (runs are deterministic on CPU).")]
Workers = Annotated[int, typer.Option("--workers", help="DataLoader worker processes decoding images.")]
Preload = Annotated[bool, typer.Option("--preload/--no-preload", help="Decode the whole training set into RAM first (small sets).")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
Amp = Annotated[bool, typer.Option("--amp/--no-amp", help="fp16 autocast on CUDA (ignored on CPU).")]
Resume = Annotated[bool, typer.Option("--resume/--no-resume", help="Continue from OUT/checkpoint.pt when present.")]
StopAfter = Annotated[Optional[int], typer.Option("--stop-after-epochs", help="Stop after this many epochs of the schedule (resume later).")]


def parse_milestones(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise PipelineError(f"--lr-milestones: expected comma-separated epochs, got {text!r}") from None


def make_config(out: Path, source, arch: str, input_size: int | None, width: float, embedding_size: int, **knobs) -> TrainConfig:
    """A TrainConfig from the shared options; the input size defaults to the data's image size."""
    size = input_size or (source.image_size[0] if source.image_size else 112)
    if size % 16:
        raise PipelineError(f"--input-size {size}: must be a multiple of 16 (the backbones downsample 16x)")
    if source.image_size and tuple(source.image_size) != (size, size):
        raise PipelineError(f"{source}: images are {source.image_size}, but --input-size is {size}")
    arch_kwargs = {"input_size": size, "width": width, "num_features": embedding_size}
    knobs["lr_milestones"] = parse_milestones(knobs.get("lr_milestones", ""))
    return TrainConfig(out_dir=out, arch=arch, arch_kwargs=arch_kwargs, **knobs)


def print_summary(out: Path, summary: dict) -> None:
    """Say how training ended and what it wrote."""
    last = summary["history"][-1] if summary["history"] else {}
    state = "finished" if summary["finished"] else f"stopped after epoch {summary['epochs_done']}"
    print(f"training {state}: loss {last.get('loss', float('nan')):.4f}, {last.get('images_per_s', 0):.0f} img/s")
    if summary["finished"]:
        print(f"wrote {out / 'model.pt'}")
    print(f"wrote {out / 'checkpoint.pt'} (resume point)")
