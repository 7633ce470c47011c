"""
Unit tests of L{twisted_lab.client.wire.FramedSocket} over a socket pair.
"""

from __future__ import annotations

import socket

from twisted.trial.unittest import SynchronousTestCase

from twisted_lab.client.wire import ConnectionClosed, FramedSocket, FrameTooLong


class FramedSocketTests(SynchronousTestCase):
    def pair(self, max_length: int = 1 << 20) -> tuple[FramedSocket, socket.socket]:
        a, b = socket.socketpair()
        framed = FramedSocket(
            a.family, a.type, a.proto, a.detach(), max_length=max_length
        )
        framed.settimeout(5)
        self.addCleanup(framed.close)
        self.addCleanup(b.close)
        return framed, b

    def test_isASocket(self) -> None:
        framed, _ = self.pair()
        self.assertIsInstance(framed, socket.socket)

    def test_sendMessageAddsHeader(self) -> None:
        framed, peer = self.pair()
        framed.send_message("hé")
        self.assertEqual(peer.recv(100), b"\x00\x00\x00\x03h\xc3\xa9")
        framed.send_message(b"")
        self.assertEqual(peer.recv(100), b"\x00\x00\x00\x00")

    def test_recvMessageSplitAnyhow(self) -> None:
        framed, peer = self.pair()
        peer.sendall(b"\x00\x00")
        peer.sendall(b"\x00\x05he")
        peer.sendall(b"llo\x00\x00\x00\x00")
        self.assertEqual(framed.recv_message(), b"hello")
        self.assertEqual(framed.recv_message(), b"")

    def test_json(self) -> None:
        framed, peer = self.pair()
        framed.send_json({"type": "name", "name": "Zoë"})
        data = peer.recv(100)
        peer.sendall(data)
        self.assertEqual(framed.recv_json(), {"type": "name", "name": "Zoë"})

    def test_eofBetweenFrames(self) -> None:
        framed, peer = self.pair()
        peer.close()
        with self.assertRaises(ConnectionClosed) as raised:
            framed.recv_message()
        self.assertIn("closed by peer", str(raised.exception))

    def test_eofMidFrame(self) -> None:
        framed, peer = self.pair()
        peer.sendall(b"\x00\x00\x00\x0aabc")
        peer.close()
        with self.assertRaises(ConnectionClosed) as raised:
            framed.recv_message()
        self.assertIn("3 of 10 payload bytes", str(raised.exception))

    def test_eofMidHeader(self) -> None:
        framed, peer = self.pair()
        peer.sendall(b"\x00\x00")
        peer.close()
        with self.assertRaises(ConnectionClosed) as raised:
            framed.recv_message()
        self.assertIn("2 of 4 header bytes", str(raised.exception))

    def test_frameTooLong(self) -> None:
        framed, peer = self.pair(max_length=10)
        peer.sendall(b"\x00\x00\x00\x0b")
        with self.assertRaises(FrameTooLong) as raised:
            framed.recv_message()
        self.assertIn("11-byte", str(raised.exception))
        self.assertIsInstance(raised.exception, ValueError)


class FramedTLSSocketTests(SynchronousTestCase):
    """
    C{connect_to(tls=True)} against a TLS echo of one frame on loopback.
    """

    def setUp(self) -> None:
        import ssl
        import threading
        from pathlib import Path

        from tests.test_e2e_auth import selfSignedCertificate

        directory = Path(self.mktemp())
        directory.mkdir(parents=True)
        key, self.cert = selfSignedCertificate(directory)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, key)
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(10)
        self.port = listener.getsockname()[1]
        self.addCleanup(listener.close)

        def serve() -> None:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    header = tls.recv(4)
                    tls.sendall(header + tls.recv(int.from_bytes(header, "big")))
            except (OSError, ssl.SSLError):
                conn.close()

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()
        self.addCleanup(self.thread.join, 10)

    def test_verifiedRoundTrip(self) -> None:
        from twisted_lab.client.wire import FramedTLSSocket

        with FramedSocket.connect_to(
            "localhost", self.port, tls=True, cafile=str(self.cert)
        ) as s:
            self.assertIsInstance(s, FramedTLSSocket)
            s.send_message("over tls")
            self.assertEqual(s.recv_message(), b"over tls")

    def test_untrustedCertificateIsRefused(self) -> None:
        import ssl

        with self.assertRaises(ssl.SSLCertVerificationError):
            FramedSocket.connect_to("localhost", self.port, tls=True)

    def test_wrongHostNameIsRefused(self) -> None:
        import ssl

        # The certificate names localhost and 127.0.0.1, not 127.1.
        with self.assertRaises(ssl.SSLCertVerificationError) as raised:
            FramedSocket.connect_to("127.1", self.port, cafile=str(self.cert))
        self.assertIn("127.1", str(raised.exception))
