"""
The import graph follows the layers of shared/DESIGN.md as far as the code
has reached them: the codecs (framing, the JSON codec, limits) import no
other part of netlab and no reactor; the client never imports the server
side; library code never imports the global reactor (only each service's
makeService falls back to it, for twistd).  Checked on the source with
L{ast}, so an import inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

PACKAGE = Path(__file__).resolve().parent.parent / "twisted_lab"

CODECS = {"framing", "codec", "limits"}
CLIENT = {"client", "chatclient", "cli", "sessions", "terminal", "wire"}
SERVER = {
    "server",
    "messages",
    "echo",
    "identity",
    "auth",
    "chat",
    "store",
    "accounts",
    "sessionwatch",
    "startup",
    "metrics",
    "systemd",
}


def imports(module: str) -> list[tuple[str, str]]:
    """
    (imported module, enclosing function or "") for every import in
    C{module}.
    """
    tree = ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
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


def netlabModules(module: str) -> set[str]:
    prefix = "twisted_lab."
    return {
        name[len(prefix) :].split(".")[0]
        for name, _ in imports(module)
        if name.startswith(prefix)
    }


class LayerTests(SynchronousTestCase):
    def test_everyModuleIsInALayer(self) -> None:
        modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
        self.assertEqual(modules - CODECS - CLIENT - SERVER - {"events"}, set())

    def test_codecsImportNothingOfNetlab(self) -> None:
        for module in CODECS:
            self.assertEqual(netlabModules(module), set(), module)

    def test_theClientNeverImportsTheServerSide(self) -> None:
        for module in CLIENT:
            self.assertEqual(netlabModules(module) & SERVER, set(), module)

    def test_libraryCodeNeverImportsTheGlobalReactor(self) -> None:
        for module in CODECS | SERVER | {"events"}:
            for name, function in imports(module):
                if name == "twisted.internet.reactor":
                    self.assertEqual(
                        function, "makeService", f"{module} imports the reactor"
                    )
