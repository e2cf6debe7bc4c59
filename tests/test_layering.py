"""The package's import graph, read from the source (every import, at module level or inside a function):
each part imports only from its own layer or below (the README's architecture section), no module reaches
itself through other modules, ``cli/`` imports only ``workflows``, ``config``, ``errors`` and the standard
library, and an import inside a function says why it is not at the top. Each check has a companion test
that feeds it a hand-made violation."""
from __future__ import annotations

import ast
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "cxrlab"

# which top-level parts of the package each part may import; "cxrlab" is the package's own __init__
FOUNDATION = {"cxrlab", "errors", "labels", "labels_text", "output", "progress", "registry", "config", "serialization",
              "paths", "model_card", "recipes"}
EVERYTHING_BUT_CLI = "*"
LAYERS = {
    **{part: FOUNDATION for part in FOUNDATION},
    "data": FOUNDATION | {"data"},
    "models": FOUNDATION | {"models"},
    "losses": FOUNDATION | {"losses"},
    "metrics": FOUNDATION | {"metrics"},
    "regimes": FOUNDATION | {"regimes", "losses", "models"},
    "checkpoint": FOUNDATION | {"models", "ensemble"},
    "ensemble": FOUNDATION | {"models", "checkpoint"},  # several checkpoints as one model: the checkpoint layer
    "engine": FOUNDATION | {"engine", "checkpoint", "ensemble", "metrics", "data", "models", "losses", "regimes"},
    "evaluation": FOUNDATION | {"evaluation", "metrics"},
    "inference": FOUNDATION | {"inference", "checkpoint", "ensemble", "data", "models", "metrics", "evaluation"},
    "workflows": EVERYTHING_BUT_CLI,
    "api": EVERYTHING_BUT_CLI,
    "cli": {"cli", "workflows", "config", "errors"},
}
CLI_MAY_IMPORT = ("cxrlab.cli", "cxrlab.workflows", "cxrlab.config", "cxrlab.errors")

# Known violations while issue 21's work is in progress: (importing module, imported module) -> who
# removes the import, then deletes the entry. An entry that no longer excuses anything fails the
# stale-entry test below. The lead empties this list when issue 21 closes.
# For a cycle, one of its imports is named; the cycle check leaves it out.
KNOWN: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module, e.g. "cxrlab.data.cache"
    target: str  # the imported module ("cxrlab.data.images") or, outside the package, its top name ("PIL")
    line: int
    lazy: bool  # inside a function
    reason: bool  # has a "# lazy: ..." comment on its line or the import lines right above it


def module_name(relative: str) -> tuple[str, bool]:
    """(dotted module name, is a package) of a file path relative to the package folder."""
    parts = ("cxrlab", *Path(relative).with_suffix("").parts)
    return (".".join(parts[:-1]), True) if parts[-1] == "__init__" else (".".join(parts), False)


def read_imports(files: dict[str, str]) -> list[Import]:
    """Every import statement of ``files`` (path relative to the package -> source text)."""
    modules = {module_name(path)[0] for path in files}
    found = []
    for path, text in files.items():
        name, is_package = module_name(path)
        package = name if is_package else name.rpartition(".")[0]
        lines = text.splitlines()
        tree = ast.parse(text)
        in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                       for n in ast.walk(f)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name if a.name.startswith("cxrlab.") else a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    module = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    module = node.module or ""
                if module != "cxrlab" and not module.startswith("cxrlab."):
                    targets = [module.split(".")[0]]
                else:  # `from .pkg import sub` imports the module pkg.sub
                    targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names]
            else:
                continue
            lazy = id(node) in in_function
            reason = lazy and _has_reason(lines, node.lineno)
            found += [Import(name, t, node.lineno, lazy, reason) for t in dict.fromkeys(targets)]
    return found


