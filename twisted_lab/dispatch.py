"""
The one request dispatcher of the JSON services, whatever the transport
(C{docs/protocol.md} section 3).

A transport hands L{RequestDispatcher} each request's bytes (an Int32
frame's payload, a WebSocket text message); the dispatcher decodes it with
L{twisted_lab.codecs.message}, validates it against the handler's schema,
takes it from its rate bucket, runs the handler's C{request_<type>} method
(which may return a Deferred) and sends the replies in request order
through the channel.  Every malformed request is answered by an C{error}
on a connection that stays usable, consecutive errors are bounded, and the
queue waits for the connection's output, so a client that pipelines
without reading cannot make the server build replies without bound.

The handler is the service's per-connection object (an auth or chat
session, an identity visit): it knows nothing of frames or sockets, and the
dispatcher nothing of accounts or rooms.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

from twisted_lab.codecs import events
from twisted_lab.codecs.errors import ErrorCode
from twisted_lab.codecs.message import (
    INVALID_REQUEST,
    Message,
    Outgoing,
    RequestError,
    decodeRequest,
    validate,
)
from twisted_lab.ports import IRequestChannel
from twisted_lab.services.context import ServerContext
from twisted_lab.services.handler import RequestHandler

#: Consecutive malformed requests after which the server gives up.
MAX_CONSECUTIVE_ERRORS = 20
#: Requests queued behind a slow one before the server stops reading.
MAX_QUEUED_REQUESTS = 64
#: Why reading is paused while the queue is long.
QUEUE_FULL = "request queue full"


@dataclass(frozen=True)
class _CloseWith:
    """
    Queued behind the requests that arrived first: say C{code} (if any)
    and close once they have been answered.
    """

    code: str | None = None
    message: str = ""


@dataclass(frozen=True)
class _Work:
    """
    Queued: run C{work} (greetings that need the store) in its turn.
    """

    work: Callable[[], Any]


class RequestDispatcher:
    """
    Runs one connection's requests one at a time, in order, so their
    effects and replies happen in the order they were sent.

    The queue is drained by a loop, never by recursion, however many
    requests are pipelined; it waits while the connection's output is
    backed up, and reading stops (L{QUEUE_FULL}) while it is long.  An
    oversized message or the end of the input is queued too
    (L{closeWith}), so everything before it is answered first.
    """

    def __init__(
        self,
        channel: IRequestChannel,
        handler: RequestHandler,
        context: ServerContext,
    ) -> None:
        self.channel = channel
        self.handler = handler
        self.context = context
        self._queue: deque[bytes | _CloseWith | _Work] = deque()
        self._errorsInARow = 0
        self._busy = False
        self._draining = False
        self._stopped = False
        if handler.greeting is not None:
            self._enqueue(_Work(handler.greeting))

    # -- what the transport calls --------------------------------------------------

    def requestReceived(self, payload: bytes) -> None:
        """
        One request's bytes arrived.
        """
        self.context.stats.framesReceived += 1
        self._enqueue(payload)

    def closeWith(self, code: str | None = None, message: str = "") -> None:
        """
        Once everything received so far is answered, say C{code} in an
        C{error} (if given) and close.
        """
        self._enqueue(_CloseWith(code, message))

    def endOfInput(self) -> None:
        """
        Nothing more will arrive: answer what did, then close.
        """
        self._enqueue(_CloseWith())

    def outputDrained(self) -> None:
        """
        The connection's output drained: requests may go on.
        """
        self._drain()

    @property
    def queueFull(self) -> bool:
        return len(self._queue) >= MAX_QUEUED_REQUESTS

    def connectionLost(self) -> None:
        self._stopped = True
        self._queue.clear()
        self.handler.connectionLost()

    # -- the queue -------------------------------------------------------------------

    def _enqueue(self, item: bytes | _CloseWith | _Work) -> None:
        if self._stopped:
            return
        self._queue.append(item)
        if self.queueFull:
            self.channel.pauseReading(QUEUE_FULL)
        self._drain()

    def _drain(self) -> None:
        """
        Handle queued requests until one has to wait (for the store, a
        hash, or the connection's output), then return; whatever it waits
        for calls this again.
        """
        if self._draining:
            return
        self._draining = True
        queue = self._queue
        channel = self.channel
        try:
            while (
                queue
                and not self._busy
                and not channel.outputCongested
                and not channel.closing
            ):
                d = self._start(queue.popleft())
                if d is not None:
                    self._busy = True
                    d.addBoth(self._finished)
        finally:
            self._draining = False
        if len(queue) < MAX_QUEUED_REQUESTS // 2 and not self._stopped:
            # (The transport may deliver held-back requests now, which can
            # fill the queue and pause once more: not re-entered meanwhile.)
            channel.resumeReading(QUEUE_FULL)

    def _finished(self, _: object) -> None:
        self._busy = False
        self._drain()

    def _start(self, item: bytes | _CloseWith | _Work) -> defer.Deferred[Any] | None:
        """
        Start one queued item; a Deferred if it has work in flight.
        """
        if isinstance(item, bytes):
            return self._handle(item)
        if isinstance(item, _Work):
            d = defer.maybeDeferred(item.work)
            d.addErrback(self._internalError, None)
            return d
        if item.code is not None:
            self.reply({"type": "error", "code": item.code, "message": item.message})
        self.channel.closeAfterFlush()
        return None

    def _handle(self, payload: bytes) -> defer.Deferred[Any] | None:
        handler = self.handler
        stats = self.context.stats
        requestId: Any = None
        kind: Any = None
        try:
            message = decodeRequest(payload)
            requestId = message.get("id")
            kind = message["type"]
            schema = handler.requests.get(kind)
            if schema is None:
                raise RequestError(
                    ErrorCode.UNKNOWN_TYPE, f"unknown request type {kind[:64]!r}"
                )
            validate(message, schema)
            self._errorsInARow = 0
            self._checkRate(kind)
        except RequestError as e:
            stats.countRequest(
                kind if kind in handler.requests else INVALID_REQUEST, e.code
            )
            self._replyError(e, e.requestId if requestId is None else requestId)
            return None
        method = getattr(handler, "request_" + kind)
        started = time.perf_counter()
        d = defer.maybeDeferred(method, message)
        d.addBoth(stats.requestFinished, kind, started)
        d.addCallbacks(
            self._replied,
            self._failed,
            callbackArgs=(requestId,),
            errbackArgs=(requestId,),
        )
        return d

    def _checkRate(self, kind: str) -> None:
        """
        Take one request of C{kind} from its bucket, or fail with
        C{rate_limited} and how long to wait.
        """
        found = self.context.requestBuckets(kind)
        if found is None:
            return
        limit, buckets = found
        user = self.handler.rateKey() if limit.perUser else None
        key = f"u:{user}" if user is not None else f"c:{self.channel.serial}"
        wait = buckets.take(key)
        if wait:
            raise self.handler.rateLimited(wait, kind)

    # -- replies ---------------------------------------------------------------------

    def reply(self, message: Message, requestId: Any = None) -> None:
        """
        Send one message; C{requestId} (if any) is copied into it.
        """
        if requestId is not None:
            message = {**message, "id": requestId}
        if not self.channel.closing:
            self.channel.send(Outgoing(message))

    def _replied(self, reply: Message | None, requestId: Any) -> None:
        if reply is not None:
            self.reply(reply, requestId)

    def _failed(self, failure: Failure, requestId: Any) -> None:
        if isinstance(failure.value, RequestError):
            self._replyError(failure.value, requestId)
        else:
            self._internalError(failure, requestId)

    def _internalError(self, failure: Failure, requestId: Any) -> None:
        """
        A bug or an outage: the client hears C{internal_error}; the log
        gets the traceback, within the log budget (a request that fails the
        same way thousands of times writes a few tracebacks and a count).
        """
        context = self.context
        if context.logBudget.admit(events.INTERNAL_ERROR):
            context.log.failure(
                "request from {peer} failed",
                failure,
                event=events.INTERNAL_ERROR,
                peer=self.channel.peer,
            )
        self.reply(
            RequestError(
                ErrorCode.INTERNAL_ERROR, "the server failed to handle that"
            ).reply(),
            requestId,
        )

    def _replyError(self, error: RequestError, requestId: Any) -> None:
        self.reply(error.reply(), requestId)
        if error.code == ErrorCode.BAD_REQUEST or error.code == ErrorCode.UNKNOWN_TYPE:
            self._errorsInARow += 1
            if self._errorsInARow >= MAX_CONSECUTIVE_ERRORS:
                self.reply(
                    {
                        "type": "error",
                        "code": ErrorCode.BAD_REQUEST,
                        "message": f"{MAX_CONSECUTIVE_ERRORS} malformed requests "
                        "in a row; closing",
                    }
                )
                self.channel.closeAfterFlush()
