"""
A catalogue of named adversarial cases, each run against the real
C{twistd netlab-chat} (which also serves every auth request) or
C{netlab-echo}: the server must answer as documented and stay up.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from pathlib import Path

from twisted.internet import defer, threads
from twisted.trial.unittest import TestCase

from tests.e2e import Server
from twisted_lab.client.wire import ConnectionClosed, FramedSocket

MAX = 1024 * 1024
COUNT = 3000


def frame(payload: bytes) -> bytes:
    return struct.pack("!I", len(payload)) + payload


def js(obj) -> bytes:
    return json.dumps(obj).encode()


# (name, bytes to send, expected error code or "closed")
RAW_CASES = [
    ("length 0xFFFFFFFF", b"\xff\xff\xff\xff", "frame_too_long"),
    ("length max+1", struct.pack("!I", MAX + 1), "frame_too_long"),
    ("invalid UTF-8", frame(b'{"type":"ping","x":"\xc3\x28"}'), "bad_request"),
    (
        "lone surrogate",
        frame(b'{"type":"login","username":"\\ud800x","password":"p"}'),
        "bad_request",
    ),
    ("JSON scalar", frame(b"42"), "bad_request"),
    ("JSON list", frame(b'[{"type":"ping"}]'), "bad_request"),
    ("NaN", frame(b'{"type":"history","room":"r","after":NaN}'), "bad_request"),
    ("duplicate keys", frame(b'{"type":"ping","type":"whoami"}'), "bad_request"),
    (
        "100,000-deep nesting",
        frame(b'{"type":"ping","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        "bad_request",
    ),
    (
        "5000-digit integer",
        frame(b'{"type":"history","room":"r","after":' + b"7" * 5000 + b"}"),
        "bad_request",
    ),
    (
        "wrong field type",
        frame(js({"type": "login", "username": 5, "password": []})),
        "bad_request",
    ),
    (
        "missing field",
        frame(js({"type": "register", "username": "mallory"})),
        "bad_request",
    ),
    ("unknown type", frame(js({"type": "shutdown"})), "unknown_type"),
    (
        "1 MB username",
        frame(
            js(
                {
                    "type": "register",
                    "username": "u" * 1_000_000,
                    "password": "password1",
                }
            )
        ),
        "bad_request",
    ),
    (
        "over-long password",
        frame(js({"type": "register", "username": "mallory", "password": "p" * 2000})),
        "weak_password",
    ),
    (
        "look-alike username (Cyrillic a)",
        frame(
            js({"type": "register", "username": "\u0430lice", "password": "password1"})
        ),
        "invalid_username",
    ),
    (
        "NUL in a username",
        frame(
            js({"type": "register", "username": "al\x00ice", "password": "password1"})
        ),
        "invalid_username",
    ),
    (
        "bidi override in a username",
        frame(
            js({"type": "register", "username": "ali\u202ece", "password": "password1"})
        ),
        "invalid_username",
    ),
    (
        "SQL injection as a username",
        frame(
            js(
                {
                    "type": "register",
                    "username": "x'; DROP TABLE accounts;--",
                    "password": "password1",
                }
            )
        ),
        "invalid_username",
    ),
    ("empty token", frame(js({"type": "resume", "token": ""})), "invalid_token"),
    ("huge token", frame(js({"type": "resume", "token": "t" * 4096})), "invalid_token"),
    (
        "over-long token",
        frame(js({"type": "resume", "token": "t" * 5000})),
        "bad_request",
    ),
    (
        "non-ASCII token",
        frame(js({"type": "resume", "token": "tökén☃"})),
        "invalid_token",
    ),
    (
        "chat before login",
        frame(js({"type": "join", "room": "lobby"})),
        "not_authenticated",
    ),
]


class AdversarialCatalogueTests(TestCase):
    timeout = 180

    def setUp(self) -> None:
        workdir = Path(self.mktemp()).absolute()
        self.chat = Server(
            workdir / "chat", "netlab-chat", "--port", "0", "--db",
            str(workdir / "db.sqlite3"), "--max-length", str(MAX),
            "--header-timeout", "1", "--frame-timeout", "1", "--session-idle", "2",
            "--hash-memory-kib", "1024", "--hash-time-cost", "1",
            "--max-send-queue", "65536", "--message-rate", "100000",
            "--message-burst", "100000", "--registrations-per-hour", "100000",
        )  # fmt: skip
        self.addCleanup(self.chat.cleanup)
        return defer.ensureDeferred(self.chat.start())

    def alive(self) -> None:
        with FramedSocket.connect_to("127.0.0.1", self.chat.port) as s:
            s.send_json({"type": "ping"})
            assert s.recv_json() == {"type": "pong"}

    def exchange(self, data: bytes) -> dict | str:
        with socket.create_connection(("127.0.0.1", self.chat.port), timeout=10) as s:
            s.sendall(data)
            framed = FramedSocket(s.family, s.type, s.proto, s.detach(), max_length=MAX)
            framed.settimeout(10)
            with framed:
                try:
                    return framed.recv_json()
                except (ConnectionClosed, ConnectionResetError):
                    return "closed"

    @defer.inlineCallbacks
    def test_rawCases(self):
        def run():
            outcomes = {}
            for name, data, expected in RAW_CASES:
                reply = self.exchange(data)
                got = (
                    reply
                    if isinstance(reply, str)
                    else reply.get("code", reply["type"])
                )
                outcomes[name] = (got, expected)
                self.alive()
            return outcomes

        outcomes = yield threads.deferToThread(run)
        wrong = {n: o for n, o in outcomes.items() if o[0] != o[1]}
        self.assertEqual(wrong, {})
        self.assertGreaterEqual(len(outcomes), 24)

    @defer.inlineCallbacks
    def test_stalledHeaders(self):
        """
        1, 2 or 3 header bytes and then silence: cut off at --header-timeout
        (1 s here), not at the idle timeout (300 s).
        """

        def run():
            results = []
            for count in (1, 2, 3):
                with socket.create_connection(
                    ("127.0.0.1", self.chat.port), timeout=10
                ) as s:
                    s.sendall(b"\x00" * count)
                    start = time.monotonic()
                    data = s.recv(1000)
                    results.append((time.monotonic() - start, b"frame_timeout" in data))
            return results

        results = yield threads.deferToThread(run)
        for seconds, said in results:
            self.assertLess(seconds, 8)
            self.assertTrue(said)

    @defer.inlineCallbacks
    def test_tokensLiteralTextAndPipelining(self):
        def run():
            out = {}
            with FramedSocket.connect_to("127.0.0.1", self.chat.port) as s:
                s.send_json(
                    {"type": "register", "username": "alice", "password": "password1"}
                )
                s.recv_json()
                s.send_json(
                    {
                        "type": "register",
                        "username": "ＡＬＩＣＥ",
                        "password": "password1",
                    }
                )
                out["fullwidth username"] = s.recv_json()["code"]
                s.send_json(
                    {"type": "login", "username": "alice", "password": "password1"}
                )
                token = s.recv_json()["token"]
                s.send_json({"type": "join", "room": "lobby"})
                s.recv_json()
                hostile = "x'); DROP TABLE chat_messages;-- \x00 \u202e bidi \x07"
                s.send_json({"type": "say", "room": "lobby", "text": hostile})
                out["hostile text stored literally"] = s.recv_json()["text"] == hostile
                s.send_json({"type": "logout"})
                s.recv_json()
                s.send_json({"type": "resume", "token": token})
                out["revoked token"] = s.recv_json()["code"]
                s.send_json(
                    {"type": "login", "username": "alice", "password": "password1"}
                )
                token = s.recv_json()["token"]
            time.sleep(2.5)  # --session-idle 2
            with FramedSocket.connect_to("127.0.0.1", self.chat.port) as s:
                s.send_json({"type": "resume", "token": token})
                out["expired token"] = s.recv_json()["code"]
                s.sendall(
                    b"".join(frame(js({"type": "ping", "id": i})) for i in range(1000))
                )
                ids = [s.recv_json()["id"] for _ in range(1000)]
                out["1,000 pipelined requests"] = ids == list(range(1000))
            return out

        out = yield threads.deferToThread(run)
        self.assertEqual(
            out,
            {
                "fullwidth username": "username_taken",
                "hostile text stored literally": True,
                "revoked token": "invalid_token",
                "expired token": "invalid_token",
                "1,000 pipelined requests": True,
            },
        )

    @defer.inlineCallbacks
    def test_clientThatNeverReads(self):
        """
        A member that never reads is cut off as a slow consumer; the sender
        and the other members carry on.
        """

        def run():
            with FramedSocket.connect_to("127.0.0.1", self.chat.port) as s:
                for name in ("sender", "reader", "sleeper"):
                    s.send_json(
                        {"type": "register", "username": name, "password": "password1"}
                    )
                    s.recv_json()

            def member(name):
                sock = FramedSocket.connect_to("127.0.0.1", self.chat.port)
                sock.send_json(
                    {"type": "login", "username": name, "password": "password1"}
                )
                sock.recv_json()
                sock.send_json({"type": "join", "room": "flood"})
                while sock.recv_json().get("type") != "joined":
                    pass
                return sock

            sleeper = socket.socket()
            sleeper.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sleeper.connect(("127.0.0.1", self.chat.port))
            sleeper.sendall(
                frame(
                    js(
                        {
                            "type": "login",
                            "username": "sleeper",
                            "password": "password1",
                        }
                    )
                )
            )
            sleeper.sendall(frame(js({"type": "join", "room": "flood"})))
            reader = member("reader")
            sender = member("sender")
            received = []
            stop = threading.Event()

            def read():
                try:
                    while not stop.is_set():
                        m = reader.recv_json()
                        if m.get("type") == "message":
                            received.append(m["seq"])
                except (ConnectionClosed, OSError):
                    pass

            t = threading.Thread(target=read)
            t.start()
            # Enough to fill the kernel's socket buffers (several MB on
            # loopback) and then --max-send-queue (64 KiB here).
            text = "y" * 3500
            for _ in range(COUNT):
                sender.send_json({"type": "say", "room": "flood", "text": text})
                while sender.recv_json().get("type") != "message":
                    pass
            deadline = time.monotonic() + 10
            while len(received) < COUNT and time.monotonic() < deadline:
                time.sleep(0.05)
            stop.set()
            reader.close()
            t.join(5)
            sender.close()
            # The sleeper now reads what it was sent: it ends in a cut-off.
            sleeper.settimeout(5)
            data = b""
            try:
                while chunk := sleeper.recv(65536):
                    data += chunk
            except (ConnectionResetError, TimeoutError):
                pass
            sleeper.close()
            return received, data

        received, data = yield threads.deferToThread(run)
        self.assertEqual(received, list(range(1, COUNT + 1)))
        self.assertLess(len(data), COUNT * 3500, "the sleeper did not get everything")
        yield defer.ensureDeferred(self.chat.stop())
        self.assertIn("slow_consumer", self.chat.eventNames())


class EchoAdversarialTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_echoSurvivesHostileFramesAndSlowloris(self):
        workdir = Path(self.mktemp()).absolute()
        echo = Server(
            workdir,
            "netlab-echo",
            "--port",
            "0",
            "--frame-timeout",
            "1",
            "--header-timeout",
            "1",
        )
        self.addCleanup(echo.cleanup)
        yield defer.ensureDeferred(echo.start())

        def run():
            results = {}
            for name, data in (
                ("length 0xFFFFFFFF", b"\xff\xff\xff\xff"),
                ("length max+1", struct.pack("!I", MAX + 1) + b"x" * 100),
                ("header then silence", b"\x00\x00"),
                ("payload then silence", b"\x00\x00\x00\x10abc"),
            ):
                with socket.create_connection(
                    ("127.0.0.1", echo.port), timeout=10
                ) as s:
                    s.sendall(data)
                    got = b""
                    try:
                        while chunk := s.recv(1000):
                            got += chunk
                    except ConnectionResetError:
                        pass
                    results[name] = got
            with FramedSocket.connect_to("127.0.0.1", echo.port) as s:
                s.send_message(b"still here")
                results["alive"] = s.recv_message()
            return results

        results = yield threads.deferToThread(run)
        self.assertEqual(results["length 0xFFFFFFFF"], b"")
        self.assertEqual(results["length max+1"], b"")
        self.assertEqual(results["header then silence"], b"")
        # The checked header and payload so far were echoed, then cut off.
        self.assertEqual(results["payload then silence"], b"\x00\x00\x00\x10abc")
        self.assertEqual(results["alive"], b"still here")
        yield defer.ensureDeferred(echo.stop())
        names = echo.eventNames()
        self.assertEqual(names.count("frame_too_long"), 2)
        self.assertEqual(names.count("frame_timeout"), 2)


class PipeliningWithoutReadingTests(TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def test_jsonServicesStopReadingAClientThatDoesNotRead(self):
        """
        Pipelined requests from a client that never reads its replies: the
        server stops reading it (flow control) instead of buffering replies
        without bound, and keeps serving others.
        """
        for plugin in ("netlab-identity", "netlab-auth", "netlab-chat"):
            workdir = Path(self.mktemp()).absolute()
            server = Server(
                workdir, plugin, "--port", "0", "--db", str(workdir / "db.sqlite3")
            )
            self.addCleanup(server.cleanup)
            yield defer.ensureDeferred(server.start())

            def flood(server=server, plugin=plugin):
                status = Path(f"/proc/{server.process.pid}/status")
                rss = lambda: int(status.read_text().split("VmRSS:")[1].split()[0])  # noqa: E731
                before = rss()
                pings = frame(js({"type": "ping", "id": "x" * 100})) * 10_000
                sent = 0
                with socket.create_connection(("127.0.0.1", server.port)) as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
                    s.settimeout(2)
                    try:
                        while sent < 256 * 1024 * 1024:
                            s.sendall(pings)
                            sent += len(pings)
                    except TimeoutError:
                        pass
                    grown = rss() - before
                    with FramedSocket.connect_to("127.0.0.1", server.port) as other:
                        if plugin == "netlab-identity":
                            other.recv_json()
                        other.send_json({"type": "ping"})
                        answer = other.recv_json()
                return sent, grown, answer

            sent, grown, answer = yield threads.deferToThread(flood)
            self.assertLess(sent, 64 * 1024 * 1024, plugin)
            self.assertLess(grown, 64 * 1024, plugin)
            self.assertEqual(answer, {"type": "pong"}, plugin)
            yield defer.ensureDeferred(server.stop())
