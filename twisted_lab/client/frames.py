"""
A Deferred-based netlab client: connect, send frames, await frames.

L{FrameClient} turns the push model of a protocol into calls a client
program can wait on: C{send(payload)}, C{receive()} (the next frame, queued
if it came before anyone asked), C{request(payload)} (both).  Each service's
client (echo, identity, auth, chat) builds on it.  It reports what happens
(connected, sent, received, disconnected) to an optional C{report}
callable, which the command-line client prints on standard error.
"""

from __future__ import annotations

import json
import socket
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, threads
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    connectProtocol,
    wrapClientTLS,
)
from twisted.internet.error import ConnectError, ConnectionDone, ConnectionLost
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure

from twisted_lab.codecs.framing import FrameReceiver
from twisted_lab.codecs.message import encodeMessage

Report = Callable[[str], None]
#: Receives each connection event as a dict with an C{event} field
#: (C{connected}, C{sent}, C{received}, C{disconnected}), for C{--json}.
EventSink = Callable[[dict[str, Any]], None]

#: Error codes a server sends, unprompted, just before it closes.
CLOSING_CODES = frozenset(
    {
        "idle_timeout",
        "server_shutdown",
        "frame_too_long",
        "frame_timeout",
        "too_many_connections",
        "slow_consumer",
        "session_revoked",
        "session_expired",
    }
)

#: The client accepts frames this large by default: it only receives what it
#: asked for, so the limit guards against a broken server, not a hostile one.
CLIENT_MAX_LENGTH = 64 * 1024 * 1024


def _silent(line: str) -> None:
    """
    The default reporter: says nothing.
    """


def _looksLikeTLS(data: bytes) -> bool:
    """
    Whether C{data}, the first bytes from a server, are a TLS record (an
    alert or a handshake): what a TLS port answers a plain client with.
    """
    return len(data) >= 3 and data[0] in (0x15, 0x16) and data[1] == 0x03


class _OwnMessage:
    """
    Shown as the message it was made with, without Twisted's preamble
    ("Connection was closed cleanly: ...").
    """

    args: tuple[Any, ...]

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else type(self).__name__


class ServerSpeaksTLS(_OwnMessage, ConnectionLost):
    """
    The server answered with TLS records: it is a TLS port and the client
    connected without C{--tls}.
    """


class TLSHandshakeLost(_OwnMessage, ConnectionLost):
    """
    A TLS connection closed before the server said anything: most likely
    the port does not speak TLS.
    """


class ClosedWithoutAnswer(_OwnMessage, ConnectionDone):
    """
    A plain connection closed cleanly before the server sent a byte,
    though the client had sent something: a TLS port does that.
    """


