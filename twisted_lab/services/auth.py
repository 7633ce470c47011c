"""
The authentication service (C{twistd netlab-auth}): register, log in,
resume a session with a token, log out, change password
(C{docs/protocol.md} section 3.2).

Authentication goes through L{twisted.cred}: a L{Portal} with two checkers
(L{PasswordChecker} for L{IUsernamePassword}, verifying argon2id hashes in
threads; L{TokenChecker} for L{ISessionToken}) and a realm that hands the
connection (the I{mind}) an L{IAccount} avatar.  The chat service reuses
all of it: L{AuthSession} is the base of its session.

L{AuthService} is plain logic on a clock and a store: each connection,
whatever transport carries it, gets an L{AuthSession} (its request
handler); the wiring is in L{twisted_lab.taps.auth}.

The login throttles and the registrations per address are kept by an
L{IThrottleBackend}: in this process for a lone node
(L{twisted_lab.services.limits.LocalThrottles}), on the cluster's shared
server when the nodes share a bus (the wiring decides), so that N nodes
count guesses as one.  Checking them is asynchronous either way; a check
that cannot be made (the shared server is down) refuses the request with
C{internal_error}, and no password is hashed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ICredentials, IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from zope.interface import Attribute, Interface, implementer

from twisted_lab.codecs import events
from twisted_lab.codecs.errors import ErrorCode
from twisted_lab.codecs.message import (
    Message,
    RequestError,
    Text,
    rfc3339,
)
from twisted_lab.ports import (
    IAccountStore,
    IBus,
    IRequestChannel,
    IThrottleBackend,
)
from twisted_lab.services.accounts import (
    PasswordHasher,
    canonicalUsername,
    checkPassword,
    newToken,
    tokenDigest,
)
from twisted_lab.services.context import ServerContext
from twisted_lab.services.handler import RequestHandler
from twisted_lab.services.limits import (
    FORGET_AFTER,
    LocalThrottles,
    RequestLimit,
    backoffDelays,
)
from twisted_lab.services.sessionwatch import SessionWatch

T = TypeVar("T")

DEFAULT_PORT = 9092
DEFAULT_SESSION_IDLE = 24 * 3600.0
DEFAULT_SESSION_MAX = 7 * 24 * 3600.0
DEFAULT_REGISTRATIONS_PER_HOUR = 20
#: Failed logins before back-off starts: per account, per client address.
ACCOUNT_FREE_FAILURES = 5
ADDRESS_FREE_FAILURES = 20
#: The names of the throttles in the L{IThrottleBackend}: failed password
#: checks per account and per client address group, registrations per
#: address group.
ACCOUNT_THROTTLE = "account"
ADDRESS_THROTTLE = "address"
REGISTRATIONS = "registrations"

BAD_CREDENTIALS = RequestError(ErrorCode.BAD_CREDENTIALS, "wrong username or password")


class ThrottlesUnavailable(RequestError):
    """
    The throttles could not be checked (the cluster's shared server is
    unreachable): the request is refused, as any request is while a part
    of the server it needs is down.
    """

    def __init__(self) -> None:
        super().__init__(
            ErrorCode.INTERNAL_ERROR,
            "the server cannot check its limits now; try again shortly",
        )


# -- cred: credentials, checkers, realm --------------------------------------


class ISessionToken(ICredentials):
    """
    A session token presented to resume a session.
    """

    token = Attribute("The token, as the client sent it.")


@implementer(IUsernamePassword)
class PasswordCredentials:
    """
    A username and password as text.  Unlike Twisted's C{UsernamePassword}
    it cannot check itself: passwords are only ever checked against a
    slow hash, by L{PasswordChecker}, never with C{==}.
    """

    def __init__(self, username: str, password: str) -> None:
        self.username = username
        self.password = password

    def checkPassword(self, password: Any) -> bool:
        raise NotImplementedError("use PasswordChecker")


@implementer(ISessionToken)
class SessionToken:
    def __init__(self, token: str) -> None:
        self.token = token
        #: Set by L{TokenChecker}: when the session expires if left idle.
        self.expiresAt = 0.0


class IAccount(Interface):
    """
    The avatar of a logged-in user.
    """

    username = Attribute("The canonical username.")


@implementer(IAccount)
class Account:
    def __init__(self, username: str) -> None:
        self.username = username


@implementer(ICredentialsChecker)
class PasswordChecker:
    """
    Checks a username and password against the stored argon2id hash.
    Unknown users are checked against a dummy hash (same time, same
    answer); a hash made with older parameters is replaced on success.
    The password is never compared with C{==}.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, store: IAccountStore, hasher: PasswordHasher) -> None:
        self.store = store
        self.hasher = hasher

    async def _check(self, credentials: Any) -> str:
        username = credentials.username
        stored = await self.store.passwordHash(username) if username else None
        ok, newHash = await self.hasher.verify(credentials.password, stored)
        if not ok:
            raise UnauthorizedLogin()
        if newHash is not None:
            await self.store.setPasswordHash(username, newHash)
        return str(username)

    def requestAvatarId(self, credentials: Any) -> Any:
        return defer.ensureDeferred(self._check(credentials))


