"""
The chat service as several nodes, on its own: room feeds (order, exactly
once, gaps filled from the store, catch-up after a reconnection), the bus
link, and two or three L{ChatService}s ("nodes") sharing one L{MemoryStore},
one in-process bus and one L{LocalDirectory}, on one L{Clock}.  No socket,
no server, no sleep: the bus delivers on the next turn of the clock, and
the tests move the clock.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests.helpers import EventRecorder
from tests.servicehelpers import ChannelClient, InlineHasher
from twisted_lab.bus import BusUnavailable, LocalBus
from twisted_lab.codecs import events
from twisted_lab.observe.metrics import ServerStats
from twisted_lab.ports import IBus, IPresence
from twisted_lab.services import cluster
from twisted_lab.services.chat import (
    CHAT_LIMITS,
    DIRECTORY_CACHE,
    DIRECTORY_DEADLINE,
    STOP_GRACE,
    SUBSCRIBE_SETTLE,
    ChatService,
)
from twisted_lab.services.cluster import ROOM_CHANNEL, ClusterLink
from twisted_lab.services.context import ServerContext
from twisted_lab.services.presence import (
    HEARTBEAT,
    NODE_TTL,
    LocalDirectory,
    NodePresence,
)
from twisted_lab.services.roomfeed import (
    FILL_BATCH,
    GAP_GRACE,
    RETRY_FIRST,
    HeldBudget,
    RoomFeed,
    rowSize,
)
from twisted_lab.storage.memory import MemoryStore

PASSWORD = "password1"
START = 1_800_000_000


def row(seq: int, text: str = "") -> tuple[int, str, str, str]:
    return (seq, "alice", text or f"m{seq}", "2027-01-15T08:00:00Z")


# -- a room's feed --------------------------------------------------------------------


class FeedHarness(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.store = MemoryStore()
        self.successResultOf(defer.ensureDeferred(self.store.open()))
        self.delivered: list[list[int]] = []
        self.reads: list[tuple[int, int]] = []
        self.failReads = 0

    def commit(self, count: int) -> list[tuple[int, str, str, str]]:
        """
        Store C{count} messages in room r; their rows.
        """
        texts = [f"t{i:04}" for i in range(count)]
        seqs, _ = self.successResultOf(
            self.store.storeMessages([("r", "alice", t, "ts") for t in texts])
        )
        return [(s, "alice", t, "ts") for s, t in zip(seqs, texts, strict=True)]

    def fetch(self, room: str, after: int, limit: int) -> Any:
        self.reads.append((after, limit))
        if self.failReads:
            self.failReads -= 1
            return defer.fail(ConnectionError("the database is down"))
        return self.store.history(room, after, limit)

    def feed(self, delivered: int = 0, budget: HeldBudget | None = None) -> RoomFeed:
        return RoomFeed(
            "r",
            delivered,
            clock=self.clock,
            fetch=self.fetch,
            deliver=lambda rows: self.delivered.append([r[0] for r in rows]),
            budget=budget,
        )

    def seqs(self) -> list[int]:
        return [seq for run in self.delivered for seq in run]


class RoomFeedTests(FeedHarness):
    def test_inOrderRowsAreDeliveredAtOnceAsOneRun(self) -> None:
        feed = self.feed()
        rows = self.commit(3)
        feed.offer(rows)
        self.assertEqual(self.delivered, [[1, 2, 3]])
        self.assertEqual(feed.delivered, 3)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.reads, [])

    def test_duplicatesAreDropped(self) -> None:
        feed = self.feed()
        rows = self.commit(3)
        feed.offer(rows[:2])
        feed.offer(rows)  # 1 and 2 again (a publication and a catch-up)
        feed.offer(rows[1:2])
        self.assertEqual(self.delivered, [[1, 2], [3]])

    def test_aReorderingWithinTheGraceReadsNothing(self) -> None:
        """
        Two nodes' publications overtaking each other: the later one is
        held until the earlier arrives.
        """
        feed = self.feed()
        rows = self.commit(4)
        feed.offer(rows[2:])
        self.assertEqual(self.delivered, [])
        self.assertTrue(feed.gapOpen)
        self.clock.advance(GAP_GRACE / 2)
        feed.offer(rows[:2])
        self.assertEqual(self.seqs(), [1, 2, 3, 4])
        self.assertFalse(feed.gapOpen)
        self.clock.advance(GAP_GRACE)
        self.assertEqual(self.reads, [])

    def test_aGapStillOpenAfterTheGraceIsFilledFromTheStore(self) -> None:
        feed = self.feed()
        rows = self.commit(5)
        feed.offer([rows[4]])  # 1-4 were lost
        self.clock.advance(GAP_GRACE - 0.01)
        self.assertEqual(self.reads, [])
        self.clock.advance(0.01)
        self.assertEqual(self.reads, [(0, FILL_BATCH)])
        self.assertEqual(self.delivered, [[1, 2, 3, 4, 5]])
        feed.offer(rows)  # the lost publication after all: nothing twice
        self.assertEqual(self.seqs(), [1, 2, 3, 4, 5])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_aPositionOpensAGap(self) -> None:
        """
        A node whose publication failed announces its last seq later: the
        others read the store up to it.
        """
        feed = self.feed()
        self.commit(2)
        feed.heard(2)
        self.clock.advance(GAP_GRACE)
        self.assertEqual(self.delivered, [[1, 2]])

    def test_aSeqTheStoreNeverHasIsGivenUp(self) -> None:
        """
        A position beyond the store (a bug elsewhere, or a node's wrong
        word) costs reads less and less often, then is given up: no
        endless polling of the database.
        """
        recorder = EventRecorder()
        feed = self.feed()
        feed.log = recorder.logger
        self.commit(1)
        feed.heard(5)
        for _ in range(200):
            self.clock.advance(0.5)
        self.assertEqual(self.delivered, [[1]])
        self.assertFalse(feed.gapOpen)
        self.assertLessEqual(len(self.reads), 6)
        self.assertEqual(len(recorder.named(events.FEED_STORE_GAP)), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_catchUpReadsInBatchesToTheEnd(self) -> None:
        feed = self.feed()
        self.commit(FILL_BATCH * 2 + 5)
        feed.catchUp()  # no gap heard of: the store may hold more
        self.assertEqual(
            self.reads, [(0, FILL_BATCH), (FILL_BATCH, FILL_BATCH), (200, FILL_BATCH)]
        )
        self.assertEqual(self.seqs(), list(range(1, FILL_BATCH * 2 + 6)))
        self.assertEqual([len(run) for run in self.delivered], [100, 100, 5])

    def test_rowsArrivingDuringAReadAreNotDeliveredTwice(self) -> None:
        feed = self.feed()
        rows = self.commit(3)
        reads: list[defer.Deferred[Any]] = []

        def slowFetch(room: str, after: int, limit: int) -> Any:
            d: defer.Deferred[Any] = defer.Deferred()
            reads.append(d)
            return d

        feed._fetch = slowFetch
        feed.catchUp()
        feed.offer(rows)  # the publications arrive while the read runs
        self.assertEqual(self.delivered, [])
        reads[0].callback(rows[:2])
        self.assertEqual(self.seqs(), [1, 2, 3])

    def test_aFailedReadIsRetriedWithABackOff(self) -> None:
        recorder = EventRecorder()
        feed = self.feed()
        feed.log = recorder.logger
        rows = self.commit(2)
        self.failReads = 2
        feed.offer([rows[1]])
        self.clock.advance(GAP_GRACE)
        self.assertEqual(len(self.reads), 1)
        self.clock.advance(RETRY_FIRST)
        self.assertEqual(len(self.reads), 2)
        self.clock.advance(RETRY_FIRST)
        self.assertEqual(len(self.reads), 2, "the second wait is twice as long")
        self.clock.advance(RETRY_FIRST)
        self.assertEqual(self.delivered, [[1, 2]])
        self.assertEqual(len(recorder.named(events.FEED_READ_FAILED)), 2)

    def test_heldMessagesAreBoundedNodeWide(self) -> None:
        """
        Past the node's budget, messages are only noted as heard: they are
        read from the store, and nothing is lost.
        """
        rows = self.commit(40)
        budget = HeldBudget(limit=rowSize(rows[0]) * 10)
        first, second = self.feed(budget=budget), self.feed(budget=budget)
        first.offer(rows[1:20])
        self.assertEqual(budget.used, rowSize(rows[0]) * 10)
        second.offer(rows[1:5])
        self.assertEqual(len(second._held), 0)
        self.clock.advance(GAP_GRACE)
        self.assertEqual(budget.used, 0)
        # Each read to the end of the store: every seq once per feed.
        self.assertEqual(sorted(self.seqs()), sorted(list(range(1, 41)) * 2))

    def test_closingStopsEverything(self) -> None:
        budget = HeldBudget()
        feed = self.feed(budget=budget)
        rows = self.commit(3)
        feed.offer(rows[2:])
        feed.catchUpLater(1.0)
        feed.close()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(budget.used, 0)
        feed.offer(rows)
        feed.catchUp()
        self.assertEqual(self.delivered, [])


# -- the nodes of a test cluster -------------------------------------------------


@implementer(IBus)
class NodeBus:
    """
    One node's view of a bus shared in process: it can lose publications
    (sent, never delivered), refuse them (L{BusUnavailable}) and be told
    it reconnected.
    """

    def __init__(self, shared: LocalBus) -> None:
        self.shared = shared
        self.losing = False
        self.down = False
        #: Publications waiting for the bus's answer, when it is slow.
        self.holding: list[defer.Deferred[None]] | None = None
        self.sent: list[tuple[str, bytes]] = []
        self._reconnected: list[Any] = []

    def publish(self, channel: str, payload: bytes) -> defer.Deferred[None]:
        if self.down:
            return defer.fail(BusUnavailable("not connected"))
        self.sent.append((channel, payload))
        if self.losing:
            return defer.succeed(None)
        published = self.shared.publish(channel, payload)
        if self.holding is not None:
            answer: defer.Deferred[None] = defer.Deferred()
            self.holding.append(answer)
            return answer
        return published

    def subscribe(self, channel: str, receiver: object) -> defer.Deferred[None]:
        return self.shared.subscribe(channel, receiver)

    def unsubscribe(self, channel: str, receiver: object) -> None:
        self.shared.unsubscribe(channel, receiver)

    def onReconnect(self, callback: object) -> None:
        self._reconnected.append(callback)

    def reconnect(self) -> None:
        for callback in self._reconnected:
            callback()


class Member(ChannelClient):
    """
    One connection of a user to one node.
    """

    def __init__(self, node: ChatService, name: str) -> None:
        super().__init__(node)
        self.node = node
        self.name = name

    def seqs(self, room: str = "lobby") -> list[int]:
        return [m["seq"] for m in self.received("message") if m["room"] == room]

    def presence(self) -> list[tuple[str, str]]:
        return [(m["user"], m["event"]) for m in self.received("presence")]


class ClusterHarness(SynchronousTestCase):
    """
    Nodes sharing one store, one bus and one directory, on one clock.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.store = MemoryStore()
        self.successResultOf(defer.ensureDeferred(self.store.open()))
        self.shared = LocalBus(self.clock)
        # Publishing presence events as the Redis scripts do.
        self.directory = LocalDirectory(self.clock, bus=self.shared)
        self.recorder = EventRecorder()
        self.registered: set[str] = set()

    def node(self, name: str, **settings: Any) -> ChatService:
        context = ServerContext(self.clock, self.recorder.logger, ServerStats())
        presence = self.directory.presence(name)
        presence.log = self.recorder.logger
        service = ChatService(
            self.store,
            InlineHasher(),
            context,
            bus=NodeBus(self.shared),
            node=name,
            presence=presence,
            **settings,
        )
        self.addCleanup(self.stopNode, service)
        return service

    def stopNode(self, service: ChatService) -> None:
        if not service.presence.stopped:  # type: ignore[attr-defined]
            self.successResultOf(service.stopCluster())
        closing = service.closeLink()
        self.clock.advance(STOP_GRACE)
        self.successResultOf(closing)
        for room in list(service.rooms.values()):
            room.feed.close()

    def member(self, node: ChatService, name: str) -> Member:
        member = Member(node, name)
        if name not in self.registered:
            member.ask(type="register", username=name, password=PASSWORD)
            self.registered.add(name)
        reply = member.ask(type="login", username=name, password=PASSWORD)
        assert reply["type"] == "session", reply
        return member

    def settle(self) -> None:
        """
        Run everything due now: group commits, bus deliveries, and what
        they schedule for the same instant.
        """
        for _ in range(100):
            due = [
                c
                for c in self.clock.getDelayedCalls()
                if c.getTime() <= self.clock.seconds()
            ]
            if not due:
                return
            self.clock.advance(0)
        raise AssertionError("the clock never settles")

    def clusterCalls(self) -> list[Any]:
        """
        The timers of feeds, links and presences (not the session watch's).
        """
        return [
            call
            for call in self.clock.getDelayedCalls()
            if isinstance(
                getattr(getattr(call, "func", None), "__self__", None),
                RoomFeed | ClusterLink | NodePresence,
            )
        ]

    def pump(self, seconds: float, step: float = 0.25) -> None:
        """
        Let C{seconds} pass in small steps, as a running reactor would
        (one big jump would make every heartbeat late at once).
        """
        end = self.clock.seconds() + seconds
        while self.clock.seconds() < end:
            self.clock.advance(min(step, end - self.clock.seconds()))
            self.settle()

    def say(self, member: Member, text: str, room: str = "lobby") -> None:
        member.send(type="say", room=room, text=text)
        self.settle()

    def joined(self, *members: Member, room: str = "lobby") -> None:
        for member in members:
            reply = member.ask(type="join", room=room)
            assert reply["type"] == "joined", reply
        self.clock.advance(SUBSCRIBE_SETTLE)
        self.settle()


