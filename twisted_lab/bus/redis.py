"""
The bus between cluster nodes over a Redis-protocol server (Redis, Valkey),
with a small RESP2 client of its own on Twisted.

Why not txredisapi (what Synapse uses)?  Version 1.6.0 installs and
imports on Python 3.11 with Twisted 26, and is maintained, but:
  - it imports C{twisted.internet.reactor} at module level and schedules
    its timeouts and reconnections on that global reactor, so importing it
    installs the default reactor (before twistd or a test picks one), and
    neither its reply timeouts nor its reconnection can be driven by a
    L{twisted.internet.task.Clock} in a unit test;
  - while disconnected, its connection handler queues every command until
    a connection comes back, without bound; a bus that is a hint must fail
    them at once instead;
  - it has no keep-alive of its own (Synapse adds a ping loop), no type
    hints, and relies on a private Twisted class (C{basic._PauseableMixin}).
Synapse subclasses its protocol and factory to resubscribe on reconnection
and adds the ping loop; once those parts are ours too, what is left of
txredisapi for this bus is the RESP2 codec: about a hundred lines
(L{twisted_lab.bus.resp}).

Nor L{twisted.application.internet.ClientService}: its C{prepareConnection}
hook (where resubscription belongs) mishandles a connection lost while the
hook runs (Twisted 26.10: its state machine raises C{NoTransition} out of
C{connectionLost}, an unhandled error in the reactor, which trial reports
as a failed test), and that is exactly the server restart this bus must
ride through.  L{_Link} is the small reconnection loop, with
L{backoffPolicy}, that this needs.

Two connections per node, as every Redis client does it: one for PUBLISH
and the shared-state commands, one in subscriber mode.  On each new
subscriber connection every channel is subscribed first, and only then are
the C{onReconnect} callbacks called (the chat service catches up from the
database there: whatever is published after that point reaches it).  A new
connection counts as ready only once the server has answered its set-up
(a PING at least: the kernel of a frozen server accepts connections), and
the commands connection loads every Lua script the bus has run before it
is ready, so that scripts run in the order they were sent (L{RedisBus.eval}).

Memory is bounded: commands awaiting their answer (count and bytes) per
connection, and every reply the parser buffers (L{RespParser}'s limits).
Publishing while disconnected or past those bounds fails its Deferred with
L{BusUnavailable} / L{BusOverloaded}.  A connection that has been silent
for C{pingInterval} seconds is sent a PING; if nothing at all arrives in
the next C{pingTimeout} seconds it is aborted and made again, so a dead
server (or a dead network path) is noticed within about ten seconds, and
the commands it left unanswered fail then.
"""

from __future__ import annotations

import hashlib
import random
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple
from urllib.parse import unquote, urlsplit

from twisted.application.internet import backoffPolicy
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_lab.bus.errors import BusOverloaded, BusUnavailable
from twisted_lab.bus.local import Receivers, checkedCallable
from twisted_lab.bus.resp import (
    Argument,
    RedisError,
    Reply,
    RespParser,
    RespProtocolError,
    encodeCommand,
)
from twisted_lab.codecs import events
from twisted_lab.ports import IBus

DEFAULT_PORT = 6379
#: Distinct Lua scripts a bus remembers to load on each new connection
#: (the callers' scripts are constants: a handful).
MAX_SCRIPTS = 256


class RedisAddress(NamedTuple):
    host: str
    port: int
    db: int
    username: str | None
    password: str | None

    def __str__(self) -> str:
        return f"redis://{self.host}:{self.port}/{self.db}"


