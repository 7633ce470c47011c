"""
The server framework every netlab service plugs into.

  - L{ServerOptions}: the command-line options shared by every twistd plugin
    (port, interface, endpoint, port file, fallback, limits, event log);
  - L{ServedConnection}: the life of one connection as events
    (C{client_connected}, data, C{client_disconnected}) plus the idle timeout;
  - L{FramedServerProtocol}: L{ServedConnection} on L{FrameReceiver} framing;
  - L{ServerFactory}: the connections of one server and their settings;
  - L{NetlabService}: listening (with port fallback), the port file, the
    JSON event log, and a clean stop that closes every connection.

A service module (C{echo}, ...) only adds its protocol, factory and options.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import quoteStringArgument, serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IListeningPort,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from twisted_lab import events
from twisted_lab.events import DataEventMeter, JSONEventLog
from twisted_lab.framing import FrameReceiver


def describePeer(address: IAddress) -> str:
    """
    A readable C{host:port} for a peer address (C{[host]:port} for IPv6).
    """
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None:
        return str(address)
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


class ServerFactory(Factory["ServedConnection"]):
    """
    Shared state of one server: its settings, clock and live connections.

    C{clock} is injected (a L{twisted.internet.task.Clock} in tests); when
    it is left as L{None}, L{NetlabService} fills in the reactor at start.
    """

    log = Logger()
    noisy = False  # our own events say when the server starts and stops

    def __init__(
        self,
        *,
        maxLength: int = FrameReceiver.MAX_LENGTH,
        idleTimeout: float | None = 300.0,
        dataEventsPerSecond: int | None = events.DEFAULT_DATA_EVENTS_PER_SECOND,
        clock: IReactorTime | None = None,
    ) -> None:
        self.maxLength = maxLength
        self.idleTimeout = idleTimeout
        self.dataEventsPerSecond = dataEventsPerSecond
        self.clock: IReactorTime | None = clock
        self.connections: set[ServedConnection] = set()
        self._allGone: list[defer.Deferred[None]] = []

    def now(self) -> float:
        """
        The current time on the factory's clock.
        """
        assert self.clock is not None, "the clock is set when the service starts"
        return self.clock.seconds()

    def connectionOpened(self, connection: ServedConnection) -> None:
        self.connections.add(connection)

    def connectionClosed(self, connection: ServedConnection) -> None:
        self.connections.discard(connection)
        if not self.connections:
            waiters, self._allGone = self._allGone, []
            for waiter in waiters:
                waiter.callback(None)

    def closeAll(self, timeout: float = 3.0) -> defer.Deferred[None]:
        """
        Close every connection: politely first (the protocol's
        C{serverStopping} hook, then C{loseConnection}), and abort whatever
        is still open after C{timeout} seconds (a peer that does not read).
        The result fires when all are gone.
        """
        if not self.connections:
            return defer.succeed(None)
        assert self.clock is not None
        done: defer.Deferred[None] = defer.Deferred()
        self._allGone.append(done)
        for connection in list(self.connections):
            connection.serverStopping()
            connection.transport.loseConnection()

        def abortStragglers() -> None:
            for connection in list(self.connections):
                connection.transport.abortConnection()

        timer = self.clock.callLater(timeout, abortStragglers)

        def cancelTimer(result: None) -> None:
            if timer.active():
                timer.cancel()

        done.addCallback(cancelTimer)
        return done


class ServedConnection(Protocol):
    """
    The life of one served connection, logged as events, with an idle
    timeout.  Subclasses call L{noteReceived} for every read and
    L{noteSent} for every write they make.
    """

    factory: ServerFactory
    transport: Any  # a connected transport; see FrameReceiver.transport
    peer = "?"
    meter: DataEventMeter
    _idleCall: IDelayedCall | None = None
    _lastActivity = 0.0

    @property
    def log(self) -> Logger:
        return self.factory.log

    def connectionMade(self) -> None:
        factory = self.factory
        clock = factory.clock
        assert clock is not None, "factory.clock is set when the service starts"
        self.peer = describePeer(self.transport.getPeer())
        # Twisted already gathers each reactor turn's writes into one send;
        # Nagle's algorithm would only hold replies back behind the peer's
        # delayed ACK (a 40 ms stall), so it is turned off.
        setNoDelay = getattr(self.transport, "setTcpNoDelay", None)
        if setNoDelay is not None:
            with contextlib.suppress(OSError):
                setNoDelay(True)
        self.meter = DataEventMeter(
            factory.log, self.peer, clock, factory.dataEventsPerSecond
        )
        factory.connectionOpened(self)
        self.log.info(
            "client connected: {peer}", event=events.CLIENT_CONNECTED, peer=self.peer
        )
        if factory.idleTimeout:
            self._lastActivity = clock.seconds()
            self._idleCall = clock.callLater(factory.idleTimeout, self._checkIdle)

    def noteReceived(self, nbytes: int) -> None:
        """
        A read of C{nbytes} bytes: log it (or fold it) and reset idleness.
        """
        self.meter.received(nbytes)
        if self._idleCall is not None:
            self._lastActivity = self.factory.clock.seconds()  # type: ignore[union-attr]

    def noteSent(self, nbytes: int, now: float | None = None) -> None:
        """
        A write of C{nbytes} bytes: log it (or fold it).
        """
        self.meter.sent(nbytes, now)

    def _checkIdle(self) -> None:
        clock = self.factory.clock
        timeout = self.factory.idleTimeout
        assert clock is not None and timeout
        idleFor = clock.seconds() - self._lastActivity
        if idleFor < timeout:
            self._idleCall = clock.callLater(timeout - idleFor, self._checkIdle)
            return
        self._idleCall = None
        self.log.info(
            "closing {peer}: idle for {seconds:.0f} s",
            event=events.IDLE_TIMEOUT,
            peer=self.peer,
            seconds=idleFor,
        )
        self.idleTimedOut()
        self.transport.loseConnection()

    def idleTimedOut(self) -> None:
        """
        Hook: the connection is about to be closed for idleness (a JSON
        service says so in an C{error} first).
        """

    def serverStopping(self) -> None:
        """
        Hook: the server is stopping and will close this connection.
        """

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._idleCall is not None:
            if self._idleCall.active():
                self._idleCall.cancel()
            self._idleCall = None
        self.meter.close()
        self.log.info(
            "client disconnected: {peer} ({reason})",
            event=events.CLIENT_DISCONNECTED,
            peer=self.peer,
            reason=reason.getErrorMessage(),
        )
        self.factory.connectionClosed(self)


class FramedServerProtocol(ServedConnection, FrameReceiver):
    """
    A served connection speaking Int32 frames.
    """

    def connectionMade(self) -> None:
        self.MAX_LENGTH = self.factory.maxLength
        ServedConnection.connectionMade(self)

    def dataReceived(self, data: bytes) -> None:
        if self.transport.disconnecting:
            return
        self.noteReceived(len(data))
        FrameReceiver.dataReceived(self, data)

    def sendString(self, string: bytes) -> None:
        FrameReceiver.sendString(self, string)
        self.noteSent(len(string) + 4)

    def lengthLimitExceeded(self, length: int) -> None:
        self.log.warn(
            "{peer} announced a {length}-byte frame (limit {limit}); closing",
            event=events.FRAME_TOO_LONG,
            peer=self.peer,
            length=length,
            limit=self.MAX_LENGTH,
        )
        self.frameTooLong(length)

    def frameTooLong(self, length: int) -> None:
        """
        Hook: what to do about an oversized header.  The default aborts at
        once: the payload is never buffered, and nothing queued for a peer
        that may not read is waited for.
        """
        self.transport.abortConnection()


_POSITIONAL_PORT = re.compile(r"^(tcp6?|ssl):(\d+)(?=:|$)")
_KEYWORD_PORT = re.compile(r"(?<=:)port=\d+(?=:|$)")


def fallbackDescription(description: str) -> str | None:
    """
    The same endpoint description on port 0 (any free port), or L{None} for
    an endpoint that has no TCP port to move (a UNIX socket, say).
    """
    kind = description.split(":", 1)[0]
    if kind not in ("tcp", "tcp6", "ssl"):
        return None
    moved, count = _POSITIONAL_PORT.subn(r"\1:0", description)
    if count:
        return moved
    moved, count = _KEYWORD_PORT.subn("port=0", description)
    return moved if count else None


def tcpDescription(port: int, interface: str) -> str:
    """
    The endpoint description for C{port} on C{interface} (IPv4 or IPv6).
    """
    kind = "tcp6" if ":" in interface else "tcp"
    return f"{kind}:{port}:interface={quoteStringArgument(interface)}"


class NetlabService(service.Service):
    """
    Runs one server: listens on an endpoint (moving to a free port when the
    requested one is taken, unless told not to), logs the life of the
    server as events, and on stop closes every connection.
    """

    log = Logger()
    port: IListeningPort | None = None

    def __init__(
        self,
        serviceName: str,
        factory: ServerFactory,
        description: str,
        *,
        portFallback: bool = True,
        portFile: str | None = None,
        eventLog: str | None = None,
        reactor: Any = None,
        closeTimeout: float = 3.0,
    ) -> None:
        self.setName(serviceName)
        self.factory = factory
        self.description = description
        self.portFallback = portFallback
        self.portFile = portFile
        self.eventLog = JSONEventLog(eventLog) if eventLog else None
        self.closeTimeout = closeTimeout
        self._reactor = reactor
        self.listening: defer.Deferred[IListeningPort] | None = None

    @property
    def reactor(self) -> Any:
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    def startService(self) -> None:
        if self.factory.clock is None:
            self.factory.clock = self.reactor
        if self.eventLog is not None:
            self.eventLog.start()
        service.Service.startService(self)
        self.log.info(
            "{service} starting (pid {pid})",
            event=events.SERVER_STARTED,
            service=self.name,
            pid=os.getpid(),
        )
        failures: list[Failure] = []
        self.listening = self._listen()
        self.listening.addErrback(failures.append)
        if failures:
            # TCP endpoints answer at once, before the reactor runs: fail
            # the start itself so twistd exits non-zero with this message.
            raise SystemExit(self._cannotListen(failures[0]))
        if not self.listening.called:
            self.listening.addErrback(self._failedLate)

    def _listen(self) -> defer.Deferred[Any]:
        d = serverFromString(self.reactor, self.description).listen(self.factory)
        return d.addCallbacks(self._listeningOn, self._maybeFallBack)

    def _maybeFallBack(self, failure: Failure) -> Any:
        failure.trap(CannotListenError)
        alternative = fallbackDescription(self.description)
        if not self.portFallback or alternative is None:
            return failure
        d = serverFromString(self.reactor, alternative).listen(self.factory)
        return d.addCallback(self._listeningOn, fallbackFrom=failure)

    def _listeningOn(
        self, port: IListeningPort, fallbackFrom: Failure | None = None
    ) -> IListeningPort:
        self.port = port
        address = port.getHost()
        interface = getattr(address, "host", str(address))
        number = getattr(address, "port", None)
        if fallbackFrom is not None:
            requested = getattr(fallbackFrom.value, "port", "?")
            self.log.warn(
                "port {requested} is not available ({reason}); "
                "serving on port {port} instead",
                event=events.PORT_FALLBACK,
                requested=requested,
                port=number,
                reason=_socketReason(fallbackFrom),
            )
            _console(
                f"netlab: port {requested} is taken; {self.name} is serving on "
                f"{interface} port {number} instead"
            )
        self.log.info(
            "{service} listening on {interface} port {port}",
            event=events.LISTENING,
            service=self.name,
            interface=interface,
            port=number,
        )
        if self.portFile and number is not None:
            _writeAtomically(self.portFile, f"{number}\n")
        return port

    def _cannotListen(self, failure: Failure) -> str:
        message = (
            f"{self.name}: cannot listen on {self.description}: "
            f"{_socketReason(failure)}"
        )
        if failure.check(CannotListenError) and not self.portFallback:
            message += " (and --no-port-fallback was given)"
        self.log.critical("{message}", event=events.LISTEN_FAILED, message=message)
        return message

    def _failedLate(self, failure: Failure) -> None:
        self._cannotListen(failure)
        self.reactor.stop()

    def stopService(self) -> defer.Deferred[None]:
        service.Service.stopService(self)
        self.log.info(
            "{service} stopping", event=events.SERVER_STOPPING, service=self.name
        )
        port, self.port = self.port, None
        d: defer.Deferred[Any] = defer.maybeDeferred(
            port.stopListening if port is not None else lambda: None
        )
        d.addCallback(lambda _: self.factory.closeAll(self.closeTimeout))
        d.addBoth(self._stopped)
        return d

    def _stopped(self, result: Any) -> Any:
        self.log.info(
            "{service} stopped", event=events.SERVER_STOPPED, service=self.name
        )
        if self.portFile:
            try:
                os.unlink(self.portFile)
            except FileNotFoundError:
                pass
        if self.eventLog is not None:
            self.eventLog.stop()
        return result


class OrderedServices(service.MultiService):
    """
    Starts its services in order and stops them in reverse order, each
    only after the one after it has finished stopping: a server finishes
    its in-flight work before the store under it closes.  (Twisted's
    L{MultiService} stops all children at once.)
    """

    def stopService(self) -> defer.Deferred[None]:
        service.Service.stopService(self)
        services = list(self)
        services.reverse()

        async def stopInTurn() -> None:
            for child in services:
                await defer.maybeDeferred(child.stopService)

        return defer.ensureDeferred(stopInTurn())


def _socketReason(failure: Failure) -> str:
    value = failure.value
    socketError = getattr(value, "socketError", None)
    if socketError is not None:
        return str(getattr(socketError, "strerror", None) or socketError)
    return failure.getErrorMessage()


def _writeAtomically(path: str, text: str) -> None:
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="ascii") as f:
        f.write(text)
    os.replace(temporary, path)


def _console(line: str) -> None:
    """
    Tell the person who started the server (twistd redirects C{sys.stderr}
    into the log, so write to the original one; a daemon has none).
    """
    stream = sys.__stderr__
    if stream is not None:
        try:
            stream.write(line + "\n")
            stream.flush()
        except (OSError, ValueError):
            pass  # a detached daemon: the log has the same line


def positiveInt(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError(f"{value} is not a positive integer")
    return number


def portNumber(value: str) -> int:
    number = int(value)
    if not 0 <= number <= 65535:
        raise ValueError(f"{value} is not a port number (0-65535)")
    return number


def nonNegativeInt(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError(f"{value} is negative")
    return number


def nonNegativeFloat(value: str) -> float:
    number = float(value)
    if not number >= 0:
        raise ValueError(f"{value} is not a non-negative number")
    return number


class ServerOptions(usage.Options):
    """
    Options shared by every netlab twistd plugin.  A service subclasses it
    and sets C{defaultPort} and C{defaultMaxLength}.
    """

    defaultPort = 9090
    defaultMaxLength = 1024 * 1024

    optFlags = [
        [
            "no-port-fallback",
            None,
            "Exit with an error when the port is taken instead of "
            "listening on a free one.",
        ],
    ]
    optParameters: list[list[Any]] = [
        ["port", "p", None, "TCP port to listen on (0: any free port).", portNumber],
        ["interface", "i", "127.0.0.1", "Address to listen on."],
        [
            "listen",
            None,
            None,
            "A Twisted server endpoint description (tcp6:9090, "
            "ssl:9443:privateKey=key.pem, unix:/path); overrides "
            "--port and --interface.",
        ],
        ["port-file", None, None, "Write the port being served to this file."],
        ["max-length", None, None, "Largest frame accepted, in bytes.", positiveInt],
        [
            "idle-timeout",
            None,
            300.0,
            "Close a connection that sent nothing for this many seconds (0: never).",
            nonNegativeFloat,
        ],
        [
            "event-log",
            None,
            None,
            "Also write every event as one JSON object per line to this file.",
        ],
        [
            "data-events-per-second",
            None,
            events.DEFAULT_DATA_EVENTS_PER_SECOND,
            "Reads and writes logged one by one per connection per second "
            "before the rest are folded into a summary (0: never fold).",
            nonNegativeInt,
        ],
    ]

    def postOptions(self) -> None:
        if self["port"] is None:
            self["port"] = self.defaultPort
        if self["max-length"] is None:
            self["max-length"] = self.defaultMaxLength
        if self["listen"]:
            self["endpoint"] = self["listen"]
        else:
            self["endpoint"] = tcpDescription(self["port"], self["interface"])

    def factorySettings(self) -> dict[str, Any]:
        """
        The keyword arguments every L{ServerFactory} takes, from options.
        """
        return {
            "maxLength": self["max-length"],
            "idleTimeout": self["idle-timeout"] or None,
            "dataEventsPerSecond": self["data-events-per-second"] or None,
        }

    def makeNetlabService(
        self, serviceName: str, factory: ServerFactory
    ) -> NetlabService:
        """
        The L{NetlabService} these options describe, serving C{factory}.
        """
        return NetlabService(
            serviceName,
            factory,
            self["endpoint"],
            portFallback=not self["no-port-fallback"],
            portFile=self["port-file"],
            eventLog=self["event-log"],
        )
