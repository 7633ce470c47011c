"""
The auth service: username and password rules, throttles, and the protocol
on StringTransports, over an in-memory store with a Clock and argon2id on
the calling thread (no real reactor, no thread, no wait).
L{AuthOnSQLiteTests}: what needs a real SQLite file.
"""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.portal import IRealm
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

# cheapHasher is imported from here by tests/test_hostile_protocols.py.
from tests.servicehelpers import (  # noqa: F401
    Held,
    InlineHasher,
    ServerHarness,
    SQLiteHarness,
    cheapHasher,
    run,
)
from twisted_lab.codecs.message import RequestError
from twisted_lab.services.accounts import (
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
from twisted_lab.transports.connection import addressGroup


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


class CredTests(ServerHarness):
    def test_interfacesAndCheckers(self) -> None:
        store = self.openStore()
        hasher = InlineHasher()
        checker = PasswordChecker(store, hasher)
        self.assertTrue(verifyObject(ICredentialsChecker, checker))
        self.assertTrue(
            verifyObject(ICredentialsChecker, TokenChecker(store, Clock(), 60))
        )
        self.assertTrue(verifyObject(IRealm, AccountRealm()))
        credentials = PasswordCredentials("carol", "password1")
        self.assertTrue(verifyObject(IUsernamePassword, credentials))
        self.assertRaises(NotImplementedError, credentials.checkPassword, "password1")
        passwordHash = self.successResultOf(hasher.hash("password1"))
        self.successResultOf(store.createAccount("carol", passwordHash, 0))
        self.assertEqual(
            self.successResultOf(checker.requestAvatarId(credentials)), "carol"
        )


class RegisterLoginTests(ServerHarness):
    def test_registerRules(self) -> None:
        factory = self.makeAuth()
        c = self.connect(factory)
        got = self.ask(
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

    def test_unknownUserAndWrongPasswordAreIdentical(self) -> None:
        factory = self.makeAuth()
        self.registerAndLogin(factory, "alice", "password1")
        protocol, transport = self.connect(factory, "127.0.0.3")
        mark = len(transport.value())
        self.ask(
            (protocol, transport),
            {"type": "login", "username": "alice", "password": "wrong-password"},
        )
        wrong = transport.value()[mark:]
        mark = len(transport.value())
        self.ask(
            (protocol, transport),
            {"type": "login", "username": "nobody", "password": "wrong-password"},
        )
        unknown = transport.value()[mark:]
        self.assertEqual(wrong, unknown)
        self.assertIn(b"bad_credentials", wrong)

    def test_sessionLifecycle(self) -> None:
        factory = self.makeAuth()
        first, session = self.registerAndLogin(factory)
        self.assertEqual(session["username"], "alice")
        self.assertGreaterEqual(len(session["token"]), 43)
        self.assertTrue(session["expires_at"].endswith("Z"))
        self.assertEqual(
            self.one(first, {"type": "whoami"}),
            {"type": "identity", "username": "alice"},
        )
        # Resume on another connection.
        second = self.connect(factory, "127.0.0.9")
        self.assertEqual(
            self.one(second, {"type": "whoami"})["code"], "not_authenticated"
        )
        resumed = self.one(second, {"type": "resume", "token": session["token"]})
        self.assertEqual((resumed["type"], resumed["username"]), ("session", "alice"))
        # A new login gives a new token.
        third = self.one(
            second, {"type": "login", "username": "alice", "password": "password1"}
        )
        self.assertNotEqual(third["token"], session["token"])
        # Logout revokes the token everywhere.
        self.assertEqual(self.one(first, {"type": "logout"}), {"type": "logged_out"})
        self.assertEqual(
            self.one(first, {"type": "whoami"})["code"], "not_authenticated"
        )
        fourth = self.connect(factory, "127.0.0.10")
        self.assertEqual(
            self.one(fourth, {"type": "resume", "token": session["token"]})["code"],
            "invalid_token",
        )
        names = self.recorder.names()
        for event in ("login_succeeded", "session_resumed", "logged_out"):
            self.assertIn(event, names)

    def test_hostileTokens(self) -> None:
        factory = self.makeAuth()
        c = self.connect(factory)
        got = self.ask(
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

    def test_idleAndAbsoluteExpiry(self) -> None:
        factory = self.makeAuth(sessionIdle=100, sessionMax=250)
        c, session = self.registerAndLogin(factory)
        self.clock.advance(99)
        self.assertEqual(self.one(c, {"type": "whoami"})["type"], "identity")
        self.clock.advance(99)  # used 99 s ago: still alive
        self.assertEqual(self.one(c, {"type": "whoami"})["type"], "identity")
        self.clock.advance(100)  # idle for 100 s: expired
        self.assertEqual(self.one(c, {"type": "whoami"})["code"], "not_authenticated")
        other = self.connect(factory, "127.0.0.5")
        self.assertEqual(
            self.one(other, {"type": "resume", "token": session["token"]})["code"],
            "invalid_token",
        )
        # Absolute limit: used every 60 s, still gone after 250 s.
        c2, session2 = self.registerAndLogin(factory, "bob", "password2")
        for _ in range(4):
            self.clock.advance(60)
            self.assertEqual(self.one(c2, {"type": "whoami"})["type"], "identity")
        self.clock.advance(11)
        self.assertEqual(self.one(c2, {"type": "whoami"})["code"], "not_authenticated")

    def test_changePasswordRevokesOtherSessions(self) -> None:
        factory = self.makeAuth()
        first, session = self.registerAndLogin(factory)
        second = self.connect(factory, "127.0.0.6")
        self.one(
            second, {"type": "login", "username": "alice", "password": "password1"}
        )
        got = self.ask(
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
            self.one(second, {"type": "whoami"})["code"], "not_authenticated"
        )
        third = self.connect(factory, "127.0.0.7")
        got = self.ask(
            third,
            {"type": "login", "username": "alice", "password": "password1"},
            {"type": "login", "username": "alice", "password": "password2"},
        )
        self.assertEqual([m["type"] for m in got], ["error", "session"])

    def test_aChangeRevokesTheOthersEvenIfItsOwnSessionEnds(self) -> None:
        """
        A password change whose own session ends while the new hash is
        being made (logged out on another connection) still revokes the
        user's other sessions, or changes nothing: a session made with the
        old password (a stolen one, say) never outlives a change.
        """
        hasher = InlineHasher()
        factory = self.makeAuth(hasher=hasher)
        first, session = self.registerAndLogin(factory)
        other = self.one(
            self.connect(factory, "127.0.0.7"),
            {"type": "login", "username": "alice", "password": "password1"},
        )
        second = self.connect(factory, "127.0.0.6")
        self.one(second, {"type": "resume", "token": session["token"]})
        hashes = Held(hasher, "hash")
        self.send(
            first,
            {"type": "change_password", "old": "password1", "new": "password2"},
        )
        self.assertEqual(len(hashes.calls), 1, "the new hash is being made")
        self.assertEqual(self.one(second, {"type": "logout"})["type"], "logged_out")
        hashes.release()
        changed = self.received(first)[-1]
        resumed = self.one(
            self.connect(factory, "127.0.0.9"),
            {"type": "resume", "token": other["token"]},
        )
        if changed["type"] == "password_changed":
            self.assertEqual(
                resumed.get("code"), "invalid_token", "the other session outlived it"
            )
        else:
            login = self.one(
                self.connect(factory, "127.0.0.10"),
                {"type": "login", "username": "alice", "password": "password1"},
            )
            self.assertEqual(login["type"], "session", "refused, yet changed")

    def test_notAuthenticated(self) -> None:
        factory = self.makeAuth()
        c = self.connect(factory)
        got = self.ask(
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

    def test_rehashOnParameterChange(self) -> None:
        """
        A server restarted with costlier hash parameters (a new server on
        the same store) replaces a hash made with the old ones at the next
        successful login.
        """
        store = self.openStore()
        old = self.makeAuth(store, InlineHasher(timeCost=1))
        self.registerAndLogin(old)
        before = self.successResultOf(store.passwordHash("alice"))
        self.assertIn("t=1", before)
        new = self.makeAuth(store, InlineHasher(timeCost=2))
        c = self.connect(new)
        reply = self.one(
            c, {"type": "login", "username": "alice", "password": "password1"}
        )
        self.assertEqual(reply["type"], "session")
        after = self.successResultOf(store.passwordHash("alice"))
        self.assertIn("t=2", after)
        self.assertNotEqual(before, after)

    def test_parallelRegistrationsOfOneName(self) -> None:
        """
        Eight registrations of one name, all of their hashes in flight at
        once, reach the store together: one account, seven username_taken.
        """
        hasher = InlineHasher()
        factory = self.makeAuth(hasher=hasher)
        hashes = Held(hasher, "hash")
        connections = [self.connect(factory, f"127.0.1.{i}") for i in range(8)]
        for c in connections:
            self.send(
                c, {"type": "register", "username": "Same", "password": "password1"}
            )
        self.assertEqual(len(hashes.calls), 8)
        self.assertEqual([self.received(c) for c in connections], [[]] * 8)
        hashes.release()
        results = []
        for c in connections:
            [reply] = self.received(c)
            results.append(reply)
        kinds = sorted(r.get("code", r["type"]) for r in results)
        self.assertEqual(kinds, ["registered"] + ["username_taken"] * 7)


class ThrottlingTests(ServerHarness):
    def test_accountBackoffAndRelease(self) -> None:
        factory = self.makeAuth()
        self.registerAndLogin(factory)
        attacker = self.connect(factory, "127.0.0.66")
        wrong = {"type": "login", "username": "alice", "password": "wrong-password"}
        got = self.ask(attacker, *[wrong] * (ACCOUNT_FREE_FAILURES + 1))
        self.assertEqual(
            [m["code"] for m in got], ["bad_credentials"] * (ACCOUNT_FREE_FAILURES + 1)
        )
        limited = self.one(attacker, wrong)
        self.assertEqual(limited["code"], "rate_limited")
        self.assertEqual(limited["retry_after"], 1)
        # The real user is throttled too (per account), but only briefly.
        user = self.connect(factory, "127.0.0.8")
        right = {"type": "login", "username": "alice", "password": "password1"}
        self.assertEqual(self.one(user, right)["code"], "rate_limited")
        self.clock.advance(1)
        self.assertEqual(self.one(user, right)["type"], "session")
        self.assertEqual(self.one(attacker, wrong)["code"], "bad_credentials")
        self.assertIn("rate_limited", self.recorder.names())
        self.assertIn("login_failed", self.recorder.names())

    def test_addressBackoffAcrossAccounts(self) -> None:
        factory = self.makeAuth()
        requests = [
            {"type": "login", "username": f"user{i}", "password": "wrong-password"}
            for i in range(ADDRESS_FREE_FAILURES + 1)
        ]
        # Over several connections (one connection's login rate is lower).
        got = []
        for start in range(0, len(requests), 7):
            connection = self.connect(factory, "127.0.0.77")
            got += self.ask(connection, *requests[start : start + 7])
        self.assertEqual({m["code"] for m in got}, {"bad_credentials"})
        attacker = self.connect(factory, "127.0.0.77")
        limited = self.one(
            attacker, {"type": "login", "username": "fresh", "password": "whatever1"}
        )
        self.assertEqual(limited["code"], "rate_limited")
        other = self.connect(factory, "127.0.0.78")
        reply = self.one(
            other, {"type": "login", "username": "fresh", "password": "whatever1"}
        )
        self.assertEqual(reply["code"], "bad_credentials", "other addresses unaffected")

    def test_registrationsPerAddress(self) -> None:
        factory = self.makeAuth(registrationsPerHour=3)
        c = self.connect(factory, "127.0.0.88")
        got = self.ask(
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
        reply = self.one(
            c, {"type": "register", "username": "user9", "password": "password1"}
        )
        self.assertEqual(reply["type"], "registered")


class AuthOnSQLiteTests(SQLiteHarness):
    """
    What only a real database file shows, so these run over SQLite (in its
    thread) with the real threaded hasher, on the real reactor: a session
    outlives the server process that made it (a second server opens the
    same file), and the file itself holds no password and no token.
    """

    @run
    async def test_tokenSurvivesARestart(self):
        factory = await self.makeAuth()
        _, session = await self.registerAndLogin(factory)
        factory.store.close()
        again = await self.makeAuth()
        c = self.connect(again)
        resumed = await self.one(c, {"type": "resume", "token": session["token"]})
        self.assertEqual(resumed["username"], "alice")

    @run
    async def test_noSecretsInTheDatabaseFileOrEvents(self):
        factory = await self.makeAuth()
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
