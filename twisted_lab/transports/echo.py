"""
The echo protocols (C{twistd netlab-echo}): every frame comes back unchanged.

Framed mode (the default) speaks the Int32 framing of
C{docs/protocol.md} section 2.  Because the reply to a frame is exactly the
bytes of that frame, L{FramedEcho} checks headers and sends each read back
with one write of the bytes as received: no per-frame objects, no per-frame
writes, no reassembly of large frames.  That is what lets it outrun the
stock C{Int32StringReceiver} echo even with every read and write logged.

Raw mode (C{--framing raw}) has no framing at all, for C{nc}, C{telnet} and
C{socat}: every byte is sent back as it arrives.
"""

from __future__ import annotations

from typing import Any

from twisted_lab.codecs.framing import HEADER, HEADER_SIZE
from twisted_lab.transports.connection import (
    CLOSING,
    FramedServerProtocol,
    ServedConnection,
    ServerFactory,
)

DEFAULT_PORT = 9090
DEFAULT_MAX_LENGTH = 1024 * 1024
#: The most a TCP transport hands over in one read.
ONE_READ = 64 * 1024


class FramedEcho(FramedServerProtocol):
    """
    Echoes Int32 frames, in order, binary-safe.

    An echo never needs a whole frame in memory: once a header has been
    checked against the limit, the payload bytes behind it are already the
    reply.  So each read is scanned for headers only, and everything up to
    the last checked byte goes back in one write, as received.  The only
    bytes held back are the 1-3 bytes of a header split between reads.
    """

    _remaining = 0  # payload bytes of the current frame still to come
    _heldHeader = b""  # the start of a header split between reads
    _frameLength = 0  # the payload length of the current frame

    def dataReceived(self, data: bytes) -> None:
        if self.transport.disconnecting or self.readingPausedFor(CLOSING):
            return
        now = self.noteReceived(len(data))
        wasPartial = bool(self._remaining or self._heldHeader)
        if self._heldHeader:
            data = self._heldHeader + data
        end = len(data)
        offset = 0
        remaining = self._remaining
        maxLength = self.MAX_LENGTH
        oversized = -1
        headers = 0
        while True:
            if remaining:
                if end - offset <= remaining:
                    remaining -= end - offset
                    offset = end
                    break
                offset += remaining
                remaining = 0
            if end - offset < HEADER_SIZE:
                break
            (length,) = HEADER.unpack_from(data, offset)
            if length > maxLength:
                oversized = length
                break
            offset += HEADER_SIZE
            remaining = length
            headers += 1
        if headers:
            self._frameLength = length
            # Each header read is a frame in, and goes straight back out.
            stats = self.factory.stats
            stats.framesReceived += headers
            stats.framesSent += headers
        self._remaining = remaining
        self._heldHeader = data[offset:] if oversized < 0 else b""
        if remaining:
            held = HEADER_SIZE + self._frameLength - remaining
        else:
            held = len(self._heldHeader)
        self.trackFrame(now, held, continued=wasPartial and not headers)
        if offset:
            self.write(data if offset == end else data[:offset], now)
        if oversized >= 0:
            self.lengthLimitExceeded(oversized)


class RawEcho(ServedConnection):
    """
    Echoes bytes as they arrive, with no framing.
    """

    def dataReceived(self, data: bytes) -> None:
        now = self.noteReceived(len(data))
        self.write(data, now)


class EchoFactory(ServerFactory):
    """
    Makes L{FramedEcho} or, with C{framing="raw"}, L{RawEcho} connections.
    """

    def __init__(self, framing: str = "int32", **settings: Any) -> None:
        # A client may write a whole frame before it reads the echo (as a
        # blocking socket does); its echo must fit in what we hold for it,
        # or both sides would wait for each other.
        maxLength = settings.get("maxLength", DEFAULT_MAX_LENGTH)
        soft = HEADER_SIZE + maxLength if framing == "int32" else 0
        settings.setdefault("outputSoftBound", soft)
        # Past the soft bound reading stops, so at most one more read can
        # follow: the hard bound is never reached by an echo's own output.
        settings["maxSendQueue"] = max(
            settings.get("maxSendQueue", 0), settings["outputSoftBound"] + ONE_READ * 4
        )
        super().__init__(**settings)
        if framing not in FRAMINGS:
            raise ValueError(f"unknown framing {framing!r}")
        self.framing = framing
        self.protocol = FRAMINGS[framing]


FRAMINGS: dict[str, type[ServedConnection]] = {"int32": FramedEcho, "raw": RawEcho}
