"""
End to end: two real C{twistd -n netlab-chat} nodes on one real PostgreSQL
database and one real Redis-protocol server (valkey), with test clients on
plain sockets (L{FramedSocket}) connected to either node:

  - members on both nodes see one order, gap-free; presence, C{who},
    C{rooms} and a private message cross nodes;
  - a node killed (SIGKILL) in the middle of a burst: its members are shown
    as gone on the other node within C{--presence-ttl} +
    C{--presence-heartbeat}, and its client resumes its session on the
    other node and asks C{history} after the last C{seq} it had: no gap;
  - the Redis server restarted (keeping nothing) in the middle of a burst:
    no loss, no duplicate, order kept, presence written again;
  - the PostgreSQL server stopped and started: C{internal_error} while it
    is down, service after, nothing acknowledged lost;
  - two nodes started at once on an empty database.

Skipped when a server cannot be started here, except under CI (C{$CI}
set), where they fail (L{tests.pgserver}, L{tests.redisserver}).  The
clients read on threads of their own; the test waits for what they
received by polling the reactor, bounded by L{DEADLINE}.
"""

from __future__ import annotations

import itertools
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, threads
from twisted.trial.unittest import TestCase

from tests.e2e import DEADLINE, Server, pause
from tests.pgserver import freshDatabase, sharedServer
from tests.redisserver import RedisServer, requireServer
from twisted_lab.client.wire import ConnectionClosed, FramedSocket

FAST_HASH = ("--hash-memory-kib", "1024", "--hash-time-cost", "1")
PASSWORD = "password1"
#: The nodes' heartbeat and TTL here (shorter than the defaults, 2 and 6 s,
#: to keep the tests short; the same code paths).
HEARTBEAT = 0.5
TTL = 2.0
#: What the cluster's timing may add to the documented bound on a loaded
#: test machine (a heartbeat answered late, the leave's delivery).
SLACK = 1.5


class Peer:
    """
    A chat connection of the test to one node: requests are sent from the
    test; every message received is appended to C{messages} by a thread
    of its own.
    """

    _ids = itertools.count(1)

    def __init__(self, port: int, name: str = "") -> None:
        self.port = port
        self.name = name
        self.sock = FramedSocket.connect_to("127.0.0.1", port)
        self.sock.settimeout(None)
        self.messages: list[dict[str, Any]] = []
        self.closed = False
        self._sending = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            while True:
                self.messages.append(self.sock.recv_json())
        except (ConnectionClosed, OSError, ValueError):
            self.closed = True

    def send(self, **message: Any) -> None:
        with self._sending:
            self.sock.send_json(message)

    async def say(self, room: str, text: str) -> dict[str, Any]:
        """
        Say C{text}: the broadcast of it that acknowledges it (a C{say} has
        no reply of its own), or the error it got.
        """
        ident = next(self._ids)
        self.send(id=ident, type="say", room=room, text=text)
        found: list[dict[str, Any]] = []

        def answered() -> bool:
            found[:] = [
                m
                for m in self.messages
                if m.get("id") == ident
                or (m.get("type") == "message" and m.get("text") == text)
            ]
            return bool(found)

        await self.until(answered, f"an answer to saying {text!r}")
        return found[0]

    async def ask(self, **message: Any) -> dict[str, Any]:
        """
        Send a request; its reply.
        """
        ident = next(self._ids)
        self.send(id=ident, **message)
        found: list[dict[str, Any]] = []

        def replied() -> bool:
            found[:] = [m for m in self.messages if m.get("id") == ident]
            return bool(found)

        await self.until(replied, f"a reply to {message}")
        return found[0]

    async def until(self, predicate: Callable[[], bool], what: str) -> float:
        """
        Wait until C{predicate()}; the seconds it took.
        """
        started = time.monotonic()
        while not predicate():
            if time.monotonic() - started > DEADLINE:
                raise AssertionError(f"{self.name}: no {what} in {DEADLINE} s")
            await pause(0.02)
        return time.monotonic() - started

    async def reaches(self, room: str, seq: int) -> None:
        """
        Wait until the last message of C{room} received has C{seq} or more.
        """
        await self.until(lambda: self.seqs(room)[-1:] >= [seq], f"seq {seq} in {room}")

    async def hears(self, text: str) -> None:
        """
        Wait until a message saying C{text} has been received.
        """
        await self.until(
            lambda: text in [m["text"] for m in self.received("message")],
            f"the message {text!r}",
        )

    def received(self, kind: str, room: str | None = None) -> list[dict[str, Any]]:
        return [
            m
            for m in list(self.messages)
            if m.get("type") == kind and (room is None or m.get("room") == room)
        ]

    def seqs(self, room: str) -> list[int]:
        return [m["seq"] for m in self.received("message", room)]

    def presence(self, room: str) -> list[tuple[str, str]]:
        return [(m["user"], m["event"]) for m in self.received("presence", room)]

    def burst(self, room: str, count: int, prefix: str) -> int:
        """
        Say C{count} messages as fast as the node takes them (run on a
        thread); how many were sent before the connection was lost.
        """
        sent = 0
        try:
            for i in range(count):
                self.send(type="say", room=room, text=f"{prefix}{i}")
                sent += 1
        except OSError:
            pass
        return sent

    def close(self) -> None:
        try:
            self.sock.close()
        finally:
            self._reader.join(5)


