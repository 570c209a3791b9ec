"""The package's import graph: no cycles, and a Flat-LoRA engine that depends on nothing but torch and peft.

The graph is read from the source (AST), not from sys.modules, so an import inside a function counts as much
as one at the top of a file: a cycle through a lazy import is still a knot, it only fails later. Imports under
`if TYPE_CHECKING:` are left out (they never run).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("flatlora_diffusion", "app")
FLAT = "flatlora_diffusion.flat"
# What the Flat-LoRA engine may not reach: the training side, data, export, the app, and the diffusion libraries.
FLAT_FORBIDDEN_THIRD_PARTY = ("diffusers", "transformers", "accelerate", "gradio")


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module (a project module, or the top-level name of a third-party one)
    line: int
    module_level: bool  # runs when `source` is imported (not inside a function)


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _is_type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _walk(node: ast.AST, in_function: bool = False):
    """(import node, inside a function?) for every import that can run, in source order."""
    for child in ast.iter_child_nodes(node):
        if _is_type_checking_block(child):
            continue
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, in_function
        yield from _walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))


def _resolve(name: str, modules: dict[str, Path]) -> str:
    """The project module `name` denotes (its longest known prefix), or the top-level name of an outside one."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return parts[0]


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    is_package = path.name == "__init__.py"
    found = []
    for node, in_function in _walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [_resolve(alias.name, modules) for alias in node.names]
        else:
            base = node.module or ""
            if node.level:  # relative: from the package of `module` (itself, when it is a package's __init__)
                package = module.split(".")
                drop = node.level - 1 if is_package else node.level
                package = package[: len(package) - drop]
                base = ".".join(package + ([base] if base else []))
            # `from pkg import name`: the submodule pkg.name when there is one, else pkg itself (an attribute of it)
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else _resolve(base, modules)
                for alias in node.names
            ]
        found += [Import(module, t, node.lineno, not in_function) for t in targets if t != module]
    return found


