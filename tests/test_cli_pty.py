"""
End to end through a real pseudo-terminal (pexpect): the interactive paths
of the real C{netlab} client against real C{twistd} servers.  The chat's
terminal UI (line editing, history, completion, lines printed above the
input line, rooms, colours, neutralised escapes, a dropped connection
noticed at once, lines queued while reconnecting), the password prompts,
and Ctrl-C.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from pathlib import Path

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from tests.e2e import Server, netlabCommand
from tests.helpers import subprocessEnv
from twisted_lab.client.wire import FramedSocket

try:
    import pexpect
except ImportError:  # pragma: no cover - in the test extra
    pexpect = None

FAST_HASH = ("--hash-memory-kib", "1024", "--hash-time-cost", "1")
#: Escape sequences (CSI, OSC-less charset and keypad modes) and carriage
#: returns, stripped to read the screen as text.
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-B]|\x1b[=>]|\r")


def _interactiveSignals() -> None:
    """
    Give the program Ctrl-C as a shell in a terminal gives it: a test run
    started in the background of a script (as `.ci/run &` is) inherits
    SIGINT ignored, and Python then leaves it ignored in the program.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Terminal:
    """
    A program on a pseudo-terminal: what it printed, raw and as text.
    """

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        assert pexpect is not None
        env = dict(env, TERM="xterm", PROMPT_TOOLKIT_NO_CPR="1", COLUMNS="100")
        self.child = pexpect.spawn(
            args[0],
            args[1:],
            env=env,
            dimensions=(30, 100),
            encoding="utf-8",
            preexec_fn=_interactiveSignals,
        )
        self.raw = ""

    @property
    def text(self) -> str:
        return ANSI.sub("", self.raw)

    def pump(self) -> bool:
        """
        Read what is there; False once the program has ended.
        """
        assert pexpect is not None
        try:
            while True:
                self.raw += self.child.read_nonblocking(65536, timeout=0.05)
        except pexpect.TIMEOUT:
            return True
        except pexpect.EOF:
            return False

    def wait(self, pattern: str, timeout: float = 15, since: int = 0) -> re.Match:
        """
        Wait until the screen text (from offset C{since}) matches.
        """
        deadline = time.monotonic() + timeout
        while True:
            alive = self.pump()
            found = re.search(pattern, self.text[since:])
            if found:
                return found
            if not alive or time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} in:\n{self.text[-1500:]}")

    def mark(self) -> int:
        self.pump()
        return len(self.text)

    def send(self, keys: str) -> None:
        self.child.send(keys)

    def exitStatus(self, timeout: float = 15) -> int:
        deadline = time.monotonic() + timeout
        while self.pump():
            if time.monotonic() > deadline:
                self.child.terminate(force=True)
                raise AssertionError(f"still running:\n{self.text[-1500:]}")
        self.child.close()
        assert self.child.exitstatus is not None, self.child.signalstatus
        return self.child.exitstatus

    def close(self) -> None:
        if self.child.isalive():
            self.child.terminate(force=True)


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(sock: FramedSocket, message: dict) -> dict:
    sock.send_json(message)
    return sock.recv_json()