class TwoNodeTests(ClusterHarness):
    def test_theDirectoryIsAPresence(self) -> None:
        self.assertTrue(verifyObject(IPresence, self.directory.presence("a")))
        self.assertTrue(verifyObject(IBus, NodeBus(self.shared)))

    def test_membersOnBothNodesSeeOneOrderGapFree(self) -> None:
        a, b = self.node("a"), self.node("b")
        alice, bob = self.member(a, "alice"), self.member(b, "bob")
        carol = self.member(b, "carol")
        self.joined(alice, bob, carol)
        for i in range(5):
            # Both nodes commit in the same turn: their seqs interleave.
            alice.send(type="say", room="lobby", text=f"a{i}")
            bob.send(type="say", room="lobby", text=f"b{i}")
            self.settle()
        for member in (alice, bob, carol):
            self.assertEqual(member.seqs(), list(range(1, 11)), member.name)
        texts = [[m["text"] for m in x.received("message")] for x in (alice, carol)]
        self.assertEqual(texts[0], texts[1])
        self.assertEqual(
            sorted(texts[0]),
            sorted([f"a{i}" for i in range(5)] + [f"b{i}" for i in range(5)]),
        )
        self.assertEqual(self.store._rooms["lobby"][-1][0], 10)

    def test_aLostPublicationIsFilledFromTheStoreAtTheNextMessage(self) -> None:
        a, b = self.node("a"), self.node("b")
        alice, bob = self.member(a, "alice"), self.member(b, "bob")
        self.joined(alice, bob)
        self.say(alice, "one")
        a.bus.losing = True  # type: ignore[union-attr]
        self.say(alice, "two")
        self.say(alice, "three")
        a.bus.losing = False  # type: ignore[union-attr]
        self.say(alice, "four")
        self.assertEqual(bob.seqs(), [1])
        self.clock.advance(GAP_GRACE)
        self.assertEqual(bob.seqs(), [1, 2, 3, 4])
        self.assertEqual(alice.seqs(), [1, 2, 3, 4])
        self.assertEqual(
            [m["text"] for m in bob.received("message")],
            ["one", "two", "three", "four"],
        )

    def test_aFailedPublishNeverFailsTheSayAndIsAnnouncedLater(self) -> None:
        """
        The bus refuses the publication: the sender's message is committed
        and delivered on its node, the request does not fail, and once the
        bus takes publications again the node announces the room's position:
        the other node reads the store (no next message needed).
        """
        a, b = self.node("a"), self.node("b")
        alice, bob = self.member(a, "alice"), self.member(b, "bob")
        self.joined(alice, bob)
        a.bus.down = True  # type: ignore[union-attr]
        self.say(alice, "while the bus is down")
        self.assertEqual(alice.seqs(), [1])
        self.assertEqual(alice.received("error"), [])
        self.assertEqual(bob.seqs(), [])
        self.assertIn(events.BUS_PUBLISH_FAILED, self.recorder.names())
        self.assertEqual(a.link.unannounced, {"lobby": 1})  # type: ignore[union-attr]
        self.clock.advance(cluster.RETRY_ANNOUNCE)
        self.settle()
        self.assertEqual(bob.seqs(), [], "still down: still unannounced")
        a.bus.down = False  # type: ignore[union-attr]
        self.clock.advance(cluster.RETRY_ANNOUNCE)
        self.settle()
        self.clock.advance(GAP_GRACE)
        self.assertEqual(bob.seqs(), [1])
        self.assertEqual(a.link.unannounced, {})  # type: ignore[union-attr]
        self.assertEqual(self.clusterCalls(), [], "no retry left")

    def test_whatCannotBeAnnouncedIsCountedAndLogged(self) -> None:
        """
        Past MAX_UNANNOUNCED rooms, a room's position is dropped (said in
        the log); a failed announcement is counted and logged like any
        lost publication, then tried again.
        """
        self.patch(cluster, "MAX_UNANNOUNCED", 1)
        a, b = self.node("a"), self.node("b")
        alice, bob = self.member(a, "alice"), self.member(b, "bob")
        self.joined(alice, bob)
        self.joined(alice, bob, room="dev")
        link = a.link
        assert link is not None
        a.bus.down = True  # type: ignore[union-attr]
        self.say(alice, "one")
        self.say(alice, "two", room="dev")
        self.assertEqual(link.unannounced, {"lobby": 1})
        self.assertEqual(link.dropped, 1)
        self.assertEqual(len(self.recorder.named(events.BUS_POSITION_DROPPED)), 1)
        failed = link.failed
        self.clock.advance(cluster.RETRY_ANNOUNCE)
        self.settle()
        self.assertEqual(link.failed, failed + 1, "the announcement's failure")
        a.bus.down = False  # type: ignore[union-attr]
        self.clock.advance(cluster.RETRY_ANNOUNCE)
        self.settle()
        self.clock.advance(GAP_GRACE)
        self.assertEqual(bob.seqs(), [1])
        self.assertEqual(link.unannounced, {})

    def test_aReconnectedBusCatchesUpEveryRoom(self) -> None:
        a, b = self.node("a"), self.node("b")
        alice, bob = self.member(a, "alice"), self.member(b, "bob")
        self.joined(alice, bob)
        self.joined(alice, bob, room="dev")
        a.bus.losing = True  # type: ignore[union-attr]
        self.say(alice, "lost in lobby")
        self.say(alice, "lost in dev", room="dev")
        a.bus.losing = False  # type: ignore[union-attr]
        self.assertEqual(bob.received("message"), [])
        b.bus.reconnect()  # type: ignore[union-attr]
        self.assertEqual(bob.seqs("lobby"), [1])
        self.assertEqual(bob.seqs("dev"), [1])
        self.assertIn(events.CLUSTER_CATCH_UP, self.recorder.names())
        self.say(alice, "after")
        self.assertEqual(bob.seqs("lobby"), [1, 2])

    def test_aNewSubscriptionReadsWhatWasPublishedBeforeItTookEffect(self) -> None:
        a, b = self.node("a"), self.node("b")
        alice = self.member(a, "alice")
        self.joined(alice)
        bob = self.member(b, "bob")
        joined = bob.ask(type="join", room="lobby")
        self.assertEqual(joined["last_seq"], 0)
        # Committed on a after b read the room's last seq, published
        # before b's subscription reached the bus server:
        a.bus.losing = True  # type: ignore[union-attr]
        self.say(alice, "racing the join")
        self.assertEqual(bob.seqs(), [])
        self.clock.advance(SUBSCRIBE_SETTLE)
        self.assertEqual(bob.seqs(), [1])

    def test_presenceWhoAndRoomsAreClusterWide(self) -> None:
        a, b = self.node("a"), self.node("b")
        alice, bob = self.member(a, "alice"), self.member(b, "bob")
        self.joined(alice)
        reply = bob.ask(type="join", room="lobby")
        self.assertEqual(reply["members"], ["alice", "bob"])
        self.settle()
        self.assertEqual(alice.presence(), [("bob", "join")])
        self.assertEqual(bob.presence(), [])
        # bob again, on the other node: not news.
        bob2 = self.member(a, "bob")
        self.assertEqual(
            bob2.ask(type="join", room="lobby")["members"], ["alice", "bob"]
        )
        self.settle()
        self.assertEqual(alice.presence(), [("bob", "join")])
        for member in (alice, bob):
            self.assertEqual(
                member.ask(type="who", room="lobby")["members"], ["alice", "bob"]
            )
            self.assertEqual(
                member.ask(type="rooms")["rooms"], [{"room": "lobby", "members": 2}]
            )
        bob.close()  # bob is still in the room on a
        self.settle()
        self.assertEqual(alice.presence(), [("bob", "join")])
        bob2.ask(type="leave", room="lobby")
        self.settle()
        self.assertEqual(alice.presence(), [("bob", "join"), ("bob", "leave")])
        self.assertEqual(alice.ask(type="who", room="lobby")["members"], ["alice"])
        self.assertEqual(
            bob2.ask(type="who", room="lobby")["members"], ["alice"], "any node"
        )

    def test_privateMessagesReachTheUsersNode(self) -> None:
        a, b = self.node("a"), self.node("b")
        alice, bob = self.member(a, "alice"), self.member(b, "bob")
        bobToo = self.member(a, "bob")
        self.assertEqual(
            alice.ask(type="msg", to="BOB", text="psst"), {"type": "sent", "to": "bob"}
        )
        self.settle()
        for connection in (bob, bobToo):
            [private] = connection.received("private")
            self.assertEqual((private["from"], private["text"]), ("alice", "psst"))
        self.assertEqual(
            bob.ask(type="msg", to="nobody", text="?")["code"], "no_such_user"
        )
        bob.close()
        bobToo.close()
        self.assertEqual(
            alice.ask(type="msg", to="bob", text="?")["code"], "no_such_user"
        )

    def test_theInboxOfAUserIsLimitedAcrossNodes(self) -> None:
        a, b = (
            self.node("a", messageRate=100.0, messageBurst=5),
            self.node("b", messageRate=100.0, messageBurst=5),
        )
        target = self.member(a, "target")
        senders = [self.member(n, f"sender{i}") for i, n in enumerate((a, b) * 2)]
        codes = []
        for _ in range(6):
            for sender in senders:
                codes.append(sender.ask(type="msg", to="target", text="x")["type"])
        self.settle()
        # 4 x burst (20) for the inbox, whichever node the senders are on.
        self.assertEqual(codes.count("sent"), 20)
        self.assertEqual(len(target.received("private")), 20)

    def test_aDeadNodesMembersAreGoneWithinTheTTL(self) -> None:
        a, b = self.node("a"), self.node("b")
        a.startCluster()
        b.startCluster()
        alice, bob = self.member(a, "alice"), self.member(b, "bob")
        self.joined(alice, bob)
        self.pump(NODE_TTL)  # both healthy long enough to reap
        # b is killed: no more heartbeats, nothing said.
        b.presence._beatCall.cancel()  # type: ignore[attr-defined]
        b.presence.running = False  # type: ignore[attr-defined]
        b.link.close()  # type: ignore[union-attr]
        killedAt = self.clock.seconds()
        # Committed by b just before it died, never published:
        b.bus.losing = True  # type: ignore[union-attr]
        self.say(bob, "last words")
        self.assertEqual(alice.seqs(), [])
        while ("bob", "leave") not in alice.presence():
            self.pump(0.25)
            self.assertLess(
                self.clock.seconds() - killedAt, NODE_TTL + HEARTBEAT + 0.01
            )
        self.assertGreater(self.clock.seconds() - killedAt, NODE_TTL - HEARTBEAT)
        self.assertEqual(alice.ask(type="who", room="lobby")["members"], ["alice"])
        self.assertEqual(
            alice.ask(type="msg", to="bob", text="?")["code"], "no_such_user"
        )
        self.assertIn(events.NODE_REAPED, self.recorder.names())
        self.assertIn(events.NODE_GONE, self.recorder.names())
        self.settle()
        self.assertEqual(alice.seqs(), [1], "the dead node's last message, read")

    def test_aCleanStopAnnouncesTheLeavesAtOnce(self) -> None:
        a, b = self.node("a"), self.node("b")
        a.startCluster()
        b.startCluster()
        alice, bob = self.member(a, "alice"), self.member(b, "bob")
        self.joined(alice, bob)
        self.successResultOf(b.stopCluster())
        self.settle()
        self.assertEqual(alice.presence(), [("bob", "join"), ("bob", "leave")])
        self.assertEqual(alice.ask(type="who", room="lobby")["members"], ["alice"])
        bob.close()  # the server closes its connections after: not news
        self.settle()
        self.assertEqual(alice.presence(), [("bob", "join"), ("bob", "leave")])

    def test_theLinkClosesOnceItsLastPublicationsAreTaken(self) -> None:
        """
        The bus closes after the link: closing it waits (a bounded time)
        for the bus to answer its last publications.
        """
        a, b = self.node("a"), self.node("b")
        alice, bob = self.member(a, "alice"), self.member(b, "bob")
        self.joined(alice, bob)
        b.bus.holding = []  # type: ignore[union-attr]
        self.say(bob, "last words")
        self.successResultOf(b.stopCluster())
        self.assertFalse(b.link.closed, "its connections are still served")  # type: ignore[union-attr]
        closing = b.closeLink()
        self.assertNoResult(closing)
        for answer in b.bus.holding:  # type: ignore[union-attr]
            answer.callback(None)
        self.successResultOf(closing)
        self.assertTrue(b.link.closed)  # type: ignore[union-attr]
        self.assertEqual(alice.seqs(), [1])

        c = self.node("c")
        carol = self.member(c, "carol")
        self.joined(carol)
        c.bus.holding = []  # type: ignore[union-attr]
        self.say(carol, "unanswered")
        self.successResultOf(c.stopCluster())
        closing = c.closeLink()
        self.clock.advance(STOP_GRACE)
        self.successResultOf(closing)
        for answer in c.bus.holding:  # type: ignore[union-attr]
            answer.callback(None)  # too late: nothing happens

    def test_theLinkClosesAfterTheGroupCommitInFlight(self) -> None:
        """
        What is committed while the node stops is published before the
        link closes.
        """
        a, b = self.node("a"), self.node("b")
        alice, bob = self.member(a, "alice"), self.member(b, "bob")
        self.joined(alice, bob)
        pending: list[tuple[defer.Deferred[Any], Any]] = []
        realStore = self.store.storeMessages

        def slowCommit(rows: Any) -> defer.Deferred[Any]:
            done: defer.Deferred[Any] = defer.Deferred()
            pending.append((done, rows))
            return done

        self.patch(self.store, "storeMessages", slowCommit)
        bob.send(type="say", room="lobby", text="in flight")
        self.settle()
        self.successResultOf(b.stopCluster())
        closing = b.closeLink()
        self.assertNoResult(closing)
        done, rows = pending.pop()
        realStore(rows).chainDeferred(done)
        self.settle()
        self.successResultOf(closing)
        self.assertTrue(b.link.closed)  # type: ignore[union-attr]
        self.assertEqual(alice.seqs(), [1])

    def test_aNodeTakenForDeadWritesItsShareAgain(self) -> None:
        """
        A node that was only frozen past the TTL finds at its next
        heartbeat that it was reaped, and writes its members back.
        """
        a, b = self.node("a"), self.node("b")
        a.startCluster()
        b.startCluster()
        alice, bob = self.member(a, "alice"), self.member(b, "bob")
        self.joined(alice, bob)
        self.pump(NODE_TTL)
        call = b.presence._beatCall  # type: ignore[attr-defined]
        call.delay(NODE_TTL * 2)  # b's reactor is stuck
        self.pump(NODE_TTL + HEARTBEAT)
        self.assertEqual(alice.ask(type="who", room="lobby")["members"], ["alice"])
        self.pump(NODE_TTL)
        self.assertIn(events.PRESENCE_RESYNCED, self.recorder.names())
        self.assertEqual(
            alice.ask(type="who", room="lobby")["members"], ["alice", "bob"]
        )


