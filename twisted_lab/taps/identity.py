"""
C{twistd netlab-identity}: the identity service on the Int32 transport,
its options, and the wiring that makes the running server.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService

from twisted_lab.codecs.message import DEFAULT_MAX_LENGTH
from twisted_lab.runtime.server import (
    StoredServerOptions,
    openStore,
    serverSettings,
    storedService,
)
from twisted_lab.services.identity import DEFAULT_PORT, IdentityService
from twisted_lab.transports.int32 import MessageFactory


class IdentityFactory(MessageFactory):
    """
    An Int32 server of the identity service on C{store}.
    """

    def __init__(self, store: Any, **settings: Any) -> None:
        settings.setdefault("maxLength", DEFAULT_MAX_LENGTH)
        self.store = store
        super().__init__(lambda context: IdentityService(store, context), **settings)


class Options(StoredServerOptions):
    """
    Options of C{twistd netlab-identity}.
    """

    synopsis = "[options]"
    longdesc = (
        "Recognise clients by IP address: ask a new one its name, greet a "
        "known one by name.  Listens on 127.0.0.1:9091 by default."
    )
    defaultPort = DEFAULT_PORT
    defaultMaxLength = DEFAULT_MAX_LENGTH


def makeService(config: Options, reactor: Any = None) -> IService:
    """
    The identity server described by C{config}: its services, not yet
    started.  twistd calls it with the options alone, after installing its
    reactor; tests pass their own.
    """
    if reactor is None:
        from twisted.internet import reactor
    store = openStore(config)
    factory = IdentityFactory(store, **serverSettings(config, reactor))
    return storedService(config, "netlab-identity", store, factory)
