"""
The JSON message layer shared by the identity, auth and chat services.

One place turns a frame into a validated request and a reply into a frame
(C{docs/protocol.md} section 3):

  - L{decodeRequest}: UTF-8, JSON (no C{NaN}, no duplicate keys, no
    absurd integers, nesting that cannot crash the parser), "an object with
    a string C{type}", a valid C{id};
  - L{Schema}: per-type field validation, so handlers never see malformed
    input;
  - L{MessageProtocol}: dispatch to C{request_<type>} methods that may
    return a Deferred, with replies written in request order, every
    malformed frame answered by an C{error} on a connection that stays
    usable, a bound on consecutive errors, a rate per request kind, and a
    queue that waits for the connection's output.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar

from twisted.internet import defer
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure

from twisted_lab import events
from twisted_lab.framing import encodeFrame
from twisted_lab.limits import RequestLimit
from twisted_lab.metrics import INVALID_REQUEST
from twisted_lab.server import FramedServerProtocol

DEFAULT_MAX_LENGTH = 64 * 1024
MAX_ID_LENGTH = 128
MAX_INTEGER_DIGITS = 20
#: Consecutive malformed requests after which the server gives up.
MAX_CONSECUTIVE_ERRORS = 20
#: Requests queued behind a slow one before the server stops reading.
MAX_QUEUED_REQUESTS = 64
#: Integers in requests must fit in 64 signed bits (what every store and
#: client can hold); outside that they are C{bad_request}, never a crash.
MIN_INTEGER = -(2**63)
MAX_INTEGER = 2**63 - 1

Message = dict[str, Any]


class RequestError(Exception):
    """
    A request that gets an C{error} reply with a stable C{code}.
    """

    def __init__(self, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra
        #: The id of the request it answers, when it was found valid before
        #: the error (the dispatcher copies it into the reply).
        self.requestId: Any = None

    def reply(self) -> Message:
        return {
            "type": "error",
            "code": self.code,
            "message": self.message,
            **self.extra,
        }


def badRequest(message: str) -> RequestError:
    return RequestError("bad_request", message)


def _rejectConstant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parseInt(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INTEGER_DIGITS:
        raise ValueError("integer too long")
    return int(text)


def _uniqueKeys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate key in object")
    return result


_decoder = json.JSONDecoder(
    parse_constant=_rejectConstant,
    parse_int=_parseInt,
    object_pairs_hook=_uniqueKeys,
)


def decodeRequest(frame: bytes) -> Message:
    """
    A frame's payload as a request object, or L{RequestError} with code
    C{bad_request} saying what is wrong with it.
    """
    try:
        text = frame.decode("utf-8")
    except UnicodeDecodeError:
        raise badRequest("the frame is not valid UTF-8") from None
    try:
        obj = _decoder.decode(text)
    except RecursionError:
        raise badRequest("the JSON is nested too deeply") from None
    except ValueError as e:
        raise badRequest(f"the frame is not valid JSON ({_firstLine(e)})") from None
    if not isinstance(obj, dict):
        raise badRequest(f"a request must be a JSON object, not {_jsonKind(obj)}")
    requestId = obj.get("id")
    if requestId is not None and not _validId(requestId):
        obj.pop("id")
        raise badRequest(
            f'"id" must be a string of at most {MAX_ID_LENGTH} characters or an integer'
        )
    kind = obj.get("type")
    if not isinstance(kind, str):
        error = badRequest('a request needs a string field "type"')
        error.requestId = requestId
        raise error
    return obj


def _validId(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return MIN_INTEGER <= value <= MAX_INTEGER
    return isinstance(value, str) and len(value) <= MAX_ID_LENGTH and _isUnicode(value)


def _isUnicode(text: str) -> bool:
    """
    False for strings with lone surrogates (C{"\\ud800"} in JSON), which
    cannot be encoded, stored or sent back.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _firstLine(e: Exception) -> str:
    return str(e).splitlines()[0][:200]


def _jsonKind(obj: Any) -> str:
    if isinstance(obj, list):
        return "an array"
    if isinstance(obj, str):
        return "a string"
    if obj is None:
        return "null"
    if isinstance(obj, bool):
        return "a boolean"
    return "a number"


def encodeMessage(message: Mapping[str, Any]) -> bytes:
    """
    A message as compact UTF-8 JSON.
    """
    return json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode(
        "utf-8"
    )


def rfc3339(timestamp: float) -> str:
    """
    C{timestamp} as RFC 3339 UTC with second precision.
    """
    return (
        datetime.fromtimestamp(timestamp, UTC)
        .isoformat(timespec="seconds")
        .replace("+00:00", "Z")
    )


# -- field validation ---------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """
    One field of a request: its JSON type and limits.
    """

    kind: type
    required: bool = True
    maxChars: int | None = None
    minimum: int | None = None
    maximum: int | None = None

    def check(self, name: str, value: Any) -> None:
        kind = self.kind
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise badRequest(f'"{name}" must be an integer')
        if kind is not int and not isinstance(value, kind):
            raise badRequest(f'"{name}" must be {_KIND_NAMES[kind]}')
        if kind is str:
            if self.maxChars is not None and len(value) > self.maxChars:
                raise badRequest(f'"{name}" is longer than {self.maxChars} characters')
            if not _isUnicode(value):
                raise badRequest(f'"{name}" is not valid Unicode')
        if kind is int:
            minimum = MIN_INTEGER if self.minimum is None else self.minimum
            maximum = MAX_INTEGER if self.maximum is None else self.maximum
            if value < minimum:
                raise badRequest(f'"{name}" must be at least {minimum}')
            if value > maximum:
                raise badRequest(f'"{name}" must be at most {maximum}')


_KIND_NAMES = {str: "a string", bool: "a boolean", list: "an array", dict: "an object"}


def Text(maxChars: int = 4096, required: bool = True) -> Field:
    """
    A string field of at most C{maxChars} characters (a generous syntactic
    bound; services apply their own rules after it).
    """
    return Field(str, required=required, maxChars=maxChars)


def Integer(
    minimum: int | None = None, maximum: int | None = None, required: bool = True
) -> Field:
    return Field(int, required=required, minimum=minimum, maximum=maximum)


Schema = dict[str, Field]


def validate(message: Message, schema: Schema) -> None:
    """
    Check C{message} against C{schema}; unknown extra fields are ignored.
    """
    for name, field in schema.items():
        if name not in message or message[name] is None:
            if field.required:
                raise badRequest(f'"{name}" is required')
            message.pop(name, None)
            continue
        field.check(name, message[name])


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
        if queue is not None and len(queue) < MAX_QUEUED_REQUESTS // 2:
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
