"""
The PostgreSQL store: the same data and the same answers as the SQLite
store (L{twisted_lab.storage.sqlite}), in a database that several netlab
processes ("nodes") share.

  - Reached through L{twisted.enterprise.adbapi} and psycopg 3, with a real
    pool (one connection per pool thread, at most L{POOL_MAX}).  A
    connection the server dropped (a restart, a failover, an idle timeout)
    is replaced: a transaction that finds its connection dead before it
    began connects again and runs; one that loses it midway fails (and, as
    with any database, a commit whose answer was lost may have been
    applied), and the next one connects again.  While the server is down
    each request fails (within L{CONNECT_TIMEOUT} at most); none is held
    until it returns.
  - Each transaction is an explicit C{BEGIN ISOLATION LEVEL READ COMMITTED}
    ... C{COMMIT} (the connections are in autocommit mode, so nothing else
    opens transactions behind the store's back).  READ COMMITTED plus the
    locks below gives what the SQLite store's one writer gives:
      * createAccount: C{INSERT ... ON CONFLICT DO NOTHING}; the unique
        index decides, so of two concurrent registrations of one name
        exactly one succeeds (the second waits for the first to commit).
      * useSession, refreshSession: the session row is read C{FOR UPDATE},
        so a concurrent logout or password change either comes first (the
        session is gone) or waits for the use to commit.
      * setPasswordHash: the other sessions are deleted and logged as
        revoked by one statement (C{DELETE ... RETURNING} feeding the
        C{INSERT}), so no session is deleted without being logged.
      * storeMessages: a room's C{seq} is given out by C{UPDATE chat_rooms
        SET last_seq = last_seq + n ... RETURNING}, which locks the room's
        row until the commit: writers from any number of processes stay
        gap-free and unique, and a room's messages commit in C{seq} order.
        Rooms are locked in sorted order, so two writers never deadlock.
      * Revocation positions: an C{id} from a sequence is taken when the
        row is inserted, not when it commits, so two revocations could
        commit out of order, and a server that read "after 6" before 5
        committed would never see 5.  Every transaction that appends to
        the log first takes a transaction-level advisory lock
        (L{REVOCATION_LOCK}), held until its commit: positions are taken
        and committed one transaction after the other, so a reader that
        sees position N also sees every committed position below it.
  - Migrations (L{MIGRATIONS}, their own list; the same logical schema and
    version numbers as SQLite's) run in one transaction under
    C{pg_advisory_xact_lock(MIGRATION_LOCK)}: many nodes starting at once
    on an empty database migrate it exactly once.
  - Times are C{double precision} (SQLite's REAL).  The strings the store
    hands back as it was given them (an identity's name; a chat message's
    sender, text and ts) are kept as UTF-8 in C{bytea}: PostgreSQL's
    C{text} cannot hold U+0000, and the SQLite store keeps any string
    exactly.  Keys stay C{text} (addresses, usernames, rooms, readable in
    psql); room names sort bytewise (C{COLLATE "C"}), as in SQLite.
    A lone surrogate, which SQLite cannot store either, is refused.
  - The URL's password is never logged nor put in an error message:
    L{redactURL} is what the store says about where it is.

This module does not import the reactor; adbapi takes the global one when
the pool is made (or the one given as C{reactor}).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import psycopg
from twisted.enterprise import adbapi
from twisted.internet import defer
from zope.interface import implementer

from twisted_lab.ports import IStore
from twisted_lab.storage.pooled import Engine, PooledStore, migrate

T = TypeVar("T")

#: The URL schemes this store serves (libpq accepts both).
SCHEMES = ("postgresql://", "postgres://")

#: Connections per store (per node): the pool's threads, one connection each.
POOL_MIN = 1
POOL_MAX = 5

#: Seconds to wait for the server when connecting (unless the URL says).
CONNECT_TIMEOUT = 10

#: Advisory lock keys (bigint; per database): "netlab" and a number.
MIGRATION_LOCK = 0x6E65746C61620001
REVOCATION_LOCK = 0x6E65746C61620002

#: Seconds a revocation stays readable by other servers (as in SQLite).
REVOCATIONS_KEPT = 3600.0

BEGIN = "BEGIN ISOLATION LEVEL READ COMMITTED"

#: (version, statements): applied in order to bring a database up to date.
#: Append new versions; never edit one that has shipped.  The versions
#: match the SQLite store's: version N is the same logical schema.
MIGRATIONS: Sequence[tuple[int, Sequence[str]]] = (
    (
        1,
        (
            """
            CREATE TABLE identities (
                address TEXT PRIMARY KEY,
                name BYTEA NOT NULL,
                visits BIGINT NOT NULL DEFAULT 1,
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
                created_at DOUBLE PRECISION NOT NULL
            )
            """,
            """
            CREATE TABLE sessions (
                token_digest BYTEA PRIMARY KEY,
                username TEXT NOT NULL
                    REFERENCES accounts (username) ON DELETE CASCADE,
                created_at DOUBLE PRECISION NOT NULL,
                last_used DOUBLE PRECISION NOT NULL,
                expires_at DOUBLE PRECISION NOT NULL
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
                room TEXT COLLATE "C" NOT NULL,
                seq BIGINT NOT NULL,
                sender BYTEA NOT NULL,
                text BYTEA NOT NULL,
                ts BYTEA NOT NULL,
                PRIMARY KEY (room, seq)
            )
            """,
        ),
    ),
    (
        4,
        (
            # Sessions ended by logout or a password change, read by
            # position by every server sharing the database; kept an hour.
            """
            CREATE TABLE revocations (
                id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                token_digest BYTEA NOT NULL,
                reason TEXT NOT NULL,
                at DOUBLE PRECISION NOT NULL
            )
            """,
            "CREATE INDEX revocations_by_time ON revocations (at)",
        ),
    ),
    (
        5,
        (
            # Each room's last seq, given out in the storing transaction.
            """
            CREATE TABLE chat_rooms (
                room TEXT COLLATE "C" PRIMARY KEY,
                last_seq BIGINT NOT NULL
            )
            """,
            """
            INSERT INTO chat_rooms (room, last_seq)
            SELECT room, MAX(seq) FROM chat_messages GROUP BY room
            """,
        ),
    ),
)

LATEST_VERSION = MIGRATIONS[-1][0]


class DatabaseUnavailable(RuntimeError):
    """
    The database cannot be reached or prepared (the message names it
    without its password).
    """


def isPostgresURL(db: str) -> bool:
    """
    Whether C{db} names a PostgreSQL database (rather than a SQLite file).
    """
    return db.startswith(SCHEMES)


def _password(url: str) -> str | None:
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    if password is None:
        match = re.search(r"[?&]password=([^&#]*)", url)
        password = match.group(1) if match else None
    return password


def redactURL(url: str) -> str:
    """
    C{url} with its password (in the user part or as a C{password=} query
    parameter) replaced by C{***}: what logs and error messages show.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    # The last "@" before the query ends the user part, even when the
    # password holds a "/" that should have been written %2F.
    path, mark, query = rest.partition("?")
    userinfo, at, hosts = path.rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    query = re.sub(r"(^|&)password=[^&#]*", r"\1password=***", query)
    return f"{scheme}{sep}{userinfo}{at}{hosts}{mark}{query}"


