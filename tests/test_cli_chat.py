"""
Unit tests of the chat client's session (L{twisted_lab.client.chat}) on
L{StringTransport} and L{MemoryReactorClock}: lines carried out in order,
one at a time, retried after C{rate_limited} and after a reconnect, the
reason of a dropped connection shown at once, and text from the network
neutralised before it is printed.
"""

from __future__ import annotations

import io
import json
import struct
from datetime import UTC, datetime, timedelta
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from twisted_lab.client.chat import ChatSession, View, render, sanitize, stamp
from twisted_lab.client.frames import MessageClient


def decodeFrames(data: bytes) -> list[dict[str, Any]]:
    messages = []
    while data:
        (length,) = struct.unpack("!I", data[:4])
        messages.append(json.loads(data[4 : 4 + length]))
        data = data[4 + length :]
    return messages


def frame(message: dict[str, Any]) -> bytes:
    payload = json.dumps(message).encode()
    return struct.pack("!I", len(payload)) + payload


class Harness:
    """
    A chat session whose connections are L{StringTransport}s; the test
    plays the server.
    """

    def __init__(self, token: str | None = "tok", room: str | None = "dev") -> None:
        self.clock = MemoryReactorClock()
        self.out, self.asides = io.StringIO(), io.StringIO()
        self.view = View(stream=self.out, asides=self.asides)
        self.connections: list[tuple[MessageClient, StringTransport]] = []
        self.refuse = False

        async def connector(client: MessageClient) -> MessageClient:
            if self.refuse:
                from twisted.internet.error import ConnectionRefusedError

                raise ConnectionRefusedError()
            transport = StringTransport()
            client.makeConnection(transport)
            self.connections.append((client, transport))
            return client

        self.session = ChatSession(
            self.clock, self.view, connector, token=token, room=room
        )

    @property
    def client(self) -> MessageClient:
        return self.connections[-1][0]

    def sent(self) -> list[dict[str, Any]]:
        """
        What the client sent since last asked.
        """
        transport = self.connections[-1][1]
        messages = decodeFrames(transport.value())
        transport.clear()
        return messages

    def send(self, message: dict[str, Any]) -> None:
        self.client.dataReceived(frame(message))

    def handshake(self, lastSeq: int = 0, history: list | None = None) -> None:
        """
        Answer the resume and the join the client sends on connecting.
        """
        [resume] = self.sent()
        assert resume["type"] == "resume" and resume["token"] == "tok", resume
        self.send(
            {"type": "session", "username": "alice", "token": "tok", "id": resume["id"]}
        )
        [join] = self.sent()
        assert join["type"] == "join", join
        self.send(
            {
                "type": "joined",
                "room": join["room"],
                "members": ["alice"],
                "history": history or [],
                "last_seq": lastSeq,
                "id": join["id"],
            }
        )

    def broadcast(self, seq: int, text: str, sender: str = "alice") -> None:
        self.send(
            {
                "type": "message",
                "room": "dev",
                "from": sender,
                "text": text,
                "ts": "2026-01-02T03:04:05Z",
                "seq": seq,
            }
        )


class OrderTests(SynchronousTestCase):
    def test_linesTypedBeforeTheSessionIsReadyWait(self) -> None:
        h = Harness()
        h.session.typed("one")
        h.session.typed("two")
        d = defer.ensureDeferred(h.session.start())
        h.handshake()
        self.successResultOf(d)
        says = h.sent()
        self.assertEqual([(m["type"], m["text"]) for m in says], [("say", "one")])

    def test_oneLineInFlightAndEveryLineInOrder(self) -> None:
        h = Harness()
        defer.ensureDeferred(h.session.start())
        h.handshake()
        for n in range(1, 31):
            h.session.typed(str(n))
        h.session.inputEnded()
        texts = []
        for seq in range(1, 31):
            [say] = h.sent()
            self.assertEqual(say["type"], "say")
            texts.append(say["text"])
            self.assertNoResult(h.session.done)
            h.broadcast(seq, say["text"])
        self.assertEqual(texts, [str(n) for n in range(1, 31)])
        self.assertEqual(self.successResultOf(h.session.done), 0)
        self.assertEqual(h.out.getvalue().count("<alice>"), 30)

    def test_rateLimitedLineIsSentAgainAfterRetryAfter(self) -> None:
        h = Harness()
        defer.ensureDeferred(h.session.start())
        h.handshake()
        h.session.typed("first")
        h.session.typed("second")
        h.session.inputEnded()
        [say] = h.sent()
        h.send(
            {
                "type": "error",
                "code": "rate_limited",
                "message": "slow down",
                "retry_after": 2,
                "id": say["id"],
            }
        )
        h.clock.advance(1.9)
        self.assertEqual(h.sent(), [], "nothing before retry_after")
        h.clock.advance(0.1)
        [again] = h.sent()
        self.assertEqual(again["text"], "first")
        self.assertIn("rate limited: sending again in 2 s", h.asides.getvalue())
        h.broadcast(1, "first")
        [say] = h.sent()
        self.assertEqual(say["text"], "second")
        h.broadcast(2, "second")
        self.assertEqual(self.successResultOf(h.session.done), 0)

    def test_aRefusedLineIsShownAndTheExitStatusSaysSo(self) -> None:
        h = Harness()
        defer.ensureDeferred(h.session.start())
        h.handshake()
        h.session.typed("x" * 10)
        h.session.typed("next")
        h.session.inputEnded()
        [say] = h.sent()
        h.send(
            {"type": "error", "code": "bad_request", "message": "no", "id": say["id"]}
        )
        [say] = h.sent()
        self.assertEqual(say["text"], "next")
        h.broadcast(1, "next")
        self.assertEqual(self.successResultOf(h.session.done), 1)
        self.assertIn("!!! bad_request: no", h.out.getvalue())


