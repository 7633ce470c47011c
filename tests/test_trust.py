"""
Unit tests for issue 9's mechanisms, on StringTransports and a Clock: the
iterative request queue, the one bounded output path, order on an
oversized frame and on half-close, ids on errors, out-of-range numbers,
the log budget, and the session watch.
"""

from __future__ import annotations

import json

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import EventRecorder, connectProtocol, frames
from tests.servicehelpers import Held, InlineHasher, ServerHarness
from tests.test_messages import Harness, SampleFactory, replies
from twisted_lab.codecs import events
from twisted_lab.dispatch import MAX_CONSECUTIVE_ERRORS, MAX_QUEUED_REQUESTS
from twisted_lab.services.context import LogBudget
from twisted_lab.services.limits import RequestLimit
from twisted_lab.services.sessionwatch import POLL_SECONDS, SessionWatch
from twisted_lab.transports.connection import CLOSE_GRACE_SECONDS


def request(**fields: object) -> bytes:
    return json.dumps(fields).encode()


class PipelineTests(Harness):
    def test_hundredThousandBehindASlowOne(self) -> None:
        """
        100,000 requests pipelined behind one that waits are all answered,
        in order, once it completes: the queue is drained by a loop (the old
        drain recursed and broke past ~240).
        """
        protocol, transport, _ = self.connect()
        protocol.dataReceived(frames(request(type="slow", id="first")))
        protocol.dataReceived(
            frames(*[request(type="ping", id=i) for i in range(100_000)])
        )
        self.assertEqual(replies(transport), [])
        self.assertTrue(protocol.readingPausedFor("request queue full"))
        protocol.handler.pending.pop().callback({"type": "done"})
        got = replies(transport)
        self.assertEqual(got[0], {"type": "done", "id": "first"})
        self.assertEqual([m["id"] for m in got[1:]], list(range(100_000)))
        self.assertEqual({m["type"] for m in got[1:]}, {"pong"})
        self.assertFalse(protocol.readingPausedFor("request queue full"))

    def test_slowRequestsOneAfterAnother(self) -> None:
        """
        A request that waits in the middle of a pipeline holds back the
        ones behind it (and nothing else); each completion goes on.
        """
        protocol, transport, _ = self.connect()
        payloads = []
        for i in range(300):
            payloads.append(request(type="slow", id=f"s{i}"))
            payloads.append(request(type="ping", id=i))
        protocol.dataReceived(frames(*payloads))
        for _ in range(300):
            [pending] = protocol.handler.pending
            protocol.handler.pending.clear()
            pending.callback({"type": "done"})
        ids = [m["id"] for m in replies(transport)]
        expected = [x for i in range(300) for x in (f"s{i}", i)]
        self.assertEqual(ids, expected)


