"""The package's layout is its architecture: roles as folders, imports that
run one way (from the command line down to the datapath), no cycles."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "streamer"

# Lowest first. A module may import its own layer and the ones below it.
LAYERS = [
    ("streamer", "streamer.errors"),
    ("streamer.datapath",),
    ("streamer.delivery",),
    ("streamer.observe",),
    ("streamer.settings",),
    ("streamer.accounting", "streamer.export", "streamer.control"),
    ("streamer.daemon",),
    ("streamer.demo",),
    ("streamer.cli",),
]


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    best, at = -1, None
    for i, names in enumerate(LAYERS):
        for n in names:
            if (module == n or module.startswith(n + ".")) and len(n) > best:
                best, at = len(n), i
    assert at is not None, module
    return at


def imports() -> dict[str, set[str]]:
    """Every streamer module and the streamer modules it imports (also the
    imports inside functions)."""
    out: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        mod = module_name(path)
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("streamer")}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if not target.startswith("streamer"):
                    continue
                for a in node.names:       # `from . import abi` names a module
                    sub = f"{target}.{a.name}"
                    found.add(sub if (PKG.parent / (sub.replace(".", "/") + ".py")).exists()
                              or (PKG.parent / sub.replace(".", "/")).is_dir() else target)
        out[mod] = found - {mod}
    return out


def test_roles_are_folders():
    folders = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == {"datapath", "delivery", "observe", "accounting", "export", "control", "demo"}
    top = {p.stem for p in PKG.glob("*.py")}
    assert top == {"__init__", "errors", "settings", "daemon", "cli"}


def test_imports_run_down_the_layers():
    up = []
    for mod, targets in imports().items():
        for t in targets:
            if layer_of(t) > layer_of(mod):
                up.append(f"{mod} -> {t}")
    assert not up, "imports that run back up a layer:\n" + "\n".join(sorted(up))


def test_only_the_command_line_imports_export():
    """export and accounting share a layer but not code; nothing but cli
    reaches into export (its consumer is a command, not a library)."""
    graph = imports()
    users = sorted(f"{mod} -> {t}" for mod, targets in graph.items()
                   if not mod.startswith("streamer.export") and mod != "streamer.cli"
                   for t in targets if t.startswith("streamer.export"))
    assert not users, "\n".join(users)
    borrowed = sorted(f"{mod} -> {t}" for mod, targets in graph.items()
                      if mod.startswith("streamer.export")
                      for t in targets if t.startswith("streamer.accounting"))
    assert not borrowed, "\n".join(borrowed)
    assert any(t.startswith("streamer.export") for t in graph["streamer.cli"])


def test_no_import_cycles():
    graph = imports()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]) if nxt in path
                              else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_layering_check_sees_a_wrong_import():
    assert layer_of("streamer.datapath.abi") < layer_of("streamer.delivery.wire")
    assert layer_of("streamer.cli") == len(LAYERS) - 1
    assert layer_of("streamer.settings") < layer_of("streamer.accounting.db")