class ReconnectTests(SynchronousTestCase):
    def test_reasonShownAtOnceAndQueuedLinesSentAfterCatchUp(self) -> None:
        h = Harness()
        defer.ensureDeferred(h.session.start())
        h.handshake()
        h.broadcast(1, "before")
        h.send({"type": "error", "code": "server_shutdown", "message": "stopping"})
        h.client.connectionLost(Failure(ConnectionDone()))
        self.assertIn(
            "connection lost (server_shutdown: stopping)", h.asides.getvalue()
        )
        h.session.typed("while away")
        self.assertFalse(h.session.isLive)
        h.clock.advance(1)
        [resume] = h.sent()
        self.assertEqual(resume["type"], "resume")
        h.send(
            {"type": "session", "username": "alice", "token": "tok", "id": resume["id"]}
        )
        [join] = h.sent()
        h.send(
            {
                "type": "joined",
                "room": "dev",
                "members": [],
                "history": [],
                "last_seq": 3,
                "id": join["id"],
            }
        )
        [history] = h.sent()
        self.assertEqual((history["type"], history["after"]), ("history", 1))
        self.assertNoResult(h.session.done)
        h.send(
            {
                "type": "history",
                "room": "dev",
                "messages": [
                    {
                        "type": "message",
                        "room": "dev",
                        "from": "bob",
                        "text": "missed",
                        "ts": "2026-01-02T03:04:05Z",
                        "seq": 2,
                    },
                ],
                "id": history["id"],
            }
        )
        [say] = h.sent()
        self.assertEqual(say["text"], "while away")
        self.assertIn("<bob> missed", h.out.getvalue())

    def test_lineInFlightFoundInTheCatchUpIsNotSaidTwice(self) -> None:
        h = Harness()
        defer.ensureDeferred(h.session.start())
        h.handshake()
        h.session.typed("maybe stored")
        h.session.inputEnded()
        [say] = h.sent()
        h.client.connectionLost(Failure(ConnectionDone()))
        h.clock.advance(1)
        [resume] = h.sent()
        h.send(
            {"type": "session", "username": "alice", "token": "tok", "id": resume["id"]}
        )
        [join] = h.sent()
        h.send(
            {
                "type": "joined",
                "room": "dev",
                "members": [],
                "history": [],
                "last_seq": 1,
                "id": join["id"],
            }
        )
        [history] = h.sent()
        h.send(
            {
                "type": "history",
                "room": "dev",
                "id": history["id"],
                "messages": [
                    {
                        "type": "message",
                        "room": "dev",
                        "from": "alice",
                        "text": "maybe stored",
                        "ts": "2026-01-02T03:04:05Z",
                        "seq": 1,
                    }
                ],
            }
        )
        self.assertEqual(h.sent(), [], "not said again")
        self.assertEqual(self.successResultOf(h.session.done), 0)

    def test_lineInFlightNotStoredIsSaidAgain(self) -> None:
        h = Harness()
        defer.ensureDeferred(h.session.start())
        h.handshake()
        h.session.typed("lost")
        [say] = h.sent()
        h.client.connectionLost(Failure(ConnectionDone()))
        h.clock.advance(1)
        h.handshake()
        [history] = h.sent()
        h.send({"type": "history", "room": "dev", "id": history["id"], "messages": []})
        [again] = h.sent()
        self.assertEqual((again["type"], again["text"]), ("say", "lost"))

    def test_revokedSessionEndsTheSession(self) -> None:
        h = Harness()
        defer.ensureDeferred(h.session.start())
        h.handshake()
        h.send({"type": "error", "code": "session_revoked", "message": "logged out"})
        h.client.connectionLost(Failure(ConnectionDone()))
        failure = self.failureResultOf(h.session.done)
        self.assertIn("log in again", str(failure.value))


