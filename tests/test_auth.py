"""
The auth service: username and password rules, throttles, and the protocol
on StringTransports over a real SQLite store with real (cheap) argon2id.
"""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.portal import IRealm
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from tests.helpers import EventRecorder, closeIfOpen, frames, openConnection, waitFor
from tests.test_messages import replies
from twisted_lab.codecs.message import RequestError
from twisted_lab.services.accounts import (
    PasswordHasher,
    canonicalUsername,
    checkPassword,
    tokenDigest,
)
from twisted_lab.services.auth import (
    ACCOUNT_FREE_FAILURES,
    ADDRESS_FREE_FAILURES,
    AccountRealm,
    PasswordChecker,
    PasswordCredentials,
    TokenChecker,
)
from twisted_lab.storage.sqlite import Store
from twisted_lab.taps.auth import AuthFactory
from twisted_lab.transports.connection import addressGroup


def cheapHasher(timeCost: int = 1) -> PasswordHasher:
    """
    Real argon2id with test-sized costs (the defaults take ~30 ms a hash).
    """
    from twisted.internet import reactor

    return PasswordHasher(
        memoryKiB=1024, timeCost=timeCost, parallelism=1, reactor=reactor
    )


class UsernameRuleTests(SynchronousTestCase):
    def test_foldsToOneAccount(self) -> None:
        for raw in ("alice", "Alice", "ALICE", "ａｌｉｃｅ", "ＡＬＩＣＥ"):
            self.assertEqual(canonicalUsername(raw), "alice")
        self.assertEqual(canonicalUsername("Straße"), "strasse")

    def test_invalid(self) -> None:
        for raw in (
            "ab",
            "a" * 33,
            "",
            "al ice",
            "al\x00ice",
            "ali\u202ece",
            "alice!",
            "élodie",
            "x" * 1_000_000,
            "robert'); drop--",
        ):
            with self.assertRaises(RequestError) as raised:
                canonicalUsername(raw)
            self.assertEqual(raised.exception.code, "invalid_username")

    @given(st.text(max_size=40))
    def test_idempotent(self, raw: str) -> None:
        try:
            once = canonicalUsername(raw)
        except RequestError:
            return
        self.assertEqual(canonicalUsername(once), once)

    def test_passwords(self) -> None:
        checkPassword("12345678")
        checkPassword("é" * 512)  # 1024 bytes
        for weak in ("1234567", "", "é" * 513, "x" * 1025):
            with self.assertRaises(RequestError) as raised:
                checkPassword(weak)
            self.assertEqual(raised.exception.code, "weak_password")


class AddressGroupTests(SynchronousTestCase):
    def test_addressGroup(self) -> None:
        self.assertEqual(addressGroup("127.0.0.2"), "127.0.0.2")
        self.assertEqual(addressGroup("::ffff:10.1.2.3"), "10.1.2.3")
        self.assertEqual(addressGroup("2001:db8:1:2:3:4:5:6"), "2001:db8:1:2::/64")
        self.assertEqual(
            addressGroup("2001:db8:1:2::9"), addressGroup("2001:db8:1:2:ffff::1")
        )


class CredTests(TestCase):
    @defer.inlineCallbacks
    def test_interfacesAndCheckers(self):
        store = Store(self.mktemp())
        self.addCleanup(store.close)
        yield defer.ensureDeferred(store.open())
        hasher = cheapHasher()
        self.addCleanup(hasher.stop)
        checker = PasswordChecker(store, hasher)
        self.assertTrue(verifyObject(ICredentialsChecker, checker))
        self.assertTrue(
            verifyObject(ICredentialsChecker, TokenChecker(store, Clock(), 60))
        )
        self.assertTrue(verifyObject(IRealm, AccountRealm()))
        credentials = PasswordCredentials("carol", "password1")
        self.assertTrue(verifyObject(IUsernamePassword, credentials))
        self.assertRaises(NotImplementedError, credentials.checkPassword, "password1")
        yield store.createAccount("carol", (yield hasher.hash("password1")), 0)
        self.assertEqual((yield checker.requestAvatarId(credentials)), "carol")


