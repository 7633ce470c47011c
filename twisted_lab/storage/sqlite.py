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

from twisted.enterprise import adbapi
from twisted.internet import defer
from zope.interface import implementer

from twisted_lab.ports import IStore
from twisted_lab.storage.pooled import Engine, PooledStore, migrate

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
    (
        2,
        (
            """
            CREATE TABLE accounts (
                username TEXT PRIMARY KEY,
                password_hash TEXT NOT NULL,
                created_at REAL NOT NULL
            )
            """,
            """
            CREATE TABLE sessions (
                token_digest BLOB PRIMARY KEY,
                username TEXT NOT NULL
                    REFERENCES accounts (username) ON DELETE CASCADE,
                created_at REAL NOT NULL,
                last_used REAL NOT NULL,
                expires_at REAL NOT NULL
            )
            """,
            "CREATE INDEX sessions_by_user ON sessions (username)",
        ),
    ),
    (
        3,
        (
            """
            CREATE TABLE chat_messages (
                room TEXT NOT NULL,
                seq INTEGER NOT NULL,
                sender TEXT NOT NULL,
                text TEXT NOT NULL,
                ts TEXT NOT NULL,
                PRIMARY KEY (room, seq)
            ) WITHOUT ROWID
            """,
        ),
    ),
    (
        4,
        (
            # Sessions ended by logout or a password change, for every
            # server sharing the file to end the connections that use them
            # (see twisted_lab.client.sessions); kept an hour, read by position.
            """
            CREATE TABLE revocations (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                token_digest BLOB NOT NULL,
                reason TEXT NOT NULL,
                at REAL NOT NULL
            )
            """,
        ),
    ),
    (
        5,
        (
            # Each room's last seq, so that the transaction that stores a
            # message also numbers it: any number of writers (processes,
            # nodes) stay gap-free.
            """
            CREATE TABLE chat_rooms (
                room TEXT PRIMARY KEY,
                last_seq INTEGER NOT NULL
            )
            """,
            """
            INSERT INTO chat_rooms (room, last_seq)
            SELECT room, MAX(seq) FROM chat_messages GROUP BY room
            """,
        ),
    ),
)

#: Seconds a revocation stays readable by other servers.
REVOCATIONS_KEPT = 3600.0

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
    return migrate(cursor, migrations, "?")


def _inTransaction(
    connection: sqlite3.Connection,
    work: Callable[..., T],
    args: Sequence[Any],
    kwargs: dict[str, Any],
) -> T:
    """
    The L{twisted_lab.storage.pooled.TransactionRunner} of SQLite:
    C{BEGIN IMMEDIATE} takes the write lock at once, so a transaction that
    reads and then writes never finds the file changed under it.
    """
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


def _createAccount(
    cursor: sqlite3.Cursor, username: str, passwordHash: str, now: float
) -> bool:
    try:
        cursor.execute(
            "INSERT INTO accounts (username, password_hash, created_at) "
            "VALUES (?, ?, ?)",
            (username, passwordHash, now),
        )
    except sqlite3.IntegrityError:
        return False
    return True


def _passwordHash(cursor: sqlite3.Cursor, username: str) -> str | None:
    row = cursor.execute(
        "SELECT password_hash FROM accounts WHERE username = ?", (username,)
    ).fetchone()
    return None if row is None else str(row[0])


def _setPasswordHash(
    cursor: sqlite3.Cursor,
    username: str,
    passwordHash: str,
    keep: bytes | None,
    now: float,
) -> None:
    cursor.execute(
        "UPDATE accounts SET password_hash = ? WHERE username = ?",
        (passwordHash, username),
    )
    if keep is not None:
        _pruneRevocations(cursor, now)
        cursor.execute(
            "INSERT INTO revocations (token_digest, reason, at) "
            "SELECT token_digest, 'password_changed', ? FROM sessions "
            "WHERE username = ? AND token_digest != ?",
            (now, username, keep),
        )
        cursor.execute(
            "DELETE FROM sessions WHERE username = ? AND token_digest != ?",
            (username, keep),
        )


def _pruneRevocations(cursor: sqlite3.Cursor, now: float) -> None:
    cursor.execute("DELETE FROM revocations WHERE at < ?", (now - REVOCATIONS_KEPT,))


