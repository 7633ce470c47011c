"""
The life of one served connection, whatever its framing.

  - L{ServedConnection}: the life of one connection as events
    (C{client_connected}, data, C{client_disconnected}), connection caps,
    the idle timeout, per-frame deadlines and one bounded output account;
  - L{FramedServerProtocol}: L{ServedConnection} on L{FrameReceiver} framing;
  - L{ServerFactory}: the connections of one server and their settings.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import StringTooLongError
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_lab.codecs import events
from twisted_lab.codecs.framing import HEADER, HEADER_SIZE, MAX_FRAME, FrameReceiver
from twisted_lab.observe import eventlog
from twisted_lab.observe.eventlog import DataEventMeter
from twisted_lab.observe.metrics import (
    REFUSED_MAX_CONNECTIONS,
    REFUSED_MAX_PER_ADDRESS,
    ServerStats,
)
from twisted_lab.services.context import LogBudget, ServerContext
from twisted_lab.services.limits import RequestLimit, TokenBucket

DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_FRAME_TIMEOUT = 60.0
DEFAULT_FRAME_MIN_RATE = 500.0
DEFAULT_MAX_SEND_QUEUE = 1024 * 1024
#: Bytes all connections of a server together may leave unread before
#: each stops being read as soon as its send buffer is full.
DEFAULT_OUTPUT_BUDGET = 16 * 1024 * 1024
#: How long a closing connection may take to flush what it was sent.
CLOSE_GRACE_SECONDS = 5.0
DEFAULT_MAX_CONNECTIONS = 20_000
DEFAULT_MAX_PER_ADDRESS = 1_000


def canonicalAddress(host: str) -> str:
    """
    A peer's IP address as text, the same whichever way it arrived: an
    IPv4-mapped IPv6 address (C{::ffff:127.0.0.2}, as a dual-stack listener
    sees IPv4 clients) is the IPv4 address, IPv6 is written canonically.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return str(address.ipv4_mapped)
    return str(address)


