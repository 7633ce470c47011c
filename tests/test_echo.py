"""
Unit tests of the echo protocols and the served-connection life cycle, on
L{StringTransport} with a L{Clock}: events, folding, idle timeout.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import connectProtocol, frames
from twisted_lab.codecs import events
from twisted_lab.taps.echo import Options
from twisted_lab.transports.connection import CLOSE_GRACE_SECONDS
from twisted_lab.transports.echo import EchoFactory, FramedEcho, RawEcho


def echoFactory(**settings) -> EchoFactory:
    settings.setdefault("clock", Clock())
    return EchoFactory(**settings)


class FramedEchoTests(SynchronousTestCase):
    def test_echoesFramesInOrder(self) -> None:
        protocol, transport, _ = connectProtocol(echoFactory())
        self.assertIsInstance(protocol, FramedEcho)
        data = frames(b"one", b"", b"\x00\xffbinary")
        protocol.dataReceived(data)
        self.assertEqual(transport.value(), data)

    def test_oneByteAtATime(self) -> None:
        protocol, transport, _ = connectProtocol(echoFactory())
        data = frames(b"hello", b"world")
        for byte in data:
            protocol.dataReceived(bytes([byte]))
        self.assertEqual(transport.value(), data)

    def test_payloadStreamsOnceHeaderIsChecked(self) -> None:
        """
        The payload of a checked header goes back as it arrives; nothing of
        a large frame is buffered.
        """
        protocol, transport, _ = connectProtocol(echoFactory())
        data = frames(b"complete", b"x" * 1000)
        protocol.dataReceived(data[:-300])
        self.assertEqual(transport.value(), data[:-300])
        protocol.dataReceived(data[-300:])
        self.assertEqual(transport.value(), data)

    def test_splitHeaderIsHeldUntilChecked(self) -> None:
        """
        A header split between reads is not echoed until it is complete and
        checked: an oversized header is never echoed, even in part.
        """
        protocol, transport, _ = connectProtocol(echoFactory(maxLength=16))
        protocol.dataReceived(frames(b"ok") + b"\x00\x00")
        self.assertEqual(transport.value(), frames(b"ok"))
        protocol.dataReceived(b"\x00\x05abc")
        self.assertEqual(transport.value(), frames(b"ok") + b"\x00\x00\x00\x05abc")
        protocol.dataReceived(b"de\x00")
        protocol.dataReceived(b"\x00\x01")
        protocol.dataReceived(b"\x00")  # 65536 > 16
        self.assertEqual(transport.value(), frames(b"ok", b"abcde"))
        self.assertTrue(transport.disconnecting)

    def test_oversizedHeaderClosesAfterTheEchoes(self) -> None:
        """
        Frames complete before an oversized header are echoed and the
        connection closes once they are sent: it is aborted only if the
        peer does not take them within the grace period.
        """
        factory = echoFactory(maxLength=16)
        protocol, transport, recorder = connectProtocol(factory)
        protocol.dataReceived(frames(b"ok") + b"\x00\x00\x00\x11")
        self.assertEqual(transport.value(), frames(b"ok"))
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.disconnected, "closed politely, not aborted")
        factory.clock.advance(CLOSE_GRACE_SECONDS)
        self.assertTrue(transport.disconnected, "aborted after the grace")
        [event] = recorder.named(events.FRAME_TOO_LONG)
        self.assertEqual((event["length"], event["limit"]), (17, 16))
        # Whatever the peer sends after that is ignored.
        protocol.dataReceived(b"\x00" * 100)
        self.assertEqual(transport.value(), frames(b"ok"))

    def test_lifeCycleEvents(self) -> None:
        factory = echoFactory()
        protocol, _, recorder = connectProtocol(factory, "127.0.0.2", 5555)
        self.assertEqual(factory.connections, {protocol})
        protocol.dataReceived(frames(b"abc"))
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(
            recorder.names(),
            [
                events.CLIENT_CONNECTED,
                events.DATA_RECEIVED,
                events.DATA_SENT,
                events.CLIENT_DISCONNECTED,
            ],
        )
        received = recorder.named(events.DATA_RECEIVED)[0]
        self.assertEqual((received["peer"], received["nbytes"]), ("127.0.0.2:5555", 7))
        self.assertEqual(recorder.named(events.DATA_SENT)[0]["nbytes"], 7)
        self.assertEqual(factory.connections, set())

    def test_noPayloadInEvents(self) -> None:
        protocol, _, recorder = connectProtocol(echoFactory())
        protocol.dataReceived(frames(b"secret-payload"))
        for event in recorder.events:
            for value in event.values():
                self.assertNotIn(b"secret-payload", repr(value).encode())
                self.assertNotIn("secret-payload", repr(value))


class RawEchoTests(SynchronousTestCase):
    def test_echoesBytesAsTheyArrive(self) -> None:
        protocol, transport, recorder = connectProtocol(echoFactory(framing="raw"))
        self.assertIsInstance(protocol, RawEcho)
        protocol.dataReceived(b"\x00\x00\x00\xff no framing")
        self.assertEqual(transport.value(), b"\x00\x00\x00\xff no framing")
        protocol.dataReceived(b"x")
        self.assertEqual(transport.value(), b"\x00\x00\x00\xff no framingx")
        self.assertEqual(len(recorder.named(events.DATA_SENT)), 2)

    def test_unknownFraming(self) -> None:
        self.assertRaises(ValueError, EchoFactory, framing="bogus")


class DataEventFoldingTests(SynchronousTestCase):
    """
    Past the per-second limit, data events are folded into a summary whose
    counts add up to what happened.
    """

    def test_foldsPastTheLimit(self) -> None:
        clock = Clock()
        factory = echoFactory(clock=clock, dataEventsPerSecond=10)
        protocol, _, recorder = connectProtocol(factory)
        for _ in range(30):
            protocol.dataReceived(frames(b"x"))
        # 30 reads and 30 writes: the first 10 events are logged one by one.
        individual = recorder.named(events.DATA_RECEIVED) + recorder.named(
            events.DATA_SENT
        )
        self.assertEqual(len(individual), 10)
        self.assertEqual(recorder.named(events.DATA_SUMMARY), [])
        clock.advance(1.0)
        [summary] = recorder.named(events.DATA_SUMMARY)
        logged_reads = len(recorder.named(events.DATA_RECEIVED))
        logged_writes = len(recorder.named(events.DATA_SENT))
        self.assertEqual(summary["reads"] + logged_reads, 30)
        self.assertEqual(summary["writes"] + logged_writes, 30)
        self.assertEqual(summary["bytes_received"], summary["reads"] * 5)
        self.assertEqual(summary["bytes_sent"], summary["writes"] * 5)
        # A new second logs individually again.
        protocol.dataReceived(frames(b"y"))
        self.assertEqual(len(recorder.named(events.DATA_RECEIVED)), logged_reads + 1)

    def test_remainderReportedOnDisconnect(self) -> None:
        clock = Clock()
        factory = echoFactory(clock=clock, dataEventsPerSecond=2)
        protocol, _, recorder = connectProtocol(factory)
        for _ in range(5):
            protocol.dataReceived(frames(b"x"))
        protocol.connectionLost(Failure(ConnectionDone()))
        [summary] = recorder.named(events.DATA_SUMMARY)
        self.assertEqual(summary["reads"] + summary["writes"], 10 - 2)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_neverFoldWhenDisabled(self) -> None:
        factory = echoFactory(dataEventsPerSecond=None)
        protocol, _, recorder = connectProtocol(factory)
        for _ in range(50):
            protocol.dataReceived(frames(b"x"))
        self.assertEqual(len(recorder.named(events.DATA_RECEIVED)), 50)
        self.assertEqual(recorder.named(events.DATA_SUMMARY), [])


class IdleTimeoutTests(SynchronousTestCase):
    def test_idleConnectionIsClosed(self) -> None:
        clock = Clock()
        protocol, transport, recorder = connectProtocol(
            echoFactory(clock=clock, idleTimeout=30)
        )
        clock.advance(29)
        self.assertFalse(transport.disconnecting)
        clock.advance(1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(len(recorder.named(events.IDLE_TIMEOUT)), 1)

    def test_activityPostponesTheTimeout(self) -> None:
        clock = Clock()
        protocol, transport, _ = connectProtocol(
            echoFactory(clock=clock, idleTimeout=30)
        )
        for _ in range(5):
            clock.advance(20)
            protocol.dataReceived(frames(b"still here"))
        self.assertFalse(transport.disconnecting)
        clock.advance(30)
        self.assertTrue(transport.disconnecting)

    def test_timerCancelledOnDisconnect(self) -> None:
        clock = Clock()
        protocol, _, _ = connectProtocol(echoFactory(clock=clock, idleTimeout=30))
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_noTimeout(self) -> None:
        clock = Clock()
        connectProtocol(
            echoFactory(
                clock=clock, idleTimeout=None, headerTimeout=None, frameTimeout=None
            )
        )
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_oneTimerPerServer(self) -> None:
        """
        Deadlines are checked by one sweeper per server, not one timer per
        connection (small idle connections).
        """
        clock = Clock()
        factory = echoFactory(clock=clock, idleTimeout=30)
        for port in range(50):
            connectProtocol(factory, "127.0.0.2", 10000 + port)
        self.assertEqual(len(clock.getDelayedCalls()), 1)


class SlowlorisTests(SynchronousTestCase):
    """
    Each frame has its own deadlines: its header within --header-timeout of
    its first byte, its payload within --frame-timeout plus one second per
    --frame-min-rate bytes received; however slowly bytes keep trickling in
    (which keeps the idle timer happy), an overdue frame is cut off.
    """

    def test_tricklingHeaderIsCutOff(self) -> None:
        clock = Clock()
        factory = echoFactory(clock=clock, idleTimeout=30, frameTimeout=10)
        protocol, transport, recorder = connectProtocol(factory)
        protocol.dataReceived(b"\x00")
        for _ in range(3):
            clock.advance(3)
            protocol.dataReceived(b"")  # keeps the connection "active"
        self.assertFalse(transport.disconnecting)
        clock.advance(3)
        self.assertTrue(transport.disconnected, "aborted")
        self.assertEqual(len(recorder.named(events.FRAME_TIMEOUT)), 1)

    def test_tricklingPayloadIsCutOff(self) -> None:
        clock = Clock()
        factory = echoFactory(
            clock=clock, idleTimeout=30, frameTimeout=10, frameMinRate=100
        )
        protocol, transport, _ = connectProtocol(factory)
        protocol.dataReceived(b"\x00\x00\x01\x00")  # a 256-byte frame
        for _ in range(4):
            clock.advance(2.5)
            protocol.dataReceived(b"x")
        self.assertFalse(transport.disconnected, "4 bytes bought 0.04 s")
        clock.advance(2.5)
        self.assertTrue(transport.disconnected)

    def test_payloadAtTheMinimumRateIsNotCutOff(self) -> None:
        """
        A large frame that arrives slowly but at least at the minimum rate
        is not cut off, however long it takes: the deadline grows with
        every byte (mod_reqtimeout's MinRate).
        """
        clock = Clock()
        factory = echoFactory(
            clock=clock, idleTimeout=30, frameTimeout=5, frameMinRate=100
        )
        protocol, transport, _ = connectProtocol(factory)
        protocol.dataReceived(b"\x00\x00\x27\x10")  # 10,000 bytes
        for _ in range(99):
            clock.advance(1)
            protocol.dataReceived(b"x" * 100)
        self.assertFalse(transport.disconnecting)
        protocol.dataReceived(b"x" * 100)
        self.assertEqual(len(transport.value()), 4 + 10_000)

    def test_framesStreamedBackToBackAreNeverCutOff(self) -> None:
        """
        A client streaming frames whose every read ends a few bytes into
        the next frame always has a frame incomplete; each frame completes
        at once, so none is overdue (the old deadline measured "some frame
        has been incomplete since ..." and cut such a client off).
        """
        clock = Clock()
        factory = echoFactory(
            clock=clock, idleTimeout=30, headerTimeout=2, frameTimeout=2
        )
        protocol, transport, recorder = connectProtocol(factory)
        stream = frames(*[b"%05d" % i for i in range(200)])
        step = 9 + 3  # one whole frame, and 3 bytes of the next
        sent = 0
        while sent < len(stream):
            protocol.dataReceived(stream[sent : sent + step])
            sent += step
            clock.advance(0.5)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(recorder.named(events.FRAME_TIMEOUT), [])
        self.assertEqual(transport.value(), stream)

    def test_completeFramesResetTheDeadline(self) -> None:
        clock = Clock()
        factory = echoFactory(clock=clock, idleTimeout=None, frameTimeout=10)
        protocol, transport, _ = connectProtocol(factory)
        data = frames(b"x" * 20)
        for _ in range(10):
            protocol.dataReceived(data[:10])
            clock.advance(4)
            protocol.dataReceived(data[10:])
            clock.advance(4)
        self.assertFalse(transport.disconnecting)

    def test_framedReceiverDeadlineForJSONServices(self) -> None:
        from tests.test_messages import SampleFactory, replies

        clock = Clock()
        factory = SampleFactory(clock=clock, idleTimeout=None, frameTimeout=10)
        protocol, transport, _ = connectProtocol(factory)
        protocol.dataReceived(b"\x00\x00\x00\x10{")
        clock.advance(12.5)
        [error] = replies(transport)
        self.assertEqual(error["code"], "frame_timeout")
        self.assertTrue(transport.disconnecting)


class ConnectionCapTests(SynchronousTestCase):
    def test_perAddressCap(self) -> None:
        factory = echoFactory(maxConnectionsPerAddress=2)
        first, t1, _ = connectProtocol(factory, "127.0.0.2", 1)
        second, t2, _ = connectProtocol(factory, "127.0.0.2", 2)
        third, t3, recorder = connectProtocol(factory, "127.0.0.2", 3)
        self.assertFalse(t1.disconnecting or t2.disconnecting)
        self.assertTrue(t3.disconnected)
        self.assertEqual(len(recorder.named(events.CONNECTION_REFUSED)), 1)
        third.connectionLost(Failure(ConnectionDone()))
        other, t4, _ = connectProtocol(factory, "127.0.0.9", 4)
        self.assertFalse(t4.disconnecting, "other addresses are not affected")
        first.connectionLost(Failure(ConnectionDone()))
        again, t5, _ = connectProtocol(factory, "127.0.0.2", 5)
        self.assertFalse(t5.disconnecting, "a slot freed by a close is reused")
        self.assertEqual(factory.perAddress, {"127.0.0.2": 2, "127.0.0.9": 1})

    def test_ipv6GroupedBySlash64(self) -> None:
        from twisted.internet.address import IPv6Address
        from twisted.internet.testing import StringTransport

        factory = echoFactory(maxConnectionsPerAddress=1)
        factory.log = connectProtocol(factory, "2001:db8:1:2::1", 1)[2].logger
        address = IPv6Address("TCP", "2001:db8:1:2:ffff::9", 2)
        protocol = factory.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        protocol.makeConnection(transport)
        self.assertTrue(transport.disconnected, "same /64, over the cap")

    def test_totalCap(self) -> None:
        factory = echoFactory(maxConnections=3)
        transports = [
            connectProtocol(factory, f"127.0.0.{i}", i)[1] for i in range(2, 6)
        ]
        self.assertEqual([t.disconnected for t in transports], [False] * 3 + [True])

    def test_jsonServiceSaysWhy(self) -> None:
        from tests.test_messages import SampleFactory, replies

        factory = SampleFactory(clock=Clock(), maxConnectionsPerAddress=1)
        connectProtocol(factory, "127.0.0.2", 1)
        _, transport, _ = connectProtocol(factory, "127.0.0.2", 2)
        [error] = replies(transport)
        self.assertEqual(error["code"], "too_many_connections")
        self.assertTrue(transport.disconnecting)


class OptionsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        options = Options()
        options.parseOptions([])
        self.assertEqual(
            options["endpoint"], "tcp:9090:interface=127.0.0.1:backlog=1024"
        )
        self.assertEqual(options["max-length"], 1024 * 1024)
        self.assertEqual(options["framing"], "int32")

    def test_ipv6Interface(self) -> None:
        options = Options()
        options.parseOptions(["--interface", "::1", "--port", "0"])
        self.assertEqual(options["endpoint"], r"tcp6:0:interface=\:\:1:backlog=1024")

    def test_listenOverrides(self) -> None:
        options = Options()
        options.parseOptions(["--listen", "tcp6:9999", "--port", "1"])
        self.assertEqual(options["endpoint"], "tcp6:9999")

    def test_badValues(self) -> None:
        from twisted.python.usage import UsageError

        for argv in (
            ["--port", "70000"],
            ["--port", "x"],
            ["--max-length", "0"],
            ["--idle-timeout", "-1"],
            ["--framing", "lines"],
            ["--data-events-per-second", "-3"],
        ):
            self.assertRaises(UsageError, Options().parseOptions, argv)


class EchoPropertyTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(
        payloads=st.lists(st.binary(max_size=200), max_size=10),
        cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=20),
    )
    def test_anySplitEchoesTheStream(self, payloads, cuts) -> None:
        """
        However the frames are split into reads, the echo is the stream.
        """
        data = frames(*payloads)
        points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
        protocol, transport, _ = connectProtocol(echoFactory(maxLength=500))
        for start, end in zip(points, points[1:], strict=False):
            protocol.dataReceived(data[start:end])
        self.assertEqual(transport.value(), data)
        self.assertFalse(transport.disconnecting)
