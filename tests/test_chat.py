"""
The chat service on StringTransports over a real SQLite store: every
request of section 3.3 and its errors, presence, seq across a restart,
catch-up, slow consumers, flood control.
"""

from __future__ import annotations

from twisted.cred.portal import IRealm
from twisted.internet import defer, reactor
from twisted.internet.interfaces import IPushProducer
from zope.interface.verify import verifyObject

from tests.helpers import waitFor
from tests.test_auth import AuthHarness, cheapHasher, run
from tests.test_messages import replies
from twisted_lab.services.chat import ChatRealm
from twisted_lab.storage.sqlite import Store
from twisted_lab.taps.chat import ChatFactory


class ChatHarness(AuthHarness):
    async def makeChat(self, **kwargs):
        store = Store(self.dbPath)
        self.addCleanup(store.close)
        await store.open()
        hasher = cheapHasher()
        self.addCleanup(hasher.stop)
        kwargs.setdefault("idleTimeout", None)
        factory = ChatFactory(
            store, hasher, clock=kwargs.pop("clock", reactor), **kwargs
        )
        self.factory = factory
        return factory

    async def user(self, factory, name: str, host: str = "127.0.0.2"):
        connection = self.connect(factory, host)
        got = await self.ask(
            connection,
            {"type": "register", "username": name, "password": "password1"},
            {"type": "login", "username": name, "password": "password1"},
        )
        assert got[1]["type"] == "session", got
        self.tokens = getattr(self, "tokens", {})
        self.tokens[name] = got[1]["token"]
        return connection

    async def login(self, factory, name: str, host: str = "127.0.0.3"):
        connection = self.connect(factory, host)
        reply = await self.one(
            connection, {"type": "resume", "token": self.tokens[name]}
        )
        assert reply["type"] == "session", reply
        return connection

    def received(self, connection) -> list[dict]:
        return replies(connection[1])

    async def waitForMessage(self, connection, predicate, what="a message"):
        await waitFor(
            lambda: any(predicate(m) for m in self.received(connection)), what=what
        )