def addressGroup(host: str) -> str:
    """
    The key a client address is limited by: its L{canonicalAddress}, with
    IPv6 grouped by /64 (one subscriber usually has a whole /64).
    (Twisted's LimitConnectionsByPeer keys by address object and is broken
    on current Twisted, #12183.)
    """
    canonical = canonicalAddress(host)
    if ":" in canonical:
        return str(ipaddress.IPv6Network((canonical, 64), strict=False))
    return canonical


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

    noisy = False  # our own events say when the server starts and stops

    def __init__(
        self,
        *,
        maxLength: int = FrameReceiver.MAX_LENGTH,
        idleTimeout: float | None = 300.0,
        headerTimeout: float | None = DEFAULT_HEADER_TIMEOUT,
        frameTimeout: float | None = DEFAULT_FRAME_TIMEOUT,
        frameMinRate: float | None = DEFAULT_FRAME_MIN_RATE,
        maxSendQueue: int = DEFAULT_MAX_SEND_QUEUE,
        outputSoftBound: int = 0,
        outputBudget: int = DEFAULT_OUTPUT_BUDGET,
        maxConnections: int | None = DEFAULT_MAX_CONNECTIONS,
        maxConnectionsPerAddress: int | None = DEFAULT_MAX_PER_ADDRESS,
        dataEventsPerSecond: int | None = eventlog.DEFAULT_DATA_EVENTS_PER_SECOND,
        clock: IReactorTime | None = None,
        context: ServerContext | None = None,
    ) -> None:
        #: What the services and the dispatcher share with the connections:
        #: the clock, the log, the request limits, the counters.
        if context is None:
            context = ServerContext(clock, Logger(), ServerStats(), maxLength)
        elif clock is not None:
            context.clock = clock
        if context.stats is None:
            context.stats = ServerStats()
        self.context = context
        self.maxLength = maxLength
        self.idleTimeout = idleTimeout
        self.headerTimeout = headerTimeout
        self.frameTimeout = frameTimeout
        self.frameMinRate = frameMinRate
        #: Output backlog (bytes written while the send buffer is full)
        #: past which a connection stops being read, and past which it is
        #: cut off as a slow consumer.
        self.outputSoftBound = outputSoftBound
        self.maxSendQueue = max(maxSendQueue, outputSoftBound)
        #: The backlog of all connections together, and its soft budget.
        self.totalBacklog = 0
        self.outputBudget = outputBudget
        self.maxConnections = maxConnections
        self.maxConnectionsPerAddress = maxConnectionsPerAddress
        self.dataEventsPerSecond = dataEventsPerSecond
        self.connections: set[ServedConnection] = set()
        self.perAddress: dict[str, int] = {}
        self._allGone: list[defer.Deferred[None]] = []
        self._sweeper: IDelayedCall | None = None
        self._nextSweep = 0.0
        #: What the server counts for --metrics (see twisted_lab.observe.metrics).
        self.stats.factory = self

    # The context's clock, log, limits and counters, under the names the
    # connections (and tests) use.

    @property
    def clock(self) -> IReactorTime | None:
        return self.context.clock

    @clock.setter
    def clock(self, clock: IReactorTime | None) -> None:
        self.context.clock = clock

    @property
    def log(self) -> Logger:
        return self.context.log

    @log.setter
    def log(self, log: Logger) -> None:
        self.context.log = log

    @property
    def stats(self) -> ServerStats:
        stats: ServerStats = self.context.stats
        return stats

    @property
    def maxLength(self) -> int:
        return self.context.maxLength

    @maxLength.setter
    def maxLength(self, maxLength: int) -> None:
        self.context.maxLength = maxLength

    @property
    def requestLimits(self) -> dict[str, RequestLimit]:
        return self.context.requestLimits

    @requestLimits.setter
    def requestLimits(self, limits: dict[str, RequestLimit]) -> None:
        self.context.requestLimits = limits

    def now(self) -> float:
        """
        The current time on the server's clock.
        """
        return self.context.now()

    def requestBuckets(self, kind: str) -> tuple[RequestLimit, TokenBucket] | None:
        return self.context.requestBuckets(kind)

    @property
    def logBudget(self) -> LogBudget:
        return self.context.logBudget

    def admit(self, connection: ServedConnection, group: str) -> str | None:
        """
        Count a new connection from address C{group}; or, over a cap, say
        why it is refused (and count nothing).
        """
        if self.maxConnections and len(self.connections) >= self.maxConnections:
            self.stats.refused[REFUSED_MAX_CONNECTIONS] += 1
            return f"the server has its maximum of {self.maxConnections} connections"
        count = self.perAddress.get(group, 0)
        if self.maxConnectionsPerAddress and count >= self.maxConnectionsPerAddress:
            self.stats.refused[REFUSED_MAX_PER_ADDRESS] += 1
            return (
                f"{group} has its maximum of {self.maxConnectionsPerAddress} "
                "connections"
            )
        self.perAddress[group] = count + 1
        self.connections.add(connection)
        self.stats.accepted += 1
        self._startSweeping()
        return None

    def connectionClosed(self, connection: ServedConnection, group: str) -> None:
        if connection not in self.connections:
            return
        self.connections.discard(connection)
        count = self.perAddress.get(group, 0) - 1
        if count > 0:
            self.perAddress[group] = count
        else:
            self.perAddress.pop(group, None)
        if not self.connections:
            self._stopSweeping()
            if self.context.hasLogBudget():
                self.logBudget.flush()
            waiters, self._allGone = self._allGone, []
            for waiter in waiters:
                waiter.callback(None)

    # -- deadlines ---------------------------------------------------------------
    #
    # One timer per server, not one per connection: every few seconds the
    # sweeper looks for connections idle too long or stuck in the middle of
    # a frame.  A read only stores a timestamp, which keeps reads cheap and
    # idle connections small.

    def sweepInterval(self) -> float:
        limits = [
            t for t in (self.idleTimeout, self.headerTimeout, self.frameTimeout) if t
        ]
        return max(0.05, min(5.0, min(limits) / 4)) if limits else 0.0

    def _startSweeping(self, after: float | None = None) -> None:
        """
        Schedule the next sweep one interval after C{after} (the time the
        last sweep was due), or from now: a sweep that ran late does not
        push the ones after it later.
        """
        interval = self.sweepInterval()
        if self._sweeper is None and interval:
            now = self.now()
            due = (now if after is None else after) + interval
            self._nextSweep = due
            self._sweeper = self.clock.callLater(  # type: ignore[union-attr]
                max(0.0, due - now), self._sweep
            )

    def _stopSweeping(self) -> None:
        if self._sweeper is not None:
            if self._sweeper.active():
                self._sweeper.cancel()
            self._sweeper = None

    def _sweep(self) -> None:
        self._sweeper = None
        now = self.now()
        for connection in list(self.connections):
            connection.checkDeadlines(now)
        if self.context.hasLogBudget():
            self.logBudget.tick()
        if self.connections:
            self._startSweeping(after=self._nextSweep)

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
            connection.closeAfterFlush()

        def abortStragglers() -> None:
            for connection in list(self.connections):
                connection.transport.abortConnection()

        timer = self.clock.callLater(timeout, abortStragglers)

        def cancelTimer(result: None) -> None:
            if timer.active():
                timer.cancel()

        done.addCallback(cancelTimer)
        return done