def _has_reason(lines: list[str], lineno: int) -> bool:
    """A ``# lazy:`` comment on the import's line, or on the comment or import lines just above it."""
    i = lineno - 1
    while i >= 0:
        line = lines[i].strip()
        if "# lazy:" in line:
            return True
        if i < lineno - 1 and not line.startswith(("#", "from ", "import ")):
            return False
        i -= 1
    return False


def package_files() -> dict[str, str]:
    return {str(p.relative_to(SRC)): p.read_text() for p in sorted(SRC.rglob("*.py"))}


def own(imports: list[Import]) -> list[Import]:
    return [i for i in imports if i.target == "cxrlab" or i.target.startswith("cxrlab.")]


def part(module: str) -> str:
    return module.split(".")[1] if "." in module else "cxrlab"


# ------------------------------------------------------------------------------------------------ checks

def cycles(imports: list[Import], ignore=()) -> list[list[str]]:
    """Groups of modules that import each other, directly or through others (strongly connected
    components of the graph of imports, ``ignore``'s (source, target) pairs left out)."""
    graph: dict[str, set[str]] = {}
    for i in own(imports):
        if (i.source, i.target) not in ignore:
            graph.setdefault(i.source, set()).add(i.target)
            graph.setdefault(i.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
            if len(group) > 1 or v in graph[v]:
                found.append(sorted(group))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def upward(imports: list[Import]) -> list[tuple[str, str]]:
    """(module, imported module) pairs where a part imports a part its layer may not (unknown parts too)."""
    bad = []
    for i in own(imports):
        allowed = LAYERS.get(part(i.source), set())
        if allowed != EVERYTHING_BUT_CLI and part(i.target) not in allowed | {part(i.source)}:
            bad.append((i.source, i.target))
        elif allowed == EVERYTHING_BUT_CLI and part(i.target) == "cli":
            bad.append((i.source, i.target))
    return bad


def cli_outside(imports: list[Import]) -> list[tuple[str, str]]:
    """(module, imported module) pairs where ``cli/`` imports anything but workflows, config, errors and
    the standard library."""
    bad = []
    for i in imports:
        if i.source != "cxrlab.cli" and not i.source.startswith("cxrlab.cli."):
            continue
        mine = i.target == "cxrlab" or i.target.startswith("cxrlab.")
        if mine and not any(i.target == m or i.target.startswith(m + ".") for m in CLI_MAY_IMPORT):
            bad.append((i.source, i.target))
        elif not mine and i.target not in sys.stdlib_module_names:
            bad.append((i.source, i.target))
    return bad


def unexplained_lazy(imports: list[Import]) -> Counter:
    """Per importing module's file: imports of cxrlab modules inside functions without a reason."""
    return Counter(i.source for i in own(imports) if i.lazy and not i.reason)


def file_of(module: str, files: dict[str, str]) -> str:
    return next(path for path in files if module_name(path)[0] == module)


# ------------------------------------------------------------------------------------------------ the package

def test_no_import_cycle():
    imports = read_imports(package_files())
    found = cycles(imports, ignore=KNOWN)
    assert not found, "import cycles (modules that import each other, also through functions):\n" + "\n".join(
        " <-> ".join(group) for group in found)


def test_no_part_imports_from_a_layer_above_it():
    bad = [f"{s} imports {t}" for s, t in upward(read_imports(package_files())) if (s, t) not in KNOWN]
    unplaced = sorted({part(m) for m in {i.source for i in read_imports(package_files())}} - set(LAYERS))
    assert not unplaced, f"parts missing from LAYERS (place them in a layer): {unplaced}"
    assert not bad, "\n".join(sorted(set(bad)))


def test_cli_imports_only_workflows_config_and_errors():
    bad = [f"{s} imports {t}" for s, t in cli_outside(read_imports(package_files())) if (s, t) not in KNOWN]
    assert not bad, "cli/ parses arguments and calls workflows/; move this into a workflow:\n" + "\n".join(
        sorted(set(bad)))


def test_imports_inside_functions_say_why():
    files = package_files()
    counts = unexplained_lazy(read_imports(files))
    unexplained = [f"{file_of(m, files)}: {n}" for m, n in sorted(counts.items())]
    assert not unexplained, (
        "imports of cxrlab modules inside functions need a `# lazy: <reason>` comment (an optional dependency "
        "or start-up time), or move to the top of the file:\n" + "\n".join(unexplained))


def test_every_known_violation_still_exists():
    """An entry of KNOWN that excuses nothing any more is deleted, so the list only shrinks."""
    imports = read_imports(package_files())
    in_cycles = {m for group in cycles(imports) for m in group}
    used = {(i.source, i.target) for i in own(imports) if i.source in in_cycles and i.target in in_cycles}
    used |= set(upward(imports)) | set(cli_outside(imports))
    stale = [f"{s} -> {t} ({who})" for (s, t), who in KNOWN.items() if (s, t) not in used]
    assert not stale, "delete these entries of KNOWN in tests/test_layering.py:\n" + "\n".join(stale)


# ------------------------------------------------------------------------------------------------ the checks fail

def test_the_cycle_check_sees_a_cycle_through_a_function_level_import():
    files = {"data/cache.py": "from .records import Records\n",
             "data/records.py": "def read():\n    from .images import read_image\n",
             "data/images.py": "from . import cache\n",
             "data/__init__.py": ""}
    assert cycles(read_imports(files)) == [["cxrlab.data.cache", "cxrlab.data.images", "cxrlab.data.records"]]
    assert cycles(read_imports(files), ignore={("cxrlab.data.images", "cxrlab.data.cache")}) == []
    assert cycles(read_imports({"a.py": "from .b import x\n", "b.py": "import cxrlab.c\n", "c.py": ""})) == []


def test_the_layering_check_sees_a_violation():
    """Reaching up into workflows or the CLI is seen, relative or absolute, at any depth."""
    files = {"data/records.py": "from ..workflows.experiment import run\n",
             "data/sources/nih.py": "def f():\n    from ...cli import main\n",
             "models/backbone.py": "import cxrlab.data.cache\nfrom ..errors import CxrlabError\n",
             "workflows/demo.py": "from ..data import cache\n", "workflows/x.py": "from ..cli import main\n",
             "data/__init__.py": "", "data/cache.py": ""}
    assert sorted(upward(read_imports(files))) == [
        ("cxrlab.data.records", "cxrlab.workflows.experiment"), ("cxrlab.data.sources.nih", "cxrlab.cli"),
        ("cxrlab.models.backbone", "cxrlab.data.cache"), ("cxrlab.workflows.x", "cxrlab.cli")]


def test_the_cli_check_sees_an_import_outside_workflows():
    files = {"cli/__init__.py": "import argparse\nimport sys\nfrom ..errors import CxrlabError\n"
                                "from .data import add\nfrom ..workflows.train import train\n"
                                "def f():\n    from ..data.cache import prepare\n",
             "cli/data.py": "import pandas as pd\nfrom ..config import load_recipe\n"}
    assert sorted(cli_outside(read_imports(files))) == [("cxrlab.cli", "cxrlab.data.cache"),
                                                        ("cxrlab.cli.data", "pandas")]


def test_the_lazy_import_check_wants_a_reason():
    files = {"data/records.py": "import numpy as np\n\n\ndef read(i):\n    import PIL\n"
                                "    from .images import read_image\n    return read_image(i)\n\n\n"
                                "def read2(i):\n    # lazy: start-up time\n    from .images import read_image\n"
                                "    from .cache import open_cache\n\n\n"
                                "def read3(i):\n    x = 1\n    from .cache import open_cache  # lazy: optional\n"
                                "    from .images import read_image\n",
             "data/images.py": "", "data/cache.py": ""}
    assert unexplained_lazy(read_imports(files)) == Counter({"cxrlab.data.records": 1})