class ClosedByServer(_OwnMessage, ConnectionLost):
    """
    The server closed the connection after saying why in an C{error}.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def _cancelTimer(result: Any, timer: Any) -> Any:
    if timer.active():
        timer.cancel()
    return result


class FrameClient(FrameReceiver):
    """
    Client side of an Int32-framed connection, with Deferreds.
    """

    MAX_LENGTH = CLIENT_MAX_LENGTH
    #: Seconds L{close} waits for a clean close before aborting.
    closeTimeout = 3.0
    #: The reactor (an IReactorTime), set by L{connect}; None: no deadline.
    clock: Any = None

    def __init__(
        self,
        report: Report = _silent,
        label: str = "",
        onEvent: EventSink | None = None,
    ) -> None:
        self.report = report
        self.onEvent = onEvent
        self.label = label
        self._heardFrom = False
        self._closeRequested = False
        self._tlsSeen = False
        self._sentSomething = False
        #: Whether this client connected with TLS (set by L{connect}).
        self.tls = False
        # What arrived before anyone asked, and who is waiting: frames here,
        # decoded messages in MessageClient.
        self._inbox: deque[Any] = deque()
        self._waiting: deque[defer.Deferred[Any]] = deque()
        self._lostReason: Failure | None = None
        #: Fires (with None) once the connection is closed, for any reason;
        #: the reason is in C{lostReason}.
        self.disconnected: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        if not self.label:
            peer = self.transport.getPeer()
            self.label = f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}"
        self._clientEvent(f"connected to {self.label}", "connected", server=self.label)

    def _clientEvent(self, text: str, event: str, **fields: Any) -> None:
        """
        Report C{text} for people and C{event} with C{fields} for machines.
        """
        self.report(text)
        if self.onEvent is not None:
            self.onEvent({"event": event, **fields})

    def dataReceived(self, data: bytes) -> None:
        if not self._heardFrom and data:
            self._heardFrom = True
            if _looksLikeTLS(data):
                self._tlsSeen = True
                self.transport.abortConnection()
                return
        super().dataReceived(data)

    def stringReceived(self, frame: bytes) -> None:
        self._clientEvent(f"received {len(frame)} bytes", "received", bytes=len(frame))
        self._enqueue(frame)

    def _enqueue(self, item: Any) -> None:
        if self._waiting:
            self._waiting.popleft().callback(item)
        else:
            self._inbox.append(item)

    def _dequeue(self) -> defer.Deferred[Any]:
        if self._inbox:
            return defer.succeed(self._inbox.popleft())
        if self._lostReason is not None:
            return defer.fail(self._lostReason)
        d: defer.Deferred[Any] = defer.Deferred()
        self._waiting.append(d)
        return d

    def lengthLimitExceeded(self, length: int) -> None:
        self._clientEvent(
            f"server announced a {length}-byte frame; giving up",
            "frame_too_long",
            bytes=length,
        )
        self.transport.abortConnection()

    def send(self, payload: bytes) -> None:
        """
        Send one frame.
        """
        self.sendString(payload)
        self._sentSomething = True
        self._clientEvent(f"sent {len(payload)} bytes", "sent", bytes=len(payload))

    def receive(self) -> defer.Deferred[bytes]:
        """
        The next frame from the server; fails with the disconnection reason
        if the connection is (or becomes) closed first.
        """
        return self._dequeue()

    def request(self, payload: bytes) -> defer.Deferred[bytes]:
        """
        Send C{payload} and wait for the next frame.
        """
        self.send(payload)
        return self.receive()

    @property
    def lostReason(self) -> Failure | None:
        """
        Why the connection closed, once it has.
        """
        return self._lostReason

    def close(self) -> defer.Deferred[None]:
        """
        Close the connection; fires when it is closed.
        """
        self._closeRequested = True
        if self._lostReason is None:
            self.transport.loseConnection()
            if self.clock is not None:
                # A TLS close waits for the peer's close_notify; a peer that
                # never sends it must not keep the client alive.
                timer = self.clock.callLater(
                    self.closeTimeout, self.transport.abortConnection
                )
                self.disconnected.addBoth(_cancelTimer, timer)
        return self.disconnected

    def closeReason(self, reason: Failure) -> Failure:
        """
        Why the connection ended, as the failure waiting calls get: the
        server's TLS or its closing C{error} when it gave one.
        """
        if self._tlsSeen:
            return Failure(
                ServerSpeaksTLS(
                    f"{self.label} speaks TLS: connect with --tls (and --cafile)"
                )
            )
        if (
            self.tls
            and not self._heardFrom
            and not self._closeRequested
            and reason.check(ConnectionLost)
            and not reason.check(ConnectionDone)
        ):
            return Failure(
                TLSHandshakeLost(
                    f"{self.label} closed the connection during the TLS handshake "
                    "(is it a TLS port?)"
                )
            )
        if (
            not self.tls
            and not self._heardFrom
            and not self._closeRequested
            and self._sentSomething
            and reason.check(ConnectionDone)
        ):
            return Failure(
                ClosedWithoutAnswer(
                    f"{self.label} closed the connection without answering "
                    "(a TLS port? try --tls)"
                )
            )
        return reason

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        reason = self.closeReason(reason)
        self._lostReason = reason
        if self._closeRequested or reason.check(ConnectionDone):
            # A close we asked for is a clean one, whatever TLS said.
            self._clientEvent("disconnected", "disconnected")
        else:
            why = reason.getErrorMessage()
            self._clientEvent(f"disconnected: {why}", "disconnected", reason=why)
        waiting, self._waiting = self._waiting, deque()
        for d in waiting:
            d.errback(reason)
        self.disconnected.callback(None)


async def connect(
    reactor: Any,
    host: str,
    port: int,
    client: FrameClient,
    timeout: float = 10.0,
    bindAddress: str | None = None,
    tls: bool = False,
    cafile: str | None = None,
) -> FrameClient:
    """
    Connect C{client} to C{host}:C{port} (names resolved without blocking,
    IPv4 and IPv6 tried as RFC 8305 says), over TLS if asked: the server's
    certificate must be valid for C{host} and signed by C{cafile}'s
    certificate (or, without one, by the system's trusted authorities).
    """
    shown = f"[{host}]" if ":" in host else host
    client.label = f"{shown}:{port}"
    client.clock = reactor
    endpoint: Any
    if bindAddress:
        endpoint = await _boundEndpoint(reactor, host, port, timeout, bindAddress)
    else:
        endpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
    if tls or cafile:
        from twisted.internet import ssl

        if cafile:
            with open(cafile, "rb") as f:
                pem = f.read()
            from OpenSSL.crypto import Error as OpenSSLError

            try:
                trustRoot: Any = ssl.Certificate.loadPEM(pem)
            except OpenSSLError:
                raise OSError(0, "not a PEM certificate", cafile) from None
        else:
            trustRoot = ssl.platformTrust()
        client.tls = True
        endpoint = wrapClientTLS(
            ssl.optionsForClientTLS(host, trustRoot=trustRoot), endpoint
        )
    await connectProtocol(endpoint, client)
    return client


class BindError(ConnectError):
    """
    The local address of C{--bind} cannot reach the server.
    """


async def _boundEndpoint(
    reactor: Any, host: str, port: int, timeout: float, bindAddress: str
) -> Any:
    """
    An endpoint from C{bindAddress} to the first address of C{host} of the
    same family (an IPv6 source cannot reach an IPv4 server).
    """
    family = socket.AF_INET6 if ":" in bindAddress else socket.AF_INET
    version = "IPv6" if family == socket.AF_INET6 else "IPv4"
    try:
        infos = await threads.deferToThreadPool(
            reactor,
            reactor.getThreadPool(),
            socket.getaddrinfo,
            host,
            port,
            family,
            socket.SOCK_STREAM,
        )
    except (OSError, UnicodeError):
        raise BindError(
            string=f"{host} has no {version} address to reach from {bindAddress}"
        ) from None
    address = str(infos[0][4][0])
    kind = TCP6ClientEndpoint if family == socket.AF_INET6 else TCP4ClientEndpoint
    return kind(reactor, address, port, timeout=timeout, bindAddress=(bindAddress, 0))


class ServerError(Exception):
    """
    The server answered a request with an C{error} message.
    """

    def __init__(self, reply: dict[str, Any]) -> None:
        self.code = str(reply.get("code", "unknown"))
        self.message = str(reply.get("message", ""))
        self.reply = reply
        super().__init__(f"{self.code}: {self.message}")


class MessageClient(FrameClient):
    """
    A JSON client: C{call} numbers each request with an C{id} and its
    Deferred fires with the reply carrying it.  Every other message
    (greetings, broadcasts) goes to C{onMessage} as it arrives, for clients
    that show what the server sends at any time (chat); without one, such
    messages wait in order for L{nextMessage} (identity's greeting).
    """

    def __init__(
        self,
        onMessage: Callable[[dict[str, Any]], None] | None = None,
        report: Report = _silent,
        onEvent: EventSink | None = None,
    ) -> None:
        super().__init__(report, onEvent=onEvent)
        self.onMessage = onMessage or self._enqueue
        #: The last error the server sent unprompted with a closing code.
        self.closingError: dict[str, Any] | None = None
        self._calls: dict[int, defer.Deferred[dict[str, Any]]] = {}
        self._nextId = 1

    def stringReceived(self, frame: bytes) -> None:
        self._clientEvent(f"received {len(frame)} bytes", "received", bytes=len(frame))
        try:
            message = json.loads(frame)
        except ValueError:
            self.report("the server sent something that is not JSON")
            return
        if not isinstance(message, dict):
            self.report("the server sent JSON that is not an object")
            return
        if message.get("type") == "error" and message.get("code") in CLOSING_CODES:
            self.closingError = message
        requestId = message.get("id")
        waiting = self._calls.pop(requestId, None) if type(requestId) is int else None
        if waiting is not None:
            message.pop("id")
            waiting.callback(message)
        else:
            self.onMessage(message)

    def nextMessage(self) -> defer.Deferred[dict[str, Any]]:
        """
        The next message the server sent unprompted (when there is no
        C{onMessage}).
        """
        return self._dequeue()

    def call(
        self, message: dict[str, Any], check: bool = True
    ) -> defer.Deferred[dict[str, Any]]:
        """
        Send a request; its reply (an C{error} reply fails with
        L{ServerError} when C{check}).
        """
        requestId = self._nextId
        self._nextId += 1
        d: defer.Deferred[dict[str, Any]] = defer.Deferred()
        self._calls[requestId] = d
        self.send(encodeMessage({**message, "id": requestId}))

        def checked(reply: dict[str, Any]) -> dict[str, Any]:
            if check and reply.get("type") == "error":
                raise ServerError(reply)
            return reply

        return d.addCallback(checked)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        reason = self.closeReason(reason)
        calls, self._calls = self._calls, {}
        for d in calls.values():
            d.errback(reason)
        super().connectionLost(reason)

    def closeReason(self, reason: Failure) -> Failure:
        reason = super().closeReason(reason)
        closing = self.closingError
        if closing is not None and not reason.check(ClosedByServer):
            return Failure(
                ClosedByServer(
                    str(closing.get("code")), str(closing.get("message", ""))
                )
            )
        return reason