@implementer(ICredentialsChecker)
class TokenChecker:
    """
    Checks a session token: its digest must name a live session.
    """

    credentialInterfaces = (ISessionToken,)

    def __init__(self, store: IAccountStore, clock: Any, idle: float) -> None:
        self.store = store
        self.clock = clock
        self.idle = idle

    async def _check(self, credentials: Any) -> str:
        session = await self.store.useSession(
            tokenDigest(credentials.token), self.clock.seconds(), self.idle
        )
        if session is None:
            raise UnauthorizedLogin()
        username, credentials.expiresAt = session
        return username

    def requestAvatarId(self, credentials: Any) -> Any:
        return defer.ensureDeferred(self._check(credentials))


@implementer(IRealm)
class AccountRealm:
    """
    Makes the L{IAccount} avatar of a logged-in user.
    """

    def requestAvatar(
        self, avatarId: Any, mind: Any, *interfaces: Any
    ) -> tuple[Any, Account, Any]:
        if IAccount not in interfaces:
            raise NotImplementedError("only IAccount avatars are made here")
        return IAccount, Account(avatarId), lambda: None


# -- the protocol -----------------------------------------------------------


USERNAME = Text(maxChars=1024)
PASSWORD = Text(maxChars=4096)

#: The rate of each request kind (docs/protocol.md, "Limits").  Password
#: guesses are bounded by the login throttles, not by these.
AUTH_LIMITS = {
    "register": RequestLimit(rate=1.0, burst=5, perUser=False),
    "login": RequestLimit(rate=2.0, burst=10, perUser=False),
    "resume": RequestLimit(rate=2.0, burst=10, perUser=False),
    "whoami": RequestLimit(rate=10.0, burst=50),
    "logout": RequestLimit(rate=2.0, burst=10),
    "change_password": RequestLimit(rate=0.2, burst=3),
    "ping": RequestLimit(rate=50.0, burst=500, perUser=False),
}


