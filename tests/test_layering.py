"""The package's layering, read from its source with `ast` (nothing is imported): every module
imports only from its own layer or the layers below it, no two modules import each other through
any chain, and no module of the package is imported inside a function except where ALLOWED says
why. Imports of other distributions (torch, matplotlib, transformers, ...) are not checked here.

A module's layer is the first name of its path under `scratchlm/` (`scratchlm/infer/engine.py`
-> `infer`, `scratchlm/checkpoint.py` -> `checkpoint`); LAYERS lists them lowest first.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "scratchlm"

# Lowest first; names in one tuple share a layer (they may import each other, without a cycle).
LAYERS: list[tuple[str, ...]] = [
    # Leaves on the standard library and torch: settings, errors, atomic files and the cache folder,
    # run folders, and the machine probe (env: timings of this machine's matmuls, cached on disk).
    ("config", "errors", "io", "rundir", "env"),
    ("tokenizer",),
    ("data",),
    ("losses", "model"),
    ("checkpoint",),
    ("train",),
    ("infer",),
    ("tasks",),  # verifiable task families and gold metrics, shared by the stages above
    # The stages (later ones, such as serve, join this tuple). The pretraining stage
    # is train/pretrain.py, held to the train layer by its path.
    ("sft", "align", "rl", "eval", "convert", "viz", "experiments", "quantize", "draft", "serve", "scaling"),
    ("report",),  # the report card reads every stage's run folder
    ("cli", "demo", "__main__"),
]

# (importing module or package, imported module or "*" for any) imports allowed inside a function.
ALLOWED: dict[tuple[str, str], str] = {
    # The CLI layer (scratchlm.cli and its modules): each verb imports its stage when it runs, so
    # `scratchlm --help` and a bad argument answer in 0.1 s, not the 1.5 s that torch and every stage take.
    ("scratchlm.cli", "*"): "lazy per-verb imports",
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def read_modules(root: Path = PACKAGE) -> dict[str, str]:
    """Module name -> source text, for every .py file of the package."""
    return {module_name(p, root): p.read_text(encoding="utf-8") for p in sorted(root.rglob("*.py"))}


def package_imports(name: str, source: str, modules: set[str]) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for each import of the package in one module.
    `from a.b import c` names the module a.b.c when that is a module, else a.b."""
    top = next(iter(modules)).split(".")[0]
    is_package = any(m.startswith(name + ".") for m in modules)
    out = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((a.name, child.lineno, in_function) for a in child.names
                           if a.name.split(".")[0] == top)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: resolved against this module's package
                    anchor = name.split(".")
                    anchor = anchor[: len(anchor) - child.level + (1 if is_package else 0)]
                    base = ".".join(anchor + ([base] if base else []))
                if base.split(".")[0] != top:
                    continue
                for a in child.names:
                    sub = f"{base}.{a.name}"
                    out.append((sub if sub in modules else base, child.lineno, in_function))
            visit(child, inner)

    visit(ast.parse(source), False)
    return out


def layer_of(module: str, layers: list[tuple[str, ...]]) -> int:
    parts = module.split(".")
    if len(parts) == 1:  # the package's own __init__: a docstring and a version, below everything
        return -1
    for i, names in enumerate(layers):
        if parts[1] in names:
            return i
    raise AssertionError(f"{module}: its layer {parts[1]!r} is not in LAYERS; add it where it belongs")


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def walk(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := walk(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (found := walk(m)):
            return found
    return None


def check(sources: dict[str, str], layers: list[tuple[str, ...]] = LAYERS,
          allowed: dict[tuple[str, str], str] = ALLOWED) -> list[str]:
    """Every layering problem in a table of module sources, one line each."""
    modules = set(sources)
    problems = []
    edges: dict[str, set[str]] = {m: set() for m in modules}
    used_allowances = set()
    for m, src in sorted(sources.items()):
        for target, line, in_function in package_imports(m, src, modules):
            if target == m or m.startswith(target + "."):
                continue  # a module reading its own package's __init__ adds no edge of its own
            edges[m].add(target)
            if layer_of(target, layers) > layer_of(m, layers):
                problems.append(f"{m}:{line} imports {target} from a higher layer")
            if in_function:
                key = next((k for k in allowed if k == (m, target)
                            or k[1] == "*" and (m == k[0] or m.startswith(k[0] + "."))), None)
                if key:
                    used_allowances.add(key)
                else:
                    problems.append(f"{m}:{line} imports {target} inside a function")
    cycle = find_cycle(edges)
    if cycle:
        problems.append("import cycle: " + " -> ".join(cycle))
    problems += [f"ALLOWED entry {m} -> {t} is no longer needed" for m, t in sorted(set(allowed) - used_allowances)]
    return list(dict.fromkeys(problems))  # `from a import b, c` on one line: one report


def test_the_package_imports_only_downward_without_cycles_or_hidden_imports():
    sources = read_modules()
    assert len(sources) > 50  # the package was found
    assert check(sources) == []


def test_the_checker_flags_an_upward_import_a_cycle_and_a_function_level_import():
    fake = {
        "pkg": "",
        "pkg.io": "",
        "pkg.model": "from pkg import io\n",
        "pkg.model.gpt": "from pkg.model import layers\n",
        "pkg.model.layers": "from . import gpt\n",  # a cycle inside one layer
        "pkg.train": "import pkg.model.gpt\n",
        "pkg.io.files": "from pkg.train import x\n",  # upward: io is the lowest layer
        "pkg.cli": "def main():\n    from pkg import train\n",
    }
    layers = [("io",), ("model",), ("train",), ("cli",)]
    assert check(fake, layers, {}) == [
        "pkg.cli:2 imports pkg.train inside a function",
        "pkg.io.files:1 imports pkg.train from a higher layer",
        "import cycle: pkg.model.gpt -> pkg.model.layers -> pkg.model.gpt",
    ]
    fixed = {k: v for k, v in fake.items() if k not in ("pkg.io.files", "pkg.model.layers")}
    assert check(fixed, layers, {("pkg.cli", "*"): "lazy verbs"}) == []
    assert check(fixed, layers, {("pkg.cli", "*"): "lazy verbs", ("pkg.model", "pkg.io"): "stale"}) == [
        "ALLOWED entry pkg.model -> pkg.io is no longer needed"]
