"""The package's import graph: no cycles, and dependencies point downward (world < latents < tools)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lerobot_policy_world_modality"
NAME = PACKAGE.name


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Modules of the package that `path` imports anywhere (function-level imports included)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" for a in node.names]
            found.update(n if _exists(n) else target for n in names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.split(".")[0] == NAME and m != module}


def _exists(module: str) -> bool:
    rel = Path(*module.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


GRAPH = {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def _cycle_from(start: str) -> list[str] | None:
    """A path start -> ... -> start through the import graph, if there is one."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in GRAPH.get(node, ()):
            if nxt == start:
                return [*path, start]
            if nxt not in seen and nxt != NAME:  # the root package imports every policy on purpose
                seen.add(nxt)
                stack.append((nxt, [*path, nxt]))
    return None


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m != NAME))
def test_no_import_cycle(module):
    """No module reaches itself again through imports (through the root package aside: it registers all)."""
    assert _cycle_from(module) is None, " -> ".join(_cycle_from(module))


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        ("world", ("latents", "tools", "world_f", "world_token_c", "smolvla_world", "trunk_policy", "pipelines")),
        ("latents", ("tools", "world_f", "world_token_c", "smolvla_world", "trunk_policy", "pipelines")),
    ],
)
def test_dependencies_point_downward(layer, forbidden):
    """world/ is pure torch; latents/ sits below the policies and the console scripts in tools/."""
    bad = {
        (module, dep)
        for module, deps in GRAPH.items()
        if module.startswith(f"{NAME}.{layer}.")
        for dep in deps
        if dep.split(".")[1] in forbidden
    }
    assert not bad, sorted(bad)
