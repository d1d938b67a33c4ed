"""dvc.yaml's code deps, derived from the imports (a dev tool: the library knows nothing of DVC).

    python -m tests.helpers.stage_deps            # check: name each stage's missing and stale code deps
    python -m tests.helpers.stage_deps --write    # rewrite the code-dep lists of dvc.yaml in place

A stage's code is the static import closure of what its command runs, restricted to the project's packages
(PACKAGES): for `pipeline NAME ...`, pipeline/cli.py (the console script) and the stage module that cli.py's
literal STAGE_COMMANDS table maps NAME to (cli.py imports only that one). Imports are read from the AST:
imports inside functions count (those under `if TYPE_CHECKING:` do not: they never run), relative imports
are resolved, every package `__init__.py` on the way is included, and `importlib.import_module("literal")` /
`__import__("literal")` are followed. A dynamic import of a computed name cannot be followed: it must be
listed in DYNAMIC with the reason it is safe, or the tool fails.
Code deps are files only: a folder dep would rerun a stage for modules it never imports.

--write keeps everything else in dvc.yaml as it is (comments, data deps, their order); the code deps of a
stage replace its old ones, sorted, where the first of them stood. Run it after adding or moving a module.
"""
from __future__ import annotations

import ast
import functools
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "stages")  # the project's own code; any other import is a library
COMMAND = "python -m tests.helpers.stage_deps --write"
# Files whose dynamic imports of computed names are known: why they add no project code to a closure.
DYNAMIC = {
    "pipeline/cli.py": "the stage dispatch: STAGE_COMMANDS, which command_files resolves per command",
    "pipeline/formats/verification_bin.py": "numpy's pickle helpers (numpy._core / numpy.core), not project code",
}
_IMPORT_CALLS = {"import_module", "__import__"}


def module_file(root: Path, module: str) -> Path | None:
    """The project file that defines `module` (a package's `__init__.py`), or None (a library, a name)."""
    if module.split(".")[0] not in PACKAGES:
        return None
    base = root.joinpath(*module.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _package(root: Path, path: Path) -> list[str]:
    """The dotted package a file's relative imports start from."""
    return list(path.relative_to(root).parent.parts)


@functools.cache  # every stage's closure reads the same files: parse each once
def imported_modules(root: Path, path: Path) -> frozenset[str]:
    """Every module name `path` may import: `from a.b import c` gives a.b and a.b.c (c may be a module)."""
    found: set[str] = set()
    for node in _executed_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            package = _package(root, path)
            base = ".".join(package[: len(package) - node.level + 1] + [node.module or ""]) if node.level \
                else node.module
            base = base.strip(".")
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Call) and _call_name(node.func) in _IMPORT_CALLS and node.args:
            if isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                found.add(node.args[0].value)
            elif path.relative_to(root).as_posix() not in DYNAMIC:
                raise ValueError(f"{path.relative_to(root)}:{node.lineno}: a dynamic import of a computed name; "
                                 f"import the module statically, or add the file to DYNAMIC in {__name__} with "
                                 f"why it imports no project code")
    return frozenset(found)


def _executed_nodes(tree: ast.AST):
    """ast.walk without the bodies of `if TYPE_CHECKING:` (imports for annotations only never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and _call_name(node.test) == "TYPE_CHECKING":
            todo.extend(node.orelse)
        else:
            todo.extend(ast.iter_child_nodes(node))


def _call_name(func: ast.expr) -> str | None:
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None


def closure(root: Path, modules: list[str]) -> set[str]:
    """Project files (relative, posix) that importing `modules` executes: each name's packages and itself."""
    seen: set[Path] = set()
    todo = list(modules)
    while todo:
        parts = todo.pop().split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__.py and a/b/__init__.py first
            path = module_file(root, ".".join(parts[:i]))
            if path is not None and path not in seen:
                seen.add(path)
                todo.extend(imported_modules(root, path))
    return {path.relative_to(root).as_posix() for path in seen}