def _scrub(message: str, url: str) -> str:
    """
    C{message} (from the driver) with the password of C{url} taken out, in
    case a message quotes the connection string.
    """
    password = _password(url)
    if password:
        for form in {password, unquote(password)}:
            if form:
                message = message.replace(form, "***")
    return message


def applyMigrations(
    cursor: Any, migrations: Sequence[tuple[int, Sequence[str]]]
) -> int:
    """
    Bring the database up to the newest version in C{migrations}; the
    version it is at afterwards.  Runs inside one transaction, holding the
    migration lock until it commits: concurrent starts take turns, and
    the later ones find the work done.
    """
    cursor.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
    return migrate(cursor, migrations, "%s")


class _Connection(adbapi.Connection):
    """
    adbapi's connection wrapper, told what a connection the server dropped
    looks like: it is let go quietly (adbapi's own path logs "Rollback
    failed" twice for what a restart of the database always causes) and the
    thread's next transaction connects anew.
    """

    _connection: psycopg.Connection[Any] | None
    _pool: adbapi.ConnectionPool

    def lost(self) -> bool:
        """
        Whether the connection is gone (closed by the server or never made).
        """
        return self._connection is None or self._connection.closed

    def forget(self) -> None:
        """
        Drop the connection, so that the next use of this thread connects.
        """
        raw, self._connection = self._connection, None
        if raw is None:
            return
        pool = self._pool
        if pool.connections.get(pool.threadID()) is raw:
            pool.disconnect(raw)  # closes it
        else:
            raw.close()

    def reconnect(self) -> None:
        self.forget()
        self._connection = self._pool.connect()

    def rollback(self) -> None:
        if self.lost():
            self.forget()
            return
        super().rollback()


