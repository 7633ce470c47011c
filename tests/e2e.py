"""
Running the real programs for end-to-end tests: C{twistd} with a netlab
plugin in a subprocess, and the real C{netlab} client.

Waiting here is polling with L{deferLater} for something a separate process
does (a port file appearing, a process exiting), bounded by a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue

from tests.helpers import BIN, subprocessEnv

DEADLINE = 20.0


async def pause(seconds: float = 0.05) -> None:
    await deferLater(reactor, seconds, lambda: None)


def netlabCommand() -> list[str]:
    script = BIN / "netlab"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "twisted_lab"]


async def runNetlab(
    *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None
) -> tuple[bytes, bytes, int]:
    """
    Run the real C{netlab} command; returns (stdout, stderr, exit code).
    Standard input is a pipe (not a terminal), so nothing is asked.
    """
    command = netlabCommand()
    if stdin is not None:
        # getProcessOutputAndValue has no stdin: let a shell feed it.
        shell = 'printf \'%s\' "$NETLAB_STDIN" | exec "$@"'
        env = dict(env or subprocessEnv(), NETLAB_STDIN=stdin.decode())
        command = ["/bin/sh", "-c", shell, "sh"] + command
    out, err, code = await getProcessOutputAndValue(
        command[0], command[1:] + list(args), env=env or subprocessEnv()
    )
    return out, err, code


class Server:
    """
    One real C{twistd} process running a netlab plugin.
    """

    def __init__(self, workdir: Path, plugin: str, *options: str) -> None:
        self.workdir = workdir
        self.plugin = plugin
        self.options = list(options)
        self.logFile = workdir / f"{plugin}.log"
        self.eventLog = workdir / f"{plugin}.events.jsonl"
        self.portFile = workdir / f"{plugin}.port"
        #: The process's standard output and error: a file, not a pipe
        #: nobody reads while it runs (a full pipe would stall the server).
        self.outputFile = workdir / f"{plugin}.stdout"
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    def command(self, daemon: bool = False) -> list[str]:
        twistd = [str(BIN / "twistd")]
        if daemon:
            twistd += ["--pidfile", str(self.workdir / "twistd.pid")]
        else:
            twistd += ["-n", "--pidfile", ""]
        return (
            twistd
            + ["--logfile", str(self.logFile), self.plugin]
            + ["--port-file", str(self.portFile), "--event-log", str(self.eventLog)]
            + self.options
        )

    async def start(self, daemon: bool = False) -> Server:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.portFile.exists():
            self.portFile.unlink()
        with self.outputFile.open("ab") as output:
            self.process = subprocess.Popen(
                self.command(daemon),
                cwd=self.workdir,
                env=subprocessEnv(),
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        waited = 0.0
        while not self.portFile.exists():
            if not daemon and self.process.poll() is not None:
                raise AssertionError(f"twistd exited early:\n{self.output()}")
            if waited > DEADLINE:
                raise AssertionError(f"no port file after {DEADLINE} s:\n{self.log()}")
            await pause()
            waited += 0.05
        self.port = int(self.portFile.read_text())
        return self

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        """
        Send C{sig} and wait for the process to exit; its exit status.
        """
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return await self.wait()

    async def wait(self) -> int:
        assert self.process is not None
        waited = 0.0
        while self.process.poll() is None:
            if waited > DEADLINE:
                raise AssertionError(
                    f"twistd did not exit:\n{self.log()}\n{self.postMortem()}"
                )
            await pause()
            waited += 0.05
        return self.process.returncode

    def cleanup(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def postMortem(self) -> str:
        """
        What a process that stopped answering was doing: its scheduler state
        (a stopped process shows T) and, after SIGABRT, the Python traceback
        of every thread (PYTHONFAULTHANDLER), then it is killed.
        """
        assert self.process is not None
        pid = self.process.pid
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            state = next(
                (line for line in status.splitlines() if line.startswith("State:")),
                "State: ?",
            )
        except OSError as e:
            state = f"State: unknown ({e})"
        self.process.send_signal(signal.SIGABRT)
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        return f"{state}\nits output:\n{self.output()[-20000:]}"

    def output(self) -> str:
        """
        What the process wrote to standard output and error so far.
        """
        if not self.outputFile.exists():
            return ""
        return self.outputFile.read_text(errors="replace")

    def log(self) -> str:
        return self.logFile.read_text() if self.logFile.exists() else ""

    def events(self) -> list[dict[str, Any]]:
        """
        Every event logged, oldest first: the event log rotates at 1 MB
        (PATH.2, PATH.1, then PATH).
        """
        rotated = [
            p
            for p in self.eventLog.parent.glob(self.eventLog.name + ".*")
            if p.suffix[1:].isdigit()
        ]
        rotated.sort(key=lambda p: int(p.suffix[1:]), reverse=True)
        found = []
        for path in rotated + [self.eventLog]:
            if path.exists():
                with path.open(encoding="utf-8") as f:
                    found += [json.loads(line) for line in f if line.strip()]
        return found

    def eventNames(self) -> list[str]:
        return [e["event"] for e in self.events() if "event" in e]


def pidAlive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
