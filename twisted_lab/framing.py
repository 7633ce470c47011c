"""
Int32 length-prefixed framing that costs work linear in the bytes received.

Every netlab service speaks the framing of
L{twisted.protocols.basic.Int32StringReceiver}: a 4-byte unsigned big-endian
length followed by that many payload bytes.  The stock receiver rebuilds its
whole buffer on every read (C{self._unprocessed + data}, Twisted issue
#6358), so a 32 MiB frame arriving in 4 KiB pieces costs gigabytes of
copying.  L{FrameReceiver} keeps the same interface (C{stringReceived},
C{sendString}, C{MAX_LENGTH}, C{lengthLimitExceeded}) but:

  - while a frame is incomplete it only appends to a C{bytearray} (amortised
    O(1) per byte) and does not look at the buffer again until the announced
    length has arrived;
  - it stops delivering frames once the transport is disconnecting;
  - it hands every run of complete frames to L{FrameReceiver.framesReceived}
    first, so a service whose reply is the input itself (echo) can answer a
    whole read with one write instead of one write per frame.
"""

from __future__ import annotations

from struct import Struct
from typing import Any

from twisted.protocols.basic import Int32StringReceiver, StringTooLongError

HEADER = Struct("!I")
HEADER_SIZE = HEADER.size
MAX_FRAME = 2**32 - 1


def encodeFrame(payload: bytes) -> bytes:
    """
    Return C{payload} with its 4-byte length header, for code that builds
    frames outside a protocol (clients, tests, benchmarks).
    """
    if len(payload) > MAX_FRAME:
        raise StringTooLongError(f"{len(payload)} bytes do not fit in one frame")
    return HEADER.pack(len(payload)) + payload


class FrameReceiver(Int32StringReceiver):
    """
    An L{Int32StringReceiver} whose C{dataReceived} does linear work.

    Subclasses override C{stringReceived} (one call per frame) or, for
    batch handling, L{framesReceived}.
    """

    MAX_LENGTH = 1024 * 1024

    # A connected TCP or TLS transport.  Twisted's interfaces do not declare
    # the C{disconnecting} flag that every such transport has, hence Any.
    transport: Any

    # The incomplete tail of the stream, and how many bytes it must reach
    # before it can hold a complete frame again.  Class-level defaults keep
    # idle connections small: most of them never need a pending buffer.
    _pending: bytearray | None = None
    _needed = 0

    def dataReceived(self, data: bytes) -> None:
        pending = self._pending
        if pending is not None:
            pending += data
            if len(pending) < self._needed:
                return
            data = bytes(pending)
            self._pending = None
        self._scan(data)

    def _scan(self, data: bytes) -> None:
        """
        Find the complete frames in C{data}, deliver them, keep the rest.
        """
        end = len(data)
        offset = 0
        maxLength = self.MAX_LENGTH
        unpackFrom = HEADER.unpack_from
        needed = HEADER_SIZE
        oversized = -1
        while offset + HEADER_SIZE <= end:
            (length,) = unpackFrom(data, offset)
            if length > maxLength:
                oversized = length
                break
            frameEnd = offset + HEADER_SIZE + length
            if frameEnd > end:
                needed = HEADER_SIZE + length
                break
            offset = frameEnd
        if offset:
            self.framesReceived(data, 0, offset)
        if oversized >= 0:
            if not self.transport.disconnecting:
                self.lengthLimitExceeded(oversized)
            return
        if offset < end and not self.transport.disconnecting:
            self._pending = bytearray(memoryview(data)[offset:])
            self._needed = needed

    def framesReceived(self, data: bytes, start: int, end: int) -> None:
        """
        C{data[start:end]} holds one or more complete, valid frames.

        The default implementation calls C{stringReceived} for each of them,
        in order, and stops as soon as the transport starts disconnecting
        (so nothing is handled after the protocol decided to close).
        """
        unpackFrom = HEADER.unpack_from
        offset = start
        transport = self.transport
        while offset < end and not transport.disconnecting:
            (length,) = unpackFrom(data, offset)
            bodyStart = offset + HEADER_SIZE
            offset = bodyStart + length
            self.stringReceived(data[bodyStart:offset])

    def sendString(self, string: bytes) -> None:
        """
        Send one frame.  Header and payload go out as a sequence so a large
        payload is not copied just to prepend four bytes.
        """
        if len(string) > MAX_FRAME:
            raise StringTooLongError(f"{len(string)} bytes do not fit in one frame")
        self.transport.writeSequence((HEADER.pack(len(string)), string))

    def bufferedByteCount(self) -> int:
        """
        How many bytes of an incomplete frame are held (for limits and tests).
        """
        return 0 if self._pending is None else len(self._pending)
