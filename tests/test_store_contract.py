"""
One suite of store tests, run against every store engine: what the
services rely on from an L{IStore}, whatever keeps the data.

L{StoreContract} holds the tests; a subclass per engine says only how to
make an opened store (L{StoreContract.makeStore}).  The SQLite store is the
reference: where the memory store (or a later engine) answers differently,
these tests fail.  Times are explicit C{now} values, never read from a
clock, so nothing here sleeps.

Each test is an C{async def test_...(self, store)} decorated with
L{storeTest}, which makes a store and runs the body.  On a trial
L{TestCase} the body's Deferred is handed to trial (the SQLite store works
in a thread); L{MemoryStoreContractTests} is a L{SynchronousTestCase} that
requires the Deferred to have fired already: the memory store needs no
reactor.
"""

from __future__ import annotations

import ast
import functools
import itertools
import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from twisted_lab.ports import IStore
from twisted_lab.storage import memory
from twisted_lab.storage.memory import MemoryStore
from twisted_lab.storage.sqlite import REVOCATIONS_KEPT, Store

NOW = "2026-11-25T10:00:00Z"
LATER = "2026-11-25T11:00:00Z"

#: An instant (seconds since the epoch) the tests count from.
T0 = 1_800_000_000.0
IDLE = 100.0
MAXIMUM = 1000.0

Body = Callable[[Any, Any], Awaitable[None]]


def storeTest(body: Body) -> Callable[[Any], Any]:
    """
    Turn C{async def test_x(self, store)} into a test method that makes an
    opened store with C{self.makeStore()} and runs the body with it.
    """

    @functools.wraps(body)
    def test(self: StoreContract) -> Any:
        async def run() -> None:
            store = await self.makeStore()
            await body(self, store)

        return self.settle(defer.ensureDeferred(run()))

    return test


