"""
The JSON request dispatcher of the identity, auth and chat services, on
Int32 frames (C{docs/protocol.md} section 3).

L{MessageProtocol} decodes each frame with L{twisted_lab.codecs.message}, dispatches
it to a C{request_<type>} method that may return a Deferred, and writes the
replies in request order: every malformed frame is answered by an C{error}
on a connection that stays usable, consecutive errors are bounded, each
request kind has a rate, and the queue waits for the connection's output.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from twisted.internet import defer
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure

from twisted_lab.codecs import events
from twisted_lab.codecs.framing import FrameReceiver, encodeFrame
from twisted_lab.codecs.message import (
    Message,
    RequestError,
    Schema,
    decodeRequest,
    encodeMessage,
    validate,
)
from twisted_lab.runtime.metrics import INVALID_REQUEST
from twisted_lab.services.limits import RequestLimit
from twisted_lab.transports.connection import FramedServerProtocol

#: Consecutive malformed requests after which the server gives up.
MAX_CONSECUTIVE_ERRORS = 20
#: Requests queued behind a slow one before the server stops reading.
MAX_QUEUED_REQUESTS = 64


# -- the protocol -------------------------------------------------------------


QUEUE_FULL = "request queue full"
_serials = itertools.count(1)


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


class MessageProtocol(FramedServerProtocol):
    """
    A connection speaking JSON requests and replies.

    Subclasses list their requests in C{requests} (type -> schema) and their
    rates in C{limits} (type -> L{RequestLimit}), and handle each request in
    a method C{request_<type>(message)} returning the reply (a dict),
    L{None} for no reply, or a Deferred of either; raising (or failing with)
    L{RequestError} replies with that error.

    Requests are handled one at a time, in order, so their effects and
    replies happen in the order they were sent.  The queue is drained by a
    loop, never by recursion, however many requests are pipelined; it
    waits while the connection's output is backed up (so a client that
    does not read cannot make the server build replies without bound) and
    reading stops while it is long.  An oversized frame or the end of the
    input is queued too, so everything before it is answered first.
    """

    requests: ClassVar[dict[str, Schema]] = {}
    limits: ClassVar[dict[str, RequestLimit]] = {}

    _errorsInARow = 0
    _serial = 0
    _busy = False
    _draining = False
    _resuming = False
    _queue: deque[bytes | _CloseWith | _Work] | None = None

    def stringReceived(self, frame: bytes) -> None:
        self.factory.stats.framesReceived += 1
        self._enqueue(frame)

    def runExclusively(self, work: Callable[[], Any]) -> None:
        """
        Run C{work} (which may return a Deferred) before any request that
        arrives after this call: used for greetings that need the store.
        """
        self._enqueue(_Work(work))

    def _enqueue(self, item: bytes | _CloseWith | _Work) -> None:
        queue = self._queue
        if queue is None:
            queue = self._queue = deque()
        queue.append(item)
        if len(queue) >= MAX_QUEUED_REQUESTS:
            # Stop reading, and hold the rest of this read as bytes (not as
            # queued frames): the queue stays bounded whatever a read holds.
            self.paused = True
            self.pauseReading(QUEUE_FULL)
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
        try:
            while (
                queue
                and not self._busy
                and not self.outputCongested
                and not self.transport.disconnecting
            ):
                d = self._start(queue.popleft())
                if d is not None:
                    self._busy = True
                    d.addBoth(self._finished)
        finally:
            self._draining = False
        if (
            self.paused
            and queue is not None
            and len(queue) < MAX_QUEUED_REQUESTS // 2
            and not self._resuming
        ):
            # Deliver the frames held back, then read again.  (Delivering
            # may fill the queue and pause once more; this loop is not
            # re-entered meanwhile.)
            self._resuming = True
            try:
                self.paused = False
                FrameReceiver.dataReceived(self, b"")
            finally:
                self._resuming = False
            if not self.paused:
                self.resumeReading(QUEUE_FULL)

    def _finished(self, _: object) -> None:
        self._busy = False
        self._drain()

    def outputDrained(self) -> None:
        FramedServerProtocol.outputDrained(self)
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
            self.sendMessage(
                {"type": "error", "code": item.code, "message": item.message}
            )
        self.closeAfterFlush()
        return None

    def _handle(self, frame: bytes) -> defer.Deferred[Any] | None:
        requestId: Any = None
        kind: Any = None
        try:
            message = decodeRequest(frame)
            requestId = message.get("id")
            kind = message["type"]
            schema = self.requests.get(kind)
            if schema is None:
                raise RequestError(
                    "unknown_type", f"unknown request type {kind[:64]!r}"
                )
            validate(message, schema)
            self._errorsInARow = 0
            self.checkRate(kind)
        except RequestError as e:
            self.factory.stats.countRequest(
                kind if kind in self.requests else INVALID_REQUEST, e.code
            )
            self._replyError(e, e.requestId if requestId is None else requestId)
            return None
        handler = getattr(self, "request_" + kind)
        started = time.perf_counter()
        d = defer.maybeDeferred(handler, message)
        d.addBoth(self.factory.stats.requestFinished, kind, started)
        d.addCallbacks(
            self._replied,
            self._failed,
            callbackArgs=(requestId,),
            errbackArgs=(requestId,),
        )
        return d

    @property
    def serial(self) -> int:
        """
        A number no other connection of this process has had (unlike
        C{id(self)}, never reused), for per-connection buckets.
        """
        if not self._serial:
            self._serial = next(_serials)
        return self._serial

    def rateKey(self) -> str | None:
        """
        Whose bucket per-user limits draw from: the logged-in user (shared
        by all of their connections), or L{None} for this connection.
        """
        return None

    def checkRate(self, kind: str) -> None:
        """
        Take one request of C{kind} from its bucket, or fail with
        C{rate_limited} and how long to wait.
        """
        found = self.factory.requestBuckets(kind)
        if found is None:
            return
        limit, buckets = found
        user = self.rateKey() if limit.perUser else None
        key = f"u:{user}" if user is not None else f"c:{self.serial}"
        wait = buckets.take(key)
        if wait:
            raise self.rateLimited(wait, kind)

    def rateLimited(self, seconds: float, what: str) -> RequestError:
        """
        The C{rate_limited} error for C{what}, logged (within the log
        budget: a flood of them folds into one summary).
        """
        retry = max(1, math.ceil(seconds))
        self.factory.stats.rateLimited += 1
        if self.factory.logBudget.admit(events.RATE_LIMITED):
            self.log.info(
                "{peer}: {what} rate limited for {retry_after} s",
                event=events.RATE_LIMITED,
                peer=self.peer,
                what=what,
                retry_after=retry,
            )
        return RequestError(
            "rate_limited",
            f"too many {what} requests; try again in {retry} s",
            retry_after=retry,
        )

    def _replied(self, reply: Message | None, requestId: Any) -> None:
        if reply is not None:
            self.sendMessage(reply, requestId)

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
        if self.factory.logBudget.admit(events.INTERNAL_ERROR):
            self.log.failure(
                "request from {peer} failed",
                failure,
                event=events.INTERNAL_ERROR,
                peer=self.peer,
            )
        self.sendMessage(
            RequestError("internal_error", "the server failed to handle that").reply(),
            requestId,
        )

    def _replyError(self, error: RequestError, requestId: Any) -> None:
        self.sendMessage(error.reply(), requestId)
        if error.code == "bad_request" or error.code == "unknown_type":
            self._errorsInARow += 1
            if self._errorsInARow >= MAX_CONSECUTIVE_ERRORS:
                self.closeWithError(
                    "bad_request",
                    f"{MAX_CONSECUTIVE_ERRORS} malformed requests in a row; closing",
                )

    def sendMessage(self, message: Message, requestId: Any = None) -> None:
        """
        Send one message; C{requestId} (if any) is copied into it.
        """
        if requestId is not None:
            message = {**message, "id": requestId}
        if not self.transport.disconnecting:
            self.sendString(encodeMessage(message))

    def closeWithError(self, code: str, message: str) -> None:
        """
        Say why in an C{error}, then close; abort if the peer does not let
        the error be delivered within a few seconds.
        """
        self.sendMessage({"type": "error", "code": code, "message": message})
        self.closeAfterFlush()

    def frameTooLong(self, length: int) -> None:
        # Answer what came before the oversized header first, then say so;
        # the grace period runs from now, whatever the queue waits for.
        self.startCloseTimer()
        self._enqueue(
            _CloseWith(
                "frame_too_long",
                f"a {length}-byte frame is over the {self.MAX_LENGTH}-byte limit",
            )
        )

    def endOfInput(self) -> None:
        self._enqueue(_CloseWith())

    def refuse(self, reason: str) -> None:
        self.closeWithError("too_many_connections", reason)

    def frameTimedOut(self) -> None:
        self.closeWithError(
            "frame_timeout", "a frame stayed incomplete too long; closing"
        )

    def slowConsumer(self) -> None:
        if not self.transport.disconnecting:
            # Most likely never read; said for a peer that reads again at last.
            self.transport.write(
                encodeFrame(
                    encodeMessage(
                        {
                            "type": "error",
                            "code": "slow_consumer",
                            "message": "you are not reading fast enough; disconnecting",
                        }
                    )
                )
            )
        FramedServerProtocol.slowConsumer(self)

    def idleTimedOut(self) -> None:
        self.sendMessage(
            {
                "type": "error",
                "code": "idle_timeout",
                "message": "closing an idle connection",
            }
        )

    def serverStopping(self) -> None:
        self.sendMessage(
            {
                "type": "error",
                "code": "server_shutdown",
                "message": "the server is shutting down",
            }
        )

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._queue = None
        FramedServerProtocol.connectionLost(self, reason)
