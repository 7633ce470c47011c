"""
L{RedisBus} against a real Redis-protocol server (see L{tests.redisserver}:
skipped without one, except under CI): two nodes hear each other in
order; a server restart mid-stream is ridden through (reconnection,
resubscription, C{onReconnect}); a publication while the server is down
fails at once.  Real reactor, real sockets on 127.0.0.1; every wait is on
a Deferred, bounded by the test's timeout.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.internet import backoffPolicy
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from tests.redisserver import RedisServer, requireServer
from twisted_lab.bus import BusUnavailable, RedisBus

#: How long a publication may take to fail while the server is down.
PROMPTLY = 2.0


class Inbox:
    """
    What a node received on one channel; C{until(n)} fires once it holds
    C{n} payloads.
    """

    def __init__(self) -> None:
        self.payloads: list[bytes] = []
        self._waiting: list[tuple[int, defer.Deferred[None]]] = []

    def __call__(self, payload: bytes) -> None:
        self.payloads.append(payload)
        still = []
        for count, waiter in self._waiting:
            if len(self.payloads) >= count:
                waiter.callback(None)
            else:
                still.append((count, waiter))
        self._waiting = still

    def until(self, count: int) -> defer.Deferred[None]:
        if len(self.payloads) >= count:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._waiting.append((count, waiter))
        return waiter

    def fromNode(self, node: bytes) -> list[int]:
        prefix = node + b":"
        return [int(p[len(prefix) :]) for p in self.payloads if p.startswith(prefix)]


class Signal:
    """
    A Deferred to wait for the next call of a callback.
    """

    def __init__(self) -> None:
        self.calls = 0
        self._next: defer.Deferred[None] = defer.Deferred()

    def __call__(self) -> None:
        self.calls += 1
        fired, self._next = self._next, defer.Deferred()
        fired.callback(None)

    def next(self) -> defer.Deferred[None]:
        return self._next


class RedisBusTests(TestCase):
    timeout = 60

    def setUp(self) -> defer.Deferred[None]:  # type: ignore[override]
        self.server = RedisServer(requireServer(), reactor)
        self.addCleanup(self.server.cleanup)
        return self.server.start()

    def node(
        self, *channels: tuple[str, Callable[[bytes], object]], **settings: Any
    ) -> RedisBus:
        """
        A started bus, its channels subscribed before it connects (so that
        once L{RedisBus.whenConnected} fires, the server has them).
        """
        bus = RedisBus(
            self.server.url,
            reactor,
            retryPolicy=backoffPolicy(
                initialDelay=0.05, maxDelay=0.5, factor=2.0, jitter=lambda: 0.0
            ),
            **settings,
        )
        for channel, receiver in channels:
            bus.subscribe(channel, receiver)
        bus.startService()
        self.addCleanup(bus.stopService)
        return bus

    @defer.inlineCallbacks
    def publishAll(self, bus: RedisBus, node: bytes, numbers: range) -> Any:
        yield defer.gatherResults(
            [bus.publish("room", b"%s:%d" % (node, i)) for i in numbers],
            consumeErrors=True,
        )

    @defer.inlineCallbacks
    def test_twoNodesHearEachOtherInOrder(self) -> Any:
        inboxA, inboxB = Inbox(), Inbox()
        a = self.node(("room", inboxA))
        b = self.node(("room", inboxB))
        yield defer.gatherResults([a.whenConnected(), b.whenConnected()])

        yield defer.gatherResults(
            [
                self.publishAll(a, b"a", range(100)),
                self.publishAll(b, b"b", range(100)),
            ]
        )
        yield defer.gatherResults([inboxA.until(200), inboxB.until(200)])
        for inbox in (inboxA, inboxB):
            self.assertEqual(inbox.fromNode(b"a"), list(range(100)))
            self.assertEqual(inbox.fromNode(b"b"), list(range(100)))
        # Redis orders what both published one way for every subscriber.
        self.assertEqual(inboxA.payloads, inboxB.payloads)

    @defer.inlineCallbacks
    def test_sharedStateCommands(self) -> Any:
        a = self.node()
        b = self.node()
        yield defer.gatherResults([a.whenConnected(), b.whenConnected()])
        self.assertTrue((yield a.set("netlab:test", b"v", px=60_000)))
        self.assertFalse((yield b.set("netlab:test", b"w", nx=True)))
        self.assertEqual((yield b.get("netlab:test")), b"v")
        throttle = (
            "local n = redis.call('INCR', KEYS[1]) "
            "if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end "
            "return n"
        )
        counts = []
        for bus in (a, b, a):
            counts.append((yield bus.eval(throttle, ["netlab:hits"], [60_000])))
        self.assertEqual(counts, [1, 2, 3])
        self.assertEqual((yield a.hset("netlab:h", {"x": 1, "y": "2"})), 2)
        self.assertEqual((yield b.hgetall("netlab:h")), {b"x": b"1", b"y": b"2"})
        self.assertEqual((yield b.hdel("netlab:h", "x")), 1)
        self.assertEqual((yield a.delete("netlab:h", "netlab:test")), 2)

    @defer.inlineCallbacks
    def test_serverRestartedMidStream(self) -> Any:
        inboxA, inboxB = Inbox(), Inbox()
        a = self.node(("room", inboxA))
        b = self.node(("room", inboxB))
        reconnectedA, reconnectedB = Signal(), Signal()
        a.onReconnect(reconnectedA)
        b.onReconnect(reconnectedB)
        yield defer.gatherResults([a.whenConnected(), b.whenConnected()])

        yield self.publishAll(a, b"a", range(20))
        yield defer.gatherResults([inboxA.until(20), inboxB.until(20)])

        backA, backB = reconnectedA.next(), reconnectedB.next()
        yield self.server.stop()

        # Down: a publication fails (at once, or as soon as the node sees
        # its connection close), it is never left waiting.
        down = a.publish("room", b"a:lost")
        down.addTimeout(PROMPTLY, reactor)
        yield self.assertFailure(down, BusUnavailable)
        self.assertFalse(a.connected)
        refused = a.publish("room", b"a:lost")
        self.assertTrue(refused.called)
        yield self.assertFailure(refused, BusUnavailable)

        yield self.server.start()
        # Each node subscribes again, then calls its onReconnect callbacks.
        yield defer.gatherResults([backA, backB])
        self.assertEqual((reconnectedA.calls, reconnectedB.calls), (1, 1))
        yield defer.gatherResults([a.whenConnected(), b.whenConnected()])

        yield defer.gatherResults(
            [
                self.publishAll(a, b"a", range(20, 40)),
                self.publishAll(b, b"b", range(10)),
            ]
        )
        yield defer.gatherResults([inboxA.until(50), inboxB.until(50)])
        for inbox in (inboxA, inboxB):
            self.assertEqual(inbox.fromNode(b"a"), list(range(40)))
            self.assertEqual(inbox.fromNode(b"b"), list(range(10)))

    @defer.inlineCallbacks
    def test_publishWhileTheServerIsDownFailsPromptly(self) -> Any:
        a = self.node()
        yield a.whenConnected()
        lost = a._commands.current
        assert lost is not None
        closed = lost.whenLost()
        yield self.server.stop()
        yield closed
        started = reactor.seconds()
        for _ in range(3):
            attempt = a.publish("room", b"x")
            self.assertTrue(attempt.called)
            yield self.assertFailure(attempt, BusUnavailable)
        self.assertLess(reactor.seconds() - started, PROMPTLY)

    @defer.inlineCallbacks
    def test_aServerThatStopsAnsweringIsLeft(self) -> Any:
        """
        A frozen server keeps the connections open but answers nothing: the
        keep-alive notices, drops them, and the node comes back (with its
        channels and a catch-up) once the server answers again.
        """
        inbox = Inbox()
        a = self.node(("room", inbox), pingInterval=0.2, pingTimeout=0.3)
        reconnected = Signal()
        a.onReconnect(reconnected)
        yield a.whenConnected()
        back = reconnected.next()
        commands, subscriber = a._commands.current, a._subscriber.current
        assert commands is not None and subscriber is not None
        self.server.freeze()
        unanswered = a.publish("room", b"a:0")
        yield defer.gatherResults([commands.whenLost(), subscriber.whenLost()])
        yield self.assertFailure(unanswered, BusUnavailable)
        self.server.thaw()
        yield back
        yield a.whenConnected()
        yield a.publish("room", b"a:1")
        yield inbox.until(1)
        self.assertIn(inbox.fromNode(b"a"), ([1], [0, 1]))