class ChatRequestTests(ChatHarness):
    @run
    async def test_interfaces(self):
        factory = await self.makeChat()
        self.assertTrue(verifyObject(IRealm, ChatRealm(factory.service)))
        alice = await self.user(factory, "alice")
        self.assertTrue(verifyObject(IPushProducer, alice[0].output))

    @run
    async def test_notAuthenticated(self):
        factory = await self.makeChat()
        c = self.connect(factory)
        got = await self.ask(
            c,
            {"type": "join", "room": "lobby"},
            {"type": "leave", "room": "lobby"},
            {"type": "say", "room": "lobby", "text": "hi"},
            {"type": "msg", "to": "bob", "text": "hi"},
            {"type": "history", "room": "lobby"},
            {"type": "who", "room": "lobby"},
            {"type": "rooms"},
            {"type": "ping"},
        )
        self.assertEqual(
            [m.get("code", m["type"]) for m in got],
            ["not_authenticated"] * 7 + ["pong"],
        )

    @run
    async def test_threeUsersInARoom(self):
        factory = await self.makeChat()
        alice = await self.user(factory, "alice")
        bob = await self.user(factory, "bob")
        carol = await self.user(factory, "carol")
        joined = await self.one(alice, {"type": "join", "room": "lobby"})
        self.assertEqual(
            joined,
            {
                "type": "joined",
                "room": "lobby",
                "members": ["alice"],
                "history": [],
                "last_seq": 0,
            },
        )
        await self.one(bob, {"type": "join", "room": "lobby"})
        await self.one(carol, {"type": "join", "room": "lobby"})
        await self.waitForMessage(alice, lambda m: m.get("user") == "carol")
        presence = [m for m in self.received(alice) if m["type"] == "presence"]
        self.assertEqual(
            [(p["user"], p["event"]) for p in presence],
            [("bob", "join"), ("carol", "join")],
        )
        # say: no reply, the sender gets the broadcast like everyone.
        bob[0].dataReceived(
            frames_({"type": "say", "room": "lobby", "text": "hello", "id": 5})
        )
        for c in (alice, bob, carol):
            await self.waitForMessage(c, lambda m: m.get("type") == "message")
        for c in (alice, bob, carol):
            [message] = [m for m in self.received(c) if m["type"] == "message"]
            self.assertEqual(
                (message["from"], message["text"], message["seq"], message["room"]),
                ("bob", "hello", 1, "lobby"),
            )
            self.assertNotIn("id", message)
            self.assertTrue(message["ts"].endswith("Z"))
        self.assertEqual(
            await self.one(carol, {"type": "who", "room": "lobby"}),
            {"type": "members", "room": "lobby", "members": ["alice", "bob", "carol"]},
        )
        self.assertEqual(
            await self.one(carol, {"type": "rooms"}),
            {"type": "rooms", "rooms": [{"room": "lobby", "members": 3}]},
        )
        self.assertEqual(
            await self.one(carol, {"type": "leave", "room": "lobby"}),
            {"type": "left", "room": "lobby"},
        )
        await self.waitForMessage(alice, lambda m: m.get("event") == "leave")

    @run
    async def test_identicalBytesToEveryMember(self):
        factory = await self.makeChat()
        members = [await self.user(factory, f"user{i}") for i in range(3)]
        for m in members:
            await self.one(m, {"type": "join", "room": "r"})
        marks = [len(m[1].value()) for m in members]
        members[0][0].dataReceived(
            frames_({"type": "say", "room": "r", "text": "same"})
        )
        for m in members:
            await self.waitForMessage(m, lambda x: x.get("text") == "same")
        tails = [m[1].value()[mark:] for m, mark in zip(members, marks, strict=True)]
        # Presence frames may precede; the message frame is the last one.
        self.assertEqual(len({t[-80:] for t in tails}), 1)

    @run
    async def test_presenceOnDisconnectAndUserCountedOnce(self):
        factory = await self.makeChat()
        alice = await self.user(factory, "alice")
        bob = await self.user(factory, "bob")
        bob2 = await self.login(factory, "bob")
        await self.one(alice, {"type": "join", "room": "lobby"})
        await self.one(bob, {"type": "join", "room": "lobby"})
        joined = await self.one(bob2, {"type": "join", "room": "lobby"})
        self.assertEqual(joined["members"], ["alice", "bob"])
        presence = [m for m in self.received(alice) if m["type"] == "presence"]
        self.assertEqual(len(presence), 1, "a second connection of bob is not news")
        self.disconnect(factory, bob[0])
        self.assertEqual(
            len([m for m in self.received(alice) if m["type"] == "presence"]), 1
        )
        self.disconnect(factory, bob2[0])
        events = [
            (m["user"], m["event"])
            for m in self.received(alice)
            if m["type"] == "presence"
        ]
        self.assertEqual(events, [("bob", "join"), ("bob", "leave")])

    @run
    async def test_privateMessages(self):
        factory = await self.makeChat()
        alice = await self.user(factory, "alice")
        bob = await self.user(factory, "bob")
        got = await self.ask(
            alice,
            {"type": "msg", "to": "BOB", "text": "psst"},
            {"type": "msg", "to": "nobody", "text": "hello?"},
            {"type": "msg", "to": "!!", "text": "hello?"},
            {"type": "msg", "to": "bob", "text": ""},
        )
        self.assertEqual(got[0], {"type": "sent", "to": "bob"})
        self.assertEqual(
            [m["code"] for m in got[1:]],
            ["no_such_user", "no_such_user", "bad_request"],
        )
        [private] = [m for m in self.received(bob) if m["type"] == "private"]
        self.assertEqual((private["from"], private["text"]), ("alice", "psst"))

    @run
    async def test_errors(self):
        factory = await self.makeChat()
        alice = await self.user(factory, "alice")
        got = await self.ask(
            alice,
            {"type": "join", "room": "Lobby"},
            {"type": "join", "room": "x" * 33},
            {"type": "say", "room": "lobby", "text": "not joined"},
            {"type": "join", "room": "lobby"},
            {"type": "say", "room": "lobby", "text": "x" * 4001},
            {"type": "say", "room": "lobby", "text": ""},
            {"type": "history", "room": "lobby", "limit": 0},
            {"type": "history", "room": "lobby", "after": -1},
        )
        self.assertEqual(
            [m.get("code", m["type"]) for m in got],
            [
                "invalid_room",
                "invalid_room",
                "not_in_room",
                "joined",
                "bad_request",
                "bad_request",
                "bad_request",
                "bad_request",
            ],
        )

    @run
    async def test_seqAndHistorySurviveARestartAndCatchUp(self):
        factory = await self.makeChat()
        alice = await self.user(factory, "alice")
        await self.one(alice, {"type": "join", "room": "lobby"})
        for i in range(5):
            alice[0].dataReceived(
                frames_({"type": "say", "room": "lobby", "text": f"m{i}"})
            )
        await waitFor(
            lambda: (
                len([m for m in self.received(alice) if m["type"] == "message"]) == 5
            )
        )
        self.disconnect(factory, alice[0])
        factory.store.close()
        again = await self.makeChat()
        alice2 = await self.login(again, "alice")
        joined = await self.one(alice2, {"type": "join", "room": "lobby"})
        self.assertEqual(joined["last_seq"], 5)
        self.assertEqual([m["seq"] for m in joined["history"]], [1, 2, 3, 4, 5])
        alice2[0].dataReceived(
            frames_({"type": "say", "room": "lobby", "text": "after"})
        )
        await self.waitForMessage(alice2, lambda m: m.get("text") == "after")
        [after] = [m for m in self.received(alice2) if m.get("text") == "after"]
        self.assertEqual(after["seq"], 6)
        caughtUp = await self.one(
            alice2, {"type": "history", "room": "lobby", "after": 3}
        )
        self.assertEqual([m["seq"] for m in caughtUp["messages"]], [4, 5, 6])
        limited = await self.one(
            alice2, {"type": "history", "room": "lobby", "after": 0, "limit": 2}
        )
        self.assertEqual([m["seq"] for m in limited["messages"]], [1, 2])

    @run
    async def test_emptyRoomsAreForgottenAndSeqContinues(self):
        factory = await self.makeChat()
        alice = await self.user(factory, "alice")
        for i in range(3):  # within the membership burst
            await self.one(alice, {"type": "join", "room": f"room{i}"})
            await self.one(alice, {"type": "leave", "room": f"room{i}"})
        self.assertEqual(factory.service.rooms, {})
        await self.one(alice, {"type": "join", "room": "lobby"})
        alice[0].dataReceived(frames_({"type": "say", "room": "lobby", "text": "one"}))
        await self.waitForMessage(alice, lambda m: m.get("text") == "one")
        await self.one(alice, {"type": "leave", "room": "lobby"})
        self.assertEqual(factory.service.rooms, {})
        joined = await self.one(alice, {"type": "join", "room": "lobby"})
        self.assertEqual(joined["last_seq"], 1)
        alice[0].dataReceived(frames_({"type": "say", "room": "lobby", "text": "two"}))
        await self.waitForMessage(alice, lambda m: m.get("text") == "two")
        [two] = [m for m in self.received(alice) if m.get("text") == "two"]
        self.assertEqual(two["seq"], 2)

    @run
    async def test_floodControl(self):
        factory = await self.makeChat(messageRate=1.0, messageBurst=3)
        alice = await self.user(factory, "alice")
        await self.one(alice, {"type": "join", "room": "lobby"})
        for i in range(4):
            alice[0].dataReceived(
                frames_({"type": "say", "room": "lobby", "text": f"{i}"})
            )
        await waitFor(lambda: any(m["type"] == "error" for m in self.received(alice)))
        await waitFor(
            lambda: (
                len([m for m in self.received(alice) if m["type"] == "message"]) == 3
            )
        )
        [error] = [m for m in self.received(alice) if m["type"] == "error"]
        self.assertEqual((error["code"], error["retry_after"]), ("rate_limited", 1))

    @run
    async def test_slowConsumerIsCutOffOthersCarryOn(self):
        factory = await self.makeChat(
            maxSendQueue=2000, messageRate=1000.0, messageBurst=1000
        )
        alice = await self.user(factory, "alice")
        slow = await self.user(factory, "slow")
        fast = await self.user(factory, "fast")
        for c in (alice, slow, fast):
            await self.one(c, {"type": "join", "room": "lobby"})
        transport = slow[1]

        def writeWhileFull(data, write=transport.write):
            # What a real transport does on every write while its buffer
            # is over its size (the peer does not read): pause, again.
            write(data)
            transport.producer.pauseProducing()

        transport.write = writeWhileFull
        slow[0].output.pauseProducing()
        for _ in range(30):
            alice[0].dataReceived(
                frames_({"type": "say", "room": "lobby", "text": "x" * 100})
            )
        await waitFor(
            lambda: (
                len([m for m in self.received(fast) if m["type"] == "message"]) == 30
            )
        )
        self.assertTrue(slow[1].disconnected, "aborted")
        self.assertLess(
            len([m for m in self.received(slow) if m["type"] == "message"]), 30
        )
        self.assertIn(b"slow_consumer", slow[1].value())

    @run
    async def test_groupCommit(self):
        """
        Messages from many connections in one reactor turn are committed
        together and broadcast in seq order.
        """
        factory = await self.makeChat()
        users = [await self.user(factory, f"usr{i}") for i in range(5)]
        for u in users:
            await self.one(u, {"type": "join", "room": "lobby"})
        stored = []
        original = factory.store.storeMessages

        def counting(rows):
            stored.append(len(rows))
            return original(rows)

        factory.store.storeMessages = counting
        for i, u in enumerate(users):
            u[0].dataReceived(
                frames_({"type": "say", "room": "lobby", "text": f"from {i}"})
            )
        await waitFor(
            lambda: (
                len([m for m in self.received(users[0]) if m["type"] == "message"]) == 5
            )
        )
        self.assertEqual(stored, [5])
        seqs = [m["seq"] for m in self.received(users[0]) if m["type"] == "message"]
        self.assertEqual(seqs, [1, 2, 3, 4, 5])

    @run
    async def test_failedCommitLeavesNoGap(self):
        factory = await self.makeChat()
        alice = await self.user(factory, "alice")
        await self.one(alice, {"type": "join", "room": "lobby"})
        original = factory.store.storeMessages
        factory.store.storeMessages = lambda rows: defer.fail(OSError("disk full"))
        alice[0].dataReceived(frames_({"type": "say", "room": "lobby", "text": "lost"}))
        await waitFor(
            lambda: any(m.get("code") == "internal_error" for m in self.received(alice))
        )
        self.flushLoggedErrors(OSError)
        factory.store.storeMessages = original
        alice[0].dataReceived(frames_({"type": "say", "room": "lobby", "text": "kept"}))
        await self.waitForMessage(alice, lambda m: m.get("text") == "kept")
        [kept] = [m for m in self.received(alice) if m.get("text") == "kept"]
        self.assertEqual(kept["seq"], 1)


def frames_(*messages: dict) -> bytes:
    import json

    from tests.helpers import frames

    return frames(*[json.dumps(m).encode() for m in messages])
