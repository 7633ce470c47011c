"""
Live sessions: a revoked or expired session stops working on every open
connection that uses it, within a second, on every server sharing the store.

A token is checked when a connection logs in or resumes; after that the
connection I{holds} the session.  L{SessionWatch} keeps the holders of one
server and ends their sessions when:

  - this server revokes it (logout, a password change): at once;
  - another server sharing the database revokes it: the store keeps a log
    of revocations, read by position every L{POLL_SECONDS};
  - it expires: each holder's expiry is known, and when it comes the store
    is asked again.  An open connection holding a session is using it (a
    chat member who only listens is still there), so that use is recorded
    first: only the absolute limit ends a session held open.

The holder is told why (C{session_revoked} or C{session_expired}) and is
back to unauthenticated.  The watch costs one small query per poll while
any session is held, and nothing while none is.

On a cluster the nodes share a bus, and a node that revokes sessions says
so on it (L{announce}): the others read the revocation log at once
instead of at their next poll, so a logout on one node reaches the other
nodes' connections in a few milliseconds rather than up to
L{POLL_SECONDS}.  The publication is a hint and carries nothing but who
sent it: the log in the store is the record (a lost hint costs at most one
poll interval), and a forged one costs a query, never a session.
"""

from __future__ import annotations

import secrets
from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from twisted_lab.codecs import events
from twisted_lab.codecs.errors import ErrorCode
from twisted_lab.ports import IBus

POLL_SECONDS = 0.5
#: The bus channel on which a node says it revoked sessions.
REVOCATIONS_CHANNEL = "netlab:sessions:revoked"
#: Hints make a node read the log at most this often (a flood of logouts
#: elsewhere costs at most 20 queries a second, coalesced).
HINT_INTERVAL = 0.05
#: Seconds by which the clocks of servers sharing a store may disagree.
CLOCK_MARGIN = 5.0

#: Why a session ended, as the error code its holders receive.
REVOKED = ErrorCode.SESSION_REVOKED
EXPIRED = ErrorCode.SESSION_EXPIRED

_REASONS = {
    "logged_out": "the session was logged out",
    "password_changed": "the password was changed",
}


class SessionHolder(Protocol):
    """
    A connection holding a session.
    """

    def sessionEnded(self, code: str, reason: str) -> None:
        """
        The session is over: tell the client and forget the login.
        """


class SessionStore(Protocol):
    def revocationsAfter(
        self, position: int
    ) -> defer.Deferred[list[tuple[int, bytes, str]]]: ...

    def lastRevocation(self) -> defer.Deferred[int]: ...

    def revocationsSince(
        self, at: float
    ) -> defer.Deferred[list[tuple[int, bytes, str]]]: ...

    def refreshSession(
        self, digest: bytes, lastUsed: float, now: float, idle: float
    ) -> defer.Deferred[float | None]: ...


