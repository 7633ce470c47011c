"""
Test helpers shared by the unit, integration and end-to-end tests.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_lab.codecs.framing import encodeFrame

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


class EventRecorder:
    """
    A Logger whose events land in a list, for asserting on structured events.
    """

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.logger = Logger(namespace="test", observer=self.events.append)

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == name]

    def names(self) -> list[str]:
        return [e["event"] for e in self.events if "event" in e]


def connectProtocol(
    factory: Any, host: str = "127.0.0.2", port: int = 40000
) -> tuple[Any, StringTransport, EventRecorder]:
    """
    Build a protocol from C{factory} on a L{StringTransport} whose peer is
    C{host}:C{port}, recording the factory's events.
    """
    recorder = EventRecorder()
    factory.log = recorder.logger
    if factory.clock is None:
        factory.clock = Clock()
    protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
    transport = StringTransport(peerAddress=IPv4Address("TCP", host, port))
    protocol.makeConnection(transport)
    return protocol, transport, recorder


def openConnection(
    test: Any, factory: Any, address: Any
) -> tuple[Any, StringTransport]:
    """
    A protocol from C{factory} on a L{StringTransport} whose peer is
    C{address}, disconnected at the end of C{test} if still open.
    """
    protocol = factory.buildProtocol(address)
    transport = StringTransport(peerAddress=address)
    protocol.makeConnection(transport)
    test.addCleanup(closeIfOpen, factory, protocol)
    return protocol, transport


def closeIfOpen(factory: Any, protocol: Any) -> None:
    if protocol in factory.connections:
        protocol.connectionLost(Failure(ConnectionDone()))


def frames(*payloads: bytes) -> bytes:
    return b"".join(encodeFrame(p) for p in payloads)


def subprocessEnv(**extra: str) -> dict[str, str]:
    """
    The environment for a real twistd or netlab subprocess: the source tree
    first on the path, so the code under test is what runs.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    env["PYTHONUNBUFFERED"] = "1"
    # A process that stops answering can be made to say where it is: on
    # SIGABRT it prints every thread's Python traceback (see e2e.Server).
    env["PYTHONFAULTHANDLER"] = "1"
    env.update(extra)
    return env


async def waitFor(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    """
    Wait (polling the reactor, not sleeping the thread) until C{predicate()}
    is true: for work that completes in another thread, such as the store.
    """
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    waited = 0.0
    while not predicate():
        if waited > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.01, lambda: None)
        waited += 0.01
