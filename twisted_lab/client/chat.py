"""
The C{netlab chat} client: one chat session across connections, what it
shows, and the order in which what the person types reaches the server.

Everything typed (or piped) goes into one queue and is carried out in
order, one line at a time: a line is said once the server has broadcast it
back (the only confirmation a C{say} gets), and a line that met
C{rate_limited} is said again after C{retry_after}; while the client is
reconnecting the queue waits and goes on after the catch-up.  So C{seq 30 |
netlab chat --room dev} says 30 lines, in order, before it exits.

The session survives the connection: if the connection drops, the client
says why at once, reconnects with back-off (1 s, 2 s, 4 s ... 30 s),
resumes the session with its token, joins its rooms again and asks
C{history} with C{after} = the last C{seq} it saw in each, so nothing said
meanwhile is lost.  A message seen twice is shown once, by C{seq}.  With
several servers (the nodes of a cluster, C{--server} repeated), each
reconnection starts with the node after the one that was lost
(L{twisted_lab.client.cluster.Failover}); the token is valid on every node
and the C{seq} of a room is the same everywhere, so the catch-up is the
same.

Each room's messages are shown in C{seq} order, without a hole: a message
that arrives while its room is being caught up, or after a gap (a C{seq}
skipped: a message another node did not deliver here), waits until the
messages before it have been fetched with C{history}.

Text from the network is shown through L{sanitize}: no control character,
escape sequence, bidi override or line break from another user reaches the
terminal, so nobody can forge the look of another line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import unicodedata
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, TextIO

from twisted.internet import defer, error
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver

from twisted_lab.client.frames import (
    ClosedByServer,
    MessageClient,
    ServerError,
)
from twisted_lab.codecs.message import encodeMessage

if TYPE_CHECKING:
    from twisted_lab.client.cli import Abort

log = Logger()

COMMANDS = {
    "/join": "/join ROOM         join ROOM (or switch to it) and talk there",
    "/part": "/part [ROOM]       leave ROOM (default: the current one); /leave too",
    "/msg": "/msg USER TEXT     a private message",
    "/who": "/who [ROOM]        who is in ROOM (default: the current one)",
    "/rooms": "/rooms             rooms and how many are in each",
    "/history": "/history [N] [ROOM] the last N messages (default 20)",
    "/quit": "/quit              leave (Ctrl-D too)",
    "/help": "/help              this list",
}
ALIASES = {"/leave": "/part", "/exit": "/quit", "/names": "/who"}

HELP = (
    "commands (Tab completes commands, rooms and names):\n"
    + "\n".join(f"  {text}" for text in COMMANDS.values())
    + "\n  anything else is said in the current room (shown in the prompt)"
)

#: Styles of the parts of a line, as ANSI SGR parameters.
ANSI = {
    "time": "2",
    "room": "36",
    "me": "1;32",
    "nick": "1;33",
    "private": "1;35",
    "info": "34",
    "error": "1;31",
    "text": "",
}

Segments = list[tuple[str, str]]

#: Error codes after which the session cannot go on: log in again.
SESSION_END_CODES = frozenset({"invalid_token", "session_revoked", "session_expired"})


# -- showing what comes from the network ------------------------------------


def sanitize(text: Any) -> str:
    """
    C{text} safe to print: C0 controls become their visible Control
    Pictures (ESC is C{␛}, a newline C{␊}), DEL C{␡}, and C1 controls,
    format characters (bidi overrides, zero-width), line and paragraph
    separators, surrogates and unassigned code points become C{<U+XXXX>}.
    """
    out = []
    for ch in str(text):
        code = ord(ch)
        if code < 0x20:
            out.append(chr(0x2400 + code))
        elif code == 0x7F:
            out.append("\u2421")
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
            out.append(f"<U+{code:04X}>")
        else:
            out.append(ch)
    return "".join(out)


def stamp(ts: Any, now: datetime | None = None) -> str:
    """
    C{HH:MM} in local time for an RFC 3339 timestamp of today, else
    C{YYYY-MM-DD HH:MM}.
    """
    try:
        when = datetime.fromisoformat(str(ts).replace("Z", "+00:00")).astimezone()
    except ValueError:
        return "--:--"
    today = (now or datetime.now().astimezone()).date()
    if when.date() == today:
        return when.strftime("%H:%M")
    return when.strftime("%Y-%m-%d %H:%M")


def render(
    message: dict[str, Any], me: str = "", now: datetime | None = None
) -> Segments | None:
    """
    How a message from the server is shown, as styled segments, or None
    for nothing.  Every room line names its room.
    """
    kind = message.get("type")
    if kind == "message":
        sender = sanitize(message.get("from", "?"))
        return [
            ("time", f"[{stamp(message.get('ts'), now)}] "),
            ("room", f"#{sanitize(message.get('room', '?'))} "),
            ("me" if sender == me else "nick", f"<{sender}>"),
            ("text", f" {sanitize(message.get('text', ''))}"),
        ]
    if kind == "private":
        return [
            ("time", f"[{stamp(message.get('ts'), now)}] "),
            ("private", f"*{sanitize(message.get('from', '?'))}* (private)"),
            ("text", f" {sanitize(message.get('text', ''))}"),
        ]
    if kind == "presence":
        verb = "joined" if message.get("event") == "join" else "left"
        return [
            (
                "info",
                f"-!- {sanitize(message.get('user', '?'))} {verb} "
                f"#{sanitize(message.get('room', '?'))}",
            )
        ]
    if kind == "error":
        return errorLine(message)
    return None


def errorLine(message: dict[str, Any]) -> Segments:
    text = f"!!! {sanitize(message.get('code'))}: {sanitize(message.get('message'))}"
    if "retry_after" in message:
        text += f" (retry in {sanitize(message['retry_after'])} s)"
    return [("error", text)]


def plain(segments: Segments) -> str:
    return "".join(text for _, text in segments)


def ansi(segments: Segments) -> str:
    parts = []
    for style, text in segments:
        code = ANSI.get(style, "")
        parts.append(f"\x1b[{code}m{text}\x1b[0m" if code else text)
    return "".join(parts)


def wantColour(stream: TextIO) -> bool:
    """
    Colours only on a terminal, and never with C{NO_COLOR} set.
    """
    try:
        return stream.isatty() and not os.environ.get("NO_COLOR")
    except ValueError:
        return False


class View:
    """
    Where the session's lines go: standard output, plain or in colour, or
    one JSON object per line with C{--json}.
    """

    def __init__(
        self,
        json: bool = False,
        colour: bool = False,
        stream: TextIO | None = None,
        asides: TextIO | None = None,
    ) -> None:
        self.json = json
        self.colour = colour
        self._stream = stream
        self._asides = asides

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stdout

    @property
    def asides(self) -> TextIO:
        return self._asides if self._asides is not None else sys.stderr

    def show(
        self, segments: Segments | None, record: dict[str, Any], aside: bool = False
    ) -> None:
        """
        Show a line: C{segments} for people, C{record} with C{--json}.  An
        C{aside} (a remark of the client's own, not what the server said)
        goes to standard error when standard output is for results.
        """
        if self.json:
            self.write(json.dumps(record, ensure_ascii=False))
        elif segments:
            self.write(ansi(segments) if self.colour else plain(segments), aside)

    def info(self, text: str, **fields: Any) -> None:
        self.show(
            [("info", f"-!- {text}")], {"event": "info", "text": text, **fields}, True
        )

    def problem(self, text: str, **fields: Any) -> None:
        self.show(
            [("error", f"!!! {text}")], {"event": "error", "text": text, **fields}, True
        )

    def write(self, line: str, aside: bool = False) -> None:
        stream = self.asides if aside else self.stream
        stream.write(line + "\n")
        stream.flush()

    def changed(self) -> None:
        """
        The session's state changed (a front end with a prompt redraws it).
        """


# -- the session --------------------------------------------------------------


class SessionEnded(Exception):
    """
    The session cannot go on (its token was refused, the server is gone).
    """

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


Connector = Callable[[MessageClient], Awaitable[Any]]


class ChatSession:
    """
    One person's chat session across connections.
    """

    maxBackoff = 30.0
    historyPage = 500
    #: Seconds between keepalive pings while connected (0: none), and how
    #: long a ping may go unanswered before the connection counts as dead.
    keepaliveInterval = 60.0
    keepaliveTimeout = 20.0
    #: Ask which rooms exist on connecting, for completion (the terminal UI).
    learnRooms = False

    def __init__(
        self,
        reactor: Any,
        view: View,
        connector: Connector,
        token: str | None = None,
        username: str | None = None,
        password: str | None = None,
        room: str | None = None,
        showJoinHistory: bool = True,
        maxAttempts: int | None = None,
        onToken: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.reactor = reactor
        self.view = view
        self.connector = connector
        self.token = token
        self.loginName = username
        self.password = password
        self.current: str | None = room
        self.showJoinHistory = showJoinHistory
        self.maxAttempts = maxAttempts
        self.onToken = onToken
        self.username = ""
        self.rooms: list[str] = []
        self.knownRooms: set[str] = set()
        self.names: set[str] = set()
        self.lastSeq: dict[str, int] = {}
        self.client: MessageClient | None = None
        self.closing = False
        self.refused = 0
        #: Fires with the exit status when the session is over.
        self.done: defer.Deferred[int] = defer.Deferred()
        self._live = False
        self._waiters: list[defer.Deferred[None]] = []
        self._queue: deque[str] = deque()
        self._working = False
        self._inputEnded = False
        self._inFlight: tuple[str, str, str, defer.Deferred[None]] | None = None
        self._sayCount = 0
        self._reconnecting = False
        self._keepalive: Any = None
        #: Rooms being caught up with history, and the live messages of a
        #: room held (by seq) until those before them are shown.
        self._catchingUp: set[str] = set()
        self._held: dict[str, dict[int, dict[str, Any]]] = {}
        self._abandoned: set[MessageClient] = set()
        self._unanswered: set[MessageClient] = set()
        #: Called when what a prompt shows may have changed.
        self.onChange: Callable[[], None] = lambda: None

    @property
    def isLive(self) -> bool:
        """
        Connected, rejoined and caught up.
        """
        return self.client is not None and self._live

    # -- connection -----------------------------------------------------------

    def show(self, message: dict[str, Any], event: str = "message") -> None:
        self.view.show(render(message, self.username), {"event": event, event: message})

    async def start(self) -> None:
        """
        The first connection; its failures are the command's failures.
        """
        await self.connect()

    async def connect(self) -> None:
        """
        Connect, authenticate, rejoin rooms and catch up.
        """
        self._live = False
        client = MessageClient(self.received)
        await self.connector(client)
        self.client = client
        client.disconnected.addCallback(lambda _: self.lost(client))
        if self.token is not None:
            session = await client.call({"type": "resume", "token": self.token})
        else:
            session = await client.call(
                {
                    "type": "login",
                    "username": self.loginName,
                    "password": self.password,
                }
            )
            self.token = session["token"]
            self.password = None
            if self.onToken is not None:
                self.onToken(session)
        if not self.username and self.showJoinHistory:
            self.view.info(
                f"logged in as {sanitize(session['username'])}; /help lists the "
                "commands",
                username=session["username"],
            )
        self.username = session["username"]
        rooms = list(self.rooms) or ([self.current] if self.current else [])
        for room in rooms:
            await self.join(room, switch=False)
        if self.current is None and self.rooms:
            self.current = self.rooms[0]
        if self.learnRooms:
            await self._learnRooms(client)
        self._settleInFlight()
        self._live = True
        self._scheduleKeepalive()
        self.onChange()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)
        self._pump()

    async def _learnRooms(self, client: MessageClient) -> None:
        """
        The rooms that exist, for completion (best effort).
        """
        try:
            reply = await client.call({"type": "rooms"})
        except ServerError:
            return
        rooms = reply.get("rooms", [])
        self.knownRooms.update(
            r["room"]
            for r in rooms
            if isinstance(r, dict) and isinstance(r.get("room"), str)
        )

    async def join(self, room: str, switch: bool = True) -> None:
        assert self.client is not None
        joined = await self.client.call({"type": "join", "room": room})
        room = joined.get("room", room)
        if room not in self.rooms:
            self.rooms.append(room)
        self.knownRooms.add(room)
        self.names.update(joined.get("members", []))
        if switch or self.current is None:
            self.current = room
        seen = self.lastSeq.get(room)
        if seen is None:
            members = ", ".join(sanitize(m) for m in joined.get("members", []))
            self.view.info(
                f"joined #{sanitize(room)}: {members}",
                room=room,
                members=joined.get("members", []),
            )
            history = joined.get("history", []) if self.showJoinHistory else []
            for message in history:
                self._deliver(message)
            self.lastSeq.setdefault(room, joined.get("last_seq", 0))
        else:
            # Back after a lost connection (on this node or another one).
            await self._catchUp(self.client, room)

    async def _catchUp(self, client: MessageClient, room: str) -> None:
        """
        Show everything after the last seq seen in C{room}, page by page
        (a page may be short and say C{more}); live messages of the room
        wait meanwhile, then follow in order.  If the connection is lost
        on the way, the held messages stay held: the catch-up after the
        reconnect shows what comes before them.
        """
        self._catchingUp.add(room)
        try:
            while room in self.lastSeq:
                after = self.lastSeq[room]
                try:
                    reply = await client.call(
                        {
                            "type": "history",
                            "room": room,
                            "after": after,
                            "limit": self.historyPage,
                        }
                    )
                except ServerError as e:
                    if e.code != "rate_limited":
                        raise
                    await deferLater(
                        self.reactor, _seconds(e.reply.get("retry_after")), lambda: None
                    )
                    continue
                if room not in self.lastSeq:
                    break  # left meanwhile (/part)
                messages = reply.get("messages", [])
                for message in messages:
                    self._deliver(message)
                if self.lastSeq.get(room, after) <= after or (
                    len(messages) < self.historyPage and not reply.get("more")
                ):
                    break
        finally:
            self._catchingUp.discard(room)
        self._flushHeld(room)

    def _fillGap(self, room: str) -> None:
        """
        A live message of C{room} skipped a seq: fetch what is missing.
        """
        client = self.client
        if client is None or self.closing:
            return  # the catch-up after the reconnect does it

        def failed(f: Any) -> None:
            if f.check(ServerError):
                self.view.problem(
                    f"cannot fetch the missing messages of #{sanitize(room)}: "
                    f"{sanitize(f.value.code)}"
                )
                self._flushHeld(room)
            elif not f.check(
                error.ConnectionDone, error.ConnectionLost, defer.CancelledError
            ):
                log.failure("fetching missing messages failed", f)

        defer.ensureDeferred(self._catchUp(client, room)).addErrback(failed)

    def _deliver(self, message: dict[str, Any]) -> None:
        """
        Show a room message unless its seq was shown already, then the
        held messages that follow it without a gap.
        """
        pending = [message]
        while pending:
            message = pending.pop()
            room, seq = message.get("room"), message.get("seq")
            if isinstance(room, str) and isinstance(seq, int):
                if seq <= self.lastSeq.get(room, 0):
                    continue  # already shown
                self.lastSeq[room] = seq
            sender = message.get("from")
            if isinstance(sender, str):
                self.names.add(sender)
            self._confirm(message)
            self.show(message)
            held = self._held.get(room) if isinstance(room, str) else None
            if held and isinstance(room, str) and room in self.lastSeq:
                following = held.pop(self.lastSeq[room] + 1, None)
                if following is not None:
                    pending.append(following)

    def _flushHeld(self, room: str) -> None:
        """
        Show the held messages of C{room} in seq order (after a catch-up:
        what is still missing before them is not in the history).
        """
        held = self._held.pop(room, {})
        for seq in sorted(held):
            self._deliver(held[seq])

    def received(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "message":
            room, seq = message.get("room"), message.get("seq")
            if isinstance(room, str) and isinstance(seq, int) and room in self.lastSeq:
                last = self.lastSeq[room]
                if seq <= last:
                    return  # already shown
                if room in self._catchingUp or seq > last + 1:
                    self._held.setdefault(room, {})[seq] = message
                    if room not in self._catchingUp:
                        self._fillGap(room)
                    return
            self._deliver(message)
            return
        if kind == "presence" and isinstance(message.get("user"), str):
            self.names.add(message["user"])
        elif kind == "private" and isinstance(message.get("from"), str):
            self.names.add(message["from"])
        elif kind == "error" and self._sayFailed(message):
            return
        self.show(message)
        if kind == "error" and message.get("code") in SESSION_END_CODES:
            # Revoked or expired while connected: no line can be said now.
            self.end(
                SessionEnded(
                    f"{sanitize(message.get('code'))}: the session is no longer "
                    "valid: log in again",
                    5,
                )
            )

    def lost(self, client: MessageClient) -> None:
        if client in self._abandoned:
            self._abandoned.discard(client)
            return
        if self.client is client:
            self.client = None
            self._live = False
        elif self.client is not None:
            return  # an older connection; a newer one is in use
        self.onChange()
        # A line in flight is settled after the catch-up: it may be stored.
        if self.closing:
            return
        reason = client.lostReason
        why = "closed by the server"
        if client in self._unanswered:
            self._unanswered.discard(client)
            why = f"no answer to a ping in {self.keepaliveTimeout:g} s"
        elif client.closingError is not None:
            why = (
                f"{sanitize(client.closingError.get('code'))}: "
                f"{sanitize(client.closingError.get('message'))}"
            )
        elif reason is not None and not reason.check(error.ConnectionDone):
            why = sanitize(reason.getErrorMessage())
        self.view.problem(f"connection lost ({why})", reason=why)
        if (
            client.closingError is not None
            and client.closingError.get("code") in SESSION_END_CODES
        ):
            self.end(SessionEnded("the session is no longer valid: log in again", 5))
            return
        defer.ensureDeferred(self.reconnect()).addErrback(
            lambda f: log.failure("reconnecting failed", f)
        )

    async def reconnect(self) -> None:
        """
        Connect again with back-off until it works (or, with
        C{maxAttempts}, until that many attempts failed).
        """
        if self._reconnecting:
            return
        self._reconnecting = True
        try:
            await self._reconnect()
        finally:
            self._reconnecting = False

    async def _reconnect(self) -> None:
        delay = 1.0
        attempts = 0
        while not self.closing:
            self.view.info(f"reconnecting in {delay:g} s")
            await deferLater(self.reactor, delay, lambda: None)
            if self.closing:
                return
            attempts += 1
            try:
                await self.connect()
            except ServerError as e:
                self._dropPartial()
                if e.code == "rate_limited":
                    delay = _seconds(e.reply.get("retry_after"))
                    continue
                self.end(
                    SessionEnded(
                        f"cannot resume the session: {e.code}: {e.message}",
                        5 if e.code in SESSION_END_CODES else 1,
                    )
                )
                return
            except (
                error.ConnectError,
                error.DNSLookupError,
                error.ConnectionDone,
                error.ConnectionLost,
            ):
                self._dropPartial()
                if self.maxAttempts is not None and attempts >= self.maxAttempts:
                    self.end(SessionEnded("the server is gone; giving up", 4))
                    return
                delay = min(self.maxBackoff, delay * 2)
                continue
            where = self.client.label if self.client is not None else ""
            self.view.info(f"reconnected to {sanitize(where)}", server=where)
            return

    def _dropPartial(self) -> None:
        """
        Close a connection that was made but did not get as far as live.
        """
        if self.client is not None and not self._live:
            client, self.client = self.client, None
            self._abandoned.add(client)
            client.close()

    # -- keepalive ------------------------------------------------------------

    def _scheduleKeepalive(self) -> None:
        if self.keepaliveInterval <= 0 or self.closing:
            return
        if self._keepalive is not None and self._keepalive.active():
            return
        self._keepalive = self.reactor.callLater(self.keepaliveInterval, self._ping)

    def _ping(self) -> None:
        """
        Ask the server for a C{pong}: keeps an idle session from the
        server's idle timeout, and notices a connection that died silently.
        """
        self._keepalive = None
        client = self.client
        if client is None or not self._live or self.closing:
            self._scheduleKeepalive()
            return

        def noAnswer() -> None:
            self._unanswered.add(client)
            client.transport.abortConnection()

        timer = self.reactor.callLater(self.keepaliveTimeout, noAnswer)

        def answered(result: Any) -> None:
            if timer.active():
                timer.cancel()
            self._scheduleKeepalive()

        client.call({"type": "ping"}, check=False).addBoth(answered)

    def end(self, failure: Exception | int) -> None:
        """
        The session is over: with an exit status, or a L{SessionEnded}.
        """
        self.closing = True
        if self._keepalive is not None and self._keepalive.active():
            self._keepalive.cancel()
        if self.client is not None:
            self.client.close()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(defer.CancelledError())
        if not self.done.called:
            if isinstance(failure, int):
                self.done.callback(failure)
            else:
                self.done.errback(failure)

    def finish(self) -> None:
        self.end(1 if self.refused else 0)

    # -- what the person types ------------------------------------------------

    def typed(self, line: str) -> None:
        """
        Queue one typed (or piped) line; lines are carried out in order.
        """
        for part in line.splitlines() or [""]:
            if part.strip():
                self._queue.append(part)
        self._pump()
        self.onChange()

    def inputEnded(self) -> None:
        """
        No more lines will come: finish once the queue is done.
        """
        self._inputEnded = True
        self._pump()

    @property
    def pending(self) -> int:
        """
        Lines typed and not yet carried out.
        """
        return len(self._queue)

    def _pump(self) -> None:
        if self._working or self.closing:
            return
        if not self._queue:
            if self._inputEnded:
                self.finish()
            return
        self._working = True
        defer.ensureDeferred(self._work()).addErrback(
            lambda f: log.failure("the line queue failed", f)
        )

    async def _work(self) -> None:
        try:
            while self._queue and not self.closing:
                line = self._queue[0]
                try:
                    await self._carryOut(line)
                except defer.CancelledError:
                    return
                except Exception:  # noqa: BLE001 - a bug must not stop the queue
                    log.failure("carrying out a line failed")
                    self.refused += 1
                    self.view.problem("that line failed (a bug in netlab); going on")
                self._queue.popleft()
                self.onChange()
        finally:
            self._working = False
        self._pump()

    async def _whenReady(self) -> MessageClient:
        """
        The client, once connected, rejoined and caught up.
        """
        while self.client is None or not self._live:
            waiter: defer.Deferred[None] = defer.Deferred()
            self._waiters.append(waiter)
            await waiter
        return self.client

    async def _carryOut(self, line: str) -> None:
        """
        Carry out one line; it is retried (after a reconnect or a rate
        limit) until the server has answered it.
        """
        while True:
            client = await self._whenReady()
            try:
                await self.command(client, line)
                return
            except ServerError as e:
                if e.code == "rate_limited":
                    wait = _seconds(e.reply.get("retry_after"))
                    self.view.info(
                        f"rate limited: sending again in {wait:g} s "
                        f"({len(self._queue)} line(s) waiting)",
                        retry_after=wait,
                    )
                    await deferLater(self.reactor, wait, lambda: None)
                    continue
                self.refused += 1
                self.show(e.reply, "error")
                return
            except (error.ConnectionDone, error.ConnectionLost):
                if self.client is client:
                    self.client = None
                    self._live = False
                continue  # after the reconnect and catch-up

    async def command(self, client: MessageClient, line: str) -> None:
        stripped = line.strip()
        word, _, rest = stripped.partition(" ")
        rest = rest.strip()
        if not stripped.startswith("/") or stripped.startswith("//"):
            text = line[1:] if stripped.startswith("//") else line
            if self.current is None:
                self.view.problem("join a room first: /join ROOM")
                self.refused += 1
                return
            await self.say(client, self.current, text)
            return
        word = ALIASES.get(word.lower(), word.lower())
        if word == "/quit":
            self._queue.clear()
            self.finish()
            raise defer.CancelledError()
        if word == "/help":
            for helpLine in HELP.splitlines():
                self.view.info(helpLine)
        elif word == "/join" and rest:
            room = rest.lstrip("#")
            if room in self.rooms:
                self.current = room
                self.view.info(f"talking in #{room}", room=room)
            else:
                await self.join(room)
        elif word == "/part":
            partRoom: str | None = rest.lstrip("#") or self.current
            if partRoom is None or partRoom not in self.rooms:
                self.view.problem(f"not in #{sanitize(partRoom or '?')}")
                return
            await client.call({"type": "leave", "room": partRoom})
            self.rooms.remove(partRoom)
            self.lastSeq.pop(partRoom, None)
            self._held.pop(partRoom, None)
            if partRoom == self.current:
                self.current = self.rooms[-1] if self.rooms else None
                after = (
                    f"lines now go to #{self.current}"
                    if self.current
                    else "you are in no room: /join ROOM"
                )
                self.view.info(
                    f"left #{partRoom}; {after}", room=partRoom, current=self.current
                )
            else:
                self.view.info(f"left #{partRoom}", room=partRoom, current=self.current)
        elif word == "/msg" and " " in rest:
            to, _, text = rest.partition(" ")
            reply = await client.call({"type": "msg", "to": to, "text": text})
            self.view.show(
                [("private", f"-> *{sanitize(to)}*"), ("text", f" {sanitize(text)}")],
                {"event": "reply", "reply": reply},
            )
        elif word == "/who" and (rest or self.current):
            whoRoom = rest.lstrip("#") or self.current
            reply = await client.call({"type": "who", "room": whoRoom})
            members = reply.get("members", [])
            self.names.update(members)
            self.view.show(
                [
                    ("info", f"-!- in #{sanitize(whoRoom)}: "),
                    ("text", ", ".join(map(sanitize, members))),
                ],
                {"event": "reply", "reply": reply},
            )
        elif word == "/rooms":
            reply = await client.call({"type": "rooms"})
            rooms = reply.get("rooms", [])
            self.knownRooms.update(r.get("room") for r in rooms if r.get("room"))
            listing = ", ".join(
                f"#{sanitize(r.get('room'))} ({sanitize(r.get('members'))})"
                for r in rooms
            )
            self.view.show(
                [("info", "-!- rooms: "), ("text", listing or "none")],
                {"event": "reply", "reply": reply},
            )
        elif word == "/history" and (rest or self.current):
            words = rest.split()
            limit = next((int(w) for w in words if w.isdigit()), 20)
            historyRoom = next(
                (w.lstrip("#") for w in words if not w.isdigit()), self.current
            )
            reply = await client.call(
                {
                    "type": "history",
                    "room": historyRoom,
                    "limit": max(1, min(limit, 500)),
                }
            )
            if self.view.json:
                self.view.show(None, {"event": "reply", "reply": reply})
            else:
                for message in reply.get("messages", []):
                    self.view.show(render(message, self.username), {})
        else:
            known = word in COMMANDS
            self.view.problem(
                f"{word} needs an argument: {COMMANDS[word]}"
                if known
                else f"unknown command {sanitize(word)}; /help lists them"
            )

    async def say(self, client: MessageClient, room: str, text: str) -> None:
        """
        Say C{text} in C{room} and wait until the server broadcasts it back
        (or refuses it: the request carries an C{id} so its error does).
        """
        self._sayCount += 1
        sayId = f"say-{self._sayCount}"
        confirmed: defer.Deferred[None] = defer.Deferred()
        self._inFlight = (sayId, room, text, confirmed)
        client.send(
            encodeMessage({"type": "say", "room": room, "text": text, "id": sayId})
        )
        try:
            await confirmed
        finally:
            if self._inFlight is not None and self._inFlight[3] is confirmed:
                self._inFlight = None

    def _confirm(self, message: dict[str, Any]) -> None:
        if self._inFlight is None:
            return
        _, room, text, confirmed = self._inFlight
        if (
            message.get("from") == self.username
            and message.get("room") == room
            and _same(message.get("text"), text)
        ):
            self._inFlight = None
            confirmed.callback(None)

    def _sayFailed(self, message: dict[str, Any]) -> bool:
        if self._inFlight is None or message.get("id") != self._inFlight[0]:
            return False
        confirmed = self._inFlight[3]
        self._inFlight = None
        confirmed.errback(ServerError(message))
        return True

    def _settleInFlight(self) -> None:
        """
        After a catch-up: a line in flight when the connection dropped was
        either in the history just shown (confirmed then) or is said again.
        """
        if self._inFlight is None:
            return
        confirmed = self._inFlight[3]
        self._inFlight = None
        if not confirmed.called:
            confirmed.errback(error.ConnectionLost("connection lost before the reply"))


def _same(a: Any, b: str) -> bool:
    return isinstance(a, str) and unicodedata.normalize(
        "NFC", a
    ) == unicodedata.normalize("NFC", b)


def _seconds(value: Any) -> float:
    try:
        return max(1.0, min(float(value), 3600.0))
    except (TypeError, ValueError):
        return 1.0


# -- standard input -------------------------------------------------------------


class StdinLines(LineReceiver):
    """
    Standard input (a pipe or a file), one line at a time, read to its end
    through Twisted's stdio support.  Reading pauses while C{highWater}
    lines wait, so a huge file does not pile up in memory.
    """

    delimiter = b"\n"
    MAX_LENGTH = 1 << 20
    highWater = 1000
    lowWater = 100

    def __init__(self, session: ChatSession) -> None:
        self.session = session
        self.paused = False
        session.onChange = self.queueChanged

    def lineReceived(self, line: bytes) -> None:
        self.session.typed(line.decode("utf-8", "replace").rstrip("\r"))

    def queueChanged(self) -> None:
        waiting = self.session.pending
        stdin: Any = self.transport  # an IProducer too (StandardIO)
        if not self.paused and waiting >= self.highWater:
            self.paused = True
            stdin.pauseProducing()
        elif self.paused and waiting <= self.lowWater:
            self.paused = False
            stdin.resumeProducing()

    def connectionLost(self, reason: Any = None) -> None:
        if self._buffer:  # a last line without its newline
            rest, self._buffer = self._buffer, b""
            self.lineReceived(rest)
        self.session.inputEnded()


# -- the command ---------------------------------------------------------------


async def runChatSession(reactor: Any, options: argparse.Namespace) -> int:
    """
    The C{netlab chat} command once the token (or password) is known.
    """
    from twisted_lab.client.cli import EXIT_LOST, EXIT_OK, Output, failoverFor
    from twisted_lab.client.cluster import Address, failureReason, showAddress

    out: Output = options.out
    view = View(json=options.json, colour=wantColour(sys.stdout) and not options.json)
    terminal = getattr(options, "terminalUI", False)

    def fellThrough(address: Address, e: BaseException, following: Address) -> None:
        view.info(
            f"cannot connect to {showAddress(*address)}: {failureReason(e)}; "
            f"trying {showAddress(*following)}",
            server=showAddress(*address),
        )

    # One Failover for the whole session: each reconnection starts with the
    # server after the one that was lost.
    failover = failoverFor(reactor, options, fellThrough)

    async def connector(client: MessageClient) -> Any:
        client.report = out.report
        client.onEvent = out.event
        return await failover.connect(client)

    def saveToken(session: dict[str, Any]) -> None:
        from twisted_lab.client.cli import endpointOf
        from twisted_lab.client.sessions import Session, SessionStore

        SessionStore().save(
            Session(
                endpointOf(options),
                session["username"],
                session["token"],
                session.get("expires_at", ""),
            )
        )

    if terminal:
        from twisted_lab.client.terminal import TerminalView

        terminalView = TerminalView(colour=wantColour(sys.stdout))
        view = terminalView
    session = ChatSession(
        reactor,
        view,
        connector,
        token=options.token,
        username=getattr(options, "user", None),
        password=getattr(options, "password", None),
        room=options.room,
        showJoinHistory=options.say is None and options.tail is None,
        maxAttempts=None if terminal else 5,
        onToken=saveToken,
    )
    session.learnRooms = terminal
    try:
        if options.tail is not None:
            session.current = None
            await session.connect()
            assert session.client is not None
            reply = await session.client.call(
                {"type": "history", "room": options.room, "limit": options.tail}
            )
            session.closing = True
            if options.json:
                view.show(None, {"event": "reply", "reply": reply})
            else:
                for message in reply.get("messages", []):
                    view.show(render(message, session.username), {})
            return EXIT_OK
        await session.start()
        if options.say is not None:
            session.typed(options.say)
            session.inputEnded()
        elif terminal:
            from twisted_lab.client.terminal import runTerminal

            return await runTerminal(session, terminalView)
        else:
            from twisted.internet import stdio

            stdio.StandardIO(StdinLines(session), reactor=reactor)
        return await session.done
    except SessionEnded as e:
        if e.code == 5:
            _forgetSession(options, session.token)
        out.failed(_abort(str(e), e.code))
        return e.code
    except ServerError as e:
        if e.code in SESSION_END_CODES:
            _forgetSession(options, session.token)
        raise
    except ClosedByServer:
        raise
    except (error.ConnectionDone, error.ConnectionLost) as e:
        if session.closing:
            return EXIT_OK
        raise _abort(f"connection lost: {e}", EXIT_LOST) from None
    finally:
        session.closing = True
        if session.client is not None:
            session.client.close()


def _forgetSession(options: argparse.Namespace, token: str | None) -> None:
    """
    The server that issued C{token} (or a node of its cluster, which shares
    its sessions) refused it: forget that session (only the one saved for
    those servers, and only if it still holds that token).
    """
    if token is None:
        return
    from twisted_lab.client.cli import endpointOf
    from twisted_lab.client.sessions import SessionStore

    saved = getattr(options, "session", None)
    servers = saved.endpoint if saved is not None else endpointOf(options)
    SessionStore().forget(servers, token)


def _abort(message: str, code: int) -> Abort:
    from twisted_lab.client.cli import Abort

    return Abort(message, code=code)
