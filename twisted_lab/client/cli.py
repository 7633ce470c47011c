"""
The C{netlab} command: a client for every netlab service.

C{netlab echo|identity|auth|chat [--host H] [--port P] [--tls] [--cafile CA]
[--json] ...}, or C{--server HOST:PORT} (repeated) for the nodes of a
cluster, tried in turn (L{twisted_lab.client.cluster}).  Results go to
standard output, what happens on the connection to standard error
(C{--quiet} silences it); with C{--json} both are one JSON object per line
on standard output.  Expected failures are one line on standard error and
an exit status from L{EXIT_CODES}.
"""

from __future__ import annotations

import argparse
import base64
import getpass
import json
import os
import signal
import socket
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn, TextIO

from twisted.internet import defer, error

from twisted_lab import __version__
from twisted_lab.client.chat import sanitize
from twisted_lab.client.cluster import (
    Address,
    Failover,
    NoServerReachable,
    failureReason,
    parseServers,
    showAddress,
    withPorts,
)
from twisted_lab.client.frames import (
    ClosedByServer,
    ClosedWithoutAnswer,
    FrameClient,
    MessageClient,
    ServerError,
    ServerSpeaksTLS,
    TLSHandshakeLost,
    connect,
)
from twisted_lab.client.sessions import (
    Cluster,
    Endpoint,
    Servers,
    Session,
    SessionChoiceError,
    SessionStore,
    chooseSession,
    fits,
    normaliseHost,
)

DEFAULT_HOST = "localhost"
DEFAULT_PORTS = {"echo": 9090, "identity": 9091, "auth": 9092, "chat": 9093}

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_CONNECT = 3
EXIT_LOST = 4
EXIT_SESSION = 5
EXIT_INTERRUPTED = 130

#: The exit statuses scripts can rely on (documented in README and guide).
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_REFUSED: "the server refused a request (an error reply)",
    EXIT_USAGE: "bad arguments or missing input",
    EXIT_CONNECT: "could not connect (refused, unknown host, timeout, TLS)",
    EXIT_LOST: "the connection was lost or closed by the server before the end",
    EXIT_SESSION: "not logged in, or the saved session is no longer valid",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
}

#: Error codes that mean "log in again".
SESSION_CODES = frozenset(
    {"invalid_token", "not_authenticated", "session_revoked", "session_expired"}
)


class Abort(Exception):
    """
    A failure to report on one line and exit with C{code}, no traceback.
    """

    def __init__(self, message: str, code: int = EXIT_REFUSED, **fields: Any) -> None:
        super().__init__(message)
        self.code = code
        self.fields = fields


# -- output -------------------------------------------------------------------