class AuthHarness(TestCase):
    async def makeFactory(self, path: str | None = None, hasher=None, **kwargs):
        store = Store(path or self.dbPath)
        self.addCleanup(store.close)
        await store.open()
        self.clock = kwargs.pop("clock", None) or Clock()
        self.clock.advance(1_800_000_000)
        kwargs.setdefault("idleTimeout", None)  # tests move the clock by hours
        hasher = hasher or cheapHasher()
        self.addCleanup(hasher.stop)
        factory = AuthFactory(store, hasher, clock=self.clock, **kwargs)
        self.recorder = EventRecorder()
        factory.log = self.recorder.logger
        return factory

    def setUp(self) -> None:
        self.dbPath = str(Path(self.mktemp()).absolute())

    def connect(self, factory, host: str = "127.0.0.2"):
        return openConnection(self, factory, IPv4Address("TCP", host, 40000))

    def disconnect(self, factory, protocol) -> None:
        closeIfOpen(factory, protocol)

    async def ask(self, connection, *requests: dict) -> list[dict]:
        """
        Send requests; wait for as many replies; return the new ones.
        """
        protocol, transport = connection
        before = len(replies(transport))
        protocol.dataReceived(frames(*[json.dumps(r).encode() for r in requests]))
        await waitFor(
            lambda: len(replies(transport)) >= before + len(requests),
            what=f"replies to {[r['type'] for r in requests]}",
        )
        return replies(transport)[before:]

    async def one(self, connection, request: dict) -> dict:
        [reply] = await self.ask(connection, request)
        return reply

    async def registerAndLogin(self, factory, username="alice", password="password1"):
        connection = self.connect(factory)
        reply = await self.one(
            connection, {"type": "register", "username": username, "password": password}
        )
        assert reply["type"] == "registered", reply
        session = await self.one(
            connection, {"type": "login", "username": username, "password": password}
        )
        assert session["type"] == "session", session
        return connection, session


def run(test):
    """
    Run an async test method as a Deferred (trial and pytest both wait).
    """

    def wrapper(self):
        return defer.ensureDeferred(test(self))

    wrapper.__name__ = test.__name__
    wrapper.__doc__ = test.__doc__
    return wrapper