class SessionWatch:
    """
    The sessions held by one server's connections, and their end.
    """

    log = Logger()

    def __init__(
        self,
        store: SessionStore,
        clock: IReactorTime,
        idle: float,
        *,
        bus: IBus | None = None,
        node: str = "",
    ) -> None:
        self.store = store
        self.clock = clock
        self.idle = idle
        #: The bus to the other nodes (L{None}: polling alone), and how
        #: this watch signs its hints (the node's name, and a nonce that
        #: tells this process from an earlier one of the same name).
        self.bus = bus
        self._me = f"{node}/{secrets.token_hex(4)}".encode()
        self._again = False
        self._pollStarted = float("-inf")
        self._holders: dict[bytes, set[SessionHolder]] = {}
        self._held: dict[SessionHolder, tuple[bytes, float]] = {}
        self._users: dict[SessionHolder, str] = {}
        self._position: int | None = None
        self._firstHeld: float | None = None
        self._failing = False
        self._hintFailing = False
        self._timer: IDelayedCall | None = None
        self._polling: defer.Deferred[None] | None = None
        if bus is not None:
            bus.subscribe(REVOCATIONS_CHANNEL, self._hinted)

    def hold(
        self, holder: SessionHolder, digest: bytes, expiresAt: float, username: str
    ) -> None:
        """
        C{holder} now uses the session C{digest} of C{username}, valid
        until C{expiresAt}.
        """
        self.release(holder)
        if self._firstHeld is None:
            self._firstHeld = self.clock.seconds()
        self._holders.setdefault(digest, set()).add(holder)
        self._held[holder] = (digest, expiresAt)
        self._users[holder] = username
        if self._timer is None and self._polling is None:
            self._timer = self.clock.callLater(POLL_SECONDS, self._poll)

    def release(self, holder: SessionHolder) -> None:
        """
        C{holder} no longer uses a session (logged out, closed).
        """
        entry = self._held.pop(holder, None)
        if entry is None:
            return
        del self._users[holder]
        holders = self._holders.get(entry[0])
        if holders is not None:
            holders.discard(holder)
            if not holders:
                del self._holders[entry[0]]
        if not self._held and self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def holders(self, digest: bytes) -> list[SessionHolder]:
        return list(self._holders.get(digest, ()))

    def digestsOf(self, username: str) -> set[bytes]:
        """
        The sessions of C{username} held here (a rare question: a password
        change asks it).
        """
        return {
            self._held[holder][0]
            for holder, user in self._users.items()
            if user == username
        }

    def revoked(
        self, digest: bytes, reason: str, exclude: SessionHolder | None = None
    ) -> None:
        """
        This server revoked C{digest}: end it on every other holder now.
        """
        for holder in self.holders(digest):
            if holder is not exclude:
                self._end(holder, REVOKED, reason)

    def announce(self) -> None:
        """
        This node has revoked sessions in the store: tell the other nodes
        to read the log now.  A hint: if it is lost (the bus is down), their
        next poll finds the revocation anyway.
        """
        if self.bus is None:
            return
        publishing = defer.maybeDeferred(
            self.bus.publish, REVOCATIONS_CHANNEL, self._me
        )
        publishing.addCallbacks(self._hintSent, self._hintLost)

    def _hintSent(self, _: object) -> None:
        self._hintFailing = False

    def _hintLost(self, failure: Any) -> None:
        # A hint: the other nodes' next poll finds the revocation anyway.
        # Said when hints start being lost, not for every one.
        if not self._hintFailing:
            self._hintFailing = True
            self.log.warn(
                "cannot hint other nodes of a revocation (their poll will "
                "find it): {reason}",
                event=events.BUS_PUBLISH_FAILED,
                reason=failure.getErrorMessage(),
            )

    def _hinted(self, payload: bytes) -> None:
        """
        Another node revoked sessions: read the log soon (at once, unless
        a hint made this watch read it less than L{HINT_INTERVAL} ago).
        """
        if payload == self._me or not self._held:
            return
        if self._polling is not None:
            self._again = True
            return
        now = self.clock.seconds()
        due = max(now, self._pollStarted + HINT_INTERVAL)
        timer = self._timer
        if timer is not None and timer.active() and timer.getTime() > due:
            timer.reset(due - now)

    def _end(self, holder: SessionHolder, code: str, reason: str) -> None:
        self.release(holder)
        holder.sessionEnded(code, _REASONS.get(reason, reason))

    def _poll(self) -> None:
        self._timer = None
        self._again = False
        self._pollStarted = self.clock.seconds()
        self._polling = defer.ensureDeferred(self._check())
        self._polling.addErrback(self._failed)
        self._polling.addBoth(self._polled)

    def _failed(self, failure: Any) -> None:
        # The store is down, say: the next poll tries again.  Said when it
        # starts failing, not twice a second while it fails.
        if not self._failing:
            self._failing = True
            self.log.warn(
                "cannot check sessions: {reason}",
                event=events.INTERNAL_ERROR,
                reason=failure.getErrorMessage(),
            )

    def _polled(self, _: object) -> None:
        self._polling = None
        if self._held and self._timer is None:
            delay = POLL_SECONDS
            if self._again:
                # A hint came while this poll ran: it may have missed it.
                soonest = self._pollStarted + HINT_INTERVAL - self.clock.seconds()
                delay = max(0.0, soonest)
            self._timer = self.clock.callLater(delay, self._poll)
        self._again = False

    async def _check(self) -> None:
        store = self.store
        expireAll = False
        if self._position is None:
            # The first look: revocations made since the first session was
            # held (a margin for clocks), then the log from its newest entry
            # (kept only once both reads succeeded).
            position = await store.lastRevocation()
            assert self._firstHeld is not None
            for _, digest, reason in await store.revocationsSince(
                self._firstHeld - CLOCK_MARGIN
            ):
                for holder in self.holders(digest):
                    self._end(holder, REVOKED, reason)
            self._position = position
            # And every held session is checked once against the store.
            expireAll = True
        while True:
            rows = await store.revocationsAfter(self._position)
            for position, digest, reason in rows:
                self._position = position
                for holder in self.holders(digest):
                    self._end(holder, REVOKED, reason)
            if len(rows) < 1000:
                break
        now = self.clock.seconds()
        for holder, (digest, expiresAt) in list(self._held.items()):
            if expiresAt > now and not expireAll:
                continue
            renewed = await store.refreshSession(digest, now, now, self.idle)
            if self._held.get(holder, (None,))[0] != digest:
                continue  # logged out or changed session meanwhile
            if renewed is None:
                self._end(holder, EXPIRED, "the session has expired or was revoked")
            else:
                self._held[holder] = (digest, renewed)
        self._failing = False

    def stop(self) -> defer.Deferred[None]:
        """
        Stop polling (the server is stopping); fires once no poll runs.
        """
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._held.clear()
        self._users.clear()
        self._holders.clear()
        polling = self._polling
        if polling is None:
            return defer.succeed(None)
        done: defer.Deferred[None] = defer.Deferred()
        polling.addBoth(lambda _: done.callback(None))
        return done
