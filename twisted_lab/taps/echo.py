"""
C{twistd netlab-echo}: the echo protocols' options, and the wiring that
makes the running server.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService
from twisted.python.usage import UsageError

from twisted_lab.runtime.server import ServerOptions, netlabService, serverSettings
from twisted_lab.transports.echo import (
    DEFAULT_MAX_LENGTH,
    DEFAULT_PORT,
    FRAMINGS,
    EchoFactory,
)


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


def makeService(config: Options, reactor: Any = None) -> IService:
    """
    The echo server described by C{config}: its services, not yet
    started.  twistd calls it with the options alone, after installing its
    reactor; tests pass their own.
    """
    if reactor is None:
        from twisted.internet import reactor
    settings = serverSettings(config, reactor)
    factory = EchoFactory(framing=config["framing"], **settings)
    return netlabService(config, "netlab-echo", factory)