class RegisterLoginTests(AuthHarness):
    @run
    async def test_registerRules(self):
        factory = await self.makeFactory()
        c = self.connect(factory)
        got = await self.ask(
            c,
            {"type": "register", "username": "Alice", "password": "password1"},
            {"type": "register", "username": "ａｌｉｃｅ", "password": "password2"},
            {"type": "register", "username": "a", "password": "password1"},
            {"type": "register", "username": "bob", "password": "short"},
            {"type": "register", "username": "bob", "password": "p" * 1025},
            {"type": "register", "username": "bob"},
            {"type": "register", "username": "x" * 2000, "password": "password1"},
        )
        self.assertEqual(got[0], {"type": "registered", "username": "alice"})
        self.assertEqual(
            [m.get("code") for m in got[1:]],
            [
                "username_taken",
                "invalid_username",
                "weak_password",
                "weak_password",
                "bad_request",
                "bad_request",
            ],
        )
        self.assertEqual(len(self.recorder.named("user_registered")), 1)

    @run
    async def test_unknownUserAndWrongPasswordAreIdentical(self):
        factory = await self.makeFactory()
        await self.registerAndLogin(factory, "alice", "password1")
        protocol, transport = self.connect(factory, "127.0.0.3")
        mark = len(transport.value())
        await self.ask(
            (protocol, transport),
            {"type": "login", "username": "alice", "password": "wrong-password"},
        )
        wrong = transport.value()[mark:]
        mark = len(transport.value())
        await self.ask(
            (protocol, transport),
            {"type": "login", "username": "nobody", "password": "wrong-password"},
        )
        unknown = transport.value()[mark:]
        self.assertEqual(wrong, unknown)
        self.assertIn(b"bad_credentials", wrong)

    @run
    async def test_sessionLifecycle(self):
        factory = await self.makeFactory()
        first, session = await self.registerAndLogin(factory)
        self.assertEqual(session["username"], "alice")
        self.assertGreaterEqual(len(session["token"]), 43)
        self.assertTrue(session["expires_at"].endswith("Z"))
        self.assertEqual(
            await self.one(first, {"type": "whoami"}),
            {"type": "identity", "username": "alice"},
        )
        # Resume on another connection.
        second = self.connect(factory, "127.0.0.9")
        self.assertEqual(
            (await self.one(second, {"type": "whoami"}))["code"], "not_authenticated"
        )
        resumed = await self.one(second, {"type": "resume", "token": session["token"]})
        self.assertEqual((resumed["type"], resumed["username"]), ("session", "alice"))
        # A new login gives a new token.
        third = await self.one(
            second, {"type": "login", "username": "alice", "password": "password1"}
        )
        self.assertNotEqual(third["token"], session["token"])
        # Logout revokes the token everywhere.
        self.assertEqual(
            await self.one(first, {"type": "logout"}), {"type": "logged_out"}
        )
        self.assertEqual(
            (await self.one(first, {"type": "whoami"}))["code"], "not_authenticated"
        )
        fourth = self.connect(factory, "127.0.0.10")
        self.assertEqual(
            (await self.one(fourth, {"type": "resume", "token": session["token"]}))[
                "code"
            ],
            "invalid_token",
        )
        names = self.recorder.names()
        for event in ("login_succeeded", "session_resumed", "logged_out"):
            self.assertIn(event, names)

    @run
    async def test_hostileTokens(self):
        factory = await self.makeFactory()
        c = self.connect(factory)
        got = await self.ask(
            c,
            {"type": "resume", "token": ""},
            {"type": "resume", "token": "ünïcødé-☃"},
            {"type": "resume", "token": "' OR 1=1 --"},
            {"type": "resume", "token": "x" * 4096},
            {"type": "resume", "token": "x" * 5000},
            {"type": "resume", "token": 12345},
        )
        self.assertEqual(
            [m["code"] for m in got],
            ["invalid_token"] * 4 + ["bad_request", "bad_request"],
        )

    @run
    async def test_tokenSurvivesARestart(self):
        factory = await self.makeFactory()
        _, session = await self.registerAndLogin(factory)
        factory.store.close()
        again = await self.makeFactory()
        c = self.connect(again)
        resumed = await self.one(c, {"type": "resume", "token": session["token"]})
        self.assertEqual(resumed["username"], "alice")

    @run
    async def test_idleAndAbsoluteExpiry(self):
        factory = await self.makeFactory(sessionIdle=100, sessionMax=250)
        c, session = await self.registerAndLogin(factory)
        self.clock.advance(99)
        self.assertEqual((await self.one(c, {"type": "whoami"}))["type"], "identity")
        self.clock.advance(99)  # used 99 s ago: still alive
        self.assertEqual((await self.one(c, {"type": "whoami"}))["type"], "identity")
        self.clock.advance(100)  # idle for 100 s: expired
        self.assertEqual(
            (await self.one(c, {"type": "whoami"}))["code"], "not_authenticated"
        )
        other = self.connect(factory, "127.0.0.5")
        self.assertEqual(
            (await self.one(other, {"type": "resume", "token": session["token"]}))[
                "code"
            ],
            "invalid_token",
        )
        # Absolute limit: used every 60 s, still gone after 250 s.
        c2, session2 = await self.registerAndLogin(factory, "bob", "password2")
        for _ in range(4):
            self.clock.advance(60)
            self.assertEqual(
                (await self.one(c2, {"type": "whoami"}))["type"], "identity"
            )
        self.clock.advance(11)
        self.assertEqual(
            (await self.one(c2, {"type": "whoami"}))["code"], "not_authenticated"
        )

    @run
    async def test_changePasswordRevokesOtherSessions(self):
        factory = await self.makeFactory()
        first, session = await self.registerAndLogin(factory)
        second = self.connect(factory, "127.0.0.6")
        await self.one(
            second, {"type": "login", "username": "alice", "password": "password1"}
        )
        got = await self.ask(
            first,
            {"type": "change_password", "old": "not-it-at-all", "new": "password2"},
            {"type": "change_password", "old": "password1", "new": "short"},
            {"type": "change_password", "old": "password1", "new": "password2"},
            {"type": "whoami"},
        )
        self.assertEqual(
            [m.get("code", m["type"]) for m in got],
            ["bad_credentials", "weak_password", "password_changed", "identity"],
        )
        self.assertEqual(
            (await self.one(second, {"type": "whoami"}))["code"], "not_authenticated"
        )
        third = self.connect(factory, "127.0.0.7")
        got = await self.ask(
            third,
            {"type": "login", "username": "alice", "password": "password1"},
            {"type": "login", "username": "alice", "password": "password2"},
        )
        self.assertEqual([m["type"] for m in got], ["error", "session"])

    @run
    async def test_notAuthenticated(self):
        factory = await self.makeFactory()
        c = self.connect(factory)
        got = await self.ask(
            c,
            {"type": "whoami"},
            {"type": "logout"},
            {"type": "change_password", "old": "password1", "new": "password2"},
            {"type": "ping"},
        )
        self.assertEqual(
            [m.get("code", m["type"]) for m in got],
            ["not_authenticated"] * 3 + ["pong"],
        )

    @run
    async def test_rehashOnParameterChange(self):
        old = await self.makeFactory(hasher=cheapHasher(timeCost=1))
        await self.registerAndLogin(old)
        before = await old.store.passwordHash("alice")
        self.assertIn("t=1", before)
        old.store.close()
        new = await self.makeFactory(hasher=cheapHasher(timeCost=2))
        c = self.connect(new)
        reply = await self.one(
            c, {"type": "login", "username": "alice", "password": "password1"}
        )
        self.assertEqual(reply["type"], "session")
        after = await new.store.passwordHash("alice")
        self.assertIn("t=2", after)
        self.assertNotEqual(before, after)

    @run
    async def test_noSecretsInTheDatabaseFileOrEvents(self):
        factory = await self.makeFactory()
        _, session = await self.registerAndLogin(
            factory, "alice", "correct-horse-battery"
        )
        await factory.store.integrityCheck()
        data = b""
        for suffix in ("", "-wal"):
            path = Path(self.dbPath + suffix)
            if path.exists():
                data += path.read_bytes()
        self.assertIn(b"alice", data, "the check reads the real file")
        self.assertNotIn(b"correct-horse-battery", data)
        self.assertNotIn(session["token"].encode(), data)
        self.assertIn(tokenDigest(session["token"]), data)
        events = repr(self.recorder.events)
        self.assertNotIn("correct-horse-battery", events)
        self.assertNotIn(session["token"], events)

    @run
    async def test_parallelRegistrationsOfOneName(self):
        factory = await self.makeFactory()
        connections = [self.connect(factory, f"127.0.1.{i}") for i in range(8)]
        results = await defer.gatherResults(
            [
                defer.ensureDeferred(
                    self.one(
                        c,
                        {
                            "type": "register",
                            "username": "Same",
                            "password": "password1",
                        },
                    )
                )
                for c in connections
            ]
        )
        kinds = sorted(r.get("code", r["type"]) for r in results)
        self.assertEqual(kinds, ["registered"] + ["username_taken"] * 7)


