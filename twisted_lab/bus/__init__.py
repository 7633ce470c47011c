"""
The bus: publish/subscribe between the nodes of a netlab cluster (several
chat server processes sharing one database), so that a node hears at once
of what another did: a room message stored, someone joining or leaving, a
private message, a session revoked.

A hint, never the record.  The database is the record: a node that misses
a publication (a restart, a lost connection, a full buffer) finds what it
missed in the store, and L{IBus.onReconnect} tells it when to look.

Two implementations of L{twisted_lab.ports.IBus}, both L{Service}s (a
RedisBus connects in C{startService}, after twistd has forked):
  - L{LocalBus}: one process, no server (the single-node default);
  - L{RedisBus}: through a Redis-protocol server (Redis, Valkey), with the
    few commands the cluster's shared state needs (keys with a TTL,
    counters, hashes, Lua scripts).

L{busFromURL} picks one from the C{--bus} setting.
"""

from __future__ import annotations

from typing import Any

from twisted_lab.bus.errors import BusOverloaded, BusUnavailable
from twisted_lab.bus.local import LocalBus
from twisted_lab.bus.redis import RedisBus, parseRedisURL

__all__ = [
    "BusOverloaded",
    "BusUnavailable",
    "LocalBus",
    "RedisBus",
    "busFromURL",
    "parseRedisURL",
]


def busFromURL(url: str | None, reactor: Any) -> LocalBus | RedisBus:
    """
    The bus a C{--bus} setting names: L{None} (or C{""}, C{"local"}) for
    the in-process bus; C{redis://host:port/db} for a Redis-protocol
    server.  Nothing connects before the bus's C{startService}.
    """
    if url is None or url in ("", "local"):
        return LocalBus(reactor)
    if url.startswith(("redis://", "rediss://")):
        return RedisBus(url, reactor)
    raise ValueError(f"not a bus URL (redis://host:port/db, or local): {url!r}")
