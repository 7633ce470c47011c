"""
A chat message's C{seq} is assigned in the transaction that stores it, so
any number of writers sharing one database stay gap-free (two stores on one
SQLite file stand for two processes).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from twisted_lab.storage.sqlite import MIGRATIONS, Store


class SeqInTransactionTests(TestCase):
    async def openStore(self, path: str, migrations=MIGRATIONS) -> Store:
        store = Store(path, migrations)
        await store.open()
        self.addCleanup(store.close)
        return store

    def test_twoWritersStayGapFree(self):
        async def run():
            path = str(Path(self.mktemp()).absolute())
            first = await self.openStore(path)
            second = await self.openStore(path)
            pending = []
            for i in range(50):
                for store, who in ((first, "a"), (second, "b")):
                    pending.append(
                        store.storeMessages(
                            [
                                ("lobby", who, f"{who}{i}.{j}", "t")
                                for j in range(1 + i % 3)
                            ]
                            + [("other", who, f"{who}{i}", "t")]
                        )
                    )
            outcomes = await defer.gatherResults(pending)
            lobby = sorted(
                seq for seqs, _ in outcomes for seq in seqs[:-1]
            )
            other = sorted(seqs[-1] for seqs, _ in outcomes)
            self.assertEqual(lobby, list(range(1, len(lobby) + 1)))
            self.assertEqual(other, list(range(1, 101)))
            self.assertEqual(await first.lastSeq("lobby"), len(lobby))
            rows = await second.history("lobby", 0, 500)
            self.assertEqual([row[0] for row in rows], lobby)

        return defer.ensureDeferred(run())

    def test_failedTransactionNumbersNothing(self):
        async def run():
            path = str(Path(self.mktemp()).absolute())
            store = await self.openStore(path)
            (seqs, _) = await store.storeMessages([("lobby", "a", "one", "t")])
            self.assertEqual(seqs, [1])
            with self.assertRaises(sqlite3.IntegrityError):
                # A NULL sender breaks the insert: the whole transaction,
                # numbering included, rolls back.
                await store.storeMessages(
                    [("lobby", "a", "two", "t"), ("lobby", None, "x", "t")]
                )
            (seqs, _) = await store.storeMessages([("lobby", "a", "three", "t")])
            self.assertEqual(seqs, [2])

        return defer.ensureDeferred(run())

    def test_existingHistoryIsCarriedOver(self):
        """
        A file made before the seq moved into the store continues from the
        seq its history reached.
        """

        async def run():
            path = str(Path(self.mktemp()).absolute())
            old = [m for m in MIGRATIONS if m[0] <= 4]
            store = await self.openStore(path, old)
            await store.transaction(
                lambda c: c.executemany(
                    "INSERT INTO chat_messages (room, seq, sender, text, ts) "
                    "VALUES (?, ?, ?, ?, ?)",
                    [("lobby", n, "a", "old", "t") for n in range(1, 8)],
                )
            )
            store.close()
            store = await self.openStore(path)
            (seqs, _) = await store.storeMessages([("lobby", "a", "new", "t")])
            self.assertEqual(seqs, [8])

        return defer.ensureDeferred(run())
