"""
End to end: the real C{twistd netlab-echo} in a subprocess, the real
C{netlab} client and real sockets.
"""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

from twisted.internet import defer, threads
from twisted.trial.unittest import TestCase

from tests.e2e import DEADLINE, Server, pause, pidAlive, runNetlab
from twisted_lab.client.wire import FramedSocket
from twisted_lab.codecs import events


def _recvOrReset(sock: socket.socket) -> bytes:
    try:
        return sock.recv(10)
    except ConnectionResetError:
        return b""


class EchoEndToEndTests(TestCase):
    timeout = 60

    def server(self, *options: str) -> Server:
        server = Server(Path(self.mktemp()).absolute(), "netlab-echo", *options)
        self.addCleanup(server.cleanup)
        return server

    @defer.inlineCallbacks
    def test_clientAndEveryEvent(self):
        server = yield defer.ensureDeferred(self.server("--port", "0").start())
        out, err, code = yield defer.ensureDeferred(
            runNetlab(
                "echo",
                "--host",
                "127.0.0.1",
                "--port",
                str(server.port),
                "hello",
                "wörld",
            )
        )
        self.assertEqual((out, code), ("hello\nwörld\n".encode(), 0), err)
        reports = err.decode()
        self.assertIn(f"connected to 127.0.0.1:{server.port}", reports)
        self.assertIn("sent 5 bytes", reports)
        self.assertIn("received 6 bytes", reports)
        self.assertIn("disconnected", reports)

        status = yield defer.ensureDeferred(server.stop())
        self.assertIn(status, (0, -signal.SIGTERM))
        names = server.eventNames()
        for name in (
            events.SERVER_STARTED,
            events.LISTENING,
            events.CLIENT_CONNECTED,
            events.DATA_RECEIVED,
            events.DATA_SENT,
            events.CLIENT_DISCONNECTED,
            events.SERVER_STOPPING,
            events.SERVER_STOPPED,
        ):
            self.assertIn(name, names)
        [listening] = [e for e in server.events() if e.get("event") == "listening"]
        self.assertEqual(listening["port"], server.port)
        # The text log has the same events as readable lines, no payloads.
        log = server.log()
        self.assertIn(f"listening on 127.0.0.1 port {server.port}", log)
        self.assertIn("client connected", log)
        self.assertIn("bytes received", log)
        self.assertNotIn("hello", log)

    @defer.inlineCallbacks
    def test_stdinLinesAndQuiet(self):
        server = yield defer.ensureDeferred(self.server("--port", "0").start())
        out, err, code = yield defer.ensureDeferred(
            runNetlab(
                "echo",
                "-q",
                "--host",
                "127.0.0.1",
                "--port",
                str(server.port),
                stdin=b"first line\nsecond\n",
            )
        )
        self.assertEqual((out, err, code), (b"first line\nsecond\n", b"", 0))

    @defer.inlineCallbacks
    def test_connectionRefused(self):
        holder = socket.socket()
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        holder.close()  # nothing listens there now
        out, err, code = yield defer.ensureDeferred(
            runNetlab("echo", "--host", "127.0.0.1", "--port", str(port), "hi")
        )
        self.assertEqual(code, 3)
        self.assertEqual(out, b"")
        lines = err.decode().strip().splitlines()
        self.assertEqual(len(lines), 1, err)
        self.assertIn("connection refused", lines[0])
        self.assertNotIn("Traceback", err.decode())

    @defer.inlineCallbacks
    def test_portFallback(self):
        holder = socket.socket()
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        self.addCleanup(holder.close)
        busy = holder.getsockname()[1]
        server = yield defer.ensureDeferred(self.server("--port", str(busy)).start())
        self.assertNotEqual(server.port, busy)
        [fallback] = [e for e in server.events() if e.get("event") == "port_fallback"]
        self.assertEqual((fallback["requested"], fallback["port"]), (busy, server.port))
        self.assertIn(f"serving on port {server.port} instead", server.log())
        out, _, code = yield defer.ensureDeferred(
            runNetlab(
                "echo", "-q", "--host", "127.0.0.1", "--port", str(server.port), "moved"
            )
        )
        self.assertEqual((out, code), (b"moved\n", 0))

    @defer.inlineCallbacks
    def test_noPortFallbackExitsWithMessage(self):
        holder = socket.socket()
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        self.addCleanup(holder.close)
        busy = holder.getsockname()[1]
        server = self.server("--port", str(busy), "--no-port-fallback")
        with self.assertRaises(AssertionError) as raised:
            yield defer.ensureDeferred(server.start())
        self.assertIn("exited early", str(raised.exception))
        self.assertNotEqual(server.process.returncode, 0)
        self.assertIn(f"cannot listen on port {busy}", server.log())
        self.assertIn("--no-port-fallback", server.log())

    @defer.inlineCallbacks
    def test_oversizedFrameAndOtherClients(self):
        server = yield defer.ensureDeferred(
            self.server("--port", "0", "--max-length", "1000").start()
        )

        def misbehaveAndBehave():
            with (
                FramedSocket.connect_to("127.0.0.1", server.port) as good,
                socket.create_connection(("127.0.0.1", server.port)) as bad,
            ):
                good.send_message(b"before")
                first = good.recv_message()
                bad.sendall(b"\x00\x00\x03\xe9")  # 1001 > 1000
                cut = _recvOrReset(bad)
                good.send_message(b"x" * 1000)
                second = good.recv_message()
                return first, cut, len(second)

        result = yield threads.deferToThread(misbehaveAndBehave)
        self.assertEqual(result, (b"before", b"", 1000))
        yield defer.ensureDeferred(server.stop())
        [tooLong] = [e for e in server.events() if e.get("event") == "frame_too_long"]
        self.assertEqual((tooLong["length"], tooLong["limit"]), (1001, 1000))

    @defer.inlineCallbacks
    def test_rawMode(self):
        server = yield defer.ensureDeferred(
            self.server("--port", "0", "--framing", "raw").start()
        )

        def talk():
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
                s.sendall(b"plain text, no header\n")
                got = b""
                while len(got) < 22:
                    got += s.recv(100)
                return got

        got = yield threads.deferToThread(talk)
        self.assertEqual(got, b"plain text, no header\n")

    @defer.inlineCallbacks
    def test_sigtermWithClientConnected(self):
        server = yield defer.ensureDeferred(self.server("--port", "0").start())
        sock = yield threads.deferToThread(
            FramedSocket.connect_to, "127.0.0.1", server.port
        )
        self.addCleanup(sock.close)
        yield threads.deferToThread(sock.send_message, b"hi")
        self.assertEqual((yield threads.deferToThread(sock.recv_message)), b"hi")
        status = yield defer.ensureDeferred(server.stop(signal.SIGTERM))
        self.assertIn(status, (0, -signal.SIGTERM))
        closed = yield threads.deferToThread(_recvOrReset, sock)
        self.assertEqual(closed, b"")
        names = server.eventNames()
        self.assertIn(events.CLIENT_DISCONNECTED, names)
        self.assertEqual(names[-1], events.SERVER_STOPPED)

    @defer.inlineCallbacks
    def test_daemonMode(self):
        server = self.server("--port", "0")
        yield defer.ensureDeferred(server.start(daemon=True))
        self.assertEqual((yield defer.ensureDeferred(server.wait())), 0)
        pidFile = server.workdir / "twistd.pid"
        pid = int(pidFile.read_text())
        self.addCleanup(lambda: pidAlive(pid) and os.kill(pid, signal.SIGKILL))
        out, _, code = yield defer.ensureDeferred(
            runNetlab(
                "echo",
                "-q",
                "--host",
                "127.0.0.1",
                "--port",
                str(server.port),
                "daemon",
            )
        )
        self.assertEqual((out, code), (b"daemon\n", 0))
        os.kill(pid, signal.SIGTERM)
        waited = 0.0
        while pidAlive(pid):
            self.assertLess(waited, DEADLINE, "the daemon did not stop")
            yield defer.ensureDeferred(pause())
            waited += 0.05
        self.assertFalse(pidFile.exists(), "twistd removes its pid file")
        self.assertEqual(server.eventNames()[-1], events.SERVER_STOPPED)


class EchoBackpressureTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_clientThatNeverReads(self):
        """
        A client that sends frames and never reads is stopped by TCP flow
        control (the server stops reading when it cannot write), so the
        server does not buffer its echo without bound; others are served.
        """
        server = Server(Path(self.mktemp()).absolute(), "netlab-echo", "--port", "0")
        self.addCleanup(server.cleanup)
        yield defer.ensureDeferred(server.start())

        def rss() -> int:
            status = Path(f"/proc/{server.process.pid}/status").read_text()
            return int(status.split("VmRSS:")[1].split()[0])  # KiB

        def flood():
            before = rss()
            payload = b"\x00\x01\x00\x00" + b"z" * 65536  # 64 KiB frames
            sent = 0
            with socket.create_connection(("127.0.0.1", server.port)) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
                s.settimeout(2)
                try:
                    while sent < 512 * 1024 * 1024:
                        s.sendall(payload)
                        sent += len(payload)
                except TimeoutError:
                    pass
                grown = rss() - before
                with FramedSocket.connect_to("127.0.0.1", server.port) as other:
                    other.send_message(b"still served")
                    answer = other.recv_message()
            return sent, grown, answer

        sent, grown, answer = yield threads.deferToThread(flood)
        self.assertLess(sent, 128 * 1024 * 1024, "the sender was made to wait")
        self.assertLess(grown, 64 * 1024, "server memory grew by less than 64 MiB")
        self.assertEqual(answer, b"still served")
