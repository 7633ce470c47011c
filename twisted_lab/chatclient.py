"""
The C{netlab chat} client: an interactive chat on Twisted's stdio support,
and two script modes (C{--say}, C{--tail}).

The session survives the connection: if the connection drops, the client
reconnects with back-off (1 s, 2 s, 4 s ... 30 s), resumes the session with
its token, joins its rooms again and asks C{history} with C{after} = the
last C{seq} it saw in each, so nothing said meanwhile is lost.  A message
seen twice (in history and as a broadcast) is shown once, by C{seq}.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from datetime import datetime
from typing import Any

from twisted.internet import defer, error, stdio
from twisted.internet.task import deferLater
from twisted.protocols.basic import LineReceiver

from twisted_lab.client import MessageClient, ServerError, connect
from twisted_lab.messages import encodeMessage

HELP = """commands:
  /join ROOM        join a room (it becomes the current one)
  /leave            leave the current room
  /msg USER TEXT    private message
  /who              members of the current room
  /rooms            rooms and how many are in each
  /history [N]      the last N messages of the current room (default 20)
  /quit             leave
  anything else is said to the current room"""


def clock(ts: str) -> str:
    """
    HH:MM in local time for an RFC 3339 UTC timestamp.
    """
    try:
        return (
            datetime.fromisoformat(ts.replace("Z", "+00:00"))
            .astimezone()
            .strftime("%H:%M")
        )
    except ValueError:
        return "--:--"


def render(message: dict[str, Any]) -> str | None:
    """
    How a message from the server is shown, or None for nothing.
    """
    kind = message.get("type")
    if kind == "message":
        return f"[{clock(message['ts'])}] <{message['from']}> {message['text']}"
    if kind == "private":
        return (
            f"[{clock(message['ts'])}] *{message['from']}* (private) {message['text']}"
        )
    if kind == "presence":
        verb = "joined" if message.get("event") == "join" else "left"
        return f"* {message['user']} {verb} {message['room']}"
    if kind == "error":
        return f"! {message.get('code')}: {message.get('message')}"
    return None


class ChatSession:
    """
    One person's chat session across connections.
    """

    maxBackoff = 30.0

    def __init__(
        self,
        reactor: Any,
        options: argparse.Namespace,
        token: str | None,
        show: Callable[[str], None],
        report: Callable[[str], None],
    ) -> None:
        self.reactor = reactor
        self.options = options
        self.token = token
        self.show = show
        self.report = report
        self.rooms: list[str] = []
        self.current: str | None = options.room
        self.lastSeq: dict[str, int] = {}
        self.client: MessageClient | None = None
        self.closing = False
        self.done: defer.Deferred[None] = defer.Deferred()
        self.username = ""

    # -- connection -----------------------------------------------------------

    async def connect(self) -> None:
        """
        Connect, authenticate, rejoin rooms and catch up.
        """
        client = MessageClient(self.received, self.report)
        await connect(
            self.reactor,
            self.options.host,
            self.options.port,
            client,
            self.options.timeout,
            self.options.bind,
        )
        self.client = client
        client.disconnected.addCallback(lambda _: self.lost())
        if self.token is not None:
            session = await client.call({"type": "resume", "token": self.token})
        else:
            session = await client.call(
                {
                    "type": "login",
                    "username": self.options.user,
                    "password": self.options.password,
                }
            )
            self.token = session["token"]
        if not self.username and self.options.interactive_chat:
            self.show(f"* logged in as {session['username']}; /help lists the commands")
        self.username = session["username"]
        if not self.options.join_on_connect:
            return
        rooms = list(self.rooms) or ([self.current] if self.current else [])
        for room in rooms:
            await self.join(room)

    async def join(self, room: str) -> None:
        assert self.client is not None
        joined = await self.client.call({"type": "join", "room": room})
        if room not in self.rooms:
            self.rooms.append(room)
        self.current = room
        seen = self.lastSeq.get(room)
        if seen is None:
            history = joined["history"] if self.options.interactive_chat else []
            if self.options.interactive_chat:
                self.show(f"* joined {room}: {', '.join(joined['members'])}")
        else:
            reply = await self.client.call(
                {"type": "history", "room": room, "after": seen, "limit": 500}
            )
            history = reply["messages"]
        for message in history:
            self.received(message)
        self.lastSeq.setdefault(room, joined["last_seq"])

    def received(self, message: dict[str, Any]) -> None:
        if message.get("type") == "message":
            room, seq = message["room"], message["seq"]
            if seq <= self.lastSeq.get(room, 0):
                return  # already shown
            self.lastSeq[room] = seq
        line = render(message)
        if line is not None:
            self.show(line)

    def lost(self) -> None:
        self.client = None
        if not self.closing:
            defer.ensureDeferred(self.reconnect())

    async def reconnect(self) -> None:
        delay = 1.0
        while not self.closing:
            self.show(f"* connection lost; reconnecting in {delay:.0f} s")
            await deferLater(self.reactor, delay, lambda: None)
            try:
                await self.connect()
            except ServerError as e:
                self.show(f"! cannot resume: {e}")
                self.finish()
                return
            except (error.ConnectError, error.ConnectionDone, error.ConnectionLost):
                delay = min(self.maxBackoff, delay * 2)
                continue
            self.show("* reconnected")
            return

    def finish(self) -> None:
        self.closing = True
        if self.client is not None:
            self.client.transport.loseConnection()
        if not self.done.called:
            self.done.callback(None)

    # -- what the person types ------------------------------------------------

    def say(self, room: str, text: str) -> None:
        """
        Say C{text} in C{room}.  A C{say} has no reply (the broadcast is
        the confirmation), so it goes without an C{id}: an error about it
        arrives like any other message and is shown.
        """
        assert self.client is not None
        self.client.send(encodeMessage({"type": "say", "room": room, "text": text}))

    async def command(self, line: str) -> None:
        line = line.strip()
        if not line:
            return
        if self.client is None:
            self.show("! not connected right now; try again in a moment")
            return
        try:
            await self._command(line)
        except ServerError as e:
            self.show(f"! {e.code}: {e.message}")
        except (error.ConnectionDone, error.ConnectionLost):
            pass  # the reconnect loop says so

    async def _command(self, line: str) -> None:
        assert self.client is not None
        word, _, rest = line.partition(" ")
        rest = rest.strip()
        if not line.startswith("/"):
            if self.current is None:
                self.show("! join a room first: /join ROOM")
                return
            self.say(self.current, line)
        elif word == "/quit":
            self.finish()
        elif word == "/help":
            self.show(HELP)
        elif word == "/join" and rest:
            await self.join(rest)
        elif word == "/leave" and self.current:
            await self.client.call({"type": "leave", "room": self.current})
            self.rooms.remove(self.current)
            self.lastSeq.pop(self.current, None)
            self.show(f"* left {self.current}")
            self.current = self.rooms[-1] if self.rooms else None
        elif word == "/msg" and " " in rest:
            to, _, text = rest.partition(" ")
            await self.client.call({"type": "msg", "to": to, "text": text})
            self.show(f"-> *{to}* {text}")
        elif word == "/who" and self.current:
            reply = await self.client.call({"type": "who", "room": self.current})
            self.show(f"* in {self.current}: {', '.join(reply['members'])}")
        elif word == "/rooms":
            reply = await self.client.call({"type": "rooms"})
            for room in reply["rooms"]:
                self.show(f"* {room['room']} ({room['members']} here)")
        elif word == "/history" and self.current:
            limit = int(rest) if rest.isdigit() else 20
            reply = await self.client.call(
                {
                    "type": "history",
                    "room": self.current,
                    "limit": max(1, min(limit, 500)),
                }
            )
            for message in reply["messages"]:
                shown = render(message)
                if shown:
                    self.show(shown)
        else:
            self.show("! unknown command or missing argument; /help lists them")


class StdinLines(LineReceiver):
    """
    Standard input, one line at a time, through Twisted's stdio support.
    """

    delimiter = b"\n"

    def __init__(self, session: ChatSession) -> None:
        self.session = session
        # Commands run one after another, and end of input waits for them.
        self._chain: defer.Deferred[Any] = defer.succeed(None)

    def lineReceived(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace").rstrip("\r")
        self._chain.addBoth(lambda _: defer.ensureDeferred(self.session.command(text)))

    def connectionLost(self, reason: Any = None) -> None:
        self._chain.addBoth(lambda _: self.session.finish())


def printer(stream: Any = None) -> Callable[[str], None]:
    def show(line: str) -> None:
        out = stream if stream is not None else sys.stdout
        out.write(line + "\n")
        out.flush()

    return show


async def runChatSession(
    reactor: Any, options: argparse.Namespace, token: str | None, report: Any
) -> int:
    """
    The C{netlab chat} command once the token (or password) is known.
    """
    show = printer()
    options.interactive_chat = options.say is None and options.tail is None
    options.join_on_connect = options.tail is None
    session = ChatSession(reactor, options, token, show, report)
    try:
        return await _runSession(session, options, show)
    finally:
        session.finish()


async def _runSession(
    session: ChatSession, options: argparse.Namespace, show: Callable[[str], None]
) -> int:
    await session.connect()
    assert session.client is not None
    if options.tail is not None:
        reply = await session.client.call(
            {"type": "history", "room": options.room, "limit": options.tail}
        )
        for message in reply["messages"]:
            show(render(message) or "")
        session.finish()
        return 0
    if options.say is not None:
        outcome: defer.Deferred[dict[str, Any]] = defer.Deferred()
        original = session.received

        def watch(message: dict[str, Any]) -> None:
            original(message)
            mineArrived = (
                message.get("type") == "message"
                and message.get("from") == session.username
                and message.get("text") == options.say
            )
            if (mineArrived or message.get("type") == "error") and not outcome.called:
                outcome.callback(message)

        session.client.onMessage = watch
        session.say(options.room, options.say)
        result = await outcome
        session.finish()
        if result.get("type") == "error":
            raise ServerError(result)
        return 0
    stdio.StandardIO(StdinLines(session), reactor=session.reactor)
    await session.done
    return 0