def _begin(connection: Any) -> Any:
    """
    A cursor inside a new transaction.  A pooled connection the server
    dropped while it sat idle is only found out here: nothing has been sent
    in the transaction yet, so connect again and begin once more.
    """
    try:
        cursor = connection.cursor()
        cursor.execute(BEGIN)
        return cursor
    except psycopg.OperationalError:
        if not (isinstance(connection, _Connection) and connection.lost()):
            raise
    connection.reconnect()
    cursor = connection.cursor()
    cursor.execute(BEGIN)
    return cursor


def _inTransaction(
    connection: Any,
    work: Callable[..., T],
    args: Sequence[Any],
    kwargs: dict[str, Any],
) -> T:
    """
    The L{twisted_lab.storage.pooled.TransactionRunner} of PostgreSQL: one
    READ COMMITTED transaction, its cursor a psycopg cursor (C{%s}
    parameters).  Work that reads a row and then writes on what it read
    locks it (C{SELECT ... FOR UPDATE}), as this module's functions do.
    """
    cursor = _begin(connection)
    try:
        result = work(cursor, *args, **kwargs)
        cursor.execute("COMMIT")
    except BaseException:
        try:
            if not cursor.closed and not cursor.connection.closed:
                cursor.execute("ROLLBACK")
        except psycopg.Error:
            pass  # the connection is gone: the server rolled it back
        raise
    finally:
        cursor.close()
    return result


def _text(value: str | None) -> bytes | None:
    # None goes through, for the NOT NULL constraint to refuse it.
    return None if value is None else value.encode("utf-8")


def _str(value: bytes) -> str:
    return bytes(value).decode("utf-8")


def _integrityCheck(cursor: Any, expected: int) -> str:
    cursor.execute("SELECT version FROM schema_version")
    row = cursor.fetchone()
    version = row[0] if row else 0
    if version != expected:
        return f"schema version {version}, expected {expected}"
    return "ok"


def _visit(cursor: Any, address: str, now: str) -> tuple[str, int] | None:
    row = cursor.execute(
        "UPDATE identities SET visits = visits + 1, last_seen = %s "
        "WHERE address = %s RETURNING name, visits",
        (now, address),
    ).fetchone()
    return None if row is None else (_str(row[0]), int(row[1]))


def _nameAddress(cursor: Any, address: str, name: str, now: str) -> int:
    row = cursor.execute(
        "INSERT INTO identities (address, name, visits, first_seen, last_seen) "
        "VALUES (%s, %s, 1, %s, %s) "
        "ON CONFLICT (address) DO UPDATE SET name = excluded.name, "
        "last_seen = excluded.last_seen RETURNING visits",
        (address, _text(name), now, now),
    ).fetchone()
    return int(row[0])