class AuthSession(RequestHandler):
    """
    One client of the auth service (and the base of the chat session): its
    requests, and the account it acts as once logged in.  The connection
    (any transport) is the I{mind} handed to the portal.
    """

    requests = {
        "register": {"username": USERNAME, "password": PASSWORD},
        "login": {"username": USERNAME, "password": PASSWORD},
        "resume": {"token": Text(maxChars=4096)},
        "whoami": {},
        "logout": {},
        "change_password": {"old": PASSWORD, "new": PASSWORD},
        "ping": {},
    }

    limits = AUTH_LIMITS

    def __init__(
        self, channel: IRequestChannel, context: ServerContext, service: AuthService
    ) -> None:
        super().__init__(channel, context)
        self.service = service

    account: Account | None = None
    sessionDigest: bytes | None = None
    _logout: Any = None

    def rateKey(self) -> str | None:
        return self.account.username if self.account is not None else None

    async def checkingPassword(
        self, username: str, check: Callable[[], Awaitable[T]]
    ) -> T:
        """
        Run C{check} (a password check: a slow hash) for C{username} under
        the login throttles, which every request that checks a password
        shares (on every node of a cluster).  The attempt is counted on the
        account and the address at once, before the hash starts, so guesses
        sent at once count as they arrive; a success gives it back.  If
        either is blocked nothing is counted: an attempt that never reaches
        the hash must not re-block the account.  Throttles that cannot be
        checked refuse the attempt (C{internal_error}), never skip it.
        """
        service = self.service
        throttles = service.throttles
        address = (ADDRESS_THROTTLE, self.channel.group)
        account = (ACCOUNT_THROTTLE, username)
        try:
            wait = await throttles.reserve([address, account])
        except Exception as e:  # noqa: BLE001 (any failure refuses: fail safe)
            self.context.stats.authAttempt("password", "error")
            self._throttlesUnavailable(e)
            raise ThrottlesUnavailable() from None
        if wait:
            self.context.stats.authAttempt("password", "throttled")
            raise self.rateLimited(wait, "password")
        try:
            result = await check()
        except UnauthorizedLogin:
            self.context.stats.authAttempt("password", "failure")
            if self.context.logBudget.admit(events.LOGIN_FAILED):
                self.log.info(
                    "{peer}: wrong password for {username}",
                    event=events.LOGIN_FAILED,
                    peer=self.peer,
                    username=username,
                )
            raise BAD_CREDENTIALS from None
        except BaseException:
            self.context.stats.authAttempt("password", "error")
            # Not waited for: the error stands either way.
            self._settle(throttles.release([address, account]))
            raise
        self.context.stats.authAttempt("password", "success")
        await self._settle(
            defer.gatherResults(
                [throttles.succeeded([account]), throttles.release([address])],
                consumeErrors=True,
            )
        )
        return result

    def _settle(self, settling: defer.Deferred[Any]) -> defer.Deferred[None]:
        """
        The throttles taking back a reserved attempt.  If they cannot (the
        shared server went down meanwhile), the attempt stays counted as a
        failure (until it is forgotten): the answer the check gave stands,
        and the log says so.
        """

        def failed(failure: Any) -> None:
            self._throttlesUnavailable(failure.value)

        return settling.addCallbacks(lambda _: None, failed)

    def _throttlesUnavailable(self, reason: BaseException) -> None:
        """
        The throttles could not be reached: log it (within the log budget:
        while the shared server is down every login says so).
        """
        if isinstance(reason, defer.FirstError) and reason.subFailure.value:
            reason = reason.subFailure.value
        if self.context.logBudget.admit(events.THROTTLES_UNAVAILABLE):
            self.log.warn(
                "{peer}: the throttles cannot be checked ({reason})",
                event=events.THROTTLES_UNAVAILABLE,
                peer=self.peer,
                reason=str(reason) or type(reason).__name__,
            )

    async def request_register(self, message: Message) -> Message:
        service = self.service
        try:
            wait = await service.throttles.take(REGISTRATIONS, self.channel.group)
        except Exception as e:  # noqa: BLE001 (any failure refuses: fail safe)
            self._throttlesUnavailable(e)
            raise ThrottlesUnavailable() from None
        if wait:
            raise self.rateLimited(wait, "registration")
        username = canonicalUsername(message["username"])
        checkPassword(message["password"])
        passwordHash = await service.hasher.hash(message["password"])
        if not await service.store.createAccount(
            username, passwordHash, self.context.now()
        ):
            raise RequestError(ErrorCode.USERNAME_TAKEN, f"{username!r} is taken")
        self.log.info(
            "{peer} registered {username}",
            event=events.USER_REGISTERED,
            peer=self.peer,
            username=username,
        )
        return {"type": "registered", "username": username}

    async def request_login(self, message: Message) -> Message:
        try:
            username = canonicalUsername(message["username"])
        except RequestError:
            username = ""  # cannot exist: checked against the dummy hash
        credentials = PasswordCredentials(username, message["password"])
        _, avatar, logout = await self.checkingPassword(
            username,
            lambda: self.service.portal.login(credentials, self, IAccount),
        )
        return await self._startSession(avatar, logout, events.LOGIN_SUCCEEDED)

    async def _startSession(self, avatar: Any, logout: Any, event: str) -> Message:
        service = self.service
        token = newToken()
        digest = tokenDigest(token)
        try:
            expires = await service.store.createSession(
                digest,
                avatar.username,
                self.context.now(),
                service.sessionIdle,
                service.sessionMax,
            )
        except BaseException:
            logout()
            raise
        self._loggedIn(avatar, digest, logout, expires)
        self.log.info(
            "{peer} logged in as {username}",
            event=event,
            peer=self.peer,
            username=avatar.username,
        )
        return self._sessionReply(token, expires)

    def _sessionReply(self, token: str, expires: float) -> Message:
        assert self.account is not None
        return {
            "type": "session",
            "username": self.account.username,
            "token": token,
            "expires_at": rfc3339(expires),
        }

    def _loggedIn(
        self, avatar: Account, digest: bytes, logout: Any, expiresAt: float
    ) -> None:
        """
        The connection now acts as C{avatar}, holding session C{digest};
        C{logout} (from the realm) is called when it stops doing so.
        """
        if self.channel.lost:
            # The connection closed while the check ran: nobody to act as.
            logout()
            return
        self._loggedOut()
        self.account = avatar
        self.sessionDigest = digest
        self._logout = logout
        self.service.sessions.hold(self, digest, expiresAt, avatar.username)

    def sessionEnded(self, code: str, reason: str) -> None:
        """
        The session this connection holds was revoked or expired (here or
        on another server): say so, and stop acting as its user.
        """
        account = self.account
        self._loggedOut()
        self.log.info(
            "{peer}: the session of {username} ended ({code})",
            event=events.SESSION_ENDED,
            peer=self.peer,
            username=account.username if account is not None else None,
            code=code,
        )
        self.send({"type": "error", "code": code, "message": reason})

    async def request_resume(self, message: Message) -> Message:
        credentials = SessionToken(message["token"])
        try:
            _, avatar, logout = await self.service.portal.login(
                credentials, self, IAccount
            )
        except UnauthorizedLogin:
            self.context.stats.authAttempt("token", "failure")
            raise RequestError(
                ErrorCode.INVALID_TOKEN, "unknown, expired or revoked token"
            ) from None
        self.context.stats.authAttempt("token", "success")
        self._loggedIn(
            cast(Account, avatar),
            tokenDigest(credentials.token),
            logout,
            credentials.expiresAt,
        )
        self.log.info(
            "{peer} resumed the session of {username}",
            event=events.SESSION_RESUMED,
            peer=self.peer,
            username=cast(Account, avatar).username,
        )
        return self._sessionReply(credentials.token, credentials.expiresAt)

    async def requireSession(self) -> Account:
        """
        The connection's account if its session is still live (it may have
        been revoked elsewhere or expired); else C{not_authenticated}.
        """
        if self.account is None or self.sessionDigest is None:
            raise RequestError(
                ErrorCode.NOT_AUTHENTICATED, "log in or resume a session first"
            )
        service = self.service
        live = await service.store.useSession(
            self.sessionDigest, self.context.now(), service.sessionIdle
        )
        if live is None:
            self._loggedOut()
            raise RequestError(
                ErrorCode.NOT_AUTHENTICATED, "the session has expired or was revoked"
            )
        return self.account

    def _loggedOut(self) -> None:
        logout, self._logout = self._logout, None
        self.account = None
        self.sessionDigest = None
        self.service.sessions.release(self)
        if logout is not None:
            logout()

    def connectionLost(self) -> None:
        self._loggedOut()

    async def request_whoami(self, message: Message) -> Message:
        account = await self.requireSession()
        return {"type": "identity", "username": account.username}

    async def request_logout(self, message: Message) -> Message:
        account = await self.requireSession()
        digest = self.sessionDigest
        assert digest is not None
        await self.service.store.deleteSession(digest, self.context.now())
        self._loggedOut()
        self.service.sessions.revoked(digest, "logged_out")
        self.service.sessions.announce()
        self.log.info(
            "{peer}: {username} logged out",
            event=events.LOGGED_OUT,
            peer=self.peer,
            username=account.username,
        )
        return {"type": "logged_out"}

    async def request_change_password(self, message: Message) -> Message:
        account = await self.requireSession()
        # The session this request runs in, read before anything waits: it
        # may end meanwhile (a logout elsewhere), and None would mean
        # "keep no session" to the store but "revoke nothing" below.
        ownDigest = self.sessionDigest
        assert ownDigest is not None, "requireSession checked it"
        service = self.service
        checkPassword(message["new"])
        credentials = PasswordCredentials(account.username, message["old"])
        await self.checkingPassword(
            account.username,
            lambda: service.passwordChecker.requestAvatarId(credentials),
        )
        newHash = await service.hasher.hash(message["new"])
        await service.store.setPasswordHash(
            account.username,
            newHash,
            keepSession=ownDigest,
            now=self.context.now(),
        )
        for digest in service.sessions.digestsOf(account.username):
            if digest != ownDigest:
                service.sessions.revoked(digest, "password_changed")
        service.sessions.announce()
        self.log.info(
            "{peer}: {username} changed password",
            event=events.PASSWORD_CHANGED,
            peer=self.peer,
            username=account.username,
        )
        return {"type": "password_changed"}

    def request_ping(self, message: Message) -> Message:
        return {"type": "pong"}


