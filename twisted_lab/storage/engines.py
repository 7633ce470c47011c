"""
Which store a C{--db} value opens: a C{postgresql://} (or C{postgres://})
URL is a PostgreSQL database that several nodes may share; anything else
is the path of a SQLite file (the single-node default).
"""

from __future__ import annotations

from typing import cast

from twisted_lab.ports import IStore
from twisted_lab.storage.postgres import PostgresStore, isPostgresURL, redactURL
from twisted_lab.storage.sqlite import Store


def storeFromURL(db: str) -> IStore:
    """
    The store C{db} names, not yet prepared nor opened.
    """
    if isPostgresURL(db):
        return PostgresStore(db)
    return cast(IStore, Store(db))


def describeDatabase(db: str) -> str:
    """
    C{db} as logs may show it: a URL's password is replaced by C{***}.
    """
    if isPostgresURL(db):
        return redactURL(db)
    return db
