"""
Twisted's own tests of C{Int32StringReceiver}, run against L{FrameReceiver}.

L{FrameReceiver} subclasses L{Int32StringReceiver}, so code written for the
stock receiver may be handed one: it must keep the stock receiver's
contract, not only its wire format.  The test classes of
C{twisted.protocols.test.test_basic} are imported and run with C{protocol}
set to a L{FrameReceiver} (their code is not copied, so a Twisted upgrade
that adds a case adds it here too).

Twisted has no C{IntNStringReceiver} test of pausing, nor of a
C{lengthLimitExceeded} that does not close, so those are written here as
scenarios run twice: against the stock receiver, which shows the scenario
says what Twisted does, and against L{FrameReceiver}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.testing import StringTransport
from twisted.protocols.basic import Int32StringReceiver
from twisted.protocols.test import test_basic
from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import frames
from twisted_lab.codecs.framing import FrameReceiver


class TestFrameReceiver(test_basic.TestMixin, FrameReceiver):
    """
    A L{FrameReceiver} recording frames as Twisted's C{TestInt32} does
    (C{TestMixin} also sets C{MAX_LENGTH} to 50, as the tests expect).
    """


class FrameReceiverInt32Tests(test_basic.Int32Tests):
    """
    Twisted's C{Int32Tests} (with C{IntNTestCaseMixin} and
    C{RecvdAttributeMixin}: sending, receiving byte by byte, partial and
    illegal strings, C{lengthLimitExceeded}, C{recvd} read and assigned)
    against L{FrameReceiver}.
    """

    protocol = TestFrameReceiver


class _PausingMixin:
    """
    What a receiver paused from C{stringReceived} does (Twisted's
    C{ProducerTests.test_pauseResume} for lines, here for frames).
    """

    # The receiver class under test, stock or netlab.
    receiverBase: type[Int32StringReceiver]

    def connect(self) -> tuple[Any, test_basic.OnlyProducerTransport]:
        """
        A receiver that writes each frame to its transport and pauses.
        """

        class Consuming(self.receiverBase):
            def stringReceived(self, string: bytes) -> None:
                self.transport.write(string)
                self.pauseProducing()

        protocol = Consuming()
        transport = test_basic.OnlyProducerTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def assertState(
        self, protocol: Any, transport: Any, written: list[bytes], paused: bool
    ) -> None:
        self.assertEqual(transport.data, written)
        self.assertEqual(protocol.paused, paused)
        self.assertEqual(transport.paused, paused)

    def test_pauseResume(self) -> None:
        """
        No frame is delivered while paused, even the rest of the read that
        paused; C{resumeProducing} delivers what is held until the protocol
        pauses again, and a resume with nothing held only unpauses.
        """
        protocol, transport = self.connect()
        protocol.dataReceived(b"\x00\x00\x00\x05hel")
        self.assertState(protocol, transport, [], False)
        protocol.dataReceived(b"lo")
        self.assertState(protocol, transport, [b"hello"], True)
        protocol.resumeProducing()
        self.assertState(protocol, transport, [b"hello"], False)

        protocol.dataReceived(frames(b"one", b"two") + b"\x00\x00")
        self.assertState(protocol, transport, [b"hello", b"one"], True)
        self.assertEqual(protocol.recvd, frames(b"two") + b"\x00\x00")
        # Frames arriving while paused are held too, after those held.
        protocol.dataReceived(b"\x00\x05three" + frames(b"four"))
        self.assertState(protocol, transport, [b"hello", b"one"], True)
        written = [b"hello", b"one"]
        for frame in [b"two", b"three", b"four"]:
            protocol.resumeProducing()
            written.append(frame)
            self.assertState(protocol, transport, written, True)
        self.assertEqual(protocol.recvd, b"")
        protocol.resumeProducing()
        self.assertState(protocol, transport, written, False)

    def test_pausedBeforeAnyFrame(self) -> None:
        """
        A receiver paused from outside delivers nothing until resumed.
        """
        protocol, transport = self.connect()
        protocol.pauseProducing()
        protocol.dataReceived(frames(b"a", b"b"))
        self.assertState(protocol, transport, [], True)
        protocol.resumeProducing()
        self.assertState(protocol, transport, [b"a"], True)


class StockPausingTests(_PausingMixin, SynchronousTestCase):
    receiverBase = Int32StringReceiver


class FrameReceiverPausingTests(_PausingMixin, SynchronousTestCase):
    receiverBase = FrameReceiver


class _TolerantLengthLimitMixin:
    """
    What a receiver whose C{lengthLimitExceeded} does not close does with
    the stream: it stays stuck at the oversized header.
    """

    receiverBase: type[Int32StringReceiver]

    def test_stuckAtOversizedHeader(self) -> None:
        """
        Nothing after the header is delivered; what arrives is kept in
        C{recvd}; C{lengthLimitExceeded} is called again, with the same
        length, on every read and on C{resumeProducing}.
        """
        calls: list[tuple[int, bytes]] = []

        class Tolerant(test_basic.TestMixin, self.receiverBase):
            def lengthLimitExceeded(self, length: int) -> None:
                calls.append((length, self.recvd))

        protocol = Tolerant()
        transport = StringTransport()
        protocol.makeConnection(transport)
        oversized = b"\x00\x00\x00\x33" + b"x" * 10
        protocol.dataReceived(oversized)
        self.assertEqual(calls, [(51, oversized)])
        protocol.dataReceived(frames(b"next"))
        self.assertEqual(calls[1:], [(51, oversized + frames(b"next"))])
        protocol.pauseProducing()
        protocol.dataReceived(b"y")
        self.assertEqual(len(calls), 2)
        protocol.resumeProducing()
        self.assertEqual(calls[2:], [(51, oversized + frames(b"next") + b"y")])
        self.assertEqual(protocol.received, [])
        self.assertFalse(transport.disconnecting)


class StockTolerantLengthLimitTests(_TolerantLengthLimitMixin, SynchronousTestCase):
    receiverBase = Int32StringReceiver


class FrameReceiverTolerantLengthLimitTests(
    _TolerantLengthLimitMixin, SynchronousTestCase
):
    receiverBase = FrameReceiver