class AuthService:
    """
    The auth service: accounts, sessions, the login throttles, the portal.

    Plain logic on a clock and an L{IAccountStore}; each connection gets an
    L{AuthSession} from L{handlerFor}, whatever transport carries it.
    """

    sessionClass: type[AuthSession] = AuthSession

    def __init__(
        self,
        store: Any,
        hasher: PasswordHasher,
        context: ServerContext,
        *,
        sessionIdle: float = DEFAULT_SESSION_IDLE,
        sessionMax: float = DEFAULT_SESSION_MAX,
        registrationsPerHour: int = DEFAULT_REGISTRATIONS_PER_HOUR,
        bus: IBus | None = None,
        node: str = "",
        throttles: IThrottleBackend | None = None,
    ) -> None:
        self.store = store
        #: The bus to the other nodes sharing the store (None: alone), and
        #: this node's name.
        self.bus = bus
        self.node = node
        self.hasher = hasher
        self.context = context
        self.sessionIdle = sessionIdle
        self.sessionMax = sessionMax
        self.registrationsPerHour = registrationsPerHour
        clock = context.clock
        if clock is None:
            raise TypeError("the auth service needs its clock (the reactor)")
        context.requestLimits.update(self.sessionClass.limits)
        #: The login throttles and the registrations per address: this
        #: process's, or (given by the wiring) the cluster's.
        self.throttles: IThrottleBackend = (
            throttles if throttles is not None else LocalThrottles(clock)
        )
        delays = backoffDelays()
        self.throttles.defineFailures(
            ACCOUNT_THROTTLE, ACCOUNT_FREE_FAILURES, delays, FORGET_AFTER
        )
        self.throttles.defineFailures(
            ADDRESS_THROTTLE, ADDRESS_FREE_FAILURES, delays, FORGET_AFTER
        )
        self.throttles.defineBucket(
            REGISTRATIONS, registrationsPerHour, registrationsPerHour / 3600.0
        )
        self.passwordChecker = PasswordChecker(store, hasher)
        self.portal = Portal(
            self.makeRealm(),
            [self.passwordChecker, TokenChecker(store, clock, sessionIdle)],
        )
        self.sessions = SessionWatch(store, clock, sessionIdle, bus=bus, node=node)
        stats = context.stats
        if stats is not None:
            stats.enableRequests()
            stats.enableStore(store)
            stats.enableAuth(hasher)

    def makeRealm(self) -> Any:
        """
        The realm that makes avatars (the chat service makes chat users).
        """
        return AccountRealm()

    def handlerFor(self, channel: IRequestChannel) -> AuthSession:
        """
        The request handler of a new connection.
        """
        return self.sessionClass(channel, self.context, self)
