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

Several nodes (issue 12, C{docs/cluster.md}) share one store, a bus and a
presence directory.  Every room a node has members in has a
L{RoomFeed}: this node's commits and the other nodes' publications go
through it alike, and it delivers each C{seq} once, in order, reading the
store when it sees a gap (the database is the record, the bus a hint).
Presence (C{who}, C{rooms}, joins and leaves) and the whereabouts of each
user's connections (for C{msg}) are the directory's (L{IPresence}); a lone
node keeps its own in memory, and behaves as it did before clustering.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from collections.abc import Callable
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
from twisted_lab.ports import HistoryRow, IChatClient, IPresence, IRequestChannel
from twisted_lab.services.accounts import canonicalUsername
from twisted_lab.services.auth import (
    AUTH_LIMITS,
    Account,
    AuthService,
    AuthSession,
    IAccount,
)
from twisted_lab.services.cluster import ClusterLink
from twisted_lab.services.context import ServerContext
from twisted_lab.services.limits import RequestLimit, TokenBucket
from twisted_lab.services.presence import LocalDirectory, NodePresence, Pair
from twisted_lab.services.roomfeed import HeldBudget, RoomFeed

DEFAULT_PORT = 9093
ROOM_PATTERN = re.compile(r"[a-z0-9_-]{1,32}")
NODE_PATTERN = re.compile(r"[!-~]{1,128}")
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
#: Seconds after a node subscribes to a room's channel before it reads the
#: room's store once more: what was published before the subscription took
#: effect on the bus server is found there.  A fallback: the store is read
#: when the bus confirms the subscription (IBus.subscribe fires), however
#: long that takes.
SUBSCRIBE_SETTLE = 0.5
#: Seconds a clean stop waits for the bus to take its last announcements.
STOP_GRACE = 2.0
#: Seconds a clean stop waits for the messages still coming to be committed
#: (and so published) before it stops publishing.
STOP_DRAIN = 10.0
#: Catch-up reads of the store running at once (a bus reconnection makes
#: every room of the node read).
CONCURRENT_READS = 4
#: Seconds a request waits for the presence directory (join, who, rooms,
#: msg) before it answers from this node's own members.  Once one wait has
#: run out, requests answer from this node at once until the directory
#: answers something again (a frozen Redis server holds no request).
DIRECTORY_DEADLINE = 1.0


#: Seconds a node reuses the directory's answer to a read (a room's
#: members, the rooms, their sizes), unless a presence change it knows of
#: came meanwhile: however many connections ask, one read per key per
#: period reaches Redis, and concurrent asks share one read.
DIRECTORY_CACHE = 1.0
#: Answers the cache keeps at most (a few KB each).
DIRECTORY_CACHE_KEYS = 1024


class DirectoryLate(Exception):
    """
    The presence directory did not answer within L{DIRECTORY_DEADLINE}.
    """


class _Read:
    __slots__ = ("answered", "result", "waiters")

    def __init__(self) -> None:
        self.answered: float | None = None
        self.result: Any = None
        self.waiters: list[defer.Deferred[Any]] = []


