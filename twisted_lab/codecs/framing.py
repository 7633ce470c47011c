"""
Int32 length-prefixed framing that costs work linear in the bytes received.

Every netlab service speaks the framing of
L{twisted.protocols.basic.Int32StringReceiver}: a 4-byte unsigned big-endian
length followed by that many payload bytes.  The stock receiver rebuilds its
whole buffer on every read (C{self._unprocessed + data}, Twisted issue
#6358), so a 32 MiB frame arriving in 4 KiB pieces costs gigabytes of
copying.  L{FrameReceiver} is a drop-in L{Int32StringReceiver} (Twisted's
own C{Int32Tests} run against it, in C{tests/test_framing_twisted.py}) but:

  - while a frame is incomplete it only appends to a C{bytearray} (amortised
    O(1) per byte) and does not look at the buffer again until the announced
    length has arrived;
  - complete frames that cannot be delivered yet (the protocol is paused)
    are held as the reads they arrived in, with an offset, so resuming
    delivers them without copying what is left;
  - it stops delivering frames once the transport is disconnecting;
  - it hands every run of complete frames to L{FrameReceiver.framesReceived}
    first, so a service can handle a whole read at once instead of one
    frame at a time.
"""

from __future__ import annotations

from collections import deque
from struct import Struct
from typing import Any

from twisted.protocols.basic import Int32StringReceiver, StringTooLongError

HEADER = Struct("!I")
HEADER_SIZE = HEADER.size
MAX_FRAME = 2**32 - 1

# What an incomplete frame "needs" once its header announced too long a
# frame: it never completes, whatever arrives after it.
_NEVER = 2**63


def encodeFrame(payload: bytes) -> bytes:
    """
    Return C{payload} with its 4-byte length header, for code that builds
    frames outside a protocol (clients, tests, benchmarks).
    """
    if len(payload) > MAX_FRAME:
        raise StringTooLongError(f"{len(payload)} bytes do not fit in one frame")
    return HEADER.pack(len(payload)) + payload


class _Held:
    """
    What a L{FrameReceiver} holds: bytes received and not yet delivered.

    It is one object in one attribute, made when a read leaves something
    held (or a delivery is running) and dropped once everything is
    delivered.  Every service protocol is a L{FrameReceiver}; a handful of
    attributes of its own on each would cost every connection memory, idle
    ones included (past about 30 names CPython stops sharing the keys of a
    class's instance dictionaries).

    @ivar data: the first run of complete frames not delivered:
        C{data[cursor:end]}; C{end} is 0 when there is none.  A run is a
        read as received, so frames held while paused are delivered by
        moving C{cursor}, never by copying what is left.
    @ivar queued: the runs after it, C{(data, end)} from offset 0 (only
        while paused, or when a frame callback fed another read).
    @ivar partial: the incomplete frame after all runs, header included.
    @ivar needed: the length at which C{partial} holds a complete frame;
        L{_NEVER} when its header announced more than C{MAX_LENGTH}, whose
        announced length is then C{tooLong} (-1 otherwise).
    @ivar replaced: set when all this was replaced (C{recvd} assigned, or
        dropped on disconnecting), so that a delivery in progress stops
        walking bytes that are no longer the stream.
    @ivar delivering: whether a delivery is in progress (a read fed from a
        frame callback then only queues).
    """

    __slots__ = (
        "data",
        "cursor",
        "end",
        "queued",
        "partial",
        "needed",
        "tooLong",
        "replaced",
        "delivering",
    )

    def __init__(self) -> None:
        self.data = b""
        self.cursor = 0
        self.end = 0
        self.queued: deque[tuple[bytes, int]] | None = None
        self.partial: bytearray | None = None
        self.needed = 0
        self.tooLong = -1
        self.replaced = False
        self.delivering = False

    def clear(self) -> None:
        """
        Forget everything held (a delivery in progress notices).
        """
        self.data = b""
        self.cursor = self.end = 0
        self.queued = None
        self.partial = None
        self.needed = 0
        self.tooLong = -1
        self.replaced = True

    def nextRun(self) -> None:
        """
        The first run is delivered: drop it, the next one (if any) is first.
        """
        queued = self.queued
        if queued:
            self.data, self.end = queued.popleft()
            if not queued:
                self.queued = None
        else:
            self.data = b""
            self.end = 0
        self.cursor = 0

    def isEmpty(self) -> bool:
        """
        Whether this can be dropped: nothing held, no delivery running.
        """
        return not (self.end or self.delivering) and self.partial is None