def import_graph() -> dict[str, list[Import]]:
    modules = project_modules()
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def find_cycles(graph: dict[str, list[Import]]) -> list[list[Import]]:
    """One cycle (as its chain of imports) through each strongly connected group of project modules."""
    edges = {m: [imp for imp in imps if imp.target in graph] for m, imps in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def connect(m: str) -> None:  # Tarjan's strongly connected components
        index[m] = low[m] = len(index)
        stack.append(m)
        on_stack.add(m)
        for imp in edges[m]:
            if imp.target not in index:
                connect(imp.target)
                low[m] = min(low[m], low[imp.target])
            elif imp.target in on_stack:
                low[m] = min(low[m], index[imp.target])
        if low[m] == index[m]:
            group = set()
            while True:
                top = stack.pop()
                on_stack.discard(top)
                group.add(top)
                if top == m:
                    break
            if len(group) > 1:
                groups.append(group)

    for m in sorted(edges):
        if m not in index:
            connect(m)
    return [_cycle_in(group, edges) for group in groups]


def _cycle_in(group: set[str], edges: dict[str, list[Import]]) -> list[Import]:
    """A shortest chain of imports from the group's first module back to itself (breadth-first)."""
    start = min(group)
    came_by: dict[str, Import] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for m in frontier:
            for imp in edges[m]:
                if imp.target not in group or imp.target in came_by:
                    continue
                came_by[imp.target] = imp
                if imp.target == start:
                    chain = [imp]
                    while chain[0].source != start:
                        chain.insert(0, came_by[chain[0].source])
                    return chain
                nxt.append(imp.target)
        frontier = nxt
    raise AssertionError(f"no cycle found in the strongly connected group {sorted(group)}")


def _describe(chain: list[Import]) -> str:
    steps = [f"{imp.source} -> {imp.target} (line {imp.line}{'' if imp.module_level else ', in a function'})"
             for imp in chain]
    return "\n    ".join(steps)


def test_the_cycle_finder_finds_a_cycle_through_a_lazy_import():
    def imp(source, target, module_level=True):
        return Import(source, target, 1, module_level)

    graph = {
        "a": [imp("a", "b"), imp("a", "torch")],
        "b": [imp("b", "c", module_level=False)],
        "c": [imp("c", "a")],
        "d": [imp("d", "a")],
    }
    cycles = find_cycles(graph)
    assert [[(i.source, i.target) for i in chain] for chain in cycles] == [[("a", "b"), ("b", "c"), ("c", "a")]]
    assert find_cycles({"a": [imp("a", "b")], "b": []}) == []


def test_relative_imports_resolve_to_submodules_or_their_package(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from .a import x\n",
        "a.py": "from . import b, VERSION\nfrom .sub import c\nimport pkg.sub.c\n",
        "b.py": "def f():\n    from .sub.c import y\n",
        "sub/__init__.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .. import a\n",
        "sub/c.py": "from ..b import f\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    modules = {"pkg": pkg / "__init__.py", "pkg.a": pkg / "a.py", "pkg.b": pkg / "b.py",
               "pkg.sub": pkg / "sub/__init__.py", "pkg.sub.c": pkg / "sub/c.py"}

    def targets(m):
        return [(i.target, i.module_level) for i in imports_of(m, modules[m], modules)]

    assert targets("pkg") == [("pkg.a", True)]
    assert targets("pkg.a") == [("pkg.b", True), ("pkg", True), ("pkg.sub.c", True), ("pkg.sub.c", True)]
    assert targets("pkg.b") == [("pkg.sub.c", False)]
    assert targets("pkg.sub") == [("typing", True)]  # the TYPE_CHECKING import never runs
    assert targets("pkg.sub.c") == [("pkg.b", True)]


def test_the_package_has_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n  " + "\n  ".join(_describe(chain) for chain in cycles)


def test_flat_lora_engine_imports_only_itself_torch_and_peft():
    graph = import_graph()
    flat_modules = [m for m in graph if m == FLAT or m.startswith(FLAT + ".")]
    assert flat_modules, f"{FLAT} is missing"
    wrong = []
    for m in flat_modules:
        for imp in graph[m]:
            project = imp.target.split(".")[0] in PACKAGES
            if project and not (imp.target == FLAT or imp.target.startswith(FLAT + ".")):
                wrong.append(imp)  # training, data, export, the app: not even lazily
            elif imp.module_level and imp.target in FLAT_FORBIDDEN_THIRD_PARTY:
                wrong.append(imp)
    assert not wrong, "Flat-LoRA reaches outside itself:\n  " + "\n  ".join(
        f"{i.source} -> {i.target} (line {i.line})" for i in wrong)


def test_flat_lora_runs_on_a_plain_peft_model_without_diffusers():
    """The engine on a peft model in a process where diffusers cannot be imported."""
    code = """
import sys
sys.modules["diffusers"] = None  # any import of diffusers now raises ImportError
import torch
from torch import nn
from peft import LoraConfig, inject_adapter_in_model
from flatlora_diffusion.flat import FlatLoRA
model = inject_adapter_in_model(LoraConfig(r=2, target_modules=["0"]), nn.Sequential(nn.Linear(8, 4)))
flat = FlatLoRA(model, sigma=0.5, schedule="constant", backend="reference")
x = torch.randn(3, 8)
clean = model(x)
with flat.perturb(0):
    noisy = model(x)
    noisy.sum().backward()
assert not torch.equal(clean, noisy) and torch.equal(clean, model(x))
print("OK")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


def test_the_command_line_and_the_demo_start_without_torch():
    """`flatlora-diffusion --help`, a mistyped flag and the demo's start run before torch is imported (2 s): the demo
    starts its fork server first, so that the runs' imports overlap the command's own; the package's public names
    still resolve (lazily)."""
    code = ("import sys; import flatlora_diffusion.cli, flatlora_diffusion.demo; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "from flatlora_diffusion import FlatLoRA, sigma_at; import flatlora_diffusion as f; "
            "assert FlatLoRA.__name__ == 'FlatLoRA' and 'torch' in sys.modules; "
            "assert not hasattr(f, 'no_such_name'); print('OK')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]
