"""
Integration tests of L{NetlabService} on real loopback sockets: listening,
port fallback, the port file, the JSON event log, many clients, clean stop.
"""

from __future__ import annotations

import json
import os
import socket

from twisted.internet import defer, reactor, threads
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.helpers import EventRecorder, frames
from twisted_lab.client.frames import FrameClient, connect
from twisted_lab.client.wire import FramedSocket
from twisted_lab.codecs import events
from twisted_lab.runtime.server import (
    NetlabService,
    fallbackDescription,
    tcpDescription,
)
from twisted_lab.transports.echo import EchoFactory


def _recvOrReset(sock: socket.socket) -> bytes:
    try:
        return sock.recv(10)
    except ConnectionResetError:
        return b""


class FallbackDescriptionTests(SynchronousTestCase):
    def test_positionalPort(self) -> None:
        self.assertEqual(
            fallbackDescription("tcp:9090:interface=127.0.0.1"),
            "tcp:0:interface=127.0.0.1",
        )
        self.assertEqual(fallbackDescription("tcp6:9090"), "tcp6:0")
        self.assertEqual(
            fallbackDescription("ssl:9443:privateKey=k.pem"), "ssl:0:privateKey=k.pem"
        )

    def test_keywordPort(self) -> None:
        self.assertEqual(
            fallbackDescription("tcp:interface=127.0.0.1:port=9090"),
            "tcp:interface=127.0.0.1:port=0",
        )

    def test_notTCP(self) -> None:
        self.assertIsNone(fallbackDescription("unix:/tmp/sock"))

    def test_tcpDescription(self) -> None:
        self.assertEqual(
            tcpDescription(1, "127.0.0.1"), "tcp:1:interface=127.0.0.1:backlog=1024"
        )
        self.assertEqual(
            tcpDescription(1, "::1"), r"tcp6:1:interface=\:\:1:backlog=1024"
        )


class ServiceTests(TestCase):
    def startEcho(self, description: str = "tcp:0:interface=127.0.0.1", **kwargs):
        recorder = EventRecorder()
        factory = EchoFactory()
        factory.log = recorder.logger
        service = NetlabService(
            "netlab-echo", factory, description, reactor=reactor, **kwargs
        )
        service.log = recorder.logger
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        return service, recorder

    def busyPort(self) -> int:
        holder = socket.socket()
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        self.addCleanup(holder.close)
        return holder.getsockname()[1]

    @defer.inlineCallbacks
    def test_listensAndEchoes(self):
        portFile = self.mktemp()
        service, recorder = self.startEcho(portFile=portFile)
        port = service.port.getHost().port
        with open(portFile) as f:
            self.assertEqual(int(f.read()), port)
        [listening] = recorder.named(events.LISTENING)
        self.assertEqual(
            (listening["interface"], listening["port"]), ("127.0.0.1", port)
        )
        client = yield defer.ensureDeferred(
            connect(reactor, "127.0.0.1", port, FrameClient())
        )
        reply = yield client.request(b"ping")
        self.assertEqual(reply, b"ping")
        yield client.close()
        yield service.stopService()
        self.assertFalse(os.path.exists(portFile), "port file removed at stop")
        self.assertEqual(recorder.names()[0], events.SERVER_STARTED)
        self.assertEqual(recorder.names()[-1], events.SERVER_STOPPED)

    def test_portFallback(self) -> None:
        busy = self.busyPort()
        service, recorder = self.startEcho(tcpDescription(busy, "127.0.0.1"))
        served = service.port.getHost().port
        self.assertNotEqual(served, busy)
        [fallback] = recorder.named(events.PORT_FALLBACK)
        self.assertEqual((fallback["requested"], fallback["port"]), (busy, served))
        [listening] = recorder.named(events.LISTENING)
        self.assertEqual(listening["port"], served)

    def test_noPortFallback(self) -> None:
        busy = self.busyPort()
        recorder = EventRecorder()
        service = NetlabService(
            "netlab-echo",
            EchoFactory(),
            tcpDescription(busy, "127.0.0.1"),
            reactor=reactor,
            portFallback=False,
        )
        service.log = recorder.logger
        # An Exception (twistd's daemon mode reports it to the waiting
        # parent and removes the pid file) and a SystemExit (the foreground
        # prints the message, no traceback).
        with self.assertRaises(Exception) as raised:
            service.privilegedStartService()
        self.assertIsInstance(raised.exception, SystemExit)
        self.assertIn(f"{busy}", str(raised.exception.code))
        self.assertIn("--no-port-fallback", str(raised.exception.code))
        self.assertEqual(len(recorder.named(events.LISTEN_FAILED)), 1)
        self.assertIsNone(service.port)

    @defer.inlineCallbacks
    def test_eventLogIsJSONLines(self):
        path = self.mktemp()
        service, _ = self.startEcho(eventLog=path)
        # The JSON log observes the global publisher: use a real Logger.
        service.factory.log = Logger()
        port = service.port.getHost().port
        client = yield defer.ensureDeferred(
            connect(reactor, "127.0.0.1", port, FrameClient())
        )
        yield client.request(b"hello")
        yield client.close()
        yield service.stopService()
        with open(path, encoding="utf-8") as f:
            records = [json.loads(line) for line in f]
        names = [r.get("event") for r in records]
        for expected in (
            events.CLIENT_CONNECTED,
            events.DATA_RECEIVED,
            events.DATA_SENT,
            events.CLIENT_DISCONNECTED,
        ):
            self.assertIn(expected, names)

    @defer.inlineCallbacks
    def test_manyClientsAndOneMisbehaves(self):
        service, recorder = self.startEcho()
        port = service.port.getHost().port
        clients = yield defer.gatherResults(
            [
                defer.ensureDeferred(connect(reactor, "127.0.0.1", port, FrameClient()))
                for _ in range(20)
            ]
        )
        bad = socket.create_connection(("127.0.0.1", port))
        self.addCleanup(bad.close)
        bad.sendall(b"\x7f\xff\xff\xff")  # 2 GiB announced
        replies = yield defer.gatherResults(
            [c.request(b"client %d" % i) for i, c in enumerate(clients)]
        )
        self.assertEqual(replies, [b"client %d" % i for i in range(20)])
        # The misbehaving client is cut off (aborted: a reset, or EOF).
        closed = yield threads.deferToThread(_recvOrReset, bad)
        self.assertEqual(closed, b"")
        self.assertEqual(len(recorder.named(events.FRAME_TOO_LONG)), 1)
        yield defer.gatherResults([c.close() for c in clients])

    @defer.inlineCallbacks
    def test_stopClosesConnections(self):
        service, recorder = self.startEcho()
        port = service.port.getHost().port
        client = yield defer.ensureDeferred(
            connect(reactor, "127.0.0.1", port, FrameClient())
        )
        yield client.request(b"x")
        yield service.stopService()
        yield client.disconnected
        self.assertEqual(service.factory.connections, set())
        self.assertIn(events.CLIENT_DISCONNECTED, recorder.names())
        self.assertEqual(recorder.names()[-1], events.SERVER_STOPPED)

    @defer.inlineCallbacks
    def test_framedSocketAgainstRealServer(self):
        service, _ = self.startEcho()
        port = service.port.getHost().port

        def talk():
            with FramedSocket.connect_to("127.0.0.1", port) as s:
                s.send_message("héllo")
                text = s.recv_text()
                s.send_json({"type": "ping", "n": [1, 2]})
                obj = s.recv_json()
                big = os.urandom(300_000)
                s.send_message(big)
                return text, obj, s.recv_message() == big

        result = yield threads.deferToThread(talk)
        self.assertEqual(result, ("héllo", {"type": "ping", "n": [1, 2]}, True))


