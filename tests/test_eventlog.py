"""
The JSON event log rotates like twistd's text log: by size, keeping as
many old files as asked, a line never split, and on SIGUSR1 (rotate, or
reopen if logrotate moved the file away).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from twisted.internet import defer, threads
from twisted.internet.task import Clock
from twisted.logger import Logger, LogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.e2e import DEADLINE, Server, pause
from twisted_lab.client.wire import FramedSocket
from twisted_lab.observe.eventlog import DEFAULT_EVENT_LOG_ROTATE_LENGTH, JSONEventLog
from twisted_lab.runtime.server import ServerOptions


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class FakeReactor(Clock):
    def callFromThread(self, f, *args, **kwargs) -> None:
        self.callLater(0, f, *args, **kwargs)


class EventLogRotationTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir(parents=True)
        self.path = self.dir / "events.jsonl"
        self.publisher = LogPublisher()
        self.log = Logger(namespace="test", observer=self.publisher)

    def start(self, **kwargs) -> JSONEventLog:
        eventLog = JSONEventLog(str(self.path), self.publisher, **kwargs)
        eventLog.start()
        self.addCleanup(eventLog.stop)
        return eventLog

    def test_rotatesBySizeKeepingWholeLines(self) -> None:
        self.start(rotateLength=1000, maxRotatedFiles=2)
        for n in range(100):
            self.log.info("event {n}", event="sample", n=n)
        rotated = sorted(p.name for p in self.dir.iterdir())
        self.assertEqual(rotated, ["events.jsonl", "events.jsonl.1", "events.jsonl.2"])
        # Every file holds whole JSON lines; the newest events are kept, in
        # order, and none is lost between the kept files.
        numbers = []
        for name in ("events.jsonl.2", "events.jsonl.1", "events.jsonl"):
            numbers += [e["n"] for e in lines(self.dir / name)]
        self.assertEqual(numbers, list(range(100 - len(numbers), 100)))
        self.assertLessEqual(os.path.getsize(self.dir / "events.jsonl.1"), 1000 + 600)

    def test_defaultIsTwistdsMegabyte(self) -> None:
        self.assertEqual(DEFAULT_EVENT_LOG_ROTATE_LENGTH, 1_000_000)
        options = ServerOptions()
        options.parseOptions(["--event-log", "e.jsonl"])
        self.assertEqual(options["event-log-rotate-length"], 1_000_000)
        self.assertIsNone(options["event-log-max-rotated"])
        options.parseOptions(
            ["--event-log-rotate-length", "0", "--event-log-max-rotated", "5"]
        )
        self.assertEqual(options["event-log-rotate-length"], 0)
        self.assertEqual(options["event-log-max-rotated"], 5)

    def test_zeroNeverRotates(self) -> None:
        self.start(rotateLength=0)
        for n in range(200):
            self.log.info("event {n}", event="sample", n=n)
        self.assertEqual([p.name for p in self.dir.iterdir()], ["events.jsonl"])
        self.assertEqual(len(lines(self.path)), 200)

    def test_appendsToAnExistingLog(self) -> None:
        self.path.write_text('{"event": "earlier"}\n')
        self.start()
        self.log.info("later", event="later")
        self.assertEqual([e["event"] for e in lines(self.path)], ["earlier", "later"])

    def test_sigusr1RotatesOrReopens(self) -> None:
        """
        SIGUSR1 rotates the log like twistd's (events.jsonl -> .1); after
        logrotate moved the file away, it reopens a new one at the path.
        The handler that was there before (twistd's) is still called.
        """
        called = []
        previous = signal.signal(signal.SIGUSR1, lambda *a: called.append(a[0]))
        self.addCleanup(signal.signal, signal.SIGUSR1, previous)
        reactor = FakeReactor()
        self.start(reactor=reactor)

        self.log.info("before", event="before")
        os.kill(os.getpid(), signal.SIGUSR1)
        self.assertEqual(called, [signal.SIGUSR1])
        reactor.advance(0)
        self.log.info("after", event="after")
        self.assertEqual([e["event"] for e in lines(self.path)], ["after"])
        self.assertEqual(
            [e["event"] for e in lines(self.dir / "events.jsonl.1")], ["before"]
        )

        moved = self.dir / "moved.jsonl"
        os.rename(self.path, moved)
        self.log.info("still to the moved file", event="moved")
        os.kill(os.getpid(), signal.SIGUSR1)
        reactor.advance(0)
        self.log.info("to a new file", event="new")
        self.assertEqual([e["event"] for e in lines(moved)], ["after", "moved"])
        self.assertEqual([e["event"] for e in lines(self.path)], ["new"])
        self.assertFalse((self.dir / "events.jsonl.2").exists())

    def test_stopRestoresTheHandler(self) -> None:
        def mine(*args) -> None:
            pass

        previous = signal.signal(signal.SIGUSR1, mine)
        self.addCleanup(signal.signal, signal.SIGUSR1, previous)
        eventLog = self.start(reactor=FakeReactor())
        self.assertIsNot(signal.getsignal(signal.SIGUSR1), mine)
        eventLog.stop()
        self.assertIs(signal.getsignal(signal.SIGUSR1), mine)


class EventLogEndToEndTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_sigusr1RotatesBothLogsOfARealServer(self):
        """
        SIGUSR1 to a real twistd rotates its text log (twistd's own
        handler, still called) and the JSON event log; later events go to
        the new files.
        """
        server = Server(Path(self.mktemp()).absolute(), "netlab-echo", "--port", "0")
        self.addCleanup(server.cleanup)
        yield defer.ensureDeferred(server.start())
        server.process.send_signal(signal.SIGUSR1)
        rotated = Path(str(server.eventLog) + ".1")
        textRotated = Path(str(server.logFile) + ".1")
        waited = 0.0
        while not (rotated.exists() and textRotated.exists()):
            self.assertLess(waited, DEADLINE, "the logs were not rotated")
            yield defer.ensureDeferred(pause())
            waited += 0.05
        self.assertIn("listening", [e.get("event") for e in lines(rotated)])
        echoed = yield threads.deferToThread(self.echo, server.port)
        self.assertEqual(echoed, b"after")
        yield defer.ensureDeferred(server.stop())
        after = [e.get("event") for e in lines(server.eventLog)]
        self.assertIn("client_connected", after)
        self.assertNotIn("listening", after)
        self.assertIn("client connected", server.logFile.read_text())

    def echo(self, port: int) -> bytes:
        with FramedSocket.connect_to("127.0.0.1", port, timeout=10) as s:
            s.send_message(b"after")
            return s.recv_message()