class BoundedOutputTests(Harness):
    def connectBlocked(self, **settings):
        protocol, transport, recorder = self.connect(**settings)
        # What a real transport does when its send buffer passes its size.
        protocol.output.pauseProducing()
        return protocol, transport, recorder

    def test_requestsWaitForTheirOutput(self) -> None:
        """
        A client that pipelines and does not read gets one reply written
        past the full buffer; the rest of its requests wait, unread, until
        the buffer drains.  Its output never grows with its pipeline.
        """
        protocol, transport, _ = self.connectBlocked()
        pings = [request(type="ping", id=i) for i in range(1000)]
        protocol.dataReceived(frames(*pings))
        self.assertEqual(len(replies(transport)), 1)
        self.assertTrue(protocol.outputCongested)
        self.assertEqual(transport.producerState, "paused", "reading stopped")
        protocol.output.resumeProducing()
        got = replies(transport)
        self.assertEqual([m["id"] for m in got], list(range(1000)))
        self.assertEqual(transport.producerState, "producing")

    def test_slowConsumerPastTheHardBound(self) -> None:
        """
        Output the connection did not ask for (broadcasts) cannot be held
        back: past --max-send-queue the connection is cut off, logged once.
        """
        protocol, transport, recorder = self.connectBlocked(maxSendQueue=10_000)
        for _ in range(50):
            protocol.write(b"x" * 1000)
        self.assertTrue(transport.disconnected)
        self.assertEqual(len(recorder.named(events.SLOW_CONSUMER)), 1)
        self.assertLess(len(transport.value()), 12_000)

    def test_echoHoldsOneWholeFrame(self) -> None:
        """
        The echo keeps reading until one maximum-length frame is waiting,
        so a client that writes a whole frame before reading gets it back.
        """
        from twisted_lab.transports.echo import EchoFactory

        factory = EchoFactory(clock=Clock(), maxLength=100_000)
        protocol, transport, _ = connectProtocol(factory)
        protocol.output.pauseProducing()
        frame = frames(b"y" * 100_000)
        for start in range(0, len(frame), 4096):
            protocol.dataReceived(frame[start : start + 4096])
        self.assertEqual(transport.value(), frame)
        self.assertEqual(transport.producerState, "paused", "and no more")

    def test_atAFrameBoundaryReadingStopsAtOnce(self) -> None:
        """
        The room for one frame is for a frame the client is in the middle
        of sending; a client that has sent whole frames and does not read
        stops being read as soon as its buffer is full.
        """
        from twisted_lab.transports.echo import EchoFactory

        factory = EchoFactory(clock=Clock(), maxLength=100_000)
        protocol, transport, _ = connectProtocol(factory)
        protocol.output.pauseProducing()
        protocol.dataReceived(frames(b"w" * 1000))
        self.assertEqual(transport.producerState, "paused")

    def test_manyConnectionsShareABudget(self) -> None:
        """
        Past the server's output budget, every connection stops reading as
        soon as its own buffer is full: many clients that each leave a
        large frame unread cannot add up without bound.
        """
        from twisted_lab.transports.echo import EchoFactory

        factory = EchoFactory(clock=Clock(), maxLength=100_000, outputBudget=250_000)
        transports = []
        for port in range(10):
            protocol, transport, _ = connectProtocol(factory, port=20000 + port)
            protocol.output.pauseProducing()
            # The first 60,004 bytes of a 100,000-byte frame: mid-frame.
            protocol.dataReceived(frames(b"z" * 100_000)[:60_004])
            transports.append(transport)
        paused = [t.producerState == "paused" for t in transports]
        self.assertEqual(paused[:4], [False] * 4, "within the budget")
        self.assertEqual(paused[5:], [True] * 5, "past it")
        # Each paused connection holds at most the one read it was handling.
        self.assertEqual(factory.totalBacklog, 10 * 60_004)


class OrderTests(Harness):
    def test_oversizedFrameAfterRequests(self) -> None:
        """
        Requests that arrived before an oversized header are answered, in
        order (even one still in flight), then frame_too_long, then the
        connection closes; it is aborted only after the grace period.
        """
        protocol, transport, _ = self.connect(maxLength=1000)
        protocol.dataReceived(
            frames(request(type="slow", id="s"), request(type="ping", id=1))
            + b"\x00\x10\x00\x00"
        )
        self.assertFalse(transport.disconnecting)
        protocol.handler.pending.pop().callback({"type": "done"})
        got = replies(transport)
        self.assertEqual([m.get("id") for m in got], ["s", 1, None])
        self.assertEqual(got[-1]["code"], "frame_too_long")
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.disconnected)
        self.clock.advance(CLOSE_GRACE_SECONDS)
        self.assertTrue(transport.disconnected)

    def test_halfCloseAnswersEverythingThenCloses(self) -> None:
        protocol, transport, _ = self.connect()
        protocol.dataReceived(
            frames(request(type="slow", id="s"), request(type="ping", id=1))
        )
        protocol.readConnectionLost()
        self.assertFalse(transport.disconnecting, "still answering")
        protocol.handler.pending.pop().callback({"type": "done"})
        self.assertEqual([m["id"] for m in replies(transport)], ["s", 1])
        self.assertTrue(transport.disconnecting)

    def test_errorsCarryAValidId(self) -> None:
        protocol, transport, _ = self.connect()
        protocol.dataReceived(
            frames(request(id=7), request(id=8, type=3), request(id=True))
        )
        got = replies(transport)
        self.assertEqual([m["code"] for m in got], ["bad_request"] * 3)
        self.assertEqual([m.get("id") for m in got], [7, 8, None])