class StoreContract:
    """
    The tests every store passes.  Mix into a trial test case and define
    L{makeStore}; that (with L{settle}) is the only engine-specific part.
    """

    #: What a change the schema refuses (a constraint fails) raises; each
    #: engine names its own.
    refusedError: type[Exception] = Exception

    # Provided by the TestCase this is mixed into.
    assertEqual: Any
    assertIsNone: Any
    assertTrue: Any
    assertFalse: Any
    assertGreater: Any
    assertRaises: Any
    assertIsInstance: Any

    async def makeStore(self) -> Any:
        """
        An opened store holding nothing, closed when the test ends.
        """
        raise NotImplementedError

    def settle(self, d: defer.Deferred[None]) -> Any:
        """
        What a test method returns for the Deferred of its body: the
        Deferred itself, for trial to wait on.
        """
        return d

    # -- helpers ----------------------------------------------------------------

    async def account(self, store: Any, username: str = "alice") -> None:
        self.assertTrue(await store.createAccount(username, "hash", T0))

    async def session(
        self,
        store: Any,
        digest: bytes,
        username: str = "alice",
        now: float = T0,
        idle: float = IDLE,
        maximum: float = MAXIMUM,
    ) -> float:
        return float(await store.createSession(digest, username, now, idle, maximum))

    async def revokedDigests(self, store: Any) -> list[bytes]:
        return [digest for _, digest, _ in await store.revocationsAfter(0)]

    # -- the store as a whole ---------------------------------------------------

    @storeTest
    async def test_providesIStore(self, store: Any) -> None:
        self.assertTrue(verifyObject(IStore, store))

    @storeTest
    async def test_integrityCheck(self, store: Any) -> None:
        self.assertEqual(await store.integrityCheck(), "ok")

    @storeTest
    async def test_onTransactionPerCommittedOperation(self, store: Any) -> None:
        """
        C{onTransaction} is called once per committed operation with the
        seconds it took; a failed one is not reported.  C{lastCommit} never
        goes back, and C{storeMessages} fires with it.
        """
        calls: list[float] = []
        store.onTransaction = calls.append
        before = store.lastCommit
        await self.account(store)
        await store.visit("10.0.0.1", NOW)
        self.assertFalse(await store.createAccount("alice", "other", T0))
        seqs, committed = await store.storeMessages([("lobby", "a", "hi", NOW)])
        self.assertEqual(seqs, [1])
        self.assertIsInstance(committed, float)
        self.assertEqual(committed, store.lastCommit)
        self.assertTrue(store.lastCommit >= before)
        self.assertEqual(len(calls), 4)
        for seconds in calls:
            self.assertIsInstance(seconds, float)
            self.assertTrue(seconds >= 0.0)
        with self.assertRaises(self.refusedError):
            await store.createSession(b"s", "nobody", T0, IDLE, MAXIMUM)
        self.assertEqual(len(calls), 4)

    @storeTest
    async def test_closedStoreFails(self, store: Any) -> None:
        store.close()
        with self.assertRaises(RuntimeError):
            await store.visit("10.0.0.1", NOW)
        with self.assertRaises(RuntimeError):
            await store.lastSeq("lobby")

    # -- identities -------------------------------------------------------------

    @storeTest
    async def test_visitOfAnUnknownAddress(self, store: Any) -> None:
        self.assertIsNone(await store.visit("10.0.0.1", NOW))
        # Visiting does not make the address known.
        self.assertIsNone(await store.visit("10.0.0.1", NOW))
        self.assertFalse(await store.forgetAddress("10.0.0.1"))

    @storeTest
    async def test_visitsAreCounted(self, store: Any) -> None:
        self.assertEqual(await store.nameAddress("10.0.0.1", "Alice", NOW), 1)
        self.assertEqual(await store.visit("10.0.0.1", NOW), ("Alice", 2))
        self.assertEqual(await store.visit("10.0.0.1", LATER), ("Alice", 3))

    @storeTest
    async def test_renamingKeepsTheCount(self, store: Any) -> None:
        await store.nameAddress("10.0.0.1", "Alice", NOW)
        await store.visit("10.0.0.1", NOW)
        self.assertEqual(await store.nameAddress("10.0.0.1", "Alicia", LATER), 2)
        self.assertEqual(await store.visit("10.0.0.1", LATER), ("Alicia", 3))

    @storeTest
    async def test_forgetAddress(self, store: Any) -> None:
        await store.nameAddress("10.0.0.1", "Alice", NOW)
        await store.visit("10.0.0.1", NOW)
        self.assertTrue(await store.forgetAddress("10.0.0.1"))
        self.assertFalse(await store.forgetAddress("10.0.0.1"))
        self.assertIsNone(await store.visit("10.0.0.1", NOW))
        # Named again, it starts counting afresh.
        self.assertEqual(await store.nameAddress("10.0.0.1", "Alice", NOW), 1)

    @storeTest
    async def test_addressesAreIndependent(self, store: Any) -> None:
        await store.nameAddress("10.0.0.1", "Alice", NOW)
        await store.nameAddress("::1", "Bob", NOW)
        await store.visit("10.0.0.1", NOW)
        self.assertEqual(await store.visit("::1", NOW), ("Bob", 2))
        self.assertTrue(await store.forgetAddress("::1"))
        self.assertEqual(await store.visit("10.0.0.1", NOW), ("Alice", 3))

    @storeTest
    async def test_hostileStringsStoredLiterally(self, store: Any) -> None:
        hostile = ("Robert'); DROP TABLE identities;--", "\u202eevil", "a\x00b", "")
        for name in hostile:
            await store.nameAddress("10.0.0.1", name, NOW)
            self.assertEqual((await store.visit("10.0.0.1", NOW))[0], name)
        seqs, _ = await store.storeMessages([("r'; --", n, n, n) for n in hostile])
        self.assertEqual(
            await store.history("r'; --", 0, 10),
            [(seq, n, n, n) for seq, n in zip(seqs, hostile, strict=True)],
        )

    # -- accounts ---------------------------------------------------------------

    @storeTest
    async def test_usernameIsTakenOnce(self, store: Any) -> None:
        self.assertTrue(await store.createAccount("alice", "first", T0))
        self.assertFalse(await store.createAccount("alice", "second", T0 + 1))
        self.assertEqual(await store.passwordHash("alice"), "first")

    @storeTest
    async def test_usernamesAreComparedExactly(self, store: Any) -> None:
        self.assertTrue(await store.createAccount("alice", "lower", T0))
        self.assertTrue(await store.createAccount("Alice", "upper", T0))
        self.assertEqual(await store.passwordHash("alice"), "lower")
        self.assertEqual(await store.passwordHash("Alice"), "upper")

    @storeTest
    async def test_passwordHashOfAnUnknownAccount(self, store: Any) -> None:
        self.assertIsNone(await store.passwordHash("nobody"))

    @storeTest
    async def test_setPasswordHash(self, store: Any) -> None:
        await self.account(store)
        await self.account(store, "bob")
        self.assertIsNone(await store.setPasswordHash("alice", "new"))
        self.assertEqual(await store.passwordHash("alice"), "new")
        self.assertEqual(await store.passwordHash("bob"), "hash")

    @storeTest
    async def test_setPasswordHashOfAnUnknownAccount(self, store: Any) -> None:
        """
        Nothing happens: no error, and no account is created.
        """
        self.assertIsNone(await store.setPasswordHash("nobody", "new"))
        self.assertIsNone(await store.setPasswordHash("nobody", "new", b"s", T0))
        self.assertIsNone(await store.passwordHash("nobody"))
        self.assertEqual(await store.lastRevocation(), 0)

    @storeTest
    async def test_setPasswordHashWithoutKeepLeavesSessions(self, store: Any) -> None:
        await self.account(store)
        await self.session(store, b"s1")
        await self.session(store, b"s2")
        await store.setPasswordHash("alice", "new", None, T0 + 10)
        self.assertEqual(
            await store.useSession(b"s1", T0 + 20, IDLE), ("alice", T0 + 120)
        )
        self.assertEqual(
            await store.useSession(b"s2", T0 + 20, IDLE), ("alice", T0 + 120)
        )
        self.assertEqual(await store.lastRevocation(), 0)
        self.assertEqual(await store.revocationsAfter(0), [])

    @storeTest
    async def test_setPasswordHashKeepingOneRevokesTheOthers(self, store: Any) -> None:
        """
        In the same call: the hash changes, the user's other sessions end
        and are logged as revoked (C{password_changed}); the kept session
        and other users' sessions live on.
        """
        await self.account(store)
        await self.account(store, "bob")
        for digest in (b"a1", b"a2", b"a3"):
            await self.session(store, digest)
        await self.session(store, b"b1", "bob")
        await store.setPasswordHash("alice", "new", b"a2", T0 + 10)
        self.assertEqual(await store.passwordHash("alice"), "new")

        revoked = await store.revocationsAfter(0)
        self.assertEqual(sorted(d for _, d, _ in revoked), [b"a1", b"a3"])
        self.assertEqual({reason for _, _, reason in revoked}, {"password_changed"})
        positions = [p for p, _, _ in revoked]
        self.assertEqual(positions, sorted(set(positions)))
        self.assertGreater(positions[0], 0)
        self.assertEqual(await store.lastRevocation(), positions[-1])
        self.assertEqual(await store.revocationsSince(T0 + 10), revoked)
        self.assertEqual(await store.revocationsSince(T0 + 10.5), [])

        self.assertIsNone(await store.useSession(b"a1", T0 + 20, IDLE))
        self.assertIsNone(await store.useSession(b"a3", T0 + 20, IDLE))
        self.assertEqual(
            await store.useSession(b"a2", T0 + 20, IDLE), ("alice", T0 + 120)
        )
        self.assertEqual(
            await store.useSession(b"b1", T0 + 20, IDLE), ("bob", T0 + 120)
        )

    @storeTest
    async def test_setPasswordHashKeepingAnotherUsersSession(self, store: Any) -> None:
        """
        A kept digest that is not one of the user's sessions keeps none.
        """
        await self.account(store)
        await self.account(store, "bob")
        await self.session(store, b"a1")
        await self.session(store, b"b1", "bob")
        await store.setPasswordHash("alice", "new", b"b1", T0 + 10)
        self.assertEqual(await self.revokedDigests(store), [b"a1"])
        self.assertEqual(
            await store.useSession(b"b1", T0 + 20, IDLE), ("bob", T0 + 120)
        )

    @storeTest
    async def test_setPasswordHashKeepingTheOnlySession(self, store: Any) -> None:
        await self.account(store)
        await self.session(store, b"a1")
        await store.setPasswordHash("alice", "new", b"a1", T0 + 10)
        self.assertEqual(await store.lastRevocation(), 0)
        self.assertEqual(
            await store.useSession(b"a1", T0 + 20, IDLE), ("alice", T0 + 120)
        )

    # -- sessions ---------------------------------------------------------------

    @storeTest
    async def test_createSessionFiresWithTheIdleExpiry(self, store: Any) -> None:
        await self.account(store)
        self.assertEqual(await self.session(store, b"s1"), T0 + IDLE)
        # A maximum shorter than the idle time wins.
        self.assertEqual(
            await self.session(store, b"s2", idle=IDLE, maximum=40.0), T0 + 40.0
        )

    @storeTest
    async def test_createSessionForAnUnknownAccountFails(self, store: Any) -> None:
        with self.assertRaises(self.refusedError):
            await store.createSession(b"s1", "nobody", T0, IDLE, MAXIMUM)
        self.assertIsNone(await store.useSession(b"s1", T0 + 1, IDLE))
        # The failure left the store usable.
        await self.account(store, "nobody")
        self.assertEqual(await self.session(store, b"s1", "nobody"), T0 + IDLE)

    @storeTest
    async def test_createSessionWithATakenDigestFails(self, store: Any) -> None:
        await self.account(store)
        await self.account(store, "bob")
        await self.session(store, b"s1")
        with self.assertRaises(self.refusedError):
            await store.createSession(b"s1", "bob", T0 + 50, IDLE, MAXIMUM)
        # The first session is untouched: still alice's, last used at T0.
        self.assertEqual(
            await store.useSession(b"s1", T0 + 60, IDLE), ("alice", T0 + 160)
        )

    @storeTest
    async def test_createSessionDeletesTheUsersDeadSessions(self, store: Any) -> None:
        """
        Creating a session deletes (without logging a revocation) the user's
        sessions that can no longer be used, idle or past their maximum;
        other users' sessions and live ones stay.  A deleted session can no
        longer be refreshed by a connection that was active recently.
        """
        await self.account(store)
        await self.account(store, "bob")
        await self.session(store, b"idle")
        await self.session(store, b"old", idle=1000.0, maximum=150.0)
        await self.session(store, b"live", now=T0 + 150)
        await self.session(store, b"bob", "bob")
        await self.session(store, b"new", now=T0 + 200)

        self.assertIsNone(await store.refreshSession(b"idle", T0 + 190, T0 + 200, IDLE))
        self.assertIsNone(await store.refreshSession(b"old", T0 + 190, T0 + 200, IDLE))
        self.assertEqual(
            await store.refreshSession(b"bob", T0 + 190, T0 + 200, IDLE), T0 + 290
        )
        self.assertEqual(
            await store.useSession(b"live", T0 + 200, IDLE), ("alice", T0 + 300)
        )
        self.assertEqual(await store.lastRevocation(), 0)

    @storeTest
    async def test_useSessionSlides(self, store: Any) -> None:
        await self.account(store)
        await self.session(store, b"s1")
        self.assertEqual(
            await store.useSession(b"s1", T0 + 60, IDLE), ("alice", T0 + 160)
        )
        # Marked used at T0 + 60: alive 90 seconds later.
        self.assertEqual(
            await store.useSession(b"s1", T0 + 150, IDLE), ("alice", T0 + 250)
        )

    @storeTest
    async def test_useSessionIdleExpiry(self, store: Any) -> None:
        """
        Unused for C{idle} seconds (exactly) a session has expired, and
        C{useSession} deletes it (no revocation is logged): a connection
        active since can no longer refresh it.
        """
        await self.account(store)
        await self.session(store, b"s1")
        await self.session(store, b"s2")
        self.assertIsNone(await store.useSession(b"s1", T0 + IDLE, IDLE))
        self.assertIsNone(await store.refreshSession(b"s1", T0 + 99, T0 + 100, IDLE))
        self.assertEqual(
            await store.refreshSession(b"s2", T0 + 99, T0 + 100, IDLE), T0 + 199
        )
        self.assertEqual(await store.lastRevocation(), 0)

    @storeTest
    async def test_useSessionMaximumExpiry(self, store: Any) -> None:
        await self.account(store)
        await self.session(store, b"s1", maximum=250.0)
        await store.useSession(b"s1", T0 + 90, IDLE)
        self.assertEqual(
            await store.useSession(b"s1", T0 + 180, IDLE), ("alice", T0 + 250)
        )
        self.assertIsNone(await store.useSession(b"s1", T0 + 250, IDLE))
        self.assertIsNone(await store.refreshSession(b"s1", T0 + 249, T0 + 249, IDLE))

    @storeTest
    async def test_useSessionOfAnUnknownDigest(self, store: Any) -> None:
        self.assertIsNone(await store.useSession(b"nothing", T0, IDLE))

    @storeTest
    async def test_refreshSession(self, store: Any) -> None:
        await self.account(store)
        await self.session(store, b"s1")
        self.assertEqual(
            await store.refreshSession(b"s1", T0 + 50, T0 + 120, IDLE), T0 + 150
        )
        # The use at T0 + 50 was recorded.
        self.assertEqual(
            await store.useSession(b"s1", T0 + 140, IDLE), ("alice", T0 + 240)
        )
        # An older use does not move the recorded one back.
        self.assertEqual(
            await store.refreshSession(b"s1", T0 + 10, T0 + 145, IDLE), T0 + 240
        )
        # The maximum still caps it.
        self.assertEqual(
            await store.refreshSession(b"s1", T0 + 990, T0 + 995, IDLE),
            T0 + MAXIMUM,
        )
        self.assertIsNone(
            await store.refreshSession(b"s1", T0 + 999, T0 + MAXIMUM, IDLE)
        )
        self.assertIsNone(await store.useSession(b"s1", T0 + 999, IDLE))

    @storeTest
    async def test_refreshSessionIdleExpired(self, store: Any) -> None:
        await self.account(store)
        await self.session(store, b"s1")
        self.assertIsNone(await store.refreshSession(b"s1", T0 + 10, T0 + 110, IDLE))
        # Deleted: a later use does not bring it back.
        self.assertIsNone(await store.refreshSession(b"s1", T0 + 109, T0 + 110, IDLE))

    @storeTest
    async def test_refreshSessionUnknownOrRevoked(self, store: Any) -> None:
        await self.account(store)
        await self.session(store, b"s1")
        self.assertIsNone(await store.refreshSession(b"nothing", T0, T0, IDLE))
        await store.deleteSession(b"s1", T0 + 1)
        self.assertIsNone(await store.refreshSession(b"s1", T0 + 1, T0 + 2, IDLE))

    @storeTest
    async def test_deleteSessionLogsARevocation(self, store: Any) -> None:
        await self.account(store)
        await self.session(store, b"s1")
        self.assertTrue(await store.deleteSession(b"s1", T0 + 5))
        revoked = await store.revocationsAfter(0)
        self.assertEqual(len(revoked), 1)
        position, digest, reason = revoked[0]
        self.assertGreater(position, 0)
        self.assertEqual((digest, reason), (b"s1", "logged_out"))
        self.assertIsInstance(digest, bytes)
        self.assertEqual(await store.lastRevocation(), position)
        self.assertEqual(await store.revocationsSince(T0 + 5), revoked)
        self.assertIsNone(await store.useSession(b"s1", T0 + 6, IDLE))
        # Only an existing session is revoked.
        self.assertFalse(await store.deleteSession(b"s1", T0 + 7))
        self.assertFalse(await store.deleteSession(b"nothing", T0 + 7))
        self.assertEqual(await store.revocationsAfter(0), revoked)

    # -- the revocation log -----------------------------------------------------

    @storeTest
    async def test_noRevocations(self, store: Any) -> None:
        self.assertEqual(await store.lastRevocation(), 0)
        self.assertEqual(await store.revocationsAfter(0), [])
        self.assertEqual(await store.revocationsSince(0.0), [])

    @storeTest
    async def test_revocationPositionsIncrease(self, store: Any) -> None:
        """
        Positions increase; C{revocationsAfter}, C{revocationsSince} and
        C{lastRevocation} agree on them.
        """
        await self.account(store)
        for n in range(4):
            await self.session(store, b"s%d" % n)
        await store.deleteSession(b"s0", T0 + 1)
        await store.deleteSession(b"s1", T0 + 2)
        await store.setPasswordHash("alice", "new", b"s3", T0 + 3)
        await store.deleteSession(b"s3", T0 + 4)
        log = await store.revocationsAfter(0)
        self.assertEqual(
            [(d, r) for _, d, r in log],
            [
                (b"s0", "logged_out"),
                (b"s1", "logged_out"),
                (b"s2", "password_changed"),
                (b"s3", "logged_out"),
            ],
        )
        positions = [p for p, _, _ in log]
        self.assertEqual(positions, sorted(set(positions)))
        self.assertGreater(positions[0], 0)
        self.assertEqual(await store.lastRevocation(), positions[-1])
        self.assertEqual(await store.revocationsAfter(positions[1]), log[2:])
        self.assertEqual(await store.revocationsAfter(positions[-1]), [])
        self.assertEqual(await store.revocationsSince(T0), log)
        self.assertEqual(await store.revocationsSince(T0 + 2), log[1:])
        self.assertEqual(await store.revocationsSince(T0 + 2.5), log[2:])
        self.assertEqual(await store.revocationsSince(T0 + 4.5), [])

    @storeTest
    async def test_revocationReadsAreLimitedTo1000(self, store: Any) -> None:
        """
        C{revocationsAfter} hands back the oldest 1000 after the position
        (read on from the last one for more); C{revocationsSince} the newest
        1000.
        """
        await self.account(store)
        digests = [b"s%04d" % n for n in range(1002)]
        for digest in digests:
            await self.session(store, digest, maximum=1e6, idle=1e6)
        await store.setPasswordHash("alice", "new", digests[0], T0 + 10)
        first = await store.revocationsAfter(0)
        self.assertEqual(len(first), 1000)
        rest = await store.revocationsAfter(first[-1][0])
        self.assertEqual(len(rest), 1)
        everything = first + rest
        positions = [p for p, _, _ in everything]
        self.assertEqual(positions, sorted(set(positions)))
        self.assertEqual(sorted(d for _, d, _ in everything), digests[1:])
        self.assertEqual(await store.revocationsSince(T0), everything[1:])
        self.assertEqual(await store.lastRevocation(), positions[-1])

    @storeTest
    async def test_revocationsArePrunedAfterAnHour(self, store: Any) -> None:
        """
        Writing a revocation first drops those older than an hour (kept
        exactly an hour); positions are never reused.
        """
        await self.account(store)
        for n in range(3):
            await self.session(store, b"s%d" % n, maximum=1e6, idle=1e6)
        await store.deleteSession(b"s0", T0)
        await store.deleteSession(b"s1", T0 + REVOCATIONS_KEPT)
        self.assertEqual(await self.revokedDigests(store), [b"s0", b"s1"])
        before = await store.lastRevocation()
        await store.deleteSession(b"s2", T0 + REVOCATIONS_KEPT + 1)
        log = await store.revocationsAfter(0)
        self.assertEqual([d for _, d, _ in log], [b"s1", b"s2"])
        self.assertGreater(log[-1][0], before)
        self.assertEqual(await store.revocationsSince(0.0), log)

    @storeTest
    async def test_onlyRevokingPrunes(self, store: Any) -> None:
        """
        Reads, a password change that keeps no session and a logout of an
        unknown session prune nothing.
        """
        await self.account(store)
        await self.session(store, b"s0")
        await store.deleteSession(b"s0", T0)
        much = T0 + 10 * REVOCATIONS_KEPT
        await store.setPasswordHash("alice", "new", None, much)
        self.assertFalse(await store.deleteSession(b"nothing", much))
        self.assertEqual(await self.revokedDigests(store), [b"s0"])
        self.assertEqual(await self.revokedDigests(store), [b"s0"])

    @storeTest
    async def test_lastRevocationOnceAllArePruned(self, store: Any) -> None:
        """
        C{lastRevocation} is the newest revocation kept: 0 once a password
        change (revoking nothing) has pruned them all, though the next
        revocation's position is past every earlier one.
        """
        await self.account(store)
        await self.session(store, b"s0", maximum=1e6, idle=1e6)
        await self.session(store, b"s1", maximum=1e6, idle=1e6)
        await store.deleteSession(b"s0", T0)
        first = await store.lastRevocation()
        await store.setPasswordHash("alice", "new", b"s1", T0 + REVOCATIONS_KEPT + 1)
        self.assertEqual(await store.lastRevocation(), 0)
        self.assertEqual(await store.revocationsAfter(0), [])
        await store.deleteSession(b"s1", T0 + REVOCATIONS_KEPT + 2)
        [(position, digest, _)] = await store.revocationsAfter(0)
        self.assertEqual(digest, b"s1")
        self.assertGreater(position, first)

    # -- chat -------------------------------------------------------------------

    @storeTest
    async def test_lastSeqOfAnEmptyRoom(self, store: Any) -> None:
        self.assertEqual(await store.lastSeq("lobby"), 0)

    @storeTest
    async def test_storeNoMessages(self, store: Any) -> None:
        seqs, committed = await store.storeMessages([])
        self.assertEqual(seqs, [])
        self.assertEqual(committed, store.lastCommit)
        self.assertEqual(await store.roomsWithHistory(10), [])

    @storeTest
    async def test_seqIsPerRoomAndGapFree(self, store: Any) -> None:
        """
        Each room numbers its messages from 1 without gaps, across calls
        and with several rooms in one call; the seqs come back in the order
        the messages were given.
        """

        async def store_(*rows: tuple[str, str]) -> list[int]:
            seqs, _ = await store.storeMessages(
                [(room, "a", text, NOW) for room, text in rows]
            )
            return list(seqs)

        self.assertEqual(await store_(("lobby", "l1"), ("lobby", "l2")), [1, 2])
        self.assertEqual(
            await store_(("other", "o1"), ("lobby", "l3"), ("other", "o2")),
            [1, 3, 2],
        )
        self.assertEqual(await store_(("lobby", "l4")), [4])
        self.assertEqual(await store.lastSeq("lobby"), 4)
        self.assertEqual(await store.lastSeq("other"), 2)
        self.assertEqual(
            await store.history("lobby", 0, 100),
            [(n, "a", f"l{n}", NOW) for n in range(1, 5)],
        )
        self.assertEqual(
            await store.history("other", 0, 100),
            [(n, "a", f"o{n}", NOW) for n in range(1, 3)],
        )

    @storeTest
    async def test_failedStoreNumbersNothing(self, store: Any) -> None:
        """
        A batch with a broken row (a missing sender) stores and numbers none
        of its rows, not even the good ones.
        """
        await store.storeMessages([("lobby", "a", "one", NOW)])
        with self.assertRaises(self.refusedError):
            await store.storeMessages(
                [
                    ("lobby", "a", "two", NOW),
                    ("fresh", "a", "new", NOW),
                    ("lobby", None, "broken", NOW),
                ]
            )
        self.assertEqual(await store.lastSeq("lobby"), 1)
        self.assertEqual(await store.lastSeq("fresh"), 0)
        self.assertEqual(await store.roomsWithHistory(10), ["lobby"])
        seqs, _ = await store.storeMessages([("lobby", "a", "three", NOW)])
        self.assertEqual(seqs, [2])
        self.assertEqual(
            [text for _, _, text, _ in await store.history("lobby", 0, 10)],
            ["one", "three"],
        )

    @storeTest
    async def test_historyAfterAndLimit(self, store: Any) -> None:
        rows = [("lobby", f"u{n}", f"m{n}", f"t{n}") for n in range(1, 6)]
        await store.storeMessages(rows)
        expected = [(n, f"u{n}", f"m{n}", f"t{n}") for n in range(1, 6)]
        self.assertEqual(await store.history("lobby", 0, 2), expected[:2])
        self.assertEqual(await store.history("lobby", 2, 2), expected[2:4])
        self.assertEqual(await store.history("lobby", 4, 10), expected[4:])
        self.assertEqual(await store.history("lobby", 0, 100), expected)
        self.assertEqual(await store.history("lobby", 5, 10), [])
        self.assertEqual(await store.history("lobby", 99, 10), [])
        self.assertEqual(await store.history("lobby", 0, 0), [])
        self.assertEqual(await store.history("elsewhere", 0, 10), [])
        for row in await store.history("lobby", 0, 1):
            self.assertIsInstance(row, tuple)

    @storeTest
    async def test_recentHistory(self, store: Any) -> None:
        await store.storeMessages([("lobby", "a", f"m{n}", NOW) for n in range(1, 6)])
        await store.storeMessages([("other", "a", "x", NOW)])
        expected = [(n, "a", f"m{n}", NOW) for n in range(1, 6)]
        self.assertEqual(await store.recentHistory("lobby", 2), expected[3:])
        self.assertEqual(await store.recentHistory("lobby", 5), expected)
        self.assertEqual(await store.recentHistory("lobby", 50), expected)
        self.assertEqual(await store.recentHistory("lobby", 0), [])
        self.assertEqual(await store.recentHistory("elsewhere", 3), [])

    @storeTest
    async def test_roomsWithHistory(self, store: Any) -> None:
        """
        Rooms with history, in code point order (upper case before lower
        case, accented letters last), at most C{limit}.
        """
        names = ["lobby", "émigré", "Zeta", "b", "alpha"]
        await store.storeMessages([(room, "a", "hi", NOW) for room in names[:3]])
        await store.storeMessages([(room, "a", "hi", NOW) for room in names[3:]])
        await store.storeMessages([("lobby", "a", "again", NOW)])
        await store.lastSeq("quiet")
        ordered = ["Zeta", "alpha", "b", "lobby", "émigré"]
        self.assertEqual(await store.roomsWithHistory(100), ordered)
        self.assertEqual(await store.roomsWithHistory(5), ordered)
        self.assertEqual(await store.roomsWithHistory(2), ordered[:2])
        self.assertEqual(await store.roomsWithHistory(0), [])


