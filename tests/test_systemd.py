"""
systemd, played by the test: sd_notify datagrams (unit tests on a real
unix datagram socket), and end to end a real C{twistd} that says
C{READY=1} once it serves (after its database is open) and C{STOPPING=1}
on SIGTERM, and serves on a listening socket it was handed with
C{LISTEN_FDS}/C{LISTEN_PID}, as systemd's socket activation hands it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.e2e import DEADLINE, Server, pause
from tests.helpers import subprocessEnv
from twisted_lab.client.wire import FramedSocket
from twisted_lab.runtime.systemd import SystemdNotifier


def notifySocket(test) -> tuple[socket.socket, str]:
    """
    A unix datagram socket bound in a fresh short directory (socket paths
    have a 108-byte limit), as systemd's C{$NOTIFY_SOCKET}.
    """
    directory = tempfile.mkdtemp(prefix="netlab-sd-")
    test.addCleanup(shutil.rmtree, directory, True)
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    test.addCleanup(sock.close)
    sock.bind(path)
    sock.setblocking(False)
    return sock, path


def drain(sock: socket.socket) -> list[str]:
    received = []
    while True:
        try:
            received.append(sock.recv(4096).decode())
        except BlockingIOError:
            return received


class NotifierTests(SynchronousTestCase):
    def test_oneDatagram(self) -> None:
        sock, path = notifySocket(self)
        notifier = SystemdNotifier.fromEnvironment({"NOTIFY_SOCKET": path})
        self.assertTrue(notifier.notify("READY=1", "STATUS=serving"))
        self.assertEqual(drain(sock), ["READY=1\nSTATUS=serving"])
        notifier.stopping()
        self.assertEqual(drain(sock), ["STOPPING=1\nSTATUS=stopping"])

    def test_abstractNamespace(self) -> None:
        name = f"netlab-test-{os.getpid()}-{id(self)}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.bind("\0" + name)
        sock.setblocking(False)
        self.assertTrue(SystemdNotifier("@" + name).notify("READY=1"))
        self.assertEqual(drain(sock), ["READY=1"])

    def test_notUnderSystemd(self) -> None:
        notifier = SystemdNotifier.fromEnvironment({})
        self.assertFalse(notifier.notify("READY=1"))
        notifier.ready("serving")  # nothing to do, nothing raised

    def test_supervisorGone(self) -> None:
        """
        A socket that is not there is logged, never raised.
        """
        events: list[dict] = []
        notifier = SystemdNotifier("/nonexistent/netlab/notify")
        notifier.log = Logger(observer=events.append)
        self.assertFalse(notifier.notify("READY=1"))
        self.assertEqual([e["event"] for e in events], ["notify_failed"])

    def test_readyWaitsForTheDatabase(self) -> None:
        sock, path = notifySocket(self)
        notifier = SystemdNotifier(path)
        opened: defer.Deferred[bool] = defer.Deferred()
        notifier.ready("serving", opened)
        self.assertEqual(drain(sock), [])
        opened.callback(True)
        self.assertEqual(drain(sock), ["READY=1\nSTATUS=serving"])
        failed: defer.Deferred[bool] = defer.Deferred()
        notifier.ready("serving", failed)
        failed.callback(False)
        self.assertEqual(drain(sock), [])


class NoSocketTests(SynchronousTestCase):
    def test_noInheritedSocket(self) -> None:
        """
        --listen systemd:... without a socket from systemd fails the start
        with one line that says so, not a traceback.
        """
        from twisted.internet.task import Clock

        from twisted_lab.runtime.server import NetlabService
        from twisted_lab.runtime.startup import StartupFailed
        from twisted_lab.transports.echo import EchoFactory

        service = NetlabService(
            "netlab-echo",
            EchoFactory(clock=Clock()),
            "systemd:domain=INET:index=7",
            reactor=Clock(),
        )
        service.log = Logger(observer=lambda event: None)
        with self.assertRaises(StartupFailed) as caught:
            service.privilegedStartService()
        self.assertIn("no such socket from systemd", str(caught.exception))


class ActivatedServer(Server):
    """
    A real twistd started the way systemd starts a unit: with extra
    environment, and optionally a listening socket as file descriptor 3
    with C{LISTEN_FDS=1} and C{LISTEN_PID} set to twistd's own pid.
    """

    def __init__(self, *args, env: dict[str, str], listening=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.env = env
        self.listening = listening

    async def start(self, daemon: bool = False) -> Server:
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = self.command()
        passFds: list[int] = []
        env = subprocessEnv(**self.env)
        if self.listening is not None:
            fd = self.listening.fileno()
            passFds = [fd]
            # The socket becomes fd 3 and LISTEN_PID the pid of the shell,
            # which exec makes twistd's own: what systemd does.  (bash: dash
            # cannot name a descriptor above 9.)
            command = [
                "/bin/bash",
                "-c",
                f"exec 3<&{fd} {fd}<&-; "
                'LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=netlab exec "$@"',
                "sh",
            ] + command
        with self.outputFile.open("ab") as output:
            self.process = subprocess.Popen(
                command,
                cwd=self.workdir,
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
                pass_fds=passFds,
            )
        waited = 0.0
        while not self.portFile.exists():
            if self.process.poll() is not None:
                raise AssertionError(f"twistd exited early:\n{self.output()}")
            if waited > DEADLINE:
                raise AssertionError(f"no port file after {DEADLINE} s:\n{self.log()}")
            await pause()
            waited += 0.05
        self.port = int(self.portFile.read_text())
        return self


async def receive(sock: socket.socket, wanted: str) -> list[str]:
    """
    Datagrams until one holds the line C{wanted} (polling the reactor).
    """
    received: list[str] = []
    waited = 0.0
    while not any(wanted in d.splitlines() for d in received):
        if waited > DEADLINE:
            raise AssertionError(f"no {wanted} after {DEADLINE} s: {received}")
        received += drain(sock)
        await pause()
        waited += 0.05
    return received


class SystemdEndToEndTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_readyThenStopping(self):
        """
        A stored service (chat) says READY=1 once it listens and its
        database is open, nothing before; STOPPING=1 on SIGTERM.
        """
        sock, path = notifySocket(self)
        workdir = Path(self.mktemp()).absolute()
        server = ActivatedServer(
            workdir,
            "netlab-chat",
            "--port",
            "0",
            "--db",
            str(workdir / "chat.sqlite3"),
            env={"NOTIFY_SOCKET": path},
        )
        self.addCleanup(server.cleanup)
        yield defer.ensureDeferred(server.start())
        received = yield defer.ensureDeferred(receive(sock, "READY=1"))
        ready = [d for d in received if "READY=1" in d.splitlines()]
        self.assertEqual(len(ready), 1, received)
        self.assertIn("STATUS=netlab-chat serving on 127.0.0.1 port", ready[0])
        self.assertTrue((workdir / "chat.sqlite3").exists())
        # It serves: a ping is answered.
        reply = yield threads.deferToThread(self.ping, server.port)
        self.assertEqual(reply, {"type": "pong"})

        server.process.send_signal(signal.SIGTERM)
        received = yield defer.ensureDeferred(receive(sock, "STOPPING=1"))
        self.assertNotIn("READY=1", "".join(received))
        status = yield defer.ensureDeferred(server.wait())
        self.assertIn(status, (0, -signal.SIGTERM))

    def ping(self, port: int) -> dict:
        with FramedSocket.connect_to("127.0.0.1", port, timeout=10) as s:
            s.send_json({"type": "ping"})
            return s.recv_json()

    @defer.inlineCallbacks
    def test_socketActivation(self):
        """
        twistd adopts the listening socket it inherits as fd 3 (LISTEN_FDS=1,
        LISTEN_PID its own) through --listen systemd:domain=INET:index=0 and
        echoes on it; READY=1 follows.
        """
        sock, path = notifySocket(self)
        listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(listening.close)
        listening.bind(("127.0.0.1", 0))
        listening.listen(16)
        port = listening.getsockname()[1]
        server = ActivatedServer(
            Path(self.mktemp()).absolute(),
            "netlab-echo",
            "--listen",
            "systemd:domain=INET:index=0",
            env={"NOTIFY_SOCKET": path},
            listening=listening,
        )
        self.addCleanup(server.cleanup)
        yield defer.ensureDeferred(server.start())
        listening.close()  # only twistd holds it now
        self.assertEqual(server.port, port)
        yield defer.ensureDeferred(receive(sock, "READY=1"))
        echoed = yield threads.deferToThread(self.echo, port)
        self.assertEqual(echoed, b"activated")
        [listened] = [e for e in server.events() if e.get("event") == "listening"]
        self.assertEqual(listened["port"], port)
        status = yield defer.ensureDeferred(server.stop())
        self.assertIn(status, (0, -signal.SIGTERM))

    def echo(self, port: int) -> bytes:
        with FramedSocket.connect_to("127.0.0.1", port, timeout=10) as s:
            s.send_message(b"activated")
            return s.recv_message()
