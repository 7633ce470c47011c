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
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import (
    HostnameEndpoint,
    connectProtocol,
    wrapClientTLS,
)
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure

from twisted_lab.framing import FrameReceiver
from twisted_lab.messages import encodeMessage

Report = Callable[[str], None]

#: The client accepts frames this large by default: it only receives what it
#: asked for, so the limit guards against a broken server, not a hostile one.
CLIENT_MAX_LENGTH = 64 * 1024 * 1024


def _silent(line: str) -> None:
    """
    The default reporter: says nothing.
    """


class FrameClient(FrameReceiver):
    """
    Client side of an Int32-framed connection, with Deferreds.
    """

    MAX_LENGTH = CLIENT_MAX_LENGTH

    def __init__(self, report: Report = _silent, label: str = "") -> None:
        self.report = report
        self.label = label
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
        self.report(f"connected to {self.label}")

    def stringReceived(self, frame: bytes) -> None:
        self.report(f"received {len(frame)} bytes")
        self._deliver(frame)

    def _deliver(self, item: Any) -> None:
        if self._waiting:
            self._waiting.popleft().callback(item)
        else:
            self._inbox.append(item)

    def _next(self) -> defer.Deferred[Any]:
        if self._inbox:
            return defer.succeed(self._inbox.popleft())
        if self._lostReason is not None:
            return defer.fail(self._lostReason)
        d: defer.Deferred[Any] = defer.Deferred()
        self._waiting.append(d)
        return d

    def lengthLimitExceeded(self, length: int) -> None:
        self.report(f"server announced a {length}-byte frame; giving up")
        self.transport.abortConnection()

    def send(self, payload: bytes) -> None:
        """
        Send one frame.
        """
        self.sendString(payload)
        self.report(f"sent {len(payload)} bytes")

    def receive(self) -> defer.Deferred[bytes]:
        """
        The next frame from the server; fails with the disconnection reason
        if the connection is (or becomes) closed first.
        """
        return self._next()

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
        self.transport.loseConnection()
        return self.disconnected

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lostReason = reason
        if reason.check(ConnectionDone):
            self.report("disconnected")
        else:
            self.report(f"disconnected: {reason.getErrorMessage()}")
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
    client.label = f"{host}:{port}"
    endpoint: Any = HostnameEndpoint(
        reactor,
        host,
        port,
        timeout=timeout,
        bindAddress=(bindAddress, 0) if bindAddress else None,
    )
    if tls or cafile:
        from twisted.internet import ssl

        if cafile:
            with open(cafile, "rb") as f:
                trustRoot: Any = ssl.Certificate.loadPEM(f.read())
        else:
            trustRoot = ssl.platformTrust()
        endpoint = wrapClientTLS(
            ssl.optionsForClientTLS(host, trustRoot=trustRoot), endpoint
        )
    await connectProtocol(endpoint, client)
    return client


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
    ) -> None:
        super().__init__(report)
        self.onMessage = onMessage or self._deliver
        self._calls: dict[int, defer.Deferred[dict[str, Any]]] = {}
        self._nextId = 1

    def stringReceived(self, frame: bytes) -> None:
        self.report(f"received {len(frame)} bytes")
        try:
            message = json.loads(frame)
        except ValueError:
            self.report("the server sent something that is not JSON")
            return
        if not isinstance(message, dict):
            self.report("the server sent JSON that is not an object")
            return
        waiting = self._calls.pop(message.get("id"), None)  # type: ignore[arg-type]
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
        return self._next()

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
        calls, self._calls = self._calls, {}
        for d in calls.values():
            d.errback(reason)
        super().connectionLost(reason)