class NodeNameTests(ClusterHarness):
    def test_aSecondProcessWithTheSameNameStops(self) -> None:
        """
        Two processes started with one --node: the second's changes and
        heartbeats are refused (the first holds the name), and once that
        has lasted longer than a TTL (a crashed predecessor's claim would
        have lapsed) it says so and stops; the first's share is whole.
        """
        first = self.node("a")
        first.startCluster()
        alice = self.member(first, "alice")
        self.joined(alice)
        self.pump(HEARTBEAT)
        second = self.node("a")
        conflicts: list[str] = []
        second.presence.onConflict(conflicts.append)  # type: ignore[attr-defined]
        second.startCluster()
        bob = self.member(second, "bob")
        self.assertEqual(bob.ask(type="join", room="lobby")["type"], "joined")
        self.pump(NODE_TTL)
        self.assertEqual(conflicts, [])
        self.pump(HEARTBEAT * 2)
        self.assertEqual(conflicts, ["a"])
        self.assertEqual(len(self.recorder.named(events.NODE_NAME_TAKEN)), 1)
        self.successResultOf(second.stopCluster())
        other = self.node("b")
        carol = self.member(other, "carol")
        self.assertEqual(
            carol.ask(type="who", room="lobby")["members"], ["alice"], "whole"
        )
        self.assertEqual(carol.ask(type="msg", to="alice", text="hi")["type"], "sent")

    def test_aRestartedNodeWaitsForItsPredecessorsClaim(self) -> None:
        """
        A node killed and started again at once (the same name, a new
        process) is refused until its predecessor's claim lapses (the
        TTL), then writes its share: no conflict.
        """
        first = self.node("a")
        first.startCluster()
        self.pump(HEARTBEAT)
        first.presence.running = False  # type: ignore[attr-defined]  # killed
        again = self.node("a")
        conflicts: list[str] = []
        again.presence.onConflict(conflicts.append)  # type: ignore[attr-defined]
        again.startCluster()
        alice = self.member(again, "alice")
        self.joined(alice)
        self.pump(NODE_TTL + HEARTBEAT * 2)
        self.assertEqual(conflicts, [])
        self.assertFalse(again.presence.dirty)  # type: ignore[attr-defined]
        other = self.node("b")
        bob = self.member(other, "bob")
        self.assertEqual(bob.ask(type="who", room="lobby")["members"], ["alice"])


