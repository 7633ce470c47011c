"""
The identity service: name rules, address keys, and the protocol on a
StringTransport with a chosen peer address, over an in-memory store with a
Clock (no real reactor, no thread, no wait).
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import frames, openConnection
from tests.servicehelpers import Held, ServerHarness
from tests.test_messages import replies
from twisted_lab.codecs.message import RequestError
from twisted_lab.services.identity import validName
from twisted_lab.transports.connection import canonicalAddress


class NameRuleTests(SynchronousTestCase):
    def test_trimmedAndNFC(self) -> None:
        self.assertEqual(validName("  Zoe\u0308  "), "Zo\u00eb")
        self.assertEqual(validName("A" * 64), "A" * 64)
        self.assertEqual(validName(" " + "B" * 64 + " "), "B" * 64)

    def assertInvalid(self, name: str, text: str) -> None:
        with self.assertRaises(RequestError) as raised:
            validName(name)
        self.assertEqual(raised.exception.code, "invalid_name")
        self.assertIn(text, raised.exception.message)

    def test_invalidNames(self) -> None:
        self.assertInvalid("", "empty")
        self.assertInvalid(" \t\n ", "empty")
        self.assertInvalid("A" * 65, "at most 64")
        self.assertInvalid("x" * 1_000_000, "at most 64")
        for hostile in (
            "a\x00b",
            "bell\x07",
            "new\nline",
            "\u202eevil",
            "zero\u200bwidth",
            "line\u2028sep",
            "\ue000private",
        ):
            self.assertInvalid(hostile, "control or invisible")

    def test_canonicalAddress(self) -> None:
        self.assertEqual(canonicalAddress("127.0.0.2"), "127.0.0.2")
        self.assertEqual(canonicalAddress("::ffff:127.0.0.2"), "127.0.0.2")
        self.assertEqual(canonicalAddress("::1"), "::1")
        self.assertEqual(canonicalAddress("2001:DB8::1"), "2001:db8::1")


class IdentityProtocolTests(ServerHarness):
    def connectFrom(self, factory, address):
        return openConnection(self, factory, address)

    def talk(self, protocol, transport, *requests: bytes, expect: int):
        protocol.dataReceived(frames(*requests))
        got = replies(transport)
        self.assertGreaterEqual(len(got), expect, got)
        return got

    def test_askThenWelcome(self) -> None:
        factory = self.makeIdentity()
        peer = IPv4Address("TCP", "127.0.0.2", 5000)
        protocol, transport = self.connectFrom(factory, peer)
        got = self.talk(
            protocol,
            transport,
            b'{"type":"name","name":" Alice ","id":1}',
            expect=2,
        )
        self.assertEqual(got[0], {"type": "ask_name"})
        self.assertEqual(
            got[1], {"type": "welcome", "name": "Alice", "visits": 1, "id": 1}
        )
        # A second connection from the same address is welcomed by name.
        again, transport2 = self.connectFrom(factory, peer)
        self.assertEqual(
            replies(transport2), [{"type": "welcome", "name": "Alice", "visits": 2}]
        )
        names = self.recorder.names()
        for event in ("identity_asked", "identity_stored", "identity_known"):
            self.assertIn(event, names)

    def test_ipv4MappedAddressIsTheSameClient(self) -> None:
        factory = self.makeIdentity()
        self.successResultOf(factory.store.nameAddress("127.0.0.2", "Mapped", "now"))
        peer = IPv6Address("TCP", "::ffff:127.0.0.2", 5000)
        protocol, transport = self.connectFrom(factory, peer)
        self.assertEqual(replies(transport)[0]["name"], "Mapped")

    def test_requestsBeforeTheGreetingWaitForIt(self) -> None:
        """
        A client that sends at once still gets the greeting first: its
        requests wait while the greeting's store lookup is in flight.
        """
        factory = self.makeIdentity()
        lookups = Held(factory.store, "visit")
        peer = IPv4Address("TCP", "127.0.0.3", 5000)
        protocol, transport = self.connectFrom(factory, peer)
        self.assertEqual(len(lookups.calls), 1)
        protocol.dataReceived(frames(b'{"type":"ping"}', b'{"type":"forget"}'))
        self.assertEqual(replies(transport), [], "nothing before the greeting")
        lookups.release()
        got = replies(transport)
        self.assertEqual([m["type"] for m in got], ["ask_name", "pong", "forgotten"])

    def test_renameForgetAndInvalid(self) -> None:
        factory = self.makeIdentity()
        peer = IPv4Address("TCP", "127.0.0.4", 5000)
        protocol, transport = self.connectFrom(factory, peer)
        got = self.talk(
            protocol,
            transport,
            b'{"type":"name","name":"Bob"}',
            b'{"type":"name","name":"bad\\u0007name"}',
            b'{"type":"name","name":"Robert"}',
            b'{"type":"forget"}',
            b'{"type":"name","name":""}',
            b'{"type":"name"}',
            expect=7,
        )
        self.assertEqual(got[1]["name"], "Bob")
        self.assertEqual(got[2]["code"], "invalid_name")
        self.assertEqual((got[3]["name"], got[3]["visits"]), ("Robert", 1))
        self.assertEqual(got[4], {"type": "forgotten"})
        self.assertEqual(got[5]["code"], "invalid_name")
        self.assertEqual(got[6]["code"], "bad_request")
        self.assertIsNone(self.successResultOf(factory.store.visit("127.0.0.4", "now")))

    def test_noPersonalDataButNamesInEvents(self) -> None:
        factory = self.makeIdentity()
        peer = IPv4Address("TCP", "127.0.0.5", 5000)
        protocol, transport = self.connectFrom(factory, peer)
        self.talk(
            protocol,
            transport,
            b'{"type":"name","name":"Eve","secret":"s3cr3t"}',
            expect=2,
        )
        self.assertNotIn("s3cr3t", repr(self.recorder.events))
