"""The house map holds: import layers, no cycles, the listener and the provider session apart.

Every module under relayd/ is parsed with ast and every import counted, including those inside
functions. docs/architecture.md explains the rules; a failure names the offending import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "relayd"

# Who may import whom: a module imports only from its own layer or one below.
LAYERS: dict[str, int] = {
    **dict.fromkeys(
        [
            "errors",
            "states",
            "text",
            "eventloop",
            "notify",
            "logs",
            "replies",
            "pacing",
            "presets",
            "config_records",
            "config_values",
            "config_env",
            "config_rules",
            "config_upstreams",
            "config",
            "__init__",
        ],
        0,
    ),  # the base
    **dict.fromkeys(
        [
            "envelope",
            "spool_files",
            "spool_lock",
            "spool_scan",
            "spool",
            "message",
            "auth",
            "metrics",
            "wire",
            "oauth_endpoint",
            "oauth_store",
            "oauth",
            "fleet",
            "link",
            "breaker",
            "routes",
            "rewrite",
        ],
        1,
    ),
    **dict.fromkeys(
        [
            "aiosmtpd_fence",
            "access",
            "server",
            "aiosmtplib_fence",
            "transaction",
            "handshake",
            "upstream",
            "endpoint",
            "fences",
        ],
        2,
    ),
    **dict.fromkeys(
        [
            "outcome",
            "provider",
            "ledger",
            "pool",
            "verdicts",
            "flights",
            "workers",
            "decisions",
            "admission",
            "relay",
            "outbox",
        ],
        3,
    ),
    **dict.fromkeys(["supervisor", "worker"], 4),
    **dict.fromkeys(["signals", "housekeeping", "app"], 5),
    "cli": 6,  # relayd.cli and every relayd.cli.<module>
    "__main__": 7,  # `python -m relayd`: the command line's entry point
}
# (importer, imported): never, not even through other modules.
APART = [
    ("relayd.server", "relayd.upstream"),
    ("relayd.server", "relayd.aiosmtplib_fence"),
    ("relayd.upstream", "relayd.server"),
    ("relayd.upstream", "relayd.aiosmtpd_fence"),
    ("relayd.relay", "relayd.server"),
    ("relayd.relay", "relayd.aiosmtpd_fence"),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(name: str) -> str:
    """The relayd module an imported name lives in (a package's own name for its __init__)."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def imports(module: str) -> list[tuple[str, int]]:
    """(imported relayd module, line) for every import in module, function-local ones too."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for name in names:
            if name == "relayd" or name.startswith("relayd."):
                found.append((_resolve(name), node.lineno))
    first: dict[str, int] = {}
    for target, line in found:
        if target != module:
            first.setdefault(target, line)
    return sorted(first.items())


GRAPH = {m: imports(m) for m in MODULES}


def edges() -> list[tuple[str, str, int]]:
    return [(m, t, line) for m, targets in GRAPH.items() for t, line in targets]


def layer(module: str) -> int:
    short = module.removeprefix("relayd.")
    if module == "relayd":
        return LAYERS["__init__"]
    if short == "cli" or short.startswith("cli."):
        return LAYERS["cli"]
    return LAYERS[short]


def describe(found: list[tuple[str, str, int]]) -> str:
    return "\n".join(
        f"  {m} -> {t}  ({MODULES[m].relative_to(ROOT.parent)}:{line})" for m, t, line in found
    )


def test_the_parser_sees_function_local_imports():
    """The scan counts an import inside a function (serve imports the daemon lazily)."""
    assert any(t == "relayd.app" for t, _ in GRAPH["relayd.cli.serve"])


def test_every_module_has_a_layer():
    """A new module must be placed in the map (LAYERS here, docs/architecture.md)."""
    unplaced = []
    for m in MODULES:
        try:
            layer(m)
        except KeyError:
            unplaced.append(m)
    assert not unplaced, f"modules with no layer: {unplaced}"


def test_imports_point_down_the_layers():
    """A module imports only from its own layer or below (base < spool < server/upstream < …)."""
    bad = [(m, t, line) for m, t, line in edges() if layer(t) > layer(m)]
    assert not bad, "imports up the layers:\n" + describe(bad)


def test_no_import_cycle():
    """No cycle anywhere in relayd/, counting imports inside functions."""
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t, _ in GRAPH[m]:
            if state.get(t) == 1 and len(cycles) < 10:
                cycles.append([*stack[stack.index(t) :], t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in MODULES:
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join("  " + " -> ".join(c) for c in cycles)


def reachable(start: str) -> dict[str, list[str]]:
    """Every module start imports, directly or not, with one path to it."""
    paths = {start: [start]}
    todo = [start]
    while todo:
        m = todo.pop()
        for t, _ in GRAPH[m]:
            if t not in paths:
                paths[t] = [*paths[m], t]
                todo.append(t)
    return paths


@pytest.mark.parametrize(("importer", "imported"), APART)
def test_the_listener_and_the_provider_session_stay_apart(importer, imported):
    """server never reaches upstream (nor its fence), upstream never server, relay never server."""
    path = reachable(importer).get(imported)
    assert path is None, "forbidden import path: " + " -> ".join(path or [])


def test_only_the_command_line_imports_the_command_line():
    """Nothing outside relayd/cli imports relayd.cli (bar `python -m relayd`, its entry point)."""
    bad = [
        (m, t, line)
        for m, t, line in edges()
        if (t == "relayd.cli" or t.startswith("relayd.cli."))
        and not (m == "relayd.cli" or m.startswith("relayd.cli."))
        and m != "relayd.__main__"
    ]
    assert not bad, "core modules importing the command line:\n" + describe(bad)


def test_commands_import_only_the_shared_cli_module():
    """cli/<command> imports cli.common and the core, never relayd.cli or another command."""
    commands = [m for m in MODULES if m.startswith("relayd.cli.") and m != "relayd.cli.common"]
    bad = [
        (m, t, line)
        for m, t, line in edges()
        if m in commands
        and (t == "relayd.cli" or (t.startswith("relayd.cli.") and t != "relayd.cli.common"))
    ]
    assert commands, "no command modules found"
    assert not bad, "commands importing the cli package or each other:\n" + describe(bad)


MODULE_LINES = 400
FUNCTION_LINES = 40
# Over the limits with a stated reason: module or "module:function" -> why.
OVERSIZE: dict[str, str] = {}


def test_modules_and_functions_stay_small():
    """No module over ~400 lines, no function over ~40, unless OVERSIZE says why."""
    big = []
    for path in MODULES.values():
        where = str(path.relative_to(ROOT.parent))
        source = path.read_text(encoding="utf-8")
        if source.count("\n") > MODULE_LINES and where not in OVERSIZE:
            big.append(f"  {where}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > FUNCTION_LINES and f"{where}:{node.name}" not in OVERSIZE:
                    big.append(f"  {where}:{node.lineno} {node.name}: {lines} lines")
    assert not big, "over the size limits (split, or say why in OVERSIZE):\n" + "\n".join(big)
