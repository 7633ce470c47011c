"""
End to end: the real C{twistd netlab-identity}, the real C{netlab identity}
client bound to different loopback source addresses, restarts, SIGKILL.
"""

from __future__ import annotations

import signal
import sqlite3
import threading
from pathlib import Path

from twisted.internet import defer, threads
from twisted.trial.unittest import TestCase

from tests.e2e import Server, runNetlab
from twisted_lab.client.wire import ConnectionClosed, FramedSocket


class IdentityEndToEndTests(TestCase):
    timeout = 90

    def server(self) -> Server:
        workdir = Path(self.mktemp()).absolute()
        server = Server(
            workdir,
            "netlab-identity",
            "--port",
            "0",
            "--db",
            str(workdir / "netlab.sqlite3"),
        )
        self.addCleanup(server.cleanup)
        return server

    def identity(self, server: Server, source: str, *args: str):
        return defer.ensureDeferred(
            runNetlab(
                "identity",
                "-q",
                "--host",
                "127.0.0.1",
                "--port",
                str(server.port),
                "--bind",
                source,
                *args,
            )
        )

    @defer.inlineCallbacks
    def test_twoClientsAndARestart(self):
        server = self.server()
        yield defer.ensureDeferred(server.start())
        out, err, code = yield self.identity(server, "127.0.0.2", "--name", "Alice")
        self.assertEqual(code, 0, err)
        self.assertEqual(
            out.decode().splitlines(),
            ["The server does not know you yet.", "Hello, Alice! (visit 1)"],
        )
        # The other address is asked; its name comes from standard input.
        out, err, code = yield defer.ensureDeferred(
            runNetlab(
                "identity",
                "-q",
                "--host",
                "127.0.0.1",
                "--port",
                str(server.port),
                "--bind",
                "127.0.0.3",
                stdin="Zoë\n".encode(),
            )
        )
        self.assertEqual(code, 0, err)
        self.assertIn("Hello, Zoë! (visit 1)", out.decode())

        yield defer.ensureDeferred(server.stop())
        yield defer.ensureDeferred(server.start())
        out, _, _ = yield self.identity(server, "127.0.0.2")
        self.assertEqual(out.decode().strip(), "Welcome back, Alice! (visit 2)")
        out, _, _ = yield self.identity(server, "127.0.0.3")
        self.assertEqual(out.decode().strip(), "Welcome back, Zoë! (visit 2)")

        out, _, code = yield self.identity(server, "127.0.0.3", "--forget")
        self.assertEqual(code, 0)
        self.assertIn("forgotten", out.decode())
        yield defer.ensureDeferred(server.stop())
        names = server.eventNames()
        for event in (
            "identity_asked",
            "identity_stored",
            "identity_known",
            "identity_forgotten",
        ):
            self.assertIn(event, names)

    @defer.inlineCallbacks
    def test_invalidNameFromTheClient(self):
        server = self.server()
        yield defer.ensureDeferred(server.start())
        out, err, code = yield self.identity(server, "127.0.0.6", "--name", "a\u202eb")
        self.assertEqual(code, 1)
        self.assertIn("name refused", err.decode())
        self.assertNotIn("Traceback", err.decode())

    @defer.inlineCallbacks
    def test_sigkillRightAfterWelcome(self):
        """
        A welcome means committed: kill -9 right after it loses nothing.
        """
        server = self.server()
        yield defer.ensureDeferred(server.start())

        def nameThenKill():
            with FramedSocket.connect_to(
                "127.0.0.1", server.port, source_address=("127.0.0.4", 0)
            ) as s:
                assert s.recv_json() == {"type": "ask_name"}
                s.send_json({"type": "name", "name": "Durable"})
                welcome = s.recv_json()
                server.process.send_signal(signal.SIGKILL)
                return welcome

        welcome = yield threads.deferToThread(nameThenKill)
        self.assertEqual(welcome["type"], "welcome")
        status = yield defer.ensureDeferred(server.wait())
        self.assertEqual(status, -signal.SIGKILL)
        db = server.workdir / "netlab.sqlite3"
        with sqlite3.connect(db) as connection:
            self.assertEqual(
                connection.execute("PRAGMA integrity_check").fetchone()[0], "ok"
            )
        yield defer.ensureDeferred(server.start())
        out, _, _ = yield self.identity(server, "127.0.0.4")
        self.assertEqual(out.decode().strip(), "Welcome back, Durable! (visit 2)")


class IdentityStormTests(TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def test_sigkillDuringANamingStorm(self):
        """
        Clients on 20 addresses rename themselves as fast as they can; after
        kill -9 and a restart, every address has the last name it was
        welcomed with (or the one it was sending when the server died).
        """
        workdir = Path(self.mktemp()).absolute()
        server = Server(
            workdir, "netlab-identity", "--port", "0",
            "--db", str(workdir / "netlab.sqlite3"),
        )  # fmt: skip
        self.addCleanup(server.cleanup)
        yield defer.ensureDeferred(server.start())
        acknowledged: dict[str, str] = {}
        inFlight: dict[str, str] = {}
        lock = threading.Lock()

        def rename(address: str) -> None:
            try:
                with FramedSocket.connect_to(
                    "127.0.0.1", server.port, source_address=(address, 0)
                ) as s:
                    s.recv_json()
                    for i in range(100_000):
                        name = f"{address} #{i}"
                        with lock:
                            inFlight[address] = name
                        s.send_json({"type": "name", "name": name})
                        if s.recv_json().get("name") == name:
                            with lock:
                                acknowledged[address] = name
            except (ConnectionClosed, OSError):
                return

        addresses = [f"127.0.2.{i}" for i in range(1, 21)]
        workers = [threading.Thread(target=rename, args=(a,)) for a in addresses]

        def stormThenKill():
            for w in workers:
                w.start()
            while True:
                with lock:
                    if (
                        len(acknowledged) == len(addresses)
                        and sum(int(n.split("#")[1]) for n in acknowledged.values())
                        > 200
                    ):
                        break
                threading.Event().wait(0.01)
            server.process.send_signal(signal.SIGKILL)
            for w in workers:
                w.join(30)

        yield threads.deferToThread(stormThenKill)
        self.assertEqual((yield defer.ensureDeferred(server.wait())), -signal.SIGKILL)
        with sqlite3.connect(server.workdir / "netlab.sqlite3") as connection:
            self.assertEqual(
                connection.execute("PRAGMA integrity_check").fetchone()[0], "ok"
            )
            stored = dict(connection.execute("SELECT address, name FROM identities"))
        for address in addresses:
            self.assertIn(stored[address], (acknowledged[address], inFlight[address]))
        yield defer.ensureDeferred(server.start())
        out, _, _ = yield defer.ensureDeferred(
            runNetlab("identity", "-q", "--host", "127.0.0.1", "--port",
                      str(server.port), "--bind", addresses[0])
        )  # fmt: skip
        self.assertIn(stored[addresses[0]], out.decode())
