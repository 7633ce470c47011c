"""
The identity service (C{twistd netlab-identity}): recognises a client by its
IP address, asks its name once, greets it by name afterwards
(C{docs/protocol.md} section 3.1).

The key is the address as text, with IPv4-mapped IPv6 addresses
(C{::ffff:127.0.0.2}) turned back into IPv4, so a dual-stack listener
recognises the same clients as an IPv4 one.  A reply that says a name is
stored is sent only after the store committed it.
"""

from __future__ import annotations

import unicodedata
from typing import Any

from twisted.application.service import IService

from twisted_lab.codecs.message import (
    DEFAULT_MAX_LENGTH,
    Message,
    RequestError,
    Text,
    rfc3339,
)
from twisted_lab.runtime.server import StoredServerOptions
from twisted_lab.services.limits import RequestLimit
from twisted_lab.storage.sqlite import Store
from twisted_lab.transports.connection import ServerFactory, canonicalAddress
from twisted_lab.transports.int32 import MessageProtocol

DEFAULT_PORT = 9091
MAX_NAME_CHARS = 64
#: Unicode categories a name may not contain: controls, format characters
#: (bidi overrides, zero-width joiners), surrogates, private use,
#: unassigned, and line/paragraph separators.
FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def validName(raw: str) -> str:
    """
    The name to store for C{raw}, or L{RequestError} C{invalid_name}.

    The length is checked on the raw input first (a name can only grow
    so much under normalisation), then the name is trimmed, NFC-normalised
    and checked again.
    """
    if len(raw) > MAX_NAME_CHARS * 4:
        raise RequestError(
            "invalid_name", f"a name has at most {MAX_NAME_CHARS} characters"
        )
    name = unicodedata.normalize("NFC", raw.strip())
    if not name:
        raise RequestError("invalid_name", "the name is empty")
    if len(name) > MAX_NAME_CHARS:
        raise RequestError(
            "invalid_name", f"a name has at most {MAX_NAME_CHARS} characters"
        )
    for char in name:
        if unicodedata.category(char) in FORBIDDEN_CATEGORIES:
            raise RequestError(
                "invalid_name",
                "the name contains a control or invisible character "
                f"(U+{ord(char):04X})",
            )
    return name


class IdentityProtocol(MessageProtocol):
    """
    One client of the identity service.
    """

    factory: IdentityFactory
    requests = {
        "name": {"name": Text(maxChars=4096)},
        "forget": {},
        "ping": {},
    }
    #: docs/protocol.md section 3.5: what writes the store is slow.
    limits = {
        "name": RequestLimit(rate=2.0, burst=10, perUser=False, bucket="store"),
        "forget": RequestLimit(rate=2.0, burst=10, perUser=False, bucket="store"),
        "ping": RequestLimit(rate=50.0, burst=500, perUser=False),
    }
    address = ""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.address = canonicalAddress(getattr(self.transport.getPeer(), "host", ""))
        self.runExclusively(self._greet)

    async def _greet(self) -> None:
        known = await self.factory.store.visit(
            self.address, rfc3339(self.factory.now())
        )
        if known is None:
            self.log.info(
                "{peer} is not known; asking its name",
                event="identity_asked",
                peer=self.peer,
            )
            self.sendMessage({"type": "ask_name"})
        else:
            name, visits = known
            self.log.info(
                "{peer} is {name} (visit {visits})",
                event="identity_known",
                peer=self.peer,
                name=name,
                visits=visits,
            )
            self.sendMessage({"type": "welcome", "name": name, "visits": visits})

    async def request_name(self, message: Message) -> Message:
        name = validName(message["name"])
        visits = await self.factory.store.nameAddress(
            self.address, name, rfc3339(self.factory.now())
        )
        self.log.info(
            "{peer} is now called {name}",
            event="identity_stored",
            peer=self.peer,
            name=name,
        )
        return {"type": "welcome", "name": name, "visits": visits}

    async def request_forget(self, message: Message) -> Message:
        await self.factory.store.forgetAddress(self.address)
        self.log.info("{peer} forgotten", event="identity_forgotten", peer=self.peer)
        return {"type": "forgotten"}

    def request_ping(self, message: Message) -> Message:
        return {"type": "pong"}


class IdentityFactory(ServerFactory):
    """
    Makes L{IdentityProtocol} connections sharing one L{Store}.
    """

    protocol = IdentityProtocol

    def __init__(self, store: Store, **settings: Any) -> None:
        settings.setdefault("maxLength", DEFAULT_MAX_LENGTH)
        super().__init__(**settings)
        self.store = store
        self.stats.enableStore(store)


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
    store = Store(config["db"])
    factory = IdentityFactory(store, **config.factorySettings(reactor))
    return config.makeStoredService("netlab-identity", store, factory)