def _forgetAddress(cursor: Any, address: str) -> bool:
    cursor.execute("DELETE FROM identities WHERE address = %s", (address,))
    return bool(cursor.rowcount > 0)


def _createAccount(cursor: Any, username: str, passwordHash: str, now: float) -> bool:
    # Not an IntegrityError caught after the fact: in PostgreSQL an error
    # aborts the whole transaction.  A concurrent insert of the same name
    # makes this one wait for its commit, then do nothing.
    cursor.execute(
        "INSERT INTO accounts (username, password_hash, created_at) "
        "VALUES (%s, %s, %s) ON CONFLICT (username) DO NOTHING",
        (username, passwordHash, now),
    )
    return bool(cursor.rowcount == 1)


def _passwordHash(cursor: Any, username: str) -> str | None:
    row = cursor.execute(
        "SELECT password_hash FROM accounts WHERE username = %s", (username,)
    ).fetchone()
    return None if row is None else str(row[0])


def _lockRevocations(cursor: Any, now: float) -> None:
    """
    Take the revocation log's lock (until the commit; see the module's
    docstring), then drop what is older than L{REVOCATIONS_KEPT}.
    """
    cursor.execute("SELECT pg_advisory_xact_lock(%s)", (REVOCATION_LOCK,))
    cursor.execute("DELETE FROM revocations WHERE at < %s", (now - REVOCATIONS_KEPT,))


def _setPasswordHash(
    cursor: Any, username: str, passwordHash: str, keep: bytes | None, now: float
) -> None:
    cursor.execute(
        "UPDATE accounts SET password_hash = %s WHERE username = %s",
        (passwordHash, username),
    )
    if keep is not None:
        _lockRevocations(cursor, now)
        cursor.execute(
            "WITH gone AS ("
            " DELETE FROM sessions WHERE username = %s AND token_digest <> %s"
            " RETURNING token_digest"
            ") INSERT INTO revocations (token_digest, reason, at) "
            "SELECT token_digest, 'password_changed', %s FROM gone",
            (username, keep, now),
        )


def _createSession(
    cursor: Any, digest: bytes, username: str, now: float, idle: float, maximum: float
) -> float:
    expires = now + maximum
    cursor.execute(
        "INSERT INTO sessions (token_digest, username, created_at, last_used, "
        "expires_at) VALUES (%s, %s, %s, %s, %s)",
        (digest, username, now, now, expires),
    )
    # Sessions that can no longer be used are cleaned up as we go.
    cursor.execute(
        "DELETE FROM sessions WHERE username = %s AND "
        "(expires_at <= %s OR last_used + %s <= %s)",
        (username, now, idle, now),
    )
    return min(expires, now + idle)


def _useSession(
    cursor: Any, digest: bytes, now: float, idle: float
) -> tuple[str, float] | None:
    row = cursor.execute(
        "SELECT username, last_used, expires_at FROM sessions "
        "WHERE token_digest = %s FOR UPDATE",
        (digest,),
    ).fetchone()
    if row is None:
        return None
    username, lastUsed, expiresAt = row
    if now >= expiresAt or now - lastUsed >= idle:
        cursor.execute("DELETE FROM sessions WHERE token_digest = %s", (digest,))
        return None
    cursor.execute(
        "UPDATE sessions SET last_used = %s WHERE token_digest = %s", (now, digest)
    )
    return str(username), float(min(expiresAt, now + idle))


def _deleteSession(cursor: Any, digest: bytes, now: float) -> bool:
    cursor.execute("DELETE FROM sessions WHERE token_digest = %s", (digest,))
    if cursor.rowcount == 0:
        return False
    _lockRevocations(cursor, now)
    cursor.execute(
        "INSERT INTO revocations (token_digest, reason, at) "
        "VALUES (%s, 'logged_out', %s)",
        (digest, now),
    )
    return True


