"""Settings as data: every option of every stage is declared once, as a field of a config dataclass.

A field made with `setting(default, help, min=..., choices=...)` carries its default, its help text, its
bounds and its choices (a `Choice` enum; the field holds the chosen value as plain text, so configs serialise
as they are), and whether it belongs to a run's *identity*: every setting that can change a result does,
unless declared `identity=False` (where outputs go, worker counts, progress and logging knobs). From these the
CLI derives its options (`stages/options.py`), params.yaml sections are read into them, resumable commands
compare `identity(config)` with what the earlier run recorded, and `check` (called by every config's
`__post_init__`) validates a config however it was made, raising a one-line error that names the option.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import typing
from typing import Any

from pipeline.errors import PipelineError


class Choice(str, enum.Enum):
    """An option with a fixed set of string values; prints as its value."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(member.value for member in cls)


def setting(default: Any = dataclasses.MISSING, help: str = "", *, min: float | None = None,
            max: float | None = None, above: float | None = None, choices: type[Choice] | None = None,
            flag: str | None = None, factory: typing.Callable[[], Any] | None = None, cli: bool = True,
            cli_text: bool = False, validate: typing.Callable[[str, Any], None] | None = None,
            identity: bool = True) -> Any:
    """A config field: `default`, `help` (the --help text), bounds `min <= v <= max` and `v > above`,
    `choices` (the allowed values, as a Choice enum). No default: a required option.

    `flag` overrides the option name (default `--field-name`); `cli=False` keeps a field out of the CLI;
    `cli_text=True` makes the CLI take the value as text, converted by the config's `__post_init__`;
    `validate(option_name, value)` checks what bounds and choices cannot (raising a one-line PipelineError);
    `identity=False` declares a setting that cannot change the result (a resumed run may change it).
    """
    metadata = {"help": help, "min": min, "max": max, "above": above, "choices": choices, "flag": flag,
                "cli": cli, "cli_text": cli_text, "validate": validate, "identity": identity}
    if choices is not None and default not in (dataclasses.MISSING, None):
        default = choices(default).value
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag(field: dataclasses.Field) -> str:
    """The command-line spelling of a field: `--batch-size` for `batch_size`."""
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass (works with `from __future__ import annotations`)."""
    return typing.get_type_hints(cls)


def identity_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of a config class that are part of a run's identity."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("identity", True)]


def identity(config: Any, only: typing.Iterable[str] | None = None) -> dict:
    """{name: value} of the identity fields of `config` (restricted to the names in `only`), as plain JSON
    values: what a resumable command records and compares."""
    wanted = None if only is None else set(only)
    values = {f.name: getattr(config, f.name) for f in identity_fields(type(config))
              if wanted is None or f.name in wanted}
    return json.loads(json.dumps(values, default=str))


def check(config: Any) -> None:
    """Enforce every field's choices (stored as plain text) and bounds, in place.

    Raises PipelineError naming the option, the value and what is allowed.
    """
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if value is None:
            continue
        if field.metadata.get("validate") is not None:
            field.metadata["validate"](flag(field), value)
        choices = field.metadata.get("choices")
        if choices is not None:
            if str(value) not in choices.values():
                raise PipelineError(f"{flag(field)} {value!r}: choose one of {', '.join(choices.values())}")
            setattr(config, field.name, str(value))
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        _check_number(field, value)


def _check_number(field: dataclasses.Field, value: float) -> None:
    meta, name = field.metadata, flag(field)
    if isinstance(value, float) and not math.isfinite(value):
        raise PipelineError(f"{name} {value}: must be a finite number")
    if meta.get("min") is not None and value < meta["min"]:
        raise PipelineError(f"{name} {value}: must be >= {meta['min']}")
    if meta.get("above") is not None and value <= meta["above"]:
        raise PipelineError(f"{name} {value}: must be > {meta['above']}")
    if meta.get("max") is not None and value > meta["max"]:
        raise PipelineError(f"{name} {value}: must be <= {meta['max']}")


@dataclasses.dataclass(frozen=True)
class EnvironmentVariable:
    """A number the pipeline reads from the environment, declared like a setting: default, range, help.

    Read when used (not at import), so a bad value is one line naming the variable, not a traceback."""

    name: str
    default: float
    help: str
    min: float = 0.0
    max: float = math.inf
    integer: bool = False

    def value(self) -> float:
        text = os.environ.get(self.name, "").strip()
        if not text:
            return self.default
        try:
            number = int(text) if self.integer else float(text)
        except ValueError:
            number = math.nan
        if not self.min <= number <= self.max:  # NaN fails too
            kind = "an integer" if self.integer else "a number"
            upper = "" if math.isinf(self.max) else f" and <= {self.max:g}"
            raise PipelineError(f"{self.name}={text!r}: must be {kind} >= {self.min:g}{upper} ({self.help})")
        return number
