"""
The PostgreSQL store: the store contract on a real server, and what only a
database shared by several processes shows: concurrent writers from two
pools (two nodes) stay gap-free, many nodes migrate an empty database once,
revocation positions commit in order, and the store lives through a
restart of the server.

The server is a throwaway one (L{tests.pgserver}); without one these tests
are skipped, except under CI where they fail.
"""

from __future__ import annotations

import socket
from typing import Any, cast

import psycopg
from twisted.internet import defer, reactor, task, threads
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests import pgserver
from tests import test_store_contract as contract
from twisted_lab.storage import postgres
from twisted_lab.storage.engines import describeDatabase, storeFromURL
from twisted_lab.storage.postgres import (
    LATEST_VERSION,
    MIGRATIONS,
    REVOCATION_LOCK,
    DatabaseUnavailable,
    PostgresStore,
)
from twisted_lab.storage.sqlite import Store

NOW = contract.NOW
T0 = contract.T0


def sleep(seconds: float) -> defer.Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


async def openStore(
    testCase: TestCase, url: str, migrations: Any = MIGRATIONS
) -> PostgresStore:
    store = PostgresStore(url, migrations)
    testCase.addCleanup(store.close)
    return await store.open()


class PostgresStoreContractTests(contract.StoreContract, TestCase):
    """
    The contract on a database of its own (on the class's server).
    """

    refusedError = psycopg.IntegrityError

    def setUp(self) -> None:
        self.server = pgserver.sharedServer(self)

    async def makeStore(self) -> PostgresStore:
        return await openStore(self, pgserver.freshDatabase(self, self.server))