class FrameReceiver(Int32StringReceiver):
    """
    An L{Int32StringReceiver} whose C{dataReceived} does linear work.

    Subclasses override C{stringReceived} (one call per frame) or, for
    batch handling, L{framesReceived}.

    Everything the stock receiver promises holds, because code written for
    it (and Twisted's own tests) relies on it:

      - B{Pausing.}  C{pauseProducing}, C{resumeProducing} and
        C{stopProducing} are those of Twisted's C{_PauseableMixin}: they set
        C{paused} and pause, resume or stop the transport.  While C{paused}
        is true no frame is delivered, not even the rest of the read being
        handled when a C{stringReceived} paused; what arrives is kept.
        L{resumeProducing} delivers the frames kept, in order, until the
        protocol pauses again.
      - B{C{recvd}}: the bytes received and not yet delivered, read (inside
        C{stringReceived}: what follows the current frame) or assigned (the
        stream then continues from the bytes assigned: as soon as the
        callback returns if assigned in one, else at the next read).  It is
        a property built on each read of it, not a buffer kept up to date,
        so it costs nothing to code that does not use it.
      - B{C{lengthLimitExceeded(length)}} is called with C{recvd} starting
        at the offending header.  The default closes the connection.  An
        override that does not close gets what the stock receiver gives: the
        stream stays stuck at that header, nothing after it is delivered,
        what arrives is kept (in C{recvd}), and C{lengthLimitExceeded} is
        called again, with the same length, on every later read and on
        C{resumeProducing}, until the connection closes or C{recvd} is
        assigned.  (Unlike the stock receiver, frames delivered before the
        header in the same read are not delivered a second time.)  An
        override that assigns C{recvd} (C{b""} drops everything held; a
        slice skips the frame) has the stream go on at once from what it
        assigned.

    And two rules the stock receiver does not have: nothing is delivered,
    and nothing kept, once C{transport.disconnecting} is true; and a
    C{dataReceived} or C{resumeProducing} from inside a frame callback only
    queues (the delivery already running goes on), so no frame is delivered
    twice or out of order.
    """

    MAX_LENGTH = 1024 * 1024

    # A connected TCP or TLS transport.  Twisted's interfaces do not declare
    # the C{disconnecting} flag that every such transport has, hence Any.
    transport: Any

    # What is held; None (the class default) when nothing is, which is the
    # usual state between reads.
    _held: _Held | None = None

    def dataReceived(self, data: bytes) -> None:
        held = self._held
        if self.transport.disconnecting:
            if held is not None:
                held.clear()
                if not held.delivering:
                    self._held = None
            return
        if held is None:
            held = self._held = _Held()
        partial = held.partial
        if partial is not None:
            partial += data
            if len(partial) < held.needed:
                if held.end or held.tooLong >= 0:
                    self._deliverHeld(held)
                return
            held.partial = None
            data = bytes(partial)
        self._holdRead(data)
        self._deliverHeld(held)

    def _holdRead(self, data: bytes) -> None:
        """
        Find the complete frames at the start of C{data} and hold them as
        one run; hold the rest as the incomplete frame.  No callbacks.
        """
        held = self._held
        assert held is not None
        end = len(data)
        offset = 0
        maxLength = self.MAX_LENGTH
        unpackFrom = HEADER.unpack_from
        while offset + HEADER_SIZE <= end:
            (length,) = unpackFrom(data, offset)
            if length > maxLength:
                held.partial = bytearray(memoryview(data)[offset:])
                held.needed = _NEVER
                held.tooLong = length
                break
            frameEnd = offset + HEADER_SIZE + length
            if frameEnd > end:
                held.partial = bytearray(memoryview(data)[offset:])
                held.needed = HEADER_SIZE + length
                break
            offset = frameEnd
        else:
            if offset < end:
                held.partial = bytearray(memoryview(data)[offset:])
                held.needed = HEADER_SIZE
        if offset:
            if held.end:
                if held.queued is None:
                    held.queued = deque()
                held.queued.append((data, offset))
            else:
                held.data = data
                held.cursor = 0
                held.end = offset

    def _deliverHeld(self, held: _Held) -> None:
        """
        Hand the runs of complete frames to L{framesReceived} until none is
        left or the protocol pauses; then report a header that is too long.
        """
        if held.delivering:
            return
        held.delivering = True
        try:
            transport = self.transport
            # Size of what was held at the last lengthLimitExceeded: an
            # override that assigns recvd is called again only if it made
            # the stream shorter, so "self.recvd = self.recvd" cannot spin.
            lastStuck = _NEVER
            while not self.paused:
                if transport.disconnecting:
                    held.clear()
                    return
                end = held.end
                if end:
                    start = held.cursor
                    if start < end:
                        # An override handles the whole run; the default
                        # moves the cursor frame by frame.
                        held.cursor = end
                        held.replaced = False
                        self.framesReceived(held.data, start, end)
                        if held.replaced or held.cursor < end:
                            continue
                    held.nextRun()
                    continue
                partial = held.partial
                if held.tooLong < 0 or partial is None or len(partial) >= lastStuck:
                    return
                lastStuck = len(partial)
                held.replaced = False
                self.lengthLimitExceeded(held.tooLong)
                if not held.replaced:
                    if transport.disconnecting:
                        held.clear()
                    return
        finally:
            held.delivering = False
            if held.isEmpty() and self._held is held:
                self._held = None

    def framesReceived(self, data: bytes, start: int, end: int) -> None:
        """
        C{data[start:end]} holds one or more complete, valid frames.

        The default implementation calls C{stringReceived} for each of them,
        in order, and stops as soon as the protocol is paused or the
        transport starts disconnecting; the frames it did not deliver are
        delivered when the protocol resumes.  An override handles the whole
        run (pausing in it holds the frames of later runs).
        """
        # Called by a subclass outside a delivery, there is no cursor to move.
        held = self._held or _Held()
        unpackFrom = HEADER.unpack_from
        offset = start
        transport = self.transport
        while offset < end and not (self.paused or transport.disconnecting):
            (length,) = unpackFrom(data, offset)
            bodyStart = offset + HEADER_SIZE
            offset = bodyStart + length
            held.cursor = offset
            self.stringReceived(data[bodyStart:offset])
            if held.replaced:
                return
        held.cursor = offset

    @property
    def recvd(self) -> bytes:
        """
        The bytes received and not yet delivered, as the stock receiver's
        C{recvd}: inside C{stringReceived}, those after the current frame.
        Built on each read of the attribute.
        """
        held = self._held
        if held is None:
            return b""
        parts: list[Any] = []
        if held.end:
            parts.append(memoryview(held.data)[held.cursor : held.end])
            for data, end in held.queued or ():
                parts.append(memoryview(data)[:end])
        if held.partial is not None:
            parts.append(held.partial)
        return b"".join(parts)

    @recvd.setter
    def recvd(self, value: bytes) -> None:
        """
        Replace the bytes not yet delivered: the stream continues from
        C{value}, after the running callback returns (or at the next read).
        """
        held = self._held
        if held is None:
            held = self._held = _Held()
        held.clear()
        self._holdRead(bytes(value))
        if held.isEmpty():
            self._held = None

    def resumeProducing(self) -> None:
        """
        Resume the transport and deliver the frames held while paused.

        Twisted's C{_PauseableMixin} calls C{dataReceived(b"")} for that; the
        frames are held here, so they are delivered directly rather than
        through a C{dataReceived} that subclasses count as a read.  A
        transport that is disconnecting is not resumed (TCP would ignore
        it; test transports refuse it), and nothing is delivered.
        """
        self.paused = False
        if not self.transport.disconnecting:
            self.transport.resumeProducing()
        if self._held is not None:
            self._deliverHeld(self._held)

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
        How many bytes of an incomplete frame are held, header included (so
        its header is complete iff this is at least L{HEADER_SIZE}).

        Complete frames held while paused are not counted: they are waiting
        for this side, not for the peer.  A frame whose header was too long
        counts as incomplete, with everything kept after it.
        """
        held = self._held
        if held is None or held.partial is None:
            return 0
        return len(held.partial)