def _refreshSession(
    cursor: Any, digest: bytes, lastUsed: float, now: float, idle: float
) -> float | None:
    row = cursor.execute(
        "SELECT last_used, expires_at FROM sessions WHERE token_digest = %s FOR UPDATE",
        (digest,),
    ).fetchone()
    if row is None:
        return None
    lastUsed = max(lastUsed, row[0])
    expiresAt = row[1]
    if now >= expiresAt or now - lastUsed >= idle:
        cursor.execute("DELETE FROM sessions WHERE token_digest = %s", (digest,))
        return None
    cursor.execute(
        "UPDATE sessions SET last_used = %s WHERE token_digest = %s",
        (lastUsed, digest),
    )
    return float(min(expiresAt, lastUsed + idle))


def _revocationsAfter(cursor: Any, position: int) -> list[tuple[int, bytes, str]]:
    cursor.execute(
        "SELECT id, token_digest, reason FROM revocations WHERE id > %s "
        "ORDER BY id LIMIT 1000",
        (position,),
    )
    return [(int(i), bytes(d), str(r)) for i, d, r in cursor.fetchall()]


def _revocationsSince(cursor: Any, at: float) -> list[tuple[int, bytes, str]]:
    cursor.execute(
        "SELECT id, token_digest, reason FROM revocations WHERE at >= %s "
        "ORDER BY id DESC LIMIT 1000",
        (at,),
    )
    return [(int(i), bytes(d), str(r)) for i, d, r in reversed(cursor.fetchall())]


def _lastRevocation(cursor: Any) -> int:
    row = cursor.execute("SELECT COALESCE(MAX(id), 0) FROM revocations").fetchone()
    return int(row[0])


def _lastSeq(cursor: Any, room: str) -> int:
    row = cursor.execute(
        "SELECT last_seq FROM chat_rooms WHERE room = %s", (room,)
    ).fetchone()
    return int(row[0]) if row else 0


def _storeMessages(
    cursor: Any, messages: Sequence[tuple[str, str, str, str]]
) -> list[int]:
    counts: dict[str, int] = {}
    for room, _, _, _ in messages:
        counts[room] = counts.get(room, 0) + 1
    next: dict[str, int] = {}
    # One order for every writer: two transactions that lock the same
    # rooms never wait for each other in a circle.
    for room in sorted(counts):
        count = counts[room]
        cursor.execute(
            "INSERT INTO chat_rooms (room, last_seq) VALUES (%s, 0) "
            "ON CONFLICT (room) DO NOTHING",
            (room,),
        )
        # The row stays locked until the commit: the next writer of this
        # room waits, then adds to what this one committed.
        (last,) = cursor.execute(
            "UPDATE chat_rooms SET last_seq = last_seq + %s WHERE room = %s "
            "RETURNING last_seq",
            (count, room),
        ).fetchone()
        next[room] = int(last) - count + 1
    seqs = []
    rows = []
    for room, sender, text, ts in messages:
        seq = next[room]
        next[room] = seq + 1
        seqs.append(seq)
        rows.append((room, seq, _text(sender), _text(text), _text(ts)))
    cursor.executemany(
        "INSERT INTO chat_messages (room, seq, sender, text, ts) "
        "VALUES (%s, %s, %s, %s, %s)",
        rows,
    )
    return seqs


def _historyRows(rows: Sequence[Any]) -> list[tuple[int, str, str, str]]:
    return [
        (int(seq), _str(sender), _str(text), _str(ts)) for seq, sender, text, ts in rows
    ]


def _history(
    cursor: Any, room: str, after: int, limit: int
) -> list[tuple[int, str, str, str]]:
    cursor.execute(
        "SELECT seq, sender, text, ts FROM chat_messages "
        "WHERE room = %s AND seq > %s ORDER BY seq LIMIT %s",
        (room, after, limit),
    )
    return _historyRows(cursor.fetchall())


