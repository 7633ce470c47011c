"""
A store held in dicts and lists, for fast, deterministic unit tests.

L{MemoryStore} provides L{IStore} with the semantics of the SQLite store
(L{twisted_lab.storage.sqlite.Store}), the reference: the same return
values, session expiry rules, revocation log (positions, reasons, pruning
after L{REVOCATIONS_KEPT} seconds), per-room gap-free C{seq} numbering and
limits.  tests/test_store_contract.py runs one suite against both, so the
two cannot drift apart unnoticed.

Why it exists: tests of the service logic (identity, auth, chat) then need
no database file, no thread pool and no reactor.  Every method returns a
Deferred that has already fired (L{defer.succeed} or L{defer.fail}), so a
L{twisted.trial.unittest.SynchronousTestCase} reads results with
C{successResultOf}, and a test runs in microseconds.  The commit time
handed back by C{storeMessages} comes from an injectable C{monotonic}
clock, so even that is deterministic.

Not for production: nothing persists beyond the object (closing and
reopening the same object keeps its data; a new object starts empty), and
there is no sharing between processes.

Each method is one "transaction": it checks everything that could make it
fail before changing anything, so a failure (a taken session digest, a
session for an unknown account, a message with a missing field) leaves
the store as it was, as a rolled-back SQLite transaction does.
"""

from __future__ import annotations

import time
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from twisted.internet import defer
from zope.interface import implementer

from twisted_lab.ports import HistoryRow, IStore

T = TypeVar("T")

#: Seconds a revocation stays readable by other servers (as in the SQLite
#: store, whose value tests/test_store_contract.py checks this against).
REVOCATIONS_KEPT = 3600.0

#: At most this many revocations are handed back by one read.
REVOCATIONS_READ = 1000


class IntegrityError(Exception):
    """
    A change the SQLite schema would refuse (a constraint failed): nothing
    was changed.  The SQLite store fails with C{sqlite3.IntegrityError}.
    """


@dataclass(slots=True)
class _Identity:
    name: str
    visits: int
    firstSeen: str
    lastSeen: str


@dataclass(slots=True)
class _Account:
    passwordHash: str
    createdAt: float


@dataclass(slots=True)
class _Session:
    username: str
    createdAt: float
    lastUsed: float
    expiresAt: float


@dataclass(frozen=True, slots=True)
class _Revocation:
    position: int
    digest: bytes
    reason: str
    at: float


def _position(revocation: _Revocation) -> int:
    return revocation.position


def _seq(row: HistoryRow) -> int:
    return row[0]


def _limited(limit: int) -> int | None:
    """
    A slice bound for C{LIMIT limit}: SQLite reads a negative limit as none.
    """
    return None if limit < 0 else limit


