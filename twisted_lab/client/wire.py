"""
A blocking socket that speaks netlab frames, for scripts without a reactor.

L{FramedSocket} is a L{socket.socket}, so everything a socket does still
works (timeouts, C{with}, C{settimeout}); it adds messages with a 4-byte
big-endian length header::

    with FramedSocket.connect_to("localhost", 9090) as s:
        s.send_message("hello")
        assert s.recv_message() == b"hello"

Over TLS, C{connect_to(..., tls=True, cafile="ca.pem")} returns a
L{FramedTLSSocket}: an L{ssl.SSLSocket} with the same message methods,
whose certificate was verified against C{cafile} (or the system's
authorities) and the host name.
"""

from __future__ import annotations

import json
import socket
import ssl
import struct
from typing import Any, cast

HEADER = struct.Struct("!I")
DEFAULT_MAX_LENGTH = 64 * 1024 * 1024


class ConnectionClosed(EOFError):
    """
    The peer closed the connection before a whole frame arrived.
    """


class FrameTooLong(ValueError):
    """
    A frame header announced more bytes than this socket accepts.
    """


class FramedMessages:
    """
    The message methods, for a socket class with C{sendall} and
    C{recv_into} (plain or TLS): mixed into L{FramedSocket} and
    L{FramedTLSSocket}.
    """

    max_length: int = DEFAULT_MAX_LENGTH

    def send_message(self, message: str | bytes) -> None:
        """
        Send one frame; a C{str} is sent as UTF-8.
        """
        payload = message.encode("utf-8") if isinstance(message, str) else message
        if len(payload) > 0xFFFFFFFF:
            raise FrameTooLong(f"{len(payload)} bytes do not fit in one frame")
        # One send for header and payload: two small sends in a row meet
        # Nagle's algorithm and the peer's delayed ACK (a 40 ms stall).
        cast(socket.socket, self).sendall(HEADER.pack(len(payload)) + payload)

    def recv_message(self) -> bytes:
        """
        Receive exactly one frame's payload.

        @raise ConnectionClosed: the peer closed before a whole frame came.
        @raise FrameTooLong: the header announced more than C{max_length}.
        """
        (length,) = HEADER.unpack(self._recv_exactly(HEADER.size, "header"))
        if length > self.max_length:
            raise FrameTooLong(
                f"peer announced a {length}-byte frame; the limit is {self.max_length}"
            )
        return self._recv_exactly(length, "payload")

    def recv_text(self, encoding: str = "utf-8") -> str:
        """
        Receive one frame and decode it.
        """
        return self.recv_message().decode(encoding)

    def send_json(self, obj: Any) -> None:
        """
        Send C{obj} as one compact JSON frame.
        """
        text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
        self.send_message(text)

    def recv_json(self) -> Any:
        """
        Receive one frame and parse it as JSON.
        """
        return json.loads(self.recv_message())

    def _recv_exactly(self, count: int, what: str) -> bytes:
        buffer = bytearray(count)
        view = memoryview(buffer)
        got = 0
        while got < count:
            n = cast(socket.socket, self).recv_into(view[got:])
            if n == 0:
                if what == "header" and got == 0:
                    raise ConnectionClosed("connection closed by peer")
                raise ConnectionClosed(
                    f"connection closed after {got} of {count} {what} bytes"
                )
            got += n
        return bytes(buffer)


class FramedSocket(FramedMessages, socket.socket):
    """
    A TCP socket that sends and receives length-prefixed messages.
    """

    def __init__(
        self,
        family: int = socket.AF_INET,
        type: int = socket.SOCK_STREAM,
        proto: int = 0,
        fileno: int | None = None,
        *,
        max_length: int = DEFAULT_MAX_LENGTH,
    ) -> None:
        socket.socket.__init__(self, family, type, proto, fileno)
        self.max_length = max_length

    @classmethod
    def connect_to(
        cls,
        host: str,
        port: int,
        timeout: float | None = 10.0,
        *,
        source_address: tuple[str, int] | None = None,
        max_length: int = DEFAULT_MAX_LENGTH,
        tls: bool = False,
        cafile: str | None = None,
        context: ssl.SSLContext | None = None,
    ) -> FramedSocket | FramedTLSSocket:
        """
        Connect to the first address of C{host} that answers, like
        L{socket.create_connection}, and return the connected socket.

        With C{tls} (implied by C{cafile} or C{context}), the handshake is
        done here: the server's certificate must be signed by C{cafile}'s
        certificate (without one, by the system's authorities) and valid
        for C{host}; the result is a L{FramedTLSSocket}.

        @raise ssl.SSLError: the handshake or the verification failed
            (L{ssl.SSLCertVerificationError} for a certificate).
        """
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        last: OSError | None = None
        for family, kind, proto, _, address in socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM
        ):
            sock = cls(family, kind, proto, max_length=max_length)
            try:
                sock.settimeout(timeout)
                if source_address is not None:
                    sock.bind(source_address)
                sock.connect(address)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError as e:
                last = e
                sock.close()
                continue
            if not (tls or cafile or context):
                return sock
            if context is None:
                context = ssl.create_default_context(cafile=cafile)
            return FramedTLSSocket.wrap(sock, context, host, max_length)
        raise last if last is not None else OSError(f"no address for {host}")


class FramedTLSSocket(FramedMessages, ssl.SSLSocket):
    """
    A TLS socket with the message methods of L{FramedSocket}; made by
    L{FramedSocket.connect_to} with C{tls=True}, or L{FramedTLSSocket.wrap}.
    """

    @classmethod
    def wrap(
        cls,
        sock: socket.socket,
        context: ssl.SSLContext,
        server_hostname: str,
        max_length: int = DEFAULT_MAX_LENGTH,
    ) -> FramedTLSSocket:
        """
        Wrap a connected socket and do the TLS handshake.
        """
        plain = socket.socket(sock.family, sock.type, sock.proto, sock.detach())
        plain.settimeout(sock.gettimeout())
        context.sslsocket_class = cls
        wrapped = context.wrap_socket(plain, server_hostname=server_hostname)
        assert isinstance(wrapped, cls)
        wrapped.max_length = max_length
        return wrapped
