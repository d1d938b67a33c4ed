"""The layering of docs/architecture.md, checked on the source: imports point down, no cycles between
packages, the leaves import only leaves, the library never imports the CLI or the stages."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LEAVES = {"errors", "storage", "settings", "fpr", "weights", "progress", "machine", "formats", "models", "losses"}
LAYERS = {"synthetic": 1, "cache": 1, "search": 1, "evaluation": 1, "training": 2}  # leaves are layer 0


def unit(module: str) -> str:
    """`pipeline.search.knn` -> `search`; `pipeline.storage.io` -> `io`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def imports() -> dict[str, set[str]]:
    """Library unit -> the library units its modules import."""
    graph: dict[str, set[str]] = {}
    for path in (ROOT / "pipeline").rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        source = unit(module)
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] if node.module != "pipeline" else [f"pipeline.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                if name.split(".")[0] in ("pipeline", "stages"):
                    graph.setdefault(source, set()).add("stages" if name.startswith("stages") else unit(name))
    return graph


def test_library_never_imports_the_cli_or_the_stages():
    graph = imports()
    offenders = {src for src, dst in graph.items() if "stages" in dst or ("cli" in dst and src != "__main__")}
    assert not offenders


def test_imports_point_down():
    for source, targets in imports().items():
        if source in ("cli", "__main__"):
            continue
        level = 0 if source in LEAVES else LAYERS[source]
        for target in targets - {source}:
            target_level = 0 if target in LEAVES else LAYERS.get(target, 99)
            assert target_level < level or (level == 0 and target in LEAVES), f"{source} imports {target}"


def test_no_cycles_between_packages():
    graph = {k: v - {k} for k, v in imports().items()}

    def visit(node, path):
        for nxt in graph.get(node, ()):
            assert nxt not in path, f"import cycle {' -> '.join([*path, nxt])}"
            visit(nxt, [*path, nxt])

    for start in graph:
        visit(start, [start])


def test_modules_stay_small():
    sizes = {p: len(p.read_text().splitlines()) for d in ("pipeline", "stages") for p in (ROOT / d).rglob("*.py")}
    assert not {str(p.relative_to(ROOT)): n for p, n in sizes.items() if n > 400}


def _mapped_modules(doc: str) -> set[str]:
    """Every `x.py` the code map's package tree names, as a path: a name belongs to the nearest folder line
    (`name/`) above it with less indentation."""
    tree = doc.split("```")[1]
    folders: list[tuple[int, str]] = []
    named = set()
    for line in tree.splitlines():
        indent = len(line) - len(line.lstrip())
        folder = re.match(r"\s*([\w]+)/(\s|$)", line)
        while folders and folders[-1][0] >= indent:  # a folder or file at this depth ends deeper folders
            folders.pop()
        if folder:
            folders.append((indent, folder.group(1)))
            continue
        for name in re.findall(r"\b([\w]+\.py)\b", line):
            named.add("/".join([f for _, f in folders] + [name]))
    return named


def test_the_code_map_names_every_module():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    modules = {str(p.relative_to(ROOT)) for top in ("pipeline", "stages") for p in (ROOT / top).rglob("*.py")
               if p.name != "__init__.py"}
    missing = sorted(modules - _mapped_modules(doc))
    assert not missing, f"docs/architecture.md does not name {missing} in its package tree"

