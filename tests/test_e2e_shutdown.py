"""
End to end: what the JSON servers do on SIGTERM (tell clients, finish, exit
within 5 s) and when the database is locked by another process (an
C{internal_error}, a logged event, no crash, and service resumes).
"""

from __future__ import annotations

import signal
import sqlite3
import time
from pathlib import Path

from twisted.internet import defer, threads
from twisted.trial.unittest import TestCase

from tests.e2e import Server
from twisted_lab.client.wire import FramedSocket


class ShutdownTests(TestCase):
    timeout = 60

    def server(self, plugin: str) -> Server:
        workdir = Path(self.mktemp()).absolute()
        server = Server(
            workdir, plugin, "--port", "0", "--db", str(workdir / "netlab.sqlite3"),
            "--hash-memory-kib", "1024",
        ) if plugin != "netlab-identity" else Server(
            workdir, plugin, "--port", "0", "--db", str(workdir / "netlab.sqlite3")
        )  # fmt: skip
        self.addCleanup(server.cleanup)
        return server

    @defer.inlineCallbacks
    def test_sigtermTellsClientsAndExitsQuickly(self):
        for plugin in ("netlab-identity", "netlab-chat"):
            server = self.server(plugin)
            yield defer.ensureDeferred(server.start())
            sock = yield threads.deferToThread(
                FramedSocket.connect_to, "127.0.0.1", server.port
            )
            self.addCleanup(sock.close)
            sock.send_json({"type": "ping"})
            if plugin == "netlab-identity":
                yield threads.deferToThread(sock.recv_json)  # the greeting
            pong = yield threads.deferToThread(sock.recv_json)
            self.assertEqual(pong, {"type": "pong"})
            start = time.monotonic()
            status = yield defer.ensureDeferred(server.stop(signal.SIGTERM))
            self.assertLess(time.monotonic() - start, 5.0)
            self.assertIn(status, (0, -signal.SIGTERM))
            last = yield threads.deferToThread(sock.recv_json)
            self.assertEqual(last["code"], "server_shutdown", plugin)
            self.assertEqual(server.eventNames()[-1], "server_stopped")

    @defer.inlineCallbacks
    def test_lockedDatabaseIsAnInternalErrorNotACrash(self):
        server = self.server("netlab-identity")
        yield defer.ensureDeferred(server.start())
        db = server.workdir / "netlab.sqlite3"

        def run():
            locker = sqlite3.connect(db, isolation_level=None, timeout=1)
            locker.execute("BEGIN EXCLUSIVE")
            try:
                with FramedSocket.connect_to(
                    "127.0.0.1", server.port, timeout=30,
                    source_address=("127.0.0.7", 0),
                ) as s:  # fmt: skip
                    greeting = s.recv_json()  # the visit lookup waits, then fails
            finally:
                locker.execute("ROLLBACK")
                locker.close()
            with FramedSocket.connect_to(
                "127.0.0.1", server.port, timeout=30, source_address=("127.0.0.7", 0)
            ) as s:
                s.recv_json()
                s.send_json({"type": "name", "name": "After The Lock"})
                after = s.recv_json()
            return greeting, after

        greeting, after = yield threads.deferToThread(run)
        self.assertEqual(greeting["code"], "internal_error")
        self.assertEqual(after["type"], "welcome")
        yield defer.ensureDeferred(server.stop())
        self.assertIn("internal_error", server.eventNames())
        self.flushLoggedErrors()
