"""
The presence directory: who is in which room, and which nodes hold a
user's connections, across every node of a cluster.

Each node owns its share of the directory: the (room, user) pairs of its
members and the users it has connections of.  It tells the directory of
each change (L{NodePresence.joined}, C{left}, C{attached}, C{detached}) and
keeps a mirror of its share, so that it can write the share again whole
(a I{resync}) whenever the directory may have lost or missed something: an
update that failed, a Redis restart (the server keeps nothing), or a node
that was taken for dead and reaped while it was only slow.

A node proves it is alive by a heartbeat every L{HEARTBEAT} seconds, which
renews its entry for L{NODE_TTL} seconds.  A node whose entry has expired
(SIGKILL, a crash, a lost network) is I{reaped} by the next heartbeat of a
survivor: its pairs are removed, and the pairs whose user is thereby gone
from the room cluster-wide are handed to that survivor's listener.  So a
dead node's members are shown as gone at most C{NODE_TTL + HEARTBEAT} (8)
seconds after its last heartbeat.

Who announces a presence event: in Redis (and in a L{LocalDirectory}
given a bus), the directory's operation that made the change publishes it
on the room's channel, in the same atomic step (L{NodePresence.announces}):
every node then hears one user's joins and leaves in the directory's own
order, whichever nodes made them.  A lone node's directory publishes
nothing, and the node announces what its calls answer.

A node reaps only once its own heartbeats have succeeded for C{NODE_TTL}
seconds in a row: after a bus outage everyone's entry has lapsed, and the
first node back must not reap the others before they had the time to
renew.

Two implementations, the same model:
  - L{LocalDirectory} (in process): a lone node's, private, never
    expiring; and, shared by several services in one process with a
    L{twisted.internet.task.Clock}, what the unit tests of the cluster use.
  - L{RedisPresence}: the directory in a Redis-protocol server, each
    operation one Lua script (atomic, one round trip), through the
    C{eval} of the bus (L{twisted_lab.bus.RedisBus}).

Bounded: a node's share is one set entry per (room, user) pair of its
members (at most 50 rooms per connection) and one per user; the heartbeat
reaps at most L{REAP_BUDGET} entries of a dead node at once (the rest on
the next beats); a resync is sent in chunks of L{SYNC_CHUNK} entries.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from twisted_lab.codecs import events
from twisted_lab.ports import IBus, IPresence
from twisted_lab.services.cluster import ROOM_CHANNEL, presencePayload
from twisted_lab.services.limits import TokenBucket

#: Seconds between a node's heartbeats.
HEARTBEAT = 2.0
#: Seconds a node's entry lives without a heartbeat: three beats may be
#: lost (a busy reactor, a slow bus) before a live node is taken for dead.
NODE_TTL = 6.0
#: Entries of a dead node removed by one heartbeat (a bound on the time one
#: Lua script holds the Redis server).
REAP_BUDGET = 2000
#: Entries per resync chunk.
SYNC_CHUNK = 500

Pair = tuple[str, str]
DepartedListener = Callable[[list[Pair]], object]
NodesGoneListener = Callable[[set[str]], object]


class NodeNameTaken(Exception):
    """
    Another process runs as this node (the same C{--node}): the directory
    refused this one's change.
    """


def _pairKey(room: str, user: str) -> str:
    # Room names and usernames have no space (docs/protocol.md 3.2, 3.3).
    return f"{room} {user}"


def _splitPair(text: str) -> Pair:
    room, _, user = text.partition(" ")
    return room, user


class NodePresence:
    """
    One node's side of the directory: its mirror, its heartbeat, its
    resync; the directory operations themselves are the subclass's
    (C{_join}, C{_leave}, ...).
    """

    log = Logger()

    def __init__(
        self,
        node: str,
        clock: IReactorTime,
        heartbeat: float = HEARTBEAT,
        ttl: float = NODE_TTL,
    ) -> None:
        if ttl <= heartbeat:
            raise ValueError("a node's TTL must be longer than its heartbeat")
        self.node = node
        self.clock = clock
        self.heartbeat = heartbeat
        self.ttl = ttl
        #: This node's share, as it has told the directory.
        self.pairs: set[Pair] = set()
        self.users: set[str] = set()
        #: The directory may not hold the share exactly: resync at the
        #: next heartbeat.
        self.dirty = True
        self.running = False
        self.stopped = False
        #: When the heartbeats started succeeding without a failure since.
        self._healthySince: float | None = None
        self._live: set[str] = set()
        self._beatCall: IDelayedCall | None = None
        self._beating = False
        self._departedListeners: list[DepartedListener] = []
        self._goneListeners: list[NodesGoneListener] = []
        self._failing = False
        #: The directory publishes the presence events itself (from the
        #: operation that made the change): the node does not announce
        #: what its calls answer, nor what its listeners are told.
        self.announces = False
        #: This process's token: its claim on the node's name.
        self.token = os.urandom(8).hex()
        #: Since when the directory says another process holds the name.
        self._takenSince: float | None = None
        self._conflictListeners: list[Callable[[str], object]] = []

    # -- IPresence ----------------------------------------------------------------

    def watch(self, departed: object, nodesGone: object) -> None:
        if not callable(departed) or not callable(nodesGone):
            raise TypeError("presence listeners are callables")
        self._departedListeners.append(departed)
        self._goneListeners.append(nodesGone)

    def joined(self, room: str, user: str) -> defer.Deferred[bool]:
        self.pairs.add((room, user))
        if self.stopped:
            return defer.succeed(False)
        return self._tracked(self._join(room, user))

    def left(self, room: str, user: str) -> defer.Deferred[bool]:
        self.pairs.discard((room, user))
        if self.stopped:
            return defer.succeed(False)
        return self._tracked(self._leave(room, user))

    def attached(self, user: str) -> defer.Deferred[None]:
        self.users.add(user)
        if self.stopped:
            return defer.succeed(None)
        return self._tracked(self._attach(user))

    def detached(self, user: str) -> defer.Deferred[None]:
        self.users.discard(user)
        if self.stopped:
            return defer.succeed(None)
        return self._tracked(self._detach(user))

    def members(self, room: str, limit: int) -> defer.Deferred[tuple[int, list[str]]]:
        return self._members(room, limit)

    def rooms(self, limit: int) -> defer.Deferred[list[str]]:
        return self._rooms(limit)

    def sizes(self, rooms: list[str]) -> defer.Deferred[list[int]]:
        if not rooms:
            return defer.succeed([])
        return self._sizes(rooms)

    def route(
        self, user: str, rate: float, burst: float
    ) -> defer.Deferred[tuple[float, list[str]]]:
        return self._route(user, rate, burst)

    def onConflict(self, callback: Callable[[str], object]) -> None:
        """
        Call C{callback(node)} once another process is found to run as
        this node: the directory refused this one's heartbeats for longer
        than the TTL (a crashed predecessor's claim lapses within it).
        """
        self._conflictListeners.append(callback)

    def suspect(self) -> None:
        """
        The directory may not hold this node's share any more, though no
        change failed and the node's entry is still there: the bus
        reconnected, and its server may be a replica that was behind (a
        failover) or have restarted from an old snapshot.  The next
        heartbeat writes the share again.
        """
        self.dirty = True

    def start(self) -> None:
        """
        Begin the heartbeats (the first one at once).
        """
        if self.running or self.stopped:
            return
        self.running = True
        self._beat()

    def stop(self) -> defer.Deferred[None]:
        """
        Stop the heartbeats and take this node's share out of the directory
        (its members leave at once, announced like a dead node's); later
        changes are not sent.
        """
        self.running = False
        self.stopped = True
        if self._beatCall is not None and self._beatCall.active():
            self._beatCall.cancel()
        self._beatCall = None
        removing = self._remove()
        removing.addCallback(self._reportDeparted)
        removing.addErrback(self._failed, "remove this node's share")
        return removing.addCallback(lambda _: None)

    # -- the heartbeat --------------------------------------------------------------

    def _beat(self) -> None:
        self._beatCall = None
        if not self.running or self._beating:
            return
        self._beating = True
        now = self.clock.seconds()
        reap = self._healthySince is not None and now - self._healthySince >= self.ttl
        beating = self._heartbeat(reap)
        beating.addCallbacks(self._beaten, self._beatFailed)
        beating.addErrback(self._failed, "handle a heartbeat")
        beating.addBoth(self._nextBeat)

    def _nextBeat(self, _: object) -> None:
        self._beating = False
        if self.running and self._beatCall is None:
            self._beatCall = self.clock.callLater(self.heartbeat, self._beat)

    def _beaten(
        self, result: tuple[bool, list[str], list[Pair], list[str]]
    ) -> defer.Deferred[None] | None:
        fresh, live, departed, reaped = result
        self._takenSince = None
        if self._healthySince is None:
            self._healthySince = self.clock.seconds()
        if self._failing:
            self._failing = False
            self.log.info(
                "node {node}: the presence directory answers again",
                event=events.PRESENCE_RESUMED,
                node=self.node,
            )
        for node in reaped:
            self.log.warn(
                "node {node} missed its heartbeats for {ttl} s: its members are gone",
                event=events.NODE_REAPED,
                node=node,
                ttl=self.ttl,
            )
        self._reportDeparted(departed)
        liveNow = set(live)
        gone = self._live - liveNow - {self.node}
        self._live = liveNow
        if gone:
            for listener in list(self._goneListeners):
                listener(gone)
        if fresh or self.dirty:
            return self._resync()
        return None

    def _beatFailed(self, failure: Any) -> None:
        self._healthySince = None
        self.dirty = True
        if failure.check(NodeNameTaken):
            self._nameTaken()
        if not self._failing:
            self._failing = True
            self.log.warn(
                "node {node}: no heartbeat ({reason}): retrying every {interval} s",
                event=events.PRESENCE_FAILED,
                node=self.node,
                reason=failure.getErrorMessage(),
                interval=self.heartbeat,
            )

    def _nameTaken(self) -> None:
        now = self.clock.seconds()
        if self._takenSince is None:
            self._takenSince = now
        if now - self._takenSince <= self.ttl + self.heartbeat:
            return  # perhaps the claim of this node's last process, lapsing
        self.log.error(
            "node {node}: another process runs with this node's name (--node):"
            " two nodes must not share a name; this one stops",
            event=events.NODE_NAME_TAKEN,
            node=self.node,
        )
        self.running = False
        listeners, self._conflictListeners = self._conflictListeners, []
        for listener in listeners:
            listener(self.node)

    def _resync(self) -> defer.Deferred[None]:
        """
        Write this node's share again, whole: entries the directory lacks
        are added silently (nobody joined), entries it has and this node
        does not are removed (their leaves announced).
        """
        self.dirty = False
        items = [_pairKey(room, user) for room, user in self.pairs]
        items += sorted(self.users)
        syncing = self._sync(items)

        def synced(departed: list[Pair]) -> None:
            self.log.info(
                "node {node}: presence written again ({pairs} memberships,"
                " {users} users)",
                event=events.PRESENCE_RESYNCED,
                node=self.node,
                pairs=len(self.pairs),
                users=len(self.users),
            )
            self._reportDeparted(departed)

        def failed(failure: Any) -> None:
            self.dirty = True
            self._failed(failure, "write this node's presence again")

        return syncing.addCallbacks(synced, failed)

    def _reportDeparted(self, departed: list[Pair]) -> None:
        if departed:
            for listener in list(self._departedListeners):
                listener(departed)

    def _tracked(self, d: defer.Deferred[Any]) -> defer.Deferred[Any]:
        """
        A change of this node's share: if it fails, the next heartbeat
        writes the share again.
        """

        def failed(failure: Any) -> Any:
            self.dirty = True
            return failure

        return d.addErrback(failed)

    def _failed(self, failure: Any, what: str) -> None:
        self.log.warn(
            "node {node}: cannot {what} ({reason})",
            event=events.PRESENCE_FAILED,
            node=self.node,
            what=what,
            reason=failure.getErrorMessage(),
        )

    # -- the directory (subclasses) ----------------------------------------------------

    def _join(self, room: str, user: str) -> defer.Deferred[bool]:
        raise NotImplementedError

    def _leave(self, room: str, user: str) -> defer.Deferred[bool]:
        raise NotImplementedError

    def _attach(self, user: str) -> defer.Deferred[None]:
        raise NotImplementedError

    def _detach(self, user: str) -> defer.Deferred[None]:
        raise NotImplementedError

    def _members(self, room: str, limit: int) -> defer.Deferred[tuple[int, list[str]]]:
        raise NotImplementedError

    def _rooms(self, limit: int) -> defer.Deferred[list[str]]:
        raise NotImplementedError

    def _sizes(self, rooms: list[str]) -> defer.Deferred[list[int]]:
        raise NotImplementedError

    def _route(
        self, user: str, rate: float, burst: float
    ) -> defer.Deferred[tuple[float, list[str]]]:
        raise NotImplementedError

    def _heartbeat(
        self, reap: bool
    ) -> defer.Deferred[tuple[bool, list[str], list[Pair], list[str]]]:
        """
        Renew this node's entry; reap expired nodes if C{reap}.  Fires with
        (this node had no live entry: none, or one expired, which a
        survivor may have begun to reap; the live nodes, the pairs gone
        cluster-wide, the nodes reaped).
        """
        raise NotImplementedError

    def _sync(self, items: list[str]) -> defer.Deferred[list[Pair]]:
        raise NotImplementedError

    def _remove(self) -> defer.Deferred[list[Pair]]:
        raise NotImplementedError


# -- in process ---------------------------------------------------------------------


class LocalDirectory:
    """
    The directory in this process's memory: the model that the Redis
    scripts implement, on a clock.  Share one among several services (the
    nodes of a unit test); a lone node has one of its own.

    @param bus: where the directory publishes the presence events it makes
        (as the Redis scripts do), on the rooms' channels; L{None}: it
        publishes nothing, and each node announces (a lone node).
    """

    def __init__(
        self, clock: IReactorTime, bus: IBus | None = None, channel: str = ROOM_CHANNEL
    ) -> None:
        self.clock = clock
        self.bus = bus
        self.channel = channel
        self.expiry: dict[str, float] = {}
        self.held: dict[str, set[Pair]] = {}
        self.attachedUsers: dict[str, set[str]] = {}
        #: room -> user -> nodes holding the pair
        self.count: dict[str, dict[str, int]] = {}
        self.userNodes: dict[str, set[str]] = {}
        #: node -> (the token of the process running as it, until when)
        self.owners: dict[str, tuple[str, float]] = {}
        self._inboxes: dict[tuple[float, float], TokenBucket] = {}

    def presence(
        self, node: str, heartbeat: float = HEARTBEAT, ttl: float = NODE_TTL
    ) -> LocalPresence:
        """
        The presence of node C{node} in this directory.
        """
        return LocalPresence(self, node, heartbeat, ttl)

    # The operations, each atomic (as one Lua script is).

    def owned(self, node: str, token: str) -> bool:
        """
        Whether the process of C{token} may change node C{node}'s share
        (no other live process holds the name).
        """
        owner = self.owners.get(node)
        return owner is None or owner[0] == token or owner[1] < self.clock.seconds()

    def claim(self, node: str, token: str, ttl: float) -> None:
        self.owners[node] = (token, self.clock.seconds() + ttl)

    def _announce(self, origin: str, room: str, user: str, event: str) -> None:
        if self.bus is not None:
            self.bus.publish(
                self.channel + room, presencePayload(origin, room, user, event)
            )

    def join(self, node: str, room: str, user: str, announce: bool = True) -> bool:
        held = self.held.setdefault(node, set())
        if (room, user) in held:
            return False
        held.add((room, user))
        users = self.count.setdefault(room, {})
        users[user] = users.get(user, 0) + 1
        if users[user] > 1:
            return False
        if announce:
            self._announce(node, room, user, "join")
        return True

    def leave(self, node: str, room: str, user: str) -> bool:
        held = self.held.get(node, set())
        if (room, user) not in held:
            return False
        held.discard((room, user))
        if not self._depart(room, user):
            return False
        self._announce(node, room, user, "leave")
        return True

    def _depart(self, room: str, user: str) -> bool:
        users = self.count.get(room, {})
        left = users.get(user, 0) - 1
        if left > 0:
            users[user] = left
            return False
        users.pop(user, None)
        if not users:
            self.count.pop(room, None)
        return True

    def attach(self, node: str, user: str) -> None:
        self.attachedUsers.setdefault(node, set()).add(user)
        self.userNodes.setdefault(user, set()).add(node)

    def detach(self, node: str, user: str) -> None:
        self.attachedUsers.get(node, set()).discard(user)
        nodes = self.userNodes.get(user)
        if nodes is not None:
            nodes.discard(node)
            if not nodes:
                del self.userNodes[user]

    def members(self, room: str, limit: int) -> tuple[int, list[str]]:
        users = self.count.get(room, {})
        return len(users), sorted(users)[:limit]

    def rooms(self, limit: int) -> list[str]:
        return sorted(self.count)[:limit]

    def sizes(self, rooms: list[str]) -> list[int]:
        return [len(self.count.get(room, ())) for room in rooms]

    def route(self, user: str, rate: float, burst: float) -> tuple[float, list[str]]:
        nodes = sorted(self.userNodes.get(user, ()))
        if not nodes:
            return 0.0, []
        inbox = self._inboxes.get((rate, burst))
        if inbox is None:
            inbox = self._inboxes[(rate, burst)] = TokenBucket(
                self.clock, burst=burst, rate=rate
            )
        return inbox.take(user), nodes

    def heartbeat(
        self, node: str, ttl: float, reap: bool
    ) -> tuple[bool, list[str], list[Pair], list[str]]:
        now = self.clock.seconds()
        # An entry that has expired counts as none: the node may have been
        # reaped in part (as the Redis script does, REAP_BUDGET at a time).
        fresh = self.expiry.get(node, -1.0) < now
        self.expiry[node] = now + ttl
        departed: list[Pair] = []
        reaped: list[str] = []
        if reap:
            for dead in sorted(n for n, t in self.expiry.items() if t < now):
                departed += self.remove(dead, origin=node)
                reaped.append(dead)
        live = sorted(n for n, t in self.expiry.items() if t >= now)
        return fresh, live, departed, reaped

    def sync(self, node: str, items: list[str]) -> list[Pair]:
        pairs = {_splitPair(item) for item in items if " " in item}
        users = {item for item in items if " " not in item}
        held = self.held.setdefault(node, set())
        departed = [p for p in sorted(held - pairs) if self.leave(node, *p)]
        for room, user in pairs - held:
            self.join(node, room, user, announce=False)
        for user in self.attachedUsers.get(node, set()) - users:
            self.detach(node, user)
        for user in users:
            self.attach(node, user)
        return departed

    def remove(self, node: str, origin: str | None = None) -> list[Pair]:
        """
        Take node C{node} out (by C{origin}, if another node reaps it): the
        pairs whose user is gone cluster-wide.
        """
        self.expiry.pop(node, None)
        self.owners.pop(node, None)
        departed = [p for p in sorted(self.held.pop(node, set())) if self._depart(*p)]
        for room, user in departed:
            self._announce(origin or node, room, user, "leave")
        for user in self.attachedUsers.pop(node, set()):
            nodes = self.userNodes.get(user)
            if nodes is not None:
                nodes.discard(node)
                if not nodes:
                    del self.userNodes[user]
        return departed


@implementer(IPresence)
class LocalPresence(NodePresence):
    """
    A node's presence in a L{LocalDirectory}: every operation answers at
    once (an already-fired Deferred).
    """

    def __init__(
        self,
        directory: LocalDirectory,
        node: str,
        heartbeat: float = HEARTBEAT,
        ttl: float = NODE_TTL,
    ) -> None:
        super().__init__(node, directory.clock, heartbeat, ttl)
        self.directory = directory
        self.announces = directory.bus is not None

    def _owned(self) -> defer.Deferred[Any] | None:
        """
        None if this process may change its node's share, else the failure.
        """
        if self.directory.owned(self.node, self.token):
            return None
        return defer.fail(NodeNameTaken("another process runs as this node"))
        #: Nothing to write again before the first heartbeat: the share
        #: is written as it changes.
        self.dirty = False

    def _join(self, room: str, user: str) -> defer.Deferred[bool]:
        return self._owned() or defer.succeed(
            self.directory.join(self.node, room, user)
        )

    def _leave(self, room: str, user: str) -> defer.Deferred[bool]:
        return self._owned() or defer.succeed(
            self.directory.leave(self.node, room, user)
        )

    def _attach(self, user: str) -> defer.Deferred[None]:
        refused = self._owned()
        if refused is not None:
            return refused
        self.directory.attach(self.node, user)
        return defer.succeed(None)

    def _detach(self, user: str) -> defer.Deferred[None]:
        refused = self._owned()
        if refused is not None:
            return refused
        self.directory.detach(self.node, user)
        return defer.succeed(None)

    def _members(self, room: str, limit: int) -> defer.Deferred[tuple[int, list[str]]]:
        return defer.succeed(self.directory.members(room, limit))

    def _rooms(self, limit: int) -> defer.Deferred[list[str]]:
        return defer.succeed(self.directory.rooms(limit))

    def _sizes(self, rooms: list[str]) -> defer.Deferred[list[int]]:
        return defer.succeed(self.directory.sizes(rooms))

    def _route(
        self, user: str, rate: float, burst: float
    ) -> defer.Deferred[tuple[float, list[str]]]:
        return defer.succeed(self.directory.route(user, rate, burst))

    def _heartbeat(
        self, reap: bool
    ) -> defer.Deferred[tuple[bool, list[str], list[Pair], list[str]]]:
        refused = self._owned()
        if refused is not None:
            return refused
        self.directory.claim(self.node, self.token, self.ttl)
        return defer.succeed(self.directory.heartbeat(self.node, self.ttl, reap))

    def _sync(self, items: list[str]) -> defer.Deferred[list[Pair]]:
        return self._owned() or defer.succeed(self.directory.sync(self.node, items))

    def _remove(self) -> defer.Deferred[list[Pair]]:
        return self._owned() or defer.succeed(self.directory.remove(self.node))


# -- in Redis -------------------------------------------------------------------------


class ScriptRunner(Protocol):
    """
    What L{RedisPresence} needs of the bus: Lua scripts
    (L{twisted_lab.bus.RedisBus.eval}).
    """

    def eval(
        self, script: str, keys: Iterable[str | bytes] = (), args: Iterable[Any] = ()
    ) -> defer.Deferred[Any]: ...


#: Keys, under the prefix (default C{netlab:chat:presence:}):
#:   nodes            ZSET node -> expiry (ms, the server's clock)
#:   held:NODE        SET "room user" of the node's members
#:   users:NODE       SET users with a connection on the node
#:   count:ROOM       HASH user -> nodes holding the user in the room
#:   room:ROOM        ZSET (score 0, so by name) of the room's users
#:   rooms            ZSET (score 0) of rooms with members
#:   user:USER        SET nodes holding a connection of the user
#:   inbox:USER       HASH tokens, at: the user's private-message bucket
#:   sync:NODE, syncusers:NODE   a resync in progress (expire in 60 s)
#:   owner:NODE       the token of the process running as NODE (expires
#:                    with its entry; renewed by its heartbeat)
#: The server's own clock (TIME) times the entries: the nodes' clocks may
#: disagree.  One Redis-protocol server (or a primary), not Redis Cluster:
#: the scripts name keys they compute.
_DEPART = """
local function depart(p, room, user)
  local count = p .. 'count:' .. room
  if redis.call('HINCRBY', count, user, -1) > 0 then return false end
  redis.call('HDEL', count, user)
  local members = p .. 'room:' .. room
  redis.call('ZREM', members, user)
  if redis.call('ZCARD', members) == 0 then redis.call('ZREM', p .. 'rooms', room) end
  return true
end
local function arrive(p, room, user)
  if redis.call('HINCRBY', p .. 'count:' .. room, user, 1) > 1 then return false end
  redis.call('ZADD', p .. 'room:' .. room, 0, user)
  redis.call('ZADD', p .. 'rooms', 0, room)
  return true
end
local function split(pair)
  local space = string.find(pair, ' ', 1, true)
  return string.sub(pair, 1, space - 1), string.sub(pair, space + 1)
end
local p, node, channel, token = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
-- One process per node name: the heartbeat holds owner:NODE (this
-- process's token, living as long as the node's entry); a change by
-- another process under the same name is refused (NODETAKEN), so that two
-- nodes started with one --node do not clobber each other's share.
local function owned()
  local owner = redis.call('GET', p .. 'owner:' .. node)
  return (not owner) or owner == token
end
local TAKEN = 'NODETAKEN another process runs as this node'
-- A presence event is published by the script that made the change (when
-- a channel prefix is given): every node hears one user's joins and
-- leaves in the order the directory made them, whichever node made them.
-- (Room names and usernames need no JSON escaping: docs/protocol.md 3.2.)
local function announce(room, user, event)
  if channel == '' then return end
  redis.call('PUBLISH', channel .. room, node .. '\\n{"kind":"presence","room":"'
    .. room .. '","user":"' .. user .. '","event":"' .. event .. '"}')
end
"""

JOIN = (
    _DEPART
    + """
if not owned() then return redis.error_reply(TAKEN) end
local room, user = ARGV[5], ARGV[6]
local pair = room .. ' ' .. user
if redis.call('EXISTS', p .. 'sync:' .. node) == 1 then
  redis.call('SADD', p .. 'sync:' .. node, pair)
end
if redis.call('SADD', p .. 'held:' .. node, pair) == 0 then return 0 end
if arrive(p, room, user) then
  announce(room, user, 'join')
  return 1
end
return 0
"""
)

LEAVE = (
    _DEPART
    + """
if not owned() then return redis.error_reply(TAKEN) end
local room, user = ARGV[5], ARGV[6]
local pair = room .. ' ' .. user
redis.call('SREM', p .. 'sync:' .. node, pair)
if redis.call('SREM', p .. 'held:' .. node, pair) == 0 then return 0 end
if depart(p, room, user) then
  announce(room, user, 'leave')
  return 1
end
return 0
"""
)

ATTACH = (
    _DEPART
    + """
if not owned() then return redis.error_reply(TAKEN) end
local user = ARGV[5]
if redis.call('EXISTS', p .. 'syncusers:' .. node) == 1 then
  redis.call('SADD', p .. 'syncusers:' .. node, user)
end
redis.call('SADD', p .. 'users:' .. node, user)
redis.call('SADD', p .. 'user:' .. user, node)
return 0
"""
)

DETACH = (
    _DEPART
    + """
if not owned() then return redis.error_reply(TAKEN) end
local user = ARGV[5]
redis.call('SREM', p .. 'syncusers:' .. node, user)
redis.call('SREM', p .. 'users:' .. node, user)
redis.call('SREM', p .. 'user:' .. user, node)
return 0
"""
)

MEMBERS = """
local key = ARGV[1] .. 'room:' .. ARGV[2]
local limit = tonumber(ARGV[3])
return {redis.call('ZCARD', key), redis.call('ZRANGE', key, 0, limit - 1)}
"""

ROOMS = """
return redis.call('ZRANGE', ARGV[1] .. 'rooms', 0, tonumber(ARGV[2]) - 1)
"""

SIZES = """
local sizes = {}
for i = 2, #ARGV do
  sizes[i - 1] = redis.call('ZCARD', ARGV[1] .. 'room:' .. ARGV[i])
end
return sizes
"""

#: The user's nodes, and a token of the user's inbox bucket (milliseconds
#: to wait if there is none), taken only if the user is online.
ROUTE = """
local p, user = ARGV[1], ARGV[2]
local nodes = redis.call('SMEMBERS', p .. 'user:' .. user)
if #nodes == 0 then return {0} end
local rate, burst = tonumber(ARGV[3]), tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local key = p .. 'inbox:' .. user
local state = redis.call('HMGET', key, 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = math.ceil((1 - tokens) / rate * 1000)
end
redis.call('HSET', key, 'tokens', string.format('%.6f', tokens),
           'at', string.format('%.6f', now))
redis.call('PEXPIRE', key, math.ceil(burst / rate * 1000) + 1000)
local reply = {wait}
for i, n in ipairs(nodes) do reply[i + 1] = n end
return reply
"""

HEARTBEAT_SCRIPT = (
    _DEPART
    + """
if not owned() then return redis.error_reply(TAKEN) end
local ttl, reap, budget = tonumber(ARGV[5]), ARGV[6] == '1', tonumber(ARGV[7])
redis.call('SET', p .. 'owner:' .. node, token, 'PX', ttl)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local nodes = p .. 'nodes'
-- Fresh: no entry, or one already expired (this node was taken for dead,
-- and a survivor may be reaping its share a budget at a time: what it has
-- removed must be written again).
local fresh, score = 0, redis.call('ZSCORE', nodes, node)
if not score or tonumber(score) < now then fresh = 1 end
redis.call('ZADD', nodes, now + ttl, node)
local departed, reaped = {}, {}
if reap then
  local dead = redis.call('ZRANGEBYSCORE', nodes, '-inf', '(' .. now, 'LIMIT', 0, 8)
  for _, other in ipairs(dead) do
    local held, users = p .. 'held:' .. other, p .. 'users:' .. other
    for _, pair in ipairs(redis.call('SPOP', held, budget)) do
      local room, user = split(pair)
      if depart(p, room, user) then
        table.insert(departed, pair)
        announce(room, user, 'leave')
      end
    end
    for _, user in ipairs(redis.call('SPOP', users, budget)) do
      redis.call('SREM', p .. 'user:' .. user, other)
    end
    if redis.call('EXISTS', held) == 0 and redis.call('EXISTS', users) == 0 then
      redis.call('ZREM', nodes, other)
      redis.call('DEL', p .. 'sync:' .. other, p .. 'syncusers:' .. other)
      table.insert(reaped, other)
    end
  end
end
return {fresh, redis.call('ZRANGEBYSCORE', nodes, now, '+inf'), departed, reaped}
"""
)

#: A chunk of a resync: ARGV[5] is 1 for the first chunk (which starts the
#: sync sets over).  A pair the directory lacks is added silently.
SYNC_ADD = (
    _DEPART
    + """
if not owned() then return redis.error_reply(TAKEN) end
local sync, syncusers = p .. 'sync:' .. node, p .. 'syncusers:' .. node
if ARGV[5] == '1' then
  redis.call('DEL', sync, syncusers)
  redis.call('SADD', sync, '')
  redis.call('SADD', syncusers, '')
end
if redis.call('EXISTS', sync) == 0 then return redis.error_reply('SYNCLOST') end
for i = 6, #ARGV do
  local item = ARGV[i]
  if string.find(item, ' ', 1, true) then
    redis.call('SADD', sync, item)
    if redis.call('SADD', p .. 'held:' .. node, item) == 1 then
      local room, user = split(item)
      arrive(p, room, user)
    end
  else
    redis.call('SADD', syncusers, item)
    redis.call('SADD', p .. 'users:' .. node, item)
    redis.call('SADD', p .. 'user:' .. item, node)
  end
end
redis.call('PEXPIRE', sync, 60000)
redis.call('PEXPIRE', syncusers, 60000)
return 0
"""
)

#: The end of a resync: what the directory holds and the node did not
#: send is removed; fires with the pairs gone cluster-wide.
SYNC_END = (
    _DEPART
    + """
if not owned() then return redis.error_reply(TAKEN) end
local sync, syncusers = p .. 'sync:' .. node, p .. 'syncusers:' .. node
if redis.call('EXISTS', sync) == 0 then return redis.error_reply('SYNCLOST') end
local departed = {}
local held = p .. 'held:' .. node
for _, pair in ipairs(redis.call('SDIFF', held, sync)) do
  redis.call('SREM', held, pair)
  local room, user = split(pair)
  if depart(p, room, user) then
    table.insert(departed, pair)
    announce(room, user, 'leave')
  end
end
local users = p .. 'users:' .. node
for _, user in ipairs(redis.call('SDIFF', users, syncusers)) do
  redis.call('SREM', users, user)
  redis.call('SREM', p .. 'user:' .. user, node)
end
redis.call('DEL', sync, syncusers)
return departed
"""
)

#: This node leaves the cluster (a clean stop): all of its share at once.
REMOVE = (
    _DEPART
    + """
if not owned() then return redis.error_reply(TAKEN) end
local departed = {}
local held, users = p .. 'held:' .. node, p .. 'users:' .. node
for _, pair in ipairs(redis.call('SMEMBERS', held)) do
  local room, user = split(pair)
  if depart(p, room, user) then
    table.insert(departed, pair)
    announce(room, user, 'leave')
  end
end
for _, user in ipairs(redis.call('SMEMBERS', users)) do
  redis.call('SREM', p .. 'user:' .. user, node)
end
redis.call('DEL', held, users, p .. 'sync:' .. node, p .. 'syncusers:' .. node)
redis.call('ZREM', p .. 'nodes', node)
redis.call('DEL', p .. 'owner:' .. node)
return departed
"""
)

DEFAULT_PREFIX = "netlab:chat:presence:"


def _nameTaken(failure: Any) -> Any:
    error = failure.value
    if getattr(error, "kind", None) == "NODETAKEN":
        raise NodeNameTaken(str(error))
    return failure


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _pairs(values: list[Any]) -> list[Pair]:
    return [_splitPair(_text(v)) for v in values]


@implementer(IPresence)
class RedisPresence(NodePresence):
    """
    A node's presence in the directory kept by a Redis-protocol server.

    @param bus: what runs the scripts (the node's L{RedisBus}).
    """

    def __init__(
        self,
        bus: ScriptRunner,
        node: str,
        clock: IReactorTime,
        heartbeat: float = HEARTBEAT,
        ttl: float = NODE_TTL,
        prefix: str = DEFAULT_PREFIX,
        channel: str | None = ROOM_CHANNEL,
    ) -> None:
        super().__init__(node, clock, heartbeat, ttl)
        self.bus = bus
        self.prefix = prefix
        #: The prefix of the rooms' channels the scripts publish presence
        #: events on (None: they publish nothing, the node announces).
        self.channel = channel
        self.announces = channel is not None

    def _run(self, script: str, *args: Any) -> defer.Deferred[Any]:
        running = self.bus.eval(
            script, (), [self.prefix, self.node, self.channel or "", self.token, *args]
        )
        return running.addErrback(_nameTaken)

    def _join(self, room: str, user: str) -> defer.Deferred[bool]:
        return self._run(JOIN, room, user).addCallback(lambda r: r == 1)

    def _leave(self, room: str, user: str) -> defer.Deferred[bool]:
        return self._run(LEAVE, room, user).addCallback(lambda r: r == 1)

    def _attach(self, user: str) -> defer.Deferred[None]:
        return self._run(ATTACH, user).addCallback(lambda _: None)

    def _detach(self, user: str) -> defer.Deferred[None]:
        return self._run(DETACH, user).addCallback(lambda _: None)

    def _members(self, room: str, limit: int) -> defer.Deferred[tuple[int, list[str]]]:
        asking = self.bus.eval(MEMBERS, (), [self.prefix, room, limit])
        return asking.addCallback(lambda r: (int(r[0]), [_text(u) for u in r[1]]))

    def _rooms(self, limit: int) -> defer.Deferred[list[str]]:
        asking = self.bus.eval(ROOMS, (), [self.prefix, limit])
        return asking.addCallback(lambda r: [_text(name) for name in r])

    def _sizes(self, rooms: list[str]) -> defer.Deferred[list[int]]:
        asking = self.bus.eval(SIZES, (), [self.prefix, *rooms])
        return asking.addCallback(lambda r: [int(n) for n in r])

    def _route(
        self, user: str, rate: float, burst: float
    ) -> defer.Deferred[tuple[float, list[str]]]:
        asking = self.bus.eval(ROUTE, (), [self.prefix, user, repr(rate), repr(burst)])
        return asking.addCallback(
            lambda r: (int(r[0]) / 1000.0, sorted(_text(n) for n in r[1:]))
        )

    def _heartbeat(
        self, reap: bool
    ) -> defer.Deferred[tuple[bool, list[str], list[Pair], list[str]]]:
        beating = self._run(
            HEARTBEAT_SCRIPT, int(self.ttl * 1000), int(reap), REAP_BUDGET
        )
        return beating.addCallback(
            lambda r: (
                r[0] == 1,
                [_text(n) for n in r[1]],
                _pairs(r[2]),
                [_text(n) for n in r[3]],
            )
        )

    def _sync(self, items: list[str]) -> defer.Deferred[list[Pair]]:
        # Every chunk is sent now, in order on one connection: a change
        # made after this call reaches the server after the first chunk,
        # and so is counted in the sync sets.
        chunks = [items[i : i + SYNC_CHUNK] for i in range(0, len(items), SYNC_CHUNK)]
        steps = [
            self._run(SYNC_ADD, int(i == 0), *chunk)
            for i, chunk in enumerate(chunks or [[]])
        ]
        ending = self._run(SYNC_END)
        done = defer.gatherResults([*steps, ending], consumeErrors=True)
        return done.addCallback(lambda results: _pairs(results[-1]))

    def _remove(self) -> defer.Deferred[list[Pair]]:
        return self._run(REMOVE).addCallback(_pairs)