def parseRedisURL(url: str) -> RedisAddress:
    """
    C{redis://[[user]:password@]host[:port][/db]}.
    """
    parts = urlsplit(url)
    if parts.scheme == "rediss":
        raise ValueError("redis over TLS (rediss://) is not supported")
    if parts.scheme != "redis":
        raise ValueError(f"not a redis:// URL: {url!r}")
    if not parts.hostname:
        raise ValueError(f"no host in {url!r}")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ValueError(f"bad port in {url!r}") from None
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError(f"the database of {url!r} is not a number")
    return RedisAddress(
        host=parts.hostname,
        port=port,
        db=int(path) if path else 0,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


class _Pending:
    __slots__ = ("deferred", "remaining", "size")

    def __init__(self, deferred: defer.Deferred[Any], remaining: int, size: int):
        self.deferred = deferred
        self.remaining = remaining
        self.size = size


class RespClientProtocol(Protocol):
    """
    One connection to the server: commands pipelined, answered in order.

    @ivar onLost: called with (this protocol, reason) once it is lost,
        after every command awaiting an answer has failed.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        label: str = "redis",
        pingInterval: float = 5.0,
        pingTimeout: float = 5.0,
        maxPending: int = 10_000,
        maxPendingBytes: int = 8 * 1024 * 1024,
        parser: RespParser | None = None,
    ) -> None:
        self._clock = clock
        self.label = label
        self.pingInterval = pingInterval
        self.pingTimeout = pingTimeout
        self.maxPending = maxPending
        self.maxPendingBytes = maxPendingBytes
        self._parser = parser if parser is not None else RespParser()
        self._pending: deque[_Pending] = deque()
        self._pendingBytes = 0
        self._idle: IDelayedCall | None = None
        self._deadline: IDelayedCall | None = None
        self.lost = False
        self._lostWaiters: list[defer.Deferred[None]] = []
        self.onLost: Callable[[RespClientProtocol, Failure], None] | None = None
        #: The digests of the Lua scripts sent to the server with SCRIPT
        #: LOAD on this connection (and not known to be lost since): an
        #: EVALSHA of one of them, sent after, finds it there.
        self.scripts: set[str] = set()

    @property
    def pending(self) -> int:
        """
        Commands sent and not yet answered.
        """
        return len(self._pending)

    def connectionMade(self) -> None:
        self._armIdle()

    def execute(self, *arguments: Argument, replies: int = 1) -> defer.Deferred[Any]:
        """
        Send one command; fires with its reply (the last of C{replies}
        replies), fails with L{RedisError} for an error reply.
        """
        if self.lost or self.transport is None:
            return defer.fail(BusUnavailable(f"{self.label}: not connected"))
        data = encodeCommand(*arguments)
        if (
            len(self._pending) >= self.maxPending
            or self._pendingBytes + len(data) > self.maxPendingBytes
        ):
            return defer.fail(
                BusOverloaded(
                    f"{self.label}: {len(self._pending)} commands"
                    f" ({self._pendingBytes} bytes) await the server"
                )
            )
        deferred: defer.Deferred[Any] = defer.Deferred()
        self._pending.append(_Pending(deferred, replies, len(data)))
        self._pendingBytes += len(data)
        self.transport.write(data)
        return deferred

    def dataReceived(self, data: bytes) -> None:
        self._heard()
        try:
            replies = self._parser.feed(data)
        except RespProtocolError as e:
            self._violation(str(e))
            return
        for reply in replies:
            if self.lost:
                return
            self.replyReceived(reply)

    def replyReceived(self, reply: Reply) -> None:
        self._answer(reply)

    def _answer(self, reply: Reply) -> None:
        if not self._pending:
            self._violation("a reply to no command")
            return
        pending = self._pending[0]
        if not isinstance(reply, RedisError):
            pending.remaining -= 1
            if pending.remaining > 0:
                return
        self._pending.popleft()
        self._pendingBytes -= pending.size
        if isinstance(reply, RedisError):
            pending.deferred.errback(reply)
        else:
            pending.deferred.callback(reply)

    def _violation(self, reason: str) -> None:
        self.log.error(
            "{label}: the server broke the protocol ({reason}): reconnecting",
            event=events.BUS_PROTOCOL_ERROR,
            label=self.label,
            reason=reason,
        )
        self.abort()

    def abort(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    # Keep-alive: anything received is a sign of life.

    def _heard(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None
        self._armIdle()

    def _armIdle(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.reset(self.pingInterval)
        else:
            self._idle = self._clock.callLater(self.pingInterval, self._ping)

    def _ping(self) -> None:
        self._idle = None
        if self.lost:
            return
        self.execute(b"PING").addErrback(lambda _: None)
        if self._deadline is None:
            self._deadline = self._clock.callLater(self.pingTimeout, self._unresponsive)

    def _unresponsive(self) -> None:
        self._deadline = None
        self.log.warn(
            "{label}: nothing from the server for {seconds} seconds: reconnecting",
            event=events.BUS_UNRESPONSIVE,
            label=self.label,
            seconds=self.pingInterval + self.pingTimeout,
        )
        self.abort()

    def whenLost(self) -> defer.Deferred[None]:
        if self.lost:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._lostWaiters.append(waiter)
        return waiter

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        for call in (self._idle, self._deadline):
            if call is not None and call.active():
                call.cancel()
        self._idle = self._deadline = None
        pending, self._pending = self._pending, deque()
        self._pendingBytes = 0
        why = reason.getErrorMessage()
        for waiting in pending:
            waiting.deferred.errback(
                BusUnavailable(f"{self.label}: connection lost ({why})")
            )
        waiters, self._lostWaiters = self._lostWaiters, []
        for waiter in waiters:
            waiter.callback(None)
        if self.onLost is not None:
            self.onLost(self, reason)


class SubscriberProtocol(RespClientProtocol):
    """
    The connection in subscriber mode: C{message} pushes go to
    C{onMessage(channel, payload)}; everything else answers a command.
    """

    onMessage: Callable[[bytes, bytes], None] | None = None

    def replyReceived(self, reply: Reply) -> None:
        if (
            isinstance(reply, list)
            and len(reply) == 3
            and reply[0] == b"message"
            and isinstance(reply[1], bytes)
            and isinstance(reply[2], bytes)
        ):
            if self.onMessage is not None:
                self.onMessage(reply[1], reply[2])
            return
        self._answer(reply)


class _LinkFactory(Factory):
    noisy = False

    def __init__(self, link: _Link) -> None:
        self.link = link

    def buildProtocol(self, addr: IAddress | None) -> RespClientProtocol:
        protocol = self.link.makeProtocol()
        protocol.factory = self
        protocol.onLost = self.link.lost
        return protocol


class _Link:
    """
    One connection kept up: connect, prepare (authenticate, select,
    subscribe), and after a failure or a loss connect again after the
    back-off policy's delay.

    @ivar current: the connected protocol, prepared or not.
    @ivar ready: the connected protocol once prepared.
    """

    log = Logger()

    def __init__(
        self,
        label: str,
        endpoint: IStreamClientEndpoint,
        clock: IReactorTime,
        makeProtocol: Callable[[], RespClientProtocol],
        prepare: Callable[[RespClientProtocol], object],
        retryPolicy: Callable[[int], float],
        onReady: Callable[[RespClientProtocol], None] = lambda protocol: None,
        onDown: Callable[[], None] = lambda: None,
    ) -> None:
        self.label = label
        self._endpoint = endpoint
        self._clock = clock
        self.makeProtocol = makeProtocol
        self._prepare = prepare
        self._retryPolicy = retryPolicy
        self._onReady = onReady
        self._onDown = onDown
        self.current: RespClientProtocol | None = None
        self.ready: RespClientProtocol | None = None
        self.running = False
        self.failedAttempts = 0
        self._connecting: defer.Deferred[Any] | None = None
        self._retry: IDelayedCall | None = None
        self._readyWaiters: list[defer.Deferred[None]] = []

    def start(self) -> None:
        if self.running:
            return
        self.running = True
        self._connect()

    def whenReady(self) -> defer.Deferred[None]:
        if self.ready is not None:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._readyWaiters.append(waiter)
        return waiter

    def _connect(self) -> None:
        self._retry = None
        connecting = self._endpoint.connect(_LinkFactory(self))
        self._connecting = connecting
        connecting.addCallbacks(self._connected, self._connectFailed)

    def _connected(self, protocol: RespClientProtocol) -> None:
        self._connecting = None
        if not self.running:
            protocol.abort()
            return
        if protocol.lost:  # gone before the endpoint said it was there
            self._onDown()
            self._scheduleRetry()
            return
        self.current = protocol
        preparing = defer.maybeDeferred(self._prepare, protocol)
        preparing.addCallbacks(
            lambda _: self._prepared(protocol),
            lambda failure: self._prepareFailed(protocol, failure),
        )

    def _prepared(self, protocol: RespClientProtocol) -> None:
        if protocol is not self.current or protocol.lost:
            return
        self.ready = protocol
        self.failedAttempts = 0
        self.log.info("{label} connected", event=events.BUS_CONNECTED, label=self.label)
        waiters, self._readyWaiters = self._readyWaiters, []
        self._onReady(protocol)
        for waiter in waiters:
            waiter.callback(None)

    def _prepareFailed(self, protocol: RespClientProtocol, failure: Failure) -> None:
        if protocol.lost or protocol is not self.current:
            return  # lost() takes it from here
        self.log.warn(
            "{label}: the server refused the connection's setup ({reason})",
            event=events.BUS_SETUP_FAILED,
            label=self.label,
            reason=failure.getErrorMessage(),
        )
        protocol.abort()

    def _connectFailed(self, failure: Failure) -> None:
        self._connecting = None
        if not self.running:
            return
        self.log.info(
            "{label}: cannot connect ({reason})",
            event=events.BUS_CONNECT_FAILED,
            label=self.label,
            reason=failure.getErrorMessage(),
        )
        self._onDown()
        self._scheduleRetry()

    def lost(self, protocol: RespClientProtocol, reason: Failure) -> None:
        if protocol is not self.current:
            return
        wasReady = self.ready is protocol
        self.current = self.ready = None
        self._onDown()
        if not self.running:
            return
        if wasReady:
            self.log.warn(
                "{label}: connection lost ({reason})",
                event=events.BUS_CONNECTION_LOST,
                label=self.label,
                reason=reason.getErrorMessage(),
            )
        self._scheduleRetry()

    def _scheduleRetry(self) -> None:
        self.failedAttempts += 1
        delay = self._retryPolicy(self.failedAttempts)
        self._retry = self._clock.callLater(delay, self._connect)

    def stop(self, grace: float = 2.0) -> defer.Deferred[None]:
        """
        Stop reconnecting and close the connection (aborted if it does not
        close within C{grace} seconds); fires once it is closed.
        """
        self.running = False
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._connecting is not None:
            self._connecting.cancel()
        waiters, self._readyWaiters = self._readyWaiters, []
        for waiter in waiters:
            waiter.errback(BusUnavailable(f"{self.label}: stopped"))
        protocol = self.current
        if protocol is None or protocol.transport is None:
            return defer.succeed(None)
        closed = protocol.whenLost()
        protocol.transport.loseConnection()
        if not protocol.lost:
            abort = self._clock.callLater(grace, protocol.abort)

            def closedInTime(result: None) -> None:
                if abort.active():
                    abort.cancel()
                return result

            closed.addCallback(closedInTime)
        return closed


def defaultRetryPolicy() -> Callable[[int], float]:
    """
    0.5 s after a loss, doubling up to 5 s, each with up to 0.25 s of jitter
    (nodes restarted together do not reconnect in step).
    """
    return backoffPolicy(
        initialDelay=0.25,
        maxDelay=5.0,
        factor=2.0,
        jitter=lambda: random.random() * 0.25,
    )


@implementer(IBus)
class RedisBus(Service):
    """
    Publish/subscribe between nodes through a Redis-protocol server, and
    the few commands the cluster's shared state needs.

    @param url: C{redis://host:port/db}.
    @param reactor: the reactor (a clock and, unless C{endpoint} is given,
        what connects).
    @param endpoint: where to connect instead of C{url}'s host and port
        (tests).
    """

    name = "bus"
    log = Logger()

    def __init__(
        self,
        url: str,
        reactor: Any,
        *,
        pingInterval: float = 5.0,
        pingTimeout: float = 5.0,
        connectTimeout: float = 5.0,
        maxPending: int = 10_000,
        maxPendingBytes: int = 8 * 1024 * 1024,
        retryPolicy: Callable[[int], float] | None = None,
        endpoint: IStreamClientEndpoint | None = None,
    ) -> None:
        self.address = parseRedisURL(url)
        self._clock: IReactorTime = reactor
        if endpoint is None:
            endpoint = HostnameEndpoint(
                reactor, self.address.host, self.address.port, timeout=connectTimeout
            )
        policy = retryPolicy if retryPolicy is not None else defaultRetryPolicy()
        self.pingInterval = pingInterval
        self.pingTimeout = pingTimeout
        self.maxPending = maxPending
        self.maxPendingBytes = maxPendingBytes
        self._receivers = Receivers()
        self._reconnectCallbacks: list[Callable[..., object]] = []
        #: Channels whose subscription is in effect on the current
        #: subscriber connection (the server answered SUBSCRIBE).
        self._effective: set[str] = set()
        #: Channels with a SUBSCRIBE sent alone and not answered yet: the
        #: command sent (a later one for the channel replaces it).
        self._subscribing: dict[str, defer.Deferred[Any]] = {}
        #: Who waits for a channel's subscription to take effect.
        self._subscribeWaiters: dict[str, list[defer.Deferred[None]]] = {}
        #: The Lua scripts run through this bus (digest -> text), loaded
        #: on each new commands connection before it is ready.
        self._scripts: dict[str, str] = {}
        #: Publications may have been missed, or the server changed, since
        #: the connections were last both ready: a loss of either, or a
        #: first connection that did not come at once.
        self._missed = False
        self._commands = _Link(
            f"bus commands {self.address}",
            endpoint,
            reactor,
            lambda: self._makeProtocol(RespClientProtocol, "commands"),
            self._prepareCommands,
            policy,
            onReady=self._linkReady,
            onDown=self._linkDown,
        )
        self._subscriber = _Link(
            f"bus subscriber {self.address}",
            endpoint,
            reactor,
            self._makeSubscriber,
            self._prepareSubscriber,
            policy,
            onReady=self._subscriberReady,
            onDown=self._subscriberDown,
        )

    # Service

    def startService(self) -> None:
        Service.startService(self)
        self._commands.start()
        self._subscriber.start()

    def stopService(self) -> defer.Deferred[None]:
        Service.stopService(self)
        self._subscribeWaiters.clear()
        stopping = defer.gatherResults(
            [self._commands.stop(), self._subscriber.stop()], consumeErrors=True
        )
        return stopping.addCallback(lambda _: None)

    @property
    def connected(self) -> bool:
        """
        Both connections are up and prepared.
        """
        return self._commands.ready is not None and self._subscriber.ready is not None

    def whenConnected(self) -> defer.Deferred[None]:
        """
        Fires once both connections are up (now, or when they next are).
        """
        both = defer.gatherResults(
            [self._commands.whenReady(), self._subscriber.whenReady()],
            consumeErrors=True,
        )
        return both.addCallback(lambda _: None)

    # Connections

    def _prepare(self, protocol: RespClientProtocol) -> list[defer.Deferred[Any]]:
        steps = []
        address = self.address
        if address.password is not None:
            credentials = [address.password]
            if address.username:
                credentials.insert(0, address.username)
            steps.append(protocol.execute(b"AUTH", *credentials))
        return steps

    def _prepareCommands(self, protocol: RespClientProtocol) -> defer.Deferred[Any]:
        steps = self._prepare(protocol)
        if self.address.db:
            steps.append(protocol.execute(b"SELECT", self.address.db))
        # Every script this bus has run is loaded before the connection
        # counts as ready: after a restart or a failover the server knows
        # none, and an EVALSHA must never meet NOSCRIPT (see eval).
        # (A script the server refuses fails its own eval, not the setup.)
        for sha, script in list(self._scripts.items()):
            self._loadScript(protocol, sha, script).addErrback(lambda _: None)
        steps.append(protocol.execute(b"PING"))
        return defer.gatherResults(steps, consumeErrors=True)

    def _makeProtocol(
        self, kind: type[RespClientProtocol], role: str
    ) -> RespClientProtocol:
        return kind(
            self._clock,
            f"bus {role} {self.address}",
            pingInterval=self.pingInterval,
            pingTimeout=self.pingTimeout,
            maxPending=self.maxPending,
            maxPendingBytes=self.maxPendingBytes,
        )

    def _makeSubscriber(self) -> RespClientProtocol:
        protocol = self._makeProtocol(SubscriberProtocol, "subscriber")
        assert isinstance(protocol, SubscriberProtocol)
        protocol.onMessage = self._message
        return protocol

    def _prepareSubscriber(self, protocol: RespClientProtocol) -> defer.Deferred[Any]:
        steps = self._prepare(protocol)
        steps.append(protocol.execute(b"PING"))
        channels = self._receivers.channels()
        if channels:
            steps.append(
                protocol.execute(b"SUBSCRIBE", *channels, replies=len(channels))
            )
        return defer.gatherResults(steps, consumeErrors=True)

    def _subscriberDown(self) -> None:
        self._effective.clear()
        self._subscribing.clear()
        self._linkDown()

    def _subscriberReady(self, protocol: RespClientProtocol) -> None:
        # The set-up subscribed to every channel it knew of; one added
        # during the set-up takes effect when its own SUBSCRIBE is answered.
        for channel in self._receivers.channels():
            if channel not in self._subscribing:
                self._takenEffect(channel)
        self._linkReady(protocol)

    def _takenEffect(self, channel: str) -> None:
        self._effective.add(channel)
        for waiter in self._subscribeWaiters.pop(channel, []):
            waiter.callback(None)

    def _linkDown(self) -> None:
        self._missed = True

    def _linkReady(self, protocol: RespClientProtocol) -> None:
        # Called once both connections are ready again after either was
        # lost: the server may be another one (a failover) or have lost
        # or rolled back its state (a restart), not only publications.
        if not self._missed or not self.connected:
            return
        self._missed = False
        for callback in list(self._reconnectCallbacks):
            try:
                result = callback()
            except Exception:  # noqa: BLE001 (one callback's bug stays its own)
                self.log.failure(
                    "a bus reconnection callback failed",
                    event=events.BUS_RECONNECT_CALLBACK_FAILED,
                )
                continue
            if isinstance(result, defer.Deferred):
                result.addErrback(
                    lambda failure: self.log.failure(
                        "a bus reconnection callback failed",
                        failure,
                        event=events.BUS_RECONNECT_CALLBACK_FAILED,
                    )
                )

    def _message(self, channel: bytes, payload: bytes) -> None:
        name = channel.decode("utf-8", "replace")
        self._receivers.deliver(name, payload, self._receivers.snapshot(name))

    def _sendSubscription(self, command: bytes, channel: str) -> None:
        protocol = self._subscriber.current
        if protocol is None:
            return  # the next connection subscribes to every channel
        sending = protocol.execute(command, channel)
        if command == b"SUBSCRIBE":
            self._subscribing[channel] = sending

            def answered(_: object) -> None:
                if self._subscribing.get(channel) is sending:
                    del self._subscribing[channel]
                    self._takenEffect(channel)

            sending.addCallback(answered)
        else:
            self._subscribing.pop(channel, None)

        def failed(failure: Failure) -> None:
            if protocol.lost:
                return  # the next connection subscribes to every channel
            self.log.warn(
                "{command} {channel} failed ({reason}): reconnecting",
                event=events.BUS_SUBSCRIPTION_FAILED,
                command=command.decode(),
                channel=channel,
                reason=failure.getErrorMessage(),
            )
            protocol.abort()

        sending.addErrback(failed)

    # IBus

    def publish(self, channel: str, payload: bytes) -> defer.Deferred[Any]:
        """
        Fires with the number of subscriber connections (of every node)
        that received it; fails with L{BusUnavailable} while disconnected.
        """
        if not isinstance(payload, bytes):
            raise TypeError("a bus payload is bytes")
        return self.execute(b"PUBLISH", channel, payload)

    def subscribe(self, channel: str, receiver: object) -> defer.Deferred[None]:
        """
        Fires once the server has answered the channel's SUBSCRIBE (on
        this connection, or on the next one, whose set-up subscribes to
        every channel): what is published from then on reaches
        C{receiver}.  Never fires if the bus stops first.
        """
        if self._receivers.add(channel, receiver):
            self._sendSubscription(b"SUBSCRIBE", channel)
        if channel in self._effective:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._subscribeWaiters.setdefault(channel, []).append(waiter)
        return waiter

    def unsubscribe(self, channel: str, receiver: object) -> None:
        if self._receivers.remove(channel, receiver):
            self._effective.discard(channel)
            # (Nothing to wait for any more: those waiting are told so.)
            for waiter in self._subscribeWaiters.pop(channel, []):
                waiter.callback(None)
            self._sendSubscription(b"UNSUBSCRIBE", channel)

    def onReconnect(self, callback: object) -> None:
        self._reconnectCallbacks.append(checkedCallable(callback, "callback"))

    # Commands (on the commands connection; all fail while disconnected)

    def execute(self, *arguments: Argument) -> defer.Deferred[Any]:
        """
        Any command; fires with its reply.
        """
        protocol = self._commands.ready
        if protocol is None:
            return defer.fail(BusUnavailable(f"not connected to {self.address}"))
        return protocol.execute(*arguments)

    def set(
        self,
        key: str | bytes,
        value: Argument,
        px: int | None = None,
        nx: bool = False,
    ) -> defer.Deferred[bool]:
        """
        SET, expiring after C{px} milliseconds if given; with C{nx}, only
        if the key does not exist.  Fires with whether it was set.
        """
        arguments: list[Argument] = [b"SET", key, value]
        if px is not None:
            arguments += [b"PX", int(px)]
        if nx:
            arguments.append(b"NX")
        return self.execute(*arguments).addCallback(lambda reply: reply == "OK")

    def get(self, key: str | bytes) -> defer.Deferred[bytes | None]:
        return self.execute(b"GET", key)

    def delete(self, *keys: str | bytes) -> defer.Deferred[int]:
        return self.execute(b"DEL", *keys)

    def incr(self, key: str | bytes) -> defer.Deferred[int]:
        return self.execute(b"INCR", key)

    def pexpire(self, key: str | bytes, milliseconds: int) -> defer.Deferred[bool]:
        return self.execute(b"PEXPIRE", key, int(milliseconds)).addCallback(
            lambda reply: reply == 1
        )

    def expire(self, key: str | bytes, seconds: int) -> defer.Deferred[bool]:
        return self.execute(b"EXPIRE", key, int(seconds)).addCallback(
            lambda reply: reply == 1
        )

    def hset(
        self, key: str | bytes, mapping: Mapping[str | bytes, Argument]
    ) -> defer.Deferred[int]:
        """
        Set the fields of C{mapping}; fires with how many were new.
        """
        if not mapping:
            raise ValueError("HSET needs at least one field")
        arguments: list[Argument] = [b"HSET", key]
        for field, value in mapping.items():
            arguments += [field, value]
        return self.execute(*arguments)

    def hgetall(self, key: str | bytes) -> defer.Deferred[dict[bytes, bytes]]:
        def pairs(reply: list[bytes]) -> dict[bytes, bytes]:
            return dict(zip(reply[::2], reply[1::2], strict=True))

        return self.execute(b"HGETALL", key).addCallback(pairs)

    def hdel(self, key: str | bytes, *fields: str | bytes) -> defer.Deferred[int]:
        return self.execute(b"HDEL", key, *fields)

    def eval(
        self,
        script: str,
        keys: Iterable[str | bytes] = (),
        args: Iterable[Argument] = (),
    ) -> defer.Deferred[Any]:
        """
        Run a Lua script atomically, in the order of the commands sent on
        the commands connection (EVALSHA, the script loaded beforehand).

        The order matters to the callers (a join then a leave of one
        member; a resync's chunks and the changes made meanwhile), so a
        script never runs later than a command sent after it: a script
        new to this connection is sent with SCRIPT LOAD, pipelined ahead
        of its EVALSHA, and every script the bus knows is loaded on each
        new connection before it counts as ready.  Should the server lose
        its scripts under a live connection (SCRIPT FLUSH), a NOSCRIPT
        error is answered with EVAL only if nothing was sent behind the
        EVALSHA; otherwise it fails (L{RedisError} NOSCRIPT), as any
        command that could not run, and the caller writes its state again.
        """
        keys = list(keys)
        args = list(args)
        protocol = self._commands.ready
        if protocol is None:
            return defer.fail(BusUnavailable(f"not connected to {self.address}"))
        sha = hashlib.sha1(script.encode("utf-8"), usedforsecurity=False).hexdigest()
        if sha not in self._scripts and len(self._scripts) < MAX_SCRIPTS:
            self._scripts[sha] = script
        if sha not in protocol.scripts:
            refused: list[Failure] = []
            self._loadScript(protocol, sha, script).addErrback(refused.append)
            if refused:  # not sent (overloaded): nor is the script run
                return defer.fail(refused[0])

        def unknown(failure: Failure) -> defer.Deferred[Any] | Failure:
            error = failure.value
            if not (isinstance(error, RedisError) and error.kind == "NOSCRIPT"):
                return failure
            protocol.scripts.discard(sha)
            if protocol is self._commands.ready and protocol.pending == 0:
                # Nothing was sent behind it: run now, it still runs in order.
                return protocol.execute(b"EVAL", script, len(keys), *keys, *args)
            return failure

        running = protocol.execute(b"EVALSHA", sha, len(keys), *keys, *args)
        return running.addErrback(unknown)

    def _loadScript(
        self, protocol: RespClientProtocol, sha: str, script: str
    ) -> defer.Deferred[Any]:
        """
        SCRIPT LOAD on C{protocol}: what is sent after it finds the script.
        """
        protocol.scripts.add(sha)

        def failed(failure: Failure) -> Failure:
            protocol.scripts.discard(sha)
            if failure.check(RedisError):  # refused: not worth loading again
                self._scripts.pop(sha, None)
            return failure

        return protocol.execute(b"SCRIPT", b"LOAD", script).addErrback(failed)
