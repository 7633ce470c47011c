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
    usable, and a bound on consecutive errors.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure

from twisted_lab.server import FramedServerProtocol

DEFAULT_MAX_LENGTH = 64 * 1024
MAX_ID_LENGTH = 128
MAX_INTEGER_DIGITS = 20
#: Consecutive malformed requests after which the server gives up.
MAX_CONSECUTIVE_ERRORS = 20
#: Requests queued behind a slow one before the server stops reading.
MAX_QUEUED_REQUESTS = 64
#: How long a closing connection may take to flush its last error.
CLOSE_GRACE_SECONDS = 5.0

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
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise badRequest('a request needs a string field "type"')
    requestId = obj.get("id")
    if requestId is not None and not _validId(requestId):
        obj.pop("id")
        raise badRequest(
            f'"id" must be a string of at most {MAX_ID_LENGTH} characters or an integer'
        )
    return obj


def _validId(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
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
            if self.minimum is not None and value < self.minimum:
                raise badRequest(f'"{name}" must be at least {self.minimum}')
            if self.maximum is not None and value > self.maximum:
                raise badRequest(f'"{name}" must be at most {self.maximum}')


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


class MessageProtocol(FramedServerProtocol):
    """
    A connection speaking JSON requests and replies.

    Subclasses list their requests in C{requests} (type -> schema) and
    handle each in a method C{request_<type>(message)} returning the reply
    (a dict), L{None} for no reply, or a Deferred of either; raising (or
    failing with) L{RequestError} replies with that error.  Requests are
    handled one at a time, in order, so their effects and replies happen in
    the order they were sent.
    """

    requests: ClassVar[dict[str, Schema]] = {}

    _errorsInARow = 0
    _busy = False
    _queue: deque[bytes] | None = None
    _readingPaused = False
    _closeTimer: IDelayedCall | None = None

    def stringReceived(self, frame: bytes) -> None:
        if self._busy:
            if self._queue is None:
                self._queue = deque()
            self._queue.append(frame)
            if len(self._queue) >= MAX_QUEUED_REQUESTS and not self._readingPaused:
                self._readingPaused = True
                self.transport.pauseProducing()
            return
        self._handle(frame)

    def runExclusively(self, work: Callable[[], Any]) -> None:
        """
        Run C{work} (which may return a Deferred) before any request that
        arrives after this call: used for greetings that need the store.
        """
        self._busy = True
        d = defer.maybeDeferred(work)
        d.addErrback(self._internalError, None)
        d.addBoth(self._next)

    def _handle(self, frame: bytes) -> None:
        requestId: Any = None
        try:
            message = decodeRequest(frame)
            requestId = message.get("id")
            schema = self.requests.get(message["type"])
            if schema is None:
                raise RequestError(
                    "unknown_type", f"unknown request type {message['type'][:64]!r}"
                )
            validate(message, schema)
        except RequestError as e:
            self._replyError(e, requestId)
            return
        self._errorsInARow = 0
        handler = getattr(self, "request_" + message["type"])
        self._busy = True
        d = defer.maybeDeferred(handler, message)
        d.addCallbacks(
            self._replied,
            self._failed,
            callbackArgs=(requestId,),
            errbackArgs=(requestId,),
        )
        d.addBoth(self._next)

    def _replied(self, reply: Message | None, requestId: Any) -> None:
        if reply is not None:
            self.sendMessage(reply, requestId)

    def _failed(self, failure: Failure, requestId: Any) -> None:
        if isinstance(failure.value, RequestError):
            self._replyError(failure.value, requestId)
        else:
            self._internalError(failure, requestId)

    def _internalError(self, failure: Failure, requestId: Any) -> None:
        self.log.failure(
            "request from {peer} failed",
            failure,
            event="internal_error",
            peer=self.peer,
        )
        self.sendMessage(
            RequestError("internal_error", "the server failed to handle that").reply(),
            requestId,
        )

    def _next(self, _: object) -> None:
        self._busy = False
        queue = self._queue
        while queue and not self._busy and not self.transport.disconnecting:
            self._handle(queue.popleft())
        if self._readingPaused and not self._busy and not self.transport.disconnecting:
            self._readingPaused = False
            self.transport.resumeProducing()

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
        self.transport.loseConnection()
        clock = self.factory.clock
        assert clock is not None
        self._closeTimer = clock.callLater(
            CLOSE_GRACE_SECONDS, self.transport.abortConnection
        )

    def frameTooLong(self, length: int) -> None:
        self.closeWithError(
            "frame_too_long",
            f"a {length}-byte frame is over the {self.MAX_LENGTH}-byte limit",
        )

    def refuse(self, reason: str) -> None:
        self.closeWithError("too_many_connections", reason)

    def frameTimedOut(self) -> None:
        self.closeWithError(
            "frame_timeout", "a frame stayed incomplete too long; closing"
        )

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
        if self._closeTimer is not None and self._closeTimer.active():
            self._closeTimer.cancel()
        self._queue = None
        FramedServerProtocol.connectionLost(self, reason)