#: What a directory that cannot be reached fails.
FAILING = (
    "_join _leave _attach _detach _members _rooms _sizes _route _heartbeat _sync"
).split()


class DirectoryDownTests(ClusterHarness):
    """
    The directory cannot be reached (Redis is down): each node answers from
    what it knows, and writes its share again once it can.
    """

    def down(self, node: ChatService) -> None:
        presence = node.presence

        def failing(*args: Any) -> Any:
            return defer.fail(BusUnavailable("not connected"))

        for name in FAILING:
            setattr(presence, name, failing)

    def up(self, node: ChatService) -> None:
        for name in FAILING:
            delattr(node.presence, name)

    def test_eachNodeAnswersFromWhatItKnowsThenResyncs(self) -> None:
        a, b = self.node("a"), self.node("b")
        alice, bob = self.member(a, "alice"), self.member(b, "bob")
        self.joined(bob)
        self.down(a)
        a.startCluster()
        joined = alice.ask(type="join", room="lobby")
        self.assertEqual(joined["members"], ["alice"])
        self.assertEqual(alice.ask(type="who", room="lobby")["members"], ["alice"])
        self.assertEqual(
            alice.ask(type="rooms")["rooms"], [{"room": "lobby", "members": 1}]
        )
        alice2 = self.member(a, "alice")
        self.assertEqual(
            alice2.ask(type="msg", to="alice", text="to myself")["type"], "sent"
        )
        self.assertEqual(len(alice.received("private")), 1)
        reply = alice.ask(type="msg", to="bob", text="?")
        self.assertEqual(reply["code"], "internal_error")
        self.assertIn(events.PRESENCE_FAILED, self.recorder.names())
        # Messages do not depend on the directory.
        self.say(bob, "still flowing")
        self.assertEqual(alice.seqs(), [1])
        self.up(a)
        self.clock.advance(HEARTBEAT)
        self.settle()
        self.assertEqual(bob.ask(type="who", room="lobby")["members"], ["alice", "bob"])
        self.assertEqual(bob.ask(type="msg", to="alice", text="hi")["type"], "sent")


