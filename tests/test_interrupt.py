"""Ctrl-C at any point of `pipeline` (also while its modules import) is one line and exit code 130."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A KeyboardInterrupt raised where the named module is imported: Ctrl-C in the first second of a command.
INTERRUPT_IMPORT = """
import sys
class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            raise KeyboardInterrupt
sys.meta_path.insert(0, Interrupt())
sys.argv = ["pipeline", *{args!r}]
import runpy
runpy.run_module("pipeline", run_name="__main__")
"""


@pytest.mark.parametrize("module, args", [("typer", ["--help"]), ("torch", ["train-teacher", "--help"]),
                                          ("stages.report", ["report", "--help"]),
                                          ("pipeline.cli", ["--help"])])
def test_ctrl_c_while_importing_is_one_line(module, args):
    result = subprocess.run([sys.executable, "-c", INTERRUPT_IMPORT.format(module=module, args=args)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip().splitlines() == ["interrupted"]


def test_the_console_script_module_imports_nothing_heavy():
    """The console script imports pipeline.cli outside any guard: that import stays tiny."""
    code = "import sys, pipeline.cli; print(sorted(m for m in ('torch', 'typer', 'numpy', 'yaml') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[]", result.stderr


def test_ctrl_c_inside_a_command_is_one_line(monkeypatch, capsys):
    from helpers.console import console

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("stages.report.load_result", interrupted)
    code, lines = console(capsys, "report", "--teacher", "t", "--students", "s", "--out", "o")
    assert code == 130 and lines == ["interrupted"]
