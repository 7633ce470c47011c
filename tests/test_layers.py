"""
The import graph follows the layers of shared/DESIGN.md, as the folders of
C{twisted_lab} show them:

    taps         wiring: Options and makeService, one module per plugin
    runtime      listening, port file, event log, metrics, systemd
    transports   Int32 (TCP, TLS, unix) and WebSocket adapters, echo
    dispatch     the one request dispatcher every transport drives
    services     identity, auth, chat: logic with a clock, stores, clients
    ports        the interfaces services need (stores, chat clients)
    observe      counters and metrics, the data-event meter, the event log
    storage      SQLite, PostgreSQL and memory stores
    bus          publish/subscribe between nodes: local, Redis
    codecs       framing, JSON messages, error codes, event names
    client       the netlab command and its libraries

Each layer imports only the layers below it; the client never imports the
server side; library code never imports the global reactor (only a tap's
makeService falls back to it, for twistd).  Checked on the source with
L{ast}, so an import inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

PACKAGE = Path(__file__).resolve().parent.parent / "twisted_lab"

#: Each layer and the layers it may import (besides itself).
ALLOWED = {
    "codecs": set(),
    "ports": {"codecs"},
    "services": {"codecs", "ports"},
    "dispatch": {"codecs", "ports", "services"},
    "storage": {"codecs", "ports"},
    "bus": {"codecs", "ports"},
    "observe": {"codecs"},
    "transports": {"codecs", "ports", "services", "dispatch", "observe"},
    "runtime": {"codecs", "ports", "observe", "storage", "bus", "transports"},
    "taps": {
        "codecs",
        "ports",
        "services",
        "dispatch",
        "storage",
        "bus",
        "observe",
        "transports",
        "runtime",
    },
    "client": {"codecs"},
}

#: What service logic never imports (modules or their prefixes).
FORBIDDEN_IN_SERVICES = (
    "twisted.internet.reactor",
    "twisted.protocols.basic",
    "twisted.web",
    "twisted.enterprise",
    "sqlite3",
    "psycopg",
    "redis",
    "txredisapi",
    "twisted_lab.codecs.framing",
    "twisted_lab.transports",
    "twisted_lab.storage",
)


def layerOf(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    if len(relative.parts) == 1:
        return relative.stem
    return relative.parts[0]


def sourceFiles() -> list[Path]:
    return sorted(
        p
        for p in PACKAGE.rglob("*.py")
        if p.name not in {"__init__.py", "__main__.py"}
    )


def imports(path: Path) -> list[tuple[str, str]]:
    """
    (imported module, enclosing function or "") for every import in
    C{path}.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: list[tuple[str, str]] = []

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = function
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                inner = child.name
            if isinstance(child, ast.Import):
                found.extend((alias.name, inner) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module:
                found.extend(
                    (f"{child.module}.{alias.name}", inner) for alias in child.names
                )
            visit(child, inner)

    visit(tree, "")
    return found


def netlabLayers(path: Path) -> set[str]:
    """
    The layers (packages, or top-level modules) C{path} imports from; the
    package's own metadata (C{__version__}) is no layer.
    """
    prefix = "twisted_lab."
    found = set()
    for name, _ in imports(path):
        if name.startswith(prefix):
            first = name[len(prefix) :].split(".")[0]
            if (PACKAGE / first).is_dir() or (PACKAGE / f"{first}.py").exists():
                found.add(first)
    return found


class LayerTests(SynchronousTestCase):
    def test_everyModuleIsInALayer(self) -> None:
        stray = {
            str(p.relative_to(PACKAGE))
            for p in sourceFiles()
            if layerOf(p) not in ALLOWED and p.name != "wire.py"
        }
        self.assertEqual(stray, set())

    def test_eachLayerImportsOnlyTheLayersBelow(self) -> None:
        for path in sourceFiles():
            layer = layerOf(path)
            if layer == "wire":  # the compatibility name of client.wire
                self.assertEqual(netlabLayers(path), {"client"})
                continue
            wrong = netlabLayers(path) - ALLOWED[layer] - {layer}
            self.assertEqual(wrong, set(), f"{path.relative_to(PACKAGE)}")

    def test_serviceLogicImportsNoTransportStorageOrReactor(self) -> None:
        checked = 0
        for path in sourceFiles():
            if layerOf(path) not in {"services", "ports", "dispatch"}:
                continue
            checked += 1
            for name, _ in imports(path):
                self.assertFalse(
                    name.startswith(FORBIDDEN_IN_SERVICES),
                    f"{path.relative_to(PACKAGE)} imports {name}",
                )
        self.assertGreater(checked, 5)

    def test_theCheckSeesAForbiddenImport(self) -> None:
        """
        The checks above would notice: an import inside a function is seen.
        """
        found = imports(PACKAGE / "taps" / "echo.py")
        self.assertIn(("twisted.internet.reactor", "makeService"), found)

    def test_libraryCodeNeverImportsTheGlobalReactor(self) -> None:
        for path in sourceFiles():
            for name, function in imports(path):
                if name == "twisted.internet.reactor":
                    self.assertEqual(layerOf(path), "taps", str(path))
                    self.assertEqual(function, "makeService", str(path))