class FrozenDirectoryTests(ClusterHarness):
    """
    The directory accepts calls and answers none (a frozen Redis server).
    """

    def test_msgAnswersWithinTheDeadlineThenAtOnce(self) -> None:
        a, b = self.node("a"), self.node("b")
        alice, bob = self.member(a, "alice"), self.member(b, "bob")
        alice2 = self.member(a, "alice")
        calls: list[defer.Deferred[Any]] = []

        def frozen(*args: Any) -> defer.Deferred[Any]:
            calls.append(defer.Deferred())
            return calls[-1]

        for name in FAILING:
            self.patch(a.presence, name, frozen)
        alice.send(type="msg", to="bob", text="?")
        self.clock.advance(DIRECTORY_DEADLINE - 0.01)
        self.assertEqual(alice.received("error"), [])
        self.clock.advance(0.01)
        [error] = alice.received("error")
        self.assertEqual(error["code"], "internal_error", "bob is on another node")
        # Late now: the next requests do not wait.
        self.assertEqual(alice2.ask(type="msg", to="alice", text="me")["type"], "sent")
        self.assertEqual(len(alice.received("private")), 1)
        self.assertEqual(alice.ask(type="who", room="lobby")["members"], [])
        # The directory answers again: requests wait for it again.
        calls[0].callback((0.0, ["b"]))
        alice.send(type="msg", to="bob", text="back")
        self.assertEqual(alice.received("sent"), [])
        calls[-1].callback((0.0, ["b"]))
        self.settle()
        self.assertEqual(len(alice.received("sent")), 1)
        self.assertEqual([m["text"] for m in bob.received("private")], ["back"])


