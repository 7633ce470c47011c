"""
Unit tests of L{twisted_lab.framing}: every split of the stream, oversized
headers, and the linear-work guarantee.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.testing import StringTransport
from twisted.protocols.basic import StringTooLongError
from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import frames
from twisted_lab.framing import FrameReceiver, encodeFrame


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
        original = protocol._scan

        def countingScan(data: bytes) -> None:
            scans.append(len(data))
            original(data)

        protocol._scan = countingScan  # type: ignore[method-assign]
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
