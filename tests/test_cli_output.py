"""
What the client prints from the network stays harmless: error lines are
one line with every control character neutralised, --json is ASCII, and a
pipe is read line by line from its descriptor (Ctrl-C while a reader thread
waits on it does not abort the interpreter).
"""

from __future__ import annotations

import io
import json
import os

from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from twisted_lab.client.cli import Abort, Output, StdinReader


class OutputTests(SynchronousTestCase):
    def test_errorLinesAreOneLineWithNoControlCharacters(self) -> None:
        stderr = io.StringIO()
        output = Output(stdout=io.StringIO(), stderr=stderr)
        hostile = "bad\x1b[2J\x1b]0;T\x07\u009b31m\u202e\r\nX: forged"
        output.failed(Abort(hostile, code=1))
        text = stderr.getvalue()
        self.assertEqual(text.count("\n"), 1)
        for char in "\x1b\x07\u009b\u202e\r":
            self.assertNotIn(char, text)

    def test_jsonIsAscii(self) -> None:
        stdout = io.StringIO()
        output = Output(json=True, stdout=stdout, stderr=io.StringIO())
        output.emit({"event": "reply", "text": "\u009b\x7f\u202e é"})
        line = stdout.getvalue()
        self.assertTrue(line.isascii())
        self.assertEqual(json.loads(line)["text"], "\u009b\x7f\u202e é")


class StdinReaderTests(TestCase):
    def test_readsEveryLineOfAPipeToItsEnd(self):
        read, write = os.pipe()
        os.write(write, b"one\ntwo\n" + b"x" * 30_000 + b"\nlast")
        os.close(write)
        reader = StdinReader(reactor, fd=read)

        async def collect() -> list[bytes | None]:
            lines = []
            while (line := await reader.next()) is not None:
                lines.append(line)
            os.close(read)
            return lines

        d = defer.ensureDeferred(collect())
        d.addCallback(
            self.assertEqual, [b"one", b"two", b"x" * 30_000, b"last"]
        )
        return d