class DirectoryReadTests(ClusterHarness):
    """
    who and rooms cannot make one client's connections multiply the reads
    of the directory: a node reads one key once per DIRECTORY_CACHE
    seconds however many ask, and concurrent asks share one read.
    """

    def test_concurrentWhoCostOneReadPerPeriod(self) -> None:
        a = self.node("a")
        members = [self.member(a, f"user{i}") for i in range(8)]
        self.joined(members[0])
        realMembers = a.presence._members  # type: ignore[attr-defined]
        held: list[defer.Deferred[Any]] = []
        hold = True
        calls = []

        def counted(room: str, limit: int) -> defer.Deferred[Any]:
            calls.append(room)
            if not hold:
                return realMembers(room, limit)
            answer: defer.Deferred[Any] = defer.Deferred()
            held.append(answer)
            return answer

        self.patch(a.presence, "_members", counted)
        for member in members * 5:
            member.send(type="who", room="lobby")
        self.assertEqual(len(calls), 1, "one read in flight, shared")
        held[0].callback((1, ["user0"]))
        for member in members:
            replies = member.received("members")
            self.assertEqual(len(replies), 5)
            self.assertTrue(all(r["members"] == ["user0"] for r in replies))
        self.clock.advance(DIRECTORY_CACHE * 0.9)
        for member in members:
            self.assertEqual(member.ask(type="who", room="lobby")["members"], ["user0"])
        self.assertEqual(len(calls), 1, "answered from the last read")
        self.clock.advance(DIRECTORY_CACHE * 0.1)
        hold = False
        self.assertEqual(members[1].ask(type="who", room="lobby")["members"], ["user0"])
        self.assertEqual(len(calls), 2, "a period later: read again")
        # A change this node knows of is never hidden by the cache.
        joined = members[1].ask(type="join", room="lobby")
        self.assertEqual(joined["members"], ["user0", "user1"])
        self.assertEqual(len(calls), 3)
        self.settle()
        self.assertEqual(
            members[2].ask(type="who", room="lobby")["members"], ["user0", "user1"]
        )
        self.assertEqual(len(calls), 4)

    def test_anEventHeardFromAnotherNodeForgetsTheRead(self) -> None:
        a, b = self.node("a"), self.node("b")
        alice, bob = self.member(a, "alice"), self.member(b, "bob")
        self.joined(alice)
        self.assertEqual(alice.ask(type="who", room="lobby")["members"], ["alice"])
        self.assertEqual(alice.ask(type="rooms")["rooms"][0]["members"], 1)
        self.joined(bob)
        self.assertEqual(
            alice.ask(type="who", room="lobby")["members"], ["alice", "bob"]
        )
        self.assertEqual(alice.ask(type="rooms")["rooms"][0]["members"], 2)

    def test_whoIsLimitedPerUserAcrossConnections(self) -> None:
        """
        The documented rates of who and rooms are a user's, whatever the
        number of the user's connections to the node.
        """
        a = self.node("a")
        connections = [self.member(a, "alice") for _ in range(6)]
        codes = [
            c.ask(type="who", room=f"room{i}").get("code", "ok")
            for i in range(10)
            for c in connections
        ]
        self.assertEqual(codes.count("ok"), CHAT_LIMITS["who"].burst)
        self.assertEqual(codes.count("rate_limited"), 60 - CHAT_LIMITS["who"].burst)


