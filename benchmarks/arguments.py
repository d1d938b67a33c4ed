"""The arguments of the benchmarks/ scripts, answered as the pipeline's CLI answers its options: a bad value is ONE
line (argparse's usage, then `SCRIPT: error: argument --OPTION: VALUE: why`, exit code 2), never a traceback
later on nor a NaN in the result.

- argparse `type=` functions, each raising `argparse.ArgumentTypeError` (which argparse turns into that line,
  naming the option): `integer(...)` (`positive_int`, `non_negative_int`, `image_side`), `number(...)`
  (`positive_float`), `int_list(...)`, `names(...)` (a comma-separated subset of known names), `existing_file`,
  `folder_with(...)` (`existing_folder`), `processes(...)` / `threads(...)` (bounded by this machine, as the
  pipeline's worker and thread options are), `torch_device`, `architecture(...)`;
- `parse_later`: one of those for an option whose allowed values are known only after parsing (read from a file);
- `load_json` / `load_json_lines`: a file an option names, read after parsing, whose faults are `parser.error`s;
- `run_main(main)`: a script's entry point, with the pipeline's own one-line errors (a `PipelineError`, an OSError
  naming a file, a MemoryError) printed as `SCRIPT: error: MESSAGE` with exit code 2, and Ctrl-C as
  `interrupted` with exit code 130, as `pipeline` does.

Free of torch and of the pipeline's heavy modules, so that a script can check its arguments before it imports
them (`torch_device` and `architecture` import torch when they are called).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

from pipeline.cli import INTERRUPTED, os_error_line
from pipeline.errors import PipelineError
from pipeline.machine.resources import processes_bound, threads_bound


def _bad(text: Any, why: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"{text}: {why}")


def _bounded(value: float, minimum: float | None, maximum: float | None, above: float | None = None) -> None:
    if minimum is not None and value < minimum:
        raise _bad(value, f"must be >= {minimum}")
    if above is not None and value <= above:
        raise _bad(value, f"must be > {above}")
    if maximum is not None and value > maximum:
        raise _bad(value, f"must be <= {maximum}")


def _converted(text: str, convert: Callable[[str], float], what: str) -> float:
    try:
        return convert(text)
    except ValueError:
        raise _bad(repr(text), f"not {what}") from None


def integer(minimum: int | None = None, maximum: int | None = None, multiple: int | None = None
            ) -> Callable[[str], int]:
    """A whole number in [minimum, maximum] (either open when None), a multiple of `multiple` if given."""

    def parse(text: str) -> int:
        value = _converted(text, int, "an integer")
        _bounded(value, minimum, maximum)
        if multiple and value % multiple:
            raise _bad(value, f"must be a multiple of {multiple}")
        return value

    return parse


def number(minimum: float | None = None, maximum: float | None = None, above: float | None = None
           ) -> Callable[[str], float]:
    """A finite number in [minimum, maximum], and > `above` if given."""

    def parse(text: str) -> float:
        value = _converted(text, float, "a number")
        if not math.isfinite(value):
            raise _bad(text, "must be a finite number")
        _bounded(value, minimum, maximum, above)
        return value

    return parse


positive_int = integer(1)
non_negative_int = integer(0)
positive_float = number(above=0)
image_side = integer(16, multiple=16)  # the backbones downsample 16x


def int_list(minimum: int | None = 0, maximum: int | None = None, empty: bool = False) -> Callable[[str], list[int]]:
    """Comma-separated distinct whole numbers, each in [minimum, maximum] ('1,2,3'); `empty`: '' is []."""
    item = integer(minimum, maximum)

    def parse(text: str) -> list[int]:
        parts = [part.strip() for part in text.split(",")]
        if parts == [""]:
            if empty:
                return []
            raise _bad(repr(text), "an empty list")
        values = []
        for part in parts:
            try:
                values.append(item(part))
            except argparse.ArgumentTypeError as error:
                raise (error if len(parts) == 1 else _bad(repr(text), str(error))) from None
        _distinct(text, values)
        return values

    return parse


def _distinct(text: str, values: list) -> None:
    twice = sorted({str(v) for v in values if values.count(v) > 1})
    if twice:
        raise _bad(repr(text), f"{', '.join(twice)} given twice")


def names(known: Iterable[str], empty: bool = False, what: str = "") -> Callable[[str], list[str]]:
    """A comma-separated list of distinct names out of `known` ('a,b'; `what` says where they come from in the
    error); `empty`: '' is []."""
    known = tuple(known)
    choices = f"{what} ({', '.join(known) or 'none'})" if what else ", ".join(known)

    def parse(text: str) -> list[str]:
        values = [part.strip() for part in text.split(",") if part.strip()]
        if not values and not empty:
            raise _bad(repr(text), f"name at least one of {choices}")
        unknown = [v for v in values if v not in known]
        if unknown:
            raise _bad(", ".join(unknown), f"not one of {choices}")
        _distinct(text, values)
        return values

    return parse


def parse_later(parser: argparse.ArgumentParser, option: str, parse: Callable[[str], Any], text: str) -> Any:
    """`parse(text)` for an option whose allowed values are known only after parsing (names read from a file), its
    error a `parser.error` worded as argparse words those of a `type=`."""
    try:
        return parse(text)
    except argparse.ArgumentTypeError as error:
        parser.error(f"argument {option}: {error}")


def _path(text: str) -> Path:
    if not text.strip():
        raise _bad("''", "an empty path")
    return Path(text)


def existing_file(text: str) -> Path:
    """A file that exists (not a folder)."""
    path = _path(text)
    if path.is_dir():
        raise _bad(text, "a folder, not a file")
    if not path.is_file():
        raise _bad(text, "no such file")
    return path


def folder_with(*files: str) -> Callable[[str], Path]:
    """A folder that exists and holds `files`."""

    def parse(text: str) -> Path:
        path = _path(text)
        if not path.is_dir():
            raise _bad(text, "not a folder" if path.exists() else "no such folder")
        missing = [name for name in files if not (path / name).is_file()]
        if missing:
            raise _bad(text, f"no {', '.join(missing)} in it")
        return path

    return parse


existing_folder = folder_with()


def _machine_bound(bound: Callable[[str, Any], None], minimum: int) -> Callable[[str], int]:
    count = integer(minimum)

    def parse(text: str) -> int:
        value = count(text)
        try:
            bound("", value)
        except PipelineError as error:  # "<option> N: more processes than ..." with the option left empty
            raise argparse.ArgumentTypeError(str(error).strip()) from None
        return value

    return parse


def processes(minimum: int = 1) -> Callable[[str], int]:
    """A count of processes (workers, ranks, parallel runs), at least `minimum` and at most what this machine can
    run (pipeline.machine.resources: the bound of the pipeline's --workers)."""
    return _machine_bound(processes_bound, minimum)


def threads(minimum: int = 1) -> Callable[[str], int]:
    """A count of threads, at least `minimum` and at most what this machine can run (the pipeline's --threads)."""
    return _machine_bound(threads_bound, minimum)


def torch_device(text: str):
    """auto, cpu, cuda or cuda:N, resolved to a torch.device that this machine has (pipeline's resolve_device)."""
    from pipeline.machine.devices import resolve_device

    try:
        return resolve_device(text)
    except PipelineError as error:  # "--device X: why": the option is argparse's to name
        raise _bad(text, str(error).split(": ", 1)[-1]) from None


def architecture(*extra: str) -> Callable[[str], str]:
    """A backbone of pipeline.models (r18 .. r200, mbf) or one of `extra` (importing the models, so torch, when
    called)."""

    def parse(text: str) -> str:
        from pipeline.models import MODEL_NAMES

        known = (*extra, *MODEL_NAMES)
        if text not in known:
            raise _bad(repr(text), f"not one of {', '.join(name or repr(name) for name in known)}")
        return text

    return parse


def load_json(parser: argparse.ArgumentParser, option: str, path: Path) -> Any:
    """The JSON document in `path` (named by `option`); `parser.error` if it is not one."""
    try:
        return json.loads(Path(path).read_text())
    except (UnicodeDecodeError, ValueError) as error:
        parser.error(f"{option} {path}: not a JSON file ({error})")


def load_json_lines(parser: argparse.ArgumentParser, option: str, path: Path) -> list[dict]:
    """The JSON objects of `path`, one a line (blank lines skipped); `parser.error` naming the first bad line."""
    try:
        lines = Path(path).read_text().splitlines()
    except UnicodeDecodeError as error:
        parser.error(f"{option} {path}: not a text file ({error})")
    records = []
    for row, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            parser.error(f"{option} {path}: line {row} is not JSON ({error})")
        if not isinstance(record, dict):
            parser.error(f"{option} {path}: line {row} is not a JSON object")
        records.append(record)
    return records


def fail(message: str) -> None:
    """`SCRIPT: error: MESSAGE` on one line (as argparse's own errors end), exit code 2."""
    print(f"{os.path.basename(sys.argv[0])}: error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(2)


def run_main(main: Callable[[], object]) -> None:
    """A benchmark script's entry point: `main()`, with the errors the pipeline reports as one line (PipelineError,
    an OSError naming a file, a full disk) and a MemoryError as one line and exit code 2 instead of a traceback,
    and Ctrl-C as `interrupted`, exit code 130."""
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(INTERRUPTED)
    except PipelineError as error:
        fail(str(error))
    except MemoryError as error:  # an allocation sized by an argument that no check above caught
        fail(f"out of memory: {error}")
    except OSError as error:
        line = os_error_line(error)
        if line is None:  # not about a file: a bug, which keeps its traceback
            raise
        fail(line)