def contiguous(seqs: list[int]) -> bool:
    return seqs == list(range(1, len(seqs) + 1))


class ClusterEndToEndTests(TestCase):
    timeout = 240

    def setUp(self) -> defer.Deferred[None]:  # type: ignore[override]
        self.workdir = Path(self.mktemp()).absolute()
        self.workdir.mkdir(parents=True)
        self.postgres = sharedServer(self)
        self.database = freshDatabase(self, self.postgres)
        self.redis = RedisServer(requireServer(), reactor)
        self.addCleanup(self.redis.cleanup)
        self.peers: list[Peer] = []
        self.addCleanup(self.closePeers)
        self.tokens: dict[str, str] = {}
        return self.redis.start()

    def closePeers(self) -> None:
        for peer in self.peers:
            peer.close()

    def node(self, name: str, directory: str = "") -> Server:
        server = Server(
            self.workdir / (directory or name),
            "netlab-chat",
            "--db",
            self.database,
            "--bus",
            self.redis.url,
            "--node",
            name,
            "--port",
            "0",
            "--message-rate",
            "100000",
            "--message-burst",
            "100000",
            "--presence-heartbeat",
            str(HEARTBEAT),
            "--presence-ttl",
            str(TTL),
            *FAST_HASH,
        )
        self.addCleanup(server.cleanup)
        return server

    async def nodes(self, *names: str) -> list[Server]:
        servers = [self.node(name) for name in names]
        await defer.gatherResults(
            [defer.ensureDeferred(s.start()) for s in servers], consumeErrors=True
        )
        # Listening comes first; the bus connects after (a node serves
        # without it, but registrations need the shared limits in Redis).
        for server in servers:
            started = time.monotonic()
            while server.eventNames().count("bus_connected") < 2:
                self.assertLess(time.monotonic() - started, DEADLINE, server.log())
                await pause(0.05)
        return servers

    async def peer(self, server: Server, user: str, *rooms: str) -> Peer:
        """
        A connection of C{user} (registered on first use) to C{server},
        in C{rooms}.
        """
        peer = Peer(server.port, f"{user}@{server.workdir.name}")
        self.peers.append(peer)
        if user not in self.tokens:
            reply = await peer.ask(type="register", username=user, password=PASSWORD)
            assert reply["type"] == "registered", reply
        reply = await peer.ask(type="login", username=user, password=PASSWORD)
        assert reply["type"] == "session", reply
        self.tokens[user] = reply["token"]
        for room in rooms:
            joined = await peer.ask(type="join", room=room)
            assert joined["type"] == "joined", joined
        return peer

    async def lastSeq(self, server: Server, room: str) -> int:
        """
        The room's last seq as the store has it (asked of C{server}).
        """
        probe = await self.peer(server, "probe")
        reply = await probe.ask(type="history", room=room, limit=1)
        probe.close()
        messages = reply["messages"]
        return int(messages[-1]["seq"]) if messages else 0

    async def history(self, peer: Peer, room: str, after: int) -> list[dict]:
        """
        Every message of C{room} after C{after}, page by page.
        """
        got: list[dict] = []
        while True:
            reply = await peer.ask(type="history", room=room, after=after, limit=500)
            assert reply["type"] == "history", reply
            got += reply["messages"]
            if not reply["messages"]:
                return got
            after = reply["messages"][-1]["seq"]

    # -- the tests ---------------------------------------------------------------

    @defer.inlineCallbacks
    def test_membersOnBothNodesSeeOneOrder(self) -> Any:
        yield defer.ensureDeferred(self.membersOnBothNodes())

    async def membersOnBothNodes(self) -> None:
        a, b = await self.nodes("a", "b")
        alice = await self.peer(a, "alice", "lobby")
        bob = await self.peer(b, "bob", "lobby")
        carol = await self.peer(a, "carol", "lobby")
        dave = await self.peer(b, "dave", "lobby")
        await alice.until(
            lambda: ("dave", "join") in alice.presence("lobby"), "dave's join"
        )
        self.assertEqual(
            [u for u, _ in alice.presence("lobby")], ["bob", "carol", "dave"]
        )
        who = await carol.ask(type="who", room="lobby")
        self.assertEqual(who["members"], ["alice", "bob", "carol", "dave"])
        rooms = await dave.ask(type="rooms")
        self.assertEqual(rooms["rooms"], [{"room": "lobby", "members": 4}])

        sent = await defer.gatherResults(
            [
                threads.deferToThread(alice.burst, "lobby", 150, "a"),
                threads.deferToThread(bob.burst, "lobby", 150, "b"),
            ]
        )
        self.assertEqual(sent, [150, 150])
        for peer in (alice, bob, carol, dave):
            await peer.reaches("lobby", 300)
        orders = [
            [(m["seq"], m["text"]) for m in p.received("message", "lobby")]
            for p in (alice, bob, carol, dave)
        ]
        self.assertTrue(contiguous([seq for seq, _ in orders[0]]), orders[0][:20])
        for order in orders[1:]:
            self.assertEqual(order, orders[0])
        texts = [text for _, text in orders[0]]
        self.assertEqual(
            [t for t in texts if t[0] == "a"], [f"a{i}" for i in range(150)]
        )

        reply = await alice.ask(type="msg", to="dave", text="across")
        self.assertEqual(reply, {"type": "sent", "to": "dave", "id": reply["id"]})
        await dave.until(lambda: bool(dave.received("private")), "the private message")
        [private] = dave.received("private")
        self.assertEqual((private["from"], private["text"]), ("alice", "across"))

        await bob.ask(type="leave", room="lobby")
        await alice.until(
            lambda: ("bob", "leave") in alice.presence("lobby"), "bob's leave"
        )

    @defer.inlineCallbacks
    def test_aNodeKilledMidBurst(self) -> Any:
        yield defer.ensureDeferred(self.nodeKilledMidBurst())

    async def nodeKilledMidBurst(self) -> None:
        a, b = await self.nodes("a", "b")
        watchA = await self.peer(a, "watcha", "burst")
        await self.peer(a, "victim", "burst")
        senderA = await self.peer(a, "sendera", "burst")
        watchB = await self.peer(b, "watchb", "burst")
        senderB = await self.peer(b, "senderb", "burst")
        await watchA.until(
            lambda: ("senderb", "join") in watchA.presence("burst"), "joins"
        )
        bursts = [
            threads.deferToThread(senderA.burst, "burst", 3000, "a"),
            threads.deferToThread(senderB.burst, "burst", 1500, "b"),
        ]
        await watchA.until(lambda: len(watchA.seqs("burst")) >= 200, "200 messages")
        assert a.process is not None
        a.process.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        self.assertEqual(await defer.ensureDeferred(a.wait()), -signal.SIGKILL)
        await defer.gatherResults(bursts)

        # Its members are shown gone on the other node in time.
        await watchB.until(
            lambda: ("victim", "leave") in watchB.presence("burst"), "victim's leave"
        )
        gone = time.monotonic() - killed
        self.assertLess(gone, TTL + HEARTBEAT + SLACK)
        who = await watchB.ask(type="who", room="burst")
        self.assertEqual(who["members"], ["senderb", "watchb"])

        # Every seq: the survivor's sender's last message acknowledged.
        await senderB.hears("b1499")
        final = await self.lastSeq(b, "burst")
        self.assertGreater(final, 1500)

        # The killed node's client resumes on the other node, and catches up
        # with history after the last seq it had.
        await watchA.until(lambda: watchA.closed, "the lost connection")
        seen = watchA.seqs("burst")
        self.assertTrue(contiguous(seen), "in order, no gap before the kill")
        moved = Peer(b.port, "watcha@b")
        self.peers.append(moved)
        resumed = await moved.ask(type="resume", token=self.tokens["watcha"])
        self.assertEqual(resumed["type"], "session")
        joined = await moved.ask(type="join", room="burst")
        self.assertEqual(joined["last_seq"], final)
        caught = [m["seq"] for m in await self.history(moved, "burst", seen[-1])]
        self.assertEqual(seen + caught, list(range(1, final + 1)))
        senderB.send(type="say", room="burst", text="and on")
        await moved.reaches("burst", final + 1)
        self.assertEqual(moved.seqs("burst"), [final + 1], "live again, no gap")

        # The survivor's members saw everything once, in order (what the
        # dead node committed and never published included).
        await watchB.reaches("burst", final + 1)
        self.assertEqual(watchB.seqs("burst"), list(range(1, final + 2)))
        names = b.eventNames()
        self.assertIn("node_reaped", names)
        self.assertIn("cluster_catch_up", names)

    @defer.inlineCallbacks
    def test_redisRestartedMidBurst(self) -> Any:
        yield defer.ensureDeferred(self.redisRestartedMidBurst())

    async def redisRestartedMidBurst(self) -> None:
        a, b = await self.nodes("a", "b")
        watchA = await self.peer(a, "watcha", "burst")
        watchB = await self.peer(b, "watchb", "burst")
        senderA = await self.peer(a, "sendera", "burst")
        senderB = await self.peer(b, "senderb", "burst")
        await watchA.until(
            lambda: ("senderb", "join") in watchA.presence("burst"), "joins"
        )
        bursts = [
            threads.deferToThread(senderA.burst, "burst", 2000, "a"),
            threads.deferToThread(senderB.burst, "burst", 2000, "b"),
        ]
        await watchB.until(lambda: len(watchB.seqs("burst")) >= 200, "200 messages")
        await self.redis.stop()
        midway = len(watchA.seqs("burst")), len(watchB.seqs("burst"))
        # Committed and acknowledged on a while the bus is down: their
        # publications are lost, not merely delayed (the bus keeps
        # nothing), and b can only read them from the store.
        down = [f"down{i}" for i in range(20)]
        for text in down:
            answer = await watchA.say("burst", text)
            self.assertEqual(answer["type"], "message", answer)
        await self.redis.start()  # keeping nothing
        self.assertEqual(await defer.gatherResults(bursts), [2000, 2000])
        self.assertLess(max(midway), 4000, "the bus went down mid-burst")
        await senderA.hears("a1999")  # acknowledged
        await senderB.hears("b1999")
        # (Asked of a connection already logged in: a new account would
        # need the shared limits, in Redis, which may not be back yet.)
        last = await watchA.ask(type="history", room="burst", limit=1)
        final = int(last["messages"][-1]["seq"])
        self.assertEqual(final, 4000 + len(down))
        for watcher in (watchA, watchB):
            await watcher.reaches("burst", final)
            self.assertEqual(watcher.seqs("burst"), list(range(1, final + 1)))
        # Lost on the bus (a's publications failed), recovered on b from
        # the store: each once, in the order they were said.
        self.assertIn("bus_publish_failed", a.eventNames())
        texts = [m["text"] for m in watchB.received("message", "burst")]
        self.assertEqual([t for t in texts if t.startswith("down")], down)

        # The bus carries again, and presence was written again.
        senderA.send(type="say", room="burst", text="after the restart")
        await watchB.until(
            lambda: watchB.seqs("burst")[-1:] == [final + 1], "a live message"
        )
        await watchA.until(lambda: watchA.seqs("burst")[-1:] == [final + 1], "it")
        who: dict[str, Any] = {}

        async def everyone() -> bool:
            who.update(await watchA.ask(type="who", room="burst"))
            return len(who["members"]) == 4

        waited = 0.0
        while not await everyone():
            self.assertLess(waited, DEADLINE, who)
            await pause(0.1)
            waited += 0.1

    @defer.inlineCallbacks
    def test_aFrozenRedisHoldsNoRequest(self) -> Any:
        yield defer.ensureDeferred(self.frozenRedis())

    async def frozenRedis(self) -> None:
        """
        valkey frozen (SIGSTOP: connections accepted, nothing answered):
        join, who, rooms and msg answer within the directory's deadline
        (1 s) from the node's own members, and messages keep flowing on
        each node; thawed, the cluster is whole again.
        """
        a, b = await self.nodes("a", "b")
        alice = await self.peer(a, "alice", "lobby")
        bob = await self.peer(b, "bob", "lobby")
        await alice.until(lambda: ("bob", "join") in alice.presence("lobby"), "join")
        self.redis.freeze()
        try:
            for request in (
                {"type": "join", "room": "frozen"},
                {"type": "who", "room": "lobby"},
                {"type": "rooms"},
                {"type": "msg", "to": "bob", "text": "?"},
                {"type": "who", "room": "frozen"},
            ):
                started = time.monotonic()
                reply = await alice.ask(**request)
                self.assertLess(time.monotonic() - started, 1.0 + SLACK, reply)
                if request["type"] == "msg":
                    self.assertEqual(reply["code"], "internal_error")
                else:
                    self.assertNotIn("code", reply)
            self.assertEqual(reply["members"], ["alice"], "from node a")
            said = await alice.say("lobby", "while frozen")
            self.assertEqual(said["type"], "message")
        finally:
            self.redis.thaw()
        await bob.hears("while frozen")
        who: dict[str, Any] = {}

        async def whole() -> bool:
            who.update(await bob.ask(type="who", room="frozen"))
            return who.get("members") == ["alice"]

        waited = 0.0
        while not await whole():
            self.assertLess(waited, DEADLINE, who)
            await pause(0.2)
            waited += 0.2

    @defer.inlineCallbacks
    def test_aSecondNodeWithTheSameNameStops(self) -> Any:
        yield defer.ensureDeferred(self.sameName())

    async def sameName(self) -> None:
        [a] = await self.nodes("a")
        alice = await self.peer(a, "alice", "lobby")
        twin = self.node("a", directory="twin")
        await twin.start()
        started = time.monotonic()
        self.assertEqual(await twin.wait(), 0, twin.log())
        self.assertLess(time.monotonic() - started, TTL + 2 * HEARTBEAT + SLACK + 2)
        self.assertIn("node_name_taken", twin.eventNames())
        who = await alice.ask(type="who", room="lobby")
        self.assertEqual(who["members"], ["alice"], "the first node's share")

    @defer.inlineCallbacks
    def test_postgresRestarted(self) -> Any:
        yield defer.ensureDeferred(self.postgresRestarted())

    async def postgresRestarted(self) -> None:
        a, b = await self.nodes("a", "b")
        alice = await self.peer(a, "alice", "lobby")
        bob = await self.peer(b, "bob", "lobby")
        for i in range(5):
            alice.send(type="say", room="lobby", text=f"before {i}")
        await bob.until(lambda: len(bob.seqs("lobby")) == 5, "5 messages")

        # On this thread: the server gets a parent-death signal when the
        # thread that started it ends (setpriv --pdeathsig), and a pool
        # thread may end.  Blocking the reactor for the start is harmless:
        # the nodes are processes of their own.
        self.postgres.stop()
        try:
            refused = await alice.say("lobby", "while down")
            self.assertEqual(refused.get("code"), "internal_error")
            refused = await bob.ask(type="history", room="lobby", after=0)
            self.assertEqual(refused["code"], "internal_error")
        finally:
            self.postgres.start()

        acknowledged = [f"before {i}" for i in range(5)]
        for i in range(5):
            text = f"after {i}"
            for _attempt in range(20):
                answer = await alice.say("lobby", text)
                if answer["type"] == "message":
                    break
                self.assertEqual(answer["code"], "internal_error")
                await pause(0.25)  # the pool reconnecting
            self.assertEqual(answer["type"], "message", "service resumed")
            acknowledged.append(text)
        stored = await self.history(bob, "lobby", 0)
        texts = [m["text"] for m in stored]
        self.assertEqual([m["seq"] for m in stored], list(range(1, len(stored) + 1)))
        for text in acknowledged:
            self.assertIn(text, texts)
        await bob.until(lambda: len(bob.seqs("lobby")) == len(stored), "everything")
        self.assertEqual(bob.seqs("lobby"), list(range(1, len(stored) + 1)))

    @defer.inlineCallbacks
    def test_twoNodesStartAtOnceOnAnEmptyDatabase(self) -> Any:
        yield defer.ensureDeferred(self.startAtOnce())

    async def startAtOnce(self) -> None:
        a, b, c = await self.nodes("a", "b", "c")
        alice = await self.peer(a, "alice", "lobby")
        bob = await self.peer(b, "bob", "lobby")
        carol = await self.peer(c, "carol", "lobby")
        alice.send(type="say", room="lobby", text="hello")
        for peer in (alice, bob, carol):
            await peer.reaches("lobby", 1)
            self.assertEqual(peer.seqs("lobby"), [1])
        who = await carol.ask(type="who", room="lobby")
        self.assertEqual(who["members"], ["alice", "bob", "carol"])
        for server in (a, b, c):
            self.assertNotIn("Traceback", server.log())
