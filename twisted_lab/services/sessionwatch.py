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
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from twisted_lab.codecs import events
from twisted_lab.codecs.errors import ErrorCode

POLL_SECONDS = 0.5
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

    def __init__(self, store: SessionStore, clock: IReactorTime, idle: float) -> None:
        self.store = store
        self.clock = clock
        self.idle = idle
        self._holders: dict[bytes, set[SessionHolder]] = {}
        self._held: dict[SessionHolder, tuple[bytes, float]] = {}
        self._users: dict[SessionHolder, str] = {}
        self._position: int | None = None
        self._firstHeld: float | None = None
        self._failing = False
        self._timer: IDelayedCall | None = None
        self._polling: defer.Deferred[None] | None = None

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

    def _end(self, holder: SessionHolder, code: str, reason: str) -> None:
        self.release(holder)
        holder.sessionEnded(code, _REASONS.get(reason, reason))

    def _poll(self) -> None:
        self._timer = None
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
            self._timer = self.clock.callLater(POLL_SECONDS, self._poll)

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