class GracefulCloseTests(TestCase):
    """
    A close decided while the client is behind on its reading (idle
    timeout, end of input) completes, within the close grace at the
    latest (before, such a connection stayed open for good, and its
    backlog counted against the server's budget).
    """

    timeout = 30

    @defer.inlineCallbacks
    def test_idleCloseCompletesWhileTheClientIsBehind(self):
        factory = EchoFactory(idleTimeout=1.0, clock=reactor)
        service = NetlabService(
            "netlab-echo", factory, "tcp:0:interface=127.0.0.1", reactor=reactor
        )
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        port = service.port.getHost().port

        def client() -> tuple[int, int, bool]:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                s.setblocking(False)
                frame = frames(b"x" * 60_000)
                sent = 0
                while True:  # until the server stops reading us
                    try:
                        sent += s.send(frame)
                    except BlockingIOError:
                        break
                # Then go quiet past the idle timeout, blocked on nothing
                # but the server: read everything, and expect its EOF.
                s.setblocking(True)
                s.settimeout(10)
                received = 0
                try:
                    while chunk := s.recv(65536):
                        received += len(chunk)
                    closed = True
                except ConnectionResetError:
                    # What the server had not read of ours makes its close a
                    # reset (TCP's rule): closed all the same.
                    closed = True
                except TimeoutError:
                    closed = False
                return sent, received, closed

        sent, received, closed = yield threads.deferToThread(client)
        self.assertTrue(closed, f"still open after {received} of {sent} bytes")
        self.assertEqual(factory.connections, set())
        self.assertEqual(factory.totalBacklog, 0)


class MetricsEndpointTests(SynchronousTestCase):
    def test_aBadMetricsEndpointFailsTheStartInOneLine(self) -> None:
        from twisted.internet.testing import MemoryReactorClock

        from twisted_lab.runtime.startup import StartupFailed

        reactor_ = MemoryReactorClock()
        service = NetlabService(
            "netlab-echo",
            EchoFactory(clock=reactor_),
            "tcp:0:interface=127.0.0.1",
            reactor=reactor_,
            metrics="bogus:1",
        )
        with self.assertRaises(StartupFailed) as raised:
            service.privilegedStartService()
        self.assertIn("cannot serve metrics on bogus:1", str(raised.exception.code))
