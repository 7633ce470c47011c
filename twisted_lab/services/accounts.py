"""
Accounts: username and password rules, password hashing, session tokens and
throttling, everything the auth and chat services share about who a user is.

  - Usernames: the raw length is checked first, then Unicode NFKC and
    case-folding, then C{[a-z0-9_.-]{3,32}}: C{Alice}, C{ALICE} and
    fullwidth C{ａｌｉｃｅ} are one account.
  - Passwords: 8 characters to 1024 bytes of UTF-8, checked before hashing;
    stored only as argon2id hashes made by passlib (C{libpass}), in threads,
    at most as many at once as there are cores (each hash holds its full
    memory cost while it runs).
  - Tokens: C{secrets.token_urlsafe(32)} (256 bits), stored only as their
    SHA-256 digest.
  - Throttles (L{twisted_lab.services.limits}) are applied by the auth protocol.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import threading
import time
import unicodedata
from collections.abc import Callable
from typing import Any

from passlib.context import CryptContext
from twisted.internet import defer, threads
from twisted.python.threadpool import ThreadPool

from twisted_lab.codecs.errors import ErrorCode
from twisted_lab.codecs.message import RequestError

USERNAME_PATTERN = re.compile(r"[a-z0-9_.-]{3,32}")
MAX_RAW_USERNAME = 128
MIN_PASSWORD_CHARS = 8
MAX_PASSWORD_BYTES = 1024

#: OWASP's minimum for argon2id (2025): m = 19 MiB, t = 2, p = 1.
DEFAULT_MEMORY_KIB = 19 * 1024
DEFAULT_TIME_COST = 2
DEFAULT_PARALLELISM = 1


def canonicalUsername(raw: str) -> str:
    """
    The account name for C{raw}, or L{RequestError} C{invalid_username}.
    """
    if len(raw) > MAX_RAW_USERNAME:
        raise RequestError(
            ErrorCode.INVALID_USERNAME, "a username has 3 to 32 characters"
        )
    folded = unicodedata.normalize(
        "NFKC", unicodedata.normalize("NFKC", raw).casefold()
    )
    if not USERNAME_PATTERN.fullmatch(folded):
        raise RequestError(
            ErrorCode.INVALID_USERNAME,
            "a username has 3 to 32 characters from a-z, 0-9, '_', '.', '-' "
            "(upper case and fullwidth letters count as lower case)",
        )
    return folded


def checkPassword(password: str) -> None:
    """
    L{RequestError} C{weak_password} unless C{password} fits the rules.
    """
    if len(password) > MAX_PASSWORD_BYTES or (
        len(password.encode("utf-8")) > MAX_PASSWORD_BYTES
    ):
        raise RequestError(
            ErrorCode.WEAK_PASSWORD,
            f"a password has at most {MAX_PASSWORD_BYTES} bytes",
        )
    if len(password) < MIN_PASSWORD_CHARS:
        raise RequestError(
            ErrorCode.WEAK_PASSWORD,
            f"a password has at least {MIN_PASSWORD_CHARS} characters",
        )


def newToken() -> str:
    """
    A fresh session token: 256 random bits, URL-safe text.
    """
    return secrets.token_urlsafe(32)


def tokenDigest(token: str) -> bytes:
    """
    What the store keeps of a token.  Any string has a digest, so a
    non-ASCII or absurd token is simply unknown, never a crash.
    """
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


#: How much nicer than the server's other threads the hashing threads are.
HASH_THREAD_NICENESS = 10


def _lowerThisThreadsPriority() -> None:
    """
    Make the calling thread background work for the OS scheduler (Linux
    schedules threads individually).  Hashing keeps every idle core busy,
    but the reactor and database threads preempt it at once, so requests
    that need no hash (whoami, chat) stay fast during a login storm.
    """
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), HASH_THREAD_NICENESS)


def _daemonThread(*args: Any, **kwargs: Any) -> threading.Thread:
    return threading.Thread(*args, daemon=True, **kwargs)


class PasswordHasher:
    """
    argon2id hashing off the reactor thread, with bounded concurrency.

    Hashes run in a thread pool of their own, whose threads run at a lower
    OS priority than the reactor's, and a L{defer.DeferredSemaphore} lets at
    most C{concurrency} (default: the number of cores) run at once, since
    each holds its full memory cost while it runs.
    """

    def __init__(
        self,
        memoryKiB: int = DEFAULT_MEMORY_KIB,
        timeCost: int = DEFAULT_TIME_COST,
        parallelism: int = DEFAULT_PARALLELISM,
        concurrency: int | None = None,
        *,
        reactor: Any,
    ) -> None:
        self.context = CryptContext(
            schemes=["argon2"],
            argon2__type="ID",
            argon2__memory_cost=memoryKiB,
            argon2__time_cost=timeCost,
            argon2__parallelism=parallelism,
        )
        self.concurrency = concurrency or os.cpu_count() or 1
        self.semaphore = defer.DeferredSemaphore(self.concurrency)
        self._reactor = reactor
        self._pool: ThreadPool | None = None
        self._niced = threading.local()
        self._dummy: str | None = None
        #: Called in the hashing thread with the seconds each hash took
        #: (for --metrics; it must be thread-safe).
        self.onHashed: Callable[[float], object] | None = None

    def _threadPool(self) -> tuple[Any, ThreadPool]:
        if self._pool is None:
            self._pool = ThreadPool(0, self.concurrency, name="netlab-hash")
            # Daemon threads: a hash still running when the process exits
            # answers nobody, so it must not hold the exit up.
            self._pool.threadFactory = _daemonThread  # type: ignore[assignment]
            self._pool.start()
            self._reactor.addSystemEventTrigger("during", "shutdown", self.stop)
        return self._reactor, self._pool

    def stop(self) -> None:
        """
        Stop the hashing threads (at shutdown; also for tests).
        """
        if self._pool is not None:
            self._pool.stop()
            self._pool = None

    def _run(self, function: Any, *args: Any) -> Any:
        if not getattr(self._niced, "done", False):
            _lowerThisThreadsPriority()
            self._niced.done = True
        started = time.perf_counter()
        try:
            return function(*args)
        finally:
            onHashed = self.onHashed
            if onHashed is not None:
                onHashed(time.perf_counter() - started)

    def _inThread(self, function: Any, *args: Any) -> defer.Deferred[Any]:
        reactor, pool = self._threadPool()
        return self.semaphore.run(
            threads.deferToThreadPool, reactor, pool, self._run, function, *args
        )

    def hash(self, password: str) -> defer.Deferred[str]:
        """
        A new salted hash of C{password}.
        """
        return self._inThread(self.context.hash, password)

    def verify(
        self, password: str, stored: str | None
    ) -> defer.Deferred[tuple[bool, str | None]]:
        """
        (matches, new hash or None): C{new hash} is set when the stored hash
        uses older parameters and should be replaced.  A missing account
        (C{stored=None}) is checked against a dummy hash, so it takes as
        long as a wrong password and can only fail.
        """
        if stored is None:
            return self._inThread(self._verifyDummy, password)
        return self._inThread(self.context.verify_and_update, password, stored)

    def _verifyDummy(self, password: str) -> tuple[bool, None]:
        if self._dummy is None:
            self._dummy = self.context.hash(secrets.token_urlsafe(16))
        self.context.verify(password, self._dummy)
        return False, None