class PostgresStoreTests(TestCase):
    """
    Migrations, persistence and failures on one store.
    """

    def setUp(self) -> None:
        self.server = pgserver.sharedServer(self)
        self.url = pgserver.freshDatabase(self, self.server)

    def test_prepareMigratesThenOpenFindsItDone(self) -> defer.Deferred[None]:
        async def run() -> None:
            store = PostgresStore(self.url)
            store.prepare()
            store.prepare()  # a second start finds nothing to do
            self.assertIsNone(store.pool)  # prepare() does not open
            opened = await openStore(self, self.url)
            self.assertEqual(opened.version, LATEST_VERSION)
            self.assertEqual(await opened.integrityCheck(), "ok")
            tables = await opened.transaction(
                lambda c: sorted(
                    r[0]
                    for r in c.execute(
                        "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
                    )
                )
            )
            self.assertEqual(
                tables,
                [
                    "accounts",
                    "chat_messages",
                    "chat_rooms",
                    "identities",
                    "revocations",
                    "schema_version",
                    "sessions",
                ],
            )

        return defer.ensureDeferred(run())

    def test_dataPersistsAcrossReopen(self) -> defer.Deferred[None]:
        async def run() -> None:
            store = await openStore(self, self.url)
            await store.nameAddress("127.0.0.2", "Alice", NOW)
            await store.createAccount("alice", "hash", T0)
            await store.storeMessages([("lobby", "alice", "hi", NOW)])
            store.close()
            again = await openStore(self, self.url)
            self.assertEqual(await again.visit("127.0.0.2", NOW), ("Alice", 2))
            self.assertEqual(await again.passwordHash("alice"), "hash")
            self.assertEqual(
                await again.history("lobby", 0, 10), [(1, "alice", "hi", NOW)]
            )

        return defer.ensureDeferred(run())

    def test_migratesAnOlderSchemaKeepingData(self) -> defer.Deferred[None]:
        async def run() -> None:
            old = await openStore(self, self.url, MIGRATIONS[:1])
            self.assertEqual(old.version, 1)
            await old.nameAddress("127.0.0.9", "Old", NOW)
            old.close()
            newer = list(MIGRATIONS) + [
                (LATEST_VERSION + 1, ["CREATE TABLE later_feature (x INTEGER)"])
            ]
            store = await openStore(self, self.url, newer)
            self.assertEqual(store.version, LATEST_VERSION + 1)
            self.assertEqual(await store.visit("127.0.0.9", NOW), ("Old", 2))
            self.assertEqual(await store.integrityCheck(), "ok")

        return defer.ensureDeferred(run())

    def test_refusesANewerSchema(self) -> defer.Deferred[None]:
        async def run() -> None:
            newer = list(MIGRATIONS) + [
                (LATEST_VERSION + 1, ["CREATE TABLE t (x int)"])
            ]
            (await openStore(self, self.url, newer)).close()
            with self.assertRaises(RuntimeError) as raised:
                await openStore(self, self.url)
            self.assertIn("newer than this program knows", str(raised.exception))
            with self.assertRaises(RuntimeError) as raised:
                PostgresStore(self.url).prepare()
            self.assertIn("newer than this program knows", str(raised.exception))

        return defer.ensureDeferred(run())

    def test_existingHistoryIsCarriedOver(self) -> defer.Deferred[None]:
        """
        A database made before chat_rooms (version 4) continues from the
        seq its history reached.
        """

        async def run() -> None:
            old = await openStore(self, self.url, [m for m in MIGRATIONS if m[0] <= 4])
            await old.transaction(
                lambda c: c.executemany(
                    "INSERT INTO chat_messages (room, seq, sender, text, ts) "
                    "VALUES (%s, %s, 'a', 'old', 't')",
                    [("lobby", n) for n in range(1, 8)],
                )
            )
            old.close()
            store = await openStore(self, self.url)
            (seqs, _) = await store.storeMessages([("lobby", "a", "new", "t")])
            self.assertEqual(seqs, [8])

        return defer.ensureDeferred(run())

    def test_failedTransactionRollsBack(self) -> defer.Deferred[None]:
        async def run() -> None:
            store = await openStore(self, self.url)

            def halfDone(cursor: Any) -> None:
                cursor.execute(
                    "INSERT INTO identities VALUES ('1.2.3.4', 'X', 1, 'a', 'b')"
                )
                raise ValueError("changed my mind")

            with self.assertRaises(ValueError):
                await store.transaction(halfDone)
            self.assertIsNone(await store.visit("1.2.3.4", NOW))
            # A statement the server refuses also leaves the connection usable.
            with self.assertRaises(psycopg.errors.UndefinedTable):
                await store.transaction(lambda c: c.execute("SELECT * FROM nothing"))
            self.assertIsNone(await store.visit("1.2.3.4", NOW))

        return defer.ensureDeferred(run())

    def test_nulAndSurrogates(self) -> defer.Deferred[None]:
        """
        U+0000 (which PostgreSQL's text refuses) is kept in the strings the
        store hands back; a lone surrogate is refused, as SQLite does.
        """

        async def run() -> None:
            store = await openStore(self, self.url)
            seqs, _ = await store.storeMessages([("lobby", "a\x00", "\x00", "t\x00")])
            self.assertEqual(
                await store.recentHistory("lobby", 1), [(1, "a\x00", "\x00", "t\x00")]
            )
            with self.assertRaises(UnicodeEncodeError):
                await store.storeMessages([("lobby", "a", "\udc80", "t")])
            self.assertEqual(await store.lastSeq("lobby"), 1)

        return defer.ensureDeferred(run())