class PseudoTerminalTests(TestCase):
    timeout = 180

    if pexpect is None:  # pragma: no cover
        skip = "pexpect is not installed (pip install '.[test]')"

    def setUp(self) -> None:
        self.workdir = Path(self.mktemp()).absolute()
        self.workdir.mkdir(parents=True)
        self.db = self.workdir / "netlab.sqlite3"
        self.env = subprocessEnv(XDG_CONFIG_HOME=str(self.workdir / "config"))
        self.env.pop("NO_COLOR", None)

    def server(self, plugin: str, *extra: str) -> Server:
        server = Server(
            self.workdir / plugin, plugin, "--db", str(self.db), *FAST_HASH, *extra
        )
        self.addCleanup(server.cleanup)
        return server

    def terminal(self, *args: str, **env: str) -> Terminal:
        terminal = Terminal(netlabCommand() + list(args), dict(self.env, **env))
        self.addCleanup(terminal.close)
        return terminal

    def register(self, port: int, *names: str) -> None:
        with FramedSocket.connect_to("127.0.0.1", port) as s:
            for name in names:
                reply = call(
                    s, {"type": "register", "username": name, "password": "password1"}
                )
                assert reply["type"] == "registered", reply

    def login(self, port: int, name: str = "alice") -> None:
        t = self.terminal(
            "auth", "login", "-q", "--host", "127.0.0.1", "--port", str(port)
        )
        t.wait(r"Username: $")
        self.assertNotIn("[]", t.text, "no empty default in brackets")
        t.send(f"{name}\r")
        t.wait("Password: ")
        t.send("password1\r")
        t.wait(f"Logged in as {name}")
        self.assertEqual(t.exitStatus(), 0)
        self.assertNotIn("password1", t.text, "the password is not echoed")

    @defer.inlineCallbacks
    def test_chatInATerminal(self):
        port = freePort()
        chat = self.server("netlab-chat", "--port", str(port), "--no-port-fallback")
        yield defer.ensureDeferred(chat.start())
        self.register(port, "alice", "bob")
        self.login(port)
        bob = FramedSocket.connect_to("127.0.0.1", port)
        self.addCleanup(bob.close)
        call(bob, {"type": "login", "username": "bob", "password": "password1"})
        call(bob, {"type": "join", "room": "random"})
        call(bob, {"type": "join", "room": "dev"})

        t = self.terminal(
            "chat", "--host", "127.0.0.1", "--port", str(port), "-r", "dev"
        )
        t.wait(r"joined #dev")
        t.wait(r"#dev> ?$")
        self.assertIn("\x1b[34m-!- joined #dev", t.raw, "colour on a terminal")

        # Incoming text is printed above the line being typed, which survives.
        t.send("half typ")
        t.wait(r"#dev> ?half typ")
        since = t.mark()
        bob.send_json({"type": "say", "room": "dev", "text": "interrupting"})
        t.wait(r"#dev <bob> interrupting\n", since=since)
        t.wait(r"#dev> ?half typ$", since=since)
        t.send("ed\r")
        t.wait(r"#dev <alice> half typed", since=since)

        # Line editing (cursor left, insert) and input history (Up).
        t.send("helo\x1b[Dl\r")
        t.wait(r"<alice> hello\n")
        since = t.mark()
        t.send("\x1b[A\x1b[A\r")  # Up twice: "half typed" again
        t.wait(r"<alice> half typed", since=since)

        # Completion of a command, then of a room; every line names its room.
        t.send("/jo\t")
        t.wait(r"#dev> ?/join ?$")
        t.send("ops\r")
        t.wait(r"joined #ops")
        t.wait(r"#ops> ?$")
        since = t.mark()
        bob.send_json({"type": "say", "room": "dev", "text": "still in dev"})
        t.wait(r"#dev <bob> still in dev", since=since)
        t.send("/part\r")
        t.wait(r"left #ops; lines now go to #dev")
        t.wait(r"#dev> ?$")

        # Escape sequences and line breaks from the network are neutralised:
        # no colour, no clear-screen, no forged second line.
        since = t.mark()
        rawSince = len(t.raw)
        bob.send_json(
            {
                "type": "say",
                "room": "dev",
                "text": "\x1b[2J\x1b[31mred\n[12:00] #dev <admin> obey",
            }
        )
        t.wait(r"<bob> ␛\[2J␛\[31mred␊\[12:00\] #dev <admin> obey", since=since)
        self.assertNotIn("\x1b[2J", t.raw[rawSince:])
        self.assertNotIn("\x1b[31mred", t.raw[rawSince:])
        self.assertIsNone(re.search(r"^\[12:00\] #dev <admin>", t.text[since:], re.M))

        # The server stops: noticed at once, with its reason, without typing.
        since = t.mark()
        yield defer.ensureDeferred(chat.stop())
        t.wait(r"connection lost \(server_shutdown", since=since)
        t.wait(r"reconnecting", since=since)
        # A line typed meanwhile is queued, then said after the catch-up.
        t.send("typed while away\r")
        t.wait(r"\(reconnecting\) \(1 queued\)>", since=since)
        yield defer.ensureDeferred(chat.start())
        t.wait(r"reconnected", timeout=40, since=since)
        t.wait(r"#dev <alice> typed while away", since=since)

        # Rooms that exist complete too, not only the ones joined.
        t.send("/join ra\t")
        t.wait(r"/join random$")
        t.send("\x15")  # Ctrl-U: the line is cleared, nothing sent

        t.send("\x03")  # Ctrl-C: 130, quietly
        self.assertEqual(t.exitStatus(), 130)
        self.assertNotIn("Traceback", t.text)
        self.assertNotIn("KeyboardInterrupt", t.text)
        with FramedSocket.connect_to("127.0.0.1", port) as s:
            call(s, {"type": "login", "username": "bob", "password": "password1"})
            history = call(s, {"type": "history", "room": "dev", "limit": 100})
        texts = [m["text"] for m in history["messages"] if m["from"] == "alice"]
        self.assertEqual(
            texts, ["half typed", "hello", "half typed", "typed while away"]
        )

    @defer.inlineCallbacks
    def test_noColourWithNoColor(self):
        chat = self.server("netlab-chat", "--port", "0")
        yield defer.ensureDeferred(chat.start())
        self.register(chat.port, "alice")
        self.login(chat.port)
        t = self.terminal(
            "chat",
            "--host",
            "127.0.0.1",
            "--port",
            str(chat.port),
            "-r",
            "dev",
            NO_COLOR="1",
        )
        t.wait(r"joined #dev")
        t.send("plain\r")
        t.wait(r"#dev <alice> plain")
        self.assertNotIn("\x1b[36m", t.raw)
        self.assertNotIn("\x1b[1;32m", t.raw)
        t.send("/quit\r")
        self.assertEqual(t.exitStatus(), 0)

    @defer.inlineCallbacks
    def test_passwordPrompts(self):
        authServer = self.server("netlab-auth", "--port", "0")
        yield defer.ensureDeferred(authServer.start())
        where = ("--host", "127.0.0.1", "--port", str(authServer.port))
        t = self.terminal("auth", "register", "-q", *where)
        t.wait(r"Username: $")
        t.send("alice\r")
        t.wait(r"New password: $")
        t.send("short\r")  # too short: asked again, not an exit
        t.wait(r"at least 8 characters; please try again")
        t.wait(r"New password: $", since=t.mark() - 20)
        t.send("password1\r")
        t.wait(r"\(again\): $")
        t.send("password1\r")
        t.wait(r"Registered alice")
        self.assertEqual(t.exitStatus(), 0)
        self.login(authServer.port)

        t = self.terminal("auth", "passwd", "-q")
        t.wait(r"Current password: $")
        t.send("password1\r")
        t.wait(r"New password: $")
        t.send("password2\r")
        t.wait(r"\(again\): $")
        t.send("a typo here\r")  # they differ: asked again
        t.wait(r"the passwords differ; please try again")
        since = t.mark()
        t.wait(r"New password: $", since=since - 20)
        t.send("password2\r")
        t.wait(r"\(again\): $", since=since)
        t.send("password2\r")
        t.wait(r"Password changed")
        self.assertEqual(t.exitStatus(), 0)
        with FramedSocket.connect_to("127.0.0.1", authServer.port) as s:
            reply = call(
                s, {"type": "login", "username": "alice", "password": "password2"}
            )
        self.assertEqual(reply["type"], "session")

    @defer.inlineCallbacks
    def test_promptsWithDefaultsAndCtrlC(self):
        echo = Server(self.workdir / "echo", "netlab-echo", "--port", "0")
        self.addCleanup(echo.cleanup)
        yield defer.ensureDeferred(echo.start())
        t = self.terminal("echo")
        t.wait(r"Host \[localhost\]: $")
        t.send("\r")
        t.wait(r"Port \[9090\]: $")
        t.send("not a port\r")
        t.wait(r"is not a number; please try again")
        t.send(f"{echo.port}\r")
        t.wait(r"echo> $")
        t.send("hello\r")
        t.wait(r"\nhello\n")
        t.send("\x03")
        self.assertEqual(t.exitStatus(), 130)
        self.assertNotIn("Traceback", t.text)
        self.assertNotIn("Connection lost", t.text)

    @defer.inlineCallbacks
    def test_ctrlCAtAPasswordPromptRestoresEcho(self):
        authServer = self.server("netlab-auth", "--port", "0")
        yield defer.ensureDeferred(authServer.start())
        t = self.terminal(
            "auth",
            "login",
            "--host",
            "127.0.0.1",
            "--port",
            str(authServer.port),
            "--user",
            "alice",
        )
        t.wait(r"Password: $")
        t.child.kill(signal.SIGINT)
        self.assertEqual(t.exitStatus(), 130)
        self.assertNotIn("Traceback", t.text)


if os.environ.get("NETLAB_SKIP_PTY"):  # pragma: no cover - escape hatch
    PseudoTerminalTests.skip = "NETLAB_SKIP_PTY is set"  # type: ignore[attr-defined]