def stage_commands(root: Path) -> dict[str, str]:
    """pipeline/cli.py's STAGE_COMMANDS (command -> stage module), read without importing anything."""
    for node in ast.parse((root / "pipeline/cli.py").read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "STAGE_COMMANDS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise ValueError("pipeline/cli.py: no literal STAGE_COMMANDS = {command: stage module}")


def command_modules(root: Path, cmd: str) -> list[str]:
    """The modules a stage's command runs: `pipeline NAME`, `python -m MODULE` or `python FILE.py`."""
    words = cmd.split()
    entry = "pipeline.cli"  # the console script's module
    if words[0].startswith("python") and words[1:3] == ["-m", "pipeline"]:
        words, entry = words[2:], "pipeline.__main__"
    if words[0] == "pipeline":
        commands = stage_commands(root)
        if len(words) < 2 or words[1] not in commands:
            raise ValueError(f"`{cmd}`: not a command in pipeline/cli.py's STAGE_COMMANDS")
        return [entry, commands[words[1]]]
    if words[0].startswith("python") and len(words) > 2 and words[1] == "-m":
        return [words[2]]
    if words[0].startswith("python") and len(words) > 1 and words[1].endswith(".py"):
        return [".".join(Path(words[1]).with_suffix("").parts)]
    raise ValueError(f"`{cmd}`: cannot tell which code this command runs")


def is_code(root: Path, dep: str) -> bool:
    """A dep inside the project's packages (a file, a folder, or a file since deleted): code, the tool's."""
    return dep.split("/")[0] in PACKAGES


def expected_deps(root: Path) -> dict[str, list[str]]:
    """Stage name -> the sorted code deps its command's import closure gives."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        cmd = stage.get("do", stage)["cmd"]
        cmd = " ".join(cmd) if isinstance(cmd, list) else cmd
        out[name] = sorted(closure(root, command_modules(root, cmd)))
    return out


def differences(root: Path = ROOT) -> dict[str, tuple[list[str], list[str]]]:
    """Stage name -> (missing code deps, stale ones: folders or files its command does not import)."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, expected in expected_deps(root).items():
        declared = [d for d in stages[name].get("do", stages[name]).get("deps", []) if isinstance(d, str)
                    and is_code(root, d)]
        missing = [f for f in expected if f not in declared]
        stale = [d for d in declared if d not in expected]
        if missing or stale:
            out[name] = (missing, stale)
    return out


_STAGE = re.compile(r"^  ([\w-]+):\s*(#.*)?$")
_ITEM = re.compile(r"^(\s*)- +([^\s#:]+)\s*(#.*)?$")


def rewrite(text: str, root: Path, expected: dict[str, list[str]]) -> str:
    """dvc.yaml's text with each stage's code deps replaced by `expected[stage]` (all else kept)."""
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    stage = None
    i = 0
    while i < len(lines):
        line = lines[i]
        match = _STAGE.match(line)
        stage = match.group(1) if match else stage
        out.append(line)
        i += 1
        if stage not in expected or not line.strip().startswith("deps:"):
            continue
        indent = len(line) - len(line.lstrip())
        block = []
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
            block.append(lines[i])
            i += 1
        out.extend(_replace_code_items(block, root, expected.pop(stage), " " * (indent + 2)))
    if expected:
        raise ValueError(f"dvc.yaml: no `deps:` list to write code deps into for {', '.join(expected)}")
    return "".join(out)


def _replace_code_items(block: list[str], root: Path, code: list[str], item_indent: str) -> list[str]:
    items = [(n, _ITEM.match(line)) for n, line in enumerate(block)]
    code_lines = [n for n, match in items if match and is_code(root, match.group(2))]
    if code_lines:
        item_indent = _ITEM.match(block[code_lines[0]]).group(1)
    # where the first code dep stood, else after the last item (blank lines after it separate the next key)
    at = code_lines[0] if code_lines else max((n + 1 for n, line in enumerate(block) if line.strip()), default=0)
    kept = [line for n, line in enumerate(block) if n not in code_lines]
    return kept[:at] + [f"{item_indent}- {dep}\n" for dep in code] + kept[at:]


def main(argv: list[str]) -> int:
    if argv not in ([], ["--write"]):
        print(__doc__, file=sys.stderr)
        return 2
    if argv == ["--write"]:
        path = ROOT / "dvc.yaml"
        before = differences(ROOT)
        path.write_text(rewrite(path.read_text(), ROOT, expected_deps(ROOT)))
        print(f"dvc.yaml: code deps rewritten for {', '.join(before) or 'no stage (already current)'}")
        return 0
    found = differences(ROOT)
    for name, (missing, stale) in found.items():
        print(f"{name}: missing {', '.join(missing) or '-'}; stale {', '.join(stale) or '-'}")
    if found:
        print(f"fix: {COMMAND}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
