"""
The SQLite store every stateful netlab service uses; nothing else writes SQL.

  - Real SQLite in one file (default C{netlab.sqlite3}), created with mode
    0600, in WAL mode with C{synchronous=FULL}: a reply that says something
    was stored is sent only after the transaction committed, so neither a
    crash nor a SIGKILL can take it back.
  - All database work runs off the reactor thread, through
    L{twisted.enterprise.adbapi} with exactly one connection
    (C{cp_min = cp_max = 1}: several SQLite connections in one pool only
    fight over the write lock, "database is locked").  One connection also
    means one writer, so transactions never interleave.
  - Parameterised queries only; nothing stored is ever evaluated.
  - A C{schema_version} table and the L{MIGRATIONS} list: every start
    applies the migrations a file has not seen yet, in one transaction each,
    so later features add tables without breaking existing files.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from twisted.application.service import Service
from twisted.enterprise import adbapi
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

DEFAULT_PATH = "netlab.sqlite3"

T = TypeVar("T")

#: (version, statements): applied in order to bring a file up to date.
#: Append new versions; never edit one that has shipped.
MIGRATIONS: Sequence[tuple[int, Sequence[str]]] = (
    (
        1,
        (
            """
            CREATE TABLE identities (
                address TEXT PRIMARY KEY,
                name TEXT NOT NULL,
                visits INTEGER NOT NULL DEFAULT 1,
                first_seen TEXT NOT NULL,
                last_seen TEXT NOT NULL
            )
            """,
        ),
    ),
)

LATEST_VERSION = MIGRATIONS[-1][0]


def createPrivateFile(path: str) -> None:
    """
    Make sure C{path} exists with mode 0600 before SQLite opens it (SQLite
    would create it with the umask, readable by everyone; its -wal and -shm
    files take the database file's permissions).
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)


def _configure(connection: sqlite3.Connection) -> None:
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")
    connection.execute("PRAGMA foreign_keys=ON")
    connection.execute("PRAGMA busy_timeout=5000")


def applyMigrations(
    cursor: Any, migrations: Sequence[tuple[int, Sequence[str]]]
) -> int:
    """
    Bring the database up to the newest version in C{migrations}; the
    version it is at afterwards.  Runs inside one transaction.
    """
    cursor.execute(
        "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"
    )
    cursor.execute("SELECT version FROM schema_version")
    row = cursor.fetchone()
    current = row[0] if row else 0
    if row is None:
        cursor.execute("INSERT INTO schema_version (version) VALUES (0)")
    newest = max((v for v, _ in migrations), default=0)
    if current > newest:
        raise RuntimeError(
            f"the database is at schema version {current}, newer than this "
            f"program knows ({newest}); refusing to touch it"
        )
    for version, statements in migrations:
        if version <= current:
            continue
        for statement in statements:
            cursor.execute(statement)
        cursor.execute("UPDATE schema_version SET version = ?", (version,))
        current = version
    return current