def _createSession(
    cursor: sqlite3.Cursor,
    digest: bytes,
    username: str,
    now: float,
    idle: float,
    maximum: float,
) -> float:
    expires = now + maximum
    cursor.execute(
        "INSERT INTO sessions (token_digest, username, created_at, last_used, "
        "expires_at) VALUES (?, ?, ?, ?, ?)",
        (digest, username, now, now, expires),
    )
    # Sessions that can no longer be used are cleaned up as we go.
    cursor.execute(
        "DELETE FROM sessions WHERE username = ? AND "
        "(expires_at <= ? OR last_used + ? <= ?)",
        (username, now, idle, now),
    )
    return min(expires, now + idle)


def _useSession(
    cursor: sqlite3.Cursor, digest: bytes, now: float, idle: float
) -> tuple[str, float] | None:
    row = cursor.execute(
        "SELECT username, last_used, expires_at FROM sessions WHERE token_digest = ?",
        (digest,),
    ).fetchone()
    if row is None:
        return None
    username, lastUsed, expiresAt = row
    if now >= expiresAt or now - lastUsed >= idle:
        cursor.execute("DELETE FROM sessions WHERE token_digest = ?", (digest,))
        return None
    cursor.execute(
        "UPDATE sessions SET last_used = ? WHERE token_digest = ?", (now, digest)
    )
    return str(username), min(expiresAt, now + idle)


def _deleteSession(cursor: sqlite3.Cursor, digest: bytes, now: float) -> bool:
    cursor.execute("DELETE FROM sessions WHERE token_digest = ?", (digest,))
    if cursor.rowcount == 0:
        return False
    _pruneRevocations(cursor, now)
    cursor.execute(
        "INSERT INTO revocations (token_digest, reason, at) "
        "VALUES (?, 'logged_out', ?)",
        (digest, now),
    )
    return True


def _refreshSession(
    cursor: sqlite3.Cursor, digest: bytes, lastUsed: float, now: float, idle: float
) -> float | None:
    row = cursor.execute(
        "SELECT last_used, expires_at FROM sessions WHERE token_digest = ?",
        (digest,),
    ).fetchone()
    if row is None:
        return None
    lastUsed = max(lastUsed, row[0])
    expiresAt = row[1]
    if now >= expiresAt or now - lastUsed >= idle:
        cursor.execute("DELETE FROM sessions WHERE token_digest = ?", (digest,))
        return None
    cursor.execute(
        "UPDATE sessions SET last_used = ? WHERE token_digest = ?", (lastUsed, digest)
    )
    return float(min(expiresAt, lastUsed + idle))


def _revocationsAfter(
    cursor: sqlite3.Cursor, position: int
) -> list[tuple[int, bytes, str]]:
    return [
        (int(i), bytes(d), str(r))
        for i, d, r in cursor.execute(
            "SELECT id, token_digest, reason FROM revocations WHERE id > ? "
            "ORDER BY id LIMIT 1000",
            (position,),
        )
    ]


def _lastRevocation(cursor: sqlite3.Cursor) -> int:
    row = cursor.execute("SELECT COALESCE(MAX(id), 0) FROM revocations").fetchone()
    return int(row[0])


def _lastSeq(cursor: sqlite3.Cursor, room: str) -> int:
    row = cursor.execute(
        "SELECT last_seq FROM chat_rooms WHERE room = ?", (room,)
    ).fetchone()
    return int(row[0]) if row else 0


def _storeMessages(
    cursor: sqlite3.Cursor, messages: Sequence[tuple[str, str, str, str]]
) -> list[int]:
    counts: dict[str, int] = {}
    for room, _, _, _ in messages:
        counts[room] = counts.get(room, 0) + 1
    next: dict[str, int] = {}
    for room, count in counts.items():
        cursor.execute(
            "INSERT INTO chat_rooms (room, last_seq) VALUES (?, 0) "
            "ON CONFLICT (room) DO NOTHING",
            (room,),
        )
        (last,) = cursor.execute(
            "UPDATE chat_rooms SET last_seq = last_seq + ? WHERE room = ? "
            "RETURNING last_seq",
            (count, room),
        ).fetchone()
        next[room] = last - count + 1
    seqs = []
    rows = []
    for room, sender, text, ts in messages:
        seq = next[room]
        next[room] = seq + 1
        seqs.append(seq)
        rows.append((room, seq, sender, text, ts))
    cursor.executemany(
        "INSERT INTO chat_messages (room, seq, sender, text, ts) "
        "VALUES (?, ?, ?, ?, ?)",
        rows,
    )
    return seqs


