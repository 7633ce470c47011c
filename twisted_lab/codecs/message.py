"""
The JSON message codec of the identity, auth and chat services: bytes to
a validated request, a reply to bytes (C{docs/protocol.md} section 3).

  - L{decodeRequest}: UTF-8, JSON (no C{NaN}, no duplicate keys, no
    absurd integers, nesting that cannot crash the parser), "an object with
    a string C{type}", a valid C{id};
  - L{Schema}: per-type field validation, so handlers never see malformed
    input;
  - L{RequestError}: an error reply with a stable code;
  - L{encodeMessage}, L{Outgoing}, L{rfc3339}: what goes back (a
    broadcast encoded once per wire format).

It knows nothing of connections, framing or Twisted, so every transport
(Int32 frames today) and the client use the same rules.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

T = TypeVar("T")

DEFAULT_MAX_LENGTH = 64 * 1024
MAX_ID_LENGTH = 128
MAX_INTEGER_DIGITS = 20
#: Integers in requests must fit in 64 signed bits (what every store and
#: client can hold); outside that they are C{bad_request}, never a crash.
MIN_INTEGER = -(2**63)
MAX_INTEGER = 2**63 - 1

Message = dict[str, Any]

#: The C{type} metrics label of a request that could not be decoded or has
#: a type the service does not know (a client chooses the type: never a
#: label of its own).
INVALID_REQUEST = "invalid"


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


class Outgoing:
    """
    Server messages on their way to one or many connections, encoded at
    most once per wire format however many connections receive them.

    The service builds one for a broadcast and hands the same object to
    every member; each transport asks for its own form (L{form}), made
    from the messages the first time and kept, so a room of 200 costs one
    JSON encoding and one Int32 framing, not 200.
    """

    __slots__ = ("messages", "_forms", "_json")

    def __init__(self, *messages: Mapping[str, Any]) -> None:
        self.messages = messages
        self._json: tuple[bytes, ...] | None = None
        self._forms: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.messages)

    def json(self) -> tuple[bytes, ...]:
        """
        Each message as compact UTF-8 JSON (L{encodeMessage}).
        """
        if self._json is None:
            self._json = tuple(encodeMessage(m) for m in self.messages)
        return self._json

    def form(self, name: str, make: Callable[[tuple[bytes, ...]], T]) -> T:
        """
        The messages in the wire format C{name}, made from their JSON by
        C{make} the first time any connection asks.
        """
        try:
            return cast(T, self._forms[name])
        except KeyError:
            made = self._forms[name] = make(self.json())
            return made


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
