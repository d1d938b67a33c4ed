"""The `pipeline` command: one sub-command per stage.

Each module in `stages/` exposes `COMMANDS = {"name": typer_function}`; this file only registers them and
turns `PipelineError` into a one-line message with a non-zero exit code.
"""
from __future__ import annotations

import functools
import importlib
import sys

import typer

from pipeline.errors import PipelineError

STAGE_MODULES = (
    "stages.inspect_data",
    "stages.synthesize",
    "stages.train_teacher",
    "stages.extract_teacher",
    "stages.build_pools",
    "stages.train_student",
    "stages.evaluate",
    "stages.evaluate_ijb",
    "stages.report",
    "stages.export",
)

app = typer.Typer(
    name="pipeline",
    help=(
        "Evaluation-oriented knowledge distillation (EKD) for face recognition, offline: the teacher runs "
        "once into an HDF5 cache (extract-teacher), FAISS builds pair pools and exact FPR thresholds "
        "(build-pools), students train on the cached targets (train-student), evaluate/report compare them."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _one_line_errors(function):
    """Print a PipelineError as one line on stderr and exit 2 instead of a traceback."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except PipelineError as error:
            print(f"error: {error}", file=sys.stderr)
            raise typer.Exit(code=2) from None

    return wrapper


def _register_stage_commands() -> None:
    for module_name in STAGE_MODULES:
        module = importlib.import_module(module_name)
        for name, function in module.COMMANDS.items():
            app.command(name=name)(_one_line_errors(function))


_register_stage_commands()