class PostgresConcurrencyTests(TestCase):
    """
    Two or more stores on one database: separate pools, as separate nodes
    would have.
    """

    def setUp(self) -> None:
        self.server = pgserver.sharedServer(self)
        self.url = pgserver.freshDatabase(self, self.server)

    def test_twoNodesStayGapFree(self) -> defer.Deferred[None]:
        async def run() -> None:
            first = await openStore(self, self.url)
            second = await openStore(self, self.url)
            pending = []
            for i in range(60):
                for store, who in ((first, "a"), (second, "b")):
                    # Rooms in both orders: writers locking the same rooms
                    # must not deadlock.
                    rooms = ["lobby", "other"] if i % 2 else ["other", "lobby"]
                    pending.append(
                        store.storeMessages(
                            [
                                (rooms[0], who, f"{who}{i}.{j}", "t")
                                for j in range(1 + i % 3)
                            ]
                            + [(rooms[1], who, f"{who}{i}", "t")]
                        )
                    )
            outcomes = await defer.gatherResults(pending, consumeErrors=True)
            perRoom: dict[str, list[int]] = {"lobby": [], "other": []}
            for i, (seqs, _) in enumerate(outcomes):
                rooms = ["lobby", "other"] if (i // 2) % 2 else ["other", "lobby"]
                perRoom[rooms[0]].extend(seqs[:-1])
                perRoom[rooms[1]].append(seqs[-1])
                self.assertEqual(seqs[:-1], sorted(seqs[:-1]))
            for room, seqs in perRoom.items():
                self.assertEqual(sorted(seqs), list(range(1, len(seqs) + 1)))
                self.assertEqual(await first.lastSeq(room), len(seqs))
                rows = await second.history(room, 0, 1000)
                self.assertEqual([row[0] for row in rows], sorted(seqs))

        return defer.ensureDeferred(run())

    def test_oneOfConcurrentRegistrationsWins(self) -> defer.Deferred[None]:
        async def run() -> None:
            stores = [await openStore(self, self.url) for _ in range(2)]
            outcomes = await defer.gatherResults(
                [stores[n % 2].createAccount("bob", f"h{n}", T0) for n in range(12)],
                consumeErrors=True,
            )
            self.assertEqual(outcomes.count(True), 1)
            winner = outcomes.index(True)
            self.assertEqual(await stores[1].passwordHash("bob"), f"h{winner}")

        return defer.ensureDeferred(run())

    def test_revocationWaitsForTheOneBeforeToCommit(self) -> defer.Deferred[None]:
        """
        A revocation being written holds the log's lock until it commits:
        the next one (from another node) waits, so its position is taken
        and committed after; a reader never sees a later position while an
        earlier one is still to come.
        """

        async def run() -> None:
            store = await openStore(self, self.url)
            await store.createAccount("alice", "hash", T0)
            for digest in (b"s1", b"s2"):
                await store.createSession(digest, "alice", T0, 100.0, 1000.0)
            other = psycopg.connect(self.url, autocommit=True)
            self.addCleanup(other.close)
            # Another node, in the middle of a logout.
            other.execute("BEGIN")
            other.execute("DELETE FROM sessions WHERE token_digest = %s", (b"s1",))
            other.execute("SELECT pg_advisory_xact_lock(%s)", (REVOCATION_LOCK,))
            other.execute(
                "INSERT INTO revocations (token_digest, reason, at) "
                "VALUES (%s, 'logged_out', %s)",
                (b"s1", T0 + 1),
            )
            second = store.deleteSession(b"s2", T0 + 2)
            await sleep(0.5)
            self.assertNoResult(second)
            self.assertEqual(await store.revocationsAfter(0), [])
            other.execute("COMMIT")
            self.assertTrue(await second)
            log = await store.revocationsAfter(0)
            self.assertEqual([d for _, d, _ in log], [b"s1", b"s2"])
            self.assertLess(log[0][0], log[1][0])

        return defer.ensureDeferred(run())

    def test_readersNeverSkipARevocation(self) -> defer.Deferred[None]:
        """
        Logouts on two nodes at once while a third reads the log by
        position, as session watchers do: every revocation is seen.
        """

        async def run() -> None:
            writers = [await openStore(self, self.url) for _ in range(2)]
            reader = await openStore(self, self.url)
            await writers[0].createAccount("alice", "hash", T0)
            digests = [b"s%03d" % n for n in range(60)]
            for digest in digests:
                await writers[0].createSession(digest, "alice", T0, 1e6, 1e6)
            done = defer.gatherResults(
                [
                    writers[n % 2].deleteSession(digest, T0 + 1)
                    for n, digest in enumerate(digests)
                ],
                consumeErrors=True,
            )
            seen: list[bytes] = []
            position = 0
            finished = False
            while not finished:
                finished = done.called
                batch = await reader.revocationsAfter(position)
                seen.extend(digest for _, digest, _ in batch)
                if batch:
                    position = batch[-1][0]
            self.assertEqual(await done, [True] * len(digests))
            self.assertEqual(sorted(seen), digests)

        return defer.ensureDeferred(run())

    def test_manyNodesMigrateAnEmptyDatabaseOnce(self) -> defer.Deferred[None]:
        """
        Six stores opening at once and four starting (prepare) at once,
        each on an empty database: the migrations run once per database.
        """
        extra = (
            LATEST_VERSION + 1,
            [
                "CREATE TABLE applied (n INTEGER)",
                "INSERT INTO applied VALUES (1)",
                "SELECT pg_sleep(0.2)",
            ],
        )
        migrations = list(MIGRATIONS) + [extra]

        async def count(url: str) -> int:
            store = await openStore(self, url, migrations)
            return int(
                await store.transaction(
                    lambda c: c.execute("SELECT count(*) FROM applied").fetchone()[0]
                )
            )

        async def run() -> None:
            stores = [PostgresStore(self.url, migrations) for _ in range(6)]
            for store in stores:
                self.addCleanup(store.close)
            opened = await defer.gatherResults(
                [defer.ensureDeferred(store.open()) for store in stores],
                consumeErrors=True,
            )
            self.assertEqual([s.version for s in opened], [LATEST_VERSION + 1] * 6)
            self.assertEqual(await count(self.url), 1)

            url = pgserver.freshDatabase(self, self.server)
            await defer.gatherResults(
                [
                    threads.deferToThread(PostgresStore(url, migrations).prepare)
                    for _ in range(4)
                ],
                consumeErrors=True,
            )
            self.assertEqual(await count(url), 1)

        return defer.ensureDeferred(run())


class PostgresRestartTests(TestCase):
    """
    The server stops and starts again under a store in use (a server of
    the test's own).
    """

    def setUp(self) -> None:
        self.server = pgserver.startServer(self)
        self.url = self.server.createDatabase()

    def restartWhileInUse(self, immediate: bool) -> defer.Deferred[None]:
        async def run() -> None:
            store = await openStore(self, self.url)
            await store.createAccount("alice", "hash", T0)
            seqs, _ = await store.storeMessages(
                [("lobby", "alice", f"m{n}", NOW) for n in range(3)]
            )
            self.assertEqual(seqs, [1, 2, 3])

            # A transaction in flight when the server goes: it fails, and
            # what it wrote is not kept.
            def slow(cursor: Any) -> None:
                cursor.execute(
                    "INSERT INTO accounts VALUES ('carol', 'h', 0), ('dave', 'h', 0)"
                )
                cursor.execute("SELECT pg_sleep(30)")

            inFlight = store.transaction(slow)
            await sleep(0.3)
            self.server.stop(immediate=immediate)
            with self.assertRaises(psycopg.OperationalError):
                await inFlight

            # While it is down, requests fail (and do not hang).
            for _ in range(3):
                with self.assertRaises(psycopg.OperationalError):
                    await store.lastSeq("lobby")
            with self.assertRaises(psycopg.OperationalError):
                await store.storeMessages([("lobby", "alice", "lost", NOW)])

            self.server.start()
            # Back: the store works at once, with everything committed.
            self.assertEqual(await store.lastSeq("lobby"), 3)
            seqs, _ = await store.storeMessages([("lobby", "alice", "m3", NOW)])
            self.assertEqual(seqs, [4])
            self.assertEqual(
                [text for _, _, text, _ in await store.history("lobby", 0, 10)],
                ["m0", "m1", "m2", "m3"],
            )
            self.assertEqual(await store.passwordHash("alice"), "hash")
            self.assertIsNone(await store.passwordHash("carol"))
            # Every connection of the pool recovers, not only one.
            results = await defer.gatherResults(
                [store.lastSeq("lobby") for _ in range(20)], consumeErrors=True
            )
            self.assertEqual(results, [4] * 20)
            self.assertEqual(await store.integrityCheck(), "ok")

        return defer.ensureDeferred(run())

    def test_restartDuringUse(self) -> defer.Deferred[None]:
        return self.restartWhileInUse(immediate=False)

    def test_crashDuringUse(self) -> defer.Deferred[None]:
        return self.restartWhileInUse(immediate=True)

    def test_openWhileTheServerIsDown(self) -> defer.Deferred[None]:
        async def run() -> None:
            self.server.stop()
            store = PostgresStore(self.url)
            with self.assertRaises(DatabaseUnavailable) as raised:
                await store.open()
            self.assertIn("cannot use the PostgreSQL database", str(raised.exception))
            self.assertNotIn(self.server.password, str(raised.exception))
            self.assertIsNone(store.pool)
            self.server.start()
            self.assertEqual((await openStore(self, self.url)).version, LATEST_VERSION)

        return defer.ensureDeferred(run())


def closedPort() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class UnreachableDatabaseTests(SynchronousTestCase):
    """
    No server needed: a database that cannot be reached stops the start
    with a clear error that does not show the password.
    """

    def test_prepareRaisesAClearError(self) -> None:
        url = f"postgresql://netlab:s3cr%2Ft@127.0.0.1:{closedPort()}/netlab"
        store = PostgresStore(url)
        with self.assertRaises(DatabaseUnavailable) as raised:
            store.prepare()
        message = str(raised.exception)
        self.assertIsInstance(raised.exception, RuntimeError)
        self.assertIn("cannot use the PostgreSQL database", message)
        self.assertIn("postgresql://netlab:***@127.0.0.1", message)
        self.assertNotIn("s3cr", message)
        self.assertNotIn("s3cr", repr(store))
        self.assertNotIn("s3cr", store.path)

    def test_passwordNeverLogged(self) -> None:
        events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        url = f"postgresql://netlab:hunter2@127.0.0.1:{closedPort()}/netlab"
        with self.assertRaises(DatabaseUnavailable):
            PostgresStore(url).prepare()
        self.assertNotIn("hunter2", repr(events))

    def test_notAPostgresURL(self) -> None:
        with self.assertRaises(ValueError):
            PostgresStore("netlab.sqlite3")

    def test_importsNoReactor(self) -> None:
        assert postgres.__file__ is not None
        with open(postgres.__file__, encoding="utf-8") as f:
            source = f.read()
        self.assertNotIn("import reactor", source)


class EnginesTests(SynchronousTestCase):
    def test_storeFromURL(self) -> None:
        for url in ("postgresql://u:p@db:5432/netlab", "postgres://db/netlab"):
            store = storeFromURL(url)
            self.assertIsInstance(store, PostgresStore)
        for path in ("netlab.sqlite3", "/var/lib/netlab/netlab.sqlite3", ":memory:"):
            store = storeFromURL(path)
            self.assertIsInstance(store, Store)
            self.assertEqual(store.path, path)  # type: ignore[attr-defined]

    def test_describeDatabase(self) -> None:
        cases = {
            "netlab.sqlite3": "netlab.sqlite3",
            "postgresql://db.example/netlab": "postgresql://db.example/netlab",
            "postgresql://netlab@db:5432/netlab": "postgresql://netlab@db:5432/netlab",
            "postgresql://netlab:secret@db:5432/netlab": (
                "postgresql://netlab:***@db:5432/netlab"
            ),
            "postgres://netlab:se%40cr%2Ft@db/netlab?sslmode=require": (
                "postgres://netlab:***@db/netlab?sslmode=require"
            ),
            # Not encoded as it should be: still hidden.
            "postgresql://netlab:se/cr@et@db/netlab": "postgresql://netlab:***@db/netlab",
            "postgresql://db/netlab?user=u&password=secret&sslmode=verify-full": (
                "postgresql://db/netlab?user=u&password=***&sslmode=verify-full"
            ),
            "postgresql://u:secret@h1:5432,h2:5433/netlab": (
                "postgresql://u:***@h1:5432,h2:5433/netlab"
            ),
        }
        for url, described in cases.items():
            self.assertEqual(describeDatabase(url), described)
            self.assertEqual(
                PostgresStore(url).path if "://" in url else url, described
            )
