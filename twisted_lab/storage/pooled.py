"""
What the SQL stores share: an L{IStore} reached through
L{twisted.enterprise.adbapi}, each method one transaction in a database
thread.

L{PooledStore} holds the transaction plumbing (the pool, the timing for
C{--metrics}, C{lastCommit}) and every method of the store, once.  Each
engine (L{twisted_lab.storage.sqlite}, L{twisted_lab.storage.postgres})
subclasses it and supplies an L{Engine}: how it runs a transaction, and its
SQL function for each method, written in its own dialect.  Opening the
pool, migrating and L{integrityCheck<twisted_lab.ports.IStore.integrityCheck>}
stay with the engine.

This module does not import the reactor.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar

from twisted.enterprise import adbapi
from twisted.internet import defer
from twisted.logger import Logger

T = TypeVar("T")

#: (version, statements): an engine's migrations, applied in order.
Migrations = Sequence[tuple[int, Sequence[str]]]


class TransactionRunner(Protocol):
    """
    Run C{work(cursor, *args, **kwargs)} on a DB-API C{connection} inside
    one transaction of the engine's (rolled back if C{work} raises), in the
    database thread; C{work}'s result, once committed.
    """

    def __call__(
        self,
        connection: Any,
        work: Callable[..., T],
        args: Sequence[Any],
        kwargs: dict[str, Any],
        /,
    ) -> T: ...


@dataclass(frozen=True)
class Engine:
    """
    What an engine gives L{PooledStore}: its transaction runner, and the
    function behind each method of the store of the same name.  Each
    function runs inside one transaction, called with the engine's cursor
    and the method's arguments, and returns what the method fires with.
    """

    inTransaction: TransactionRunner

    # identities
    visit: Callable[[Any, str, str], tuple[str, int] | None]
    nameAddress: Callable[[Any, str, str, str], int]
    forgetAddress: Callable[[Any, str], bool]

    # accounts and sessions
    createAccount: Callable[[Any, str, str, float], bool]
    passwordHash: Callable[[Any, str], str | None]
    setPasswordHash: Callable[[Any, str, str, bytes | None, float], None]
    createSession: Callable[[Any, bytes, str, float, float, float], float]
    useSession: Callable[[Any, bytes, float, float], tuple[str, float] | None]
    deleteSession: Callable[[Any, bytes, float], bool]
    refreshSession: Callable[[Any, bytes, float, float, float], float | None]
    revocationsAfter: Callable[[Any, int], list[tuple[int, bytes, str]]]
    revocationsSince: Callable[[Any, float], list[tuple[int, bytes, str]]]
    lastRevocation: Callable[[Any], int]

    # chat
    lastSeq: Callable[[Any, str], int]
    storeMessages: Callable[[Any, Sequence[tuple[str, str, str, str]]], list[int]]
    history: Callable[[Any, str, int, int], list[tuple[int, str, str, str]]]
    recentHistory: Callable[[Any, str, int], list[tuple[int, str, str, str]]]
    roomsWithHistory: Callable[[Any, int], list[str]]


def _timedTransaction(
    connection: Any,
    inTransaction: TransactionRunner,
    work: Callable[..., T],
    args: Sequence[Any],
    kwargs: dict[str, Any],
) -> tuple[T, float, float]:
    started = time.monotonic()
    result = inTransaction(connection, work, args, kwargs)
    return result, started, time.monotonic()


class PooledStore:
    """
    A database reached only through Deferreds, through an adbapi pool that
    the engine's subclass starts (in its C{open}).

    Subclasses set L{engine} and provide C{prepare}, C{open} and
    C{integrityCheck}.
    """

    log = Logger()

    #: The engine's transaction runner and SQL functions.
    engine: ClassVar[Engine]

    def __init__(self, path: str, migrations: Migrations) -> None:
        self.path = path
        self.migrations = migrations
        self.pool: adbapi.ConnectionPool | None = None
        self.version = 0
        #: Called (on the reactor thread) with the seconds each committed
        #: transaction took in the database thread (for --metrics).
        self.onTransaction: Callable[[float], object] | None = None
        #: The time.monotonic() at which the last transaction committed.
        self.lastCommit = 0.0

    def close(self) -> None:
        """
        Finish the queued work and close the connections.
        """
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def transaction(
        self, work: Callable[..., T], *args: Any, **kwargs: Any
    ) -> defer.Deferred[T]:
        """
        Run C{work(cursor, *args, **kwargs)} in a database thread inside one
        transaction, begun and committed by the engine's
        L{Engine.inTransaction} (rolled back if C{work} raises); C{cursor}
        is the engine's driver's, with its parameter style.  The result
        fires after the commit.
        """
        if self.pool is None:
            return defer.fail(RuntimeError("the store is not open"))
        d = self.pool.runWithConnection(
            _timedTransaction, self.engine.inTransaction, work, args, kwargs
        )
        return d.addCallback(self._committed)

    def _committed(self, outcome: tuple[T, float, float]) -> T:
        result, started, committed = outcome
        self.lastCommit = committed
        if self.onTransaction is not None:
            self.onTransaction(committed - started)
        return result

    # -- identities -----------------------------------------------------------

    def visit(self, address: str, now: str) -> defer.Deferred[tuple[str, int] | None]:
        """
        A connection from C{address}: if it is known, count the visit and
        return (name, visits); else L{None}.
        """
        return self.transaction(self.engine.visit, address, now)

    def nameAddress(self, address: str, name: str, now: str) -> defer.Deferred[int]:
        """
        Store (or change) the name of C{address}; its visit count.
        """
        return self.transaction(self.engine.nameAddress, address, name, now)

    def forgetAddress(self, address: str) -> defer.Deferred[bool]:
        """
        Forget C{address}; whether it was known.
        """
        return self.transaction(self.engine.forgetAddress, address)

    # -- accounts and sessions --------------------------------------------------

    def createAccount(
        self, username: str, passwordHash: str, now: float
    ) -> defer.Deferred[bool]:
        """
        Create an account; False if the username is taken.  The unique
        constraint decides, so of two concurrent registrations of one name
        exactly one succeeds.
        """
        return self.transaction(self.engine.createAccount, username, passwordHash, now)

    def passwordHash(self, username: str) -> defer.Deferred[str | None]:
        """
        The stored hash of C{username}, or None if there is no such account.
        """
        return self.transaction(self.engine.passwordHash, username)

    def setPasswordHash(
        self,
        username: str,
        passwordHash: str,
        keepSession: bytes | None = None,
        now: float = 0.0,
    ) -> defer.Deferred[None]:
        """
        Replace the hash of C{username}.  With C{keepSession}, every other
        session of the user is revoked in the same transaction.
        """
        return self.transaction(
            self.engine.setPasswordHash, username, passwordHash, keepSession, now
        )

    def createSession(
        self, digest: bytes, username: str, now: float, idle: float, maximum: float
    ) -> defer.Deferred[float]:
        """
        Store a new session; when it expires if left idle.
        """
        return self.transaction(
            self.engine.createSession, digest, username, now, idle, maximum
        )

    def useSession(
        self, digest: bytes, now: float, idle: float
    ) -> defer.Deferred[tuple[str, float] | None]:
        """
        The (username, expiry) of a live session, marking it used now; None
        for an unknown, revoked or expired one (an expired one is deleted).
        """
        return self.transaction(self.engine.useSession, digest, now, idle)

    def deleteSession(self, digest: bytes, now: float) -> defer.Deferred[bool]:
        """
        Revoke one session (logout); whether it existed.
        """
        return self.transaction(self.engine.deleteSession, digest, now)

    def refreshSession(
        self, digest: bytes, lastUsed: float, now: float, idle: float
    ) -> defer.Deferred[float | None]:
        """
        A session held open by a connection that was last active at
        C{lastUsed}: record that use, and return when the session now
        expires, or None if it has expired or was revoked.
        """
        return self.transaction(self.engine.refreshSession, digest, lastUsed, now, idle)

    def revocationsAfter(
        self, position: int
    ) -> defer.Deferred[list[tuple[int, bytes, str]]]:
        """
        The (position, digest, reason) of sessions revoked after
        C{position}, oldest first, at most 1000 at a time.
        """
        return self.transaction(self.engine.revocationsAfter, position)

    def revocationsSince(
        self, at: float
    ) -> defer.Deferred[list[tuple[int, bytes, str]]]:
        """
        The (position, digest, reason) of sessions revoked at C{at} or later
        (at most 1000, the newest): what a server that starts watching
        sessions may have missed.
        """
        return self.transaction(self.engine.revocationsSince, at)

    def lastRevocation(self) -> defer.Deferred[int]:
        """
        The position of the newest revocation (0 for none): where a server
        that starts now begins to read them.
        """
        return self.transaction(self.engine.lastRevocation)

    # -- chat -------------------------------------------------------------------

    def lastSeq(self, room: str) -> defer.Deferred[int]:
        """
        The highest C{seq} stored for C{room} (0 for none).
        """
        return self.transaction(self.engine.lastSeq, room)

    def storeMessages(
        self, messages: Sequence[tuple[str, str, str, str]]
    ) -> defer.Deferred[tuple[list[int], float]]:
        """
        Store (room, sender, text, ts) rows in one transaction (the group
        commit of every message of one reactor turn), numbering each with
        the next C{seq} of its room inside that transaction.  Fires with
        the seqs (in the order of C{messages}) and the C{time.monotonic()}
        of the commit.
        """
        d = self.transaction(self.engine.storeMessages, messages)
        return d.addCallback(lambda seqs: (seqs, self.lastCommit))

    def history(
        self, room: str, after: int, limit: int
    ) -> defer.Deferred[list[tuple[int, str, str, str]]]:
        """
        Up to C{limit} (seq, sender, text, ts) of C{room} after C{after},
        oldest first.
        """
        return self.transaction(self.engine.history, room, after, limit)

    def recentHistory(
        self, room: str, limit: int
    ) -> defer.Deferred[list[tuple[int, str, str, str]]]:
        """
        The last C{limit} messages of C{room}, oldest first.
        """
        return self.transaction(self.engine.recentHistory, room, limit)

    def roomsWithHistory(self, limit: int) -> defer.Deferred[list[str]]:
        """
        The first C{limit} names (in bytewise order) of rooms that have
        history, found by skipping from room to room along the primary
        key: the cost grows with the number of rooms, not of messages.
        """
        return self.transaction(self.engine.roomsWithHistory, limit)


def migrate(
    cursor: Any, migrations: Sequence[tuple[int, Sequence[str]]], placeholder: str
) -> int:
    """
    Bring the database behind C{cursor} up to the newest version in
    C{migrations} (each engine's own list), inside the caller's
    transaction; the version it is at afterwards.  C{placeholder} is the
    engine's parameter marker (C{?} or C{%s}).  A database newer than this
    program is refused, never touched.
    """
    cursor.execute(
        "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"
    )
    cursor.execute("SELECT version FROM schema_version")
    row = cursor.fetchone()
    current = int(row[0]) if row else 0
    if row is None:
        cursor.execute("INSERT INTO schema_version (version) VALUES (0)")
    newest = max((v for v, _ in migrations), default=0)
    if current > newest:
        raise RuntimeError(
            f"database schema version {current} is newer than this program knows "
            f"({newest}); refusing to touch it"
        )
    for version, statements in migrations:
        if version <= current:
            continue
        for statement in statements:
            cursor.execute(statement)
        cursor.execute(
            f"UPDATE schema_version SET version = {placeholder}",  # noqa: S608
            (version,),
        )
        current = version
    return current
