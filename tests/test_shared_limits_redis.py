"""
L{RedisThrottles} against a real Redis-protocol server (L{tests.redisserver}:
skipped without one, except under CI, where they fail): two nodes (two
buses) share one account's failures and one address's registrations, the
scripts give the answers of L{LocalThrottles}, keys are fixed-size digests
with a TTL, and a server that is down or silent fails every operation
within a bounded time.  Then the auth service itself, as two nodes on one
store and one server: guesses spread over both are checked as if on one.

Real reactor, real sockets on 127.0.0.1; every wait is on a Deferred,
bounded by the test's timeout (the back-off test waits for the server's
clock to pass a 0.2 s block).
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import backoffPolicy
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from tests.redisserver import RedisServer, requireServer
from tests.test_shared_limits import Client, CountingHasher
from twisted_lab.bus import BusUnavailable, RedisBus
from twisted_lab.bus.throttles import RedisThrottles, keyDigest
from twisted_lab.observe.metrics import ServerStats
from twisted_lab.ports import IThrottleBackend
from twisted_lab.services.auth import ACCOUNT_FREE_FAILURES, AuthService
from twisted_lab.services.context import ServerContext
from twisted_lab.services.limits import LocalThrottles, backoffDelays
from twisted_lab.storage.memory import MemoryStore

PASSWORD = "correct horse"


def sleep(seconds: float) -> defer.Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


class RedisHarness(TestCase):
    timeout = 60

    def setUp(self) -> defer.Deferred[None]:  # type: ignore[override]
        self.server = RedisServer(requireServer(), reactor)
        self.addCleanup(self.server.cleanup)
        return self.server.start()

    def bus(self) -> RedisBus:
        bus = RedisBus(
            self.server.url,
            reactor,
            retryPolicy=backoffPolicy(
                initialDelay=0.05, maxDelay=0.5, factor=2.0, jitter=lambda: 0.0
            ),
        )
        bus.startService()
        self.addCleanup(bus.stopService)
        return bus

    @defer.inlineCallbacks
    def nodes(self, count: int = 2, **settings: Any) -> Any:
        """
        C{count} nodes' throttles, each on its own connected bus, with the
        throttles every test uses declared.
        """
        buses = [self.bus() for _ in range(count)]
        yield defer.gatherResults([b.whenConnected() for b in buses])
        found = [RedisThrottles(b, reactor, **settings) for b in buses]
        for throttles in found:
            declare(throttles)
        return found


def declare(throttles: Any) -> None:
    throttles.defineFailures("account", 5, backoffDelays(), 3600.0)
    throttles.defineFailures("address", 20, backoffDelays(), 3600.0)
    throttles.defineFailures("quick", 1, (0.2, 0.4), 3600.0)
    throttles.defineBucket("registrations", 3, 3 / 3600.0)


class RedisThrottlesTests(RedisHarness):
    @defer.inlineCallbacks
    def test_concurrentGuessesOnTwoNodesCountAsOne(self) -> Any:
        """
        100 reservations on one account sent at once, half through each
        node: 6 are let through (5 free, and the one that starts the
        back-off), as on one node.
        """
        a, b = yield self.nodes()
        self.assertTrue(verifyObject(IThrottleBackend, a))
        attempt = [("account", "alice")]
        waits = yield defer.gatherResults(
            [(a if i % 2 else b).reserve(attempt) for i in range(100)]
        )
        self.assertEqual(waits.count(0.0), ACCOUNT_FREE_FAILURES + 1)
        self.assertTrue(all(0 < w <= 1.0 for w in waits if w))
        # The same, on one node in process:
        local = LocalThrottles(reactor)
        declare(local)
        localWaits = yield defer.gatherResults(
            [local.reserve(attempt) for _ in range(100)]
        )
        self.assertEqual(localWaits.count(0.0), waits.count(0.0))

    @defer.inlineCallbacks
    def test_theScriptsAnswerAsTheLocalThrottles(self) -> Any:
        """
        One sequence of operations on both backends: the same attempts are
        let through and refused (waits within the few milliseconds the
        round trips take).
        """
        (shared,) = yield self.nodes(1)
        local = LocalThrottles(reactor)
        declare(local)
        address = ("address", "10.1.1.1")
        steps: list[tuple[str, list[tuple[str, str]]]] = (
            [("reserve", [address, ("account", "bob")])] * 7
            + [("release", [address, ("account", "bob")])]
            + [("reserve", [address, ("account", "bob")])] * 2
            + [("succeeded", [("account", "bob")]), ("release", [address])]
            + [("reserve", [address, ("account", f"u{i}")]) for i in range(20)]
            + [("reserve", [("account", "bob")])]
        )
        for method, attempt in steps:
            got = yield getattr(shared, method)(attempt)
            expected = yield getattr(local, method)(attempt)
            if method == "reserve":
                self.assertLess(abs(got - expected), 0.05, (attempt, got, expected))
        for name, key in [address, ("account", "bob"), ("account", "u19")]:
            got = yield shared.retryAfter(name, key)
            expected = yield local.retryAfter(name, key)
            self.assertLess(abs(got - expected), 0.05, (name, key, got, expected))

    @defer.inlineCallbacks
    def test_aBlockEndsOnTheServersClock(self) -> Any:
        a, b = yield self.nodes()
        attempt = [("quick", "k")]
        self.assertEqual((yield a.reserve(attempt)), 0)
        self.assertEqual((yield b.reserve(attempt)), 0)  # 2 > 1 free: 0.2 s
        wait = yield a.reserve(attempt)
        self.assertTrue(0.1 < wait <= 0.2, wait)
        yield sleep(wait + 0.02)
        self.assertEqual((yield b.reserve(attempt)), 0)  # the third: 0.4 s
        wait = yield a.retryAfter("quick", "k")
        self.assertTrue(0.3 < wait <= 0.4, wait)
        yield b.release(attempt)  # back to two failures: 0.2 s after the last
        wait = yield a.retryAfter("quick", "k")
        self.assertTrue(0.1 < wait <= 0.2, wait)
        yield a.succeeded(attempt)
        self.assertEqual((yield b.retryAfter("quick", "k")), 0)

    @defer.inlineCallbacks
    def test_registrationsPerAddressAcrossNodes(self) -> Any:
        a, b = yield self.nodes()
        waits = yield defer.gatherResults(
            [(a if i % 2 else b).take("registrations", "10.9.9.9") for i in range(8)]
        )
        self.assertEqual(waits.count(0.0), 3)
        # 3 an hour: the next token in 20 minutes.
        self.assertTrue(all(1199 < w <= 1200 for w in waits if w), waits)
        self.assertEqual((yield a.take("registrations", "10.9.9.8")), 0)

    @defer.inlineCallbacks
    def test_keysAreDigestsWithATimeToLive(self) -> Any:
        """
        What an attacker sends never becomes a key name, however long, and
        every key expires (memory is bounded by the last hour's keys).
        """
        (throttles,) = yield self.nodes(1)
        bus = throttles.bus
        huge = "x" * 100_000
        yield throttles.reserve([("address", "10.2.2.2"), ("account", huge)])
        yield throttles.take("registrations", huge)
        keys = sorted((yield bus.execute(b"KEYS", b"*")))
        self.assertEqual(
            keys,
            sorted(
                [
                    f"netlab:throttle:address:{keyDigest('10.2.2.2')}".encode(),
                    f"netlab:throttle:account:{keyDigest(huge)}".encode(),
                    f"netlab:bucket:registrations:{keyDigest(huge)}".encode(),
                ]
            ),
        )
        self.assertEqual(len(keyDigest(huge)), 32)
        for key in keys:
            ttl = yield bus.execute(b"PTTL", key)
            if b"bucket" in key:
                # Full again (the same as absent) after one token's refill.
                self.assertTrue(1_000 < ttl <= 1_201_000, (key, ttl))
            else:
                self.assertTrue(3_590_000 < ttl <= 3_601_000, (key, ttl))
        yield throttles.succeeded([("account", huge)])
        self.assertEqual(len((yield bus.execute(b"KEYS", b"*"))), 2)

    @defer.inlineCallbacks
    def test_aServerDownFailsEveryOperation(self) -> Any:
        (throttles,) = yield self.nodes(1)
        yield self.server.stop()
        for operation in (
            throttles.reserve([("account", "alice")]),
            throttles.release([("account", "alice")]),
            throttles.succeeded([("account", "alice")]),
            throttles.retryAfter("account", "alice"),
            throttles.take("registrations", "10.0.0.1"),
        ):
            yield self.assertFailure(operation, BusUnavailable)

    @defer.inlineCallbacks
    def test_aSilentServerFailsWithinTheTimeout(self) -> Any:
        (throttles,) = yield self.nodes(1, timeout=0.3)
        self.server.freeze()
        self.addCleanup(lambda: self.server.running and self.server.thaw())
        started = reactor.seconds()
        yield self.assertFailure(
            throttles.reserve([("account", "alice")]), defer.TimeoutError
        )
        self.assertLess(reactor.seconds() - started, 2.0)
        self.server.thaw()


class TwoAuthNodesTests(RedisHarness):
    """
    The auth service as two nodes sharing one store and one Redis server.
    """

    @defer.inlineCallbacks
    def test_guessesSpreadOverTwoNodesAreCheckedAsOnOne(self) -> Any:
        store = MemoryStore()
        yield defer.ensureDeferred(store.open())
        hashers = [CountingHasher(), CountingHasher()]
        throttles = yield self.nodes()
        nodes = [
            AuthService(
                store,
                hasher,
                ServerContext(reactor, stats=ServerStats()),
                throttles=backend,
                node=name,
            )
            for hasher, backend, name in zip(hashers, throttles, "AB", strict=True)
        ]
        guesses = [Client(nodes[i % 2], "127.0.0.66") for i in range(40)]
        for client in guesses:
            client.send(type="login", username="alice", password="guess-one")
            yield sleep(0)  # the two nodes' reservations interleave
        for _ in range(200):
            if all(c.last for c in guesses):
                break
            yield sleep(0.01)
        codes = sorted(c.last["code"] for c in guesses if c.last)
        self.assertEqual(
            codes,
            ["bad_credentials"] * (ACCOUNT_FREE_FAILURES + 1)
            + ["rate_limited"] * (40 - ACCOUNT_FREE_FAILURES - 1),
        )
        checks = [h.checks for h in hashers]
        self.assertEqual(sum(checks), ACCOUNT_FREE_FAILURES + 1, checks)