def _history(
    cursor: sqlite3.Cursor, room: str, after: int, limit: int
) -> list[tuple[int, str, str, str]]:
    return cursor.execute(
        "SELECT seq, sender, text, ts FROM chat_messages "
        "WHERE room = ? AND seq > ? ORDER BY seq LIMIT ?",
        (room, after, limit),
    ).fetchall()


def _recentHistory(
    cursor: sqlite3.Cursor, room: str, limit: int
) -> list[tuple[int, str, str, str]]:
    rows = cursor.execute(
        "SELECT seq, sender, text, ts FROM chat_messages "
        "WHERE room = ? ORDER BY seq DESC LIMIT ?",
        (room, limit),
    ).fetchall()
    rows.reverse()
    return rows


def _revocationsSince(
    cursor: sqlite3.Cursor, at: float
) -> list[tuple[int, bytes, str]]:
    rows = cursor.execute(
        "SELECT id, token_digest, reason FROM revocations WHERE at >= ? "
        "ORDER BY id DESC LIMIT 1000",
        (at,),
    ).fetchall()
    return [(int(i), bytes(d), str(r)) for i, d, r in reversed(rows)]


def _roomsWithHistory(cursor: sqlite3.Cursor, limit: int) -> list[str]:
    return [
        str(row[0])
        for row in cursor.execute(
            "WITH RECURSIVE rooms (room) AS ("
            " SELECT MIN(room) FROM chat_messages"
            " UNION ALL"
            " SELECT (SELECT MIN(room) FROM chat_messages WHERE room > rooms.room)"
            " FROM rooms WHERE rooms.room IS NOT NULL"
            ") SELECT room FROM rooms WHERE room IS NOT NULL LIMIT ?",
            (limit,),
        )
    ]


@implementer(IStore)
class Store(PooledStore):
    """
    The database, reached only through Deferreds.

    Construct it, C{yield store.open()}, use it, C{store.close()}.  Each
    transaction is a C{BEGIN IMMEDIATE} ... C{COMMIT} on the one
    connection; its cursor is a L{sqlite3.Cursor} (C{?} parameters).
    """

    engine = Engine(
        inTransaction=_inTransaction,
        visit=_visit,
        nameAddress=_nameAddress,
        forgetAddress=_forgetAddress,
        createAccount=_createAccount,
        passwordHash=_passwordHash,
        setPasswordHash=_setPasswordHash,
        createSession=_createSession,
        useSession=_useSession,
        deleteSession=_deleteSession,
        refreshSession=_refreshSession,
        revocationsAfter=_revocationsAfter,
        revocationsSince=_revocationsSince,
        lastRevocation=_lastRevocation,
        lastSeq=_lastSeq,
        storeMessages=_storeMessages,
        history=_history,
        recentHistory=_recentHistory,
        roomsWithHistory=_roomsWithHistory,
    )

    def __init__(
        self,
        path: str = DEFAULT_PATH,
        migrations: Sequence[tuple[int, Sequence[str]]] = MIGRATIONS,
    ) -> None:
        super().__init__(path, migrations)

    def prepare(self) -> None:
        """
        Create (mode 0600) and migrate the database file now, blocking:
        called once as the server starts, before the reactor runs, so a
        file that cannot be opened or has a newer schema stops the start
        with a clear error instead of failing every request later.
        """
        if self.path != ":memory:":
            createPrivateFile(self.path)
        connection = sqlite3.connect(self.path, isolation_level=None)
        try:
            _configure(connection)
            _inTransaction(connection, applyMigrations, (self.migrations,), {})
        finally:
            connection.close()

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

    def integrityCheck(self) -> defer.Deferred[str]:
        """
        SQLite's own verdict on the file (C{"ok"} when sound).
        """
        return self.transaction(
            lambda cursor: cursor.execute("PRAGMA integrity_check").fetchone()[0]
        )
