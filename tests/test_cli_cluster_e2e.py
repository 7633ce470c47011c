"""
End to end: the real C{netlab} client, given two addresses, against two
real C{twistd -n netlab-chat} nodes on loopback sharing one SQLite database
file (a token issued by one node is valid on the other; a room's C{seq} and
history are the same on both).  The client's node is killed with SIGKILL in
the middle of a burst; the client resumes on the other node and what it
prints is exactly the room's history: no gap, no duplicate, in order.

Without a bus, a node does not deliver live what was said on the other
node, so the messages the client must get after the switch are said on the
node it ends up on (some before it arrives: caught up with C{history}; some
while it rejoins and after: live), and the comparison is with the history
in the shared database.  The client runs piped with C{--json} (every
message with its C{seq}), and interactively on a pseudo-terminal.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, threads
from twisted.trial.unittest import SkipTest, TestCase

from tests.e2e import DEADLINE, Server, netlabCommand, pause, runNetlab
from tests.helpers import subprocessEnv
from twisted_lab.client.wire import ConnectionClosed, FramedMessages, FramedSocket

FAST_HASH = ("--hash-memory-kib", "1024", "--hash-time-cost", "1")


def closedPort() -> int:
    """
    A loopback port nothing listens on (bound, then closed).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Listener:
    """
    A loopback listener that only counts connections and records bytes: a
    server outside the cluster, which must never get a token.
    """

    def __init__(self) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(8)
        self.port = self.socket.getsockname()[1]
        self.connections = 0
        self.received = bytearray()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.socket.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                conn.settimeout(2)
                try:
                    while data := conn.recv(65536):
                        self.received += data
                except OSError:
                    pass

    def stop(self) -> None:
        self.socket.close()
        self.thread.join(5)


class Speaker:
    """
    A user on one node saying numbered lines, each confirmed by its own
    broadcast, in a thread, until told to stop or the node dies.
    """

    def __init__(self, port: int, user: str, prefix: str) -> None:
        self.port = port
        self.user = user
        self.prefix = prefix
        self.confirmed: list[str] = []
        self.stopped = threading.Event()
        self.died = False

    def run(self, count: int, interval: float) -> None:
        try:
            with FramedSocket.connect_to("127.0.0.1", self.port) as s:
                s.settimeout(10)
                s.send_json(
                    {"type": "login", "username": self.user, "password": "password1"}
                )
                assert s.recv_json()["type"] == "session"
                s.send_json({"type": "join", "room": "dev"})
                while s.recv_json().get("type") != "joined":
                    pass
                for n in range(count):
                    if self.stopped.is_set():
                        return
                    text = f"{self.prefix}{n}"
                    self.say(s, text)
                    self.confirmed.append(text)
                    time.sleep(interval)
        except (OSError, ConnectionClosed):
            self.died = True

    def say(self, s: FramedMessages, text: str) -> None:
        while True:
            s.send_json({"type": "say", "room": "dev", "text": text, "id": 1})
            while True:
                reply = s.recv_json()
                if reply.get("type") == "error" and reply.get("id") == 1:
                    assert reply["code"] == "rate_limited", reply
                    time.sleep(float(reply.get("retry_after", 1)))
                    break
                if reply.get("type") == "message" and reply.get("text") == text:
                    return


