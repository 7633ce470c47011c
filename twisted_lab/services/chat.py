"""
The chat service (C{twistd netlab-chat}): rooms, broadcasts, private
messages, and a history that loses nothing (C{docs/protocol.md} section 3.3).

Shaped like C{twisted.words}: the cred realm (L{ChatRealm}) hands each
logged-in connection a L{ChatUser} avatar and attaches the connection as the
avatar's I{mind}; rooms are objects of the L{ChatService}, which owns
membership, sequence numbers, the group commit and fan-out.  Accounts and
sessions are the auth service's (same requests, same database), so a token
from one server works on the other.

A room message is broadcast only after it is committed: every message that
arrives in one reactor turn is stored in one transaction, then broadcast in
C{seq} order, encoded once, the same bytes written to every member.
"""

from __future__ import annotations

import re
import time
from typing import Any

from twisted.cred.portal import IRealm
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_lab.codecs import events
from twisted_lab.codecs.errors import ErrorCode
from twisted_lab.codecs.message import (
    Integer,
    Message,
    Outgoing,
    RequestError,
    Text,
    encodeMessage,
    rfc3339,
)
from twisted_lab.ports import IChatClient, IRequestChannel
from twisted_lab.services.accounts import canonicalUsername
from twisted_lab.services.auth import (
    AUTH_LIMITS,
    Account,
    AuthService,
    AuthSession,
    IAccount,
)
from twisted_lab.services.context import ServerContext
from twisted_lab.services.limits import RequestLimit, TokenBucket

DEFAULT_PORT = 9093
ROOM_PATTERN = re.compile(r"[a-z0-9_-]{1,32}")
MAX_TEXT = 4000
HISTORY_ON_JOIN = 50
MAX_HISTORY = 500
DEFAULT_MESSAGE_RATE = 10.0
DEFAULT_MESSAGE_BURST = 20
#: Rooms one connection may be in at once.
MAX_ROOMS_PER_CONNECTION = 50
#: Names a member list or room list carries at most (a reply must fit in
#: one frame of the server's --max-length).
MAX_LISTED = 1000
#: Bytes of a reply's frame kept free for its other fields.
REPLY_SLACK = 1024

#: The rate of each request kind (docs/protocol.md, "Limits"): joins and
#: leaves (which others see as presence) share one bucket; room and
#: private messages share the --message-rate bucket; what reads the
#: database has a rate of its own.
CHAT_LIMITS = {
    **AUTH_LIMITS,
    "join": RequestLimit(rate=1.0, burst=10, bucket="membership"),
    "leave": RequestLimit(rate=1.0, burst=10, bucket="membership"),
    "say": RequestLimit(
        rate=DEFAULT_MESSAGE_RATE, burst=DEFAULT_MESSAGE_BURST, bucket="messages"
    ),
    "msg": RequestLimit(
        rate=DEFAULT_MESSAGE_RATE, burst=DEFAULT_MESSAGE_BURST, bucket="messages"
    ),
    "history": RequestLimit(rate=5.0, burst=20),
    "who": RequestLimit(rate=10.0, burst=50),
    "rooms": RequestLimit(rate=1.0, burst=10),
}


def validRoom(raw: str) -> str:
    if not ROOM_PATTERN.fullmatch(raw):
        raise RequestError(
            ErrorCode.INVALID_ROOM,
            "a room name has 1 to 32 characters from a-z, 0-9, _ and -",
        )
    return raw


def validText(text: str) -> str:
    if not 1 <= len(text) <= MAX_TEXT:
        raise RequestError(
            ErrorCode.BAD_REQUEST, f"a message has 1 to {MAX_TEXT} characters"
        )
    return text


class Room:
    """
    One room: who is in it (users, each with their connections) and the
    last C{seq} committed and seen here (the store numbers messages).
    """

    def __init__(self, name: str, lastSeq: int) -> None:
        self.name = name
        self.lastSeq = lastSeq
        self.members: dict[str, set[IChatClient]] = {}
        #: Messages posted and not yet committed (or failed): the room is
        #: not forgotten while there are any (their broadcast needs it).
        self.pending = 0

    def connections(self) -> list[IChatClient]:
        """
        A snapshot of every member connection (a delivery may disconnect a
        slow consumer, which changes the membership while we iterate).
        """
        return [c for connections in self.members.values() for c in connections]


