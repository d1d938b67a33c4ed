"""dvc.yaml's code deps are exactly each stage's import closure (tests/helpers/stage_deps.py), so editing a
module reruns exactly the stages that import it; and the tool itself on a small made-up project."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from helpers import stage_deps


def test_dvc_yaml_code_deps_are_the_import_closures():
    gaps = stage_deps.differences()
    lines = [f"{stage}: missing {', '.join(missing) or '-'}; stale (not imported, or a folder) "
             f"{', '.join(stale) or '-'}" for stage, (missing, stale) in gaps.items()]
    assert not gaps, "dvc.yaml's code deps are not what the stages import:\n" + "\n".join(lines) + \
        f"\nfix: {stage_deps.COMMAND}"


def test_the_closures_follow_the_imports_that_matter():
    deps = stage_deps.expected_deps(stage_deps.ROOT)
    assert "pipeline/fpr.py" in deps["build-pools"]  # through search/thresholds.py
    assert "pipeline/training/sampling/hard_pairs.py" not in deps["train-teacher"]  # the students' sampler only
    assert "pipeline/losses/ekd.py" not in deps["train-teacher"]  # Distillation is an annotation there
    assert {"pipeline/cache/contract.py", "pipeline/search/pool_files.py"} <= set(deps["train-student"])
    assert "pipeline/search/knn.py" not in deps["train-student"]  # the students read pools, never search
    assert all("stages/report.py" not in files for stage, files in deps.items() if stage != "report")


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))


PROJECT = {
    "pipeline/__init__.py": "",
    "pipeline/__main__.py": "from pipeline import cli\n",
    "pipeline/cli.py": 'import importlib\nSTAGE_COMMANDS = {"go": "stages.go", "other": "stages.other"}\n'
                       "def main(name):\n    importlib.import_module(STAGE_COMMANDS[name])\n",
    "pipeline/pkg/__init__.py": "",
    "pipeline/pkg/a.py": "from . import b\nfrom .sub.c import thing\n",
    "pipeline/pkg/b.py": "def f():\n    import pipeline.lazy\n",
    "pipeline/pkg/sub/__init__.py": "",
    "pipeline/pkg/sub/c.py": "import numpy\nthing = 1\n",
    "pipeline/lazy.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pipeline.typing_only\n",
    "pipeline/typing_only.py": "",
    "pipeline/plugin.py": "",
    "pipeline/unused.py": "",
    "stages/__init__.py": "",
    "stages/go.py": "import importlib\nfrom pipeline.pkg import a\nimportlib.import_module('pipeline.plugin')\n",
    "stages/other.py": "import pipeline.unused\n",
    "dvc.yaml": """\
        stages:
          go:  # the stage
            cmd: pipeline go --in data/x
            deps:
              - data/x    # data stays
              - pipeline/pkg
              - pipeline/unused.py
              - pipeline/deleted.py
              - ${x.dir}
            outs:
              - out
          other:
            foreach: [1, 2]
            do:
              cmd: >-
                python -m pipeline other
              deps:
                - data/y

              outs:
                - out${item}
        """,
}


def test_closure_follows_relative_lazy_dynamic_and_package_imports(tmp_path):
    _write(tmp_path, PROJECT)
    files = stage_deps.expected_deps(tmp_path)
    assert files["go"] == ["pipeline/__init__.py", "pipeline/cli.py", "pipeline/lazy.py", "pipeline/pkg/__init__.py",
                           "pipeline/pkg/a.py", "pipeline/pkg/b.py", "pipeline/pkg/sub/__init__.py",
                           "pipeline/pkg/sub/c.py", "pipeline/plugin.py", "stages/__init__.py", "stages/go.py"]
    assert files["other"] == ["pipeline/__init__.py", "pipeline/__main__.py", "pipeline/cli.py", "pipeline/unused.py",
                              "stages/__init__.py", "stages/other.py"]  # `python -m pipeline`: __main__ too
    missing, stale = stage_deps.differences(tmp_path)["go"]
    assert "pipeline/pkg/a.py" in missing and stale == ["pipeline/pkg", "pipeline/unused.py", "pipeline/deleted.py"]


def test_write_replaces_only_the_code_deps_and_then_checks_clean(tmp_path):
    _write(tmp_path, PROJECT)
    path = tmp_path / "dvc.yaml"
    path.write_text(stage_deps.rewrite(path.read_text(), tmp_path, stage_deps.expected_deps(tmp_path)))
    text = path.read_text()
    assert stage_deps.differences(tmp_path) == {}
    assert "  go:  # the stage\n" in text and "      - data/x    # data stays\n      - pipeline/__init__.py\n" in text
    assert "      - pipeline/plugin.py\n      - stages/__init__.py\n      - stages/go.py\n      - ${x.dir}\n" in text
    assert "        - data/y\n        - pipeline/__init__.py\n" in text and "        - stages/other.py\n\n" in text
    again = stage_deps.rewrite(text, tmp_path, stage_deps.expected_deps(tmp_path))
    assert again == text


def test_a_dynamic_import_of_a_computed_name_is_refused(tmp_path):
    _write(tmp_path, {**PROJECT, "pipeline/pkg/b.py": "import importlib\nname = 'x'\nimportlib.import_module(name)\n"})
    with pytest.raises(ValueError, match=r"pipeline/pkg/b.py:3: a dynamic import of a computed name"):
        stage_deps.expected_deps(tmp_path)