@implementer(IPushProducer)
class OutputAccount:
    """
    The one account of everything a connection writes.

    It is registered as the producer of the connection's transport, which
    calls L{pauseProducing} while its send buffer is over its size (the peer
    is not reading as fast as we write) and L{resumeProducing} once the
    buffer has drained.  Bytes written in between are the I{backlog}: past
    the soft bound the connection stops reading (its own requests wait:
    back-pressure), past the hard bound it is cut off as a slow consumer.
    Replies, broadcasts, private messages and errors all pass through here,
    so no kind of output can grow the server's memory without bound.
    """

    blocked = False
    backlog = 0

    def __init__(self, connection: ServedConnection) -> None:
        self.connection = connection

    def wrote(self, size: int) -> None:
        """
        The connection wrote C{size} bytes: count them if they wait behind
        a full buffer, and pause reading or cut the connection off past the
        bounds.  The soft bound holds while the server's whole backlog is
        within its budget; past it, every connection stops reading as soon
        as its buffer is full (so many clients that each may leave one
        large frame unread cannot add up to unbounded memory).
        """
        if not self.blocked:
            return
        self.backlog += size
        connection = self.connection
        factory = connection.factory
        factory.totalBacklog += size
        # The soft bound is room for the rest of a frame the peer is in the
        # middle of sending (it may write a whole frame before it reads); at
        # a frame boundary reading stops as soon as the buffer is full.
        soft = factory.outputSoftBound if connection.frameStarted is not None else 0
        if self.backlog > factory.maxSendQueue:
            connection.slowConsumer()
        elif self.backlog >= soft or factory.totalBacklog > factory.outputBudget:
            connection.pauseReading(OUTPUT_BACKLOG)

    def _forget(self) -> None:
        self.connection.factory.totalBacklog -= self.backlog
        self.backlog = 0

    def pauseProducing(self) -> None:
        # Called on every write while the buffer is over its size, not only
        # when it fills: count from the first.
        if not self.blocked:
            self.blocked = True
            self._forget()

    def resumeProducing(self) -> None:
        self.blocked = False
        self._forget()
        self.connection.outputDrained()

    def stopProducing(self) -> None:
        self.blocked = False
        self._forget()


#: Reasons a connection stops reading (see L{ServedConnection.pauseReading}).
OUTPUT_BACKLOG = "output backlog"
END_OF_INPUT = "end of input"
CLOSING = "closing"


