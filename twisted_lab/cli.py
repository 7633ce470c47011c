"""
The C{netlab} command: a client for every netlab service.

C{netlab echo [--host H] [--port P] [MESSAGE ...]} sends each message as one
frame and prints each reply on standard output; what happens on the
connection (connected, sent, received, disconnected) is reported on
standard error unless C{--quiet}.  When host or port are not given and
standard input is a terminal, it asks for them, offering the defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

from OpenSSL.SSL import Error as SSLError
from twisted.internet import defer, error
from twisted.internet.task import react

from twisted_lab import __version__
from twisted_lab.client import FrameClient, MessageClient, ServerError, connect

DEFAULT_HOST = "localhost"
DEFAULT_PORTS = {"echo": 9090, "identity": 9091, "auth": 9092, "chat": 9093}


class Abort(Exception):
    """
    A failure to report on one line and exit with C{code}, no traceback.
    """

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


# -- asking for what was not given ------------------------------------------


def validPort(text: str) -> int:
    """
    C{text} as a TCP port number, or L{ValueError} saying why not.
    """
    try:
        port = int(text.strip())
    except ValueError:
        raise ValueError(f"{text.strip()!r} is not a number") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"{port} is not between 1 and 65535")
    return port


def validHost(text: str) -> str:
    """
    C{text} as a host name or address that resolves, or L{ValueError}.
    """
    host = text.strip()
    if not host:
        raise ValueError("the host name is empty")
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise ValueError(f"cannot resolve {host!r}: {e}") from None
    return host


def askUntilValid(
    question: str,
    default: str,
    validate: Callable[[str], Any],
    ask: Callable[[str], str] = input,
    out: TextIO = sys.stderr,
) -> Any:
    """
    Ask C{question} until the answer validates; Enter accepts C{default}.
    End of input (Ctrl-D) or Ctrl-C stops with L{Abort}.
    """
    while True:
        try:
            answer = ask(f"{question} [{default}]: ")
        except (EOFError, KeyboardInterrupt):
            raise Abort("no answer; giving up", code=2) from None
        try:
            return validate(answer if answer.strip() else default)
        except ValueError as e:
            print(f"  {e}; please try again.", file=out)


def resolveTarget(
    host: str | None,
    port: int | None,
    defaultPort: int,
    interactive: bool,
    ask: Callable[[str], str] = input,
    out: TextIO = sys.stderr,
) -> tuple[str, int]:
    """
    Host and port to use: as given, else asked for (on a terminal), else
    the defaults.
    """
    if host is None:
        host = (
            askUntilValid("Host", DEFAULT_HOST, validHost, ask, out)
            if interactive
            else DEFAULT_HOST
        )
    if port is None:
        port = (
            askUntilValid("Port", str(defaultPort), validPort, ask, out)
            if interactive
            else defaultPort
        )
    return host, port


# -- reading standard input without blocking the reactor ---------------------


def readLine(reactor: Any, prompt: str | None) -> defer.Deferred[bytes | None]:
    """
    One line of standard input, without its newline, or L{None} at end of
    input.  With a C{prompt}, read with L{input} (line editing on a
    terminal).  The read runs in a daemon thread: a person who never
    answers must not keep the process alive after the connection is gone.
    """
    d: defer.Deferred[bytes | None] = defer.Deferred()

    def work() -> None:
        line: bytes | None
        try:
            if prompt is not None:
                line = input(prompt).encode("utf-8", "surrogateescape")
            else:
                raw = sys.stdin.buffer.readline()
                line = raw[:-1] if raw.endswith(b"\n") else raw
                if not raw:
                    line = None
        except (EOFError, KeyboardInterrupt):
            line = None
        reactor.callFromThread(d.callback, line)

    threading.Thread(target=work, name="netlab-stdin", daemon=True).start()
    return d


# -- the reporter -------------------------------------------------------------


def reporter(quiet: bool, stream: TextIO = sys.stderr) -> Callable[[str], None]:
    """
    Where connection events go: one line each on standard error.
    """

    def report(line: str) -> None:
        if not quiet:
            print(f"* {line}", file=stream, flush=True)

    return report


async def connectOrAbort(
    reactor: Any, options: argparse.Namespace, client: FrameClient
) -> FrameClient:
    """
    L{connect} to the host and port in C{options}, turning the usual
    failures into a one-line L{Abort}.
    """
    host, port = options.host, options.port
    try:
        return await connect(
            reactor,
            host,
            port,
            client,
            options.timeout,
            options.bind,
            tls=getattr(options, "tls", False),
            cafile=getattr(options, "cafile", None),
        )
    except (error.ConnectError, OSError) as e:  # OSError: an unreadable --cafile
        raise cannotConnect(host, port, e) from None


def cannotConnect(host: str, port: int, e: Exception) -> Abort:
    """
    The one-line message for a connection that could not be made.
    """
    if isinstance(e, error.ConnectionRefusedError):
        why = "connection refused (is the server running?)"
    elif isinstance(e, error.DNSLookupError):
        why = "unknown host"
    elif isinstance(e, error.TimeoutError):
        why = "timed out"
    else:
        why = str(e)
    return Abort(f"cannot connect to {host}:{port}: {why}")


def writeReply(payload: bytes, out: Any = None) -> None:
    """
    Print one reply on standard output, byte for byte, then a newline.
    """
    stream = out if out is not None else sys.stdout.buffer
    stream.write(payload + b"\n")
    stream.flush()


# -- echo -------------------------------------------------------------------


async def runEcho(reactor: Any, options: argparse.Namespace) -> int:
    """
    The C{netlab echo} command.
    """
    client = FrameClient(reporter(options.quiet))
    await connectOrAbort(reactor, options, client)
    try:
        if options.message:
            for message in options.message:
                payload = message.encode("utf-8", "surrogateescape")
                writeReply(await client.request(payload))
        else:
            prompt = "echo> " if options.interactive else None
            while True:
                line = await readLine(reactor, prompt)
                if line is None or (options.interactive and line == b"/quit"):
                    break
                writeReply(await client.request(line))
    finally:
        client.transport.loseConnection()
    await client.close()
    return 0


# -- identity ---------------------------------------------------------------


async def runIdentity(reactor: Any, options: argparse.Namespace) -> int:
    """
    The C{netlab identity} command: print the greeting; forget and/or name
    as asked; when the server asks for a name, use C{--name} or ask for one
    (again, with the server's reason, while it is refused).
    """
    client = MessageClient(report=reporter(options.quiet))
    await connectOrAbort(reactor, options, client)
    try:
        greeting = await client.nextMessage()
        known = greeting.get("type") == "welcome"
        if known:
            print(f"Welcome back, {greeting['name']}! (visit {greeting['visits']})")
        else:
            print("The server does not know you yet.")
        if options.forget:
            await client.call({"type": "forget"})
            print("The server has forgotten you.")
            known = False
        if options.name is not None:
            try:
                welcome = await client.call({"type": "name", "name": options.name})
            except ServerError as e:
                raise Abort(f"name refused: {e.message}") from None
            print(f"Hello, {welcome['name']}! (visit {welcome['visits']})")
        elif not known and not options.forget:
            welcome = await askName(reactor, client, options.interactive)
            print(f"Hello, {welcome['name']}! (visit {welcome['visits']})")
    finally:
        client.transport.loseConnection()
    await client.close()
    return 0


async def askName(reactor: Any, client: MessageClient, interactive: bool) -> dict:
    """
    Ask for a name until the server accepts one; its C{welcome}.  Without
    a terminal the name is one line of standard input.
    """
    while True:
        line = await readLine(reactor, "What is your name? " if interactive else None)
        if line is None:
            raise Abort("the server asked for a name and none was given", code=2)
        name = line.decode("utf-8", "replace")
        try:
            return await client.call({"type": "name", "name": name})
        except ServerError as e:
            if e.code != "invalid_name" or not interactive:
                raise Abort(f"name refused: {e.message}") from None
            print(f"  {e.message}; please try again.", file=sys.stderr)


# -- auth -------------------------------------------------------------------


def sessionPath() -> Path:
    """
    Where the session token is kept, like a cookie:
    C{$XDG_CONFIG_HOME/netlab/session.json} (C{~/.config} by default).
    """
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(
        os.path.expanduser("~"), ".config"
    )
    return Path(base) / "netlab" / "session.json"


def saveSession(session: dict[str, Any]) -> Path:
    """
    Save the session readable by its owner only (mode 0600).
    """
    path = sessionPath()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(session, f)
    os.replace(temporary, path)
    return path


def loadSession() -> dict[str, Any] | None:
    """
    The saved session, or None.
    """
    try:
        with sessionPath().open(encoding="utf-8") as f:
            session = json.load(f)
    except (OSError, ValueError):
        return None
    return session if isinstance(session, dict) and "token" in session else None


def forgetSession() -> None:
    with contextlib.suppress(FileNotFoundError):
        sessionPath().unlink()


def readSecret(prompt: str, fromStdin: bool, interactive: bool) -> str:
    """
    A password: one line of standard input (C{--password-stdin}), or asked
    without echo on a terminal.  Runs before the reactor starts.
    """
    if fromStdin:
        line = sys.stdin.readline()
        if not line:
            raise Abort("expected a password on standard input", code=2)
        return line.rstrip("\n")
    if not interactive:
        raise Abort("no terminal to ask for a password: use --password-stdin", code=2)
    try:
        return getpass.getpass(prompt)
    except (EOFError, KeyboardInterrupt):
        raise Abort("no password given", code=2) from None


def prepareAuth(options: argparse.Namespace) -> None:
    """
    Collect what C{netlab auth} needs from the person before connecting.
    """
    action = options.action
    interactive = options.interactive
    if action in ("register", "login") and not options.user:
        if not interactive:
            raise Abort("give the username with --user", code=2)
        options.user = askUntilValid("Username", "", _nonEmpty)
    if action in ("register", "login"):
        options.password = readSecret("Password: ", options.password_stdin, interactive)
        if action == "register" and interactive and not options.password_stdin:
            again = readSecret("Password (again): ", False, interactive)
            if again != options.password:
                raise Abort("the passwords differ", code=2)
    if action == "passwd":
        options.old = readSecret(
            "Current password: ", options.password_stdin, interactive
        )
        options.new = readSecret("New password: ", options.password_stdin, interactive)


def _nonEmpty(text: str) -> str:
    if not text.strip():
        raise ValueError("it cannot be empty")
    return text.strip()


def failureMessage(e: Exception, options: argparse.Namespace) -> Abort | None:
    """
    The one-line L{Abort} for the failures every command can meet, or None
    for a bug (which should show its traceback).
    """
    if isinstance(e, Abort):
        return e
    if isinstance(e, ServerError):
        if e.code == "invalid_token":  # the saved session was refused
            forgetSession()
            return Abort("the saved session has expired: log in again")
        if e.code == "rate_limited":
            return Abort(
                f"rate limited: try again in {e.reply.get('retry_after', '?')} s"
            )
        return Abort(f"{e.code}: {e.message}")
    if isinstance(e, (error.ConnectionDone, error.ConnectionLost)):
        return Abort(f"connection lost: {e}")
    if isinstance(e, SSLError):
        return Abort(f"TLS failed: {e}")
    if isinstance(e, error.ConnectError):
        return cannotConnect(options.host, options.port, e)
    return None


async def runAuth(reactor: Any, options: argparse.Namespace) -> int:
    """
    The C{netlab auth} command.
    """
    client = MessageClient(report=reporter(options.quiet))
    action = options.action
    saved = loadSession()
    if action in ("whoami", "logout", "passwd") and saved is None:
        raise Abort("not logged in: run 'netlab auth login' first")
    await connectOrAbort(reactor, options, client)
    try:
        if action == "register":
            reply = await client.call(
                {
                    "type": "register",
                    "username": options.user,
                    "password": options.password,
                }
            )
            print(f"Registered {reply['username']}.")
        elif action == "login":
            reply = await client.call(
                {
                    "type": "login",
                    "username": options.user,
                    "password": options.password,
                }
            )
            path = saveSession(
                {
                    "host": options.host,
                    "port": options.port,
                    "username": reply["username"],
                    "token": reply["token"],
                    "expires_at": reply["expires_at"],
                }
            )
            print(f"Logged in as {reply['username']} (session saved in {path}).")
        else:
            assert saved is not None
            await client.call({"type": "resume", "token": saved["token"]})
            if action == "whoami":
                reply = await client.call({"type": "whoami"})
                print(reply["username"])
            elif action == "logout":
                await client.call({"type": "logout"})
                forgetSession()
                print("Logged out.")
            elif action == "passwd":
                await client.call(
                    {"type": "change_password", "old": options.old, "new": options.new}
                )
                print("Password changed; your other sessions were logged out.")
    finally:
        client.transport.loseConnection()
    await client.close()
    return 0


# -- chat -------------------------------------------------------------------


def prepareChat(options: argparse.Namespace) -> None:
    """
    Use the saved session (from C{netlab auth login}); without one, ask
    for a username and password before connecting.
    """
    saved = loadSession()
    options.token = saved["token"] if saved else None
    if options.token is None:
        if not options.interactive:
            raise Abort("not logged in: run 'netlab auth login' first", code=2)
        options.user = askUntilValid("Username", "", _nonEmpty)
        options.password = readSecret("Password: ", False, True)
    if (options.say is not None or options.tail is not None) and not options.room:
        raise Abort("--say and --tail need --room", code=2)


async def runChat(reactor: Any, options: argparse.Namespace) -> int:
    """
    The C{netlab chat} command.
    """
    from twisted_lab.chatclient import runChatSession

    return await runChatSession(
        reactor, options, options.token, reporter(options.quiet)
    )


# -- argument parsing and main ----------------------------------------------


def buildParser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="netlab",
        description="Client for the netlab services (echo, identity, auth, chat).",
    )
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub: argparse.ArgumentParser, service: str) -> None:
        sub.add_argument(
            "--host", help=f"server host (default {DEFAULT_HOST}, asked on a terminal)"
        )
        sub.add_argument(
            "--port",
            type=_portArgument,
            help=f"server port (default {DEFAULT_PORTS[service]}, asked on a terminal)",
        )
        sub.add_argument(
            "--quiet", "-q", action="store_true", help="do not report events on stderr"
        )
        sub.add_argument(
            "--timeout", type=float, default=10.0, help="connect timeout in seconds"
        )
        sub.add_argument(
            "--bind", metavar="ADDRESS", help="local address to connect from"
        )

    echo = commands.add_parser(
        "echo",
        help="send messages to netlab-echo and print the replies",
        description="Send each MESSAGE (or each line of standard input) as one "
        "frame and print each reply.  On a terminal with no MESSAGE, it is "
        "interactive until end of input or /quit.",
    )
    common(echo, "echo")
    echo.add_argument("message", nargs="*", metavar="MESSAGE")
    echo.set_defaults(run=runEcho)

    identity = commands.add_parser(
        "identity",
        help="be greeted by netlab-identity (and tell it your name)",
        description="Print the server's greeting.  If it does not know you, "
        "give it a name: --name, else asked on a terminal, else one line of "
        "standard input.",
    )
    common(identity, "identity")
    identity.add_argument("--name", help="the name to give (or change to)")
    identity.add_argument(
        "--forget", action="store_true", help="make the server forget you"
    )
    identity.set_defaults(run=runIdentity)

    auth = commands.add_parser(
        "auth",
        help="register, log in, log out, who am I, change password",
        description="Accounts on netlab-auth.  login saves the session token "
        "in $XDG_CONFIG_HOME/netlab/session.json (mode 0600); whoami, logout, "
        "passwd and the chat client use it.",
    )
    auth.add_argument(
        "action", choices=["register", "login", "logout", "whoami", "passwd"]
    )
    common(auth, "auth")
    auth.add_argument("--user", "-u", help="the username (asked if not given)")
    auth.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password from standard input (passwd: old, then new)",
    )
    auth.add_argument("--tls", action="store_true", help="connect with TLS")
    auth.add_argument("--cafile", help="trust this CA certificate (PEM) for TLS")
    auth.set_defaults(run=runAuth, prepare=prepareAuth)

    chat = commands.add_parser(
        "chat",
        help="chat on netlab-chat (interactive, or --say / --tail for scripts)",
        description="An interactive chat (type /help), using the session "
        "saved by 'netlab auth login' or asking for username and password.",
    )
    common(chat, "chat")
    chat.add_argument("--room", "-r", help="the room to join (a-z, 0-9, _ and -)")
    chat.add_argument("--say", metavar="TEXT", help="say TEXT in --room and exit")
    chat.add_argument(
        "--tail", metavar="N", type=int, help="print the last N messages of --room"
    )
    chat.set_defaults(run=runChat, prepare=prepareChat, quiet=True)
    return parser


def _portArgument(text: str) -> int:
    try:
        return validPort(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """
    Entry point of the C{netlab} command.
    """
    options = buildParser().parse_args(argv)
    interactive = sys.stdin.isatty()
    try:
        options.host, options.port = resolveTarget(
            options.host, options.port, DEFAULT_PORTS[options.command], interactive
        )
    except Abort as e:
        print(f"netlab: {e}", file=sys.stderr)
        raise SystemExit(e.code) from None
    options.interactive = interactive and not getattr(options, "message", None)
    if options.command != "echo":
        options.interactive = interactive
    try:
        if getattr(options, "prepare", None) is not None:
            options.prepare(options)
    except Abort as e:
        print(f"netlab: {e}", file=sys.stderr)
        raise SystemExit(e.code) from None

    async def run(reactor: Any) -> None:
        try:
            code = await options.run(reactor, options)
        except Exception as e:  # noqa: BLE001 - mapped below, or re-raised
            abort = failureMessage(e, options)
            if abort is None:
                raise
            print(f"netlab: {abort}", file=sys.stderr)
            code = abort.code
        if code:
            raise SystemExit(code)

    react(lambda reactor: defer.ensureDeferred(run(reactor)))
