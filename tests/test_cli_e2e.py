"""
End to end: the real C{netlab} client, piped, against real C{twistd}
servers (and a fake loopback listener that records what it is sent):
sessions bound to their server, pipes read to the end, C{--json}, C{--tls}
on every command, one-line errors with their exit codes, several servers in
one directory.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import threading
from pathlib import Path
from typing import Any

from twisted.internet import defer, threads
from twisted.trial.unittest import TestCase

from tests.e2e import DEADLINE, Server, pause, runNetlab
from tests.helpers import BIN, subprocessEnv
from tests.test_e2e_auth import selfSignedCertificate
from twisted_lab.client.wire import FramedSocket

FAST_HASH = ("--hash-memory-kib", "1024", "--hash-time-cost", "1")


class RecordingServer:
    """
    A fake netlab-auth on loopback that records every byte it receives:
    C{login} gets a session with token C{fake-token}, everything else
    C{invalid_token}.
    """

    def __init__(self, port: int = 0) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.received = bytearray()
        self.connections = 0
        self.stopped = False
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while not self.stopped:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                conn.settimeout(5)
                try:
                    self.answer(conn)
                except OSError:
                    pass

    def answer(self, conn: socket.socket) -> None:
        buffer = b""
        while True:
            data = conn.recv(65536)
            if not data:
                return
            self.received += data
            buffer += data
            while len(buffer) >= 4:
                (length,) = struct.unpack("!I", buffer[:4])
                if len(buffer) < 4 + length:
                    break
                request = json.loads(buffer[4 : 4 + length])
                buffer = buffer[4 + length :]
                if request.get("type") == "login":
                    reply = {
                        "type": "session",
                        "username": "mallory",
                        "token": "fake-token",
                        "expires_at": "2099-01-01T00:00:00Z",
                    }
                else:
                    reply = {"type": "error", "code": "invalid_token", "message": "no"}
                reply["id"] = request.get("id")
                payload = json.dumps(reply).encode()
                conn.sendall(struct.pack("!I", len(payload)) + payload)

    def stop(self) -> None:
        self.stopped = True
        self.listener.close()
        self.thread.join(5)


class ClientEndToEndTests(TestCase):
    timeout = 180

    def setUp(self) -> None:
        self.workdir = Path(self.mktemp()).absolute()
        self.workdir.mkdir(parents=True)
        self.db = self.workdir / "netlab.sqlite3"
        self.config = self.workdir / "config"
        self.env = subprocessEnv(XDG_CONFIG_HOME=str(self.config))
        self.key, self.cert = selfSignedCertificate(self.workdir)

    def server(self, plugin: str, *extra: str, tls: bool = False) -> Server:
        listen = (
            [
                "--listen",
                f"ssl:0:interface=127.0.0.1:privateKey={self.key}:certKey={self.cert}",
            ]
            if tls
            else ["--port", "0"]
        )
        options = [*listen, *extra]
        if plugin != "netlab-echo":
            options += ["--db", str(self.db)]
        if plugin in ("netlab-auth", "netlab-chat"):
            options += list(FAST_HASH)
        name = f"{plugin}-{'tls' if tls else 'tcp'}"
        server = Server(self.workdir / name, plugin, *options)
        self.addCleanup(server.cleanup)
        return server

    def netlab(self, *args: str, stdin: bytes | None = None):
        return defer.ensureDeferred(runNetlab(*args, stdin=stdin, env=self.env))

    def login(self, *where: str, user: str = "alice"):
        """
        C{netlab auth login -q} to the server C{where} names, the password
        (C{password1}) on standard input.
        """
        return self.netlab(
            "auth", "login", "-q", *where, "--user", user, "--password-stdin",
            stdin=b"password1\n",
        )  # fmt: skip

    def register(self, port: int, *names: str, tls: bool = False) -> None:
        extra = {"tls": True, "cafile": str(self.cert)} if tls else {}
        with FramedSocket.connect_to("localhost", port, **extra) as s:
            for name in names:
                s.send_json(
                    {"type": "register", "username": name, "password": "password1"}
                )
                reply = s.recv_json()
                assert reply["type"] == "registered", reply

    def sessionsFile(self) -> dict[str, Any]:
        return json.loads((self.config / "netlab" / "sessions.json").read_text())[
            "sessions"
        ]

    def assertOneLine(self, err: bytes) -> None:
        text = err.decode()
        self.assertNotIn("Traceback", text)
        self.assertEqual(len(text.strip().splitlines()), 1, text)
        self.assertTrue(text.startswith("netlab: "), text)

    # -- sessions -------------------------------------------------------------

    @defer.inlineCallbacks
    def test_tokenIsOnlyEverSentToItsOwnServer(self):
        authServer = self.server("netlab-auth", tls=True)
        yield defer.ensureDeferred(authServer.start())
        self.register(authServer.port, "alice", tls=True)
        try:
            fake = RecordingServer(9092)  # the default port: the old bug's target
        except OSError:
            fake = RecordingServer()
        self.addCleanup(fake.stop)
        out, err, code = yield self.netlab(
            "auth",
            "login",
            "-q",
            "--host",
            "localhost",
            "--port",
            str(authServer.port),
            "--cafile",
            str(self.cert),
            "--user",
            "alice",
            "--password-stdin",
            stdin=b"password1\n",
        )
        self.assertEqual(code, 0, err)
        [saved] = self.sessionsFile().values()
        token = saved["token"].encode()
        self.assertEqual(saved["server"]["tls"], True)

        # whoami without --host/--port goes to the server of the session, over
        # TLS; the fake server on the default port hears nothing.
        out, err, code = yield self.netlab("auth", "whoami", "-q")
        self.assertEqual((out, code), (b"alice\n", 0), err)
        # Naming the host and port, without --tls: TLS is adopted.
        out, err, code = yield self.netlab(
            "auth",
            "whoami",
            "-q",
            "--host",
            "localhost",
            "--port",
            str(authServer.port),
        )
        self.assertEqual((out, code), (b"alice\n", 0), err)
        # Another server: no session there, nothing sent, exit 5.
        for command in (
            ("auth", "whoami"),
            ("auth", "logout"),
            ("chat", "--room", "x", "--say", "hi"),
        ):
            out, err, code = yield self.netlab(
                *command, "-q", "--host", "127.0.0.1", "--port", str(fake.port)
            )
            self.assertEqual(code, 5, err)
            self.assertIn(b"not logged in to 127.0.0.1:", err)
        self.assertEqual(fake.connections, 0)
        self.assertNotIn(token, bytes(fake.received))

        # A session with the fake server too: both coexist, whoami must
        # choose, and the fake's refusal forgets only the fake's session.
        out, err, code = yield self.netlab(
            "auth",
            "login",
            "-q",
            "--host",
            "127.0.0.1",
            "--port",
            str(fake.port),
            "--user",
            "mallory",
            "--password-stdin",
            stdin=b"whatever1\n",
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(len(self.sessionsFile()), 2)
        out, err, code = yield self.netlab("auth", "whoami", "-q")
        self.assertEqual(code, 2)
        self.assertIn(b"several servers", err)
        out, err, code = yield self.netlab(
            "auth", "whoami", "-q", "--port", str(fake.port)
        )
        self.assertEqual(code, 5)
        self.assertIn(b"fake-token", bytes(fake.received))
        self.assertNotIn(token, bytes(fake.received))
        [left] = self.sessionsFile().values()
        self.assertEqual(left["token"].encode(), token)
        out, err, code = yield self.netlab("auth", "whoami", "-q")
        self.assertEqual((out, code), (b"alice\n", 0), err)
        yield defer.ensureDeferred(authServer.stop())
        self.assertNotIn(token.decode(), authServer.log())

    @defer.inlineCallbacks
    def test_revokedSessionIsForgottenByItsOwnServer(self):
        chat = self.server("netlab-chat")
        yield defer.ensureDeferred(chat.start())
        self.register(chat.port, "alice")
        where = ("--host", "127.0.0.1", "--port", str(chat.port))
        out, err, code = yield self.login(*where)
        self.assertEqual(code, 0, err)
        [saved] = self.sessionsFile().values()
        with FramedSocket.connect_to("127.0.0.1", chat.port) as s:
            s.send_json({"type": "resume", "token": saved["token"]})
            self.assertEqual(s.recv_json()["type"], "session")
            s.send_json({"type": "logout"})
            self.assertEqual(s.recv_json()["type"], "logged_out")
        out, err, code = yield self.netlab(
            "chat", *where, "--room", "dev", "--say", "after logout"
        )
        self.assertEqual(code, 5, err)
        self.assertOneLine(err)
        self.assertIn(b"log in again", err)
        self.assertEqual(self.sessionsFile(), {})

    # -- pipes ------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_pipedChatSaysEveryLineInOrder(self):
        chat = self.server("netlab-chat")
        yield defer.ensureDeferred(chat.start())
        self.register(chat.port, "alice")
        where = ("--host", "127.0.0.1", "--port", str(chat.port))
        out, err, code = yield self.login(*where)
        self.assertEqual(code, 0, err)
        # 30 lines: past the default burst of 20, so some meet rate_limited.
        lines = "".join(f"{n}\n" for n in range(1, 31)).encode()
        out, err, code = yield self.netlab("chat", *where, "--room", "dev", stdin=lines)
        self.assertEqual(code, 0, err)
        with FramedSocket.connect_to("127.0.0.1", chat.port) as s:
            s.send_json({"type": "login", "username": "alice", "password": "password1"})
            s.recv_json()
            s.send_json({"type": "history", "room": "dev", "after": 0, "limit": 100})
            history = s.recv_json()
        texts = [m["text"] for m in history["messages"]]
        self.assertEqual(texts, [str(n) for n in range(1, 31)])
        self.assertIn(b"rate limited", err)
        # A last line without a newline is a line too.
        out, err, code = yield self.netlab(
            "chat", *where, "--room", "dev", stdin=b"31\n32"
        )
        self.assertEqual(code, 0, err)
        out, err, code = yield self.netlab(
            "chat", *where, "--room", "dev", "--tail", "2"
        )
        self.assertEqual(
            [line.split()[-1] for line in out.splitlines()], [b"31", b"32"]
        )

    @defer.inlineCallbacks
    def test_pipedEchoSendsEveryLine(self):
        echo = self.server("netlab-echo")
        yield defer.ensureDeferred(echo.start())
        lines = "".join(f"line {n}\n" for n in range(3000)).encode()
        out, err, code = yield self.netlab(
            "echo", "-q", "--port", str(echo.port), stdin=lines
        )
        self.assertEqual((out, code), (lines, 0), err)

    # -- --json -----------------------------------------------------------------

    @defer.inlineCallbacks
    def test_jsonOnEveryCommand(self):
        echo = self.server("netlab-echo")
        identity = self.server("netlab-identity")
        chat = self.server("netlab-chat")
        for server in (echo, identity, chat):
            yield defer.ensureDeferred(server.start())
        self.register(chat.port, "alice")

        def records(out: bytes) -> list[dict[str, Any]]:
            return [json.loads(line) for line in out.splitlines()]

        out, err, code = yield self.netlab(
            "echo", "--json", "--port", str(echo.port), "hi"
        )
        self.assertEqual(code, 0, err)
        events = [r["event"] for r in records(out)]
        self.assertEqual(
            events, ["connected", "sent", "received", "reply", "disconnected"]
        )
        self.assertEqual(records(out)[3]["text"], "hi")

        out, err, code = yield self.netlab(
            "identity", "--json", "-q", "--port", str(identity.port), "--name", "Zoë"
        )
        self.assertEqual(code, 0, err)
        greeting, reply = records(out)
        self.assertEqual(greeting["reply"]["type"], "ask_name")
        self.assertEqual(
            reply["reply"], {"type": "welcome", "name": "Zoë", "visits": 1}
        )

        where = ("--port", str(chat.port))
        out, err, code = yield self.netlab(
            "auth",
            "login",
            "--json",
            "-q",
            *where,
            "--user",
            "alice",
            "--password-stdin",
            stdin=b"password1\n",
        )
        self.assertEqual(code, 0, err)
        [login] = records(out)
        self.assertEqual(login["reply"]["username"], "alice")
        self.assertNotIn("token", login["reply"], "tokens stay in the sessions file")
        out, err, code = yield self.netlab(
            "chat", "--json", *where, "--room", "dev", "--say", "a\nb"
        )
        self.assertEqual(code, 0, err)
        messages = [r for r in records(out) if r["event"] == "message"]
        # Each line of --say is one message, like each line of a pipe.
        self.assertEqual([m["message"]["text"] for m in messages], ["a", "b"])
        out, err, code = yield self.netlab(
            "auth",
            "login",
            "--json",
            "-q",
            *where,
            "--user",
            "alice",
            "--password-stdin",
            stdin=b"wrong-password\n",
        )
        self.assertEqual(code, 1)
        [failure] = records(out)
        self.assertEqual(
            (failure["event"], failure["error"], failure["exit"]),
            ("error", "bad_credentials", 1),
        )

    # -- TLS everywhere -----------------------------------------------------------

    @defer.inlineCallbacks
    def test_tlsOnEveryCommand(self):
        echo = self.server("netlab-echo", tls=True)
        chat = self.server("netlab-chat", tls=True)
        for server in (echo, chat):
            yield defer.ensureDeferred(server.start())
        self.register(chat.port, "alice", tls=True)
        ca = ("--host", "localhost", "--cafile", str(self.cert))
        out, err, code = yield self.netlab(
            "echo", "-q", *ca, "--port", str(echo.port), "hi"
        )
        self.assertEqual((out, code), (b"hi\n", 0), err)
        out, err, code = yield self.login(*ca, "--port", str(chat.port))
        self.assertEqual(code, 0, err)
        # No --tls: the session's TLS settings are used.
        out, err, code = yield self.netlab(
            "chat",
            "--host",
            "localhost",
            "--port",
            str(chat.port),
            "--room",
            "dev",
            "--say",
            "over tls",
        )
        self.assertEqual(code, 0, err)
        self.assertIn(b"<alice> over tls", out)
        # A plain client on a TLS port, and TLS on a plain one: one line each.
        plainEcho = self.server("netlab-echo")
        yield defer.ensureDeferred(plainEcho.start())
        out, err, code = yield self.netlab("echo", "-q", "--port", str(echo.port), "hi")
        self.assertOneLine(err)
        self.assertIn(b"TLS", err)
        out, err, code = yield self.netlab(
            "echo", "-q", "--tls", "--port", str(plainEcho.port), "hi"
        )
        self.assertEqual(code, 3)
        self.assertOneLine(err)
        self.assertIn(b"is it a TLS port?", err)
        # Not trusted, and not the name on the certificate.
        out, err, code = yield self.netlab(
            "echo", "-q", "--tls", "--host", "localhost", "--port", str(echo.port), "x"
        )
        self.assertEqual(code, 3)
        self.assertOneLine(err)
        self.assertIn(b"certificate verify failed", err)
        self.assertNotIn(b"SSL routines", err)
        out, err, code = yield self.netlab(
            "echo",
            "-q",
            "--cafile",
            str(self.cert),
            "--host",
            "127.1",
            "--port",
            str(echo.port),
            "x",
        )
        self.assertEqual(code, 3)
        self.assertOneLine(err)
        self.assertIn(b"not valid for that name", err)

    @defer.inlineCallbacks
    def test_identityOverTLS(self):
        identity = self.server("netlab-identity", tls=True)
        yield defer.ensureDeferred(identity.start())
        out, err, code = yield self.netlab(
            "identity",
            "-q",
            "--host",
            "localhost",
            "--cafile",
            str(self.cert),
            "--port",
            str(identity.port),
            "--name",
            "Ann",
            "--timeout",
            "5",
        )
        self.assertEqual(code, 0, err)
        self.assertIn(b"Hello, Ann!", out)

    # -- errors -------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_oneLineErrorsAndExitCodes(self):
        echo6 = self.server("netlab-echo", "--interface", "::1")
        yield defer.ensureDeferred(echo6.start())
        out, err, code = yield self.netlab(
            "echo", "-q", "--host", "[::1]", "--port", str(echo6.port), "six"
        )
        self.assertEqual((out, code), (b"six\n", 0), err)
        out, err, code = yield self.netlab(
            "echo",
            "-q",
            "--host",
            "127.0.0.1",
            "--bind",
            "::1",
            "--port",
            str(echo6.port),
            "x",
        )
        self.assertEqual(code, 3)
        self.assertOneLine(err)
        self.assertIn(b"no IPv6 address", err)
        out, err, code = yield self.netlab(
            "echo",
            "-q",
            "--host",
            "::1",
            "--bind",
            "::1",
            "--port",
            str(echo6.port),
            "bound",
        )
        self.assertEqual((out, code), (b"bound\n", 0), err)
        out, err, code = yield self.netlab(
            "echo", "-q", "--host", "no-such-host.invalid", "--port", "1", "x"
        )
        self.assertEqual(code, 3)
        self.assertOneLine(err)
        out, err, code = yield self.netlab(
            "auth", "login", "-q", "--port", "1", "--password-stdin", stdin=b"x\n"
        )
        self.assertEqual(code, 2, "no --user without a terminal")
        self.assertOneLine(err)
        out, err, code = yield self.netlab(
            "echo",
            "-q",
            "--cafile",
            str(self.workdir / "missing.pem"),
            "--port",
            str(echo6.port),
            "x",
        )
        self.assertEqual(code, 2)
        self.assertOneLine(err)
        self.assertIn(b"cannot read", err)
        out, err, code = yield self.netlab("--version")
        self.assertEqual((out.strip(), code), (b"netlab 0.1.0", 0))

    @defer.inlineCallbacks
    def test_authErrorsAreOneLine(self):
        authServer = self.server("netlab-auth")
        yield defer.ensureDeferred(authServer.start())
        self.register(authServer.port, "alice")
        out, err, code = yield self.netlab(
            "auth",
            "login",
            "--port",
            str(authServer.port),
            "--user",
            "alice",
            "--password-stdin",
            stdin=b"wrong-password\n",
        )
        self.assertEqual(code, 1)
        lines = err.decode().strip().splitlines()
        self.assertEqual(
            lines[-1], "netlab: bad_credentials: wrong username or password"
        )
        self.assertNotIn("non-clean", err.decode())
        out, err, code = yield self.netlab(
            "auth",
            "register",
            "-q",
            "--port",
            str(authServer.port),
            "--user",
            "bob",
            "--password-stdin",
            stdin=b"short\n",
        )
        self.assertEqual(code, 1)
        self.assertOneLine(err)
        self.assertIn(b"weak_password", err)

    # -- several servers in one directory ---------------------------------------

    @defer.inlineCallbacks
    def test_severalDaemonsInOneDirectoryWithTheirOwnPidfiles(self):
        twistd = str(BIN / "twistd")
        started = []
        for name in ("echo1", "echo2"):
            status = yield threads.deferToThread(
                subprocess.call,
                [
                    twistd,
                    "--pidfile",
                    f"{name}.pid",
                    "--logfile",
                    f"{name}.log",
                    "netlab-echo",
                    "--port",
                    "0",
                    "--port-file",
                    f"{name}.port",
                ],
                cwd=self.workdir,
                env=subprocessEnv(),
            )
            self.assertEqual(status, 0)
            started.append(name)
        pids = []
        for name in started:
            portFile, pidFile = (
                self.workdir / f"{name}.port",
                self.workdir / f"{name}.pid",
            )
            waited = 0.0
            while not (portFile.exists() and pidFile.exists()):
                self.assertLess(waited, DEADLINE, f"{name} did not start")
                yield defer.ensureDeferred(pause())
                waited += 0.05
            pids.append(int(pidFile.read_text()))
            self.addCleanup(_kill, pids[-1])
            out, err, code = yield self.netlab(
                "echo", "-q", "--port", portFile.read_text().strip(), name
            )
            self.assertEqual((out, code), (name.encode() + b"\n", 0), err)
        self.assertEqual(len(set(pids)), 2)


def _kill(pid: int) -> None:
    import os
    import signal

    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


class SharedDirectoryTests(TestCase):
    """
    The guide's foreground recipe: auth and chat in one directory, sharing
    the default database, with C{--pidfile=}.
    """

    timeout = 120

    @defer.inlineCallbacks
    def test_authAndChatShareADirectoryWithoutPidFiles(self):
        workdir = Path(self.mktemp()).absolute()
        workdir.mkdir(parents=True)
        env = subprocessEnv(XDG_CONFIG_HOME=str(workdir / "config"))
        processes = []
        for plugin in ("netlab-auth", "netlab-chat"):
            process = subprocess.Popen(
                [
                    str(BIN / "twistd"),
                    "-n",
                    "--pidfile=",
                    "--logfile",
                    f"{plugin}.log",
                    plugin,
                    "--port",
                    "0",
                    "--port-file",
                    f"{plugin}.port",
                    *FAST_HASH,
                ],
                cwd=workdir,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            processes.append(process)
            self.addCleanup(_stop, process)
        ports = []
        for plugin in ("netlab-auth", "netlab-chat"):
            portFile = workdir / f"{plugin}.port"
            waited = 0.0
            while not portFile.exists():
                self.assertLess(waited, DEADLINE, f"{plugin} did not start")
                self.assertEqual([p.poll() for p in processes], [None, None])
                yield defer.ensureDeferred(pause())
                waited += 0.05
            ports.append(portFile.read_text().strip())
        self.assertFalse((workdir / "twistd.pid").exists())
        authPort, chatPort = ports
        out, err, code = yield defer.ensureDeferred(
            runNetlab(
                "auth",
                "register",
                "-q",
                "--port",
                authPort,
                "--user",
                "alice",
                "--password-stdin",
                stdin=b"password1\n",
                env=env,
            )
        )
        self.assertEqual(code, 0, err)
        # Registered on auth, logged in on chat: one database.
        out, err, code = yield defer.ensureDeferred(
            runNetlab(
                "auth",
                "login",
                "-q",
                "--port",
                chatPort,
                "--user",
                "alice",
                "--password-stdin",
                stdin=b"password1\n",
                env=env,
            )
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(
            sorted(p.name for p in workdir.glob("netlab.sqlite3*"))[0],
            "netlab.sqlite3",
        )


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
