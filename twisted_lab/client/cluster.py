"""
Several addresses for one service: the nodes of a cluster (issue 12), which
share one database, so a session token issued by any node is valid on all.

C{--server HOST[:PORT]} names them (repeated, or comma-separated);
L{parseServers} reads one such value.  L{Failover} connects to the first
that answers, in the order given (or shuffled once, with C{--shuffle}),
falling through to the next on a refused connection, a timeout or an
unknown host; after a connection ends, the next attempt starts with the
following address, so a client whose node died goes to another one first.
Which failures count is L{FALL_THROUGH}: a failure after the connection is
made (TLS, the server's refusals) is not this module's business.
"""

from __future__ import annotations

import os
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from twisted.internet import error

#: A server address: host (normalised, no brackets) and port; the port is
#: None when not given (the caller's default applies).
Address = tuple[str, int]
PartialAddress = tuple[str, int | None]

#: Connection failures after which the next address is tried.
FALL_THROUGH: tuple[type[Exception], ...] = (error.ConnectError, error.DNSLookupError)


def showAddress(host: str, port: int | None) -> str:
    """
    C{host:port} for people (C{[::1]:9093} for IPv6), or C{host} alone.
    """
    shown = f"[{host}]" if ":" in host else host
    return shown if port is None else f"{shown}:{port}"


def parseServer(text: str) -> PartialAddress:
    """
    One C{HOST[:PORT]}: C{localhost:9093}, C{127.0.0.1}, C{[::1]:9093},
    C{[::1]}, or a bare IPv6 address (C{::1}, no port: a port after an IPv6
    address needs the brackets).

    @raise ValueError: why C{text} is not an address.
    """
    from twisted_lab.client.sessions import normaliseHost

    item = text.strip()
    port: str | None = None
    if item.startswith("["):
        close = item.find("]")
        if close < 0:
            raise ValueError(f"{item!r}: no ']' after the IPv6 address")
        host, rest = item[1:close], item[close + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{item!r}: expected ':PORT' after ']'")
            port = rest[1:]
    elif item.count(":") == 1:
        host, port = item.split(":")
    else:
        host = item  # a name, an IPv4 address, or an IPv6 address without port
    host = normaliseHost(host)
    if not host:
        raise ValueError(f"{item!r}: the host is empty")
    if any(ch.isspace() or ord(ch) < 0x20 or ch in "[]," for ch in host):
        raise ValueError(f"{item!r} is not a host name or address")
    if port is None:
        return host, None
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"{item!r}: the port {port!r} is not a number") from None
    if not 1 <= number <= 65535:
        raise ValueError(f"{item!r}: the port {number} is not between 1 and 65535")
    return host, number


def parseServers(text: str) -> list[PartialAddress]:
    """
    One C{--server} value: one address, or several separated by commas.

    @raise ValueError: an address is not valid, or is empty.
    """
    items = text.split(",")
    if any(not item.strip() for item in items):
        raise ValueError(f"{text!r}: an empty address in the list")
    return [parseServer(item) for item in items]


def withPorts(servers: Sequence[PartialAddress], port: int) -> list[Address]:
    """
    C{servers} with C{port} for those without one, each address once (the
    first time it is named).
    """
    out: list[Address] = []
    for host, given in servers:
        address = (host, given if given is not None else port)
        if address not in out:
            out.append(address)
    return out


def failureReason(e: BaseException) -> str:
    """
    Why a connection could not be made, for people (C{connection refused
    (is the server running?)}, C{timed out}, C{unknown host} ...).
    """
    from twisted_lab.client.frames import BindError

    if isinstance(e, error.ConnectionRefusedError):
        return "connection refused (is the server running?)"
    if isinstance(e, error.DNSLookupError):
        return "unknown host"
    if isinstance(e, error.TimeoutError):
        return "timed out"
    if isinstance(e, BindError):
        return str(e.args[0]) if e.args else "cannot use that --bind address"
    if isinstance(e, error.ConnectBindError):
        return f"cannot use that --bind address ({_osError(e.osError)})"
    if isinstance(e, error.ConnectError) and e.osError:
        return _osError(e.osError)
    return str(e).strip().rstrip(".") or type(e).__name__


def _osError(value: Any) -> str:
    """
    An errno as its text (C{99} is "Cannot assign requested address").
    """
    if isinstance(value, int):
        return os.strerror(value)
    return str(value)


class NoServerReachable(error.ConnectError):
    """
    None of several addresses could be connected to; C{failures} says why,
    address by address, in the order they were tried.
    """

    def __init__(self, failures: Sequence[tuple[Address, BaseException]]) -> None:
        self.failures = list(failures)
        super().__init__(string=self.describe())

    def describe(self) -> str:
        return "; ".join(
            f"{showAddress(*address)}: {failureReason(e)}"
            for address, e in self.failures
        )


#: Connect one client to one address (L{twisted_lab.client.frames.connect}
#: with the command's TLS, timeout and --bind settings).
ConnectTo = Callable[[Address, Any], Awaitable[Any]]
#: Told of an address that failed and of the one tried next.
OnFailure = Callable[[Address, BaseException, Address], None]


class Failover:
    """
    The addresses of one service, tried in turn.

    Each L{connect} is one round over every address at most, starting with
    the one after the address of the last connection (the first address,
    the first time): a client that lost its node tries another node first.
    A round that fails raises the one address's own failure (one address:
    the error is exactly the single-server one) or L{NoServerReachable}, a
    L{ConnectError}; the next round starts one address further on.  Back-off
    between rounds is the caller's (the chat session's reconnect).
    """

    def __init__(
        self,
        servers: Sequence[Address],
        connectTo: ConnectTo,
        shuffle: bool = False,
        rng: random.Random | None = None,
        onFailure: OnFailure | None = None,
    ) -> None:
        unique: list[Address] = []
        for address in servers:
            if address not in unique:
                unique.append(address)
        if not unique:
            raise ValueError("no server to connect to")
        if shuffle:
            (rng or random.Random()).shuffle(unique)
        self.servers = unique
        self.connectTo = connectTo
        self.onFailure = onFailure
        #: Index of the address the next round starts with.
        self.nextIndex = 0
        #: The address of the last successful connection.
        self.current: Address | None = None
        #: The address being (or last) tried: what an error is about.
        self.trying: Address = unique[0]

    async def connect(self, client: Any) -> Any:
        """
        Connect C{client} to the first address of this round that answers.
        """
        count = len(self.servers)
        start = self.nextIndex
        failures: list[tuple[Address, BaseException]] = []
        for step in range(count):
            index = (start + step) % count
            address = self.trying = self.servers[index]
            try:
                await self.connectTo(address, client)
            except FALL_THROUGH as e:
                failures.append((address, e))
                if step + 1 < count and self.onFailure is not None:
                    self.onFailure(address, e, self.servers[(index + 1) % count])
                continue
            self.current = address
            self.nextIndex = (index + 1) % count
            return client
        self.nextIndex = (start + 1) % count
        if count == 1:
            raise failures[0][1]
        raise NoServerReachable(failures)
