"""
The error codes are one list: the enum in L{twisted_lab.codecs.errors} and
the table of docs/protocol.md name the same codes, and no server module
spells a code as a bare string (a typo there would be a new, undocumented
code that clients cannot know).
"""

from __future__ import annotations

import re
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from twisted_lab.codecs.errors import ErrorCode

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "twisted_lab"
SERVER_SIDE = ("services", "dispatch.py", "transports", "taps", "runtime")


def documentedCodes() -> set[str]:
    text = (REPO / "docs" / "protocol.md").read_text(encoding="utf-8")
    table = text[text.index("| `bad_request` |") :]
    codes = set()
    for line in table.splitlines():
        match = re.match(r"\| `([a-z_]+)` \|", line)
        if match is None:
            break
        codes.add(match.group(1))
    return codes


class ErrorCodeTests(SynchronousTestCase):
    def test_theEnumIsTheDocumentedTable(self) -> None:
        self.assertEqual({code.value for code in ErrorCode}, documentedCodes())

    def test_aCodeIsTheStringOnTheWire(self) -> None:
        self.assertEqual(ErrorCode.RATE_LIMITED, "rate_limited")
        self.assertEqual(f"{ErrorCode.SLOW_CONSUMER}", "slow_consumer")

    def test_noServerModuleSpellsACodeAsAString(self) -> None:
        codes = "|".join(code.value for code in ErrorCode)
        literal = re.compile(
            rf'(RequestError\(\s*|"code":\s*|closeWith(?:Error)?\(\s*)"({codes})"'
        )
        checked = 0
        for path in sorted(PACKAGE.rglob("*.py")):
            relative = path.relative_to(PACKAGE)
            if not str(relative).startswith(SERVER_SIDE):
                continue
            checked += 1
            found = literal.findall(path.read_text(encoding="utf-8"))
            self.assertEqual(found, [], str(relative))
        self.assertGreater(checked, 10)

    def test_theCheckFindsABareCode(self) -> None:
        codes = "|".join(code.value for code in ErrorCode)
        literal = re.compile(rf'(RequestError\(\s*)"({codes})"')
        self.assertTrue(literal.search('raise RequestError("rate_limited", "x")'))
