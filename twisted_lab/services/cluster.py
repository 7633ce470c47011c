"""
The chat service's side of the bus between nodes: what a node publishes
after it commits messages or sees a member come or go, and what it hears
from the others.

Channels (short ASCII names; room names are C{[a-z0-9_-]{1,32}}):
  - C{netlab:chat:room:ROOM}: the committed messages of ROOM, positions
    (the last C{seq} a node committed there, when its publication of the
    messages failed) and presence changes.  A node subscribes while it has
    members in the room, so a publication reaches only the nodes that
    deliver it (Redis matches a channel by a hash lookup: many channels
    cost nothing per publication, only a SUBSCRIBE when a room first gets
    a member on a node).
  - C{netlab:chat:node:NODE}: private messages for the users of NODE.

A payload is the sending node's name, a newline, and one JSON object
(ASCII).  A node drops its own publications unread: it delivered them to
its members before publishing.  Publications of a batch are at most
L{MAX_PUBLICATION} bytes each (a larger batch is split, in order).

Publishing never fails nor delays the request that caused it: the bus is a
hint.  When a room's publication fails (the bus is down or overloaded), the
room's last C{seq} is remembered (at most L{MAX_UNANNOUNCED} rooms) and
announced as a position every L{RETRY_ANNOUNCE} seconds until the bus
takes it; the other nodes then read the messages from the store.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from twisted_lab.codecs import events
from twisted_lab.ports import HistoryRow, IBus

ROOM_CHANNEL = "netlab:chat:room:"
NODE_CHANNEL = "netlab:chat:node:"
#: Bytes of one publication at most: a batch is split.
MAX_PUBLICATION = 64 * 1024
#: Rooms whose last publication failed that a node remembers.
MAX_UNANNOUNCED = 10_000
#: Seconds between attempts to announce what could not be published.
RETRY_ANNOUNCE = 1.0


#: How a presence event's JSON starts (after the origin and its newline).
PRESENCE_HEAD = b'{"kind":"presence",'


def presencePayload(origin: str, room: str, user: str, event: str) -> bytes:
    """
    The publication of a presence event (what the directory's scripts
    write too, byte for byte).
    """
    message = {"kind": "presence", "room": room, "user": user, "event": event}
    body = json.dumps(message, separators=(",", ":")).encode("ascii")
    return origin.encode("utf-8") + b"\n" + body


class ClusterListener(Protocol):
    """
    What the chat service does with what it hears from the other nodes.
    """

    def heardMessages(self, room: str, rows: list[HistoryRow]) -> None: ...

    def heardPosition(self, room: str, seq: int) -> None: ...

    def heardPresence(self, room: str, user: str, event: str) -> None: ...

    def heardPrivate(self, to: str, message: dict[str, Any]) -> None: ...

    def busReconnected(self) -> None: ...


class _Subscription:
    """
    One room's subscription as a link sees it: in effect yet, or not.
    """

    def __init__(self) -> None:
        self.effective = False
        self._waiters: list[defer.Deferred[None]] = []

    def inEffect(self, _: object) -> None:
        self.effective = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def when(self) -> defer.Deferred[None]:
        if self.effective:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._waiters.append(waiter)
        return waiter


class MalformedPayload(ValueError):
    """
    A publication this node cannot read.
    """


def _rowJSON(row: HistoryRow) -> bytes:
    return json.dumps(list(row), separators=(",", ":")).encode("ascii")


def _checkedRows(value: Any) -> list[HistoryRow]:
    if not isinstance(value, list):
        raise MalformedPayload("rows is not a list")
    rows = []
    for row in value:
        if (
            not isinstance(row, list)
            or len(row) != 4
            or type(row[0]) is not int
            or not all(isinstance(field, str) for field in row[1:])
        ):
            raise MalformedPayload("a row is not [seq, from, text, ts]")
        rows.append((row[0], row[1], row[2], row[3]))
    return rows


def _text(message: dict[str, Any], key: str) -> str:
    value = message.get(key)
    if not isinstance(value, str):
        raise MalformedPayload(f"{key} is not a string")
    return value


class ClusterLink:
    """
    One node's publications and subscriptions on the bus.
    """

    log = Logger()

    def __init__(
        self,
        bus: IBus,
        node: str,
        clock: IReactorTime,
        listener: ClusterListener,
        admit: Callable[[str], bool] = lambda event: True,
        log: Logger | None = None,
        ownPresence: bool = False,
    ) -> None:
        if log is not None:
            self.log = log
        self.bus = bus
        self.node = node
        self.clock = clock
        self.listener = listener
        #: Whether an event may be logged now (the server's log budget).
        self.admit = admit
        self._origin = node.encode("utf-8") + b"\n"
        #: This node's presence events are heard too (the directory
        #: publishes them, in its order, for every node alike).
        self._ownPresence = self._origin + PRESENCE_HEAD if ownPresence else None
        self._unannounced: dict[str, int] = {}
        self._retry: IDelayedCall | None = None
        #: Rooms watched: whether their subscription is in effect, and who
        #: waits for it.
        self._rooms: dict[str, _Subscription] = {}
        #: Publications handed to the bus and not yet answered.
        self._inFlight: set[defer.Deferred[Any]] = set()
        self._drained: list[defer.Deferred[None]] = []
        self.closed = False
        #: Publications sent and failed, payloads refused (metrics, tests).
        self.published = 0
        self.failed = 0
        self.refused = 0
        #: Rooms' positions not remembered for announcement (the bound).
        self.dropped = 0
        bus.subscribe(NODE_CHANNEL + node, self._received)
        bus.onReconnect(self._reconnected)

    # -- subscriptions ---------------------------------------------------------

    def watchRoom(self, room: str) -> defer.Deferred[None]:
        """
        This node has members in C{room}: hear its publications.  Fires
        once the subscription is in effect on the bus (what was published
        before is to be read from the store then); never, if the room is
        unwatched first or the bus cannot tell.
        """
        if self.closed:
            return defer.Deferred()
        subscription = self._rooms.get(room)
        if subscription is None:
            subscription = self._rooms[room] = _Subscription()
            try:
                subscribing = self.bus.subscribe(ROOM_CHANNEL + room, self._received)
            except Exception as e:  # noqa: BLE001 (the settle timer covers it)
                subscribing = defer.fail(e)
            if isinstance(subscribing, defer.Deferred):
                subscribing.addCallbacks(subscription.inEffect, lambda _: None)
            else:  # a bus that does not say: as in effect at once
                subscription.inEffect(None)
        return subscription.when()

    def unwatchRoom(self, room: str) -> None:
        if self._rooms.pop(room, None) is not None:
            self.bus.unsubscribe(ROOM_CHANNEL + room, self._received)

    def close(self) -> None:
        """
        Publish nothing more, hear nothing more.
        """
        self.closed = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        for room in list(self._rooms):
            self.unwatchRoom(room)
        self.bus.unsubscribe(NODE_CHANNEL + self.node, self._received)

    # -- publishing -------------------------------------------------------------

    def publishMessages(self, room: str, rows: list[HistoryRow]) -> None:
        """
        Tell the other nodes of C{rows}, just committed here (in C{seq}
        order), in publications of at most L{MAX_PUBLICATION} bytes.
        """
        if self.closed or not rows:
            return
        head = b'{"kind":"messages","room":' + json.dumps(room).encode("ascii")
        head += b',"rows":['
        empty = len(self._origin) + len(head) + 2
        chunk: list[bytes] = []
        size = empty
        last = rows[0][0]
        for row in rows:
            encoded = _rowJSON(row)
            if chunk and size + len(encoded) + 1 > MAX_PUBLICATION:
                self._publishRows(room, head, chunk, last)
                chunk, size = [], empty
            chunk.append(encoded)
            size += len(encoded) + 1
            last = row[0]
        self._publishRows(room, head, chunk, last)

    def _publishRows(
        self, room: str, head: bytes, chunk: list[bytes], last: int
    ) -> None:
        payload = head + b",".join(chunk) + b"]}"
        publishing = self._publish(ROOM_CHANNEL + room, payload)
        publishing.addCallbacks(
            lambda _: self._announced(room, last),
            lambda failure: self._notAnnounced(room, last, failure),
        )

    def publishPresence(self, room: str, user: str, event: str) -> None:
        """
        Announce a presence change (when the directory does not: a lone
        directory in process).
        """
        if self.closed:
            return
        payload = presencePayload(self.node, room, user, event)
        publishing = self._publish(ROOM_CHANNEL + room, payload[len(self._origin) :])
        publishing.addErrback(self._lost, "presence")

    def sendPrivate(self, node: str, message: dict[str, Any]) -> None:
        """
        A private message for a user with connections on C{node}.
        """
        self._send(NODE_CHANNEL + node, {"kind": "private", **message}, "private")

    def _send(self, channel: str, message: dict[str, Any], what: str) -> None:
        if self.closed:
            return
        payload = json.dumps(message, separators=(",", ":")).encode("ascii")
        self._publish(channel, payload).addErrback(self._lost, what)

    def _publish(self, channel: str, payload: bytes) -> defer.Deferred[Any]:
        self.published += 1
        try:
            publishing = self.bus.publish(channel, self._origin + payload)
        except Exception as e:  # noqa: BLE001 (a hint: never the caller's failure)
            return defer.fail(e)
        if not publishing.called:
            self._inFlight.add(publishing)
            publishing.addBoth(self._answered, publishing)
        return publishing

    def _answered(self, result: Any, publishing: defer.Deferred[Any]) -> Any:
        self._inFlight.discard(publishing)
        if not self._inFlight:
            waiters, self._drained = self._drained, []
            for waiter in waiters:
                if not waiter.called:  # (else it timed out)
                    waiter.callback(None)
        return result

    def whenSent(self, timeout: float) -> defer.Deferred[None]:
        """
        Fires once every publication made so far has been answered by the
        bus, or after C{timeout} seconds (a clean stop waits for its last
        announcements before the bus closes).
        """
        if not self._inFlight:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._drained.append(waiter)
        waiter.addTimeout(timeout, self.clock, onTimeoutCancel=lambda *_: None)
        return waiter

    def _lost(self, failure: Any, what: str) -> None:
        self.failed += 1
        if self.admit(events.BUS_PUBLISH_FAILED):
            self.log.warn(
                "node {node}: a {what} publication was lost ({reason})",
                event=events.BUS_PUBLISH_FAILED,
                node=self.node,
                what=what,
                reason=failure.getErrorMessage(),
            )

    # -- what could not be published -------------------------------------------------

    def _announced(self, room: str, seq: int) -> None:
        if self._unannounced.get(room, seq + 1) <= seq:
            del self._unannounced[room]

    def _notAnnounced(self, room: str, seq: int, failure: Any) -> None:
        self._lost(failure, "messages")
        if self.closed:
            return
        if room in self._unannounced or len(self._unannounced) < MAX_UNANNOUNCED:
            self._unannounced[room] = max(seq, self._unannounced.get(room, 0))
        else:
            self.dropped += 1
            if self.admit(events.BUS_POSITION_DROPPED):
                self.log.warn(
                    "node {node}: {room}'s seq {seq} is not remembered to be"
                    " announced ({rooms} rooms already are): the others read it"
                    " at the room's next message or catch-up",
                    event=events.BUS_POSITION_DROPPED,
                    node=self.node,
                    room=room,
                    seq=seq,
                    rooms=MAX_UNANNOUNCED,
                )
        self._scheduleRetry()

    def _scheduleRetry(self) -> None:
        if self._retry is None and self._unannounced and not self.closed:
            self._retry = self.clock.callLater(RETRY_ANNOUNCE, self._announceAgain)

    def _announceAgain(self) -> None:
        """
        Announce the last C{seq} of every room whose publication failed.
        """
        self._retry = None
        for room, seq in list(self._unannounced.items()):
            message = {"kind": "position", "room": room, "seq": seq}
            payload = json.dumps(message, separators=(",", ":")).encode("ascii")
            publishing = self._publish(ROOM_CHANNEL + room, payload)
            publishing.addCallbacks(
                lambda _, room=room, seq=seq: self._announced(room, seq),
                self._announceFailed,
            )

    def _announceFailed(self, failure: Any) -> None:
        self._lost(failure, "position")
        self._scheduleRetry()

    @property
    def unannounced(self) -> dict[str, int]:
        return dict(self._unannounced)

    # -- hearing ---------------------------------------------------------------------

    def _reconnected(self) -> None:
        self.listener.busReconnected()
        self._scheduleRetry()

    def _received(self, payload: bytes) -> None:
        if payload.startswith(self._origin) and not (
            self._ownPresence is not None and payload.startswith(self._ownPresence)
        ):
            return  # ours: delivered here before it was published
        try:
            self._dispatch(payload)
        except (MalformedPayload, ValueError, UnicodeDecodeError) as e:
            self.refused += 1
            if self.admit(events.BUS_PAYLOAD_REFUSED):
                self.log.warn(
                    "node {node}: a bus payload was refused ({reason})",
                    event=events.BUS_PAYLOAD_REFUSED,
                    node=self.node,
                    reason=str(e),
                )

    def _dispatch(self, payload: bytes) -> None:
        _, newline, body = payload.partition(b"\n")
        if not newline:
            raise MalformedPayload("no origin")
        message = json.loads(body)
        if not isinstance(message, dict):
            raise MalformedPayload("not an object")
        kind = message.get("kind")
        listener = self.listener
        if kind == "messages":
            listener.heardMessages(
                _text(message, "room"), _checkedRows(message.get("rows"))
            )
        elif kind == "position":
            seq = message.get("seq")
            if type(seq) is not int:
                raise MalformedPayload("seq is not an integer")
            listener.heardPosition(_text(message, "room"), seq)
        elif kind == "presence":
            event = _text(message, "event")
            if event not in ("join", "leave"):
                raise MalformedPayload(f"presence event {event!r}")
            listener.heardPresence(
                _text(message, "room"), _text(message, "user"), event
            )
        elif kind == "private":
            private = {key: _text(message, key) for key in ("from", "text", "ts")}
            listener.heardPrivate(_text(message, "to"), private)
        else:
            raise MalformedPayload(f"kind {kind!r}")