@implementer(IHalfCloseableProtocol)
class ServedConnection(Protocol):
    """
    The life of one served connection, logged as events, with connection
    caps, an idle timeout, per-frame deadlines, and one bounded output path.

    Subclasses call L{noteReceived} for every read, write only through
    L{write}, and report frame progress with L{trackFrame}.
    """

    factory: ServerFactory
    transport: Any  # a connected transport; see FrameReceiver.transport
    peer = "?"
    address = ""
    group = ""
    meter: DataEventMeter
    output: OutputAccount
    lastActivity = 0.0
    #: The frame now incomplete: when its first byte arrived, when its
    #: header was complete, how many payload bytes have arrived.
    frameStarted: float | None = None
    frameHeaderAt: float | None = None
    framePayload = 0
    #: Why reading is paused (empty: reading).
    _readPauses: frozenset[str] = frozenset()
    _closeTimer: IDelayedCall | None = None
    _cutOff = False
    #: The output account is registered as the transport's producer.
    _accounting = False
    #: The connection is gone: work that finishes later must not act on it.
    lost = False

    @property
    def log(self) -> Logger:
        return self.factory.log

    def connectionMade(self) -> None:
        factory = self.factory
        clock = factory.clock
        assert clock is not None, "factory.clock is set when the service starts"
        address = self.transport.getPeer()
        self.peer = describePeer(address)
        self.address = canonicalAddress(getattr(address, "host", ""))
        self.group = addressGroup(getattr(address, "host", self.peer))
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
        self.lastActivity = clock.seconds()
        self.output = OutputAccount(self)
        refused = factory.admit(self, self.group)
        if refused is not None:
            self.log.warn(
                "refusing {peer}: {reason}",
                event=events.CONNECTION_REFUSED,
                peer=self.peer,
                reason=refused,
            )
            self.refuse(refused)
            return
        self.log.info(
            "client connected: {peer}", event=events.CLIENT_CONNECTED, peer=self.peer
        )
        self.transport.registerProducer(self.output, True)
        self._accounting = True

    @property
    def admitted(self) -> bool:
        return self in self.factory.connections

    def refuse(self, reason: str) -> None:
        """
        Hook: the connection is over a cap and is being closed (a JSON
        service says so in an C{error} first).
        """
        self.transport.abortConnection()

    # -- reading -------------------------------------------------------------------

    def noteReceived(self, nbytes: int) -> float:
        """
        A read of C{nbytes} bytes: log it (or fold it) and reset idleness.
        Returns the time, for callers that need it too.
        """
        factory = self.factory
        now = factory.clock.seconds()  # type: ignore[union-attr]
        self.lastActivity = now
        factory.stats.bytesReceived += nbytes
        self.meter.received(nbytes)
        return now

    def trackFrame(self, now: float, held: int, continued: bool) -> None:
        """
        After a read: C{held} bytes of an incomplete frame (its header
        included) are waiting for the rest; C{continued} says whether they
        belong to the frame that was incomplete before the read.  Each new
        frame gets its own deadlines (see L{checkDeadlines}).
        """
        if not held:
            self.frameStarted = None
            return
        if not continued or self.frameStarted is None:
            self.frameStarted = now
            self.frameHeaderAt = now if held >= HEADER_SIZE else None
        elif self.frameHeaderAt is None and held >= HEADER_SIZE:
            self.frameHeaderAt = now
        self.framePayload = max(0, held - HEADER_SIZE)

    def pauseReading(self, reason: str) -> None:
        """
        Stop reading from the peer for C{reason} (TCP flow control then
        makes the peer wait); reading resumes once every reason is gone.
        """
        if reason in self._readPauses:
            return
        if not self._readPauses and not self.transport.disconnecting:
            self.transport.pauseProducing()
        self._readPauses = self._readPauses | {reason}

    def resumeReading(self, reason: str) -> None:
        if reason not in self._readPauses:
            return
        self._readPauses = self._readPauses - {reason}
        if not self._readPauses and not self.transport.disconnecting:
            # The peer could not send while we did not read: its deadlines
            # (and idleness) count again from now.
            now = self.factory.now()
            self.lastActivity = now
            if self.frameStarted is not None:
                self.frameStarted = now
                if self.frameHeaderAt is not None:
                    self.frameHeaderAt = now
            self.transport.resumeProducing()

    def readingPausedFor(self, reason: str) -> bool:
        return reason in self._readPauses

    def readConnectionLost(self) -> None:
        """
        The peer half-closed: nothing more will arrive.  What did arrive is
        still answered (L{endOfInput}); then the connection closes.
        """
        self._readPauses = self._readPauses | {END_OF_INPUT}
        self.frameStarted = None
        self.endOfInput()

    def writeConnectionLost(self) -> None:
        """
        The peer can no longer receive: nothing we could say would arrive.
        """
        self.transport.abortConnection()

    def endOfInput(self) -> None:
        """
        Hook: the input has ended.  By default everything was answered as
        it arrived, so the connection closes once its output is flushed.
        """
        self.closeAfterFlush()

    # -- writing -------------------------------------------------------------------

    def write(self, data: bytes, now: float | None = None) -> None:
        """
        Write C{data}, through the output account: every byte a service
        sends to a connection comes here.
        """
        if self.lost or self.transport.disconnecting:
            return
        self.transport.write(data)
        self.noteSent(len(data), now)
        self.output.wrote(len(data))

    def writeSequence(self, parts: Sequence[bytes]) -> None:
        """
        L{write} for several pieces (a header and a large payload need
        not be joined first).
        """
        if self.lost or self.transport.disconnecting:
            return
        self.transport.writeSequence(parts)
        size = sum(len(part) for part in parts)
        self.noteSent(size)
        self.output.wrote(size)

    @property
    def outputCongested(self) -> bool:
        """
        True while the connection's own requests must wait for its output.
        """
        return OUTPUT_BACKLOG in self._readPauses

    def outputDrained(self) -> None:
        """
        Called by the output account when the transport's buffer emptied.
        """
        self.resumeReading(OUTPUT_BACKLOG)

    def noteSent(self, nbytes: int, now: float | None = None) -> None:
        """
        A write of C{nbytes} bytes: log it (or fold it).
        """
        self.factory.stats.bytesSent += nbytes
        self.meter.sent(nbytes, now)

    def slowConsumer(self) -> None:
        """
        The peer has let more than C{--max-send-queue} bytes pile up behind
        a full send buffer: cut it off (logged once), so its backlog, and
        the server's memory, stay bounded while everyone else carries on.
        """
        if self._cutOff:
            return
        self._cutOff = True
        self.factory.stats.slowConsumers += 1
        self.log.warn(
            "{peer} cannot keep up ({backlog} bytes waiting); disconnecting",
            event=events.SLOW_CONSUMER,
            peer=self.peer,
            backlog=self.output.backlog,
        )
        self.transport.abortConnection()

    def closeAfterFlush(self) -> None:
        """
        Close once what was written has been sent; abort if the peer does
        not take it within the grace period (a peer that does not read).
        """
        self.pauseReading(CLOSING)
        self.startCloseTimer()
        # Twisted's FileDescriptor does not finish a close while a streaming
        # producer it paused is registered (it resumes the producer when its
        # buffer drains, and stops there): unregister the account first.
        self.output.stopProducing()
        if self._accounting:
            self._accounting = False
            self.transport.unregisterProducer()
        self.transport.loseConnection()

    def startCloseTimer(self) -> None:
        """
        Abort the connection C{CLOSE_GRACE_SECONDS} from now unless it has
        closed by then.
        """
        if self._closeTimer is None:
            clock = self.factory.clock
            assert clock is not None
            self._closeTimer = clock.callLater(
                CLOSE_GRACE_SECONDS, self.transport.abortConnection
            )

    # -- deadlines -----------------------------------------------------------------

    def checkDeadlines(self, now: float) -> None:
        """
        Called by the factory's sweeper: close the connection if it has been
        idle too long, or if the frame now incomplete is overdue: its
        header not complete within C{--header-timeout}, or its payload
        arriving slower than C{--frame-min-rate} after C{--frame-timeout}
        (Apache's C{mod_reqtimeout}: a deadline that grows with each byte).
        """
        if self.transport.disconnecting:
            return
        factory = self.factory
        started = self.frameStarted
        # While we do not read, the peer cannot keep any deadline.
        if started is not None and not self._readPauses:
            headerAt = self.frameHeaderAt
            deadline: float | None = None
            if headerAt is None:
                if factory.headerTimeout:
                    deadline = started + factory.headerTimeout
            elif factory.frameTimeout:
                deadline = headerAt + factory.frameTimeout
                if factory.frameMinRate:
                    deadline += self.framePayload / factory.frameMinRate
            if deadline is not None and now >= deadline:
                self.log.info(
                    "closing {peer}: a frame incomplete for {seconds:.0f} s "
                    "({received} bytes of it received)",
                    event=events.FRAME_TIMEOUT,
                    peer=self.peer,
                    seconds=now - started,
                    received=self.framePayload,
                )
                self.frameTimedOut()
                return
        if factory.idleTimeout:
            idleFor = now - self.lastActivity
            if idleFor >= factory.idleTimeout:
                self.log.info(
                    "closing {peer}: idle for {seconds:.0f} s",
                    event=events.IDLE_TIMEOUT,
                    peer=self.peer,
                    seconds=idleFor,
                )
                self.idleTimedOut()
                self.closeAfterFlush()

    def idleTimedOut(self) -> None:
        """
        Hook: the connection is about to be closed for idleness (a JSON
        service says so in an C{error} first).
        """

    def frameTimedOut(self) -> None:
        """
        Hook: a frame is overdue (a slow sender, or slowloris).  The default
        aborts: the peer is not cooperating, so nothing is waited for.
        """
        self.transport.abortConnection()

    def serverStopping(self) -> None:
        """
        Hook: the server is stopping and will close this connection.
        """

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        if self._closeTimer is not None and self._closeTimer.active():
            self._closeTimer.cancel()
        self.output.stopProducing()
        self.meter.close()
        if self.admitted:
            self.log.info(
                "client disconnected: {peer} ({reason})",
                event=events.CLIENT_DISCONNECTED,
                peer=self.peer,
                reason=reason.getErrorMessage(),
            )
        self.factory.connectionClosed(self, self.group)


