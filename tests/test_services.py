"""
The service logic on its own: identity, auth and chat driven through the
request dispatcher with an in-memory store, a L{Clock} and recording
channels.  No socket, no frame, no database file, no real reactor, no
sleep: every Deferred here has fired by the time the call returns (or when
the clock is advanced), which is what the split between the services and
their transports and stores buys.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tests.servicehelpers import ChannelClient as Client
from tests.servicehelpers import InlineHasher
from twisted_lab.observe.metrics import ServerStats
from twisted_lab.ports import IChatClient, IRequestChannel
from twisted_lab.services.auth import AuthService
from twisted_lab.services.chat import ChatService
from twisted_lab.services.context import ServerContext
from twisted_lab.services.identity import IdentityService
from twisted_lab.services.sessionwatch import POLL_SECONDS
from twisted_lab.storage.memory import MemoryStore

PASSWORD = "correct horse"


class ServiceHarness(SynchronousTestCase):
    def context(self) -> ServerContext:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        return ServerContext(self.clock, Logger(observer=lambda e: None), ServerStats())

    def openStore(self) -> MemoryStore:
        store = MemoryStore()
        self.successResultOf(defer.ensureDeferred(store.open()))
        return store

    def chat(self, store: MemoryStore | None = None, **settings: Any) -> ChatService:
        return ChatService(
            store or self.openStore(), InlineHasher(), self.context(), **settings
        )

    def member(self, service: Any, name: str, address: str = "127.0.0.9") -> Client:
        client = Client(service, address)
        client.ask(type="register", username=name, password=PASSWORD)
        reply = client.ask(type="login", username=name, password=PASSWORD)
        assert reply["type"] == "session", reply
        return client

    def flush(self) -> None:
        """
        Run the chat service's group commit (scheduled for the next turn).
        """
        self.clock.advance(0)


class AuthLogicTests(ServiceHarness):
    def service(self) -> AuthService:
        return AuthService(self.openStore(), InlineHasher(), self.context())

    def test_registerLoginWhoamiLogout(self) -> None:
        service = self.service()
        client = self.member(service, "Alice")
        self.assertEqual(
            client.ask(type="whoami"), {"type": "identity", "username": "alice"}
        )
        self.assertEqual(client.ask(type="logout"), {"type": "logged_out"})
        self.assertEqual(client.ask(type="whoami")["code"], "not_authenticated")

    def test_wrongPasswordsAreThrottledBeforeTheyAreChecked(self) -> None:
        service = self.service()
        self.member(service, "bob")
        attacker = Client(service, "127.0.0.66")
        codes = [
            attacker.ask(type="login", username="bob", password=f"guess{i}")["code"]
            for i in range(8)
        ]
        self.assertEqual(codes[:5], ["bad_credentials"] * 5)
        self.assertIn("rate_limited", codes[5:])
        # The right password is refused too while the account is throttled.
        reply = attacker.ask(type="login", username="bob", password=PASSWORD)
        self.assertEqual(reply["code"], "rate_limited")

    def test_logoutEndsTheSessionOnEveryConnection(self) -> None:
        service = self.service()
        first = self.member(service, "carol")
        token = first.received("session")[-1]["token"]
        second = Client(service)
        self.assertEqual(second.ask(type="resume", token=token)["type"], "session")
        first.ask(type="logout")
        [ended] = second.received("error")
        self.assertEqual(ended["code"], "session_revoked")
        self.assertIsNone(second.handler.account)

    def test_aSessionPastItsMaximumIsToldWithinAPoll(self) -> None:
        """
        A held session is kept alive by its connection, up to its maximum
        age: then the connection is told, on the next poll.
        """
        service = AuthService(
            self.openStore(), InlineHasher(), self.context(), sessionMax=60.0
        )
        client = self.member(service, "dave")
        for _ in range(int(59 / POLL_SECONDS)):
            self.clock.advance(POLL_SECONDS)
        self.assertEqual(client.received("error"), [])
        for _ in range(int(1.5 / POLL_SECONDS)):
            self.clock.advance(POLL_SECONDS)
        [ended] = client.received("error")
        self.assertEqual(ended["code"], "session_expired")


class ChatLogicTests(ServiceHarness):
    def test_aChatClientIsToldThings(self) -> None:
        service = self.chat()
        alice = self.member(service, "alice")
        self.assertTrue(verifyObject(IChatClient, alice.handler))
        self.assertTrue(verifyObject(IRequestChannel, alice.channel))

    def test_messagesReachEveryMemberInSeqOrderEncodedOnce(self) -> None:
        service = self.chat()
        alice, bob = self.member(service, "alice"), self.member(service, "bob")
        joined = alice.ask(type="join", room="lobby")
        self.assertEqual(joined["last_seq"], 0)
        bob.ask(type="join", room="lobby")
        [presence] = alice.received("presence")
        self.assertEqual((presence["user"], presence["event"]), ("bob", "join"))
        for text in ("one", "two", "three"):
            alice.dispatcher.requestReceived(
                json.dumps({"type": "say", "room": "lobby", "text": text}).encode()
            )
        bob.dispatcher.requestReceived(b'{"type":"say","room":"lobby","text":"four"}')
        for _ in range(3):  # alice's next say waits for her last to commit
            self.flush()
        seen = [
            [(m["seq"], m["text"]) for m in client.received("message")]
            for client in (alice, bob)
        ]
        # Both members see one order, gap-free, and each sender's own
        # messages in the order sent.
        self.assertEqual(seen[0], seen[1])
        self.assertEqual([seq for seq, _ in seen[0]], [1, 2, 3, 4])
        texts = [text for _, text in seen[0]]
        self.assertEqual([t for t in texts if t != "four"], ["one", "two", "three"])
        # A batch is one Outgoing for all its recipients: encoded once.
        shared = [o for o in alice.channel.outgoing if o in bob.channel.outgoing]
        self.assertTrue(shared)
        self.assertTrue(all(m["type"] == "message" for o in shared for m in o.messages))

    def test_seqContinuesAcrossARestartAndHistoryCatchesUp(self) -> None:
        store = self.openStore()
        first = self.chat(store)
        alice = self.member(first, "alice")
        alice.ask(type="join", room="dev")
        for text in ("a", "b"):
            alice.dispatcher.requestReceived(
                json.dumps({"type": "say", "room": "dev", "text": text}).encode()
            )
            self.flush()
        alice.close()
        second = self.chat(store)
        bob = self.member(second, "bob")
        self.assertEqual(bob.ask(type="join", room="dev")["last_seq"], 2)
        bob.dispatcher.requestReceived(b'{"type":"say","room":"dev","text":"c"}')
        self.flush()
        history = bob.ask(type="history", room="dev", after=1)
        self.assertEqual([m["seq"] for m in history["messages"]], [2, 3])

    def test_aFailedCommitBroadcastsNothing(self) -> None:
        store = self.openStore()
        service = self.chat(store)
        alice = self.member(service, "alice")
        alice.ask(type="join", room="ops")
        store.storeMessages = lambda rows: defer.fail(OSError("disk full"))  # type: ignore[method-assign]
        alice.dispatcher.requestReceived(b'{"type":"say","room":"ops","text":"x"}')
        self.flush()
        self.assertEqual(alice.received("message"), [])
        self.assertEqual(alice.received("error")[-1]["code"], "internal_error")

    def test_privateMessagesAndPresence(self) -> None:
        service = self.chat()
        alice, bob = self.member(service, "alice"), self.member(service, "bob")
        self.assertEqual(
            alice.ask(type="msg", to="Bob", text="psst"), {"type": "sent", "to": "bob"}
        )
        [private] = bob.received("private")
        self.assertEqual((private["from"], private["text"]), ("alice", "psst"))
        self.assertEqual(
            alice.ask(type="msg", to="nobody", text="?")["code"], "no_such_user"
        )
        alice.ask(type="join", room="lobby")
        bob.ask(type="join", room="lobby")
        self.assertEqual(
            alice.ask(type="who", room="lobby")["members"], ["alice", "bob"]
        )
        bob.close()
        self.assertEqual(alice.received("presence")[-1]["event"], "leave")
        self.assertEqual(alice.ask(type="who", room="lobby")["members"], ["alice"])
        rooms = alice.ask(type="rooms")["rooms"]
        self.assertEqual(rooms, [{"room": "lobby", "members": 1}])

    def test_messagesAreRateLimitedPerUser(self) -> None:
        service = self.chat(messageRate=1.0, messageBurst=2)
        alice = self.member(service, "alice")
        alice.ask(type="join", room="lobby")
        codes = []
        for i in range(3):
            alice.dispatcher.requestReceived(
                json.dumps({"type": "say", "room": "lobby", "text": str(i)}).encode()
            )
            self.flush()
        codes = [m.get("code") for m in alice.received("error")]
        self.assertEqual(codes, ["rate_limited"])
        self.assertEqual(len(alice.received("message")), 2)


class IdentityLogicTests(ServiceHarness):
    def test_askedOnceThenWelcomedByName(self) -> None:
        store = self.openStore()
        service = IdentityService(store, self.context())
        first = Client(service, "127.0.0.7")
        self.assertEqual(first.channel.messages, [{"type": "ask_name"}])
        reply = first.ask(type="name", name="  Zoë ")
        self.assertEqual(reply, {"type": "welcome", "name": "Zoë", "visits": 1})
        again = Client(service, "127.0.0.7")
        self.assertEqual(
            again.channel.messages, [{"type": "welcome", "name": "Zoë", "visits": 2}]
        )
        self.assertEqual(again.ask(type="forget"), {"type": "forgotten"})
        self.assertEqual(
            Client(service, "127.0.0.7").channel.messages, [{"type": "ask_name"}]
        )
