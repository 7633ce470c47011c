"""
Unit tests of L{twisted_lab.codecs.framing}: every split of the stream, oversized
headers, pausing, C{recvd}, and the linear-work guarantee.

Twisted's own tests of the stock receiver run against L{FrameReceiver} in
C{tests/test_framing_twisted.py}; these cover what they do not.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.testing import StringTransport
from twisted.protocols.basic import Int32StringReceiver, StringTooLongError
from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import frames
from twisted_lab.codecs.framing import FrameReceiver, encodeFrame


class Recorder(FrameReceiver):
    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.oversized: list[int] = []

    def stringReceived(self, string: bytes) -> None:
        self.received.append(string)

    def lengthLimitExceeded(self, length: int) -> None:
        self.oversized.append(length)
        self.transport.loseConnection()


def receiver(maxLength: int = 1024) -> tuple[Recorder, StringTransport]:
    protocol = Recorder()
    protocol.MAX_LENGTH = maxLength
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


class FrameReceiverTests(SynchronousTestCase):
    payloads = [b"", b"a", b"hello", bytes(range(256)), b"\x00\x00\x00\x05"]

    def test_allAtOnce(self) -> None:
        protocol, _ = receiver()
        protocol.dataReceived(frames(*self.payloads))
        self.assertEqual(protocol.received, self.payloads)
        self.assertEqual(protocol.bufferedByteCount(), 0)

    def test_oneByteAtATime(self) -> None:
        protocol, _ = receiver()
        for byte in frames(*self.payloads):
            protocol.dataReceived(bytes([byte]))
        self.assertEqual(protocol.received, self.payloads)

    def test_emptyFrame(self) -> None:
        protocol, _ = receiver()
        protocol.dataReceived(b"\x00\x00\x00\x00")
        self.assertEqual(protocol.received, [b""])

    def test_partialFrameIsKept(self) -> None:
        protocol, _ = receiver()
        data = encodeFrame(b"abcdef")
        protocol.dataReceived(data[:7])
        self.assertEqual(protocol.received, [])
        self.assertEqual(protocol.bufferedByteCount(), 7)
        protocol.dataReceived(data[7:])
        self.assertEqual(protocol.received, [b"abcdef"])

    def test_oversizedHeaderNotBuffered(self) -> None:
        """
        A header over the limit is reported at once, before its payload
        arrives, and nothing of it is kept.
        """
        protocol, transport = receiver(maxLength=10)
        protocol.dataReceived(b"\x00\x00\x00\x0b")
        self.assertEqual(protocol.oversized, [11])
        self.assertTrue(transport.disconnecting)
        self.assertEqual(protocol.bufferedByteCount(), 0)

    def test_maxLengthItselfIsAccepted(self) -> None:
        protocol, _ = receiver(maxLength=10)
        protocol.dataReceived(encodeFrame(b"x" * 10))
        self.assertEqual(protocol.received, [b"x" * 10])
        self.assertEqual(protocol.oversized, [])

    def test_hugeHeader(self) -> None:
        protocol, _ = receiver()
        protocol.dataReceived(b"\xff\xff\xff\xff" + b"junk")
        self.assertEqual(protocol.oversized, [0xFFFFFFFF])

    def test_framesBeforeOversizedAreDelivered(self) -> None:
        protocol, _ = receiver(maxLength=10)
        protocol.dataReceived(frames(b"one", b"two") + b"\x00\x01\x00\x00")
        self.assertEqual(protocol.received, [b"one", b"two"])
        self.assertEqual(protocol.oversized, [65536])

    def test_nothingDeliveredAfterDisconnecting(self) -> None:
        """
        Once a frame handler closes the connection, the frames after it in
        the same read are not handled.
        """

        class CloseOnFirst(Recorder):
            def stringReceived(self, string: bytes) -> None:
                super().stringReceived(string)
                self.transport.loseConnection()

        protocol = CloseOnFirst()
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(frames(b"first", b"second", b"third"))
        self.assertEqual(protocol.received, [b"first"])

    def test_largeFrameInSmallPiecesIsScannedOnce(self) -> None:
        """
        While a large frame is incomplete, pieces are only appended: the
        frame scan runs for the first piece and once more when the frame is
        complete, never per piece (the quadratic cost of the stock receiver).
        """
        protocol, _ = receiver(maxLength=1 << 20)
        scans = []
        original = protocol._holdRead

        def countingScan(data: bytes) -> None:
            scans.append(len(data))
            original(data)

        protocol._holdRead = countingScan  # type: ignore[method-assign]
        payload = bytes(range(256)) * 4096  # 1 MiB
        data = encodeFrame(payload)
        for i in range(0, len(data), 4096):
            protocol.dataReceived(data[i : i + 4096])
        self.assertEqual(protocol.received, [payload])
        self.assertEqual(len(scans), 2)

    def test_sendString(self) -> None:
        protocol, transport = receiver()
        protocol.sendString(b"hello")
        self.assertEqual(transport.value(), b"\x00\x00\x00\x05hello")

    def test_sendTooLong(self) -> None:
        class Huge(bytes):
            def __len__(self) -> int:
                return 2**32

        protocol, transport = receiver()
        self.assertRaises(StringTooLongError, protocol.sendString, Huge())
        self.assertRaises(StringTooLongError, encodeFrame, Huge())
        self.assertEqual(transport.value(), b"")


class PausingTests(SynchronousTestCase):
    """
    C{paused}, as set by C{pauseProducing} from a frame callback, and what
    happens around it.
    """

    def test_heldFramesAreNotRescanned(self) -> None:
        """
        Frames held while paused are delivered from the read they came in,
        by offset: resuming one frame at a time scans nothing again.
        """

        class PauseEach(Recorder):
            def stringReceived(self, string: bytes) -> None:
                super().stringReceived(string)
                self.pauseProducing()

        protocol = PauseEach()
        protocol.makeConnection(StringTransport())
        scans = []
        original = protocol._holdRead

        def countingScan(data: bytes) -> None:
            scans.append(len(data))
            original(data)

        protocol._holdRead = countingScan  # type: ignore[method-assign]
        payloads = [b"%d" % i for i in range(100)]
        protocol.dataReceived(frames(*payloads))
        for _ in payloads:
            protocol.resumeProducing()
        self.assertEqual(protocol.received, payloads)
        self.assertEqual(len(scans), 1)

    def test_bufferedByteCountWhilePaused(self) -> None:
        """
        Complete frames held while paused are not counted as incomplete:
        only the bytes after them are.
        """
        protocol, _ = receiver()
        protocol.pauseProducing()
        protocol.dataReceived(frames(b"one", b"two") + b"\x00\x00\x00\x09abc")
        self.assertEqual(protocol.received, [])
        self.assertEqual(protocol.bufferedByteCount(), 7)
        protocol.dataReceived(b"defghi" + b"\x00")
        self.assertEqual(protocol.bufferedByteCount(), 1)
        protocol.resumeProducing()
        self.assertEqual(protocol.received, [b"one", b"two", b"abcdefghi"])
        self.assertEqual(protocol.bufferedByteCount(), 1)

    def test_nothingDeliveredAfterDisconnectingWhilePaused(self) -> None:
        """
        Frames held while paused are dropped, not delivered, once the
        transport is disconnecting.
        """
        protocol, transport = receiver()
        protocol.pauseProducing()
        protocol.dataReceived(frames(b"held") + b"\x00\x00")
        transport.loseConnection()
        protocol.resumeProducing()
        self.assertEqual(protocol.received, [])
        self.assertEqual(protocol.bufferedByteCount(), 0)
        self.assertEqual(protocol.recvd, b"")

    def test_resumeIsNotARead(self) -> None:
        """
        C{resumeProducing} delivers the held frames itself: a subclass's
        C{dataReceived} (which counts reads) is not called.
        """

        class CountingReads(Recorder):
            reads = 0

            def dataReceived(self, data: bytes) -> None:
                self.reads += 1
                super().dataReceived(data)

        protocol = CountingReads()
        protocol.makeConnection(StringTransport())
        protocol.pauseProducing()
        protocol.dataReceived(frames(b"a"))
        protocol.resumeProducing()
        self.assertEqual((protocol.received, protocol.reads), ([b"a"], 1))

    def test_pauseAndResumeInsideStringReceived(self) -> None:
        """
        A callback that pauses and resumes at once does not deliver the
        frames after it twice, or out of order.
        """

        class Blink(Recorder):
            def stringReceived(self, string: bytes) -> None:
                super().stringReceived(string)
                self.pauseProducing()
                self.resumeProducing()

        protocol = Blink()
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(frames(b"a", b"b", b"c"))
        self.assertEqual(protocol.received, [b"a", b"b", b"c"])

    def test_dataReceivedInsideStringReceived(self) -> None:
        """
        A read delivered from inside a callback is queued behind the rest
        of the read being delivered.
        """

        class Reentrant(Recorder):
            def stringReceived(self, string: bytes) -> None:
                super().stringReceived(string)
                if string == b"a":
                    self.dataReceived(frames(b"late"))

        protocol = Reentrant()
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(frames(b"a", b"b"))
        self.assertEqual(protocol.received, [b"a", b"b", b"late"])

    def test_framesReceivedOverrideHandlesWholeRun(self) -> None:
        """
        An override of C{framesReceived} gets a whole run; pausing in it
        holds the runs of later reads until C{resumeProducing}.
        """

        class Batches(Recorder):
            def __init__(self) -> None:
                super().__init__()
                self.batches: list[bytes] = []

            def framesReceived(self, data: bytes, start: int, end: int) -> None:
                self.batches.append(data[start:end])
                self.pauseProducing()

        protocol = Batches()
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(frames(b"a", b"b"))
        protocol.dataReceived(frames(b"c"))
        self.assertEqual(protocol.batches, [frames(b"a", b"b")])
        protocol.resumeProducing()
        self.assertEqual(protocol.batches, [frames(b"a", b"b"), frames(b"c")])


class TolerantLengthLimitTests(SynchronousTestCase):
    """
    A C{lengthLimitExceeded} that does not close (what the stock receiver
    does then is in C{tests/test_framing_twisted.py}).
    """

    def test_framesBeforeHeaderDeliveredOnce(self) -> None:
        """
        Frames before an oversized header are delivered once (the stock
        receiver delivers them again on every later read).
        """
        oversized: list[int] = []
        protocol, transport = receiver(maxLength=10)
        protocol.lengthLimitExceeded = oversized.append  # type: ignore[method-assign]
        protocol.dataReceived(frames(b"one") + b"\x00\x00\x00\x0b")
        protocol.dataReceived(b"more")
        self.assertEqual(protocol.received, [b"one"])
        self.assertEqual(oversized, [11, 11])
        self.assertEqual(protocol.bufferedByteCount(), 8)
        self.assertFalse(transport.disconnecting)

    def test_assigningRecvdMovesOn(self) -> None:
        """
        A C{lengthLimitExceeded} that assigns C{recvd} replaces the stream:
        delivery goes on from what it assigned, at once.
        """

        class Skip(Recorder):
            def lengthLimitExceeded(self, length: int) -> None:
                self.oversized.append(length)
                self.recvd = self.recvd[4 + length :]

        protocol = Skip()
        protocol.MAX_LENGTH = 10
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(b"\x00\x00\x00\x0b" + b"x" * 11 + frames(b"after"))
        self.assertEqual(protocol.oversized, [11])
        self.assertEqual(protocol.received, [b"after"])
        protocol.dataReceived(frames(b"next"))
        self.assertEqual(protocol.received, [b"after", b"next"])
        self.assertFalse(transport.disconnecting)

    def test_assigningEmptyRecvdDropsTheRest(self) -> None:
        """
        Assigning C{b""} drops what is held (C{bufferedByteCount} is 0) and
        stops the repeated calls: the next read starts a new frame.
        """
        calls: list[int] = []
        protocol, _ = receiver(maxLength=10)

        def dropRest(length: int) -> None:
            calls.append(length)
            protocol.recvd = b""

        protocol.lengthLimitExceeded = dropRest  # type: ignore[method-assign]
        protocol.dataReceived(b"\x00\x00\x00\x0b" + b"x" * 5)
        self.assertEqual(protocol.bufferedByteCount(), 0)
        protocol.dataReceived(frames(b"fresh"))
        self.assertEqual((calls, protocol.received), ([11], [b"fresh"]))


class FramingPropertyTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(
        payloads=st.lists(st.binary(max_size=300), max_size=12),
        cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=20),
    )
    def test_anySplitDecodesTheSame(self, payloads: list[bytes], cuts: list[int]):
        """
        However the stream is split into reads, the same frames come out.
        """
        data = frames(*payloads)
        points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
        protocol, _ = receiver(maxLength=1000)
        for start, end in zip(points, points[1:], strict=False):
            protocol.dataReceived(data[start:end])
        self.assertEqual(protocol.received, payloads)
        self.assertEqual(protocol.bufferedByteCount(), 0)

    @settings(max_examples=200, deadline=None)
    @given(
        payloads=st.lists(st.binary(max_size=40), max_size=12),
        cuts=st.lists(st.integers(min_value=0, max_value=600), max_size=12),
        pauseAfter=st.sets(st.integers(min_value=0, max_value=11)),
        resumeAfterRead=st.lists(st.booleans(), min_size=13, max_size=13),
    )
    def test_sameAsStockReceiver(
        self,
        payloads: list[bytes],
        cuts: list[int],
        pauseAfter: set[int],
        resumeAfterRead: list[bool],
    ) -> None:
        """
        Against the stock receiver, for any split of the stream and any
        pauses from C{stringReceived} and resumes between reads: the same
        frames are delivered at the same points, with the same C{paused}
        and C{recvd}.
        """
        data = frames(*payloads)
        points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})

        def run(base: type[Int32StringReceiver]) -> list[object]:
            class Pausing(base):  # type: ignore[valid-type,misc]
                def stringReceived(self, string: bytes) -> None:
                    self.received.append(string)
                    if len(self.received) - 1 in pauseAfter:
                        self.pauseProducing()

            protocol = Pausing()
            protocol.received = []
            protocol.makeConnection(StringTransport())
            seen: list[object] = []
            reads = zip(points, points[1:], strict=False)
            for i, (start, end) in enumerate(reads):
                protocol.dataReceived(data[start:end])
                seen.append((list(protocol.received), protocol.paused))
                if protocol.paused and resumeAfterRead[i % 13]:
                    protocol.resumeProducing()
                seen.append((list(protocol.received), protocol.recvd))
            while protocol.paused:
                protocol.resumeProducing()
            seen.append((protocol.received, protocol.recvd))
            return seen

        self.assertEqual(run(FrameReceiver), run(Int32StringReceiver))