class SQLiteStoreContractTests(StoreContract, TestCase):
    """
    The contract on a SQLite file of its own (the reference engine).
    """

    refusedError = sqlite3.IntegrityError

    async def makeStore(self) -> Store:
        store = Store(self.mktemp())
        self.addCleanup(store.close)
        return await store.open()


class MemoryStoreContractTests(StoreContract, SynchronousTestCase):
    """
    The contract on a L{MemoryStore}, with no reactor: every Deferred must
    have fired by the time the test method returns.
    """

    refusedError = memory.IntegrityError

    async def makeStore(self) -> MemoryStore:
        ticks = itertools.count(100.0, 0.25)
        store = MemoryStore(monotonic=lambda: next(ticks))
        self.addCleanup(store.close)
        return await store.open()

    def settle(self, d: defer.Deferred[None]) -> None:
        self.successResultOf(d)


class MemoryStoreTests(SynchronousTestCase):
    """
    What only the memory store promises.
    """

    def openStore(self, clock: Callable[[], float] = lambda: 7.5) -> MemoryStore:
        store = MemoryStore(monotonic=clock)
        return self.successResultOf(defer.ensureDeferred(store.open()))

    def test_keepsRevocationsAsLongAsSQLite(self) -> None:
        self.assertEqual(memory.REVOCATIONS_KEPT, REVOCATIONS_KEPT)

    def test_onTransactionGetsZero(self) -> None:
        store = self.openStore()
        calls: list[float] = []
        store.onTransaction = calls.append
        self.successResultOf(store.visit("10.0.0.1", NOW))
        self.successResultOf(store.integrityCheck())
        self.assertEqual(calls, [0.0, 0.0])

    def test_openIsATransaction(self) -> None:
        store = MemoryStore(monotonic=lambda: 3.0)
        calls: list[float] = []
        store.onTransaction = calls.append
        self.assertIs(self.successResultOf(defer.ensureDeferred(store.open())), store)
        self.assertEqual((calls, store.lastCommit), ([0.0], 3.0))

    def test_commitTimeFromTheClock(self) -> None:
        ticks = iter([1.0, 2.0, 3.0])
        store = self.openStore(lambda: next(ticks))
        self.assertEqual(store.lastCommit, 1.0)
        self.assertEqual(
            self.successResultOf(store.storeMessages([("r", "a", "t", NOW)])),
            ([1], 2.0),
        )
        self.assertEqual(store.lastCommit, 2.0)

    def test_failureIsAFiredDeferred(self) -> None:
        store = self.openStore()
        failure = self.failureResultOf(
            store.createSession(b"s", "nobody", T0, IDLE, MAXIMUM),
            memory.IntegrityError,
        )
        self.assertIn("nobody", failure.getErrorMessage())

    def test_reopenedKeepsItsData(self) -> None:
        store = self.openStore()
        self.successResultOf(store.nameAddress("10.0.0.1", "Alice", NOW))
        store.close()
        store.prepare()
        self.successResultOf(defer.ensureDeferred(store.open()))
        self.assertEqual(
            self.successResultOf(store.visit("10.0.0.1", NOW)), ("Alice", 2)
        )

    def test_negativeLimitsAreNoLimit(self) -> None:
        """
        As SQLite reads C{LIMIT -1} (not part of the contract: PostgreSQL
        refuses a negative limit).
        """
        store = self.openStore()
        self.successResultOf(
            store.storeMessages([("r", "a", str(n), NOW) for n in range(3)])
        )
        self.assertEqual(len(self.successResultOf(store.history("r", 0, -1))), 3)
        self.assertEqual(len(self.successResultOf(store.recentHistory("r", -1))), 3)
        self.assertEqual(self.successResultOf(store.roomsWithHistory(-1)), ["r"])

    def test_importsNoDatabaseNorReactor(self) -> None:
        """
        Nothing but the standard library, Twisted's Deferreds, zope.interface
        and the ports (codecs allowed) is imported.
        """
        assert memory.__file__ is not None
        with open(memory.__file__, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        imported: list[str] = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported.extend(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.extend(f"{node.module}.{alias.name}" for alias in node.names)
        for name in imported:
            self.assertNotIn("sqlite", name)
            self.assertNotIn("reactor", name)
            self.assertFalse(name.startswith("twisted.enterprise"), name)
            if name.startswith("twisted_lab"):
                self.assertTrue(
                    name.startswith(("twisted_lab.ports.", "twisted_lab.codecs")),
                    name,
                )
