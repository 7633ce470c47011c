"""
Event names are one list: every C{event} a netlab module logs is a
constant of L{twisted_lab.codecs.events} (never a string of its own, which
could drift from what log processors match on), and the events table of
docs/operations.md names exactly those events.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from twisted_lab.codecs import events

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "twisted_lab"


def declaredEvents() -> set[str]:
    return {
        value
        for name, value in vars(events).items()
        if name.isupper() and isinstance(value, str)
    }


def documentedEvents() -> set[str]:
    text = (REPO / "docs" / "operations.md").read_text(encoding="utf-8")
    section = text[text.index("## Events") :]
    section = section[: section.index("\n## ", 1)]
    return set(re.findall(r"^\| `([a-z_]+)` \|", section, re.M))


def literalEventKeywords(source: str) -> list[str]:
    """
    The C{event="..."} keywords given as string literals in C{source}.
    """
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            for keyword in node.keywords:
                value = keyword.value
                if (
                    keyword.arg == "event"
                    and isinstance(value, ast.Constant)
                    and isinstance(value.value, str)
                ):
                    found.append(value.value)
    return found


class EventNameTests(SynchronousTestCase):
    def test_theTableIsTheModule(self) -> None:
        self.assertEqual(documentedEvents(), declaredEvents())

    def test_namesAreUnique(self) -> None:
        values = [
            value
            for name, value in vars(events).items()
            if name.isupper() and isinstance(value, str)
        ]
        self.assertEqual(len(values), len(set(values)))

    def test_noModuleNamesAnEventOfItsOwn(self) -> None:
        checked = 0
        for path in sorted(PACKAGE.rglob("*.py")):
            checked += 1
            found = literalEventKeywords(path.read_text(encoding="utf-8"))
            self.assertEqual(found, [], str(path.relative_to(PACKAGE)))
        self.assertGreater(checked, 30)

    def test_theCheckSeesALiteral(self) -> None:
        self.assertEqual(
            literalEventKeywords('log.info("x", event="made_up", peer=p)'),
            ["made_up"],
        )