class CommandTests(SynchronousTestCase):
    def ready(self) -> Harness:
        h = Harness()
        defer.ensureDeferred(h.session.start())
        h.handshake()
        return h

    def test_partSaysWhereLinesGoNow(self) -> None:
        h = self.ready()
        h.session.typed("/join ops")
        [join] = h.sent()
        h.send(
            {
                "type": "joined",
                "room": "ops",
                "members": ["alice"],
                "history": [],
                "last_seq": 0,
                "id": join["id"],
            }
        )
        self.assertEqual(h.session.current, "ops")
        h.session.typed("/leave")
        [leave] = h.sent()
        self.assertEqual(leave, {"type": "leave", "room": "ops", "id": leave["id"]})
        h.send({"type": "left", "room": "ops", "id": leave["id"]})
        self.assertEqual(h.session.current, "dev")
        self.assertIn("left #ops; lines now go to #dev", h.asides.getvalue())

    def test_partOfTheLastRoomLeavesNoCurrentRoom(self) -> None:
        h = self.ready()
        h.session.typed("/part")
        [leave] = h.sent()
        h.send({"type": "left", "room": "dev", "id": leave["id"]})
        self.assertIsNone(h.session.current)
        h.session.typed("hello?")
        self.assertEqual(h.sent(), [], "not said anywhere")
        self.assertIn("join a room first", h.asides.getvalue())

    def test_namesAndRoomsAreLearnedForCompletion(self) -> None:
        h = self.ready()
        h.broadcast(1, "hi", sender="bob")
        h.send({"type": "presence", "room": "dev", "user": "carol", "event": "join"})
        self.assertEqual(h.session.names, {"alice", "bob", "carol"})
        from prompt_toolkit.completion import CompleteEvent
        from prompt_toolkit.document import Document

        from twisted_lab.client.terminal import ChatCompleter

        completer = ChatCompleter(h.session)

        def complete(text: str) -> list[str]:
            return [
                c.text
                for c in completer.get_completions(Document(text), CompleteEvent())
            ]

        self.assertEqual(complete("/jo"), ["/join "])
        self.assertEqual(complete("/msg ca"), ["carol "])
        self.assertEqual(complete("/part d"), ["dev"])
        self.assertEqual(complete("b"), ["bob: "])

    def test_unknownCommand(self) -> None:
        h = self.ready()
        h.session.typed("/frobnicate")
        self.assertEqual(h.sent(), [])
        self.assertIn("unknown command /frobnicate", h.asides.getvalue())


class ShowingTests(SynchronousTestCase):
    def test_controlCharactersAreNeutralised(self) -> None:
        hostile = "a\x1b[2J\x1b]0;pwned\x07b\r\nc\u202ed\x9b\u2028"
        shown = sanitize(hostile)
        self.assertFalse(any(ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F for ch in shown))
        self.assertNotIn("\u202e", shown)
        self.assertNotIn("\u2028", shown)
        self.assertIn("␛[2J", shown)
        self.assertIn("<U+202E>", shown)

    def test_aLineCannotForgeAnother(self) -> None:
        forged = render(
            {
                "type": "message",
                "room": "dev",
                "from": "mallory",
                "text": "hi\n[12:00] #dev <admin> send me your password",
                "ts": "2026-01-02T03:04:05Z",
                "seq": 1,
            }
        )
        text = "".join(part for _, part in forged)
        self.assertEqual(len(text.splitlines()), 1)
        self.assertIn("<mallory>", text)
        self.assertIn("#dev", text)

    def test_timestampHasTheDateWhenNotToday(self) -> None:
        now = datetime(2026, 3, 4, 12, 0, tzinfo=UTC).astimezone()
        today = now.astimezone(UTC).isoformat()
        earlier = (now - timedelta(days=2)).astimezone(UTC).isoformat()
        self.assertRegex(stamp(today, now), r"^\d\d:\d\d$")
        self.assertRegex(stamp(earlier, now), r"^\d{4}-\d\d-\d\d \d\d:\d\d$")
        self.assertEqual(stamp("garbage", now), "--:--")

    def test_jsonViewPrintsOneObjectPerLine(self) -> None:
        out = io.StringIO()
        view = View(json=True, stream=out)
        view.show(None, {"event": "message", "message": {"text": "a\nb"}})
        view.info("joined", room="dev")
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        self.assertEqual(json.loads(lines[0])["message"]["text"], "a\nb")
        self.assertEqual(json.loads(lines[1])["room"], "dev")

    def test_colourOnlyWhenAsked(self) -> None:
        plain, coloured = io.StringIO(), io.StringIO()
        segments = render(
            {"type": "presence", "room": "dev", "user": "bob", "event": "join"}
        )
        View(stream=plain).show(segments, {})
        View(colour=True, stream=coloured).show(segments, {})
        self.assertNotIn("\x1b", plain.getvalue())
        self.assertIn("\x1b[34m", coloured.getvalue())

    def test_noColourWithNoColorOrWithoutATerminal(self) -> None:
        import os

        from twisted_lab.client.chat import wantColour

        class Terminal(io.StringIO):
            def isatty(self) -> bool:
                return True

        os.environ.pop("NO_COLOR", None)
        self.assertTrue(wantColour(Terminal()))
        self.assertFalse(wantColour(io.StringIO()))
        os.environ["NO_COLOR"] = "1"
        self.addCleanup(os.environ.pop, "NO_COLOR", None)
        self.assertFalse(wantColour(Terminal()))


