"""
The store on a real SQLite file: permissions, WAL, migrations,
persistence across reopen, literal storage of hostile strings.
"""

from __future__ import annotations

import os
import sqlite3
import stat

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from twisted_lab.storage.sqlite import LATEST_VERSION, MIGRATIONS, Store

NOW = "2026-11-25T10:00:00Z"


class StoreTests(TestCase):
    async def openStore(self, path: str | None = None, migrations=MIGRATIONS) -> Store:
        store = Store(path or self.mktemp(), migrations)
        self.addCleanup(store.close)
        await store.open()
        return store

    @defer.inlineCallbacks
    def test_newFileIsPrivateAndInWALMode(self):
        path = self.mktemp()
        store = yield defer.ensureDeferred(self.openStore(path))
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        mode = yield store.transaction(
            lambda c: c.execute("PRAGMA journal_mode").fetchone()[0]
        )
        self.assertEqual(mode, "wal")
        self.assertEqual(store.version, LATEST_VERSION)
        self.assertEqual((yield store.integrityCheck()), "ok")

    @defer.inlineCallbacks
    def test_identitiesPersistAcrossReopen(self):
        path = self.mktemp()
        store = yield defer.ensureDeferred(self.openStore(path))
        self.assertIsNone((yield store.visit("127.0.0.2", NOW)))
        self.assertEqual((yield store.nameAddress("127.0.0.2", "Alice", NOW)), 1)
        self.assertEqual((yield store.visit("127.0.0.2", NOW)), ("Alice", 2))
        store.close()
        again = yield defer.ensureDeferred(self.openStore(path))
        self.assertEqual((yield again.visit("127.0.0.2", NOW)), ("Alice", 3))
        # Renaming keeps the count; forgetting removes the address.
        self.assertEqual((yield again.nameAddress("127.0.0.2", "Alicia", NOW)), 3)
        self.assertTrue((yield again.forgetAddress("127.0.0.2")))
        self.assertFalse((yield again.forgetAddress("127.0.0.2")))
        self.assertIsNone((yield again.visit("127.0.0.2", NOW)))

    @defer.inlineCallbacks
    def test_hostileStringsStoredLiterally(self):
        store = yield defer.ensureDeferred(self.openStore())
        for name in ("Robert'); DROP TABLE identities;--", "\u202eevil", "a\x00b"):
            yield store.nameAddress("10.0.0.1", name, NOW)
            self.assertEqual((yield store.visit("10.0.0.1", NOW))[0], name)

    @defer.inlineCallbacks
    def test_migratesAnEmptyFile(self):
        path = self.mktemp()
        sqlite3.connect(path).close()  # an existing, empty database
        store = yield defer.ensureDeferred(self.openStore(path))
        self.assertEqual(store.version, LATEST_VERSION)

    @defer.inlineCallbacks
    def test_migratesAnOlderSchemaKeepingData(self):
        path = self.mktemp()
        old = yield defer.ensureDeferred(self.openStore(path, MIGRATIONS[:1]))
        yield old.nameAddress("127.0.0.9", "Old", NOW)
        old.close()
        newer = list(MIGRATIONS) + [
            (LATEST_VERSION + 1, ["CREATE TABLE later_feature (x INTEGER)"])
        ]
        store = yield defer.ensureDeferred(self.openStore(path, newer))
        self.assertEqual(store.version, LATEST_VERSION + 1)
        self.assertEqual((yield store.visit("127.0.0.9", NOW)), ("Old", 2))
        tables = yield store.transaction(
            lambda c: [r[0] for r in c.execute("SELECT name FROM sqlite_master")]
        )
        self.assertIn("later_feature", tables)

    @defer.inlineCallbacks
    def test_refusesANewerSchema(self):
        path = self.mktemp()
        newer = list(MIGRATIONS) + [(LATEST_VERSION + 1, ["CREATE TABLE t (x)"])]
        store = yield defer.ensureDeferred(self.openStore(path, newer))
        store.close()
        with self.assertRaises(RuntimeError) as raised:
            yield defer.ensureDeferred(self.openStore(path))
        self.assertIn("newer than this program knows", str(raised.exception))

    @defer.inlineCallbacks
    def test_failedTransactionRollsBack(self):
        store = yield defer.ensureDeferred(self.openStore())

        def halfDone(cursor):
            cursor.execute(
                "INSERT INTO identities VALUES ('1.2.3.4', 'X', 1, 'a', 'b')"
            )
            raise ValueError("changed my mind")

        with self.assertRaises(ValueError):
            yield store.transaction(halfDone)
        self.assertIsNone((yield store.visit("1.2.3.4", NOW)))
