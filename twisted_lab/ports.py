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

from zope.interface import Attribute, Interface

#: A stored chat message as the store hands it back: (seq, sender, text, ts).
HistoryRow = tuple[int, str, str, str]


class IIdentityStore(Interface):
    """
    Names given to client addresses (the identity service).
    """

    def visit(address: str, now: str) -> object:
        """
        A connection from C{address}: if it is known, count the visit and
        fire with (name, visits); else with L{None}.
        """

    def nameAddress(address: str, name: str, now: str) -> object:
        """
        Store (or change) the name of C{address}; fires with its visits.
        """

    def forgetAddress(address: str) -> object:
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

    def createAccount(username: str, passwordHash: str, now: float) -> object:
        """
        Create an account; fires with False if the username is taken (of
        two concurrent registrations of one name exactly one succeeds).
        """

    def passwordHash(username: str) -> object:
        """
        Fires with the stored hash of C{username}, or L{None}.
        """

    def setPasswordHash(
        username: str,
        passwordHash: str,
        keepSession: bytes | None = None,
        now: float = 0.0,
    ) -> object:
        """
        Replace the hash of C{username}.  With C{keepSession}, every other
        session of the user is revoked (reason C{password_changed}) in the
        same transaction.
        """

    def createSession(
        digest: bytes, username: str, now: float, idle: float, maximum: float
    ) -> object:
        """
        Store a new session; fires with when it expires if left idle.
        """

    def useSession(digest: bytes, now: float, idle: float) -> object:
        """
        Fires with the (username, expiry) of a live session, marking it
        used now; L{None} for an unknown, revoked or expired one.
        """

    def deleteSession(digest: bytes, now: float) -> object:
        """
        Revoke one session (reason C{logged_out}); fires with whether it
        existed.
        """

    def refreshSession(
        digest: bytes, lastUsed: float, now: float, idle: float
    ) -> object:
        """
        A session held by a connection last active at C{lastUsed}: record
        that use; fires with its new expiry, or L{None} if it has expired
        or was revoked.
        """

    def revocationsAfter(position: int) -> object:
        """
        Fires with the (position, digest, reason) of sessions revoked after
        C{position}, oldest first, at most 1000.
        """

    def revocationsSince(at: float) -> object:
        """
        Fires with the (position, digest, reason) of sessions revoked at
        C{at} or later (at most 1000, the newest).
        """

    def lastRevocation() -> object:
        """
        Fires with the position of the newest revocation (0 for none).
        """


class IChatLog(Interface):
    """
    The record of every room message.  The store numbers them: a message's
    C{seq} is assigned in the transaction that stores it, one more than the
    last of its room, so any number of writers stay gap-free.
    """

    def lastSeq(room: str) -> object:
        """
        Fires with the highest C{seq} stored for C{room} (0 for none).
        """

    def storeMessages(messages: list[tuple[str, str, str, str]]) -> object:
        """
        Store (room, sender, text, ts) rows in one transaction, numbering
        each; fires with (seqs in the order given, C{time.monotonic()} of
        the commit).
        """

    def history(room: str, after: int, limit: int) -> object:
        """
        Fires with up to C{limit} L{HistoryRow}s of C{room} after C{after},
        oldest first.
        """

    def recentHistory(room: str, limit: int) -> object:
        """
        Fires with the last C{limit} L{HistoryRow}s of C{room}, oldest first.
        """

    def roomsWithHistory(limit: int) -> object:
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

    def integrityCheck() -> object:
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

    def roomMessages(room: str, outgoing: object) -> None:
        """
        Committed messages of C{room}, in C{seq} order.
        """

    def presence(room: str, outgoing: object) -> None:
        """
        Someone joined or left C{room}.
        """

    def privateMessage(outgoing: object) -> None:
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

    def publish(channel: str, payload: bytes) -> object:
        """
        Send C{payload} to every subscriber of C{channel} on every node
        (this one included); fires once handed to the bus.
        """

    def subscribe(channel: str, receiver: object) -> None:
        """
        Call C{receiver(payload)} on the reactor thread for each payload
        published on C{channel} from now on (kept across reconnections).
        """

    def unsubscribe(channel: str, receiver: object) -> None:
        """
        Stop calling C{receiver} for C{channel}.
        """

    def onReconnect(callback: object) -> None:
        """
        Call C{callback()} each time the bus is connected again after a
        loss (publications meanwhile may be lost: catch up from the store).
        """
