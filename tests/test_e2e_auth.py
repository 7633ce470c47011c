"""
End to end: the real C{twistd netlab-auth} and the real C{netlab auth}
client: the whole account life, the saved session, TLS with a certificate
made here, and SIGKILL in the middle of a registration storm.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import signal
import sqlite3
import stat
import threading
import time
from pathlib import Path

from twisted.internet import defer, threads
from twisted.trial.unittest import TestCase

from tests.e2e import Server, runNetlab
from tests.helpers import subprocessEnv
from twisted_lab.client.wire import ConnectionClosed, FramedSocket


def selfSignedCertificate(directory: Path) -> tuple[Path, Path]:
    """
    A throwaway key and certificate for localhost and 127.0.0.1.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    keyPath, certPath = directory / "key.pem", directory / "cert.pem"
    keyPath.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    certPath.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return keyPath, certPath


class AuthEndToEndTests(TestCase):
    timeout = 120

    def server(self, *extra: str) -> Server:
        workdir = Path(self.mktemp()).absolute()
        workdir.mkdir(parents=True)
        server = Server(
            workdir, "netlab-auth", "--db", str(workdir / "netlab.sqlite3"), *extra
        )
        self.addCleanup(server.cleanup)
        self.env = subprocessEnv(XDG_CONFIG_HOME=str(workdir / "config"))
        return server

    def auth(self, server: Server, *args: str, stdin: bytes | None = None, port=True):
        where = ["--host", "127.0.0.1", "--port", str(server.port)] if port else []
        return defer.ensureDeferred(
            runNetlab("auth", *args, "-q", *where, stdin=stdin, env=self.env)
        )

    @defer.inlineCallbacks
    def test_accountLifeWithTheClient(self):
        server = self.server("--port", "0")
        yield defer.ensureDeferred(server.start())
        out, err, code = yield self.auth(
            server,
            "register",
            "--user",
            "Alice",
            "--password-stdin",
            stdin=b"correct horse\n",
        )
        self.assertEqual((out, code), (b"Registered alice.\n", 0), err)
        out, err, code = yield self.auth(
            server,
            "login",
            "--user",
            "ALICE",
            "--password-stdin",
            stdin=b"correct horse\n",
        )
        self.assertEqual(code, 0, err)
        self.assertIn(b"Logged in as alice", out)
        saved = Path(self.env["XDG_CONFIG_HOME"]) / "netlab" / "sessions.json"
        self.assertEqual(stat.S_IMODE(os.stat(saved).st_mode), 0o600)
        self.assertIn(b"alice", saved.read_bytes())
        out, _, code = yield self.auth(server, "whoami")
        self.assertEqual((out, code), (b"alice\n", 0))
        out, _, code = yield self.auth(
            server,
            "passwd",
            "--password-stdin",
            stdin=b"correct horse\nbattery staple\n",
        )
        self.assertEqual(code, 0)
        out, _, code = yield self.auth(server, "logout")
        self.assertEqual((out, code), (b"Logged out.\n", 0))
        self.assertNotIn(b"alice", saved.read_bytes(), "the session is forgotten")
        _, err, code = yield self.auth(server, "whoami")
        self.assertEqual(code, 5)
        self.assertIn(b"not logged in", err)
        _, err, code = yield self.auth(
            server,
            "login",
            "--user",
            "alice",
            "--password-stdin",
            stdin=b"correct horse\n",
        )
        self.assertEqual(code, 1)
        self.assertEqual(
            err.strip().splitlines(),
            [b"netlab: bad_credentials: wrong username or password"],
        )
        yield defer.ensureDeferred(server.stop())
        names = server.eventNames()
        for event in (
            "user_registered",
            "login_succeeded",
            "session_resumed",
            "logged_out",
            "login_failed",
        ):
            self.assertIn(event, names)
        log = server.log() + server.eventLog.read_text()
        self.assertNotIn("correct horse", log)
        self.assertNotIn("battery staple", log)

    @defer.inlineCallbacks
    def test_tls(self):
        workdir = Path(self.mktemp()).absolute()
        workdir.mkdir(parents=True)
        key, cert = selfSignedCertificate(workdir)
        server = self.server(
            "--listen", f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
        )
        yield defer.ensureDeferred(server.start())
        out, err, code = yield defer.ensureDeferred(
            runNetlab(
                "auth",
                "register",
                "-q",
                "--tls",
                "--cafile",
                str(cert),
                "--host",
                "localhost",
                "--port",
                str(server.port),
                "--user",
                "tlsuser",
                "--password-stdin",
                stdin=b"secret-over-tls\n",
                env=self.env,
            )
        )
        self.assertEqual((out, code), (b"Registered tlsuser.\n", 0), err)
        # Without trusting the certificate, the client refuses.
        _, err, code = yield defer.ensureDeferred(
            runNetlab(
                "auth",
                "login",
                "-q",
                "--tls",
                "--host",
                "localhost",
                "--port",
                str(server.port),
                "--user",
                "tlsuser",
                "--password-stdin",
                stdin=b"secret-over-tls\n",
                env=self.env,
            )
        )
        self.assertNotEqual(code, 0)
        self.assertNotIn(b"Traceback", err)

    @defer.inlineCallbacks
    def test_sigkillDuringRegistrationStorm(self):
        server = self.server("--port", "0", "--registrations-per-hour", "100000")
        yield defer.ensureDeferred(server.start())
        acknowledged: list[str] = []
        lock = threading.Lock()
        stop = threading.Event()

        def register(worker: int) -> None:
            # A fresh connection every 5 registrations: one connection may
            # register 5 at once (docs/protocol.md 3.5).
            try:
                for batch in range(2_000):
                    with FramedSocket.connect_to("127.0.0.1", server.port) as s:
                        for i in range(5):
                            if stop.is_set():
                                return
                            name = f"user{worker}x{batch}x{i}"
                            s.send_json(
                                {
                                    "type": "register",
                                    "username": name,
                                    "password": "password1",
                                }
                            )
                            reply = s.recv_json()
                            if reply.get("type") == "registered":
                                with lock:
                                    acknowledged.append(reply["username"])
            except (ConnectionClosed, OSError):
                return

        workers = [threading.Thread(target=register, args=(w,)) for w in range(4)]
        for w in workers:
            w.start()

        def killWhenBusy():
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                with lock:
                    if len(acknowledged) >= 30:
                        break
                stop.wait(0.01)
            server.process.send_signal(signal.SIGKILL)
            for w in workers:
                w.join(30)
            stop.set()

        yield threads.deferToThread(killWhenBusy)
        self.assertEqual((yield defer.ensureDeferred(server.wait())), -signal.SIGKILL)
        yield defer.ensureDeferred(server.start())
        db = server.workdir / "netlab.sqlite3"
        with sqlite3.connect(db) as connection:
            self.assertEqual(
                connection.execute("PRAGMA integrity_check").fetchone()[0], "ok"
            )
            stored = {r[0] for r in connection.execute("SELECT username FROM accounts")}
        self.assertGreaterEqual(len(acknowledged), 30)
        self.assertEqual(set(acknowledged) - stored, set())
        # And the restarted server serves those accounts.
        out, err, code = yield self.auth(
            server,
            "login",
            "--user",
            acknowledged[-1],
            "--password-stdin",
            stdin=b"password1\n",
        )
        self.assertEqual(code, 0, err)
