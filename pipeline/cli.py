"""The `pipeline` command: one sub-command per stage.

Each module in `stages/` exposes `COMMANDS = {"name": typer_function}`; this file only registers them and
turns every error a user can act on into one line on stderr and exit code 2: a `PipelineError`, an OSError
naming a file (a full disk, a permission), and (through `main`, the console script) the usage errors of the
command line itself (an unknown option, a value of the wrong type).
"""
from __future__ import annotations

import functools
import importlib
import sys

import typer

from pipeline.errors import PipelineError
from pipeline.io import disk_full_error, is_disk_full

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


def _os_error_line(error: OSError) -> str | None:
    """One line for an OSError about a file (None for others: those are bugs and keep their traceback)."""
    if is_disk_full(error):
        return str(disk_full_error(error.filename))
    if error.filename is not None:
        return f"{error.filename}: {error.strerror or error}"
    return None


def _one_line_errors(function):
    """Print a PipelineError (or an OSError naming a file) as one line on stderr and exit 2 instead of a
    traceback."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except PipelineError as error:
            message = str(error)
        except OSError as error:
            message = _os_error_line(error)
            if message is None:
                raise
        print(f"error: {' '.join(message.split())}", file=sys.stderr)
        raise typer.Exit(code=2) from None

    return wrapper


# The click that typer runs on (typer >= 0.2x vendors its own): its usage errors are what `main` catches.
_click_errors = sys.modules[typer.BadParameter.__module__]
# Ctrl-C while typer/click prompts: typer.Abort (click's own Abort where typer does not vendor click)
_ABORTS = tuple({typer.Abort, getattr(_click_errors, "Abort", typer.Abort)})


def _register_stage_commands() -> None:
    for module_name in STAGE_MODULES:
        module = importlib.import_module(module_name)
        for name, function in module.COMMANDS.items():
            app.command(name=name)(_one_line_errors(function))


_register_stage_commands()


def main(args: list[str] | None = None) -> None:
    """The `pipeline` console script (and `python -m pipeline`): the app, with click's usage errors (an unknown
    option, a missing one, 'abc' for a number, a bad --params section) as one line and exit code 2 too."""
    try:
        code = app(args=args, prog_name="pipeline", standalone_mode=False)
    except _click_errors.UsageError as error:
        if type(error).__name__ == "NoArgsIsHelpError":  # `pipeline` or a command alone: its help
            print(error.format_message(), file=sys.stderr)
            sys.exit(2)
        where = error.ctx.command_path if error.ctx is not None else "pipeline"
        message = " ".join(error.format_message().split())
        print(f"error: {where}: {message} (see `{where} --help`)", file=sys.stderr)
        sys.exit(2)
    except _click_errors.ClickException as error:
        print(f"error: {' '.join(error.format_message().split())}", file=sys.stderr)
        sys.exit(error.exit_code)
    except _ABORTS:
        print("aborted", file=sys.stderr)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
