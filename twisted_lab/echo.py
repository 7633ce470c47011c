"""
The echo service (C{twistd netlab-echo}): every frame comes back unchanged.

Framed mode (the default) speaks the Int32 framing of
C{docs/protocol.md} section 2.  Because the reply to a run of complete
frames is exactly those bytes, L{FramedEcho} answers each read's complete
frames with one write of the bytes as received: no per-frame objects, no
per-frame writes, which is what lets it outrun the stock
C{Int32StringReceiver} echo even with every read and write logged.

Raw mode (C{--framing raw}) has no framing at all, for C{nc}, C{telnet} and
C{socat}: every byte is sent back as it arrives.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService
from twisted.internet.interfaces import IAddress
from twisted.python.usage import UsageError

from twisted_lab.server import (
    FramedServerProtocol,
    ServedConnection,
    ServerFactory,
    ServerOptions,
)

DEFAULT_PORT = 9090
DEFAULT_MAX_LENGTH = 1024 * 1024


class FramedEcho(FramedServerProtocol):
    """
    Echoes Int32 frames, in order, binary-safe.
    """

    def framesReceived(self, data: bytes, start: int, end: int) -> None:
        reply = data if start == 0 and end == len(data) else data[start:end]
        self.transport.write(reply)
        self.noteSent(len(reply))


class RawEcho(ServedConnection):
    """
    Echoes bytes as they arrive, with no framing.
    """

    def dataReceived(self, data: bytes) -> None:
        self.noteReceived(len(data))
        self.transport.write(data)
        self.noteSent(len(data))


class EchoFactory(ServerFactory):
    """
    Makes L{FramedEcho} or, with C{framing="raw"}, L{RawEcho} connections.
    """

    def __init__(self, framing: str = "int32", **settings: Any) -> None:
        super().__init__(**settings)
        if framing not in FRAMINGS:
            raise ValueError(f"unknown framing {framing!r}")
        self.framing = framing

    def buildProtocol(self, addr: IAddress | None) -> ServedConnection:
        protocol = FRAMINGS[self.framing]()
        protocol.factory = self
        return protocol


FRAMINGS: dict[str, type[ServedConnection]] = {"int32": FramedEcho, "raw": RawEcho}


class Options(ServerOptions):
    """
    Options of C{twistd netlab-echo}.
    """

    synopsis = "[options]"
    longdesc = (
        "Echo every Int32-framed message back (or, with --framing raw, "
        "every byte).  Listens on 127.0.0.1:9090 by default."
    )
    defaultPort = DEFAULT_PORT
    defaultMaxLength = DEFAULT_MAX_LENGTH
    optParameters = [
        ["framing", None, "int32", "int32 (length-prefixed frames) or raw (bytes)."],
    ]

    def postOptions(self) -> None:
        if self["framing"] not in FRAMINGS:
            raise UsageError(
                f"--framing must be one of {', '.join(FRAMINGS)}, "
                f"not {self['framing']!r}"
            )
        super().postOptions()


def makeService(config: Options) -> IService:
    """
    The echo server described by C{config} (called by twistd).
    """
    factory = EchoFactory(framing=config["framing"], **config.factorySettings())
    return config.makeNetlabService("netlab-echo", factory)
