"""
The web listener of C{netlab-chat --web}: the page and the WebSocket of
L{twisted_lab.transports.web} on an endpoint, as a service of the chat
server's tree.

It listens the way L{twisted_lab.runtime.server.NetlabService} does, with
the same helpers: bound in C{privilegedStartService} (before twistd drops
privileges), a start that cannot listen fails with L{StartupFailed}, the
port file written once started and removed at stop, and on stop it stops
listening and closes its connections.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_lab.codecs import events
from twisted_lab.runtime.server import removePortFile, writePortFile
from twisted_lab.runtime.startup import StartupFailed
from twisted_lab.transports.connection import ServerFactory
from twisted_lab.transports.web import (
    DispatcherFactory,
    OriginPolicy,
    WebFactory,
    serviceDispatchers,
)


class WebService(service.Service):
    """
    The web listener: binds in L{privilegedStartService}, writes its port
    file once started, and on stop stops listening and closes its
    connections.
    """

    log = Logger()
    port: IListeningPort | None = None

    def __init__(
        self,
        description: str,
        factory: WebFactory,
        reactor: Any,
        portFile: str | None = None,
        closeTimeout: float = 3.0,
        serviceName: str = "netlab-chat web",
    ) -> None:
        self.setName(serviceName)
        self.description = description
        self.factory = factory
        self.reactor = reactor
        self.portFile = portFile
        self.closeTimeout = closeTimeout

    def privilegedStartService(self) -> None:
        if self.factory.server.clock is None:
            self.factory.server.clock = self.reactor
        outcome: list[Any] = []
        defer.maybeDeferred(
            lambda: serverFromString(self.reactor, self.description).listen(
                self.factory
            )
        ).addBoth(outcome.append)
        if not outcome or isinstance(outcome[0], Failure):
            reason = (
                outcome[0].getErrorMessage() if outcome else "did not listen at once"
            )
            message = f"{self.name}: {reason}: cannot listen on {self.description}"
            self.log.critical("{message}", event=events.LISTEN_FAILED, message=message)
            raise StartupFailed(message)
        self.port = outcome[0]
        address = self.port.getHost()
        self.log.info(
            "{service} listening on {interface} port {port}",
            event=events.LISTENING,
            service=self.name,
            interface=getattr(address, "host", str(address)),
            port=getattr(address, "port", None),
        )
        service.Service.privilegedStartService(self)

    def startService(self) -> None:
        if self.port is None:
            self.privilegedStartService()
        service.Service.startService(self)
        number = getattr(self.port.getHost(), "port", None) if self.port else None
        if self.portFile and number is not None:
            writePortFile(self.portFile, number)

    def stopService(self) -> defer.Deferred[None]:
        service.Service.stopService(self)
        port, self.port = self.port, None
        d: defer.Deferred[Any] = defer.maybeDeferred(
            port.stopListening if port is not None else lambda: None
        )
        d.addCallback(lambda _: self.factory.closeAll(self.closeTimeout))
        d.addBoth(self._stopped)
        return d

    def _stopped(self, result: Any) -> Any:
        if self.portFile:
            removePortFile(self.portFile)
        return result


def webService(
    description: str,
    server: ServerFactory,
    reactor: Any,
    allowedOrigins: Sequence[str] = (),
    portFile: str | None = None,
    makeDispatcher: DispatcherFactory | None = None,
) -> WebService:
    """
    The web listener of a chat server: the page and the WebSocket on
    endpoint C{description}, its connections counted and limited by
    C{server} (the chat server's factory, whose service answers the
    WebSockets' requests; or C{makeDispatcher(channel)}, in tests).
    """
    if makeDispatcher is None:
        makeDispatcher = serviceDispatchers(server)
    factory = WebFactory(server, makeDispatcher, OriginPolicy(allowedOrigins), reactor)
    return WebService(description, factory, reactor, portFile=portFile)
