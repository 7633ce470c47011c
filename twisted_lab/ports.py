"""
Ports: the interfaces the service logic needs from the world around it.

The services (identity, auth, chat) are handed objects that provide these,
and know nothing else of them: a store may be a SQLite file, a PostgreSQL
database or a dict in memory (unit tests); a chat client may be an Int32
connection or a WebSocket.  Every store method returns a Deferred, fired
on the reactor thread once the work is committed.

Times are seconds since the epoch (floats) except where a method says
C{ts}: an RFC 3339 string, stored as given.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from twisted_lab.codecs.message import Outgoing

#: A stored chat message as the store hands it back: (seq, sender, text, ts).
HistoryRow = tuple[int, str, str, str]


class IIdentityStore(Interface):
    """
    Names given to client addresses (the identity service).
    """

    def visit(address: str, now: str) -> Deferred[tuple[str, int] | None]:
        """
        A connection from C{address}: if it is known, count the visit and
        fire with (name, visits); else with L{None}.
        """

    def nameAddress(address: str, name: str, now: str) -> Deferred[int]:
        """
        Store (or change) the name of C{address}; fires with its visits.
        """

    def forgetAddress(address: str) -> Deferred[bool]:
        """
        Forget C{address}; fires with whether it was known.
        """


class IAccountStore(Interface):
    """
    Accounts, sessions and the log of revoked sessions (auth and chat).

    Sessions are known by the SHA-256 digest of their token (bytes), never
    by the token.  Every revocation (logout, password change) is appended
    to a log read by position, so every server sharing the store can end
    the connections that hold a revoked session.
    """

    def createAccount(username: str, passwordHash: str, now: float) -> Deferred[bool]:
        """
        Create an account; fires with False if the username is taken (of
        two concurrent registrations of one name exactly one succeeds).
        """

    def passwordHash(username: str) -> Deferred[str | None]:
        """
        Fires with the stored hash of C{username}, or L{None}.
        """

    def setPasswordHash(
        username: str,
        passwordHash: str,
        keepSession: bytes | None = None,
        now: float = 0.0,
    ) -> Deferred[None]:
        """
        Replace the hash of C{username}.  With C{keepSession}, every other
        session of the user is revoked (reason C{password_changed}) in the
        same transaction.
        """

    def createSession(
        digest: bytes, username: str, now: float, idle: float, maximum: float
    ) -> Deferred[float]:
        """
        Store a new session; fires with when it expires if left idle.
        """

    def useSession(
        digest: bytes, now: float, idle: float
    ) -> Deferred[tuple[str, float] | None]:
        """
        Fires with the (username, expiry) of a live session, marking it
        used now; L{None} for an unknown, revoked or expired one.
        """

    def deleteSession(digest: bytes, now: float) -> Deferred[bool]:
        """
        Revoke one session (reason C{logged_out}); fires with whether it
        existed.
        """

    def refreshSession(
        digest: bytes, lastUsed: float, now: float, idle: float
    ) -> Deferred[float | None]:
        """
        A session held by a connection last active at C{lastUsed}: record
        that use; fires with its new expiry, or L{None} if it has expired
        or was revoked.
        """

    def revocationsAfter(position: int) -> Deferred[list[tuple[int, bytes, str]]]:
        """
        Fires with the (position, digest, reason) of sessions revoked after
        C{position}, oldest first, at most 1000.
        """

    def revocationsSince(at: float) -> Deferred[list[tuple[int, bytes, str]]]:
        """
        Fires with the (position, digest, reason) of sessions revoked at
        C{at} or later (at most 1000, the newest).
        """

    def lastRevocation() -> Deferred[int]:
        """
        Fires with the position of the newest revocation (0 for none).
        """


class IChatLog(Interface):
    """
    The record of every room message.  The store numbers them: a message's
    C{seq} is assigned in the transaction that stores it, one more than the
    last of its room, so any number of writers stay gap-free.
    """

    def lastSeq(room: str) -> Deferred[int]:
        """
        Fires with the highest C{seq} stored for C{room} (0 for none).
        """

    def storeMessages(
        messages: list[tuple[str, str, str, str]],
    ) -> Deferred[tuple[list[int], float]]:
        """
        Store (room, sender, text, ts) rows in one transaction, numbering
        each; fires with (seqs in the order given, C{time.monotonic()} of
        the commit).
        """

    def history(room: str, after: int, limit: int) -> Deferred[list[HistoryRow]]:
        """
        Fires with up to C{limit} L{HistoryRow}s of C{room} after C{after},
        oldest first.
        """

    def recentHistory(room: str, limit: int) -> Deferred[list[HistoryRow]]:
        """
        Fires with the last C{limit} L{HistoryRow}s of C{room}, oldest first.
        """

    def roomsWithHistory(limit: int) -> Deferred[list[str]]:
        """
        Fires with the first C{limit} names, in order, of rooms that have
        history.
        """


class IStore(IIdentityStore, IAccountStore, IChatLog):
    """
    One database holding all three areas (what C{--db} opens).
    """

    onTransaction = Attribute(
        "Called with the seconds each committed transaction took (metrics)."
    )

    def integrityCheck() -> Deferred[str]:
        """
        Fires with the engine's verdict on the stored data (C{"ok"}).
        """


class IChatClient(Interface):
    """
    A connection of a logged-in chat user, as the chat service sees it: it
    is told things, as C{twisted.words} tells its chat clients.  Each
    L{twisted_lab.codecs.message.Outgoing} is built once and handed to
    every member; each transport encodes it once per format.
    """

    joined = Attribute("The names of the rooms this connection is in (a set).")

    def roomMessages(room: str, outgoing: Outgoing) -> None:
        """
        Committed messages of C{room}, in C{seq} order.
        """

    def presence(room: str, outgoing: Outgoing) -> None:
        """
        Someone joined or left C{room}.
        """

    def privateMessage(outgoing: Outgoing) -> None:
        """
        A private message to this user.
        """


class IBus(Interface):
    """
    Publish/subscribe between the nodes of a cluster (and, on one node, an
    in-process bus).  A hint, never the record: a node that misses a
    publication (a restart, a lost connection) finds what it missed in the
    store.  Payloads are bytes; channels are short ASCII names.
    """

    def publish(channel: str, payload: bytes) -> Deferred[None]:
        """
        Send C{payload} to every subscriber of C{channel} on every node
        (this one included); fires once handed to the bus.
        """

    def subscribe(channel: str, receiver: object) -> Deferred[None]:
        """
        Call C{receiver(payload)} on the reactor thread for each payload
        published on C{channel} once the subscription is in effect (kept
        across reconnections).  Fires when it is: with a server, once the
        server has confirmed it (a round trip, or the next connection's);
        what was published before is not received, and must be found in
        the store.  Subscribing again, or a second receiver, fires once the
        channel's subscription is in effect.
        """

    def unsubscribe(channel: str, receiver: object) -> None:
        """
        Stop calling C{receiver} for C{channel}.
        """

    def onReconnect(callback: object) -> None:
        """
        Call C{callback()} each time the bus is connected again after a
        loss, once every channel is subscribed again (publications
        meanwhile may be lost: catch up from the store; and the server may
        be another one, or have restarted with older state or none: write
        again what this node keeps there).
        """


class IRequestChannel(Interface):
    """
    One client connection as the dispatcher and the services see it,
    whatever carries it (Int32 frames over TCP, TLS or a unix socket; a
    WebSocket).  Everything sent goes through the connection's one bounded
    output account: past its bound the reading stops, past the hard bound
    the client is cut off as a slow consumer.
    """

    peer = Attribute("The peer's address and port, for log lines.")
    address = Attribute(
        "The peer's address as text (IPv4-mapped IPv6 as IPv4), empty for "
        "a unix socket."
    )
    group = Attribute(
        "The peer's address group (an IPv4 address, an IPv6 /64): the key "
        "of per-address limits."
    )
    serial = Attribute("A number no other connection of this process has had.")
    lost = Attribute("True once the connection is gone.")
    outputCongested = Attribute(
        "True while requests must wait for the connection's output to drain."
    )
    closing = Attribute("True once the connection accepts nothing more to send.")

    def send(outgoing: Outgoing) -> None:
        """
        Send an L{twisted_lab.codecs.message.Outgoing} (one message or a
        batch), encoded in the channel's own format.
        """

    def pauseReading(reason: str) -> None:
        """
        Stop reading requests for C{reason} (resumed once every reason is
        gone).
        """

    def resumeReading(reason: str) -> None:
        """
        The C{reason} to pause reading is gone.
        """

    def closeAfterFlush() -> None:
        """
        Close once what was sent has been delivered (abort after a grace
        period if the peer does not take it).
        """


class IThrottleBackend(Interface):
    """
    Where the counters behind the limits on guessing and abuse are kept
    (the password throttles, the registrations per address): named
    I{failure throttles} (exponential back-off per key, as
    L{twisted_lab.services.limits.FailureThrottle}) and named I{token
    buckets}, each keyed by a short text (a username, an address group).

    A lone node keeps them in its process; the nodes of a cluster keep
    them on the shared server, each operation atomic there, so that N
    nodes count as one: guesses spread over the nodes are counted together
    and block together.  Every operation returns a Deferred, which fails
    when the counters cannot be reached (the cluster's server is down): the
    caller then refuses what the limit guards, never lets it through
    unchecked.
    """

    def defineFailures(
        name: str, free: int, delays: tuple[float, ...], forgetAfter: float
    ) -> None:
        """
        Declare the failure throttle C{name}: a key's first C{free}
        failures cost nothing; the (C{free} + i + 1)-th blocks it for
        C{delays[i]} seconds, the last entry holding for every failure
        after it (L{twisted_lab.services.limits.backoffDelays}); a key with
        no failure for C{forgetAfter} seconds is forgotten.
        """

    def defineBucket(name: str, burst: float, rate: float) -> None:
        """
        Declare the token bucket C{name}: at most C{burst} events at once
        per key, refilled at C{rate} per second.
        """

    def reserve(attempt: list[tuple[str, str]]) -> Deferred[float]:
        """
        Start an attempt that counts against each (throttle, key) of
        C{attempt}, all at once or not at all: if a key is blocked, fire
        with the seconds it still is (the first blocked one, in order) and
        count nothing; otherwise fire with 0, a failure counted on every
        key (until L{release} or L{succeeded} says otherwise).  Attempts
        reserved together count together, before any of them is checked.
        """

    def release(attempt: list[tuple[str, str]]) -> Deferred[None]:
        """
        Take back one reserved failure of each (throttle, key): the attempt
        was no failure (it succeeded, or could not be made).
        """

    def succeeded(attempt: list[tuple[str, str]]) -> Deferred[None]:
        """
        Clear each (throttle, key): its owner proved who they are.
        """

    def retryAfter(name: str, key: str) -> Deferred[float]:
        """
        Fire with the seconds until C{key} of throttle C{name} may try
        again (0: now).
        """

    def take(name: str, key: str) -> Deferred[float]:
        """
        Take one token of C{key} from bucket C{name}: fire with 0 if there
        was one, else with the seconds until there is (nothing taken).
        """


class IPresence(Interface):
    """
    The presence directory of a cluster (issue 12): who is in which room
    and which nodes hold a user's connections, across every node.  Each
    node tells it of its own members' changes and asks it about everyone's;
    a lone node has one in its own memory.  Changes of this node's share
    that fail are written again later (the directory is rebuilt from the
    nodes after a restart of its server); queries may fail while it is
    unreachable.
    """

    node = Attribute("This node's name.")

    def watch(departed: object, nodesGone: object) -> None:
        """
        Call C{departed(pairs)} with the (room, user) pairs that this node
        found gone cluster-wide without a leave (a dead node reaped, a
        resync), and C{nodesGone(names)} when nodes stop being alive.  A
        directory shared by nodes (Redis) publishes the presence events of
        those changes itself, from the script that makes them, so every node
        hears one user's joins and leaves in the directory's order; a lone
        node's directory publishes nothing and the node announces them.
        """

    def joined(room: str, user: str) -> Deferred[bool]:
        """
        This node now holds C{user} in C{room}; fires with whether the user
        is new to the room cluster-wide (a join, published by a shared
        directory, announced by a lone node).
        """

    def left(room: str, user: str) -> Deferred[bool]:
        """
        This node no longer holds C{user} in C{room}; fires with whether
        the user is gone from the room cluster-wide (a leave, likewise).
        """

    def attached(user: str) -> Deferred[None]:
        """
        C{user} has a connection on this node.
        """

    def detached(user: str) -> Deferred[None]:
        """
        C{user} has no connection on this node any more.
        """

    def members(room: str, limit: int) -> Deferred[tuple[int, list[str]]]:
        """
        Fires with (how many users are in C{room}, the first C{limit} of
        them by name).
        """

    def rooms(limit: int) -> Deferred[list[str]]:
        """
        Fires with the first C{limit} names of rooms with members.
        """

    def sizes(rooms: list[str]) -> Deferred[list[int]]:
        """
        Fires with the number of users in each of C{rooms}.
        """

    def route(
        user: str, rate: float, burst: float
    ) -> Deferred[tuple[float, list[str]]]:
        """
        Where to deliver a private message to C{user}: fires with (seconds
        to wait, the nodes holding the user's connections).  Unless there
        are no such nodes, a token is taken from the user's inbox bucket
        (C{burst} at once, C{rate} per second, cluster-wide); the seconds
        to wait are 0 if there was one.
        """

    def start() -> None:
        """
        Begin the heartbeats that keep this node alive in the directory.
        """

    def stop() -> Deferred[None]:
        """
        Stop them, and take this node's share out of the directory.
        """