class Output:
    """
    Where everything the client says goes: for people, results on standard
    output and events (C{* connected ...}) on standard error; with C{json},
    both as one JSON object per line on standard output.
    """

    def __init__(
        self,
        json: bool = False,
        quiet: bool = False,
        stdout: TextIO | None = None,
        stderr: TextIO | None = None,
    ) -> None:
        self.json = json
        self.quiet = quiet
        self._stdout = stdout
        self._stderr = stderr

    @property
    def stdout(self) -> TextIO:
        return self._stdout if self._stdout is not None else sys.stdout

    @property
    def stderr(self) -> TextIO:
        return self._stderr if self._stderr is not None else sys.stderr

    def emit(self, record: dict[str, Any]) -> None:
        """
        One JSON line (only with C{--json}).
        """
        if self.json:
            # ASCII: no control or bidi character from the network reaches a
            # terminal through --json (jq -r still decodes it).
            self.stdout.write(json.dumps(record, ensure_ascii=True) + "\n")
            self.stdout.flush()

    def report(self, line: str) -> None:
        """
        A connection event for people (standard error, unless quiet).
        """
        if not self.quiet and not self.json:
            print(f"* {line}", file=self.stderr, flush=True)

    def event(self, record: dict[str, Any]) -> None:
        """
        A connection event for machines (unless quiet).
        """
        if not self.quiet:
            self.emit(record)

    def result(self, text: str, record: dict[str, Any]) -> None:
        """
        A result: C{text} for people, C{record} for machines.
        """
        if self.json:
            self.emit(record)
        else:
            print(text, file=self.stdout, flush=True)

    def note(self, text: str) -> None:
        """
        A remark for people only, on standard error.
        """
        if not self.json:
            print(text, file=self.stderr, flush=True)

    def failed(self, abort: Abort) -> None:
        """
        The one-line error (and its JSON record).
        """
        self.emit(
            {
                "event": "error",
                "message": str(abort),
                "exit": abort.code,
                **abort.fields,
            }
        )
        # Server-sent text is in it: no control character reaches the
        # terminal, and the error stays one line.
        print(f"netlab: {sanitize(str(abort))}", file=self.stderr, flush=True)

    def client(self, kind: type[FrameClient], **kwargs: Any) -> Any:
        """
        A client of C{kind} that reports through this output.
        """
        return kind(report=self.report, onEvent=self.event, **kwargs)


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
    C{text} as a host name or address that resolves (C{[::1]} is C{::1}),
    or L{ValueError}.
    """
    host = normaliseHost(text)
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
    out: TextIO | None = None,
) -> Any:
    """
    Ask C{question} until the answer validates; Enter accepts C{default}
    (shown in brackets when there is one).  End of input (Ctrl-D) stops
    with L{Abort}; Ctrl-C propagates (exit 130).
    """
    stream = out if out is not None else sys.stderr
    prompt = f"{question} [{default}]: " if default else f"{question}: "
    while True:
        try:
            answer = ask(prompt)
        except EOFError:
            raise Abort("no answer; giving up", code=EXIT_USAGE) from None
        try:
            return validate(answer if answer.strip() else default)
        except ValueError as e:
            print(f"  {e}; please try again.", file=stream)


def resolveTarget(
    host: str | None,
    port: int | None,
    defaultPort: int,
    interactive: bool,
    ask: Callable[[str], str] = input,
    out: TextIO | None = None,
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
    return normaliseHost(host), port


# -- passwords ----------------------------------------------------------------


def passwordProblem(password: str) -> str | None:
    """
    Why the server would refuse C{password} as C{weak_password}, or None.
    """
    if len(password) < 8:
        return "a password needs at least 8 characters"
    if len(password.encode("utf-8", "surrogatepass")) > 1024:
        return "a password may have at most 1024 bytes"
    return None


def readSecret(
    prompt: str,
    fromStdin: bool,
    interactive: bool,
    ask: Callable[[str], str] = getpass.getpass,
) -> str:
    """
    A password: one line of standard input (C{--password-stdin}), or asked
    without echo on a terminal.
    """
    if fromStdin:
        line = sys.stdin.readline()
        if not line:
            raise Abort("expected a password on standard input", code=EXIT_USAGE)
        return line.rstrip("\n")
    if not interactive:
        raise Abort(
            "no terminal to ask for a password: use --password-stdin", code=EXIT_USAGE
        )
    try:
        return ask(prompt)
    except EOFError:
        raise Abort("no password given", code=EXIT_USAGE) from None


def askNewPassword(
    ask: Callable[[str], str] = getpass.getpass, out: TextIO | None = None
) -> str:
    """
    A new password, asked twice on the terminal until both agree and it
    meets the server's rules.
    """
    stream = out if out is not None else sys.stderr
    while True:
        first = readSecret("New password: ", False, True, ask)
        problem = passwordProblem(first)
        if problem is not None:
            print(f"  {problem}; please try again.", file=stream)
            continue
        if readSecret("New password (again): ", False, True, ask) != first:
            print("  the passwords differ; please try again.", file=stream)
            continue
        return first


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


class StdinReader:
    """
    Standard input (a pipe or a file), line by line to its end, read by one
    daemon thread that stays at most C{ahead} lines ahead of the reactor.
    """

    def __init__(self, reactor: Any, ahead: int = 256, fd: int | None = None) -> None:
        self.reactor = reactor
        self.fd = sys.stdin.fileno() if fd is None else fd
        self.lines: defer.DeferredQueue[bytes | None] = defer.DeferredQueue()
        self.slots = threading.Semaphore(ahead)
        threading.Thread(target=self._read, name="netlab-stdin", daemon=True).start()

    def _split(self) -> Iterator[bytes]:
        """
        The lines of the descriptor, read with C{os.read}: no buffered
        reader's lock is held while waiting, so an interpreter that exits
        (Ctrl-C) with this thread blocked does not abort.
        """
        pending = bytearray()
        while True:
            end = pending.find(b"\n")
            if end >= 0:
                line = bytes(pending[:end])
                del pending[: end + 1]
                yield line
                continue
            chunk = os.read(self.fd, 65536)
            if not chunk:
                if pending:
                    yield bytes(pending)
                return
            pending += chunk

    def _read(self) -> None:
        for line in self._split():
            self.slots.acquire()
            self.reactor.callFromThread(self.lines.put, line)
        self.reactor.callFromThread(self.lines.put, None)

    async def next(self) -> bytes | None:
        """
        The next line without its newline, or None at the end.
        """
        line = await self.lines.get()
        self.slots.release()
        return line


# -- connecting and failing ---------------------------------------------------


def targetsOf(options: argparse.Namespace) -> list[Address]:
    """
    The servers this command may connect to, in order: C{--server}'s, or
    the one C{--host} and C{--port} name.
    """
    targets = getattr(options, "targets", None)
    if targets:
        return list(targets)
    return [(options.host, options.port)]


def endpointOf(options: argparse.Namespace) -> Servers:
    """
    The server (or the cluster of servers) C{options} name, as sessions
    are keyed.
    """
    return Cluster.of(targetsOf(options), options.tls, options.cafile)


def failoverFor(
    reactor: Any,
    options: argparse.Namespace,
    onFailure: Callable[[Address, BaseException, Address], None] | None = None,
) -> Failover:
    """
    The servers of C{options}, tried in turn (shuffled with C{--shuffle}),
    each with the same TLS, timeout and C{--bind} settings.
    """

    async def connectTo(address: Address, client: FrameClient) -> FrameClient:
        host, port = address
        return await connect(
            reactor,
            host,
            port,
            client,
            options.timeout,
            options.bind,
            tls=options.tls,
            cafile=options.cafile,
        )

    return Failover(
        targetsOf(options),
        connectTo,
        shuffle=getattr(options, "shuffle", False),
        onFailure=onFailure,
    )


async def connectOrAbort(
    reactor: Any, options: argparse.Namespace, client: FrameClient
) -> FrameClient:
    """
    L{connect} to the server in C{options} (the first of its servers that
    answers), turning the usual failures into a one-line L{Abort}.
    """
    out: Output | None = getattr(options, "out", None)

    def fellThrough(address: Address, e: BaseException, following: Address) -> None:
        if out is not None:
            out.report(
                f"cannot connect to {showAddress(*address)}: {failureReason(e)}; "
                f"trying {showAddress(*following)}"
            )

    failover = failoverFor(reactor, options, fellThrough)
    try:
        await failover.connect(client)
    except Exception as e:  # noqa: BLE001 - mapped below, or re-raised
        options.host, options.port = failover.trying
        abort = failureMessage(e, options)
        if abort is None:
            raise
        raise abort from None
    options.host, options.port = failover.trying
    return client


def cannotConnect(host: str, port: int, e: Exception) -> Abort:
    """
    The one-line message for a connection that could not be made.
    """
    if isinstance(e, NoServerReachable):
        return Abort(f"cannot connect to any server: {e.describe()}", code=EXIT_CONNECT)
    return Abort(
        f"cannot connect to {showAddress(host, port)}: {failureReason(e)}",
        code=EXIT_CONNECT,
    )


def tlsReason(e: Exception) -> str:
    """
    A readable reason for an OpenSSL error, instead of its raw tuples.
    """
    reasons: list[str] = []
    for arg in e.args:
        if isinstance(arg, list):
            for item in arg:
                if isinstance(item, tuple) and item:
                    reasons.append(str(item[-1]))
        elif arg:
            reasons.append(str(arg))
    text = "; ".join(r for r in reasons if r) or "handshake failed"
    hints = {
        "certificate verify failed": " (the server's certificate is not "
        "trusted: give its CA with --cafile)",
        "wrong version number": " (is the server using TLS?)",
        "packet length too long": " (is the server using TLS?)",
        "record layer failure": " (is the server using TLS?)",
    }
    for needle, hint in hints.items():
        if needle in text:
            return text + hint
    return text


def failureMessage(e: BaseException, options: argparse.Namespace) -> Abort | None:
    """
    The one-line L{Abort} for the failures every command can meet, or None
    for a bug (which should show its traceback).
    """
    from OpenSSL.SSL import Error as SSLError

    try:
        from service_identity import VerificationError
    except ImportError:  # pragma: no cover - installed with twisted[tls]
        VerificationError = ()  # type: ignore[assignment,misc]  # noqa: N806

    host, port = getattr(options, "host", "?"), getattr(options, "port", 0)
    if isinstance(e, Abort):
        return e
    if isinstance(e, ServerError):
        if e.code in SESSION_CODES:
            return Abort(
                f"{e.code}: the session is no longer valid: log in again",
                code=EXIT_SESSION,
                error=e.code,
            )
        if e.code == "rate_limited":
            return Abort(
                f"rate limited: try again in {e.reply.get('retry_after', '?')} s",
                retry_after=e.reply.get("retry_after"),
                error=e.code,
            )
        return Abort(f"{e.code}: {e.message}", error=e.code)
    if isinstance(e, ServerSpeaksTLS):
        return Abort(str(e), code=EXIT_CONNECT)
    if isinstance(e, TLSHandshakeLost):
        return Abort(f"TLS failed: {e}", code=EXIT_CONNECT)
    if isinstance(e, ClosedByServer):
        return Abort(
            f"the server closed the connection: {e.code}: {e.message}",
            code=EXIT_LOST,
            error=e.code,
        )
    if isinstance(e, error.DNSLookupError):
        return cannotConnect(host, port, e)
    if isinstance(e, VerificationError):
        return Abort(
            f"TLS failed: the certificate of {host} is not valid for that name",
            code=EXIT_CONNECT,
        )
    if isinstance(e, SSLError):
        return Abort(f"TLS failed: {tlsReason(e)}", code=EXIT_CONNECT)
    if isinstance(e, error.ConnectError):
        return cannotConnect(host, port, e)
    if isinstance(e, ClosedWithoutAnswer):
        return Abort(str(e), code=EXIT_LOST)
    if isinstance(e, error.ConnectionDone):
        return Abort("the server closed the connection", code=EXIT_LOST)
    if isinstance(e, error.ConnectionLost):
        reason = _firstLine(str(e))
        return Abort(f"connection lost: {reason}", code=EXIT_LOST)
    if isinstance(e, OSError):  # an unreadable --cafile, for instance
        if e.filename is not None:
            return Abort(
                f"cannot read {e.filename}: {e.strerror or e}", code=EXIT_USAGE
            )
        return Abort(str(e), code=EXIT_USAGE)
    if isinstance(e, defer.CancelledError):
        return Abort("interrupted", code=EXIT_INTERRUPTED)
    return None


def _firstLine(text: str) -> str:
    text = text.strip().splitlines()[0] if text.strip() else ""
    return text.rstrip(".") or "reset"


# -- echo -------------------------------------------------------------------


async def runEcho(reactor: Any, options: argparse.Namespace) -> int:
    """
    The C{netlab echo} command: each MESSAGE, or each line of standard
    input (read to its end, in order), is one frame; each reply is printed.
    """
    out: Output = options.out
    client = out.client(FrameClient)
    await connectOrAbort(reactor, options, client)

    def show(reply: bytes) -> None:
        if out.json:
            try:
                out.emit({"event": "reply", "text": reply.decode("utf-8")})
            except UnicodeDecodeError:
                out.emit({"event": "reply", "base64": base64.b64encode(reply).decode()})
        else:
            sys.stdout.buffer.write(reply + b"\n")
            sys.stdout.buffer.flush()

    try:
        if options.message:
            for message in options.message:
                show(await client.request(message.encode("utf-8", "surrogateescape")))
        elif options.interactive:
            while True:
                line = await readLine(reactor, "echo> ")
                if line is None or line == b"/quit":
                    break
                show(await client.request(line))
        else:
            # A pipe: read to its end, with up to `window` frames in flight
            # (replies come back in order, so they are shown in order).
            reader = StdinReader(reactor)
            pending: deque[defer.Deferred[bytes]] = deque()
            window = 64
            while True:
                line = await reader.next()
                if line is None:
                    break
                client.send(line)
                pending.append(client.receive())
                if len(pending) >= window:
                    show(await pending.popleft())
            while pending:
                show(await pending.popleft())
    finally:
        await client.close()
    return EXIT_OK


# -- identity ---------------------------------------------------------------


async def runIdentity(reactor: Any, options: argparse.Namespace) -> int:
    """
    The C{netlab identity} command: print the greeting; forget and/or name
    as asked; when the server asks for a name, use C{--name} or ask for one
    (again, with the server's reason, while it is refused).
    """
    out: Output = options.out
    client = out.client(MessageClient)
    await connectOrAbort(reactor, options, client)
    try:
        greeting = await _withTimeout(
            reactor,
            client.nextMessage(),
            options.timeout,
            f"no greeting from {client.label} within {options.timeout:g} s "
            "(is it a netlab-identity port? a TLS one needs --tls)",
        )
        known = greeting.get("type") == "welcome"
        if known:
            out.result(
                f"Welcome back, {greeting['name']}! (visit {greeting['visits']})",
                {"event": "greeting", "reply": greeting},
            )
        else:
            out.result(
                "The server does not know you yet.",
                {"event": "greeting", "reply": greeting},
            )
        if options.forget:
            reply = await client.call({"type": "forget"})
            out.result(
                "The server has forgotten you.", {"event": "reply", "reply": reply}
            )
            known = False
        if options.name is not None:
            try:
                welcome = await client.call({"type": "name", "name": options.name})
            except ServerError as e:
                raise Abort(
                    f"name refused: {e.message}", code=EXIT_REFUSED, error=e.code
                ) from None
            showWelcome(out, welcome)
        elif not known and not options.forget:
            showWelcome(out, await askName(reactor, client, options))
    finally:
        await client.close()
    return EXIT_OK


def showWelcome(out: Output, welcome: dict[str, Any]) -> None:
    out.result(
        f"Hello, {welcome['name']}! (visit {welcome['visits']})",
        {"event": "reply", "reply": welcome},
    )


async def _withTimeout(
    reactor: Any, d: defer.Deferred[Any], seconds: float, message: str
) -> Any:
    """
    C{d}'s result, or L{Abort} (exit 3) if it takes longer than C{seconds}.
    """
    timedOut = []

    def onTimeout(result: Any, timeout: float) -> Any:
        timedOut.append(True)
        return result

    d.addTimeout(seconds, reactor, onTimeoutCancel=onTimeout)
    try:
        return await d
    except defer.CancelledError:
        if timedOut:
            raise Abort(message, code=EXIT_CONNECT) from None
        raise


async def askName(
    reactor: Any, client: MessageClient, options: argparse.Namespace
) -> dict[str, Any]:
    """
    Ask for a name until the server accepts one; its C{welcome}.  Without
    a terminal the name is one line of standard input.
    """
    interactive = options.interactive
    while True:
        line = await readLine(reactor, "What is your name? " if interactive else None)
        if line is None:
            raise Abort(
                "the server asked for a name and none was given", code=EXIT_USAGE
            )
        name = line.decode("utf-8", "replace")
        try:
            return await client.call({"type": "name", "name": name})
        except ServerError as e:
            if e.code != "invalid_name" or not interactive:
                raise Abort(
                    f"name refused: {e.message}", code=EXIT_REFUSED, error=e.code
                ) from None
            print(f"  {e.message}; please try again.", file=sys.stderr)


# -- auth -------------------------------------------------------------------


def _nonEmpty(text: str) -> str:
    if not text.strip():
        raise ValueError("it cannot be empty")
    return text.strip()


def prepareAuth(options: argparse.Namespace) -> None:
    """
    Collect what C{netlab auth} needs before connecting: the server (from
    the saved session for whoami, logout and passwd), username and
    passwords.
    """
    action = options.action
    interactive = options.interactive
    if action in ("whoami", "logout", "passwd"):
        useSavedSession(options, takeServer=True)
    else:
        resolveOptionsTarget(options)
    if action in ("register", "login") and not options.user:
        if not interactive:
            raise Abort("give the username with --user", code=EXIT_USAGE)
        options.user = askUntilValid("Username", "", _nonEmpty)
    if action == "login":
        options.password = readSecret("Password: ", options.password_stdin, interactive)
    elif action == "register":
        if options.password_stdin:
            options.password = readSecret("", True, interactive)
        else:
            if not interactive:
                raise Abort(
                    "no terminal to ask for a password: use --password-stdin",
                    code=EXIT_USAGE,
                )
            options.password = askNewPassword()
    elif action == "passwd":
        options.old = readSecret(
            "Current password: ", options.password_stdin, interactive
        )
        if options.password_stdin:
            options.new = readSecret("", True, interactive)
        else:
            options.new = askNewPassword()


def resolveOptionsTarget(options: argparse.Namespace) -> None:
    """
    Fill in C{options.targets}, the servers to try in order, and
    C{options.host} and C{options.port}, the first of them: C{--server}'s
    addresses (C{--port}, else the service's default, for those without a
    port), else C{--host} and C{--port} (asked on a terminal).
    """
    servers = getattr(options, "servers", None)
    if servers:
        port = (
            options.port if options.port is not None else DEFAULT_PORTS[options.command]
        )
        options.targets = withPorts(servers, port)
        options.host, options.port = options.targets[0]
    else:
        options.host, options.port = resolveTarget(
            options.host,
            options.port,
            DEFAULT_PORTS[options.command],
            getattr(options, "terminal", options.interactive),
        )
        options.targets = [(options.host, options.port)]
    options.tls = options.tls or options.cafile is not None


def useSavedSession(options: argparse.Namespace, takeServer: bool) -> Session | None:
    """
    The saved session for the server (or servers) in C{options}.  With
    C{takeServer} and no C{--server}, the servers come from the session
    (the only one, or the one that fits what was given: its servers that
    fit C{--host} and C{--port}); otherwise the servers are resolved first
    and only a session saved for all of them is used (one for exactly
    them, else one for a cluster that holds them all).  Either way the
    session's TLS settings are adopted, so its token goes to no server
    outside its own set, and never in clear text if it was issued over TLS.
    """
    store = SessionStore()
    if takeServer and not getattr(options, "servers", None):
        try:
            session = chooseSession(
                store.all(), options.host, options.port, options.tls, options.cafile
            )
        except SessionChoiceError as e:
            raise Abort(
                str(e), code=EXIT_USAGE if e.ambiguous else EXIT_SESSION
            ) from None
        targets = [
            m.address
            for m in session.endpoint.members
            if fits(m, options.host, options.port)
        ]
    else:
        resolveOptionsTarget(options)
        targets = targetsOf(options)
        try:
            session = chooseSession(
                store.all(), None, None, options.tls, options.cafile, servers=targets
            )
        except SessionChoiceError as e:
            if takeServer:
                raise Abort(
                    str(e), code=EXIT_USAGE if e.ambiguous else EXIT_SESSION
                ) from None
            options.session = None
            return None
    endpoint = session.endpoint
    if endpoint.tls and endpoint.cafile is not None:
        first = endpoint.members[0]
        current = Endpoint.of(first.host, first.port, True, endpoint.cafile)
        if current.ca != endpoint.ca:
            raise Abort(
                f"the CA file {endpoint.cafile} changed since the login to "
                f"{endpoint.describe()}: log in again",
                code=EXIT_SESSION,
            )
    options.targets = targets
    options.host, options.port = targets[0]
    options.tls, options.cafile = endpoint.tls, endpoint.cafile
    options.session = session
    return session


def loginHint(options: argparse.Namespace) -> str:
    """
    The C{netlab auth login} options naming the servers of C{options}.
    """
    targets = targetsOf(options)
    if len(targets) == 1:
        return f"--host {options.host} --port {options.port}"
    return " ".join(f"--server {showAddress(*address)}" for address in targets)


def redact(reply: dict[str, Any]) -> dict[str, Any]:
    """
    C{reply} without its token: tokens go to the sessions file only.
    """
    return {k: v for k, v in reply.items() if k != "token"}


async def callAskingAgain(
    reactor: Any,
    client: MessageClient,
    options: argparse.Namespace,
    request: dict[str, Any],
    field: str,
) -> dict[str, Any]:
    """
    C{client.call(request)}; on a terminal, a C{weak_password} reply asks
    for a new C{field} password again instead of giving up.
    """
    while True:
        try:
            return await client.call(request)
        except ServerError as e:
            if (
                e.code != "weak_password"
                or not options.interactive
                or options.password_stdin
            ):
                raise
            print(f"  {e.message}; please choose another.", file=sys.stderr)
            request = dict(request)
            request[field] = await threadsCall(reactor, askNewPassword)


def threadsCall(reactor: Any, f: Callable[[], Any]) -> defer.Deferred[Any]:
    from twisted.internet.threads import deferToThreadPool

    return deferToThreadPool(reactor, reactor.getThreadPool(), f)


async def runAuth(reactor: Any, options: argparse.Namespace) -> int:
    """
    The C{netlab auth} command.
    """
    out: Output = options.out
    client = out.client(MessageClient)
    action = options.action
    store = SessionStore()
    # A login through several servers is saved for all of them (a cluster).
    endpoint = endpointOf(options)
    await connectOrAbort(reactor, options, client)
    try:
        if action == "register":
            reply = await callAskingAgain(
                reactor,
                client,
                options,
                {
                    "type": "register",
                    "username": options.user,
                    "password": options.password,
                },
                "password",
            )
            out.result(
                f"Registered {reply['username']}.", {"event": "reply", "reply": reply}
            )
        elif action == "login":
            reply = await client.call(
                {
                    "type": "login",
                    "username": options.user,
                    "password": options.password,
                }
            )
            path = store.save(
                Session(
                    endpoint, reply["username"], reply["token"], reply["expires_at"]
                )
            )
            out.result(
                f"Logged in as {reply['username']} on {endpoint.describe()} "
                f"(session saved in {path}).",
                {"event": "reply", "reply": redact(reply), "saved": str(path)},
            )
        else:
            session: Session = options.session
            try:
                await client.call({"type": "resume", "token": session.token})
            except ServerError as e:
                if e.code == "invalid_token":
                    # Only ever sent to the server that issued it: this
                    # server's refusal is the issuer's.
                    store.forget(session.endpoint, session.token)
                raise
            if action == "whoami":
                reply = await client.call({"type": "whoami"})
                out.result(reply["username"], {"event": "reply", "reply": reply})
            elif action == "logout":
                reply = await client.call({"type": "logout"})
                store.forget(session.endpoint, session.token)
                out.result("Logged out.", {"event": "reply", "reply": reply})
            elif action == "passwd":
                reply = await callAskingAgain(
                    reactor,
                    client,
                    options,
                    {"type": "change_password", "old": options.old, "new": options.new},
                    "new",
                )
                out.result(
                    "Password changed; your other sessions were logged out.",
                    {"event": "reply", "reply": reply},
                )
    finally:
        await client.close()
    return EXIT_OK


# -- chat -------------------------------------------------------------------


def prepareChat(options: argparse.Namespace) -> None:
    """
    Use the session saved for this chat server (C{netlab auth login
    --port 9093}); without one, ask for a username and password on a
    terminal.
    """
    session = useSavedSession(options, takeServer=False)
    options.token = session.token if session else None
    if (options.say is not None or options.tail is not None) and not options.room:
        raise Abort("--say and --tail need --room", code=EXIT_USAGE)
    if options.token is None:
        if not options.interactive:
            raise Abort(
                f"not logged in to {endpointOf(options).describe()}: run 'netlab "
                f"auth login {loginHint(options)}' first",
                code=EXIT_SESSION,
            )
        options.user = askUntilValid("Username", "", _nonEmpty)
        options.password = readSecret("Password: ", False, True)


async def runChat(reactor: Any, options: argparse.Namespace) -> int:
    """
    The C{netlab chat} command.
    """
    from twisted_lab.client.chat import runChatSession

    return await runChatSession(reactor, options)


# -- argument parsing and main ----------------------------------------------


def version() -> str:
    """
    netlab's version: the installed distribution's, else the package's.
    """
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("twisted-lab")
    except PackageNotFoundError:
        return __version__


def buildParser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="netlab",
        description="Client for the netlab services (echo, identity, auth, chat).",
        epilog="exit status: "
        + "; ".join(f"{code} {what}" for code, what in EXIT_CODES.items()),
    )
    parser.add_argument("--version", action="version", version=f"netlab {version()}")
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
            "--server",
            action="append",
            type=_serversArgument,
            metavar="HOST[:PORT]",
            help="a server to connect to, instead of --host; repeat it (or "
            "separate addresses with commas) for the nodes of a cluster: they "
            "are tried in order, the next one when a connection is refused or "
            "times out, and a login through them is saved for them all "
            "(an address without a port takes --port, else "
            f"{DEFAULT_PORTS[service]}; IPv6 with a port as [::1]:PORT)",
        )
        sub.add_argument(
            "--shuffle",
            action="store_true",
            help="try the --server addresses in a random order (spreads many "
            "clients over the nodes) instead of the order given",
        )
        sub.add_argument(
            "--quiet", "-q", action="store_true", help="do not report events"
        )
        sub.add_argument(
            "--json",
            action="store_true",
            help="one JSON object per line on stdout for each event and reply",
        )
        sub.add_argument(
            "--timeout", type=float, default=10.0, help="connect timeout in seconds"
        )
        sub.add_argument(
            "--bind", metavar="ADDRESS", help="local address to connect from"
        )
        sub.add_argument("--tls", action="store_true", help="connect with TLS")
        sub.add_argument(
            "--cafile",
            metavar="CA.pem",
            help="trust this CA certificate (PEM) for TLS (implies --tls)",
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
    echo.set_defaults(run=runEcho, prepare=resolveOptionsTarget)

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
    identity.set_defaults(run=runIdentity, prepare=resolveOptionsTarget)

    auth = commands.add_parser(
        "auth",
        help="register, log in, log out, who am I, change password",
        description="Accounts on netlab-auth (or netlab-chat).  login saves the "
        "session token for that server in $XDG_CONFIG_HOME/netlab/sessions.json "
        "(mode 0600); whoami, logout, passwd and the chat client send it to "
        "that server only, over TLS if it was issued over TLS.",
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
    auth.set_defaults(run=runAuth, prepare=prepareAuth)

    chat = commands.add_parser(
        "chat",
        help="chat on netlab-chat (interactive, or --say / --tail for scripts)",
        description="An interactive chat (type /help), using the session "
        "saved for this server by 'netlab auth login' or asking for username "
        "and password.  Piped standard input: each line is said (or run, if "
        "it is a /command) in order, all of them before the client exits.  "
        "With several --server addresses (the nodes of one cluster), a lost "
        "connection is resumed on the next node in turn, with back-off, and "
        "each room caught up from the last message seen: nothing missed, "
        "nothing shown twice.",
    )
    common(chat, "chat")
    chat.add_argument("--room", "-r", help="the room to join (a-z, 0-9, _ and -)")
    chat.add_argument("--say", metavar="TEXT", help="say TEXT in --room and exit")
    chat.add_argument(
        "--tail", metavar="N", type=int, help="print the last N messages of --room"
    )
    chat.set_defaults(run=runChat, prepare=prepareChat, quiet=True)
    return parser


def _serversArgument(text: str) -> list[tuple[str, int | None]]:
    try:
        return parseServers(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(sanitize(str(e))) from None


def _portArgument(text: str) -> int:
    try:
        return validPort(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def wantsTerminalUI(options: argparse.Namespace) -> bool:
    """
    Whether this run is the interactive chat on a terminal (prompt_toolkit
    on the asyncio reactor).
    """
    return (
        options.command == "chat"
        and options.say is None
        and options.tail is None
        and not options.json
        and sys.stdin.isatty()
        and sys.stdout.isatty()
    )


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """
    Entry point of the C{netlab} command.
    """
    options = parseOptions(argv)
    saved = _saveTerminal()
    try:
        code = _main(options)
    finally:
        _restoreTerminal(saved)
    raise SystemExit(code)


def parseOptions(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """
    The command line, checked (a usage error exits with status 2): the
    C{--server} addresses in one list, C{servers}, in the order given.
    """
    options = buildParser().parse_args(argv)
    options.out = Output(options.json, options.quiet)
    options.interactive = options.terminal = sys.stdin.isatty()
    if options.command == "echo" and options.message:
        options.interactive = False
    options.tls = options.tls or options.cafile is not None
    if options.host is not None:
        options.host = normaliseHost(options.host)
        if not options.host or any(
            ch.isspace() or ord(ch) < 0x20 for ch in options.host
        ):
            buildParser().error(
                f"--host {sanitize(options.host)!r} is not a host name or address"
            )
    options.servers = [a for group in options.server or [] for a in group] or None
    if options.servers and options.host is not None:
        buildParser().error(
            "--host and --server do not go together: give every server with "
            "--server HOST:PORT"
        )
    options.session = None
    return options


def _main(options: argparse.Namespace) -> int:
    out: Output = options.out
    try:
        options.prepare(options)
    except Abort as e:
        out.failed(e)
        return e.code
    except OSError as e:  # an unreadable CA file, a config directory
        abort = failureMessage(e, options)
        assert abort is not None
        out.failed(abort)
        return abort.code
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    options.terminalUI = wantsTerminalUI(options)
    if options.terminalUI:
        import asyncio

        from twisted.internet import asyncioreactor

        asyncioreactor.install(asyncio.new_event_loop())
    from twisted.internet.task import react

    codes: list[int] = []

    async def run(reactor: Any) -> None:
        codes.append(await runCommand(reactor, options))

    try:
        react(lambda reactor: defer.ensureDeferred(run(reactor)))
    except SystemExit as e:
        if not codes:
            return e.code if isinstance(e.code, int) else EXIT_REFUSED
    return codes[0] if codes else EXIT_REFUSED


async def runCommand(reactor: Any, options: argparse.Namespace) -> int:
    """
    Run the command; Ctrl-C cancels it (exit 130, quietly), expected
    failures become one line and their exit status.
    """
    out: Output = options.out
    work = defer.ensureDeferred(options.run(reactor, options))
    interrupted: list[bool] = []

    def onSigint(signum: int, frame: Any) -> None:
        if not interrupted:
            interrupted.append(True)
            reactor.callFromThread(work.cancel)

    reactor.callWhenRunning(signal.signal, signal.SIGINT, onSigint)
    try:
        return await work
    except Exception as e:  # noqa: BLE001 - mapped below, or re-raised
        if interrupted:
            return EXIT_INTERRUPTED
        abort = failureMessage(e, options)
        if abort is None:
            raise
        out.failed(abort)
        return abort.code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _saveTerminal() -> Any:
    """
    The terminal's settings, to restore at exit whatever a prompt left.
    """
    if not sys.stdin.isatty():
        return None
    try:
        import termios

        return termios.tcgetattr(sys.stdin.fileno())
    except (ImportError, OSError):
        return None


def _restoreTerminal(saved: Any) -> None:
    if saved is None:
        return
    import termios

    try:
        termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, saved)
    except OSError:
        pass
