"""
Shared limits (issue 12), in memory: the throttle backend of a lone node
(L{LocalThrottles}) on a L{Clock}; the auth service on a throttle backend
that answers when the test says (a Redis round trip, as the service sees
it), or fails (Redis down); the wiring's choice of backend; and the bus
hint that makes a logout on one node reach another node's connections
before its next poll.  No socket, no thread, no sleep.

The same backend against a real server: L{tests.test_shared_limits_redis};
two real nodes: L{tests.test_shared_limits_e2e}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests.helpers import EventRecorder
from tests.servicehelpers import ChannelClient as Client
from tests.servicehelpers import InlineHasher
from twisted_lab.bus import BusUnavailable, LocalBus, RedisBus
from twisted_lab.bus.throttles import RedisThrottles
from twisted_lab.codecs import events
from twisted_lab.observe.metrics import ServerStats
from twisted_lab.ports import IThrottleBackend
from twisted_lab.services.auth import (
    ACCOUNT_FREE_FAILURES,
    ACCOUNT_THROTTLE,
    ADDRESS_THROTTLE,
    REGISTRATIONS,
    AuthService,
)
from twisted_lab.services.context import ServerContext
from twisted_lab.services.limits import (
    FailureThrottle,
    LocalThrottles,
    backoffDelays,
    delayAfter,
)
from twisted_lab.services.sessionwatch import (
    HINT_INTERVAL,
    POLL_SECONDS,
    REVOCATIONS_CHANNEL,
    SessionWatch,
)
from twisted_lab.storage.memory import MemoryStore
from twisted_lab.taps.auth import AuthFactory
from twisted_lab.taps.chat import ChatFactory

PASSWORD = "correct horse"


class CountingHasher(InlineHasher):
    """
    Real argon2id (cheapest parameters) on the calling thread, counting
    the password checks it makes.
    """

    def __init__(self) -> None:
        super().__init__()
        self.checks = 0

    def verify(self, password: str, stored: str | None) -> Any:
        self.checks += 1
        return super().verify(password, stored)


@implementer(IThrottleBackend)
class HeldThrottles:
    """
    A throttle backend that answers when the test says: each call is
    recorded with its Deferred (a Redis round trip still in flight).
    Declarations go to a real L{LocalThrottles}, which L{answer} consults.
    """

    def __init__(self, clock: Clock) -> None:
        self.local = LocalThrottles(clock)
        self.calls: list[tuple[str, Any, defer.Deferred[Any]]] = []

    def defineFailures(self, name, free, delays, forgetAfter):
        self.local.defineFailures(name, free, delays, forgetAfter)

    def defineBucket(self, name, burst, rate):
        self.local.defineBucket(name, burst, rate)

    def _call(self, method: str, *args: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.calls.append((method, args, d))
        return d

    def reserve(self, attempt):
        return self._call("reserve", list(attempt))

    def release(self, attempt):
        return self._call("release", list(attempt))

    def succeeded(self, attempt):
        return self._call("succeeded", list(attempt))

    def retryAfter(self, name, key):
        return self._call("retryAfter", name, key)

    def take(self, name, key):
        return self._call("take", name, key)

    def pending(self, method: str) -> list[tuple[Any, defer.Deferred[Any]]]:
        return [(args, d) for m, args, d in self.calls if m == method and not d.called]

    def answerAll(self) -> None:
        """
        Answer every pending call in order, as the local throttles would.
        """
        while True:
            waiting = [(m, a, d) for m, a, d in self.calls if not d.called]
            if not waiting:
                return
            method, args, d = waiting[0]
            getattr(self.local, method)(*args).chainDeferred(d)

    def failAll(self, reason: Exception) -> None:
        for _, _, d in list(self.calls):
            if not d.called:
                d.errback(reason)


class Harness(SynchronousTestCase):
    def context(self, clock: Clock | None = None) -> ServerContext:
        if clock is None:
            clock = self.clock = Clock()
            clock.advance(1_800_000_000)
        self.recorder = EventRecorder()
        self.stats = ServerStats()
        return ServerContext(clock, self.recorder.logger, self.stats)

    def openStore(self) -> MemoryStore:
        store = MemoryStore()
        self.successResultOf(defer.ensureDeferred(store.open()))
        return store

    def register(self, service: AuthService, name: str = "alice") -> None:
        client = Client(service, "127.0.0.1")
        reply = client.ask(type="register", username=name, password=PASSWORD)
        assert reply["type"] == "registered", reply


class LocalThrottlesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.throttles = LocalThrottles(self.clock)
        self.throttles.defineFailures("account", 2, backoffDelays(), 3600.0)
        self.throttles.defineFailures("address", 4, backoffDelays(), 3600.0)
        self.throttles.defineBucket("registrations", 2, 0.5)

    def reserve(self, *attempt: tuple[str, str]) -> float:
        return self.successResultOf(self.throttles.reserve(list(attempt)))

    def test_providesTheInterface(self) -> None:
        self.assertTrue(verifyObject(IThrottleBackend, self.throttles))

    def test_theBackoffTableIsTheFormula(self) -> None:
        """
        One formula: the table L{backoffDelays} makes (what the Redis
        scripts are handed) gives min(cap, base * 2 ** min(n, 30)) for the
        (n + 1)-th failure past the free ones, and L{FailureThrottle}
        blocks for exactly that.
        """
        for base, cap in ((1.0, 900.0), (0.5, 10.0), (2.0, 2.0), (1e-12, 1e9)):
            table = backoffDelays(base, cap)
            self.assertLessEqual(len(table), 31)
            for n in range(45):
                self.assertEqual(
                    delayAfter(table, n + 1), min(cap, base * 2 ** min(n, 30))
                )
        clock = Clock()
        throttle = FailureThrottle(clock, free=1, base=1.0, cap=8.0)
        waits = []
        for _ in range(7):
            throttle.failed("k")
            waits.append(throttle.retryAfter("k"))
        self.assertEqual(waits, [0, 1, 2, 4, 8, 8, 8])

    def test_anAttemptCountsOnEveryKeyOrOnNone(self) -> None:
        """
        An attempt reserves on the address and the account together: when
        the account is blocked, the address is not counted (and the other
        way round).
        """
        address = ("address", "10.0.0.1")
        results = [self.reserve(address, ("account", "alice")) for _ in range(5)]
        # Two free, the third starts the back-off; the rest are refused.
        self.assertEqual(results, [0, 0, 0, 1.0, 1.0])
        # The address holds three failures, not five: one more free.
        self.assertEqual(self.reserve(address, ("account", "bob")), 0)
        self.assertEqual(self.reserve(address, ("account", "carol")), 0)
        self.assertEqual(self.reserve(address, ("account", "dave")), 1.0)
        self.assertEqual(
            self.successResultOf(self.throttles.retryAfter("account", "dave")),
            0,
            "an attempt refused by the address leaves the account alone",
        )
        self.clock.advance(1)
        self.assertEqual(self.reserve(address, ("account", "dave")), 0)

    def test_releaseAndSuccess(self) -> None:
        attempt = [("address", "10.0.0.2"), ("account", "erin")]
        for _ in range(20):
            self.assertEqual(self.reserve(*attempt), 0)
            self.successResultOf(self.throttles.release(attempt))
        for _ in range(3):
            self.reserve(*attempt)
        self.assertGreater(self.reserve(*attempt), 0)
        self.successResultOf(self.throttles.succeeded([("account", "erin")]))
        self.successResultOf(self.throttles.release([("address", "10.0.0.2")]))
        self.assertEqual(self.reserve(*attempt), 0)

    def test_bucket(self) -> None:
        take = self.throttles.take
        self.assertEqual(self.successResultOf(take("registrations", "a")), 0)
        self.assertEqual(self.successResultOf(take("registrations", "a")), 0)
        self.assertEqual(self.successResultOf(take("registrations", "a")), 2.0)
        self.assertEqual(self.successResultOf(take("registrations", "b")), 0)
        self.clock.advance(2)
        self.assertEqual(self.successResultOf(take("registrations", "a")), 0)


class AsynchronousThrottleTests(Harness):
    """
    The auth service on a backend whose answers come later (as from
    Redis), or never (Redis down).
    """

    def service(self) -> tuple[AuthService, HeldThrottles, CountingHasher]:
        context = self.context()
        throttles = HeldThrottles(self.clock)
        hasher = CountingHasher()
        service = AuthService(self.openStore(), hasher, context, throttles=throttles)
        return service, throttles, hasher

    def test_theServiceDeclaresItsThrottles(self) -> None:
        _, throttles, _ = self.service()
        self.assertEqual(
            set(throttles.local.failures), {ACCOUNT_THROTTLE, ADDRESS_THROTTLE}
        )
        self.assertEqual(
            throttles.local.failures[ACCOUNT_THROTTLE].free, ACCOUNT_FREE_FAILURES
        )
        self.assertEqual(set(throttles.local.buckets), {REGISTRATIONS})

    def test_concurrentGuessesAreAllCountedBeforeAnyHash(self) -> None:
        """
        Guesses arriving while the throttles have not answered yet are
        each a reservation, and no hash starts before its reservation is
        answered: of 40 guesses at once, 6 are checked.
        """
        service, throttles, hasher = self.service()
        throttles.answerAll()  # nothing pending yet
        guesses = [Client(service, "127.0.0.66") for _ in range(40)]
        for client in guesses:
            client.send(type="login", username="alice", password="guess-1")
        self.assertEqual(len(throttles.pending("reserve")), 40)
        self.assertEqual(hasher.checks, 0, "no hash before the throttles answer")
        for args, _ in throttles.pending("reserve"):
            self.assertEqual(
                args, ([(ADDRESS_THROTTLE, "127.0.0.66"), (ACCOUNT_THROTTLE, "alice")],)
            )
        throttles.answerAll()
        codes = sorted(c.last["code"] for c in guesses if c.last)
        self.assertEqual(
            codes,
            ["bad_credentials"] * (ACCOUNT_FREE_FAILURES + 1)
            + ["rate_limited"] * (40 - ACCOUNT_FREE_FAILURES - 1),
        )
        self.assertEqual(hasher.checks, ACCOUNT_FREE_FAILURES + 1)

    def test_aSuccessClearsTheAccountAndGivesTheAddressBack(self) -> None:
        service, throttles, hasher = self.service()
        client = Client(service, "127.0.0.5")
        client.send(type="register", username="alice", password=PASSWORD)
        throttles.answerAll()
        client.send(type="login", username="alice", password=PASSWORD)
        [(attempt, reserving)] = throttles.pending("reserve")
        reserving.callback(0.0)
        self.assertEqual(hasher.checks, 1)
        self.assertEqual(
            [(m, a) for m, a, d in throttles.calls if not d.called],
            [
                ("succeeded", ([(ACCOUNT_THROTTLE, "alice")],)),
                ("release", ([(ADDRESS_THROTTLE, "127.0.0.5")],)),
            ],
        )
        self.assertEqual(client.last["type"], "registered", "the reply waits")
        throttles.answerAll()
        self.assertEqual(client.last["type"], "session")

    def test_theThrottlesDownRefuseALoginWithoutAHash(self) -> None:
        """
        Fail safe: a reservation that fails (Redis unreachable) refuses the
        login with internal_error, logged once as throttles_unavailable,
        counted as an error; the password is never hashed.
        """
        service, throttles, hasher = self.service()
        client = Client(service, "127.0.0.5")
        client.send(type="login", username="alice", password=PASSWORD)
        throttles.failAll(BusUnavailable("not connected to redis://x"))
        self.assertEqual(client.last["code"], "internal_error")
        self.assertEqual(hasher.checks, 0)
        self.assertEqual(self.stats.authAttempts, {("password", "error"): 1})
        [logged] = self.recorder.named(events.THROTTLES_UNAVAILABLE)
        self.assertIn("not connected", logged["reason"])
        self.assertEqual(self.recorder.named(events.INTERNAL_ERROR), [])

    def test_theThrottlesDownRefuseARegistration(self) -> None:
        service, throttles, hasher = self.service()
        client = Client(service, "127.0.0.5")
        client.send(type="register", username="alice", password=PASSWORD)
        throttles.failAll(BusUnavailable("down"))
        self.assertEqual(client.last["code"], "internal_error")
        passwordHash = self.successResultOf(service.store.passwordHash("alice"))
        self.assertIsNone(passwordHash, "no account made")

    def test_theThrottlesLostAfterTheCheckKeepItsAnswer(self) -> None:
        """
        If the throttles cannot take a successful attempt back, the login
        still succeeds (the attempt stays counted, and expires).
        """
        service, throttles, _ = self.service()
        client = Client(service, "127.0.0.5")
        client.send(type="register", username="alice", password=PASSWORD)
        throttles.answerAll()
        client.send(type="login", username="alice", password=PASSWORD)
        [(_, reserving)] = throttles.pending("reserve")
        reserving.callback(0.0)
        throttles.failAll(BusUnavailable("gone"))
        self.assertEqual(client.last["type"], "session")
        self.assertEqual(len(self.recorder.named(events.THROTTLES_UNAVAILABLE)), 1)

    def test_aFailedCheckGivesTheAttemptBack(self) -> None:
        """
        A check that could not be made (the store failed) is no failure:
        both reservations are released.
        """
        service, throttles, hasher = self.service()

        def broken(username: str) -> defer.Deferred[str | None]:
            return defer.fail(RuntimeError("the store is down"))

        service.store.passwordHash = broken  # type: ignore[method-assign]
        client = Client(service, "127.0.0.5")
        client.send(type="login", username="alice", password=PASSWORD)
        [(_, reserving)] = throttles.pending("reserve")
        reserving.callback(0.0)
        self.assertEqual(client.last["code"], "internal_error")
        self.assertEqual(
            [a for _, a, _ in [c for c in throttles.calls if c[0] == "release"]],
            [([(ADDRESS_THROTTLE, "127.0.0.5"), (ACCOUNT_THROTTLE, "alice")],)],
        )
        self.flushLoggedErrors(RuntimeError)

    def test_registrationWaitsForTheBucket(self) -> None:
        service, throttles, hasher = self.service()
        client = Client(service, "127.0.0.5")
        client.send(type="register", username="alice", password=PASSWORD)
        [((name, key), taking)] = throttles.pending("take")
        self.assertEqual((name, key), (REGISTRATIONS, "127.0.0.5"))
        self.assertIsNone(client.last)
        taking.callback(120.0)
        self.assertEqual(
            (client.last["code"], client.last["retry_after"]), ("rate_limited", 120)
        )


class WiringTests(SynchronousTestCase):
    """
    The wiring picks the backend: the cluster's with a Redis bus (for
    netlab-auth and netlab-chat alike), the process's otherwise.
    """

    def factory(self, kind: type[AuthFactory], bus: Any) -> AuthFactory:
        store = MemoryStore()
        reactor = MemoryReactorClock()
        return kind(store, CountingHasher(), clock=reactor, bus=bus)

    def test_redisBusSharedThrottles(self) -> None:
        reactor = MemoryReactorClock()
        for kind in (AuthFactory, ChatFactory):
            bus = RedisBus("redis://127.0.0.1:6399/0", reactor)
            service = self.factory(kind, bus).service
            self.assertIsInstance(service.throttles, RedisThrottles)
            self.assertIs(service.throttles.bus, bus)
            self.assertTrue(verifyObject(IThrottleBackend, service.throttles))

    def test_aloneLocalThrottles(self) -> None:
        reactor = MemoryReactorClock()
        for kind in (AuthFactory, ChatFactory):
            for bus in (None, LocalBus(reactor)):
                service = self.factory(kind, bus).service
                self.assertIsInstance(service.throttles, LocalThrottles)


class FakeSessionStore:
    """
    The revocation log of a store shared by two nodes.
    """

    def __init__(self) -> None:
        self.revocations: list[tuple[int, bytes, str]] = []
        self.reads = 0

    def revocationsAfter(self, position: int):
        self.reads += 1
        return defer.succeed([r for r in self.revocations if r[0] > position])

    def lastRevocation(self):
        return defer.succeed(self.revocations[-1][0] if self.revocations else 0)

    def revocationsSince(self, at: float):
        return defer.succeed([])

    def refreshSession(self, digest, lastUsed, now, idle):
        return defer.succeed(now + idle)


class Holder:
    def __init__(self) -> None:
        self.ended: list[str] = []

    def sessionEnded(self, code: str, reason: str) -> None:
        self.ended.append(code)


class RevocationHintTests(Harness):
    """
    A node that revokes sessions says so on the bus; the others read the
    revocation log at once instead of at their next poll.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.bus = LocalBus(self.clock)
        self.store = FakeSessionStore()
        self.a = SessionWatch(self.store, self.clock, 3600, bus=self.bus, node="a")
        self.b = SessionWatch(self.store, self.clock, 3600, bus=self.bus, node="b")

    def test_aHintEndsTheSessionBeforeThePoll(self) -> None:
        holder = Holder()
        self.b.hold(holder, b"S", 1e12, "alice")
        self.clock.advance(POLL_SECONDS)  # b's first poll
        self.clock.advance(HINT_INTERVAL)
        self.store.revocations.append((1, b"S", "logged_out"))
        self.a.announce()
        self.clock.advance(0)  # the bus delivers
        self.clock.advance(0)  # b's poll, due now
        self.assertEqual(holder.ended, ["session_revoked"])

    def test_aHintIsOnlyAHint(self) -> None:
        """
        A hint with nothing in the log ends nothing; its own hints a node
        ignores; with nothing held a hint costs nothing.
        """
        holder = Holder()
        self.a.hold(holder, b"S", 1e12, "alice")
        self.clock.advance(POLL_SECONDS)
        self.clock.advance(HINT_INTERVAL)
        reads = self.store.reads
        self.a.announce()
        self.clock.advance(0)
        self.clock.advance(0)
        self.assertEqual(self.store.reads, reads, "a node ignores its own hint")
        self.b.announce()
        self.clock.advance(0)
        self.clock.advance(0)
        self.assertEqual(self.store.reads, reads + 1)
        self.assertEqual(holder.ended, [])
        self.a.release(holder)
        self.b.announce()
        self.clock.advance(0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_aFloodOfHintsIsCoalesced(self) -> None:
        holder = Holder()
        self.b.hold(holder, b"S", 1e12, "alice")
        self.clock.advance(POLL_SECONDS)
        reads = self.store.reads
        for _ in range(100):
            self.a.announce()
            self.clock.advance(0.001)
        # 0.1 s of hints: at most one read per HINT_INTERVAL.
        self.assertLessEqual(self.store.reads - reads, int(0.1 / HINT_INTERVAL) + 1)
        self.assertGreaterEqual(self.store.reads - reads, 1)

    def test_withoutABusThereIsNothingToSay(self) -> None:
        watch = SessionWatch(self.store, self.clock, 3600)
        watch.announce()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_aLostHintCostsAtMostAPoll(self) -> None:
        reactor = MemoryReactorClock()
        bus = RedisBus("redis://127.0.0.1:6399/0", reactor)  # never started
        a = SessionWatch(self.store, reactor, 3600, bus=bus, node="a")
        recorder = EventRecorder()
        a.log = recorder.logger
        holder = Holder()
        a.hold(holder, b"S", 1e12, "alice")
        reactor.advance(POLL_SECONDS)
        self.store.revocations.append((1, b"S", "logged_out"))
        a.announce()  # fails at once (not connected): nothing raised
        a.announce()
        reactor.advance(POLL_SECONDS)
        self.assertEqual(holder.ended, ["session_revoked"], "the poll finds it")
        # The loss is said, once while hints keep being lost.
        self.assertEqual(len(recorder.named(events.BUS_PUBLISH_FAILED)), 1)

    def test_logoutOnOneNodeReachesTheOther(self) -> None:
        """
        Two auth services (nodes) on one store and one bus: a logout on A
        ends the session on B's connection within a few reactor turns, not
        a poll interval.
        """
        store = self.openStore()
        nodes = [
            AuthService(
                store,
                CountingHasher(),
                self.context(self.clock),
                bus=self.bus,
                node=name,
            )
            for name in ("A", "B")
        ]
        onA = Client(nodes[0])
        onA.ask(type="register", username="alice", password=PASSWORD)
        token = onA.ask(type="login", username="alice", password=PASSWORD)["token"]
        onB = Client(nodes[1])
        self.assertEqual(onB.ask(type="resume", token=token)["type"], "session")
        self.clock.advance(POLL_SECONDS)  # B has read the log once
        self.assertEqual(onA.ask(type="logout"), {"type": "logged_out"})
        self.clock.advance(0)  # the bus delivers
        self.assertEqual(onB.last["type"], "session", "a poll just ran")
        self.clock.advance(HINT_INTERVAL)  # B reads the log again
        self.assertEqual(onB.last["code"], "session_revoked")
        self.assertIsNone(onB.handler.account)
        self.assertIn(REVOCATIONS_CHANNEL, self.bus._receivers.byChannel)