class MalformedBudgetTests(Harness):
    def test_outOfRangeNumbersAreBadRequests(self) -> None:
        """
        An integer outside 64 bits is bad_request (never an internal
        error) and counts toward the malformed budget.
        """
        protocol, transport, recorder = self.connect()
        huge = 99999999999999999999
        protocol.dataReceived(
            frames(
                *[request(type="count", n=huge, id=i) for i in range(50)],
                request(type="count", n=1, id=-(2**64)),
            )
        )
        got = replies(transport)
        self.assertEqual(len(got), MAX_CONSECUTIVE_ERRORS + 1)
        self.assertEqual({m["code"] for m in got}, {"bad_request"})
        self.assertTrue(transport.disconnecting)
        self.assertEqual(recorder.named(events.INTERNAL_ERROR), [])

    def test_repeatedInternalErrorsAreLoggedWithinABudget(self) -> None:
        protocol, transport, recorder = self.connect()
        protocol.dataReceived(frames(*[request(type="boom") for _ in range(500)]))
        self.assertEqual(
            [m["code"] for m in replies(transport)], ["internal_error"] * 500
        )
        self.assertEqual(len(recorder.named(events.INTERNAL_ERROR)), 20)
        self.flushLoggedErrors(ZeroDivisionError)
        self.clock.advance(60)
        protocol.factory.logBudget.tick()
        [summary] = recorder.named(events.EVENTS_SUPPRESSED)
        self.assertEqual(
            (summary["suppressed"], summary["count"]), (events.INTERNAL_ERROR, 480)
        )


class RateTests(SynchronousTestCase):
    def test_everyKindDrawsFromItsBucket(self) -> None:
        factory = SampleFactory(clock=Clock())
        factory.requestLimits["ping"] = RequestLimit(rate=1.0, burst=3, perUser=False)
        protocol, transport, _ = connectProtocol(factory)
        protocol.dataReceived(frames(*[request(type="ping", id=i) for i in range(5)]))
        got = replies(transport)
        self.assertEqual([m["type"] for m in got], ["pong"] * 3 + ["error"] * 2)
        self.assertEqual(got[3]["retry_after"], 1)
        factory.clock.advance(1)
        protocol.dataReceived(frames(request(type="ping")))
        self.assertEqual(replies(transport)[-1], {"type": "pong"})

    def test_logBudgetFoldsAFlood(self) -> None:
        clock = Clock()
        recorder = EventRecorder()
        budget = LogBudget(recorder.logger, clock, limit=3, interval=10)
        admitted = [budget.admit("rate_limited") for _ in range(100)]
        self.assertEqual(admitted.count(True), 3)
        clock.advance(10)
        self.assertTrue(budget.admit("rate_limited"), "a new interval")
        [summary] = recorder.named(events.EVENTS_SUPPRESSED)
        self.assertEqual(summary["count"], 97)


class FakeSessionStore:
    def __init__(self) -> None:
        self.revocations: list[tuple[int, bytes, str]] = []
        self.expiries: dict[bytes, float] = {}

    def revocationsAfter(self, position: int):
        return defer.succeed([r for r in self.revocations if r[0] > position])

    def lastRevocation(self):
        return defer.succeed(self.revocations[-1][0] if self.revocations else 0)

    def revocationsSince(self, at):
        return defer.succeed([r for r in self.revocations if r[0] > 100])

    def refreshSession(self, digest, lastUsed, now, idle):
        expires = self.expiries.get(digest)
        return defer.succeed(None if expires is None or now >= expires else expires)


class Holder:
    def __init__(self) -> None:
        self.ended: list[tuple[str, str]] = []

    def sessionEnded(self, code: str, reason: str) -> None:
        self.ended.append((code, reason))


class SessionWatchTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.store = FakeSessionStore()
        self.watch = SessionWatch(self.store, self.clock, idle=3600)

    def test_revokedElsewhereWithinAPoll(self) -> None:
        a, b = Holder(), Holder()
        self.store.expiries = {b"A": 1e9, b"B": 1e9}
        self.watch.hold(a, b"A", 1e9, "alice")
        self.watch.hold(b, b"B", 1e9, "bob")
        self.clock.advance(POLL_SECONDS)
        self.store.revocations.append((1, b"A", "logged_out"))
        self.clock.advance(POLL_SECONDS)
        self.assertEqual(a.ended, [("session_revoked", "the session was logged out")])
        self.assertEqual(b.ended, [])

    def test_revokedBeforeTheFirstPoll(self) -> None:
        """
        A session revoked elsewhere after it was checked here but before
        this server first read the revocation log is still revoked (not
        reported as expired).
        """
        a = Holder()
        self.watch.hold(a, b"A", 1e9, "alice")
        self.store.revocations.append((101, b"A", "logged_out"))
        self.clock.advance(POLL_SECONDS)
        self.assertEqual(a.ended, [("session_revoked", "the session was logged out")])

    def test_revokedHereAtOnce(self) -> None:
        a, same = Holder(), Holder()
        self.watch.hold(a, b"A", 1e9, "alice")
        self.watch.hold(same, b"A", 1e9, "alice")
        self.watch.revoked(b"A", "logged_out", exclude=a)
        self.assertEqual(a.ended, [])
        self.assertEqual(
            same.ended, [("session_revoked", "the session was logged out")]
        )

    def test_expiryReachesTheHolder(self) -> None:
        a = Holder()
        self.store.expiries = {b"A": 2.0}
        self.watch.hold(a, b"A", 2.0, "alice")
        self.clock.advance(POLL_SECONDS)
        self.assertEqual(a.ended, [])
        for _ in range(4):
            self.clock.advance(POLL_SECONDS)
        self.assertEqual([code for code, _ in a.ended], ["session_expired"])

    def test_noTimerWhileNothingIsHeld(self) -> None:
        a = Holder()
        self.watch.hold(a, b"A", 1e9, "alice")
        self.watch.release(a)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_digestsOfAUser(self) -> None:
        self.watch.hold(Holder(), b"A", 1e9, "alice")
        self.watch.hold(Holder(), b"B", 1e9, "alice")
        self.watch.hold(Holder(), b"C", 1e9, "bob")
        self.assertEqual(self.watch.digestsOf("alice"), {b"A", b"B"})


