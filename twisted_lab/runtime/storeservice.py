"""
The store's life in a running server: prepared (created, migrated) as the
server starts, so a database that cannot be opened stops the start with a
clear error, opened for the reactor, and closed after the servers that use
it have stopped.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_lab.codecs import events
from twisted_lab.runtime.startup import StartupFailed


def describeStore(store: Any) -> str:
    """
    What to call C{store} in a log line: its file, or its URL without the
    password.
    """
    return str(getattr(store, "description", None) or getattr(store, "path", "?"))


class StoreService(Service):
    """
    Opens the store when the application starts and closes it when it
    stops.  Put it before the servers that use it in an
    L{twisted_lab.runtime.server.OrderedServices}, so it closes after them.

    A store that cannot be opened (a newer schema, an unreadable file, a
    database server that cannot be reached) is logged and fails the start
    (L{StartupFailed}: twistd exits non-zero, in daemon mode too): serving
    without a store would answer every request with an error.
    """

    log = Logger()

    def __init__(self, store: Any, reactor: Any) -> None:
        self.store = store
        self._reactor = reactor
        self.opened: defer.Deferred[Any] | None = None

    def startService(self) -> None:
        try:
            self.store.prepare()
        except Exception as e:  # noqa: BLE001 (each engine fails its own way)
            where = describeStore(self.store)
            self.log.critical(
                "cannot open the database {path}: {reason}",
                event=events.STORE_FAILED,
                path=where,
                reason=str(e),
            )
            # The reason first: twistd's daemon mode passes on 100 bytes.
            raise StartupFailed(f"{e} (database {where})") from None
        Service.startService(self)
        self.opened = defer.ensureDeferred(self.store.open())
        self.opened.addErrback(self._cannotOpen)

    def _cannotOpen(self, failure: Failure) -> None:
        self.log.critical(
            "cannot open the database {path}: {reason}",
            event=events.STORE_FAILED,
            path=describeStore(self.store),
            reason=failure.getErrorMessage(),
        )
        self._reactor.callWhenRunning(self._reactor.stop)

    def stopService(self) -> None:
        Service.stopService(self)
        self.store.close()