class LinkTests(ClusterHarness):
    def test_aLoneNodePublishesNothing(self) -> None:
        context = ServerContext(self.clock, self.recorder.logger, ServerStats())
        bus = NodeBus(self.shared)
        lone = ChatService(self.store, InlineHasher(), context, bus=bus, node="x")
        self.assertIsNone(lone.link)
        alice = self.member(lone, "alice")
        self.joined(alice)
        self.say(alice, "hello")
        self.assertEqual(alice.seqs(), [1])
        self.assertEqual(bus.sent, [])
        self.assertEqual(self.clusterCalls(), [])

    def test_aNodeNameIsOneWord(self) -> None:
        context = ServerContext(self.clock, self.recorder.logger, ServerStats())
        for name in ("two words", "line\nbreak", "x" * 129):
            with self.assertRaises(ValueError):
                ChatService(
                    self.store,
                    InlineHasher(),
                    context,
                    bus=NodeBus(self.shared),
                    node=name,
                    presence=self.directory.presence(name),
                )

    def test_aLargeBatchIsSplitInOrder(self) -> None:
        a, b = self.node("a"), self.node("b")
        alice, bob = self.member(a, "alice"), self.member(b, "bob")
        self.joined(alice, bob)
        text = "x" * 4000
        rows = [(seq, "alice", text, "ts") for seq in range(1, 41)]
        a.link.publishMessages("lobby", rows)  # type: ignore[union-attr]
        sent = [p for c, p in a.bus.sent if c == ROOM_CHANNEL + "lobby"]  # type: ignore[union-attr]
        self.assertGreater(len(sent), 2)
        self.assertTrue(all(len(p) <= cluster.MAX_PUBLICATION for p in sent))
        heard: list[int] = []

        def hear(room: str, rows: list[tuple[int, str, str, str]]) -> None:
            heard.extend(r[0] for r in rows)

        b.heardMessages = hear  # type: ignore[method-assign]
        self.settle()
        self.assertEqual(heard, list(range(1, 41)))

    def test_malformedPayloadsAreRefusedAndLogged(self) -> None:
        self.node("a")
        b = self.node("b")
        bob = self.member(b, "bob")
        self.joined(bob)
        link = b.link
        assert link is not None
        for payload in (
            b"no newline",
            b"a\nnot json",
            b"a\n[1]",
            b'a\n{"kind":"messages","room":"lobby","rows":[[1,"x"]]}',
            b'a\n{"kind":"presence","room":"lobby","user":"u","event":"dance"}',
            b'a\n{"kind":"position","room":"lobby","seq":"1"}',
            b'a\n{"kind":"unknown"}',
        ):
            link._received(payload)
        self.assertEqual(link.refused, 7)
        self.assertEqual(len(self.recorder.named(events.BUS_PAYLOAD_REFUSED)), 7)
        self.assertEqual(bob.received("message"), [])
        link._received(b"b\nours: never read")
        self.assertEqual(link.refused, 7)

    def test_aLinkHearsOnlyTheRoomsItWatches(self) -> None:
        heard: list[str] = []

        class Listener:
            def heardMessages(self, room: str, rows: Any) -> None:
                heard.append(room)

        bus = NodeBus(self.shared)
        link = ClusterLink(bus, "n", self.clock, Listener())  # type: ignore[arg-type]
        other = ClusterLink(NodeBus(self.shared), "m", self.clock, Listener())  # type: ignore[arg-type]
        link.watchRoom("one")
        other.publishMessages("one", [row(1)])
        other.publishMessages("two", [row(1)])
        self.settle()
        self.assertEqual(heard, ["one"])
        link.unwatchRoom("one")
        other.publishMessages("one", [row(2)])
        self.settle()
        self.assertEqual(heard, ["one"])