@implementer(IAccount)
class ChatUser(Account):
    """
    The avatar of a logged-in chat user; its minds are its connections.
    """

    def __init__(self, username: str) -> None:
        super().__init__(username)
        self.minds: set[IChatClient] = set()


@implementer(IRealm)
class ChatRealm:
    """
    Hands each logged-in connection the user's avatar and attaches the
    connection to it; the logout callable detaches it.
    """

    def __init__(self, service: ChatService) -> None:
        self.service = service

    def requestAvatar(
        self, avatarId: Any, mind: Any, *interfaces: Any
    ) -> tuple[Any, ChatUser, Any]:
        if IAccount not in interfaces:
            raise NotImplementedError("only IAccount avatars are made here")
        user = self.service.attach(str(avatarId), mind)
        return IAccount, user, lambda: self.service.detach(user, mind)


def _share(d: defer.Deferred[Room]) -> defer.Deferred[Room]:
    """
    A Deferred that fires with C{d}'s result without consuming it, so
    several waiters can wait for one room to load.
    """
    shared: defer.Deferred[Room] = defer.Deferred()

    def passOn(result: Any) -> Any:
        if isinstance(result, Failure):
            shared.errback(result)
        else:
            shared.callback(result)
        return result

    d.addBoth(passOn)
    return shared


ROOM = Text(maxChars=64)