class QueueBoundTests(Harness):
    def test_readingPausesWhileTheQueueIsLong(self) -> None:
        protocol, transport, _ = self.connect()
        protocol.dataReceived(frames(request(type="slow")))
        protocol.dataReceived(
            frames(*[request(type="ping") for _ in range(MAX_QUEUED_REQUESTS)])
        )
        self.assertEqual(transport.producerState, "paused")


class CountingHasher:
    """
    A hasher whose checks never finish until told: counts how many
    password checks were started.
    """

    def __init__(self, real) -> None:
        self.real = real
        self.checks: list[defer.Deferred] = []

    def hash(self, password):
        return self.real.hash(password)

    def verify(self, password, stored):
        d: defer.Deferred = defer.Deferred()
        self.checks.append(d)
        return d

    def stop(self) -> None:
        self.real.stop()


class PasswordThrottleTests(ServerHarness):
    def test_concurrentGuessesCountAsTheyArrive(self) -> None:
        """
        300 wrong logins for one account sent at once, over 300
        connections: 6 hashes start (5 free failures and the one that
        starts the back-off), the other 294 are refused without a hash.
        """
        hasher = CountingHasher(InlineHasher())
        factory = self.makeAuth(hasher=hasher)
        guesses = [self.connect(factory, "127.0.0.9") for _ in range(300)]
        for protocol, _ in guesses:
            protocol.dataReceived(
                frames(request(type="login", username="alice", password="guess-1"))
            )
        self.assertEqual(sum(len(replies(t)) for _, t in guesses), 294)
        self.assertEqual(len(hasher.checks), 6)
        refused = [m for _, t in guesses for m in replies(t)]
        self.assertEqual({m["code"] for m in refused}, {"rate_limited"})
        for check in hasher.checks:
            check.callback((False, None))
        answered = [m for _, t in guesses for m in replies(t)]
        self.assertEqual(
            sorted(m["code"] for m in answered),
            ["bad_credentials"] * 6 + ["rate_limited"] * 294,
        )
        self.assertEqual(len(hasher.checks), 6, "no hash after the refusals")

    def test_changePasswordSharesTheThrottle(self) -> None:
        """
        A wrong old password counts like a wrong login: one throttle per
        account for every request that checks a password.
        """
        factory = self.makeAuth()
        connection, _ = self.registerAndLogin(factory)
        wrongLogin = {"type": "login", "username": "alice", "password": "wrong-pw1"}
        guesser = self.connect(factory, "127.0.0.5")
        got = self.ask(guesser, *[wrongLogin] * 5)
        self.assertEqual([m["code"] for m in got], ["bad_credentials"] * 5)
        wrongChange = {"type": "change_password", "old": "wrong-pw1", "new": "pass-two"}
        got = self.ask(connection, wrongChange, wrongChange)
        self.assertEqual([m["code"] for m in got], ["bad_credentials", "rate_limited"])
        login = self.one(
            self.connect(factory, "127.0.0.5"),
            {"type": "login", "username": "alice", "password": "password1"},
        )
        self.assertEqual(login["code"], "rate_limited")


