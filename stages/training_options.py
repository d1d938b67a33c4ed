"""Command-line options shared by `train-teacher` and `train-student` (declared once, used by both)."""
from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from pipeline.errors import PipelineError
from pipeline.training.loop import TrainConfig

Data = Annotated[Path, typer.Option("--data", help="Training folder: train.rec/.idx/property (or an image folder).")]
# (name, annotation, default): the options every training command has, in --help order. Commands take
# them through `with_training_options`, so a new knob is added here once.
TRAINING_OPTIONS = (
    ("arch", Annotated[str, typer.Option("--arch", help="Backbone: r18 r34 r50 r100 r200 (iresnet) or mbf (MobileFaceNet).")], "r50"),
    ("input_size", Annotated[Optional[int], typer.Option("--input-size", help="Input size (multiple of 16); default: the data's image size.")], None),
    ("width", Annotated[float, typer.Option("--width", help="Channel multiplier (1.0 = arcface_torch's model).")], 1.0),
    ("embedding_size", Annotated[int, typer.Option("--embedding-size", help="Embedding dimension.")], 512),
    ("epochs", Annotated[int, typer.Option("--epochs", help="Epochs over the training set.")], 20),
    ("batch_size", Annotated[int, typer.Option("--batch-size", help="Images per step per process.")], 128),
    ("lr", Annotated[float, typer.Option("--lr", help="Base learning rate (SGD).")], 0.1),
    ("momentum", Annotated[float, typer.Option("--momentum", help="SGD momentum.")], 0.9),
    ("weight_decay", Annotated[float, typer.Option("--weight-decay", help="Weight decay (not applied to BatchNorm).")], 5e-4),
    ("warmup_epochs", Annotated[float, typer.Option("--warmup-epochs", help="Linear LR warmup, in epochs.")], 0.0),
    ("lr_schedule", Annotated[str, typer.Option("--lr-schedule", help="poly (arcface_torch), step or cosine.")], "poly"),
    ("lr_milestones", Annotated[str, typer.Option("--lr-milestones", help="Comma-separated epochs where the step schedule decays x0.1.")], ""),
    ("margin", Annotated[str, typer.Option("--margin", help="Margin head: arcface or cosface.")], "arcface"),
    ("margin_s", Annotated[float, typer.Option("--margin-s", help="Logit scale s.")], 64.0),
    ("margin_m", Annotated[Optional[float], typer.Option("--margin-m", help="Margin m (default 0.5 ArcFace, 0.4 CosFace).")], None),
    ("sample_rate", Annotated[float, typer.Option("--sample-rate", help="Partial-FC class sampling rate (1.0 = full softmax).")], 1.0),
    ("seed", Annotated[int, typer.Option("--seed", help="Random seed (runs are deterministic on CPU).")], 0),
    ("workers", Annotated[int, typer.Option("--workers", help="DataLoader worker processes decoding images.")], 2),
    ("preload", Annotated[bool, typer.Option("--preload/--no-preload", help="Decode the whole training set into RAM first (small sets).")], False),
    ("device", Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")], "auto"),
    ("amp", Annotated[bool, typer.Option("--amp/--no-amp", help="fp16 autocast on CUDA (ignored on CPU).")], True),
    ("resume", Annotated[bool, typer.Option("--resume/--no-resume", help="Continue from OUT/checkpoint.pt when present.")], True),
    ("stop_after_epochs", Annotated[Optional[int], typer.Option("--stop-after-epochs", help="Stop after this many epochs of the schedule (resume later).")], None),
)
MODEL_OPTIONS = ("arch", "input_size", "width", "embedding_size")  # the rest are TrainConfig fields


def with_training_options(function: Callable, **defaults) -> Callable:
    """A Typer command: `function`'s own parameters followed by TRAINING_OPTIONS (with `defaults` changed).

    `function(**kwargs)` receives every option by name; Typer reads the combined `__signature__`."""
    own = inspect.signature(function, eval_str=True).parameters.values()
    shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                default=defaults.get(name, default))
              for name, annotation, default in TRAINING_OPTIONS]
    signature = inspect.Signature([p for p in own if p.kind is not p.VAR_KEYWORD] + shared)

    @functools.wraps(function)
    def command(**kwargs):
        return function(**kwargs)

    command.__signature__ = signature
    command.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
    return command


def parse_milestones(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise PipelineError(f"--lr-milestones: expected comma-separated epochs, got {text!r}") from None


def make_config(out: Path, source, options: dict) -> TrainConfig:
    """A TrainConfig from the shared options (other keys ignored); the input size defaults to the data's."""
    arch, input_size, width, embedding_size = (options[k] for k in MODEL_OPTIONS)
    knobs = {name: options[name] for name, _, _ in TRAINING_OPTIONS if name not in MODEL_OPTIONS}
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
