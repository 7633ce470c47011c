"""
Running a netlab server under twistd.

  - L{ServerOptions}: the command-line options shared by every twistd plugin
    (port, interface, endpoint, port file, fallback, limits, event log);
  - L{NetlabService}: listening (with port fallback, bound in
    C{privilegedStartService} so C{--uid} can serve a port below 1024), the
    port file, the JSON event log, and a clean stop that closes every
    connection.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
from typing import Any

from twisted.application import service
from twisted.application.service import IService
from twisted.internet import defer
from twisted.internet.endpoints import quoteStringArgument, serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IListeningPort,
)
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from twisted_lab.bus import busFromURL
from twisted_lab.codecs import events
from twisted_lab.observe import eventlog
from twisted_lab.observe.eventlog import JSONEventLog
from twisted_lab.observe.metrics import (
    MetricsServer,
)
from twisted_lab.runtime.startup import Console, StartupFailed
from twisted_lab.runtime.storeservice import StoreService
from twisted_lab.runtime.systemd import SystemdNotifier, whenOpened
from twisted_lab.storage.engines import storeFromURL
from twisted_lab.storage.sqlite import DEFAULT_PATH as DEFAULT_STORE_PATH
from twisted_lab.transports.connection import (
    DEFAULT_FRAME_MIN_RATE,
    DEFAULT_FRAME_TIMEOUT,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_PER_ADDRESS,
    DEFAULT_MAX_SEND_QUEUE,
    ServerFactory,
)

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


#: Connections the kernel queues before we accept them: Twisted's default
#: (50) stalls a class of 200 connecting at once on SYN retransmits.
LISTEN_BACKLOG = 1024


def tcpDescription(port: int, interface: str) -> str:
    """
    The endpoint description for C{port} on C{interface} (IPv4 or IPv6).
    """
    kind = "tcp6" if ":" in interface else "tcp"
    return (
        f"{kind}:{port}:interface={quoteStringArgument(interface)}"
        f":backlog={LISTEN_BACKLOG}"
    )


class NetlabService(service.Service):
    """
    Runs one server: listens on an endpoint (moving to a free port when the
    requested one is taken, unless told not to), logs the life of the
    server as events, and on stop closes every connection.

    It binds in L{privilegedStartService}, before twistd drops privileges
    (C{--uid}), so a port below 1024 can be served as an unprivileged user;
    a port that cannot be had fails the start with L{StartupFailed}.
    """

    log = Logger()
    port: IListeningPort | None = None

    def __init__(
        self,
        serviceName: str,
        factory: ServerFactory,
        description: str,
        *,
        reactor: Any,
        portFallback: bool = True,
        portFile: str | None = None,
        eventLog: str | None = None,
        closeTimeout: float = 3.0,
        console: Console | None = None,
        eventLogRotateLength: int = eventlog.DEFAULT_EVENT_LOG_ROTATE_LENGTH,
        eventLogMaxRotated: int | None = None,
        eventLogSignal: bool = False,
        metrics: str | None = None,
        notifier: SystemdNotifier | None = None,
    ) -> None:
        self.setName(serviceName)
        self.factory = factory
        self.description = description
        self.reactor = reactor
        self.portFallback = portFallback
        self.portFile = portFile
        self.eventLog = (
            JSONEventLog(
                eventLog,
                rotateLength=eventLogRotateLength,
                maxRotatedFiles=eventLogMaxRotated,
                reactor=reactor if eventLogSignal else None,
            )
            if eventLog
            else None
        )
        self.closeTimeout = closeTimeout
        self.handleSignals = eventLogSignal
        self.console = console or Console(None)
        factory.stats.serviceName = serviceName
        self.metrics = (
            MetricsServer(metrics, factory.stats, reactor) if metrics else None
        )
        self.notifier = notifier or SystemdNotifier(None)
        #: Fires true once what the server needs besides its port is up
        #: (the database); systemd hears READY=1 only then.
        self.readyWhen: Any = None

    def privilegedStartService(self) -> None:
        if self.factory.clock is None:
            self.factory.clock = self.reactor
        if self.eventLog is not None:
            self.eventLog.start()
        self.log.info(
            "{service} starting (pid {pid})",
            event=events.SERVER_STARTED,
            service=self.name,
            pid=os.getpid(),
        )
        outcome: list[Any] = []
        # maybeDeferred: a description that cannot be parsed (a systemd:
        # index with no inherited socket) fails the start with its reason.
        defer.maybeDeferred(self._listen).addBoth(outcome.append)
        if not outcome:
            # Every endpoint netlab documents (tcp, ssl, unix, systemd)
            # listens at once; one that does not is not one we can vouch for.
            raise StartupFailed(
                f"{self.name}: {self.description} did not start listening at once"
            )
        if isinstance(outcome[0], Failure):
            self.console.close()
            raise StartupFailed(self._cannotListen(outcome[0]))
        if self.metrics is not None:
            self._listenForMetrics(self.metrics)
        service.Service.privilegedStartService(self)

    def _listenForMetrics(self, metrics: MetricsServer) -> None:
        outcome: list[Any] = []
        defer.maybeDeferred(metrics.listen).addBoth(outcome.append)
        if not outcome or isinstance(outcome[0], Failure):
            reason = (
                _listenReason(outcome[0], metrics.description)
                if outcome
                else "did not listen at once"
            )
            message = (
                f"{self.name}: {reason}: cannot serve metrics on {metrics.description}"
            )
            self.log.critical("{message}", event=events.LISTEN_FAILED, message=message)
            self.console.close()
            port, self.port = self.port, None
            if port is not None:
                port.stopListening()
            raise StartupFailed(message)

    def startService(self) -> None:
        if self.port is None:
            self.privilegedStartService()
        service.Service.startService(self)
        self.console.close()
        if self.handleSignals:
            _keepAliveOnSIGUSR1()
        # The port file says "ready": it is written once everything started
        # before this service (the store) has, not when the port is bound.
        number = getattr(self.port.getHost(), "port", None) if self.port else None
        if self.portFile and number is not None:
            writePortFile(self.portFile, number)
        if self.metrics is not None:
            self.metrics.startSampling()
        address: Any = self.port.getHost() if self.port is not None else None
        where = (
            f"{address.host} port {address.port}"
            if hasattr(address, "port")
            else str(address)
        )
        self.notifier.ready(
            f"{self.name} serving on {where}",
            self.readyWhen() if self.readyWhen is not None else None,
        )

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
            self.console.say(
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
        return port

    def _cannotListen(self, failure: Failure) -> str:
        # The reason first: twistd's daemon mode passes only the first 100
        # bytes of this to the person waiting for the start.
        port = getattr(failure.value, "port", None)
        where = f"port {port}" if port is not None else self.description
        reason = _listenReason(failure, self.description)
        message = f"{self.name}: {reason}: cannot listen on {where}"
        if failure.check(CannotListenError) and not self.portFallback:
            message += " (--no-port-fallback)"
        self.log.critical("{message}", event=events.LISTEN_FAILED, message=message)
        return message

    def stopService(self) -> defer.Deferred[None]:
        service.Service.stopService(self)
        self.console.close()
        self.notifier.stopping()
        self.log.info(
            "{service} stopping", event=events.SERVER_STOPPING, service=self.name
        )
        if self.metrics is not None:
            self.metrics.stop()
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
            removePortFile(self.portFile)
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


def _listenReason(failure: Failure, description: str) -> str:
    """
    Why listening on endpoint C{description} failed, in a few words.
    """
    if description.startswith("systemd:") and failure.check(IndexError, KeyError):
        return "no such socket from systemd (LISTEN_FDS/PID/FDNAMES)"
    return _socketReason(failure)


def _socketReason(failure: Failure) -> str:
    value = failure.value
    socketError = getattr(value, "socketError", None)
    if socketError is not None:
        return str(getattr(socketError, "strerror", None) or socketError)
    return failure.getErrorMessage()


def _keepAliveOnSIGUSR1() -> None:
    """
    SIGUSR1 means "reopen your logs" (logrotate sends it to every netlab
    unit); when neither twistd (a file log) nor the event log handles it,
    its default action would end the server: ignore it instead.
    """
    with contextlib.suppress(ValueError, OSError):
        if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None):
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def writePortFile(path: str, number: int) -> None:
    """
    Write C{number} to the port file C{path} at once (a reader never sees
    it half written): what says a server is ready.
    """
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="ascii") as f:
        f.write(f"{number}\n")
    os.replace(temporary, path)


def removePortFile(path: str) -> None:
    """
    Remove the port file C{path}, if it is there, as a server stops.
    """
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


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
            "header-timeout",
            None,
            DEFAULT_HEADER_TIMEOUT,
            "Close a connection whose frame header (4 bytes) is not complete "
            "this many seconds after its first byte (0: never).",
            nonNegativeFloat,
        ],
        [
            "frame-timeout",
            None,
            DEFAULT_FRAME_TIMEOUT,
            "Seconds a frame's payload may take, plus one second per "
            "--frame-min-rate bytes received (0: never).",
            nonNegativeFloat,
        ],
        [
            "frame-min-rate",
            None,
            DEFAULT_FRAME_MIN_RATE,
            "Bytes per second a frame's payload must keep up past "
            "--frame-timeout (0: no minimum rate).",
            nonNegativeFloat,
        ],
        [
            "max-send-queue",
            None,
            DEFAULT_MAX_SEND_QUEUE,
            "Bytes a connection may let pile up unread behind a full send "
            "buffer before it is disconnected as a slow consumer.",
            positiveInt,
        ],
        [
            "max-connections",
            None,
            DEFAULT_MAX_CONNECTIONS,
            "Connections served at once (0: no limit).",
            nonNegativeInt,
        ],
        [
            "max-connections-per-address",
            None,
            DEFAULT_MAX_PER_ADDRESS,
            "Connections from one address (IPv6: one /64) at once (0: no limit).",
            nonNegativeInt,
        ],
        [
            "event-log",
            None,
            None,
            "Also write every event as one JSON object per line to this file.",
        ],
        [
            "event-log-rotate-length",
            None,
            eventlog.DEFAULT_EVENT_LOG_ROTATE_LENGTH,
            "Rotate the event log once it holds this many bytes (0: never).",
            nonNegativeInt,
        ],
        [
            "event-log-max-rotated",
            None,
            None,
            "Rotated event logs kept (default: all).",
            positiveInt,
        ],
        [
            "metrics",
            None,
            None,
            "Serve Prometheus metrics at /metrics on this endpoint "
            "(tcp:9100:interface=127.0.0.1).",
        ],
        [
            "data-events-per-second",
            None,
            eventlog.DEFAULT_DATA_EVENTS_PER_SECOND,
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


class StoredServerOptions(ServerOptions):
    """
    Options of a service that keeps state in a store, and may share it (and
    a bus) with other nodes.
    """

    optParameters = [
        [
            "db",
            None,
            DEFAULT_STORE_PATH,
            "The database: a SQLite file, or "
            "postgresql://user:password@host:5432/dbname (shared by nodes).",
        ],
        [
            "bus",
            None,
            None,
            "The bus between nodes: redis://host:6379/0.  Without it (or "
            "with 'local') this node is alone.",
        ],
        [
            "node",
            None,
            None,
            "This node's name in logs and metrics (default: host name and pid).",
        ],
    ]

    def postOptions(self) -> None:
        super().postOptions()
        if self["node"] is None:
            self["node"] = f"{socket.gethostname()}-{os.getpid()}"
        bus = self["bus"]
        if bus is not None and bus != "local" and not bus.startswith("redis://"):
            raise usage.UsageError(
                f"--bus takes redis://host:port/db (or local), not {bus!r}"
            )


# -- wiring: what the options describe -----------------------------------------
#
# The options only parse; these build, from parsed options, the pieces every
# tap's makeService assembles.


def serverSettings(config: ServerOptions, reactor: Any) -> dict[str, Any]:
    """
    The keyword arguments every L{ServerFactory} takes, from C{config},
    with C{reactor} as the clock.
    """
    return {
        "clock": reactor,
        "maxLength": config["max-length"],
        "idleTimeout": config["idle-timeout"] or None,
        "headerTimeout": config["header-timeout"] or None,
        "frameTimeout": config["frame-timeout"] or None,
        "frameMinRate": config["frame-min-rate"] or None,
        "maxSendQueue": config["max-send-queue"],
        "maxConnections": config["max-connections"] or None,
        "maxConnectionsPerAddress": config["max-connections-per-address"] or None,
        "dataEventsPerSecond": config["data-events-per-second"] or None,
    }


def netlabService(
    config: ServerOptions, serviceName: str, factory: ServerFactory
) -> NetlabService:
    """
    The L{NetlabService} C{config} describes, serving C{factory}.
    """
    return NetlabService(
        serviceName,
        factory,
        config["endpoint"],
        reactor=factory.clock,
        portFallback=not config["no-port-fallback"],
        portFile=config["port-file"],
        eventLog=config["event-log"],
        console=Console.ofStandardError(),
        eventLogRotateLength=config["event-log-rotate-length"],
        eventLogMaxRotated=config["event-log-max-rotated"],
        eventLogSignal=True,
        metrics=config["metrics"],
        notifier=SystemdNotifier.fromEnvironment(),
    )


def openStore(config: StoredServerOptions) -> Any:
    """
    The store C{--db} names (not opened yet).
    """
    return storeFromURL(config["db"])


def openBus(config: StoredServerOptions, reactor: Any) -> Any:
    """
    The bus C{--bus} names: Redis, or the in-process bus of a lone node.
    """
    return busFromURL(config["bus"], reactor)


def storedService(
    config: StoredServerOptions,
    serviceName: str,
    store: Any,
    factory: ServerFactory,
    bus: Any = None,
) -> OrderedServices:
    """
    The server C{config} describes, on top of C{store} (and C{bus}): the
    store opens first and closes only after the server has stopped; the bus
    connects before the server listens and closes after it.
    """
    top = OrderedServices()
    storeService = StoreService(store, factory.clock)
    storeService.setServiceParent(top)
    if bus is not None and IService.providedBy(bus):
        bus.setServiceParent(top)
    server = netlabService(config, serviceName, factory)
    server.readyWhen = lambda: whenOpened(storeService)
    server.setServiceParent(top)
    return top
