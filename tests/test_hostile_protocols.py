"""
Property tests on the real JSON service protocols (identity, auth, chat):
whatever bytes arrive, nothing raises out of the protocol and the
connection still answers a ping afterwards (unless it was told why it is
being closed).
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from tests.helpers import frames, openConnection
from tests.test_auth import cheapHasher
from tests.test_messages import replies
from twisted_lab.dispatch import MAX_CONSECUTIVE_ERRORS
from twisted_lab.storage.sqlite import Store
from twisted_lab.taps.auth import AuthFactory
from twisted_lab.taps.chat import ChatFactory
from twisted_lab.taps.identity import IdentityFactory

PING = b'{"type":"ping","id":"last"}'
HOSTILE = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


class HostileBytesOnRealProtocols(TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        store = Store(self.mktemp())
        self.addCleanup(store.close)
        yield defer.ensureDeferred(store.open())
        hasher = cheapHasher()
        self.addCleanup(hasher.stop)
        settings_ = {"clock": Clock(), "idleTimeout": None, "frameTimeout": None}
        self.factories = {
            "auth": AuthFactory(store, hasher, **settings_),
            "chat": ChatFactory(store, hasher, **settings_),
            # Identity greets after a store lookup: its greeting is async,
            # so it is fed only after the greeting (see below).
            "identity": IdentityFactory(store, **settings_),
        }

    def feed(self, name: str, data: bytes):
        factory = self.factories[name]
        protocol, transport = openConnection(
            self, factory, IPv4Address("TCP", "127.0.0.2", 1234)
        )
        protocol.dataReceived(data)
        return protocol, transport

    @HOSTILE
    @given(st.lists(st.binary(max_size=300), max_size=MAX_CONSECUTIVE_ERRORS - 2))
    def test_framesNeverBreakAuthOrChat(self, payloads):
        for name in ("auth", "chat"):
            protocol, transport = self.feed(name, frames(*payloads, PING))
            got = replies(transport)
            self.assertEqual(got[-1], {"type": "pong", "id": "last"}, name)
            self.assertEqual(len(got), len(payloads) + 1)

    @HOSTILE
    @given(st.binary(max_size=3000))
    def test_rawStreamNeverRaises(self, data):
        for name in ("auth", "chat"):
            protocol, transport = self.feed(name, data)
            for message in replies(transport):
                self.assertIn(message["type"], ("error", "pong"))

    @defer.inlineCallbacks
    def test_identityAfterItsGreeting(self):
        from tests.helpers import waitFor

        protocol, transport = self.feed("identity", b"")
        yield defer.ensureDeferred(waitFor(lambda: replies(transport)))
        protocol.dataReceived(frames(b"\xff", b"[]", b"{}", b'{"type":7}', PING))
        yield defer.ensureDeferred(waitFor(lambda: len(replies(transport)) == 6))
        got = replies(transport)
        self.assertEqual([m.get("code") for m in got[1:5]], ["bad_request"] * 4)
        self.assertEqual(got[-1], {"type": "pong", "id": "last"})
