"""The project's import graph, checked: `python tests/import_graph.py` prints the layers and exits 1
naming every import that breaks a rule.

Rules (every import counts, a function-level one too: a lazy import is still a dependency):
1. Packages import only down: flows -> tasks -> music_model -> data_specs -> safe_files (the file-safety
   module every writer uses, standard library only).
2. `music_model` and `data_specs` never import prefect: they are usable from a notebook or another
   orchestrator.
3. Inside `music_model` and `tasks` each subpackage (or top-level module) imports only those its
   table (`MUSIC_MODEL_LAYERS`, `TASKS_LAYERS`) allows it; each table is a hierarchy, so no
   subpackage imports one that uses it. `tasks`' floors are the pipeline: the engine, the stages on
   it, publishing on those, the checks that look at a whole build on top; evaluation needs only the
   engine, and the Prefect task modules sit above all.
4. No circle between modules anywhere (the `music` CLI modules included).
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGES = ("flows", "tasks", "music_model", "data_specs", "safe_files")  # top first: each may import those after it
NO_PREFECT = ("music_model", "data_specs", "safe_files")
# music_model's subpackages (and its two top-level modules) -> what each may import inside music_model.
_ANY = {"settings", "paths", "noise"}
MUSIC_MODEL_LAYERS: dict[str, set[str]] = {
    "settings": set(),
    "paths": {"settings"},
    "noise": {"settings"},
    "media": set(),
    "subjects": {"media"},
    "zoo": _ANY,
    "roles": _ANY | {"media", "zoo"},
    "scoring": _ANY | {"media", "subjects", "roles"},
    "music": _ANY | {"media", "subjects", "zoo", "roles", "scoring"},
}
TASKS_LAYERS: dict[str, set[str]] = {
    "engine": set(),
    "stages": {"engine"},
    "evaluate": {"engine"},
    "publishing": {"engine", "stages"},
    "checks": {"engine", "stages", "publishing"},
    "build_tasks": {"engine", "stages", "publishing"},
    "train_tasks": {"engine"},
}
LAYERS = {"music_model": ("MUSIC_MODEL_LAYERS", MUSIC_MODEL_LAYERS), "tasks": ("TASKS_LAYERS", TASKS_LAYERS)}


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the project's packages under `root`."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `module` imports (the deepest existing module each import names), plus
    `prefect` when it imports prefect."""
    def known(name: str) -> str:
        while name not in modules and "." in name:
            name = name.rpartition(".")[0]
        return name

    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top == "prefect":
                found.add("prefect")
            elif top in PACKAGES:
                found.add(known(name))
    found.discard(module)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    modules = module_files(root)
    return {module: imports_of(module, path, modules) for module, path in modules.items()}


def layer_part(module: str) -> str | None:
    """The subpackage (or top-level module) of a layered package `module` belongs to."""
    parts = module.split(".")
    return parts[1] if parts[0] in LAYERS and len(parts) > 1 else None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in graph:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def violations(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for table_name, table in LAYERS.values():
        for layer in cycles(dict(table)):
            problems.append(f"{table_name} is not a hierarchy: {' <-> '.join(layer)}")
    for module, targets in sorted(graph.items()):
        package, part = module.split(".")[0], layer_part(module)
        table_name, table = LAYERS.get(package, ("", {}))
        if part and part not in table:
            problems.append(f"{package}.{part} has no row in {table_name}")
        for target in sorted(targets):
            if target == "prefect":
                if package in NO_PREFECT:
                    problems.append(f"{module} imports prefect ({package} must stay usable without it)")
                continue
            other = target.split(".")[0]
            if PACKAGES.index(other) < PACKAGES.index(package):
                problems.append(f"{module} imports {target}: {package} may not import {other} (imports go "
                                f"{' -> '.join(PACKAGES)})")
            source, dest = part, layer_part(target)
            if other == package and source in table and dest and source != dest and dest not in table[source]:
                problems.append(f"{module} imports {target}: {package}.{source} may import only "
                                f"{', '.join(sorted(table[source])) or f'nothing in {package}'}")
    problems += [f"import circle: {' -> '.join(cycle)}" for cycle in cycles(graph)]
    return list(dict.fromkeys(problems))


def layer_edges(graph: dict[str, set[str]], package: str = "music_model") -> dict[str, set[str]]:
    """A layered package's subpackage-level graph, as the code has it."""
    edges: dict[str, set[str]] = {}
    for module, targets in graph.items():
        source = layer_part(module)
        if source and module.split(".")[0] == package:
            edges.setdefault(source, set()).update(
                dest for t in targets if t.split(".")[0] == package and (dest := layer_part(t)) and dest != source)
    return edges


def main(root: Path) -> int:
    graph = import_graph(root)
    print(f"{len(graph)} modules, {sum(len(t) for t in graph.values())} imports")
    for package in LAYERS:
        for part, targets in sorted(layer_edges(graph, package).items()):
            print(f"  {package}.{part:{20 - len(package)}s} -> {', '.join(sorted(targets)) or '-'}")
    problems = violations(graph)
    for problem in problems:
        print(f"error: {problem}")
    print("import graph: OK" if not problems else f"import graph: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]))