@implementer(IStore)
class MemoryStore:
    """
    The store in memory, reached only through already-fired Deferreds.

    Construct it, C{await store.open()} (or C{successResultOf} it), use it,
    C{store.close()}; as with the SQLite store, a store that is not open
    fails every call with L{RuntimeError}.

    @param monotonic: the clock read for C{lastCommit} (and the commit time
        C{storeMessages} fires with); C{time.monotonic} unless a test wants
        fixed values.
    """

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        self._open = False
        #: Called with the seconds each operation took (always 0.0: nothing
        #: waits on a disk), as the SQLite store calls it per transaction.
        self.onTransaction: Callable[[float], object] | None = None
        #: The C{monotonic()} at which the last operation completed.
        self.lastCommit = 0.0
        self._identities: dict[str, _Identity] = {}
        self._accounts: dict[str, _Account] = {}
        self._sessions: dict[bytes, _Session] = {}
        # Each user's session digests, oldest first (a dict as ordered set).
        self._sessionsByUser: dict[str, dict[bytes, None]] = {}
        # Kept in position order; positions are never reused, even once
        # the revocations that had them are pruned.
        self._revocations: list[_Revocation] = []
        self._lastPosition = 0
        # Each room's messages; a row's seq is its index plus one.
        self._rooms: dict[str, list[HistoryRow]] = {}

    # -- life cycle -------------------------------------------------------------

    def prepare(self) -> None:
        """
        Nothing to create or migrate (the SQLite store checks its file here).
        """

    async def open(self) -> MemoryStore:
        """
        Make the store usable (the SQLite store's migration transaction is
        reported to C{onTransaction} too).
        """
        self._open = True
        await self._run(lambda: None)
        return self

    def close(self) -> None:
        """
        Refuse further calls until opened again; the data stays.
        """
        self._open = False

    def _run(self, work: Callable[[], T]) -> defer.Deferred[T]:
        """
        Do C{work} as one transaction: its result, or its exception, in an
        already-fired Deferred; C{lastCommit} and C{onTransaction} are
        updated as the SQLite store updates them after a commit.
        """
        if not self._open:
            return defer.fail(RuntimeError("the store is not open"))
        return defer.maybeDeferred(work).addCallback(self._committed)

    def _committed(self, result: T) -> T:
        self.lastCommit = self._monotonic()
        if self.onTransaction is not None:
            self.onTransaction(0.0)
        return result

    # -- identities -------------------------------------------------------------

    def visit(self, address: str, now: str) -> defer.Deferred[tuple[str, int] | None]:
        """
        A connection from C{address}: if it is known, count the visit and
        return (name, visits); else L{None}.
        """

        def work() -> tuple[str, int] | None:
            identity = self._identities.get(address)
            if identity is None:
                return None
            identity.visits += 1
            identity.lastSeen = now
            return identity.name, identity.visits

        return self._run(work)

    def nameAddress(self, address: str, name: str, now: str) -> defer.Deferred[int]:
        """
        Store (or change) the name of C{address}; its visit count (a new
        address has 1, a renamed one keeps its count).
        """

        def work() -> int:
            identity = self._identities.get(address)
            if identity is None:
                self._identities[address] = _Identity(name, 1, now, now)
                return 1
            identity.name = name
            identity.lastSeen = now
            return identity.visits

        return self._run(work)

    def forgetAddress(self, address: str) -> defer.Deferred[bool]:
        """
        Forget C{address}; whether it was known.
        """
        return self._run(lambda: self._identities.pop(address, None) is not None)

    # -- accounts and sessions --------------------------------------------------

    def createAccount(
        self, username: str, passwordHash: str, now: float
    ) -> defer.Deferred[bool]:
        """
        Create an account; False if the username (compared exactly) is taken.
        """

        def work() -> bool:
            if username in self._accounts:
                return False
            self._accounts[username] = _Account(passwordHash, float(now))
            return True

        return self._run(work)

    def passwordHash(self, username: str) -> defer.Deferred[str | None]:
        """
        The stored hash of C{username}, or None if there is no such account.
        """

        def work() -> str | None:
            account = self._accounts.get(username)
            return None if account is None else account.passwordHash

        return self._run(work)

    def setPasswordHash(
        self,
        username: str,
        passwordHash: str,
        keepSession: bytes | None = None,
        now: float = 0.0,
    ) -> defer.Deferred[None]:
        """
        Replace the hash of C{username} (no account: nothing happens).  With
        C{keepSession}, every other session of the user is revoked (reason
        C{password_changed}) in the same call, after old revocations are
        pruned.
        """

        def work() -> None:
            account = self._accounts.get(username)
            if account is not None:
                account.passwordHash = passwordHash
            if keepSession is not None:
                self._pruneRevocations(now)
                others = [
                    digest
                    for digest in self._sessionsByUser.get(username, ())
                    if digest != keepSession
                ]
                for digest in others:
                    self._revoke(digest, "password_changed", now)
                for digest in others:
                    self._dropSession(digest)

        return self._run(work)

    def createSession(
        self, digest: bytes, username: str, now: float, idle: float, maximum: float
    ) -> defer.Deferred[float]:
        """
        Store a new session; when it expires if left idle.  The user's
        sessions that can no longer be used are deleted (not revoked) as we
        go.  Fails with L{IntegrityError} for a digest already stored or an
        unknown account.
        """

        def work() -> float:
            if digest in self._sessions:
                raise IntegrityError("a session with this digest exists")
            if username not in self._accounts:
                raise IntegrityError(f"no account {username!r}")
            expires = now + maximum
            self._sessions[digest] = _Session(
                username, float(now), float(now), float(expires)
            )
            self._sessionsByUser.setdefault(username, {})[digest] = None
            dead = [
                d
                for d in self._sessionsByUser[username]
                if self._sessions[d].expiresAt <= now
                or self._sessions[d].lastUsed + idle <= now
            ]
            for d in dead:
                self._dropSession(d)
            return min(expires, now + idle)

        return self._run(work)

    def useSession(
        self, digest: bytes, now: float, idle: float
    ) -> defer.Deferred[tuple[str, float] | None]:
        """
        The (username, expiry) of a live session, marking it used now; None
        for an unknown, revoked or expired one (an expired one is deleted).
        """

        def work() -> tuple[str, float] | None:
            session = self._sessions.get(digest)
            if session is None:
                return None
            if now >= session.expiresAt or now - session.lastUsed >= idle:
                self._dropSession(digest)
                return None
            session.lastUsed = float(now)
            return session.username, min(session.expiresAt, now + idle)

        return self._run(work)

    def deleteSession(self, digest: bytes, now: float) -> defer.Deferred[bool]:
        """
        Revoke one session (reason C{logged_out}); whether it existed.
        """

        def work() -> bool:
            if digest not in self._sessions:
                return False
            self._dropSession(digest)
            self._pruneRevocations(now)
            self._revoke(digest, "logged_out", now)
            return True

        return self._run(work)

    def refreshSession(
        self, digest: bytes, lastUsed: float, now: float, idle: float
    ) -> defer.Deferred[float | None]:
        """
        A session held open by a connection last active at C{lastUsed}
        (never moving the recorded use back): record that use, and return
        when the session now expires, or None if it has expired (it is then
        deleted) or was revoked.
        """

        def work() -> float | None:
            session = self._sessions.get(digest)
            if session is None:
                return None
            used = max(lastUsed, session.lastUsed)
            if now >= session.expiresAt or now - used >= idle:
                self._dropSession(digest)
                return None
            session.lastUsed = float(used)
            return float(min(session.expiresAt, used + idle))

        return self._run(work)

    def revocationsAfter(
        self, position: int
    ) -> defer.Deferred[list[tuple[int, bytes, str]]]:
        """
        The (position, digest, reason) of sessions revoked after
        C{position}, oldest first, at most 1000 at a time.
        """

        def work() -> list[tuple[int, bytes, str]]:
            start = bisect_right(self._revocations, position, key=_position)
            return [
                (r.position, r.digest, r.reason)
                for r in self._revocations[start : start + REVOCATIONS_READ]
            ]

        return self._run(work)

    def revocationsSince(
        self, at: float
    ) -> defer.Deferred[list[tuple[int, bytes, str]]]:
        """
        The (position, digest, reason) of sessions revoked at C{at} or later
        (at most 1000, the newest), oldest first.
        """

        def work() -> list[tuple[int, bytes, str]]:
            since = [
                (r.position, r.digest, r.reason)
                for r in self._revocations
                if r.at >= at
            ]
            return since[-REVOCATIONS_READ:]

        return self._run(work)

    def lastRevocation(self) -> defer.Deferred[int]:
        """
        The position of the newest revocation kept (0 for none, which is
        also the answer once every revocation has been pruned).
        """
        return self._run(
            lambda: self._revocations[-1].position if self._revocations else 0
        )

    def _dropSession(self, digest: bytes) -> None:
        session = self._sessions.pop(digest)
        mine = self._sessionsByUser[session.username]
        del mine[digest]
        if not mine:
            del self._sessionsByUser[session.username]

    def _revoke(self, digest: bytes, reason: str, now: float) -> None:
        self._lastPosition += 1
        self._revocations.append(
            _Revocation(self._lastPosition, digest, reason, float(now))
        )

    def _pruneRevocations(self, now: float) -> None:
        cutoff = now - REVOCATIONS_KEPT
        # Callers' clocks may disagree, so the old ones need not be a prefix.
        if any(r.at < cutoff for r in self._revocations):
            self._revocations = [r for r in self._revocations if r.at >= cutoff]

    # -- chat -------------------------------------------------------------------

    def lastSeq(self, room: str) -> defer.Deferred[int]:
        """
        The highest C{seq} stored for C{room} (0 for none).
        """
        return self._run(lambda: len(self._rooms.get(room, ())))

    def storeMessages(
        self, messages: Sequence[tuple[str, str, str, str]]
    ) -> defer.Deferred[tuple[list[int], float]]:
        """
        Store (room, sender, text, ts) rows all at once, numbering each with
        the next C{seq} of its room.  Fires with the seqs (in the order of
        C{messages}) and the C{monotonic()} of the commit.  A row with a
        missing (None) field fails the call with L{IntegrityError}, storing
        and numbering nothing.
        """

        def work() -> list[int]:
            rows = list(messages)
            for room, sender, text, ts in rows:
                if room is None or sender is None or text is None or ts is None:
                    raise IntegrityError("a message field is None")
            seqs = []
            for room, sender, text, ts in rows:
                history = self._rooms.setdefault(room, [])
                seq = len(history) + 1
                history.append((seq, sender, text, ts))
                seqs.append(seq)
            return seqs

        d = self._run(work)
        return d.addCallback(lambda seqs: (seqs, self.lastCommit))

    def history(
        self, room: str, after: int, limit: int
    ) -> defer.Deferred[list[HistoryRow]]:
        """
        Up to C{limit} (seq, sender, text, ts) of C{room} after C{after},
        oldest first.
        """

        def work() -> list[HistoryRow]:
            rows = self._rooms.get(room, [])
            start = bisect_right(rows, after, key=_seq)
            end = _limited(limit)
            return rows[start : None if end is None else start + end]

        return self._run(work)

    def recentHistory(self, room: str, limit: int) -> defer.Deferred[list[HistoryRow]]:
        """
        The last C{limit} messages of C{room}, oldest first.
        """

        def work() -> list[HistoryRow]:
            rows = self._rooms.get(room, [])
            count = _limited(limit)
            return rows[max(len(rows) - count, 0) :] if count is not None else rows[:]

        return self._run(work)

    def roomsWithHistory(self, limit: int) -> defer.Deferred[list[str]]:
        """
        The first C{limit} names (in code point order, SQLite's binary
        order of UTF-8) of rooms that have history.
        """
        return self._run(lambda: sorted(self._rooms)[: _limited(limit)])

    def integrityCheck(self) -> defer.Deferred[str]:
        """
        C{"ok"}: there is no file to check.
        """
        return self._run(lambda: "ok")
