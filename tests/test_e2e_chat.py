"""
End to end: the real C{twistd netlab-chat} with the real C{netlab} client:
a token from netlab-auth works on chat, SIGKILL during a burst loses no seq
anyone saw, and the interactive client (driven through a stdin pipe)
reconnects after a restart and catches up on what it missed.
"""

from __future__ import annotations

import signal
import socket
import sqlite3
import subprocess
import threading
from pathlib import Path

from twisted.internet import defer, threads
from twisted.trial.unittest import TestCase

from tests.e2e import DEADLINE, Server, netlabCommand, pause, runNetlab
from tests.helpers import subprocessEnv
from twisted_lab.client.wire import ConnectionClosed, FramedSocket

FAST_HASH = ("--hash-memory-kib", "1024", "--hash-time-cost", "1")


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(sock: FramedSocket, message: dict) -> dict:
    sock.send_json(message)
    return sock.recv_json()


def loggedIn(port: int, username: str) -> FramedSocket:
    sock = FramedSocket.connect_to("127.0.0.1", port)
    reply = call(sock, {"type": "login", "username": username, "password": "password1"})
    assert reply["type"] == "session", reply
    return sock


class ChatEndToEndTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.workdir = Path(self.mktemp()).absolute()
        self.workdir.mkdir(parents=True)
        self.db = self.workdir / "netlab.sqlite3"
        self.env = subprocessEnv(XDG_CONFIG_HOME=str(self.workdir / "config"))

    def server(self, plugin: str, *extra: str) -> Server:
        server = Server(
            self.workdir / plugin, plugin, "--db", str(self.db), *FAST_HASH, *extra
        )
        self.addCleanup(server.cleanup)
        return server

    def register(self, port: int, *names: str) -> None:
        with FramedSocket.connect_to("127.0.0.1", port) as s:
            for name in names:
                reply = call(
                    s, {"type": "register", "username": name, "password": "password1"}
                )
                assert reply["type"] == "registered", reply

    @defer.inlineCallbacks
    def test_authTokenWorksOnChat(self):
        authServer = self.server("netlab-auth", "--port", "0")
        chat = self.server("netlab-chat", "--port", "0")
        yield defer.ensureDeferred(authServer.start())
        yield defer.ensureDeferred(chat.start())
        out, err, code = yield defer.ensureDeferred(
            runNetlab(
                "auth",
                "register",
                "-q",
                "--host",
                "127.0.0.1",
                "--port",
                str(authServer.port),
                "--user",
                "alice",
                "--password-stdin",
                stdin=b"password1\n",
                env=self.env,
            )
        )
        self.assertEqual(code, 0, err)
        # The account is shared; a token is bound to the server that issued
        # it, so the chat client logs in to the chat server.
        out, err, code = yield defer.ensureDeferred(
            runNetlab(
                "auth",
                "login",
                "-q",
                "--host",
                "127.0.0.1",
                "--port",
                str(chat.port),
                "--user",
                "alice",
                "--password-stdin",
                stdin=b"password1\n",
                env=self.env,
            )
        )
        self.assertEqual(code, 0, err)
        chatArgs = ("--host", "127.0.0.1", "--port", str(chat.port), "--room", "lobby")
        out, err, code = yield defer.ensureDeferred(
            runNetlab("chat", *chatArgs, "--say", "hello from a token", env=self.env)
        )
        self.assertEqual(code, 0, err)
        self.assertIn(b"<alice> hello from a token", out)
        out, err, code = yield defer.ensureDeferred(
            runNetlab("chat", *chatArgs, "--tail", "5", env=self.env)
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(out.count(b"hello from a token"), 1)
        yield defer.ensureDeferred(chat.stop())
        names = chat.eventNames()
        for event in ("session_resumed", "room_joined", "message_stored", "room_left"):
            self.assertIn(event, names)
        self.assertNotIn("hello from a token", chat.log() + chat.eventLog.read_text())

    @defer.inlineCallbacks
    def test_sigkillDuringABurstLosesNoSeenSeq(self):
        chat = self.server(
            "netlab-chat",
            "--port",
            "0",
            "--message-rate",
            "10000",
            "--message-burst",
            "10000",
        )
        yield defer.ensureDeferred(chat.start())
        self.register(chat.port, "watcher", "sender0", "sender1", "sender2")
        seen: list[int] = []
        watcherReady = threading.Event()

        def watch() -> None:
            try:
                with loggedIn(chat.port, "watcher") as s:
                    call(s, {"type": "join", "room": "burst"})
                    watcherReady.set()
                    while True:
                        m = s.recv_json()
                        if m.get("type") == "message":
                            seen.append(m["seq"])
            except (ConnectionClosed, OSError):
                return

        def send(i: int) -> None:
            try:
                with loggedIn(chat.port, f"sender{i}") as s:
                    call(s, {"type": "join", "room": "burst"})
                    for n in range(100_000):
                        s.send_json(
                            {"type": "say", "room": "burst", "text": f"{i}:{n}"}
                        )
                        while s.recv_json().get("type") != "message":
                            pass
            except (ConnectionClosed, OSError):
                return

        watcher = threading.Thread(target=watch)
        watcher.start()
        senders = [threading.Thread(target=send, args=(i,)) for i in range(3)]

        def burstThenKill() -> None:
            watcherReady.wait(10)
            for t in senders:
                t.start()
            while len(seen) < 200:
                threading.Event().wait(0.01)
            chat.process.send_signal(signal.SIGKILL)
            for t in senders + [watcher]:
                t.join(30)

        yield threads.deferToThread(burstThenKill)
        self.assertEqual((yield defer.ensureDeferred(chat.wait())), -signal.SIGKILL)
        self.assertEqual(seen, list(range(1, len(seen) + 1)), "seen in order, no gaps")
        with sqlite3.connect(self.db) as connection:
            self.assertEqual(
                connection.execute("PRAGMA integrity_check").fetchone()[0], "ok"
            )
        yield defer.ensureDeferred(chat.start())

        def afterRestart():
            with loggedIn(chat.port, "watcher") as s:
                joined = call(s, {"type": "join", "room": "burst"})
                history = call(
                    s, {"type": "history", "room": "burst", "after": 0, "limit": 500}
                )
                stored = [m["seq"] for m in history["messages"]]
                while len(stored) < joined["last_seq"]:
                    more = call(
                        s,
                        {
                            "type": "history",
                            "room": "burst",
                            "after": stored[-1],
                            "limit": 500,
                        },
                    )
                    stored += [m["seq"] for m in more["messages"]]
                s.send_json({"type": "say", "room": "burst", "text": "after restart"})
                while True:
                    m = s.recv_json()
                    if m.get("type") == "message":
                        return joined["last_seq"], stored, m["seq"]

        lastSeq, stored, nextSeq = yield threads.deferToThread(afterRestart)
        self.assertEqual(stored, list(range(1, lastSeq + 1)), "contiguous history")
        self.assertGreaterEqual(lastSeq, len(seen), "every seq anyone saw survived")
        self.assertEqual(nextSeq, lastSeq + 1)

    @defer.inlineCallbacks
    def test_interactiveClientReconnectsAndCatchesUp(self):
        port = freePort()
        chat = self.server("netlab-chat", "--port", str(port), "--no-port-fallback")
        yield defer.ensureDeferred(chat.start())
        self.register(port, "alice", "bob")
        yield defer.ensureDeferred(
            runNetlab(
                "auth",
                "login",
                "-q",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--user",
                "alice",
                "--password-stdin",
                stdin=b"password1\n",
                env=self.env,
            )
        )
        client = subprocess.Popen(
            netlabCommand()
            + ["chat", "--host", "127.0.0.1", "--port", str(port), "--room", "lobby"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        self.addCleanup(lambda: client.poll() is None and client.kill())
        lines: list[str] = []
        reader = threading.Thread(
            target=lambda: lines.extend(
                iter(lambda: client.stdout.readline().decode(), "")
            )
        )
        reader.start()

        async def waitForLine(text: str) -> None:
            waited = 0.0
            while not any(text in line for line in lines):
                if waited > DEADLINE:
                    raise AssertionError(f"no {text!r} in {lines}")
                await pause()
                waited += 0.05

        yield defer.ensureDeferred(waitForLine("-!- joined #lobby"))
        client.stdin.write(b"hello before\n")
        client.stdin.flush()
        yield defer.ensureDeferred(waitForLine("<alice> hello before"))

        # Restart the server; while the client is away, bob says two things.
        yield defer.ensureDeferred(chat.stop())
        yield defer.ensureDeferred(waitForLine("reconnecting"))
        yield defer.ensureDeferred(chat.start())

        def bobSays():
            with loggedIn(port, "bob") as s:
                call(s, {"type": "join", "room": "lobby"})
                for text in ("missed one", "missed two"):
                    s.send_json({"type": "say", "room": "lobby", "text": text})
                    while s.recv_json().get("type") != "message":
                        pass

        yield threads.deferToThread(bobSays)
        yield defer.ensureDeferred(waitForLine("-!- reconnected"))
        yield defer.ensureDeferred(waitForLine("<bob> missed two"))
        client.stdin.write(b"/who\n/quit\n")
        client.stdin.flush()
        status = yield threads.deferToThread(client.wait, 30)
        reader.join(10)
        self.assertEqual(status, 0, "".join(lines))
        text = "".join(lines)
        self.assertIn("<bob> missed one", text)
        self.assertIn("<bob> missed two", text)
        self.assertEqual(text.count("hello before"), 1, "no duplicates after catch-up")
        self.assertIn("-!- in #lobby:", text)
        client.stdin.close()
        client.stdout.close()
