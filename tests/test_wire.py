"""
Unit tests of L{twisted_lab.wire.FramedSocket} over a socket pair.
"""

from __future__ import annotations

import socket

from twisted.trial.unittest import SynchronousTestCase

from twisted_lab.wire import ConnectionClosed, FramedSocket, FrameTooLong


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
