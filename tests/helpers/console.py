"""The `pipeline` console entry point run in-process, as a user sees it: exit code and stderr lines."""
from __future__ import annotations

import pytest

from pipeline import cli


def console(capsys, *args) -> tuple[int, list[str]]:
    """`pipeline ARGS...` through cli.main (click's usage errors are formatted there): (exit code, stderr lines)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main([str(a) for a in args])
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


def one_line_error(capsys, *args) -> str:
    """The single stderr line of a refused command (exit code 2)."""
    code, lines = console(capsys, *args)
    assert code == 2 and len(lines) == 1, (code, lines)
    return lines[0]