def _recentHistory(
    cursor: Any, room: str, limit: int
) -> list[tuple[int, str, str, str]]:
    cursor.execute(
        "SELECT seq, sender, text, ts FROM chat_messages "
        "WHERE room = %s ORDER BY seq DESC LIMIT %s",
        (room, limit),
    )
    rows = _historyRows(cursor.fetchall())
    rows.reverse()
    return rows


def _roomsWithHistory(cursor: Any, limit: int) -> list[str]:
    cursor.execute(
        "WITH RECURSIVE rooms (room) AS ("
        " SELECT MIN(room) FROM chat_messages"
        " UNION ALL"
        " SELECT (SELECT MIN(room) FROM chat_messages WHERE room > rooms.room)"
        " FROM rooms WHERE rooms.room IS NOT NULL"
        ") SELECT room FROM rooms WHERE room IS NOT NULL LIMIT %s",
        (limit,),
    )
    return [str(row[0]) for row in cursor.fetchall()]


@implementer(IStore)
class PostgresStore(PooledStore):
    """
    A PostgreSQL database, reached only through Deferreds.

    Construct it with a C{postgresql://user:password@host:port/dbname} URL,
    C{store.prepare()} once at start (blocking), C{yield store.open()}, use
    it, C{store.close()}.
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
        url: str,
        migrations: Sequence[tuple[int, Sequence[str]]] = MIGRATIONS,
        reactor: Any = None,
        poolMin: int = POOL_MIN,
        poolMax: int = POOL_MAX,
    ) -> None:
        if not isPostgresURL(url):
            raise ValueError("a PostgreSQL URL starts with postgresql://")
        # path: where the database is, without its password (for logs).
        super().__init__(redactURL(url), migrations)
        self._url = url
        self._reactor = reactor
        self._poolMin = poolMin
        self._poolMax = poolMax

    def __repr__(self) -> str:
        return f"<PostgresStore {self.path}>"

    def _connectOptions(self) -> dict[str, Any]:
        options: dict[str, Any] = {"autocommit": True}
        if "connect_timeout=" not in self._url:
            options["connect_timeout"] = CONNECT_TIMEOUT
        if "application_name=" not in self._url:
            options["application_name"] = "netlab"
        return options

    def _unavailable(self, error: BaseException) -> DatabaseUnavailable:
        reason = _scrub(str(error).strip(), self._url) or type(error).__name__
        return DatabaseUnavailable(
            f"cannot use the PostgreSQL database {self.path}: {reason}"
        )

    def prepare(self) -> None:
        """
        Connect and migrate now, blocking: called once as the server
        starts, before the reactor runs, so a database that cannot be
        reached or has a newer schema stops the start with a clear error
        (a L{RuntimeError}) instead of failing every request later.
        """
        try:
            connection = psycopg.connect(self._url, **self._connectOptions())
        except psycopg.Error as e:
            raise self._unavailable(e) from None
        try:
            _inTransaction(connection, applyMigrations, (self.migrations,), {})
        except psycopg.Error as e:
            raise self._unavailable(e) from None
        finally:
            connection.close()

    async def open(self) -> PostgresStore:
        """
        Start the pool and migrate the database (if L{prepare} has not).
        """
        extra: dict[str, Any] = {}
        if self._reactor is not None:
            extra["cp_reactor"] = self._reactor
        self.pool = adbapi.ConnectionPool(
            "psycopg",
            conninfo=self._url,
            cp_min=self._poolMin,
            cp_max=self._poolMax,
            cp_reconnect=True,
            cp_noisy=False,
            **self._connectOptions(),
            **extra,
        )
        self.pool.connectionFactory = _Connection
        self.pool.start()
        try:
            self.version = await self.transaction(applyMigrations, self.migrations)
        except psycopg.Error as e:
            self.close()
            raise self._unavailable(e) from None
        except BaseException:
            self.close()
            raise
        return self

    def integrityCheck(self) -> defer.Deferred[str]:
        """
        C{"ok"} when the database answers and is at the schema version
        this store migrated it to (PostgreSQL checks its own pages).
        """
        return self.transaction(_integrityCheck, self.version)
