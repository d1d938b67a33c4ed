"""The `pipeline` command: one sub-command per stage.

Each module in `stages/` exposes `COMMANDS = {"name": typer_function}`; this file only registers them (those of
the invoked command's module alone, see STAGE_COMMANDS) and turns every error a user can act on into one line on stderr and exit code 2: a `PipelineError`, an OSError
naming a file (a full disk, a permission), and (through `main`, the console script) the usage errors of the
command line itself (an unknown option, a value of the wrong type). Ctrl-C is one line and exit code 130 at
any point, so this module imports nothing heavy at its top: the console script imports it unguarded, and the
app (typer, torch through the stages) is built inside `main`'s guard, or on first use of `pipeline.cli.app`.
"""
from __future__ import annotations

import copy
import functools
import importlib
import inspect
import pathlib
import sys
import typing
from typing import Annotated

from pipeline.errors import PipelineError

# Command -> the stage module defining it. `main` imports only the invoked command's module, so what a command
# runs is this file plus that module's imports: tests/helpers/stage_deps.py reads this literal table to derive
# each DVC stage's code deps. Keep it a literal dict; its order is the order of `pipeline --help`.
STAGE_COMMANDS = {
    "inspect": "stages.inspect_data",
    "synthesize": "stages.synthesize",
    "train-teacher": "stages.train_teacher",
    "extract-teacher": "stages.extract_teacher",
    "cache-info": "stages.extract_teacher",
    "convert-cache": "stages.extract_teacher",
    "build-pools": "stages.build_pools",
    "train-student": "stages.train_student",
    "evaluate": "stages.evaluate",
    "evaluate-ijb": "stages.evaluate_ijb",
    "report": "stages.report",
    "export": "stages.export",
}

HELP = ("Evaluation-oriented knowledge distillation (EKD) for face recognition, offline: the teacher runs once "
        "into an HDF5 cache (extract-teacher), exact search builds pair pools and FPR thresholds (build-pools), "
        "students train on the cached targets (train-student), evaluate/report compare them.")
INTERRUPTED = 130  # the shell's code for a process ended by SIGINT


@functools.cache
def __getattr__(name: str):
    """`pipeline.cli.app` (tests, embedding): the app with every command, built on first use."""
    if name == "app":
        return build_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_app(commands=tuple(STAGE_COMMANDS)):
    """The `pipeline` app with `commands` (default: all), importing only the stage modules that define them."""
    import typer

    app = typer.Typer(name="pipeline", help=HELP, no_args_is_help=True, add_completion=False,
                      pretty_exceptions_enable=False)
    app.callback()(lambda: None)  # a group even with one command: `pipeline NAME ...` keeps its NAME
    for module_name in dict.fromkeys(STAGE_COMMANDS[name] for name in commands):
        for name, function in importlib.import_module(module_name).COMMANDS.items():
            app.command(name=name)(refuse_empty_paths(_one_line_errors(function)))
    return app


def _invoked(args: list[str]) -> tuple[str, ...]:
    """The commands to register for `args`: the invoked one, or all (for `--help`, no command, a typo)."""
    name = next((a for a in args if not a.startswith("-")), None)
    return (name,) if name in STAGE_COMMANDS else tuple(STAGE_COMMANDS)


# Path options given as '' (on the command line or through --params) would silently mean '.': every path
# option of every command is parsed by this, added where the commands are registered.
def _nonempty_path(text: str):
    """An option's path; '' would silently mean the current folder."""
    import typer

    if not str(text).strip():
        raise typer.BadParameter("an empty path names no file or folder")
    return pathlib.Path(text)


def refuse_empty_paths(function):
    """`function` (a command) with every path option parsed by `_nonempty_path`: given as '' (on the
    command line or in --params), it is refused instead of meaning '.'."""
    signature = inspect.signature(function, eval_str=True)
    parameters = []
    for parameter in signature.parameters.values():
        args = typing.get_args(parameter.annotation)
        if typing.get_origin(parameter.annotation) is Annotated and _holds_path(args[0]):
            infos = [_with_parser(a) for a in args[1:]]
            parameter = parameter.replace(annotation=Annotated[(args[0], *infos)])
        parameters.append(parameter)
    function.__signature__ = signature.replace(parameters=parameters)
    function.__annotations__ = {p.name: p.annotation for p in parameters}
    return function


def _holds_path(annotation) -> bool:
    return annotation is pathlib.Path or any(_holds_path(a) for a in typing.get_args(annotation))


def _with_parser(info):
    import typer

    if not isinstance(info, typer.models.OptionInfo) or getattr(info, "parser", None) is not None:
        return info
    info = copy.copy(info)
    info.parser = _nonempty_path
    return info


def os_error_line(error: OSError) -> str | None:
    """One line for an OSError about a file (None for others: those are bugs and keep their traceback)."""
    from pipeline.storage.io import disk_full_error, is_disk_full

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
        import typer

        try:
            return function(*args, **kwargs)
        except PipelineError as error:
            message = str(error)
        except OSError as error:
            message = os_error_line(error)
            if message is None:
                raise
        print(f"error: {' '.join(message.split())}", file=sys.stderr)
        raise typer.Exit(code=2) from None

    return wrapper


def _interrupted() -> None:
    print("interrupted", file=sys.stderr)
    sys.exit(INTERRUPTED)


def main(args: list[str] | None = None) -> None:
    """The `pipeline` console script (and `python -m pipeline`): the app, with click's usage errors (an unknown
    option, a missing one, 'abc' for a number, a bad --params section) as one line and exit code 2 too, and
    Ctrl-C (also while the modules import) as one line and exit code 130."""
    try:
        _run(args)
    except KeyboardInterrupt:
        _interrupted()


def _run(args: list[str] | None) -> None:
    import typer

    args = sys.argv[1:] if args is None else list(args)
    app = build_app(_invoked(args))
    # The click that typer runs on (typer >= 0.2x vendors its own): its usage errors are what is caught here.
    click_errors = sys.modules[typer.BadParameter.__module__]
    # end of input at a prompt: (typer's or click's own) Abort
    aborts = tuple({typer.Abort, getattr(click_errors, "Abort", typer.Abort)})
    try:
        code = app(args=args, prog_name="pipeline", standalone_mode=False)
    except click_errors.UsageError as error:
        if type(error).__name__ == "NoArgsIsHelpError":  # `pipeline` or a command alone: its help
            print(error.format_message(), file=sys.stderr)
            sys.exit(2)
        where = error.ctx.command_path if error.ctx is not None else "pipeline"
        message = " ".join(error.format_message().split())
        print(f"error: {where}: {message} (see `{where} --help`)", file=sys.stderr)
        sys.exit(2)
    except click_errors.ClickException as error:
        print(f"error: {' '.join(error.format_message().split())}", file=sys.stderr)
        sys.exit(error.exit_code)
    except aborts:
        print("aborted", file=sys.stderr)
        sys.exit(1)
    if code == INTERRUPTED:  # typer turns Ctrl-C inside a command into a silent Exit(130)
        _interrupted()
    sys.exit(code if isinstance(code, int) else 0)