def stopProcess(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


class TwoNodes(TestCase):
    """
    Two real netlab-chat nodes sharing one SQLite file, and the real client.
    """

    timeout = 240

    def setUp(self) -> None:
        self.workdir = Path(self.mktemp()).absolute()
        self.workdir.mkdir(parents=True)
        self.db = self.workdir / "shared.sqlite3"
        self.env = subprocessEnv(XDG_CONFIG_HOME=str(self.workdir / "config"))

    async def startNodes(self) -> tuple[Server, Server]:
        nodes = []
        for name in ("node-a", "node-b"):
            node = Server(
                self.workdir / name,
                "netlab-chat",
                "--port",
                "0",
                "--db",
                str(self.db),
                *FAST_HASH,
            )
            self.addCleanup(node.cleanup)
            await node.start()
            nodes.append(node)
        return nodes[0], nodes[1]

    def register(self, port: int, *names: str) -> None:
        with FramedSocket.connect_to("127.0.0.1", port) as s:
            for name in names:
                s.send_json(
                    {"type": "register", "username": name, "password": "password1"}
                )
                assert s.recv_json()["type"] == "registered"

    def history(self, port: int) -> list[dict[str, Any]]:
        with FramedSocket.connect_to("127.0.0.1", port) as s:
            s.send_json({"type": "login", "username": "bob", "password": "password1"})
            s.recv_json()
            messages: list[dict[str, Any]] = []
            while True:
                after = messages[-1]["seq"] if messages else 0
                s.send_json(
                    {"type": "history", "room": "dev", "after": after, "limit": 500}
                )
                page = s.recv_json()["messages"]
                if not page:
                    return messages
                messages += page

    def netlab(self, *args: str, stdin: bytes | None = None):
        return defer.ensureDeferred(runNetlab(*args, stdin=stdin, env=self.env))


class ClusterClientTests(TwoNodes):
    def sessions(self) -> dict[str, Any]:
        path = self.workdir / "config" / "netlab" / "sessions.json"
        return json.loads(path.read_text())["sessions"]

    @defer.inlineCallbacks
    def test_clientMovesToTheOtherNodeWithNoGapAndNoDuplicate(self):
        a, b = yield defer.ensureDeferred(self.startNodes())
        nodeA, nodeB = f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"
        self.register(a.port, "alice", "bob", "carol")

        # Logged in through the list in one order (node B answers first)...
        out, err, code = yield self.netlab(
            "auth", "login", "-q", "--server", f"{nodeB},{nodeA}",
            "--user", "alice", "--password-stdin", stdin=b"password1\n",
        )  # fmt: skip
        self.assertEqual(code, 0, err)
        self.assertIn(f"on {nodeB}, {nodeA}".encode(), out)
        [(key, saved)] = self.sessions().items()
        self.assertTrue(key.startswith("cluster:tcp:"), key)

        # ... and chatting with it in the other order: node A first.
        clientOut = (self.workdir / "client.out").open("w+b")
        clientErr = (self.workdir / "client.err").open("w+b")
        self.addCleanup(clientOut.close)
        self.addCleanup(clientErr.close)
        client = subprocess.Popen(
            netlabCommand()
            + ["chat", "--json", "--server", nodeA, "--server", nodeB, "-r", "dev"],
            stdin=subprocess.PIPE,
            stdout=clientOut,
            stderr=clientErr,
            env=self.env,
        )
        self.addCleanup(stopProcess, client)

        def records() -> list[dict[str, Any]]:
            text = (self.workdir / "client.out").read_text()
            return [json.loads(line) for line in text.splitlines() if line.strip()]

        def printed() -> list[dict[str, Any]]:
            return [
                r["message"]
                for r in records()
                if r.get("event") == "message" and r["message"].get("type") == "message"
            ]

        async def waitFor(what: str, predicate) -> None:
            waited = 0.0
            while not predicate():
                if waited > DEADLINE or client.poll() is not None:
                    raise AssertionError(
                        f"no {what}: {records()}\n{clientErr.name}: "
                        + Path(clientErr.name).read_text()
                    )
                await pause(0.05)
                waited += 0.05

        def say(line: str) -> None:
            assert client.stdin is not None
            client.stdin.write(line.encode() + b"\n")
            client.stdin.flush()

        yield defer.ensureDeferred(
            waitFor(
                "join",
                lambda: any(
                    r.get("event") == "info" and r["text"].startswith("joined #dev")
                    for r in records()
                ),
            )
        )
        say("hello from alice")
        yield defer.ensureDeferred(
            waitFor(
                "own line",
                lambda: any(m["text"] == "hello from alice" for m in printed()),
            )
        )

        # Bob talks on node A; node A is SIGKILLed in the middle of it.
        bobOnA = Speaker(a.port, "bob", "a-")
        burstA = threads.deferToThread(bobOnA.run, 1000, 0.03)
        yield defer.ensureDeferred(
            waitFor("bob's burst on A", lambda: len(bobOnA.confirmed) >= 8)
        )
        self.assertEqual((yield defer.ensureDeferred(a.stop(signal.SIGKILL))), -9)
        yield burstA
        self.assertTrue(bobOnA.died)

        # While alice's client waits to reconnect, carol talks on node B, and
        # goes on while the client rejoins and catches up there.  Alice types
        # a line meanwhile.
        carolOnB = Speaker(b.port, "carol", "b-")
        burstB = threads.deferToThread(carolOnB.run, 30, 0.1)
        say("typed while away")
        yield burstB
        self.assertFalse(carolOnB.died)
        self.assertEqual(len(carolOnB.confirmed), 30)
        yield defer.ensureDeferred(
            waitFor(
                "the end of carol's burst and alice's queued line",
                lambda: {"b-29", "typed while away"} <= {m["text"] for m in printed()},
            )
        )
        say("/quit")
        status = yield threads.deferToThread(client.wait, 30)
        self.assertEqual(status, 0, Path(clientErr.name).read_text())

        # What alice saw is exactly the room's history: every message once,
        # in seq order, from both nodes, across the switch.
        history = self.history(b.port)
        seen = printed()
        self.assertEqual(
            [(m["seq"], m["from"], m["text"]) for m in seen],
            [(m["seq"], m["from"], m["text"]) for m in history],
        )
        self.assertEqual([m["seq"] for m in seen], list(range(1, len(seen) + 1)))
        texts = [m["text"] for m in seen]
        for text in bobOnA.confirmed + carolOnB.confirmed:
            self.assertEqual(texts.count(text), 1, text)
        self.assertEqual(texts.count("typed while away"), 1)
        events = records()
        lost = [r for r in events if r.get("event") == "error"]
        self.assertEqual(len(lost), 1, lost)
        self.assertIn("connection lost", lost[0]["text"])
        back = {"event": "info", "text": f"reconnected to {nodeB}", "server": nodeB}
        self.assertIn(back, events)
        # Both ways of getting carol's lines were exercised: those said before
        # the client was back (caught up with history, shown before it says
        # "reconnected") and those said after (live from node B).
        where = events.index(back)
        before = [r for r in events[:where] if r.get("event") == "message"]
        after = [r for r in events[where:] if r.get("event") == "message"]
        self.assertTrue(
            any(str(r["message"].get("text")).startswith("b-") for r in before)
        )
        self.assertTrue(
            any(str(r["message"].get("text")).startswith("b-") for r in after)
        )

        # A new client given both addresses falls through the dead one.
        out, err, code = yield self.netlab(
            "chat", "--server", f"{nodeA},{nodeB}", "-r", "dev", "--tail", "1"
        )
        self.assertEqual(code, 0, err)
        self.assertIn(f"> {history[-1]['text']}\n".encode(), out)
        out, err, code = yield self.netlab(
            "auth", "whoami", "--server", nodeA, "--server", nodeB
        )
        self.assertEqual(out, b"alice\n", err)
        self.assertIn(f"cannot connect to {nodeA}".encode(), err)
        self.assertIn(f"trying {nodeB}".encode(), err)

        # The cluster's token goes to no server outside the set.
        stranger = Listener()
        self.addCleanup(stranger.stop)
        token = saved["token"].encode()
        out, err, code = yield self.netlab(
            "chat", "--server", f"{nodeB},127.0.0.1:{stranger.port}",
            "-r", "dev", "--say", "leak?",
        )  # fmt: skip
        self.assertEqual(code, 5, err)
        self.assertIn(b"not logged in to", err)
        out, err, code = yield self.netlab(
            "auth", "whoami", "-q", "--server", f"127.0.0.1:{stranger.port}"
        )
        self.assertEqual(code, 5, err)
        self.assertEqual(stranger.connections, 0)
        self.assertNotIn(token, bytes(stranger.received))
        yield defer.ensureDeferred(b.stop())

    @defer.inlineCallbacks
    def test_firstAddressClosedAndBothClosed(self):
        a, b = yield defer.ensureDeferred(self.startNodes())
        self.register(b.port, "alice")
        closed = f"127.0.0.1:{closedPort()}"
        out, err, code = yield self.netlab(
            "auth", "login", "--server", closed, "--server", f"127.0.0.1:{b.port}",
            "--user", "alice", "--password-stdin", stdin=b"password1\n",
        )  # fmt: skip
        self.assertEqual(code, 0, err)
        self.assertIn(f"cannot connect to {closed}: connection refused".encode(), err)
        self.assertIn(f"connected to 127.0.0.1:{b.port}".encode(), err)
        # Both closed: one line, exit 3, each address with its reason.
        other = f"127.0.0.1:{closedPort()}"
        out, err, code = yield self.netlab(
            "echo", "-q", "--server", f"{closed},{other}", "--timeout", "2", "x"
        )
        self.assertEqual(code, 3, err)
        self.assertEqual(
            err.decode(),
            f"netlab: cannot connect to any server: {closed}: connection refused "
            f"(is the server running?); {other}: connection refused (is the "
            "server running?)\n",
        )
        yield defer.ensureDeferred(a.stop())
        yield defer.ensureDeferred(b.stop())


class ClusterTerminalTests(TwoNodes):
    """
    The same switch seen by a person: the interactive chat on a real
    pseudo-terminal.
    """

    def setUp(self) -> None:
        from tests.test_cli_pty import pexpect

        if pexpect is None:  # pragma: no cover - in the test extra
            raise SkipTest("pexpect is not installed (pip install '.[test]')")
        super().setUp()
        self.env["NO_COLOR"] = "1"

    @defer.inlineCallbacks
    def test_terminalChatMovesToTheOtherNode(self):
        from tests.test_cli_pty import Terminal

        a, b = yield defer.ensureDeferred(self.startNodes())
        nodeA, nodeB = f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"
        self.register(a.port, "alice", "bob")
        out, err, code = yield self.netlab(
            "auth", "login", "-q", "--server", f"{nodeA},{nodeB}",
            "--user", "alice", "--password-stdin", stdin=b"password1\n",
        )  # fmt: skip
        self.assertEqual(code, 0, err)

        t = Terminal(
            netlabCommand()
            + ["chat", "--server", nodeA, "--server", nodeB, "-r", "dev"],
            self.env,
        )
        self.addCleanup(t.close)
        t.wait(r"joined #dev")
        t.wait(r"#dev> ?$")
        Speaker(a.port, "bob", "before-").run(3, 0)
        t.wait(r"<bob> before-2")

        since = t.mark()
        self.assertEqual((yield defer.ensureDeferred(a.stop(signal.SIGKILL))), -9)
        t.wait(r"connection lost", since=since)
        t.wait(r"reconnecting in 1 s", since=since)
        t.send("typed while away\r")
        t.wait(r"\(reconnecting\) \(1 queued\)>", since=since)
        bobOnB = Speaker(b.port, "bob", "after-")
        burst = threading.Thread(target=bobOnB.run, args=(20, 0.1))
        burst.start()
        self.addCleanup(burst.join, 30)
        t.wait(rf"reconnected to {nodeB}", since=since, timeout=30)
        t.wait(r"<alice> typed while away", since=since)
        t.wait(r"<bob> after-19", since=since, timeout=30)
        burst.join(30)
        self.assertEqual(len(bobOnB.confirmed), 20)

        screen = t.text
        for text in ["before-0", "before-1", "before-2"] + bobOnB.confirmed:
            self.assertEqual(screen.count(f"<bob> {text}\n"), 1, text)
        self.assertEqual(screen.count("<alice> typed while away\n"), 1)
        positions = [screen.index(f"<bob> {text}\n") for text in bobOnB.confirmed]
        self.assertEqual(positions, sorted(positions), "in order")
        t.send("/quit\r")
        self.assertEqual(t.exitStatus(), 0)
        self.assertNotIn("Traceback", t.text)
        yield defer.ensureDeferred(b.stop())