class FramedServerProtocol(ServedConnection, FrameReceiver):
    """
    A served connection speaking Int32 frames.
    """

    def connectionMade(self) -> None:
        self.MAX_LENGTH = self.factory.maxLength
        ServedConnection.connectionMade(self)

    def dataReceived(self, data: bytes) -> None:
        if self.transport.disconnecting or CLOSING in self._readPauses:
            return
        now = self.noteReceived(len(data))
        before = self.bufferedByteCount()
        FrameReceiver.dataReceived(self, data)
        after = self.bufferedByteCount()
        self.trackFrame(now, after, continued=before + len(data) == after)

    def sendString(self, string: bytes) -> None:
        if len(string) > MAX_FRAME:
            raise StringTooLongError(f"{len(string)} bytes do not fit in one frame")
        self.factory.stats.framesSent += 1
        self.writeSequence((HEADER.pack(len(string)), string))

    def lengthLimitExceeded(self, length: int) -> None:
        self.log.warn(
            "{peer} announced a {length}-byte frame (limit {limit}); closing",
            event=events.FRAME_TOO_LONG,
            peer=self.peer,
            length=length,
            limit=self.MAX_LENGTH,
        )
        # Nothing after the oversized header is ever read: its payload is
        # not buffered, and what follows it is no longer framed.
        self.pauseReading(CLOSING)
        self.recvd = b""
        self.frameStarted = None
        self.frameTooLong(length)

    def frameTooLong(self, length: int) -> None:
        """
        Hook: what to do about an oversized header, once everything before
        it has been handled.  The default closes after what was already
        answered has been sent (or the grace period ran out).
        """
        self.closeAfterFlush()