class ThrottlingTests(AuthHarness):
    @run
    async def test_accountBackoffAndRelease(self):
        factory = await self.makeFactory()
        await self.registerAndLogin(factory)
        attacker = self.connect(factory, "127.0.0.66")
        wrong = {"type": "login", "username": "alice", "password": "wrong-password"}
        got = await self.ask(attacker, *[wrong] * (ACCOUNT_FREE_FAILURES + 1))
        self.assertEqual(
            [m["code"] for m in got], ["bad_credentials"] * (ACCOUNT_FREE_FAILURES + 1)
        )
        limited = await self.one(attacker, wrong)
        self.assertEqual(limited["code"], "rate_limited")
        self.assertEqual(limited["retry_after"], 1)
        # The real user is throttled too (per account), but only briefly.
        user = self.connect(factory, "127.0.0.8")
        right = {"type": "login", "username": "alice", "password": "password1"}
        self.assertEqual((await self.one(user, right))["code"], "rate_limited")
        self.clock.advance(1)
        self.assertEqual((await self.one(user, right))["type"], "session")
        self.assertEqual((await self.one(attacker, wrong))["code"], "bad_credentials")
        self.assertIn("rate_limited", self.recorder.names())
        self.assertIn("login_failed", self.recorder.names())

    @run
    async def test_addressBackoffAcrossAccounts(self):
        factory = await self.makeFactory()
        requests = [
            {"type": "login", "username": f"user{i}", "password": "wrong-password"}
            for i in range(ADDRESS_FREE_FAILURES + 1)
        ]
        # Over several connections (one connection's login rate is lower).
        got = []
        for start in range(0, len(requests), 7):
            connection = self.connect(factory, "127.0.0.77")
            got += await self.ask(connection, *requests[start : start + 7])
        self.assertEqual({m["code"] for m in got}, {"bad_credentials"})
        attacker = self.connect(factory, "127.0.0.77")
        limited = await self.one(
            attacker, {"type": "login", "username": "fresh", "password": "whatever1"}
        )
        self.assertEqual(limited["code"], "rate_limited")
        other = self.connect(factory, "127.0.0.78")
        reply = await self.one(
            other, {"type": "login", "username": "fresh", "password": "whatever1"}
        )
        self.assertEqual(reply["code"], "bad_credentials", "other addresses unaffected")

    @run
    async def test_registrationsPerAddress(self):
        factory = await self.makeFactory(registrationsPerHour=3)
        c = self.connect(factory, "127.0.0.88")
        got = await self.ask(
            c,
            *[
                {"type": "register", "username": f"user{i}", "password": "password1"}
                for i in range(4)
            ],
        )
        self.assertEqual([m["type"] for m in got[:3]], ["registered"] * 3)
        self.assertEqual(
            (got[3]["code"], got[3]["retry_after"]), ("rate_limited", 1200)
        )
        self.clock.advance(1200)
        reply = await self.one(
            c, {"type": "register", "username": "user9", "password": "password1"}
        )
        self.assertEqual(reply["type"], "registered")