class DirectoryReads:
    """
    The node's reads of the presence directory, each shared: asked while
    the same read is in flight, it waits for that one; asked within
    C{ttl} seconds of its answer, it is answered from it.  A change of
    presence this node knows of (its own, or an event heard from the
    others) forgets the reads it may change; failures are not kept.
    """

    def __init__(
        self,
        clock: IReactorTime,
        ttl: float = DIRECTORY_CACHE,
        maxKeys: int = DIRECTORY_CACHE_KEYS,
    ) -> None:
        self.clock = clock
        self.ttl = ttl
        self.maxKeys = maxKeys
        self._reads: OrderedDict[tuple[Any, ...], _Read] = OrderedDict()
        #: Reads sent to the directory (tests, metrics).
        self.sent = 0

    def get(
        self, key: tuple[Any, ...], read: Callable[[], defer.Deferred[Any]]
    ) -> defer.Deferred[Any]:
        entry = self._reads.get(key)
        if entry is not None:
            if entry.answered is None:
                waiter: defer.Deferred[Any] = defer.Deferred()
                entry.waiters.append(waiter)
                return waiter
            if self.clock.seconds() - entry.answered < self.ttl:
                return defer.succeed(entry.result)
            del self._reads[key]
        entry = self._reads[key] = _Read()
        while len(self._reads) > self.maxKeys:
            self._reads.popitem(last=False)
        self.sent += 1
        first: defer.Deferred[Any] = defer.Deferred()
        entry.waiters.append(first)

        def done(result: Any) -> None:
            if isinstance(result, Failure) or self._reads.get(key) is not entry:
                if self._reads.get(key) is entry:
                    del self._reads[key]
            else:
                entry.answered = self.clock.seconds()
                entry.result = result
            waiters, entry.waiters = entry.waiters, []
            for waiter in waiters:
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(result)

        defer.maybeDeferred(read).addBoth(done)
        return first

    def changed(self, room: str) -> None:
        """
        Someone joined or left C{room}: its members, the rooms and their
        sizes are read again.
        """
        for key in list(self._reads):
            if key[0] in ("rooms", "sizes") or key == ("members", room):
                del self._reads[key]


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
    One room as this node holds it: its members here (users, each with
    their connections) and its feed (what was delivered to them).
    """

    feed: RoomFeed

    def __init__(self, name: str) -> None:
        self.name = name
        self.members: dict[str, set[IChatClient]] = {}
        #: Messages posted and not yet committed (or failed): the room is
        #: not forgotten while there are any (their broadcast needs it).
        self.pending = 0

    @property
    def lastSeq(self) -> int:
        """
        The last C{seq} delivered to the members here.
        """
        return self.feed.delivered

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
            service.forgetIfUnused(room)
            raise RequestError(ErrorCode.NOT_AUTHENTICATED, "logged out meanwhile")
        room, announced = service.join(room, user, self)
        lastSeq = room.lastSeq
        try:
            await service.withinDeadline(announced)
        except DirectoryLate:
            pass  # members from this node; the join is announced when it answers
        rows = await self.service.store.recentHistory(room.name, HISTORY_ON_JOIN)
        count, members = await service.roomMembers(room.name)
        moreMembers = count > len(members)
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

    async def request_msg(self, message: Message) -> Message:
        user = self.chatUser()
        text = validText(message["text"])
        try:
            to = canonicalUsername(message["to"])
        except RequestError:
            to = ""
        service = self.service
        wait, nodes = await service.route(to) if to else (0.0, [])
        if not nodes:
            raise RequestError(ErrorCode.NO_SUCH_USER, "no such user is online")
        if wait:
            raise self.rateLimited(wait, f"private messages to {to}")
        service.sendPrivate(
            to,
            nodes,
            {"from": user.username, "text": text, "ts": rfc3339(self.context.now())},
        )
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

    async def request_who(self, message: Message) -> Message:
        self.chatUser()
        name = validRoom(message["room"])
        count, members = await self.service.roomMembers(name)
        reply: Message = {"type": "members", "room": name, "members": members}
        if count > len(members):
            reply["more"] = True
        return reply

    async def request_rooms(self, message: Message) -> Message:
        self.chatUser()
        service = self.service
        names = set(await service.store.roomsWithHistory(MAX_LISTED))
        names.update(await service.roomsWithMembers())
        listed, more = _listed(sorted(names))
        sizes = await service.roomSizes(listed)
        reply: Message = {
            "type": "rooms",
            "rooms": [
                {"room": name, "members": size}
                for name, size in zip(listed, sizes, strict=True)
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

    @param presence: the cluster's presence directory, this node's view
        of it; with one, the service publishes on and hears from its bus
        (C{bus}, required then).  Without, the node is alone: its directory
        is in its own memory and nothing is published.
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
        presence: IPresence | None = None,
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
        #: messages no faster than a few members' worth of messages (in a
        #: cluster, the directory keeps this bucket for all nodes).
        self.inbox = TokenBucket(
            self.clock, burst=4 * messageBurst, rate=4 * messageRate
        )
        if not self.node:
            self.node = f"chat-{id(self):x}"
        #: Out-of-order messages held by all rooms' feeds, together.
        self.heldBudget = HeldBudget()
        self._reads = defer.DeferredSemaphore(CONCURRENT_READS)
        self.link: ClusterLink | None = None
        #: The node is leaving the cluster: its own members' departures
        #: are announced although they are still connected.
        self._leaving = False
        self._flushWaiters: list[defer.Deferred[None]] = []
        self.directoryReads = DirectoryReads(self.clock)
        #: The directory missed a request's deadline and has not answered
        #: since: requests answer from this node at once.
        self._directoryLate = False
        if presence is None:
            presence = LocalDirectory(self.clock).presence(self.node)
        else:
            if self.bus is None:
                raise TypeError("a chat node in a cluster needs its bus")
            if not NODE_PATTERN.fullmatch(self.node):
                # It heads every publication, up to a newline, and names
                # the node's channel and keys.
                raise ValueError(
                    f"a node's name is 1 to 128 printable ASCII characters"
                    f" without spaces, not {self.node!r}"
                )
            self.link = ClusterLink(
                self.bus,
                self.node,
                self.clock,
                self,
                self._admit,
                context.log,
                ownPresence=bool(getattr(presence, "announces", False)),
            )
        self.presence: IPresence = presence
        #: The directory publishes every presence event itself, from the
        #: operation that made the change, so that all nodes hear one
        #: user's joins and leaves in the one order the directory made
        #: them; this node's members hear them from the bus like the
        #: others'.  Else (a lone node) the node announces what it is told.
        self._directoryAnnounces = bool(getattr(presence, "announces", False))
        presence.watch(self._departed, self._nodesGone)
        if context.stats is not None:
            context.stats.enableChat()

    @property
    def log(self) -> Logger:
        return self.context.log

    @property
    def stats(self) -> Any:
        return self.context.stats

    def _admit(self, event: str) -> bool:
        return self.context.logBudget.admit(event)

    def makeRealm(self) -> Any:
        return ChatRealm(self)

    # -- the cluster: start and stop (the wiring calls these) -------------------

    def startCluster(self) -> None:
        """
        Begin the presence heartbeats (after the bus has started).
        """
        self.presence.start()

    def stopCluster(self) -> defer.Deferred[None]:
        """
        Leave the cluster's directory: this node's members leave it (the
        other nodes hear their leaves at once).  The node still publishes
        what it commits (its connections are served until the server has
        closed them): L{closeLink}, after the server, ends that.
        """
        self._leaving = True
        return self.presence.stop()

    def closeLink(self) -> defer.Deferred[None]:
        """
        Publish and hear nothing more, once the messages still coming (the
        group commit in flight, and those queued behind it) have been
        committed and published, and the bus has answered its last
        publications (each wait bounded: L{STOP_DRAIN}, L{STOP_GRACE}).
        Called once the server has closed its connections, before the bus
        stops: a message committed during a clean stop reaches the others.
        """
        link = self.link
        if link is None or link.closed:
            return defer.succeed(None)

        async def closing() -> None:
            await self.whenFlushed(STOP_DRAIN)
            await link.whenSent(STOP_GRACE)
            link.close()

        return defer.ensureDeferred(closing())

    def whenFlushed(self, timeout: float) -> defer.Deferred[None]:
        """
        Fires once no message waits for or is in a group commit, or after
        C{timeout} seconds.
        """
        if not self._batch and not self._flushing:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._flushWaiters.append(waiter)
        waiter.addTimeout(timeout, self.clock, onTimeoutCancel=lambda *_: None)
        return waiter

    def _flushed(self) -> None:
        if self._batch or self._flushing:
            return
        waiters, self._flushWaiters = self._flushWaiters, []
        for waiter in waiters:
            if not waiter.called:  # (else it timed out)
                waiter.callback(None)

    # -- users ------------------------------------------------------------------

    def attach(self, username: str, mind: IChatClient) -> ChatUser:
        user = self.users.get(username)
        if user is None:
            user = self.users[username] = ChatUser(username)
        if not user.minds:
            self._tell(self.presence.attached(username))
        user.minds.add(mind)
        return user

    def detach(self, user: ChatUser, mind: IChatClient) -> None:
        for name in list(mind.joined):
            self.leave(self.rooms[name], user, mind)
        user.minds.discard(mind)
        if not user.minds and self.users.get(user.username) is user:
            del self.users[user.username]
            self._tell(self.presence.detached(user.username))

    def _tell(self, change: defer.Deferred[Any]) -> None:
        """
        A change of this node's presence, not waited for: a failure is
        logged (the directory writes the node's share again later).
        """
        change.addErrback(self._presenceFailed, "update the presence directory")

    def _presenceFailed(self, failure: Any, what: str) -> None:
        if self._admit(events.PRESENCE_FAILED):
            self.log.warn(
                "node {node}: cannot {what} ({reason}); answering from this node alone",
                event=events.PRESENCE_FAILED,
                node=self.node,
                what=what,
                reason=failure.getErrorMessage(),
            )

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
        inEffect = False
        if self.link is not None:
            # Subscribed before the last seq is read: what is published
            # once the subscription is in effect is heard; what was
            # published before is in the store: read now if it was in
            # effect before this read, else once the bus says it is.
            inEffect = self.link.watchRoom(name).called
        try:
            lastSeq = await self.store.lastSeq(name)
        except BaseException:
            if self.link is not None and name not in self.rooms:
                self.link.unwatchRoom(name)
            raise
        finally:
            self._loading.pop(name, None)
        room = self.rooms.get(name)
        if room is None:
            room = self._newRoom(name, lastSeq, inEffect)
        return room

    def _newRoom(self, name: str, lastSeq: int, inEffect: bool = False) -> Room:
        """
        A room held here, its feed delivered up to C{lastSeq}; with a link,
        its channel watched.  C{inEffect}: the subscription was in effect
        before C{lastSeq} was read (nothing published before it was missed).
        """
        room = self.rooms[name] = Room(name)
        room.feed = RoomFeed(
            name,
            lastSeq,
            clock=self.clock,
            fetch=self._read,
            deliver=lambda rows: self._deliverRoom(room, rows),
            budget=self.heldBudget,
            log=self.log,
            admit=self._admit,
        )
        if self.link is not None:
            subscribed = self.link.watchRoom(name)
            if not inEffect:
                # What was published before the subscription took effect
                # is read from the store once it has (the bus says when).
                feed = room.feed
                subscribed.addCallback(lambda _: feed.catchUp())
            # And in any case a moment later (a bus that cannot tell).
            room.feed.catchUpLater(SUBSCRIBE_SETTLE)
        return room

    def _read(self, room: str, after: int, limit: int) -> Any:
        return self._reads.run(self.store.history, room, after, limit)

    def join(
        self, room: Room, user: ChatUser, mind: IChatClient
    ) -> tuple[Room, defer.Deferred[None]]:
        """
        Add a connection to the room.  Returns the room joined (the one the
        service holds under that name, should C{room} have been forgotten
        while the caller waited) and a Deferred that fires once the
        directory has answered (and a join, if it is news, announced).
        """
        held = self.rooms.get(room.name)
        if held is None:
            held = self._newRoom(room.name, room.feed.delivered)
        room = held
        connections = room.members.setdefault(user.username, set())
        newcomer = not connections
        connections.add(mind)
        mind.joined.add(room.name)
        if not newcomer:
            return room, defer.succeed(None)
        self.log.info(
            "{user} joined {room}",
            event=events.ROOM_JOINED,
            user=user.username,
            room=room.name,
        )
        name, username = room.name, user.username

        def answered(new: bool) -> None:
            if new:
                self.directoryReads.changed(name)
            if new and not self._directoryAnnounces:
                self._announce(name, username, "join", exclude=mind)

        def failed(failure: Any) -> None:
            self._presenceFailed(failure, "record a join")
            self._announce(name, username, "join", exclude=mind, local=True)

        announcing = self.presence.joined(name, username)
        return room, announcing.addCallbacks(answered, failed)

    def leave(self, room: Room, user: ChatUser, mind: IChatClient) -> bool:
        """
        Remove a connection; True if the user is no longer in the room
        (here: the directory says whether it is everywhere).
        """
        mind.joined.discard(room.name)
        connections = room.members.get(user.username)
        if connections is None or mind not in connections:
            return False
        connections.discard(mind)
        if connections:
            return False
        del room.members[user.username]
        self.log.info(
            "{user} left {room}",
            event=events.ROOM_LEFT,
            user=user.username,
            room=room.name,
        )
        name, username = room.name, user.username

        def answered(gone: bool) -> None:
            if gone:
                self.directoryReads.changed(name)
            if gone and not self._directoryAnnounces:
                self._announce(name, username, "leave")

        def failed(failure: Any) -> None:
            self._presenceFailed(failure, "record a leave")
            self._announce(name, username, "leave", local=True)

        self.presence.left(name, username).addCallbacks(answered, failed)
        self.forgetIfUnused(room)
        return True

    def _announce(
        self,
        room: str,
        user: str,
        event: str,
        exclude: IChatClient | None = None,
        local: bool = False,
    ) -> None:
        """
        Tell the members of C{room}, here and (unless C{local}) on the
        other nodes, that C{user} joined or left.
        """
        held = self.rooms.get(room)
        if held is not None:
            self.broadcast(
                held,
                {"type": "presence", "room": room, "user": user, "event": event},
                exclude=exclude,
            )
        if self.link is not None and not local:
            self.link.publishPresence(room, user, event)

    def forgetIfUnused(self, room: Room) -> None:
        """
        Drop a room with no members and nothing in flight from memory (its
        seq is in the store), so rooms do not pile up; stop hearing it.
        """
        if not room.members and not room.pending and self.rooms.get(room.name) is room:
            del self.rooms[room.name]
            room.feed.close()
            if self.link is not None:
                self.link.unwatchRoom(room.name)

    def withinDeadline(self, asking: defer.Deferred[Any]) -> defer.Deferred[Any]:
        """
        What the directory answers to C{asking}, or L{DirectoryLate} once
        L{DIRECTORY_DEADLINE} has passed (at once while the directory is
        late: it missed a deadline and has not answered anything since).
        C{asking} is not cancelled (a change of the share still reaches
        the directory, and its callbacks still run): only the request
        stops waiting for it (what it answers after is dropped).
        """
        answer: defer.Deferred[Any] = defer.Deferred()
        waiting = False

        def answered(result: Any) -> None:
            if waiting:  # (an answer at once may be a cached one)
                self._directoryLate = False
            if answer.called:
                return
            if isinstance(result, Failure):
                answer.errback(result)
            else:
                answer.callback(result)

        asking.addBoth(answered)
        if answer.called:
            return answer
        waiting = True
        if self._directoryLate:
            answer.errback(DirectoryLate("the presence directory is late"))
            return answer

        def late() -> None:
            self._directoryLate = True
            if not answer.called:
                answer.errback(
                    DirectoryLate(
                        f"no answer from the presence directory in"
                        f" {DIRECTORY_DEADLINE:g} s"
                    )
                )

        timer = self.clock.callLater(DIRECTORY_DEADLINE, late)

        def stopTimer(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        return answer.addBoth(stopTimer)

    def _members(self, name: str) -> defer.Deferred[tuple[int, list[str]]]:
        return self.directoryReads.get(
            ("members", name), lambda: self.presence.members(name, MAX_LISTED)
        )

    async def roomMembers(self, name: str) -> tuple[int, list[str]]:
        """
        How many users are in room C{name}, cluster-wide, and the first
        L{MAX_LISTED} of them (this node's alone if the directory cannot
        be reached).
        """
        try:
            return await self.withinDeadline(self._members(name))
        except Exception as e:  # noqa: BLE001 (the directory is a service)
            self._presenceFailed(Failure(e), "list the members of a room")
        room = self.rooms.get(name)
        names = sorted(room.members) if room is not None else []
        return len(names), names[:MAX_LISTED]

    async def roomsWithMembers(self) -> list[str]:
        try:
            return await self.withinDeadline(
                self.directoryReads.get(
                    ("rooms",), lambda: self.presence.rooms(MAX_LISTED)
                )
            )
        except Exception as e:  # noqa: BLE001
            self._presenceFailed(Failure(e), "list the rooms")
        return [name for name, room in self.rooms.items() if room.members]

    async def roomSizes(self, names: list[str]) -> list[int]:
        try:
            return await self.withinDeadline(
                self.directoryReads.get(
                    ("sizes", *names), lambda: self.presence.sizes(names)
                )
            )
        except Exception as e:  # noqa: BLE001
            self._presenceFailed(Failure(e), "count the members of rooms")
        rooms = self.rooms
        return [len(rooms[n].members) if n in rooms else 0 for n in names]

    # -- private messages --------------------------------------------------------

    async def route(self, to: str) -> tuple[float, list[str]]:
        """
        The seconds to wait (inbox full) and the nodes holding user C{to}'s
        connections.  If the directory cannot be reached, only a user
        connected here can be reached.
        """
        inbox = self.inbox
        try:
            return await self.withinDeadline(
                self.presence.route(to, inbox.rate, inbox.burst)
            )
        except Exception as e:  # noqa: BLE001
            self._presenceFailed(Failure(e), "find a user's nodes")
        target = self.users.get(to)
        if target is not None and target.minds:
            return inbox.take(to), [self.node]
        raise RequestError(
            ErrorCode.INTERNAL_ERROR,
            "the other chat nodes cannot be reached now; try again",
        )

    def sendPrivate(self, to: str, nodes: list[str], message: dict[str, Any]) -> None:
        """
        Deliver a private message to the connections of C{to} here, and
        send it to the other nodes that hold some.
        """
        for node in nodes:
            if node == self.node:
                self.heardPrivate(to, message)
            elif self.link is not None:
                self.link.sendPrivate(node, {"to": to, **message})

    # -- what the other nodes say (ClusterListener) ---------------------------------

    def heardMessages(self, room: str, rows: list[HistoryRow]) -> None:
        held = self.rooms.get(room)
        if held is not None:
            held.feed.offer(rows)

    def heardPosition(self, room: str, seq: int) -> None:
        held = self.rooms.get(room)
        if held is not None:
            held.feed.heard(seq)

    def heardPresence(self, room: str, user: str, event: str) -> None:
        """
        A presence event from the bus (this node's own too, when the
        directory publishes them): told to every member connection here
        but the user's own (a user is not told of their own join).
        """
        self.directoryReads.changed(room)
        held = self.rooms.get(room)
        if held is None:
            return
        own = held.members.get(user, set())
        outgoing = Outgoing(
            {"type": "presence", "room": room, "user": user, "event": event}
        )
        for client in held.connections():
            if client not in own:
                client.presence(room, outgoing)

    def heardPrivate(self, to: str, message: dict[str, Any]) -> None:
        target = self.users.get(to)
        if target is None:
            return  # gone meanwhile: as if it had left a moment earlier
        outgoing = Outgoing({"type": "private", **message})
        minds = list(target.minds)
        for mind in minds:
            mind.privateMessage(outgoing)
        self.stats.deliveries["private"] += len(minds)

    def busReconnected(self) -> None:
        """
        Publications may have been lost while the bus was away: every room
        reads the store.  And the directory may have come back older (a
        failover to a replica that was behind, a restart from a snapshot)
        with this node's entry in it, so that nothing else would tell the
        node to write its share again: it does at its next heartbeat.
        """
        if isinstance(self.presence, NodePresence):
            self.presence.suspect()
        self._catchUpAll("the bus reconnected")

    def _nodesGone(self, nodes: set[str]) -> None:
        """
        Nodes stopped being alive: one may have committed messages it never
        published, so every room reads the store.
        """
        for node in sorted(nodes):
            self.log.warn(
                "node {node} is gone",
                event=events.NODE_GONE,
                node=node,
                by=self.node,
            )
        self._catchUpAll(f"node {', '.join(sorted(nodes))} is gone")

    def _catchUpAll(self, why: str) -> None:
        self.log.info(
            "node {node}: {rooms} room(s) catch up from the store ({why})",
            event=events.CLUSTER_CATCH_UP,
            node=self.node,
            rooms=len(self.rooms),
            why=why,
        )
        for room in list(self.rooms.values()):
            room.feed.catchUp()

    def _departed(self, pairs: list[Pair]) -> None:
        """
        Users found gone from rooms without a leave (their node died, or a
        resync): announce their leaves (unless the directory has).
        """
        for room, _ in pairs:
            self.directoryReads.changed(room)
        if self._directoryAnnounces:
            return
        for room, user in pairs:
            held = self.rooms.get(room)
            if held is not None and user in held.members and not self._leaving:
                continue  # back here meanwhile
            self._announce(room, user, "leave")

    # -- messages ---------------------------------------------------------------

    def post(self, room: Room, sender: str, text: str) -> defer.Deferred[None]:
        """
        Queue a message for the next group commit; fires once it is
        committed (and, unless the room is catching up, delivered).
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
            byRoom: dict[str, tuple[Room, list[HistoryRow]]] = {}
            for (room, sender, text, _), seq in zip(batch, seqs, strict=True):
                byRoom.setdefault(room.name, (room, []))[1].append(
                    (seq, sender, text, now)
                )
            stats = self.stats
            stats.chatMessagesStored += len(batch)
            for room, roomRows in byRoom.values():
                # One delivery per member per room for the whole batch, in
                # seq order, through the feed that also takes the other
                # nodes' messages: one rule for the order.
                room.feed.offer(roomRows)
                if self.link is not None:
                    self.link.publishMessages(room.name, roomRows)
                seconds = stats.deliverySeconds
                if seconds is not None:
                    seconds.observe(time.monotonic() - committedAt)
            for _, _, _, done in batch:
                done.callback(None)
            self._logStored(byRoom)

        def failed(failure: Any) -> None:
            # Nothing was committed, and nothing was numbered.
            for _, _, _, done in batch:
                done.errback(failure)

        def finished(_: object) -> None:
            for room, _sender, _text, _done in batch:
                room.pending -= 1
                self.forgetIfUnused(room)
            self._flushing = False
            if self._batch:
                self._scheduleFlush()
            else:
                self._flushed()

        d.addCallbacks(stored, failed)
        d.addBoth(finished)

    def _deliverRoom(self, room: Room, rows: list[HistoryRow]) -> None:
        """
        Committed messages of C{room}, in seq order, each once (the feed's
        word): to every member connection here, encoded once for all.
        """
        outgoing = Outgoing(*(_message(room.name, row) for row in rows))
        members = 0
        for client in room.connections():
            client.roomMessages(room.name, outgoing)
            members += 1
        self.stats.deliveries["room"] += members * len(rows)

    def _logStored(self, byRoom: dict[str, tuple[Room, list[HistoryRow]]]) -> None:
        for name, (_, rows) in byRoom.items():
            self.log.info(
                "stored {count} message(s) in {room} (seq {first}-{last})",
                event=events.MESSAGE_STORED,
                room=name,
                count=len(rows),
                first=rows[0][0],
                last=rows[-1][0],
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