@implementer(IChatClient)
class ChatSession(AuthSession):
    """
    One chat connection: its requests, and the mind of a L{ChatUser}.

    Everything it is sent (replies, broadcasts, private messages, presence)
    goes through the channel's one output account: a member that does not
    read is cut off as a slow consumer past C{--max-send-queue}, so its
    backlog, and the server's memory, stay bounded while the others carry on.
    """

    service: ChatService
    limits = CHAT_LIMITS
    requests = {
        **AuthSession.requests,
        "join": {"room": ROOM},
        "leave": {"room": ROOM},
        "say": {"room": ROOM, "text": Text(maxChars=MAX_TEXT)},
        "msg": {"to": Text(maxChars=1024), "text": Text(maxChars=MAX_TEXT)},
        "history": {
            "room": ROOM,
            "after": Integer(minimum=0, required=False),
            "limit": Integer(minimum=1, maximum=MAX_HISTORY, required=False),
        },
        "who": {"room": ROOM},
        "rooms": {},
    }

    def __init__(
        self, channel: IRequestChannel, context: ServerContext, service: ChatService
    ) -> None:
        super().__init__(channel, context, service)
        self.joined: set[str] = set()

    # -- IChatClient: what the service tells this connection -------------------

    def roomMessages(self, room: str, outgoing: Outgoing) -> None:
        self._deliver(outgoing)

    def presence(self, room: str, outgoing: Outgoing) -> None:
        self._deliver(outgoing)

    def privateMessage(self, outgoing: Outgoing) -> None:
        self._deliver(outgoing)

    def _deliver(self, outgoing: Outgoing) -> None:
        if not self.channel.closing:
            self.channel.send(outgoing)

    # -- requests ----------------------------------------------------------------

    def chatUser(self) -> ChatUser:
        if not isinstance(self.account, ChatUser):
            raise RequestError(
                ErrorCode.NOT_AUTHENTICATED, "log in or resume a session first"
            )
        return self.account

    async def request_join(self, message: Message) -> Message:
        user = self.chatUser()
        service = self.service
        name = validRoom(message["room"])
        if name not in self.joined and len(self.joined) >= MAX_ROOMS_PER_CONNECTION:
            raise RequestError(
                ErrorCode.TOO_MANY_ROOMS,
                f"a connection may be in at most {MAX_ROOMS_PER_CONNECTION} rooms",
            )
        room = await service.room(name)
        if self.account is not user:
            raise RequestError(ErrorCode.NOT_AUTHENTICATED, "logged out meanwhile")
        room = service.join(room, user, self)
        lastSeq = room.lastSeq
        rows = await self.service.store.recentHistory(room.name, HISTORY_ON_JOIN)
        members, moreMembers = _listed(sorted(room.members))
        budget = self.context.maxLength - REPLY_SLACK - sum(len(m) + 3 for m in members)
        history, moreHistory = _fitting(room.name, rows, budget, newest=True)
        reply: Message = {
            "type": "joined",
            "room": room.name,
            "members": members,
            "history": history,
            "last_seq": lastSeq,
        }
        if moreMembers:
            reply["more_members"] = True
        if moreHistory:
            reply["more"] = True
        return reply

    def request_leave(self, message: Message) -> Message:
        user = self.chatUser()
        name = validRoom(message["room"])
        room = self.service.rooms.get(name)
        if room is not None:
            self.service.leave(room, user, self)
        return {"type": "left", "room": name}

    async def request_say(self, message: Message) -> None:
        user = self.chatUser()
        name = validRoom(message["room"])
        text = validText(message["text"])
        if name not in self.joined:
            raise RequestError(
                ErrorCode.NOT_IN_ROOM, f"join {name} before saying anything there"
            )
        service = self.service
        await service.post(service.rooms[name], user.username, text)
        return None

    def request_msg(self, message: Message) -> Message:
        user = self.chatUser()
        text = validText(message["text"])
        try:
            to = canonicalUsername(message["to"])
        except RequestError:
            to = ""
        target = self.service.users.get(to)
        if target is None or not target.minds:
            raise RequestError(ErrorCode.NO_SUCH_USER, "no such user is online")
        wait = self.service.inbox.take(to)
        if wait:
            raise self.rateLimited(wait, f"private messages to {to}")
        outgoing = Outgoing(
            {
                "type": "private",
                "from": user.username,
                "text": text,
                "ts": rfc3339(self.context.now()),
            }
        )
        minds = list(target.minds)
        for mind in minds:
            mind.privateMessage(outgoing)
        stats = self.context.stats
        stats.deliveries["private"] += len(minds)
        if self.context.logBudget.admit(events.PRIVATE_SENT):
            self.log.info(
                "{user} sent a private message to {to}",
                event=events.PRIVATE_SENT,
                user=user.username,
                to=to,
            )
        return {"type": "sent", "to": to}

    async def request_history(self, message: Message) -> Message:
        self.chatUser()
        name = validRoom(message["room"])
        limit = message.get("limit", 100)
        newest = "after" not in message
        if newest:  # (netlab) no "after": the latest `limit` messages
            rows = await self.service.store.recentHistory(name, limit)
        else:
            rows = await self.service.store.history(name, message["after"], limit)
        messages, more = _fitting(
            name, rows, self.context.maxLength - REPLY_SLACK, newest=newest
        )
        reply: Message = {"type": "history", "room": name, "messages": messages}
        if more:
            reply["more"] = True
        return reply

    def request_who(self, message: Message) -> Message:
        self.chatUser()
        name = validRoom(message["room"])
        room = self.service.rooms.get(name)
        members, more = _listed(sorted(room.members) if room is not None else [])
        reply: Message = {"type": "members", "room": name, "members": members}
        if more:
            reply["more"] = True
        return reply

    async def request_rooms(self, message: Message) -> Message:
        self.chatUser()
        names = set(await self.service.store.roomsWithHistory(MAX_LISTED))
        rooms = self.service.rooms
        names.update(name for name, room in rooms.items() if room.members)
        listed, more = _listed(sorted(names))
        reply: Message = {
            "type": "rooms",
            "rooms": [
                {
                    "room": name,
                    "members": len(rooms[name].members) if name in rooms else 0,
                }
                for name in listed
            ],
        }
        if more:
            reply["more"] = True
        return reply


def _listed(names: list[str]) -> tuple[list[str], bool]:
    """
    At most L{MAX_LISTED} of C{names}, and whether some were left out.
    """
    return names[:MAX_LISTED], len(names) > MAX_LISTED


def _fitting(
    room: str, rows: list[tuple[int, str, str, str]], budget: int, newest: bool
) -> tuple[list[Message], bool]:
    """
    The messages of C{rows} (oldest first) that fit in C{budget} bytes of
    JSON, and whether some were left out: the newest ones when C{newest}
    (what a join shows), else the oldest (what a catch-up reads next, then
    asks again from the last C{seq}).
    """
    messages = [_message(room, row) for row in rows]
    order = reversed(range(len(messages))) if newest else range(len(messages))
    kept = 0
    used = 0
    for i in order:
        used += len(encodeMessage(messages[i])) + 1
        if used > budget:
            break
        kept += 1
    if kept == len(messages):
        return messages, False
    if newest:
        return messages[len(messages) - kept :], True
    return messages[:kept], True


