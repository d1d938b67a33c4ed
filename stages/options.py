"""Typer commands whose options are derived from the library's config dataclasses, plus `--params`.

`command(function, name=ConfigClass, ...)` turns `function(own options..., name: ConfigClass, ...)` into a
Typer command: the function's own (Annotated) options first, then one option per config field, spelled,
typed, explained and defaulted as the field says (pipeline/settings.py), then `--params FILE:SECTION`.
`--params` is eager: it reads a YAML mapping (e.g. `params.yaml:students.l2`) whose keys are option names
and makes them the defaults, so dvc.yaml can hand a stage its whole params section while every option is
still explained by `pipeline COMMAND --help`; options given on the command line win.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
import yaml

from pipeline.errors import PipelineError
from pipeline.settings import field_types, flag

PARAMS_HELP = ("Read option defaults from a YAML file section, e.g. params.yaml:student (repeatable; later "
               "sections and explicit options win). Keys are option names with underscores.")


def _field_default(field: dataclasses.Field) -> Any:
    """The field's default; `...` (a required option) for a field without one."""
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return ...


def cli_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of a config class that are command-line options: the class's own first, then those of the
    mixins it inherits (e.g. KDConfig's --kd before each method's options)."""
    own = cls.__dict__.get("__annotations__", {})
    fields = [f for f in dataclasses.fields(cls) if f.metadata.get("cli", False)]
    return sorted(fields, key=lambda f: f.name not in own)


def _option(field: dataclasses.Field, annotation: Any, default: Any) -> inspect.Parameter:
    """One Typer option for a config field. Choices and text-typed fields reach the config as text, so that
    the config's own check gives the one-line error (the same one params.yaml values get)."""
    name, metavar = flag(field), None
    choices = field.metadata.get("choices")
    if choices is not None:
        metavar = "|".join(choices.values())
    if field.metadata.get("cli_text"):
        annotation = str if default is not None else Optional[str]
        default = _as_text(default)
    declaration = f"{name}/--no-{name[2:]}" if annotation is bool else name
    option = typer.Option(declaration, help=field.metadata.get("help", ""), metavar=metavar)
    return inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[annotation, option],
                             default=default)


def _as_text(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return value


def _read_section(spec: str) -> dict:
    """The mapping at `FILE:a.b.c` (the whole file without a section)."""
    path_text, _, section = spec.partition(":")
    path = Path(path_text)
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise typer.BadParameter(f"{path}: cannot read ({' '.join(str(error).split())[:200]})") from None
    except UnicodeDecodeError:  # a model, an HDF5 file, random bytes
        raise typer.BadParameter(f"{path}: not a YAML text file (binary content)") from None
    node = document
    for key in [k for k in section.split(".") if k]:
        if not isinstance(node, dict) or key not in node:
            raise typer.BadParameter(f"{path}: no section {section!r}")
        node = node[key]
    if not isinstance(node, dict):
        raise typer.BadParameter(f"{path}: section {section!r} is not a mapping of option names")
    return node


def _params_callback(text_lists: frozenset) -> Callable:
    """The eager callback of --params; `text_lists`: the options that take a YAML list as their
    comma-separated text (e.g. lr_milestones)."""

    def load(ctx: typer.Context, param: typer.CallbackParam, specs: list[str]) -> list[str]:
        return _load_params(ctx, specs, text_lists)

    return load


def _load_params(ctx: typer.Context, specs: list[str], text_lists: frozenset) -> list[str]:
    """Merge the --params sections into the context's default map."""
    if not specs or ctx.resilient_parsing:
        return specs
    options = {p.name: p for p in ctx.command.params if p.name != "params"}
    defaults = dict(ctx.default_map or {})
    for spec in specs:
        for key, value in _read_section(spec).items():
            if key not in options:
                raise typer.BadParameter(f"{spec}: {key!r} is not an option of this command")
            defaults[key] = _params_value(f"{spec}: {key}", value, options[key], key in text_lists)
    ctx.default_map = defaults
    return specs


def _params_value(where: str, value: Any, option, text_list: bool) -> Any:
    """A params.yaml value as the option's default, refused (naming file, section and key) where YAML's types
    do not fit the option: the CLI's coercion would turn `true` into 1 epoch, or `null` into no value."""
    annotation = getattr(getattr(option, "type_descriptor", None), "annotation", None)
    if value is None:
        if option.required or option.default is not None:
            raise typer.BadParameter(f"{where}: null is not a value of this option (leave the key out for its "
                                     "default)")
        return None
    if isinstance(value, (list, tuple)):
        if not (text_list or option.multiple) or not all(_is_scalar(v) for v in value):
            raise typer.BadParameter(f"{where}: {value!r} is a list; this option takes one value")
        return _as_text(value) if text_list else list(value)
    if not _is_scalar(value):
        raise typer.BadParameter(f"{where}: a {type(value).__name__} is not a value of this option")
    if annotation is bool and not isinstance(value, bool):
        raise typer.BadParameter(f"{where}: {value!r} is not a boolean (true or false)")
    if annotation is not bool and isinstance(value, bool):
        kind = {int: "an integer", float: "a number", Path: "a path"}.get(annotation, "text")
        raise typer.BadParameter(f"{where}: {str(value).lower()} is a boolean; this option takes {kind}")
    return value


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (bool, int, float, str))


def command(function: Callable, defaults: dict | None = None, **configs: type) -> Callable:
    """A Typer command calling `function(**own_options, **{name: config instance})`.

    `defaults` changes the default of config fields for this command (e.g. train-student's arch is mbf).
    """
    defaults = defaults or {}
    own = [p for p in inspect.signature(function, eval_str=True).parameters.values()
           if p.name not in configs and p.kind is not p.VAR_KEYWORD]
    derived, seen = [], {p.name for p in own}
    for cls in configs.values():
        types = field_types(cls)
        for field in cli_fields(cls):
            if field.name in seen:
                raise TypeError(f"option {field.name!r} is declared twice for {function.__name__}")
            seen.add(field.name)
            derived.append(_option(field, types[field.name], defaults.get(field.name, _field_default(field))))
    unknown = set(defaults) - seen
    if unknown:
        raise TypeError(f"defaults for unknown options {sorted(unknown)}")
    text_lists = frozenset(f.name for cls in configs.values() for f in cli_fields(cls) if f.metadata.get("cli_text"))
    params = inspect.Parameter(
        "params", inspect.Parameter.KEYWORD_ONLY, default=[],
        annotation=Annotated[list[str], typer.Option("--params", help=PARAMS_HELP, is_eager=True,
                                                      callback=_params_callback(text_lists), metavar="FILE:SECTION")])
    signature = inspect.Signature(own + derived + [params])

    @functools.wraps(function)
    def wrapper(**kwargs):
        kwargs.pop("params", None)
        built = {name: build(cls, kwargs) for name, cls in configs.items()}
        return function(**kwargs, **built)

    wrapper.__signature__ = signature
    wrapper.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
    return wrapper


def build(cls: type, options: dict) -> Any:
    """An instance of config `cls` from (and removing) its options in `options`; validated by the class."""
    values = {field.name: options.pop(field.name) for field in cli_fields(cls) if field.name in options}
    try:
        return cls(**values)
    except TypeError as error:  # a programming error in the wiring, not user input
        raise PipelineError(f"{cls.__name__}: {error}") from None
