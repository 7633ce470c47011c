"""
RESP2, the Redis serialization protocol: an encoder for commands and an
incremental parser for replies.

A reply is one of: a simple string (L{str}, e.g. C{"OK"}), an error
(a L{RedisError} instance, returned rather than raised so the caller can
fail the one command it answers), an integer (L{int}), a bulk string
(L{bytes}, or L{None} for the null bulk string), an array (a L{list} of
replies, or L{None} for the null array).

The parser bounds what a peer can make this process hold: a line, a bulk
string, the elements of an array, the nesting depth and the bytes of one
reply each have a limit, past which L{RespProtocolError} is raised (the
connection is then dropped).  It never rescans more than one item's
header, so its cost is linear in the bytes fed.
"""

from __future__ import annotations

import re
from typing import TypeAlias

#: What a command argument may be.
Argument: TypeAlias = bytes | bytearray | str | int | float

_INTEGER = re.compile(rb"-?[0-9]+\Z")


class RedisError(Exception):
    """
    An error reply from the server, e.g. C{ERR unknown command}.
    """

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    @property
    def kind(self) -> str:
        """
        The error's first word (C{ERR}, C{WRONGTYPE}, C{NOSCRIPT}, ...).
        """
        return self.message.split(" ", 1)[0]


#: What the parser hands back for one reply.
Reply: TypeAlias = None | int | bytes | str | RedisError | list["Reply"]


class RespProtocolError(Exception):
    """
    Bytes that are not RESP2, or a reply past one of the parser's limits.
    """


def encodeArgument(argument: Argument) -> bytes:
    if isinstance(argument, bytes):
        return argument
    if isinstance(argument, bytearray):
        return bytes(argument)
    if isinstance(argument, str):
        return argument.encode("utf-8")
    if isinstance(argument, bool):
        raise TypeError("a bool is not a Redis argument; say 0 or 1")
    if isinstance(argument, int):
        return b"%d" % (argument,)
    if isinstance(argument, float):
        return repr(argument).encode("ascii")
    raise TypeError(f"not a Redis argument: {type(argument).__name__}")


def encodeCommand(*arguments: Argument) -> bytes:
    """
    One command as an array of bulk strings (what every server accepts).
    """
    if not arguments:
        raise ValueError("a command needs at least its name")
    parts = [b"*%d\r\n" % (len(arguments),)]
    for argument in arguments:
        encoded = encodeArgument(argument)
        parts.append(b"$%d\r\n" % (len(encoded),))
        parts.append(encoded)
        parts.append(b"\r\n")
    return b"".join(parts)


class _Incomplete:
    """
    More bytes are needed.
    """


_INCOMPLETE = _Incomplete()


class _ArrayHeader:
    __slots__ = ("length",)

    def __init__(self, length: int) -> None:
        self.length = length


class RespParser:
    """
    Feed it bytes as they arrive; it returns the replies they complete.
    """

    def __init__(
        self,
        maxLine: int = 64 * 1024,
        maxBulk: int = 8 * 1024 * 1024,
        maxElements: int = 1024 * 1024,
        maxDepth: int = 8,
        maxReply: int = 16 * 1024 * 1024,
    ) -> None:
        self.maxLine = maxLine
        self.maxBulk = maxBulk
        self.maxElements = maxElements
        self.maxDepth = maxDepth
        self.maxReply = maxReply
        self._buffer = bytearray()
        #: The arrays being filled, outermost first: (items, length).
        self._stack: list[tuple[list[Reply], int]] = []
        #: Bytes consumed by the reply being built.
        self._replyBytes = 0

    @property
    def buffered(self) -> int:
        """
        Bytes held that are not yet part of a parsed item.
        """
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Reply]:
        self._buffer += data
        buffer = self._buffer
        replies: list[Reply] = []
        position = 0
        try:
            while True:
                item, end = self._item(buffer, position)
                if item is _INCOMPLETE:
                    if self._replyBytes + len(buffer) - position > self.maxReply:
                        raise RespProtocolError("reply too large")
                    break
                self._replyBytes += end - position
                if self._replyBytes > self.maxReply:
                    raise RespProtocolError("reply too large")
                position = end
                value: Reply
                if isinstance(item, _ArrayHeader):
                    if item.length > 0:
                        if len(self._stack) >= self.maxDepth:
                            raise RespProtocolError("arrays nested too deeply")
                        self._stack.append(([], item.length))
                        continue
                    value = []
                else:
                    value = item  # type: ignore[assignment]
                while True:
                    if not self._stack:
                        replies.append(value)
                        self._replyBytes = 0
                        break
                    items, length = self._stack[-1]
                    items.append(value)
                    if len(items) < length:
                        break
                    self._stack.pop()
                    value = items
        finally:
            del buffer[:position]
        return replies

    def _line(self, buffer: bytearray, position: int) -> tuple[bytes, int] | None:
        end = buffer.find(b"\r\n", position)
        if end < 0:
            if len(buffer) - position > self.maxLine:
                raise RespProtocolError("line too long")
            return None
        if end - position > self.maxLine:
            raise RespProtocolError("line too long")
        return bytes(buffer[position + 1 : end]), end + 2

    def _integer(self, text: bytes) -> int:
        if not _INTEGER.match(text):
            raise RespProtocolError(f"not an integer: {text[:32]!r}")
        return int(text)

    def _item(self, buffer: bytearray, position: int) -> tuple[object, int]:
        if position >= len(buffer):
            return _INCOMPLETE, position
        line = self._line(buffer, position)
        if line is None:
            return _INCOMPLETE, position
        text, end = line
        kind = buffer[position : position + 1]
        if kind == b"+":
            return text.decode("utf-8", "replace"), end
        if kind == b"-":
            return RedisError(text.decode("utf-8", "replace")), end
        if kind == b":":
            return self._integer(text), end
        if kind == b"$":
            length = self._integer(text)
            if length == -1:
                return None, end
            if length < 0:
                raise RespProtocolError(f"bad bulk length {length}")
            if length > self.maxBulk:
                raise RespProtocolError(f"bulk string of {length} bytes")
            if len(buffer) < end + length + 2:
                return _INCOMPLETE, position
            if buffer[end + length : end + length + 2] != b"\r\n":
                raise RespProtocolError("bulk string not followed by CRLF")
            return bytes(buffer[end : end + length]), end + length + 2
        if kind == b"*":
            length = self._integer(text)
            if length == -1:
                return None, end
            if length < 0:
                raise RespProtocolError(f"bad array length {length}")
            if length > self.maxElements:
                raise RespProtocolError(f"array of {length} elements")
            return _ArrayHeader(length), end
        raise RespProtocolError(f"unknown reply type {kind!r}")