class Store:
    """
    The database, reached only through Deferreds.

    Construct it, C{yield store.open()}, use it, C{store.close()}.
    """

    log = Logger()

    def __init__(
        self,
        path: str = DEFAULT_PATH,
        migrations: Sequence[tuple[int, Sequence[str]]] = MIGRATIONS,
    ) -> None:
        self.path = path
        self.migrations = migrations
        self.pool: adbapi.ConnectionPool | None = None
        self.version = 0

    async def open(self) -> Store:
        """
        Open (creating if needed) and migrate the database.
        """
        if self.path != ":memory:":
            createPrivateFile(self.path)
        self.pool = adbapi.ConnectionPool(
            "sqlite3",
            self.path,
            check_same_thread=False,
            isolation_level=None,  # we say BEGIN and COMMIT ourselves
            cp_min=1,
            cp_max=1,
            cp_openfun=_configure,
            cp_noisy=False,
        )
        self.pool.start()
        try:
            self.version = await self.transaction(applyMigrations, self.migrations)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """
        Finish the queued work and close the connection.
        """
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def transaction(
        self, work: Callable[..., T], *args: Any, **kwargs: Any
    ) -> defer.Deferred[T]:
        """
        Run C{work(cursor, *args, **kwargs)} in the database thread inside
        one C{BEGIN IMMEDIATE} ... C{COMMIT} transaction (rolled back if it
        raises).  The result fires after the commit.
        """
        if self.pool is None:
            return defer.fail(RuntimeError("the store is not open"))
        return self.pool.runWithConnection(_inTransaction, work, args, kwargs)

    # -- identities -----------------------------------------------------------

    def visit(self, address: str, now: str) -> defer.Deferred[tuple[str, int] | None]:
        """
        A connection from C{address}: if it is known, count the visit and
        return (name, visits); else L{None}.
        """
        return self.transaction(_visit, address, now)

    def nameAddress(self, address: str, name: str, now: str) -> defer.Deferred[int]:
        """
        Store (or change) the name of C{address}; its visit count.
        """
        return self.transaction(_nameAddress, address, name, now)

    def forgetAddress(self, address: str) -> defer.Deferred[bool]:
        """
        Forget C{address}; whether it was known.
        """
        return self.transaction(_forgetAddress, address)

    def integrityCheck(self) -> defer.Deferred[str]:
        """
        SQLite's own verdict on the file (C{"ok"} when sound).
        """
        return self.transaction(
            lambda cursor: cursor.execute("PRAGMA integrity_check").fetchone()[0]
        )


class StoreService(Service):
    """
    Opens the store when the application starts and closes it when it
    stops.  Put it before the servers that use it in an
    L{twisted_lab.server.OrderedServices}, so it closes after them.

    A store that cannot be opened (a newer schema, an unreadable file) is
    logged and stops the program: serving without a store would answer
    every request with an error.
    """

    log = Logger()

    def __init__(self, store: Store, reactor: Any = None) -> None:
        self.store = store
        self._reactor = reactor
        self.opened: defer.Deferred[Store] | None = None

    def startService(self) -> None:
        Service.startService(self)
        self.opened = defer.ensureDeferred(self.store.open())
        self.opened.addErrback(self._cannotOpen)

    def _cannotOpen(self, failure: Failure) -> None:
        self.log.critical(
            "cannot open the database {path}: {reason}",
            event="store_failed",
            path=self.store.path,
            reason=failure.getErrorMessage(),
        )
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor
        reactor.callWhenRunning(reactor.stop)

    def stopService(self) -> None:
        Service.stopService(self)
        self.store.close()


def _inTransaction(
    connection: sqlite3.Connection,
    work: Callable[..., T],
    args: Sequence[Any],
    kwargs: dict[str, Any],
) -> T:
    cursor = connection.cursor()
    cursor.execute("BEGIN IMMEDIATE")
    try:
        result = work(cursor, *args, **kwargs)
    except BaseException:
        cursor.execute("ROLLBACK")
        raise
    cursor.execute("COMMIT")
    return result


def _visit(cursor: sqlite3.Cursor, address: str, now: str) -> tuple[str, int] | None:
    row = cursor.execute(
        "UPDATE identities SET visits = visits + 1, last_seen = ? "
        "WHERE address = ? RETURNING name, visits",
        (now, address),
    ).fetchone()
    return None if row is None else (row[0], row[1])


def _nameAddress(cursor: sqlite3.Cursor, address: str, name: str, now: str) -> int:
    row = cursor.execute(
        "INSERT INTO identities (address, name, visits, first_seen, last_seen) "
        "VALUES (?, ?, 1, ?, ?) "
        "ON CONFLICT (address) DO UPDATE SET name = excluded.name, "
        "last_seen = excluded.last_seen RETURNING visits",
        (address, name, now, now),
    ).fetchone()
    return int(row[0])


def _forgetAddress(cursor: sqlite3.Cursor, address: str) -> bool:
    cursor.execute("DELETE FROM identities WHERE address = ?", (address,))
    return cursor.rowcount > 0
