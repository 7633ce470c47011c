"""
L{RedisPresence} against a real Redis-protocol server (L{tests.redisserver}:
skipped without one, except under CI): the Lua scripts of the presence
directory as two nodes use them, a dead node reaped by the survivor, a
server restart (it keeps nothing) followed by each node writing its share
again, and the inbox bucket shared by the nodes.

Real reactor, real sockets on 127.0.0.1.  The reaping test waits, on a
Deferred bounded by the test's timeout, for a TTL of a few hundred
milliseconds to pass on the server's clock: that wait is the behaviour
under test.
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import backoffPolicy
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from tests.redisserver import RedisServer, requireServer
from twisted_lab.bus import RedisBus
from twisted_lab.ports import IPresence
from twisted_lab.services import presence as presenceModule
from twisted_lab.services.cluster import ROOM_CHANNEL, presencePayload
from twisted_lab.services.presence import NodeNameTaken, Pair, RedisPresence

HEARTBEAT = 0.1
TTL = 0.4


class Heard:
    """
    What a presence's listeners were told; C{next()} fires at the next.
    """

    def __init__(self) -> None:
        self.departed: list[Pair] = []
        self.gone: list[str] = []
        self._waiters: list[defer.Deferred[None]] = []

    def onDeparted(self, pairs: list[Pair]) -> None:
        self.departed += pairs
        self._wake()

    def onGone(self, nodes: set[str]) -> None:
        self.gone += sorted(nodes)
        self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    @defer.inlineCallbacks
    def until(self, condition: Any) -> Any:
        while not condition():
            waiter: defer.Deferred[None] = defer.Deferred()
            self._waiters.append(waiter)
            yield waiter


class RedisPresenceTests(TestCase):
    timeout = 60

    def setUp(self) -> defer.Deferred[None]:  # type: ignore[override]
        self.server = RedisServer(requireServer(), reactor)
        self.addCleanup(self.server.cleanup)
        return self.server.start()

    @defer.inlineCallbacks
    def presence(self, node: str, prefix: str = "t:") -> Any:
        bus = RedisBus(
            self.server.url,
            reactor,
            retryPolicy=backoffPolicy(
                initialDelay=0.05, maxDelay=0.3, factor=2.0, jitter=lambda: 0.0
            ),
        )
        bus.startService()
        self.addCleanup(bus.stopService)
        yield bus.whenConnected()
        presence = RedisPresence(bus, node, reactor, HEARTBEAT, TTL, prefix=prefix)
        heard = Heard()
        presence.watch(heard.onDeparted, heard.onGone)
        self.addCleanup(self.stopped, presence)
        return presence, heard, bus

    def stopped(self, presence: RedisPresence) -> Any:
        if not presence.stopped:
            return presence.stop()
        return None

    @defer.inlineCallbacks
    def test_membershipAcrossTwoNodes(self) -> Any:
        a, _, _ = yield self.presence("a")
        b, _, _ = yield self.presence("b")
        self.assertTrue(verifyObject(IPresence, a))
        self.assertTrue((yield a.joined("lobby", "alice")))
        self.assertFalse((yield a.joined("lobby", "alice")), "once per node")
        self.assertTrue((yield b.joined("lobby", "bob")))
        self.assertFalse((yield b.joined("lobby", "alice")), "alice is there")
        self.assertTrue((yield b.joined("dev", "bob")))
        self.assertEqual((yield a.members("lobby", 10)), (2, ["alice", "bob"]))
        self.assertEqual((yield a.members("lobby", 1)), (2, ["alice"]))
        self.assertEqual((yield b.rooms(10)), ["dev", "lobby"])
        self.assertEqual((yield b.sizes(["lobby", "dev", "none"])), [2, 1, 0])
        self.assertFalse((yield a.left("lobby", "alice")), "still on b")
        self.assertTrue((yield b.left("lobby", "alice")))
        self.assertFalse((yield b.left("lobby", "alice")), "not twice")
        self.assertEqual((yield a.members("lobby", 10)), (1, ["bob"]))
        self.assertTrue((yield b.left("dev", "bob")))
        self.assertEqual((yield a.rooms(10)), ["lobby"])

    @defer.inlineCallbacks
    def test_routeAndTheSharedInbox(self) -> Any:
        a, _, _ = yield self.presence("a")
        b, _, _ = yield self.presence("b")
        self.assertEqual((yield a.route("bob", 0.001, 3)), (0.0, []))
        yield a.attached("bob")
        yield b.attached("bob")
        waits = []
        for presence in (a, b, a, b):
            wait, nodes = yield presence.route("bob", 0.001, 3)
            self.assertEqual(nodes, ["a", "b"])
            waits.append(wait)
        self.assertEqual(waits[:3], [0.0, 0.0, 0.0])
        self.assertGreater(waits[3], 100.0, "the bucket is one for both nodes")
        yield a.detached("bob")
        self.assertEqual((yield b.route("bob", 1000.0, 3))[1], ["b"])

    @defer.inlineCallbacks
    def test_aDeadNodeIsReapedBySurvivor(self) -> Any:
        a, heardA, _ = yield self.presence("a")
        b, _, _ = yield self.presence("b")
        a.start()
        b.start()
        yield a.joined("lobby", "alice")
        yield b.joined("lobby", "bob")
        yield b.joined("lobby", "alice")
        yield b.attached("bob")
        # b dies: no heartbeat, no clean stop.
        b.running = False
        b.stopped = True
        yield heardA.until(lambda: heardA.departed)
        self.assertEqual(heardA.departed, [("lobby", "bob")])
        yield heardA.until(lambda: heardA.gone)
        self.assertEqual(heardA.gone, ["b"])
        self.assertEqual((yield a.members("lobby", 10)), (1, ["alice"]))
        self.assertEqual((yield a.route("bob", 1.0, 1.0)), (0.0, []))

    @defer.inlineCallbacks
    def test_aRestartedServerIsWrittenAgainByEveryNode(self) -> Any:
        a, _, busA = yield self.presence("a")
        b, _, busB = yield self.presence("b")
        a.start()
        b.start()
        yield a.joined("lobby", "alice")
        yield b.joined("lobby", "bob")
        yield a.attached("alice")
        yield self.server.restart()  # keeps nothing
        yield defer.gatherResults([busA.whenConnected(), busB.whenConnected()])
        while (yield a.members("lobby", 10)) != (2, ["alice", "bob"]):
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual((yield b.route("alice", 1.0, 1.0))[1], ["a"])

    @defer.inlineCallbacks
    def test_aResyncRemovesWhatTheNodeNoLongerHolds(self) -> Any:
        a, heardA, busA = yield self.presence("a")
        yield a.joined("lobby", "alice")
        # The leave of carol never reached the server:
        yield busA.execute(b"SADD", b"t:held:a", b"lobby carol")
        yield busA.execute(b"HINCRBY", b"t:count:lobby", b"carol", 1)
        yield busA.execute(b"ZADD", b"t:room:lobby", 0, b"carol")
        a.dirty = True
        a.start()
        yield heardA.until(lambda: heardA.departed)
        self.assertEqual(heardA.departed, [("lobby", "carol")])
        self.assertEqual((yield a.members("lobby", 10)), (1, ["alice"]))

    @defer.inlineCallbacks
    def test_aCleanStopTakesTheShareOut(self) -> Any:
        a, heardA, _ = yield self.presence("a")
        b, _, _ = yield self.presence("b")
        yield a.joined("lobby", "alice")
        yield b.joined("lobby", "alice")
        yield a.joined("dev", "alice")
        yield a.stop()
        self.assertEqual(heardA.departed, [("dev", "alice")])
        self.assertFalse((yield a.joined("x", "y")), "nothing sent once stopped")
        self.assertEqual((yield b.rooms(10)), ["lobby"])

    @defer.inlineCallbacks
    def test_theScriptsPublishThePresenceEventsTheyMake(self) -> Any:
        """
        A join, a leave, a resync's removal and a dead node's reaping each
        publish their event from the script that made the change (so one
        user's events are heard in the directory's order on every node),
        as L{presencePayload} writes it.
        """
        a, heardA, busA = yield self.presence("a")
        b, _, _ = yield self.presence("b")
        heard: list[bytes] = []
        arrived: list[defer.Deferred[None]] = []

        def receive(payload: bytes) -> None:
            heard.append(payload)
            while arrived:
                arrived.pop().callback(None)

        yield busA.subscribe(ROOM_CHANNEL + "lobby", receive)

        @defer.inlineCallbacks
        def until(count: int) -> Any:
            while len(heard) < count:
                waiter: defer.Deferred[None] = defer.Deferred()
                arrived.append(waiter)
                yield waiter

        yield a.joined("lobby", "alice")
        yield b.joined("lobby", "alice")  # not news: nothing published
        yield a.left("lobby", "alice")  # still on b
        yield b.left("lobby", "alice")
        yield b.joined("lobby", "bob")
        yield until(3)
        self.assertEqual(
            heard,
            [
                presencePayload("a", "lobby", "alice", "join"),
                presencePayload("b", "lobby", "alice", "leave"),
                presencePayload("b", "lobby", "bob", "join"),
            ],
        )
        # b beats once, then dies; a reaps it.
        yield b._beaten((yield b._heartbeat(False)))
        yield deferLater(reactor, TTL + 0.2, lambda: None)
        _, _, departed, reaped = yield a._heartbeat(True)
        self.assertEqual((departed, reaped), ([("lobby", "bob")], ["b"]))
        yield until(4)
        self.assertEqual(heard[3], presencePayload("a", "lobby", "bob", "leave"))

    @defer.inlineCallbacks
    def test_aDeadNodeIsReapedABudgetAtATime(self) -> Any:
        """
        A dead node with more entries than REAP_BUDGET is reaped over
        several heartbeats (each script holds the server a bounded time):
        every member leaves once, and the node's entry goes only with the
        last of its share.
        """
        self.patch(presenceModule, "REAP_BUDGET", 2)
        a, heardA, _ = yield self.presence("a")
        b, _, _ = yield self.presence("b")
        users = [f"u{i}" for i in range(5)]
        for user in users:
            yield b.joined("lobby", user)
            yield b.attached(user)
        for node in (b, a):
            yield node._beaten((yield node._heartbeat(False)))
        yield deferLater(reactor, TTL + 0.2, lambda: None)  # b is dead
        departedAll: list[Pair] = []
        beats = []
        while True:
            _, live, departed, reaped = yield a._heartbeat(True)
            beats.append((len(departed), reaped))
            departedAll += departed
            self.assertEqual(live, ["a"])
            if reaped or len(beats) > 5:
                break
        self.assertEqual(beats, [(2, []), (2, []), (1, ["b"])])
        self.assertEqual(sorted(departedAll), [("lobby", user) for user in users])
        self.assertEqual((yield a.members("lobby", 10)), (0, []))
        self.assertEqual((yield a.rooms(10)), [])
        for user in users:
            self.assertEqual((yield a.route(user, 1.0, 1.0)), (0.0, []))

    @defer.inlineCallbacks
    def test_oneProcessPerNodeName(self) -> Any:
        """
        The heartbeat claims the node's name for its process: another
        process with the same name has its changes refused (NODETAKEN)
        while the claim lives, and may take the name once it has lapsed
        (the first process died).
        """
        first, _, _ = yield self.presence("a")
        second, _, _ = yield self.presence("a")
        yield first._beaten((yield first._heartbeat(False)))
        yield first.joined("lobby", "alice")
        yield self.assertFailure(second.joined("lobby", "bob"), NodeNameTaken)
        yield self.assertFailure(second._heartbeat(False), NodeNameTaken)
        yield self.assertFailure(second._remove(), NodeNameTaken)
        self.assertEqual((yield second.members("lobby", 10)), (1, ["alice"]))
        # first dies: its claim lapses with its entry.
        yield deferLater(reactor, TTL + 0.2, lambda: None)
        fresh, _, _, _ = yield second._heartbeat(False)
        self.assertTrue(fresh)
        yield self.assertFailure(first.joined("lobby", "carol"), NodeNameTaken)
