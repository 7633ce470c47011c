"""
The chat service on StringTransports, over an in-memory store with a Clock
(no real reactor, no thread, no wait): every request of section 3.3 and
its errors, presence, seq and catch-up, slow consumers, flood control, the
group commit.  L{ChatOnSQLiteTests}: seq and history across a restart on
a real SQLite file.
"""

from __future__ import annotations

from twisted.cred.portal import IRealm
from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from zope.interface.verify import verifyObject

from tests.helpers import waitFor
from tests.servicehelpers import Held, ServerHarness, SQLiteHarness, run
from twisted_lab.services.chat import ChatRealm


class ChatRequestTests(ServerHarness):
    def test_interfaces(self) -> None:
        factory = self.makeChat()
        self.assertTrue(verifyObject(IRealm, ChatRealm(factory.service)))
        alice = self.user(factory, "alice")
        self.assertTrue(verifyObject(IPushProducer, alice[0].output))

    def test_notAuthenticated(self) -> None:
        factory = self.makeChat()
        c = self.connect(factory)
        got = self.ask(
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

    def test_threeUsersInARoom(self) -> None:
        factory = self.makeChat()
        alice = self.user(factory, "alice")
        bob = self.user(factory, "bob")
        carol = self.user(factory, "carol")
        joined = self.one(alice, {"type": "join", "room": "lobby"})
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
        self.one(bob, {"type": "join", "room": "lobby"})
        self.one(carol, {"type": "join", "room": "lobby"})
        presence = self.received(alice, "presence")
        self.assertEqual(
            [(p["user"], p["event"]) for p in presence],
            [("bob", "join"), ("carol", "join")],
        )
        # say: no reply, the sender gets the broadcast like everyone, once
        # the turn's group commit is done.
        self.send(bob, {"type": "say", "room": "lobby", "text": "hello", "id": 5})
        self.assertEqual(self.received(bob, "message"), [], "not before the commit")
        self.flush()
        for c in (alice, bob, carol):
            [message] = self.received(c, "message")
            self.assertEqual(
                (message["from"], message["text"], message["seq"], message["room"]),
                ("bob", "hello", 1, "lobby"),
            )
            self.assertNotIn("id", message)
            self.assertTrue(message["ts"].endswith("Z"))
        self.assertEqual(
            self.one(carol, {"type": "who", "room": "lobby"}),
            {"type": "members", "room": "lobby", "members": ["alice", "bob", "carol"]},
        )
        self.assertEqual(
            self.one(carol, {"type": "rooms"}),
            {"type": "rooms", "rooms": [{"room": "lobby", "members": 3}]},
        )
        self.assertEqual(
            self.one(carol, {"type": "leave", "room": "lobby"}),
            {"type": "left", "room": "lobby"},
        )
        self.expect(alice, lambda m: m.get("event") == "leave", "carol's leave")

    def test_identicalBytesToEveryMember(self) -> None:
        factory = self.makeChat()
        members = [self.user(factory, f"user{i}") for i in range(3)]
        for m in members:
            self.one(m, {"type": "join", "room": "r"})
        marks = [len(m[1].value()) for m in members]
        self.send(members[0], {"type": "say", "room": "r", "text": "same"})
        self.flush()
        for m in members:
            self.expect(m, lambda x: x.get("text") == "same", "the message")
        tails = [m[1].value()[mark:] for m, mark in zip(members, marks, strict=True)]
        # Presence frames may precede; the message frame is the last one.
        self.assertEqual(len({t[-80:] for t in tails}), 1)

    def test_presenceOnDisconnectAndUserCountedOnce(self) -> None:
        factory = self.makeChat()
        alice = self.user(factory, "alice")
        bob = self.user(factory, "bob")
        bob2 = self.login(factory, "bob")
        self.one(alice, {"type": "join", "room": "lobby"})
        self.one(bob, {"type": "join", "room": "lobby"})
        joined = self.one(bob2, {"type": "join", "room": "lobby"})
        self.assertEqual(joined["members"], ["alice", "bob"])
        presence = self.received(alice, "presence")
        self.assertEqual(len(presence), 1, "a second connection of bob is not news")
        self.disconnect(factory, bob[0])
        self.assertEqual(len(self.received(alice, "presence")), 1)
        self.disconnect(factory, bob2[0])
        events = [(m["user"], m["event"]) for m in self.received(alice, "presence")]
        self.assertEqual(events, [("bob", "join"), ("bob", "leave")])

    def test_privateMessages(self) -> None:
        factory = self.makeChat()
        alice = self.user(factory, "alice")
        bob = self.user(factory, "bob")
        got = self.ask(
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
        [private] = self.received(bob, "private")
        self.assertEqual((private["from"], private["text"]), ("alice", "psst"))

    def test_errors(self) -> None:
        factory = self.makeChat()
        alice = self.user(factory, "alice")
        got = self.ask(
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

    def test_emptyRoomsAreForgottenAndSeqContinues(self) -> None:
        factory = self.makeChat()
        alice = self.user(factory, "alice")
        for i in range(3):  # within the membership burst
            self.one(alice, {"type": "join", "room": f"room{i}"})
            self.one(alice, {"type": "leave", "room": f"room{i}"})
        self.assertEqual(factory.service.rooms, {})
        self.one(alice, {"type": "join", "room": "lobby"})
        self.send(alice, {"type": "say", "room": "lobby", "text": "one"})
        self.flush()
        self.expect(alice, lambda m: m.get("text") == "one", "message one")
        self.one(alice, {"type": "leave", "room": "lobby"})
        self.assertEqual(factory.service.rooms, {})
        joined = self.one(alice, {"type": "join", "room": "lobby"})
        self.assertEqual(joined["last_seq"], 1)
        self.send(alice, {"type": "say", "room": "lobby", "text": "two"})
        self.flush()
        [two] = [m for m in self.received(alice) if m.get("text") == "two"]
        self.assertEqual(two["seq"], 2)

    def test_floodControl(self) -> None:
        factory = self.makeChat(messageRate=1.0, messageBurst=3)
        alice = self.user(factory, "alice")
        self.one(alice, {"type": "join", "room": "lobby"})
        for i in range(4):
            self.send(alice, {"type": "say", "room": "lobby", "text": f"{i}"})
        self.flush()
        self.assertEqual(len(self.received(alice, "message")), 3)
        [error] = self.received(alice, "error")
        self.assertEqual((error["code"], error["retry_after"]), ("rate_limited", 1))

    def test_slowConsumerIsCutOffOthersCarryOn(self) -> None:
        factory = self.makeChat(
            maxSendQueue=2000, messageRate=1000.0, messageBurst=1000
        )
        alice = self.user(factory, "alice")
        slow = self.user(factory, "slow")
        fast = self.user(factory, "fast")
        for c in (alice, slow, fast):
            self.one(c, {"type": "join", "room": "lobby"})
        transport = slow[1]

        def writeWhileFull(data, write=transport.write):
            # What a real transport does on every write while its buffer
            # is over its size (the peer does not read): pause, again.
            write(data)
            transport.producer.pauseProducing()

        transport.write = writeWhileFull
        slow[0].output.pauseProducing()
        for _ in range(30):
            self.send(alice, {"type": "say", "room": "lobby", "text": "x" * 100})
        self.flush()
        self.assertEqual(len(self.received(fast, "message")), 30)
        self.assertTrue(slow[1].disconnected, "aborted")
        self.assertLess(len(self.received(slow, "message")), 30)
        self.assertIn(b"slow_consumer", slow[1].value())

    def test_groupCommit(self) -> None:
        """
        Messages from many connections in one reactor turn are committed
        together and broadcast in seq order.
        """
        factory = self.makeChat()
        users = [self.user(factory, f"usr{i}") for i in range(5)]
        for u in users:
            self.one(u, {"type": "join", "room": "lobby"})
        stored = []
        original = factory.store.storeMessages

        def counting(rows):
            stored.append(len(rows))
            return original(rows)

        factory.store.storeMessages = counting
        for i, u in enumerate(users):
            self.send(u, {"type": "say", "room": "lobby", "text": f"from {i}"})
        self.assertEqual(stored, [], "nothing is stored before the turn ends")
        self.flush()
        self.assertEqual(stored, [5])
        seqs = [m["seq"] for m in self.received(users[0], "message")]
        self.assertEqual(seqs, [1, 2, 3, 4, 5])

    def test_failedCommitLeavesNoGap(self) -> None:
        factory = self.makeChat()
        alice = self.user(factory, "alice")
        self.one(alice, {"type": "join", "room": "lobby"})
        original = factory.store.storeMessages
        factory.store.storeMessages = lambda rows: defer.fail(OSError("disk full"))
        self.send(alice, {"type": "say", "room": "lobby", "text": "lost"})
        self.flush()
        self.expect(
            alice, lambda m: m.get("code") == "internal_error", "internal_error"
        )
        self.flushLoggedErrors(OSError)
        factory.store.storeMessages = original
        self.send(alice, {"type": "say", "room": "lobby", "text": "kept"})
        self.flush()
        [kept] = [m for m in self.received(alice) if m.get("text") == "kept"]
        self.assertEqual(kept["seq"], 1)

    def test_aResumeThatEndsAfterTheCloseLeavesNoMind(self) -> None:
        """
        A connection that closes while its resume is being checked is not
        left behind as a mind of the user (to be sent messages).
        """
        factory = self.makeChat()
        alice = self.user(factory, "alice")
        self.one(alice, {"type": "join", "room": "lobby"})
        lookups = Held(factory.store, "useSession")
        late = self.connect(factory, "127.0.0.6")
        self.send(late, {"type": "resume", "token": self.tokens["alice"]})
        self.assertEqual(len(lookups.calls), 1, "the token is being checked")
        late[0].connectionLost()
        lookups.release()
        self.assertEqual(factory.service.users["alice"].minds, {alice[0].handler})
        self.assertEqual(self.received(late), [])


class ChatOnSQLiteTests(SQLiteHarness):
    """
    Seq and history across a restart on the same database file: what a
    second server process reads from SQLite (in its thread), with the real
    threaded hasher, the group commit run by the real reactor.  (The same
    on one in-memory store is in tests/test_services.py.)
    """

    @run
    async def test_seqAndHistorySurviveARestartAndCatchUp(self):
        factory = await self.makeChat()
        alice, session = await self.registerAndLogin(factory)
        await self.one(alice, {"type": "join", "room": "lobby"})
        for i in range(5):
            self.send(alice, {"type": "say", "room": "lobby", "text": f"m{i}"})
        await waitFor(lambda: len(self.received(alice, "message")) == 5)
        self.disconnect(factory, alice[0])
        factory.store.close()
        again = await self.makeChat()
        alice2 = self.connect(again, "127.0.0.3")
        resumed = await self.one(alice2, {"type": "resume", "token": session["token"]})
        self.assertEqual(resumed["type"], "session", resumed)
        joined = await self.one(alice2, {"type": "join", "room": "lobby"})
        self.assertEqual(joined["last_seq"], 5)
        self.assertEqual([m["seq"] for m in joined["history"]], [1, 2, 3, 4, 5])
        self.send(alice2, {"type": "say", "room": "lobby", "text": "after"})
        await waitFor(
            lambda: any(m.get("text") == "after" for m in self.received(alice2))
        )
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