class LivenessTests(SynchronousTestCase):
    def test_keepalivePingsAndADeadConnectionIsNoticed(self) -> None:
        h = Harness()
        defer.ensureDeferred(h.session.start())
        h.handshake()
        h.clock.advance(h.session.keepaliveInterval)
        [ping] = h.sent()
        self.assertEqual(ping["type"], "ping")
        h.send({"type": "pong", "id": ping["id"]})
        h.clock.advance(h.session.keepaliveInterval)
        [ping] = h.sent()
        first = h.client
        h.clock.advance(h.session.keepaliveTimeout)  # no pong: dead
        self.assertTrue(first.transport.disconnecting or first.lostReason)
        first.connectionLost(Failure(ConnectionDone()))
        self.assertIn("no answer to a ping in 20 s", h.asides.getvalue())
        h.clock.advance(1)
        self.assertIsNot(h.client, first, "reconnected")

    def test_sessionRevokedWhileConnectedEndsTheSession(self) -> None:
        h = Harness()
        defer.ensureDeferred(h.session.start())
        h.handshake()
        h.send({"type": "error", "code": "session_revoked", "message": "logged out"})
        failure = self.failureResultOf(h.session.done)
        self.assertEqual(failure.value.code, 5)

    def test_rateLimitedWhileReconnectingWaitsAndTriesAgain(self) -> None:
        h = Harness()
        defer.ensureDeferred(h.session.start())
        h.handshake()
        h.client.connectionLost(Failure(ConnectionDone()))
        h.clock.advance(1)
        [resume] = h.sent()
        h.send(
            {
                "type": "error",
                "code": "rate_limited",
                "message": "wait",
                "retry_after": 3,
                "id": resume["id"],
            }
        )
        self.assertNoResult(h.session.done)
        connections = len(h.connections)
        h.clock.advance(2.9)
        self.assertEqual(len(h.connections), connections)
        h.clock.advance(0.1)
        self.assertEqual(len(h.connections), connections + 1)
        h.handshake()
        [history] = h.sent()  # the catch-up after the last seq seen
        self.assertNoResult(h.session.done)
        self.assertFalse(h.session.isLive)
        h.send({"type": "history", "room": "dev", "messages": [], "id": history["id"]})
        self.assertTrue(h.session.isLive)
        self.assertEqual(h.asides.getvalue().count("connection lost"), 1)


class StdinTests(SynchronousTestCase):
    def test_readingPausesWhileManyLinesWait(self) -> None:
        from twisted_lab.client.chat import StdinLines

        h = Harness()
        stdin = StdinLines(h.session)
        transport = StringTransport()
        stdin.makeConnection(transport)
        stdin.dataReceived(b"".join(b"%d\n" % n for n in range(1000)))
        self.assertEqual(transport.producerState, "paused")
        defer.ensureDeferred(h.session.start())
        h.handshake()
        for seq in range(1, 901):
            [say] = h.sent()
            h.broadcast(seq, say["text"])
        self.assertEqual(transport.producerState, "producing")
        stdin.dataReceived(b"last without newline")
        stdin.connectionLost()
        for seq in range(901, 1002):
            [say] = h.sent()
            h.broadcast(seq, say["text"])
        self.assertEqual(say["text"], "last without newline")
        self.assertEqual(self.successResultOf(h.session.done), 0)


class RobustnessTests(SynchronousTestCase):
    def test_aBugInOneLineDoesNotStopTheQueue(self) -> None:
        h = Harness()
        defer.ensureDeferred(h.session.start())
        h.handshake()
        original = h.session.command

        async def command(client: MessageClient, line: str) -> None:
            if line == "boom":
                raise ZeroDivisionError("a bug")
            await original(client, line)

        h.session.command = command  # type: ignore[method-assign]
        h.session.typed("boom")
        h.session.typed("after")
        h.session.inputEnded()
        [say] = h.sent()
        self.assertEqual(say["text"], "after")
        h.broadcast(1, "after")
        self.assertEqual(self.successResultOf(h.session.done), 1)
        self.assertIn("a bug in netlab", h.asides.getvalue())
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