class LiveSessionTests(ServerHarness):
    def test_logoutReachesTheOtherConnectionsAtOnce(self) -> None:
        factory = self.makeAuth()
        first, session = self.registerAndLogin(factory)
        second = self.connect(factory, "127.0.0.6")
        resumed = self.one(second, {"type": "resume", "token": session["token"]})
        self.assertEqual(resumed["type"], "session")
        loggedOut = self.one(first, {"type": "logout"})
        self.assertEqual(loggedOut["type"], "logged_out")
        [told] = replies(second[1])[1:]
        self.assertEqual(told["code"], "session_revoked")
        self.assertIsNone(second[0].handler.account)
        whoami = self.one(second, {"type": "whoami"})
        self.assertEqual(whoami["code"], "not_authenticated")

    def test_passwordChangeRevokesTheOthers(self) -> None:
        factory = self.makeAuth()
        first, session = self.registerAndLogin(factory)
        other = self.one(
            self.connect(factory, "127.0.0.7"),
            {"type": "login", "username": "alice", "password": "password1"},
        )
        second = self.connect(factory, "127.0.0.6")
        self.one(second, {"type": "resume", "token": other["token"]})
        changed = self.one(
            first,
            {"type": "change_password", "old": "password1", "new": "password2"},
        )
        self.assertEqual(changed["type"], "password_changed")
        [told] = replies(second[1])[1:]
        self.assertEqual(told["code"], "session_revoked")
        self.assertIn("password", told["message"])
        self.assertEqual(self.one(first, {"type": "whoami"})["type"], "identity")


class ReviewRegressionTests(Harness):
    """
    Defects an outside review found in the first version of the above.
    """

    def test_queueHoldsAtMostItsBoundFromOneRead(self) -> None:
        """
        One read holding thousands of small requests behind a slow one
        queues at most MAX_QUEUED_REQUESTS of them; the rest wait as bytes.
        """
        protocol, transport, _ = self.connect()
        protocol.dataReceived(
            frames(request(type="slow"), *[b'{"type":"ping"}'] * 10_000)
        )
        self.assertLessEqual(len(protocol.dispatcher._queue), MAX_QUEUED_REQUESTS)
        protocol.handler.pending.pop().callback({"type": "done"})
        got = replies(transport)
        self.assertEqual(len(got), 10_001)
        self.assertEqual(transport.producerState, "producing")

    def test_aGracefulCloseUnregistersTheAccount(self) -> None:
        """
        Twisted's FileDescriptor never finishes a close while a streaming
        producer it paused is registered: an idle close (like every
        graceful close) unregisters the output account first, and still
        aborts after the grace if the peer does not read.
        """
        protocol, transport, _ = self.connect(idleTimeout=2)
        protocol.output.pauseProducing()
        protocol.write(b"x" * 1000)
        self.assertIs(transport.producer, protocol.output)
        self.clock.advance(3)
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(transport.producer)
        self.assertEqual(protocol.factory.totalBacklog, 0)
        self.clock.advance(CLOSE_GRACE_SECONDS)
        self.assertTrue(transport.disconnected)

    def test_ourOwnPauseIsNotTheClientsDeadline(self) -> None:
        """
        While the server does not read (its queue is full behind a slow
        request), a frame the client had started is not overdue.
        """
        protocol, transport, _ = self.connect(headerTimeout=10, frameTimeout=10)
        protocol.dataReceived(
            frames(request(type="slow"), *[request(type="ping")] * 70) + b"\x00\x00"
        )
        self.clock.advance(30)
        self.assertFalse(transport.disconnecting)
        protocol.handler.pending.pop().callback({"type": "done"})
        self.clock.advance(5)
        self.assertFalse(transport.disconnecting, "a fresh deadline after resuming")
        self.clock.advance(10)
        self.assertTrue(transport.disconnecting, "and it still applies")


class LostConnectionTests(ServerHarness):
    def test_aResumeThatEndsAfterTheCloseHoldsNothing(self) -> None:
        """
        A connection that closes while its resume is being checked does not
        stay behind as a holder of the session (nor, in chat, as a mind).
        """
        factory = self.makeAuth()
        _, session = self.registerAndLogin(factory)
        lookups = Held(factory.store, "useSession")
        protocol, transport = self.connect(factory, "127.0.0.6")
        protocol.dataReceived(
            frames(json.dumps({"type": "resume", "token": session["token"]}).encode())
        )
        handler, dispatcher = protocol.handler, protocol.dispatcher
        self.assertEqual(len(lookups.calls), 1, "the token is being checked")
        protocol.connectionLost()
        self.assertIs(dispatcher._busy, True, "the resume has not ended yet")
        lookups.release()
        self.assertIs(dispatcher._busy, False, "the resume has ended")
        self.assertIsNone(handler.account)
        sessions = factory.service.sessions
        self.assertEqual(sessions.holders(handler.sessionDigest or b""), [])
        self.assertNotIn(handler, sessions._held)
