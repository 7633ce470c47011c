"""
How a real twistd server starts: a daemon announces a port fallback on the
console of the person who started it, and a server binds before it drops
privileges, so it can serve a port below 1024 as an unprivileged user.
"""

from __future__ import annotations

import os
import pwd
import signal
import socket
import subprocess
from pathlib import Path

from twisted.internet import defer, threads
from twisted.trial.unittest import SkipTest, TestCase

from tests.e2e import DEADLINE, pause, pidAlive
from tests.helpers import BIN, frames, subprocessEnv


class DaemonStartTests(TestCase):
    timeout = 60

    def busyPort(self) -> int:
        holder = socket.socket()
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        self.addCleanup(holder.close)
        return holder.getsockname()[1]

    async def stopDaemon(self, pidFile: Path) -> None:
        pid = int(pidFile.read_text())
        os.kill(pid, signal.SIGTERM)
        waited = 0.0
        while pidAlive(pid):
            if waited > DEADLINE:
                os.kill(pid, signal.SIGKILL)
                raise AssertionError("the daemon did not stop")
            await pause()
            waited += 0.05

    @defer.inlineCallbacks
    def test_daemonAnnouncesPortFallback(self):
        """
        twistd's daemon points standard error at /dev/null, yet the person
        who started it is told where it serves (a copy of the terminal kept
        until the server has started).
        """
        workdir = Path(self.mktemp()).absolute()
        workdir.mkdir()
        busy = self.busyPort()
        pidFile = workdir / "echo.pid"
        done = yield threads.deferToThread(
            subprocess.run,
            [
                str(BIN / "twistd"),
                "--pidfile", str(pidFile),
                "--logfile", str(workdir / "echo.log"),
                "netlab-echo", "--port", str(busy),
                "--port-file", str(workdir / "port"),
            ],  # fmt: skip
            cwd=workdir,
            env=subprocessEnv(),
            capture_output=True,
            timeout=30,
        )
        self.addCleanup(
            lambda: pidFile.exists() and defer.ensureDeferred(self.stopDaemon(pidFile))
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        served = int((workdir / "port").read_text())
        self.assertNotEqual(served, busy)
        self.assertIn(
            f"port {busy} is taken; netlab-echo is serving on 127.0.0.1 port "
            f"{served} instead",
            done.stderr.decode(),
        )
        with socket.create_connection(("127.0.0.1", served), timeout=10) as s:
            s.sendall(frames(b"still here"))
            self.assertEqual(s.recv(100), frames(b"still here"))
        yield defer.ensureDeferred(self.stopDaemon(pidFile))


class PrivilegedPortTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_lowPortAsNobody(self):
        """
        As root, C{twistd --uid nobody netlab-echo --port 900} binds port
        900 before dropping privileges and then serves it as C{nobody}.
        """
        if os.geteuid() != 0:
            raise SkipTest("binding port 900 needs root (CI runs as root)")
        nobody = pwd.getpwnam("nobody")
        workdir = Path(self.mktemp()).absolute()
        workdir.mkdir()
        os.chmod(workdir, 0o777)
        probe = socket.socket()
        try:
            probe.bind(("127.0.0.1", 900))
        except OSError as e:
            raise SkipTest(f"port 900 is not free here: {e}") from None
        finally:
            probe.close()
        process = subprocess.Popen(
            [
                str(BIN / "twistd"), "-n", "--pidfile", "",
                "--uid", str(nobody.pw_uid), "--gid", str(nobody.pw_gid),
                "--logfile", str(workdir / "echo.log"),
                "netlab-echo", "--port", "900", "--no-port-fallback",
            ],  # fmt: skip
            cwd=workdir,
            env=subprocessEnv(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.addCleanup(process.wait)
        self.addCleanup(process.kill)
        waited = 0.0
        while "listening on" not in _read(workdir / "echo.log"):
            self.assertIsNone(process.poll(), _read(workdir / "echo.log"))
            self.assertLess(waited, DEADLINE, "never listened")
            yield defer.ensureDeferred(pause())
            waited += 0.05

        def talk() -> bytes:
            with socket.create_connection(("127.0.0.1", 900), timeout=10) as s:
                s.sendall(frames(b"low port"))
                return s.recv(100)

        self.assertEqual((yield threads.deferToThread(talk)), frames(b"low port"))
        with open(f"/proc/{process.pid}/status") as status:
            uids = next(line for line in status if line.startswith("Uid:"))
        self.assertEqual(uids.split()[1:], [str(nobody.pw_uid)] * 4)
        process.send_signal(signal.SIGTERM)


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


class SignalTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_sigusr1LeavesAServerLoggingToStandardOutputRunning(self):
        """
        logrotate sends SIGUSR1 to every netlab unit; a server that logs to
        standard output and has no event log must not die of it.
        """
        workdir = Path(self.mktemp()).absolute()
        workdir.mkdir()
        process = subprocess.Popen(
            [
                str(BIN / "twistd"), "-n", "--pidfile=", "--logfile=-",
                "netlab-echo", "--port", "0",
                "--port-file", str(workdir / "port"),
            ],  # fmt: skip
            cwd=workdir,
            env=subprocessEnv(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.addCleanup(process.wait)
        self.addCleanup(process.kill)
        waited = 0.0
        while not (workdir / "port").exists():
            self.assertIsNone(process.poll(), "twistd exited early")
            self.assertLess(waited, DEADLINE, "never listened")
            yield defer.ensureDeferred(pause())
            waited += 0.05
        port = int((workdir / "port").read_text())
        process.send_signal(signal.SIGUSR1)

        def talk() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(frames(b"after SIGUSR1"))
                return s.recv(100)

        self.assertEqual((yield threads.deferToThread(talk)), frames(b"after SIGUSR1"))
        self.assertIsNone(process.poll())
