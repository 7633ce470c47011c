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

from twisted.internet import defer

from twisted_lab.codecs import events
from twisted_lab.codecs.errors import ErrorCode
from twisted_lab.codecs.message import (
    Message,
    RequestError,
    Text,
    rfc3339,
)
from twisted_lab.ports import IIdentityStore, IRequestChannel
from twisted_lab.services.context import ServerContext
from twisted_lab.services.handler import RequestHandler
from twisted_lab.services.limits import RequestLimit

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
            ErrorCode.INVALID_NAME, f"a name has at most {MAX_NAME_CHARS} characters"
        )
    name = unicodedata.normalize("NFC", raw.strip())
    if not name:
        raise RequestError(ErrorCode.INVALID_NAME, "the name is empty")
    if len(name) > MAX_NAME_CHARS:
        raise RequestError(
            ErrorCode.INVALID_NAME, f"a name has at most {MAX_NAME_CHARS} characters"
        )
    for char in name:
        if unicodedata.category(char) in FORBIDDEN_CATEGORIES:
            raise RequestError(
                ErrorCode.INVALID_NAME,
                "the name contains a control or invisible character "
                f"(U+{ord(char):04X})",
            )
    return name


class IdentityVisit(RequestHandler):
    """
    One connection to the identity service: greeted as it arrives, then
    its requests.
    """

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

    def __init__(
        self, channel: IRequestChannel, context: ServerContext, store: IIdentityStore
    ) -> None:
        super().__init__(channel, context)
        self.store = store
        #: The key of the client's name: its address, IPv4-mapped IPv6
        #: turned back into IPv4.
        self.address = str(channel.address)

    def greeting(self) -> Any:
        return defer.ensureDeferred(self._greet())

    async def _greet(self) -> None:
        known = await self.store.visit(self.address, rfc3339(self.context.now()))
        if known is None:
            self.log.info(
                "{peer} is not known; asking its name",
                event=events.IDENTITY_ASKED,
                peer=self.peer,
            )
            self.send({"type": "ask_name"})
        else:
            name, visits = known
            self.log.info(
                "{peer} is {name} (visit {visits})",
                event=events.IDENTITY_KNOWN,
                peer=self.peer,
                name=name,
                visits=visits,
            )
            self.send({"type": "welcome", "name": name, "visits": visits})

    async def request_name(self, message: Message) -> Message:
        name = validName(message["name"])
        visits = await self.store.nameAddress(
            self.address, name, rfc3339(self.context.now())
        )
        self.log.info(
            "{peer} is now called {name}",
            event=events.IDENTITY_STORED,
            peer=self.peer,
            name=name,
        )
        return {"type": "welcome", "name": name, "visits": visits}

    async def request_forget(self, message: Message) -> Message:
        await self.store.forgetAddress(self.address)
        self.log.info(
            "{peer} forgotten", event=events.IDENTITY_FORGOTTEN, peer=self.peer
        )
        return {"type": "forgotten"}

    def request_ping(self, message: Message) -> Message:
        return {"type": "pong"}


class IdentityService:
    """
    The identity service: names kept per client address in an
    L{IIdentityStore}.
    """

    def __init__(self, store: IIdentityStore, context: ServerContext) -> None:
        self.store = store
        self.context = context
        context.requestLimits.update(IdentityVisit.limits)
        if context.stats is not None:
            context.stats.enableRequests()
            context.stats.enableStore(store)

    def handlerFor(self, channel: IRequestChannel) -> IdentityVisit:
        return IdentityVisit(channel, self.context, self.store)