def _message(room: str, row: tuple[int, str, str, str]) -> Message:
    seq, sender, text, ts = row
    return {
        "type": "message",
        "room": room,
        "from": sender,
        "text": text,
        "ts": ts,
        "seq": seq,
    }


class ChatService(AuthService):
    """
    The auth service plus rooms, online users, the group commit and
    fan-out.  Its members are L{IChatClient}s: it tells them what happened
    and never knows how it reaches them.
    """

    sessionClass = ChatSession

    def __init__(
        self,
        store: Any,
        hasher: Any,
        context: ServerContext,
        *,
        messageRate: float = DEFAULT_MESSAGE_RATE,
        messageBurst: int = DEFAULT_MESSAGE_BURST,
        **settings: Any,
    ) -> None:
        super().__init__(store, hasher, context, **settings)
        clock = context.clock
        assert clock is not None, "AuthService checked it"
        self.clock: IReactorTime = clock
        self.users: dict[str, ChatUser] = {}
        self.rooms: dict[str, Room] = {}
        self._loading: dict[str, defer.Deferred[Room]] = {}
        self._batch: list[tuple[Room, str, str, defer.Deferred[None]]] = []
        self._flushCall: IDelayedCall | None = None
        self._flushing = False
        messages = RequestLimit(messageRate, messageBurst, bucket="messages")
        context.requestLimits["say"] = context.requestLimits["msg"] = messages
        #: However many senders there are, one user receives private
        #: messages no faster than a few members' worth of messages.
        self.inbox = TokenBucket(
            self.clock, burst=4 * messageBurst, rate=4 * messageRate
        )
        if context.stats is not None:
            context.stats.enableChat()

    @property
    def log(self) -> Logger:
        return self.context.log

    @property
    def stats(self) -> Any:
        return self.context.stats

    def makeRealm(self) -> Any:
        return ChatRealm(self)

    # -- users ------------------------------------------------------------------

    def attach(self, username: str, mind: IChatClient) -> ChatUser:
        user = self.users.get(username)
        if user is None:
            user = self.users[username] = ChatUser(username)
        user.minds.add(mind)
        return user

    def detach(self, user: ChatUser, mind: IChatClient) -> None:
        for name in list(mind.joined):
            self.leave(self.rooms[name], user, mind)
        user.minds.discard(mind)
        if not user.minds and self.users.get(user.username) is user:
            del self.users[user.username]

    # -- rooms ------------------------------------------------------------------

    async def room(self, name: str) -> Room:
        """
        The room called C{name}, its C{seq} loaded from the store.
        """
        room = self.rooms.get(name)
        if room is not None:
            return room
        loading = self._loading.get(name)
        if loading is None:
            loading = self._loading[name] = defer.ensureDeferred(self._load(name))
        return await _share(loading)

    async def _load(self, name: str) -> Room:
        try:
            lastSeq = await self.store.lastSeq(name)
        finally:
            self._loading.pop(name, None)
        room = self.rooms.setdefault(name, Room(name, lastSeq))
        return room

    def join(self, room: Room, user: ChatUser, mind: IChatClient) -> Room:
        """
        Add a connection to the room; the room joined (the one the service
        holds under that name, should C{room} have been forgotten while the
        caller waited).
        """
        room = self.rooms.setdefault(room.name, room)
        connections = room.members.setdefault(user.username, set())
        newcomer = not connections
        connections.add(mind)
        mind.joined.add(room.name)
        if newcomer:
            self.log.info(
                "{user} joined {room}",
                event=events.ROOM_JOINED,
                user=user.username,
                room=room.name,
            )
            self.broadcast(
                room,
                {
                    "type": "presence",
                    "room": room.name,
                    "user": user.username,
                    "event": "join",
                },
                exclude=mind,
            )
        return room

    def leave(self, room: Room, user: ChatUser, mind: IChatClient) -> bool:
        """
        Remove a connection; True if the user is no longer in the room.
        """
        mind.joined.discard(room.name)
        connections = room.members.get(user.username)
        if connections is None or mind not in connections:
            return False
        connections.discard(mind)
        if connections:
            return False
        del room.members[user.username]
        self._forgetIfUnused(room)
        self.log.info(
            "{user} left {room}",
            event=events.ROOM_LEFT,
            user=user.username,
            room=room.name,
        )
        self.broadcast(
            room,
            {
                "type": "presence",
                "room": room.name,
                "user": user.username,
                "event": "leave",
            },
        )
        return True

    # -- messages ---------------------------------------------------------------

    def _forgetIfUnused(self, room: Room) -> None:
        """
        Drop a room with no members and nothing in flight from memory (its
        seq is in the store), so rooms do not pile up.
        """
        if not room.members and not room.pending and self.rooms.get(room.name) is room:
            del self.rooms[room.name]

    def post(self, room: Room, sender: str, text: str) -> defer.Deferred[None]:
        """
        Queue a message for the next group commit; fires once it is
        committed and broadcast.
        """
        done: defer.Deferred[None] = defer.Deferred()
        room.pending += 1
        self._batch.append((room, sender, text, done))
        self._scheduleFlush()
        return done

    def _scheduleFlush(self) -> None:
        if self._flushCall is None and not self._flushing:
            self._flushCall = self.clock.callLater(0, self._flush)

    def _flush(self) -> None:
        self._flushCall = None
        batch, self._batch = self._batch, []
        if not batch:
            return
        self._flushing = True
        now = rfc3339(self.clock.seconds())
        rows = [(room.name, sender, text, now) for room, sender, text, _ in batch]
        # The store numbers the messages in the transaction that stores
        # them: no seq is ever given out that a failed commit takes back,
        # and any number of writers sharing the store stay gap-free.
        d = self.store.storeMessages(rows)

        def stored(outcome: tuple[list[int], float]) -> None:
            seqs, committedAt = outcome
            messages = []
            for (room, sender, text, done), seq in zip(batch, seqs, strict=True):
                room.lastSeq = max(room.lastSeq, seq)
                message = {
                    "type": "message",
                    "room": room.name,
                    "from": sender,
                    "text": text,
                    "ts": now,
                    "seq": seq,
                }
                messages.append((room, message, done))
            # One delivery per member per room for the whole batch, in seq
            # order: each message encoded once per wire format for all.
            byRoom: dict[str, tuple[Room, list[Message]]] = {}
            for room, message, _ in messages:
                byRoom.setdefault(room.name, (room, []))[1].append(message)
            stats = self.stats
            stats.chatMessagesStored += len(messages)
            for room, roomMessages in byRoom.values():
                outgoing = Outgoing(*roomMessages)
                members = 0
                for client in room.connections():
                    client.roomMessages(room.name, outgoing)
                    members += 1
                stats.deliveries["room"] += members * len(roomMessages)
                seconds = stats.deliverySeconds
                if seconds is not None:
                    seconds.observe(time.monotonic() - committedAt)
            for _, _, done in messages:
                done.callback(None)
            self._logStored(messages)

        def failed(failure: Any) -> None:
            # Nothing was committed, and nothing was numbered.
            for _, _, _, done in batch:
                done.errback(failure)

        def finished(_: object) -> None:
            for room, _sender, _text, _done in batch:
                room.pending -= 1
                self._forgetIfUnused(room)
            self._flushing = False
            if self._batch:
                self._scheduleFlush()

        d.addCallbacks(stored, failed)
        d.addBoth(finished)

    def _logStored(self, messages: list[tuple[Room, Message, Any]]) -> None:
        byRoom: dict[str, list[int]] = {}
        for room, message, _ in messages:
            byRoom.setdefault(room.name, []).append(message["seq"])
        for name, seqs in byRoom.items():
            self.log.info(
                "stored {count} message(s) in {room} (seq {first}-{last})",
                event=events.MESSAGE_STORED,
                room=name,
                count=len(seqs),
                first=seqs[0],
                last=seqs[-1],
            )

    def broadcast(
        self, room: Room, message: Message, exclude: IChatClient | None = None
    ) -> None:
        """
        Tell every member connection but C{exclude} about a presence
        change, one L{Outgoing} for all.
        """
        outgoing = Outgoing(message)
        for client in room.connections():
            if client is not exclude:
                client.presence(room.name, outgoing)
