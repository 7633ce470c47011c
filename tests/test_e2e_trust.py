"""
End to end, issue 9 ("trust under hostile clients"): each hostile client of
the issue against real C{twistd} processes over real sockets, asserting what
docs/protocol.md promises since the fix:

 1. a chat client pipelining C{history} without reading stalls itself
    (back-pressure): the server's RSS stays bounded, every reply comes later;
 2. concurrent password guesses (C{login} and C{change_password}) count
    before they hash: at most 6 are checked;
 3. 100,000 requests pipelined behind a slow one are all answered, in order;
 4. live sessions: logout (on another process sharing the database), a
    password change and C{--session-max} reach an open chat connection;
 5. private messages are flood-controlled, and the log stays small;
 6. an out-of-range number is C{bad_request} and counts as malformed;
 7. half-close: requests followed by C{shutdown(SHUT_WR)} are all answered;
 8. what came before an oversized header is answered before the close;
 9. a daemon that cannot start exits non-zero and leaves nothing behind;
10. one whole 8 MiB frame written before reading comes back (TCP, unix);
11. frames streamed back to back are never cut by the per-frame deadline.

The clients here are plain sockets (no C{FramedSocket}), each with a short
timeout so that a server that stops answering fails the test instead of
hanging it; every loop is bounded in count and time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any
from unittest.mock import ANY

from twisted.internet import defer, threads
from twisted.trial.unittest import TestCase

from tests.e2e import Server
from tests.helpers import BIN, subprocessEnv

HEADER = struct.Struct("!I")
PASSWORD = "password1"
MiB = 1024 * 1024
FAST_HASH = ("--hash-memory-kib", "1024", "--hash-time-cost", "1")
MANY_REGISTRATIONS = ("--registrations-per-hour", "100000")


def frame(payload: bytes) -> bytes:
    return HEADER.pack(len(payload)) + payload


def request(message: dict[str, Any]) -> bytes:
    return frame(json.dumps(message, separators=(",", ":")).encode())


class Closed(Exception):
    """
    The server closed (or reset) the connection.
    """


class Conn:
    """
    A framed client on a plain socket.  The socket keeps a short timeout so
    that one thread may write while another reads; every wait has a
    deadline.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        path: str | None = None,
        source: str | None = None,
        rcvbuf: int | None = None,
    ) -> None:
        if path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if rcvbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            if source is not None:
                sock.bind((source, 0))
            sock.settimeout(10)
            sock.connect(path if path is not None else ("127.0.0.1", port))
            sock.settimeout(0.2)
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self.buffer = bytearray()
        self.offset = 0
        self.eof = False

    def send(self, data: bytes, seconds: float = 30.0) -> int:
        """
        Write C{data}; the bytes written (fewer if the deadline passed or
        the connection broke).
        """
        view = memoryview(data)
        until = time.monotonic() + seconds
        sent = 0
        while sent < len(view) and time.monotonic() < until:
            try:
                sent += self.sock.send(view[sent : sent + (1 << 20)])
            except TimeoutError:
                continue
            except OSError:
                break
        return sent

    def sendAll(self, data: bytes) -> None:
        if self.send(data) != len(data):
            raise Closed("could not send")

    def fill(self, until: float) -> bool:
        """
        Read once into the buffer; False at the deadline.

        @raise Closed: at end of input or on a reset.
        """
        if self.eof:
            raise Closed("end of input")
        while time.monotonic() < until:
            try:
                data = self.sock.recv(1 << 18)
            except TimeoutError:
                continue
            except OSError as e:
                self.eof = True
                raise Closed(str(e)) from None
            if not data:
                self.eof = True
                raise Closed("end of input")
            self.buffer += data
            return True
        return False

    def popFrame(self) -> bytes | None:
        available = len(self.buffer) - self.offset
        if available < 4:
            return None
        (length,) = HEADER.unpack_from(self.buffer, self.offset)
        if available < 4 + length:
            return None
        start = self.offset + 4
        payload = bytes(self.buffer[start : start + length])
        self.offset = start + length
        if self.offset > 1 << 20:
            del self.buffer[: self.offset]
            self.offset = 0
        return payload

    def recvFrame(self, timeout: float = 10.0) -> bytes:
        until = time.monotonic() + timeout
        while (payload := self.popFrame()) is None:
            if not self.fill(until):
                raise TimeoutError(f"no frame in {timeout} s")
        return payload

    def recvMessage(self, timeout: float = 10.0) -> dict[str, Any]:
        return json.loads(self.recvFrame(timeout))

    def call(self, message: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        """
        Send C{message} (id "c") and return its reply, skipping messages
        without that id.
        """
        self.sendAll(request({**message, "id": "c"}))
        until = time.monotonic() + timeout
        while (left := until - time.monotonic()) > 0:
            reply = self.recvMessage(left)
            if reply.get("id") == "c":
                return reply
        raise TimeoutError(f"no reply to {message['type']}")

    def readToEnd(self, timeout: float = 10.0) -> list[dict[str, Any]]:
        """
        Every message until the server closes.

        @raise TimeoutError: when it does not close within C{timeout}.
        """
        messages = []
        until = time.monotonic() + timeout
        try:
            while True:
                while (payload := self.popFrame()) is not None:
                    messages.append(json.loads(payload))
                if not self.fill(until):
                    raise TimeoutError(f"not closed after {timeout} s: {messages}")
        except Closed:
            return messages

    def close(self) -> None:
        self.sock.close()


def sendInBackground(conn: Conn, data: bytes, seconds: float) -> threading.Thread:
    """
    Write C{data} from another thread (the server may stop reading).
    """
    thread = threading.Thread(target=conn.send, args=(data, seconds), daemon=True)
    thread.start()
    return thread


def loggedIn(port: int, user: str, source: str | None = None, **kw: Any) -> Conn:
    conn = Conn(port, source=source, **kw)
    reply = conn.call({"type": "login", "username": user, "password": PASSWORD})
    assert reply["type"] == "session", reply
    return conn


def register(port: int, *users: str) -> None:
    conn = Conn(port, source="127.0.0.9")
    try:
        for user in users:
            reply = conn.call(
                {"type": "register", "username": user, "password": PASSWORD}
            )
            assert reply["type"] == "registered", reply
    finally:
        conn.close()


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def badLogLines(server: Server) -> list[str]:
    """
    Lines of the server's log that show a crash: tracebacks, unhandled
    errors in Deferreds, critical events.
    """
    return [
        line
        for line in server.log().splitlines()
        if "Traceback" in line
        or "Unhandled" in line
        or "#critical]" in line
        or "RecursionError" in line
    ]


def processesMentioning(text: str) -> list[int]:
    """
    Processes whose command line contains C{text} (a test's own directory).
    """
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline:
            pids.append(int(entry.name))
    return pids


def codeOf(message: dict[str, Any]) -> str:
    return str(message.get("code", message.get("type")))


class TrustEndToEndTests(TestCase):
    timeout = 120
    maxDiff = None

    def workdir(self) -> Path:
        path = Path(self.mktemp()).absolute()
        path.mkdir(parents=True)
        return path

    def server(self, plugin: str, *options: str, db: Path | None = None) -> Server:
        workdir = self.workdir()
        if plugin != "netlab-echo":
            options = ("--db", str(db or workdir / "netlab.sqlite3"), *options)
            if plugin != "netlab-identity":
                options = (*FAST_HASH, *options)
        server = Server(workdir, plugin, "--port", "0", *options)
        self.addCleanup(server.cleanup)
        return server

    async def started(self, plugin: str, *options: str, db: Path | None = None):
        return await self.server(plugin, *options, db=db).start()

    # 1. bounded output -------------------------------------------------------

    @defer.inlineCallbacks
    def test_historyFloodThatNeverReadsStallsItself(self):
        """
        ~1,000 pipelined C{history} requests (room of 200 messages of 4,000
        characters), never read: the server's RSS grows by less than 64 MiB
        over 3 s; once the client reads, every request is answered, in
        order (back-pressure, not C{slow_consumer}).
        """
        chat = yield defer.ensureDeferred(
            self.started(
                "netlab-chat",
                *MANY_REGISTRATIONS,
                "--message-rate",
                "1000",
                "--message-burst",
                "1000",
            )
        )

        def run():
            register(chat.port, "poster", "hoarder")
            poster = loggedIn(chat.port, "poster")
            assert poster.call({"type": "join", "room": "big"})["type"] == "joined"
            text = "h" * 4000
            poster.sendAll(
                b"".join(
                    request({"type": "say", "room": "big", "text": text})
                    for _ in range(200)
                )
            )
            seen = 0
            until = time.monotonic() + 30
            while seen < 200 and time.monotonic() < until:
                if poster.recvMessage(until - time.monotonic())["type"] == "message":
                    seen += 1
            poster.close()
            assert seen == 200, seen
            hoarder = loggedIn(chat.port, "hoarder", rcvbuf=4096)
            count = 1000
            data = b"".join(
                request({"type": "history", "room": "big", "limit": 100, "id": i})
                for i in range(count)
            )
            pid = chat.process.pid
            baseline = rss(pid)
            peak = baseline
            writer = sendInBackground(hoarder, data, 30)
            until = time.monotonic() + 3
            while time.monotonic() < until and peak - baseline < 64 * MiB:
                peak = max(peak, rss(pid))
                time.sleep(0.05)  # a sampling interval of another process
            if peak - baseline >= 64 * MiB:
                hoarder.close()
                return peak - baseline, None, None
            ids: list[Any] = []
            codes: Counter[str] = Counter()
            closing = None
            until = time.monotonic() + 40
            try:
                while len(ids) < count and time.monotonic() < until:
                    reply = hoarder.recvMessage(until - time.monotonic())
                    if "id" in reply:
                        ids.append(reply["id"])
                        codes[codeOf(reply)] += 1
                    else:
                        closing = reply
            except (Closed, TimeoutError) as e:
                closing = closing or repr(e)
            writer.join(10)
            hoarder.close()
            return peak - baseline, (ids, codes), closing

        growth, answered, closing = yield threads.deferToThread(run)
        self.assertLess(growth, 64 * MiB, f"RSS grew by {growth / MiB:.0f} MiB")
        ids, codes = answered
        self.assertIsNone(closing)
        self.assertEqual(ids, list(range(1000)), codes)
        self.assertEqual(set(codes) - {"history", "rate_limited"}, set(), codes)
        self.assertGreater(codes["history"], 0)
        self.assertNotIn("slow_consumer", chat.eventNames())

    # 2. password throttles reserve before they hash --------------------------

    @defer.inlineCallbacks
    def test_concurrentGuessesCountBeforeTheHash(self):
        """
        40 wrong C{change_password} on one connection: at most 6 checked.
        300 wrong C{login} at once (30 connections, 10 pipelined each), then
        the right password: at most 6 checked, the rest and the right one
        C{rate_limited}.
        """
        auth = yield defer.ensureDeferred(
            self.started("netlab-auth", *MANY_REGISTRATIONS)
        )

        def changePasswords():
            changer = loggedIn(auth.port, "changer", source="127.0.0.3")
            data = b"".join(
                request(
                    {
                        "type": "change_password",
                        "old": f"wrong-old-{i}",
                        "new": "brand-new-password",
                        "id": i,
                    }
                )
                for i in range(40)
            )
            changer.sendAll(data)
            replies = [changer.recvMessage(20) for _ in range(40)]
            changer.close()
            return replies

        def guesses():
            conns = [Conn(auth.port) for _ in range(30)]
            right = Conn(auth.port)
            for n, conn in enumerate(conns):
                conn.sendAll(
                    b"".join(
                        request(
                            {
                                "type": "login",
                                "username": "victim",
                                "password": f"wrong-guess-{i}",
                                "id": i,
                            }
                        )
                        for i in range(n * 10, n * 10 + 10)
                    )
                )
            right.sendAll(
                request({"type": "login", "username": "victim", "password": PASSWORD})
            )
            start = time.monotonic()
            replies = [conn.recvMessage(20) for conn in conns for _ in range(10)]
            rightReply = right.recvMessage(20)
            seconds = time.monotonic() - start
            for conn in [*conns, right]:
                conn.close()
            return replies, rightReply, seconds

        def run():
            register(auth.port, "victim", "changer")
            return changePasswords(), guesses()

        changes, (logins, rightReply, seconds) = yield threads.deferToThread(run)
        changeCodes = Counter(codeOf(r) for r in changes)
        self.assertEqual([r["id"] for r in changes], list(range(40)))
        self.assertLessEqual(changeCodes["bad_credentials"], 6, changeCodes)
        self.assertEqual(
            changeCodes["bad_credentials"] + changeCodes["rate_limited"],
            40,
            changeCodes,
        )
        loginCodes = Counter(codeOf(r) for r in logins)
        self.assertLessEqual(
            loginCodes["bad_credentials"], 6, f"{loginCodes} in {seconds:.1f} s"
        )
        self.assertEqual(
            loginCodes["bad_credentials"] + loginCodes["rate_limited"],
            300,
            loginCodes,
        )
        self.assertEqual(codeOf(rightReply), "rate_limited", rightReply)

    # 3. an iterative request queue --------------------------------------------

    @defer.inlineCallbacks
    def test_hundredThousandPipelinedBehindASlowRequest(self):
        """
        100,000 C{ping} with integer ids behind a C{login} (auth, chat) or
        a C{name} (identity): every one answered (C{pong} or
        C{rate_limited}), in order; nothing crashed in the logs.
        """
        count = 100_000
        servers = {}
        for plugin in ("netlab-auth", "netlab-chat", "netlab-identity"):
            extra = () if plugin == "netlab-identity" else MANY_REGISTRATIONS
            servers[plugin] = yield defer.ensureDeferred(self.started(plugin, *extra))

        def pipelined(plugin: str, server: Server):
            if plugin == "netlab-identity":
                conn = Conn(server.port)
                conn.recvMessage()  # the greeting
                slow = {"type": "name", "name": "Pipeliner", "id": -1}
            else:
                register(server.port, "piper")
                conn = Conn(server.port)
                slow = {"type": "login", "username": "piper", "password": PASSWORD}
                slow["id"] = -1
            data = request(slow) + b"".join(
                request({"type": "ping", "id": i}) for i in range(count)
            )
            writer = sendInBackground(conn, data, 60)
            ids = []
            codes: Counter[str] = Counter()
            ending = "open"
            until = time.monotonic() + 60
            try:
                while len(ids) < count + 1 and time.monotonic() < until:
                    reply = conn.recvMessage(until - time.monotonic())
                    ids.append(reply.get("id"))
                    codes[codeOf(reply)] += 1
            except (Closed, TimeoutError) as e:
                ending = repr(e)
            writer.join(10)
            conn.close()
            return ids, codes, ending

        results: dict[str, Any] = {}

        def runOne(plugin):
            results[plugin] = pipelined(plugin, servers[plugin])

        def run():
            workers = [
                threading.Thread(target=runOne, args=(p,), daemon=True) for p in servers
            ]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join(100)

        yield threads.deferToThread(run)
        for plugin, server in servers.items():
            ids, codes, ending = results[plugin]
            self.assertEqual(len(ids), count + 1, f"{plugin}: {codes}, {ending}")
            self.assertEqual(ids, [-1, *range(count)], plugin)
            slow = "welcome" if plugin == "netlab-identity" else "session"
            self.assertEqual(codes[slow], 1, f"{plugin}: {codes}")
            self.assertEqual(
                codes["pong"] + codes["rate_limited"], count, f"{plugin}: {codes}"
            )
            self.assertEqual(badLogLines(server), [], plugin)

    # 4. live sessions ------------------------------------------------------------

    @defer.inlineCallbacks
    def test_liveSessionsReachOpenChatConnections(self):
        """
        A chat connection holding a session is told C{session_revoked}
        within about a second of a C{logout} on a separate C{netlab-auth}
        process sharing the database, and of a C{change_password} on another
        connection; with C{--session-max 2}, C{session_expired}.  After
        each, a request gets C{not_authenticated}.
        """
        db = self.workdir() / "shared.sqlite3"
        auth = yield defer.ensureDeferred(
            self.started("netlab-auth", *MANY_REGISTRATIONS, db=db)
        )
        chat = yield defer.ensureDeferred(
            self.started("netlab-chat", *MANY_REGISTRATIONS, db=db)
        )
        shortChat = yield defer.ensureDeferred(
            self.started("netlab-chat", *MANY_REGISTRATIONS, "--session-max", "2")
        )

        def unprompted(conn: Conn, seconds: float) -> tuple[dict | None, float]:
            """
            The first message without an id within C{seconds}, and when.
            """
            start = time.monotonic()
            until = start + seconds
            while (left := until - time.monotonic()) > 0:
                try:
                    message = conn.recvMessage(left)
                except TimeoutError:
                    break
                if "id" not in message and message.get("type") == "error":
                    return message, time.monotonic() - start
            return None, time.monotonic() - start

        def run():
            out = {}
            register(auth.port, "alice")
            # logout, on the auth process, of a token resumed on chat
            owner = Conn(auth.port)
            session = owner.call(
                {"type": "login", "username": "alice", "password": PASSWORD}
            )
            holder = Conn(chat.port)
            token = session["token"]
            resumed = holder.call({"type": "resume", "token": token})
            assert resumed["type"] == "session", resumed
            assert holder.call({"type": "join", "room": "lobby"})["type"] == "joined"
            assert owner.call({"type": "logout"})["type"] == "logged_out"
            out["logout"] = unprompted(holder, 5)
            # A `say` that works has no reply: its broadcast is the answer.
            holder.sendAll(
                request(
                    {"type": "say", "room": "lobby", "text": "still here?", "id": "s"}
                )
            )
            answer = holder.recvMessage()
            while answer.get("id") != "s" and answer["type"] != "message":
                answer = holder.recvMessage()
            out["say after logout"] = codeOf(answer)
            owner.close()
            holder.close()
            # change_password on another connection
            holder = loggedIn(chat.port, "alice")
            changer = loggedIn(auth.port, "alice")
            changed = changer.call(
                {"type": "change_password", "old": PASSWORD, "new": "password2"}
            )
            assert changed["type"] == "password_changed", changed
            out["change_password"] = unprompted(holder, 5)
            out["whoami after change"] = codeOf(holder.call({"type": "whoami"}))
            out["changer still in"] = codeOf(changer.call({"type": "whoami"}))
            changer.close()
            holder.close()
            # --session-max 2, the session held open
            register(shortChat.port, "bob")
            holder = loggedIn(shortChat.port, "bob")
            out["session-max"] = unprompted(holder, 6)
            out["whoami after expiry"] = codeOf(holder.call({"type": "whoami"}))
            holder.close()
            return out

        out = yield threads.deferToThread(run)
        for what, within in (
            ("logout", 1.5),
            ("change_password", 1.5),
            ("session-max", 2 + 1.5),
        ):
            message, seconds = out[what]
            out[what] = (
                message and message.get("code"),
                f"in {seconds:.1f} s" if seconds < within else f"after {seconds:.1f} s",
                message and message.get("message"),
            )
        self.assertEqual(
            out,
            {
                "logout": (
                    "session_revoked",
                    out["logout"][1],
                    "the session was logged out",
                ),
                "say after logout": "not_authenticated",
                "change_password": (
                    "session_revoked",
                    out["change_password"][1],
                    "the password was changed",
                ),
                "whoami after change": "not_authenticated",
                "changer still in": "identity",
                "session-max": ("session_expired", out["session-max"][1], ANY),
                "whoami after expiry": "not_authenticated",
            },
        )
        for what in ("logout", "change_password", "session-max"):
            self.assertTrue(out[what][1].startswith("in "), f"{what}: {out[what]}")

    # 5. private messages are flood-controlled ---------------------------------

    @defer.inlineCallbacks
    def test_privateMessageFlood(self):
        """
        2,000 pipelined C{msg} to an online user: at most burst + rate x
        seconds are C{sent}, the rest C{rate_limited}; the log stays small.
        """
        chat = yield defer.ensureDeferred(
            self.started("netlab-chat", *MANY_REGISTRATIONS)
        )

        def run():
            register(chat.port, "flooder", "victim")
            flooder = loggedIn(chat.port, "flooder")
            victim = loggedIn(chat.port, "victim", source="127.0.0.2")
            logBefore = chat.logFile.stat().st_size
            count = 2000
            data = b"".join(
                request({"type": "msg", "to": "victim", "text": "p" * 200, "id": i})
                for i in range(count)
            )
            start = time.monotonic()
            writer = sendInBackground(flooder, data, 30)
            replies = [flooder.recvMessage(30) for _ in range(count)]
            seconds = time.monotonic() - start
            writer.join(10)
            # The victim reads what it was sent: its ping's pong comes last.
            victim.sendAll(request({"type": "ping", "id": "last"}))
            received = Counter[str]()
            until = time.monotonic() + 20
            while (message := victim.recvMessage(until - time.monotonic())).get(
                "id"
            ) != "last":
                received[codeOf(message)] += 1
            victimDone = message
            flooder.close()
            victim.close()
            logBytes = chat.logFile.stat().st_size - logBefore
            return replies, seconds, received, victimDone, logBytes

        replies, seconds, received, victimDone, logBytes = yield threads.deferToThread(
            run
        )
        self.assertEqual([r["id"] for r in replies], list(range(2000)))
        codes = Counter(codeOf(r) for r in replies)
        allowed = 20 + 10 * (seconds + 1)
        self.assertLessEqual(codes["sent"], allowed, f"{codes} in {seconds:.1f} s")
        self.assertEqual(codes["sent"] + codes["rate_limited"], 2000, codes)
        self.assertEqual(victimDone["type"], "pong")
        self.assertEqual(received["private"], codes["sent"], received)
        self.assertLess(logBytes, 64 * 1024, f"{logBytes:,} bytes of log")

    # 6. out-of-range numbers are malformed ------------------------------------

    @defer.inlineCallbacks
    def test_outOfRangeNumbersAreBadRequests(self):
        """
        2,000 C{history} with a 20-digit C{after}: C{bad_request}, and the
        connection is closed after 20 in a row; no traceback in the log.
        """
        chat = yield defer.ensureDeferred(
            self.started("netlab-chat", *MANY_REGISTRATIONS)
        )

        def run():
            register(chat.port, "numbers")
            conn = loggedIn(chat.port, "numbers")
            after = int("9" * 20)
            data = b"".join(
                request({"type": "history", "room": "r", "after": after, "id": i})
                for i in range(2000)
            )
            writer = sendInBackground(conn, data, 20)
            messages = conn.readToEnd(20)
            writer.join(10)
            conn.close()
            return messages

        messages = yield threads.deferToThread(run)
        answered = [m for m in messages if "id" in m]
        self.assertEqual([m["id"] for m in answered], list(range(20)), messages[:3])
        self.assertEqual({codeOf(m) for m in answered}, {"bad_request"})
        closing = [m for m in messages if "id" not in m]
        self.assertEqual(len(closing), 1, closing)
        self.assertEqual(codeOf(closing[0]), "bad_request", closing)
        self.assertEqual(badLogLines(chat), [])

    # 7. half-close ------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_halfCloseIsAnsweredThenClosed(self):
        """
        Requests then C{shutdown(SHUT_WR)}: every reply arrives, then the
        end of input; on echo (framed and raw), identity, auth and chat.
        """
        echo = yield defer.ensureDeferred(self.started("netlab-echo"))
        raw = yield defer.ensureDeferred(
            self.started("netlab-echo", "--framing", "raw")
        )
        identity = yield defer.ensureDeferred(self.started("netlab-identity"))
        auth = yield defer.ensureDeferred(
            self.started("netlab-auth", *MANY_REGISTRATIONS)
        )
        chat = yield defer.ensureDeferred(
            self.started("netlab-chat", *MANY_REGISTRATIONS)
        )

        def bytesToEnd(conn: Conn) -> bytes:
            until = time.monotonic() + 10
            try:
                while conn.fill(until):
                    pass
            except Closed:
                return bytes(conn.buffer)
            raise TimeoutError(f"not closed: {bytes(conn.buffer)[:100]!r}")

        def halfClosed(port: int, data: bytes, greeting: bool = False) -> Any:
            conn = Conn(port)
            first = conn.recvMessage() if greeting else None
            conn.sendAll(data)
            conn.sock.shutdown(socket.SHUT_WR)
            return conn, first

        def run():
            out = {}
            frames = frame(b"hello") + frame(b"") + frame(b"x" * 70000)
            conn, _ = halfClosed(echo.port, frames)
            out["echo"] = bytesToEnd(conn) == frames
            conn.close()
            conn, _ = halfClosed(raw.port, b"hello\n")
            out["raw"] = bytesToEnd(conn)
            conn.close()
            pings = b"".join(request({"type": "ping", "id": i}) for i in range(3))
            conn, greeting = halfClosed(identity.port, pings, greeting=True)
            out["identity"] = [greeting["type"]] + [
                (m["type"], m.get("id")) for m in conn.readToEnd()
            ]
            conn.close()
            conn, _ = halfClosed(
                auth.port,
                request({"type": "register", "username": "half", "password": PASSWORD})
                + request({"type": "ping", "id": 1}),
            )
            out["auth"] = [codeOf(m) for m in conn.readToEnd()]
            conn.close()
            # a registration alone: its reply arrives (the account is made)
            conn, _ = halfClosed(
                auth.port,
                request(
                    {"type": "register", "username": "alone", "password": PASSWORD}
                ),
            )
            out["auth register"] = [codeOf(m) for m in conn.readToEnd()]
            conn.close()
            conn, _ = halfClosed(
                chat.port,
                request({"type": "register", "username": "half", "password": PASSWORD})
                + request({"type": "login", "username": "half", "password": PASSWORD})
                + request({"type": "whoami"}),
            )
            out["chat"] = [codeOf(m) for m in conn.readToEnd()]
            conn.close()
            return out

        out = yield threads.deferToThread(run)
        self.assertEqual(
            out,
            {
                "echo": True,
                "raw": b"hello\n",
                "identity": ["ask_name", ("pong", 0), ("pong", 1), ("pong", 2)],
                "auth": ["registered", "pong"],
                "auth register": ["registered"],
                "chat": ["registered", "session", "identity"],
            },
        )

    # 8. order on an oversized header ---------------------------------------------

    @defer.inlineCallbacks
    def test_oversizedHeaderAfterValidFrames(self):
        """
        Echo returns every frame sent before an oversized header, then
        closes; auth answers a C{register} and 10 pings sent before it,
        then C{frame_too_long}, then closes.
        """
        echo = yield defer.ensureDeferred(self.started("netlab-echo"))
        auth = yield defer.ensureDeferred(
            self.started("netlab-auth", *MANY_REGISTRATIONS)
        )

        def run():
            valid = frame(b"one") + frame(b"two" * 1000) + frame(b"")
            conn = Conn(echo.port)
            conn.sendAll(valid + HEADER.pack(MiB + 1) + b"z" * 100)
            until = time.monotonic() + 10
            try:
                while conn.fill(until):
                    pass
                echoed = "not closed"
            except Closed:
                echoed = bytes(conn.buffer)
            conn.close()
            conn = Conn(auth.port)
            conn.sendAll(
                request(
                    {
                        "type": "register",
                        "username": "oversize",
                        "password": PASSWORD,
                        "id": 0,
                    }
                )
                + b"".join(request({"type": "ping", "id": i}) for i in range(1, 11))
                + HEADER.pack(65536 + 1)
                + b"z" * 100
            )
            replies = conn.readToEnd()
            conn.close()
            return valid, echoed, replies

        valid, echoed, replies = yield threads.deferToThread(run)
        self.assertEqual(echoed, valid)
        self.assertEqual(
            [(codeOf(m), m.get("id")) for m in replies],
            [("registered", 0)]
            + [("pong", i) for i in range(1, 11)]
            + [("frame_too_long", None)],
        )

    # 9. a daemon that cannot start ---------------------------------------------------

    @defer.inlineCallbacks
    def test_daemonThatCannotStartExitsNonZero(self):
        """
        In daemon mode, C{--no-port-fallback} on a taken port and a database
        with a newer schema both exit non-zero within 10 s, leaving no pid
        file and no process.
        """
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        newer = self.workdir() / "newer.sqlite3"
        db = sqlite3.connect(newer)
        db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        db.execute("INSERT INTO schema_version (version) VALUES (999)")
        db.commit()
        db.close()

        def daemon(workdir: Path, plugin: str, *options: str):
            pidfile = workdir / "twistd.pid"
            command = [
                str(BIN / "twistd"),
                "--pidfile",
                str(pidfile),
                "--logfile",
                str(workdir / "twistd.log"),
                plugin,
                *options,
            ]
            process = subprocess.Popen(
                command,
                cwd=workdir,
                env=subprocessEnv(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            start = time.monotonic()
            try:
                out, err = process.communicate(timeout=10)
                code = process.returncode
            except subprocess.TimeoutExpired:
                process.kill()
                out, err = process.communicate(timeout=5)
                code = "still running after 10 s"
            seconds = time.monotonic() - start
            # The detached daemon, if one was left behind (ours: its command
            # line names this test's directory), given until the deadline to
            # finish exiting.
            while (left := processesMentioning(str(workdir))) and (
                time.monotonic() < start + 10
            ):
                time.sleep(0.05)  # polling for another process's exit
            for pid in left:
                os.kill(pid, signal.SIGKILL)
            return {
                "code": code,
                "seconds": seconds,
                "stderr": err.decode(errors="replace"),
                "pidfile": pidfile.exists(),
                "log": (workdir / "twistd.log").read_text(errors="replace"),
                "processes left": left,
            }

        def run():
            return {
                "echo": daemon(
                    self.workdir(),
                    "netlab-echo",
                    "--no-port-fallback",
                    "--port",
                    str(port),
                ),
                "identity": daemon(
                    self.workdir(),
                    "netlab-identity",
                    "--port",
                    "0",
                    "--db",
                    str(newer),
                ),
            }

        out = yield threads.deferToThread(run)
        logs = {name: result.pop("log") for name, result in out.items()}
        for name, result in out.items():
            self.assertIsInstance(result["code"], int, f"{name}: {result}")
            self.assertNotEqual(result["code"], 0, f"{name}: {result}")
            self.assertLess(result["seconds"], 10, name)
            self.assertFalse(result["pidfile"], f"{name}: {result}")
            self.assertEqual(result["processes left"], [], f"{name}: {result}")
            self.assertNotEqual(result["stderr"].strip(), "", f"{name}: {result}")
        # twistd passes on the first 100 bytes of the reason; the log has it all.
        self.assertIn("database", out["identity"]["stderr"])
        self.assertIn("schema version 999", logs["identity"])

    # 10. one whole large frame before reading -----------------------------------------

    @defer.inlineCallbacks
    def test_wholeEightMebibyteFrameBeforeReading(self):
        """
        A client that writes one whole 8 MiB frame before it reads gets the
        echo, over TCP and over a unix socket.
        """
        limit = ("--max-length", str(16 * MiB))
        tcp = yield defer.ensureDeferred(self.started("netlab-echo", *limit))
        # A short directory: a unix socket path has at most 107 bytes.
        shortDir = Path(tempfile.mkdtemp(prefix="netlab-trust-", dir="/tmp"))
        self.addCleanup(shutil.rmtree, shortDir, True)
        path = str(shortDir / "echo.sock")
        unix = self.server("netlab-echo", *limit, "--listen", f"unix:{path}")
        unix.workdir.mkdir(parents=True, exist_ok=True)
        unix.process = subprocess.Popen(
            unix.command(),
            cwd=unix.workdir,
            env=subprocessEnv(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )

        def waitForSocket():
            until = time.monotonic() + 20
            while time.monotonic() < until:
                if unix.process.poll() is not None:
                    raise AssertionError("twistd exited")
                try:
                    Conn(path=path).close()
                    return
                except OSError:
                    time.sleep(0.05)  # polling another process's startup
            raise AssertionError("no unix socket")

        payload = os.urandom(8 * MiB)

        def exchange(**where: Any) -> bool:
            sock = socket.socket(
                socket.AF_UNIX if "path" in where else socket.AF_INET,
                socket.SOCK_STREAM,
            )
            with sock:
                sock.settimeout(15)
                sock.connect(where.get("path") or ("127.0.0.1", where["port"]))
                sock.sendall(frame(payload))  # a deadlock times out here
                got = bytearray()
                while len(got) < len(payload) + 4:
                    chunk = sock.recv(1 << 20)
                    if not chunk:
                        break
                    got += chunk
            return bytes(got) == frame(payload)

        def run():
            waitForSocket()
            return exchange(port=tcp.port), exchange(path=path)

        overTcp, overUnix = yield threads.deferToThread(run)
        self.assertTrue(overTcp, "TCP")
        self.assertTrue(overUnix, "unix socket")

    # 11. per-frame deadlines ------------------------------------------------------

    @defer.inlineCallbacks
    def test_framesStreamedBackToBackAreNeverCutOff(self):
        """
        With C{--header-timeout 1 --frame-timeout 1}, a client streaming
        frames back to back for 3 s, each write ending a few bytes into the
        next frame, is never cut off and gets every echo.
        """
        echo = yield defer.ensureDeferred(
            self.started("netlab-echo", "--header-timeout", "1", "--frame-timeout", "1")
        )

        def piece(n: int) -> bytes:
            return frame(b"%08d" % n + b"s" * 500)

        def run():
            conn = Conn(echo.port)
            stream = bytearray(piece(0))
            sent = 0
            n = 0
            outcome = "open"
            until = time.monotonic() + 3
            try:
                while time.monotonic() < until and n < 100_000:
                    # finish what is pending and write a few bytes of the next
                    n += 1
                    into = (2, 3, 6, 10)[n % 4]
                    complete = len(stream)
                    stream += piece(n)
                    conn.sendAll(bytes(stream[sent : complete + into]))
                    sent = complete + into
                    # the echo of every complete frame comes back
                    deadline = time.monotonic() + 5
                    while len(conn.buffer) < complete:
                        if not conn.fill(deadline):
                            raise TimeoutError(f"no echo of frame {n - 1}")
                conn.sendAll(bytes(stream[sent:]))
                deadline = time.monotonic() + 5
                while len(conn.buffer) < len(stream):
                    if not conn.fill(deadline):
                        raise TimeoutError("no echo of the last frame")
            except (Closed, TimeoutError) as e:
                outcome = f"after {n} frames: {e!r}"
            received = bytes(conn.buffer)
            conn.close()
            return outcome, n, received == bytes(stream)

        outcome, frames, equal = yield threads.deferToThread(run)
        self.assertEqual(outcome, "open")
        self.assertGreater(frames, 10)
        self.assertTrue(equal)
