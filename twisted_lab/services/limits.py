"""
Rates and back-off: the arithmetic behind every limit a netlab server keeps.

  - L{TokenBucket}: at most C{burst} events at once per key, refilled at
    C{rate} per second (per-kind request rates, registrations, messages);
  - L{FailureThrottle}: exponential back-off after repeated failures per key
    (password checks), where an attempt I{reserves} its failure before the
    expensive check starts, so N concurrent guesses count as N;
  - L{RequestLimit}: the documented rate of one request kind, and whose
    bucket it draws from (the connection's or the user's).

Both keyed structures are bounded and cheap however many keys an attacker
invents: keys live in insertion/recency order, pruning only looks at the
oldest ones, and past C{maxKeys} the oldest are dropped.  Nothing here
imports Twisted's reactor; the clock is passed in.

The back-off formula is written once, in L{backoffDelays}: a failure
throttle keeps the table it makes, and the shared throttles of a cluster
(L{twisted_lab.bus.throttles}) are handed the same table, so a Lua script
looks a delay up rather than computing it a second way.  L{LocalThrottles}
is the in-process L{twisted_lab.ports.IThrottleBackend} of a lone node:
these same classes behind the interface every backend provides.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from twisted.internet import defer
from zope.interface import implementer

from twisted_lab.ports import IThrottleBackend


class Clock(Protocol):
    def seconds(self) -> float: ...


#: Keys a throttle or bucket holds at most; past it the least recently
#: touched are forgotten (an attacker cycling names cannot grow memory).
MAX_KEYS = 100_000

#: The back-off of a failure throttle: the first blocking failure blocks for
#: C{BACKOFF_BASE} seconds, each further one twice as long, up to
#: C{BACKOFF_CAP}; a key with no failure for C{FORGET_AFTER} is forgotten.
BACKOFF_BASE = 1.0
BACKOFF_CAP = 900.0
FORGET_AFTER = 3600.0


def backoffDelays(
    base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP
) -> tuple[float, ...]:
    """
    The back-off formula, as a table: entry C{i} is how long the
    C{i + 1}-th failure past the free ones blocks a key,
    C{min(cap, base * 2 ** i)}; the table stops at the cap (or after 31
    doublings) and its last entry holds for every failure after it.
    """
    delays = []
    for doublings in range(31):
        delay = min(cap, base * 2**doublings)
        delays.append(delay)
        if delay >= cap:
            break
    return tuple(delays)


def delayAfter(delays: Sequence[float], excess: int) -> float:
    """
    How long the C{excess}-th failure past the free ones (1, 2, ...)
    blocks a key, in the table C{delays} (L{backoffDelays}).
    """
    return delays[min(excess, len(delays)) - 1]


class TokenBucket:
    """
    At most C{burst} events at once per key, refilled at C{rate} per second.
    """

    def __init__(
        self, clock: Clock, burst: float, rate: float, maxKeys: int = MAX_KEYS
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs rate > 0 and burst >= 1")
        self.clock = clock
        self.burst = burst
        self.rate = rate
        self.maxKeys = maxKeys
        #: key -> (tokens, when counted); least recently used first.
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str) -> float:
        """
        Take one token: 0 if there was one, else the seconds until there is
        (nothing is taken then).
        """
        now = self.clock.seconds()
        buckets = self._buckets
        entry = buckets.pop(key, None)
        if entry is None:
            tokens = self.burst
            self._prune(now)
        else:
            tokens = min(self.burst, entry[0] + (now - entry[1]) * self.rate)
        if tokens >= 1:
            buckets[key] = (tokens - 1, now)
            return 0.0
        buckets[key] = (tokens, now)
        return (1 - tokens) / self.rate

    def _prune(self, now: float) -> None:
        """
        Forget the oldest keys whose bucket has refilled (they are the same
        as absent), and the oldest of all past C{maxKeys}.  Amortised O(1).
        """
        buckets = self._buckets
        while buckets:
            key, (tokens, then) = next(iter(buckets.items()))
            full = tokens + (now - then) * self.rate >= self.burst
            if not full and len(buckets) < self.maxKeys:
                break
            del buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)


@dataclass
class _Failures:
    count: int = 0
    lastFailure: float = 0.0
    blockedUntil: float = 0.0


class FailureThrottle:
    """
    Exponential back-off after repeated failures, per key.

    The first C{free} failures cost nothing; each one after that blocks the
    key for C{base * 2 ** (n - free - 1)} seconds, capped at C{cap}
    (L{backoffDelays}; or the table C{delays}, when given).  A
    success clears the key, and so does C{forgetAfter} seconds without a
    failure: the worst an attacker can do to a victim's account is make it
    wait C{cap} seconds between attempts.  (fail2ban's findtime/bantime,
    OpenSSH's MaxAuthTries, Dovecot's auth_failure_delay, combined.)

    L{reserve} counts an attempt as a failure I{before} the expensive check
    runs and L{release} takes it back when the check succeeds, so attempts
    made concurrently are counted as they start, not as they finish.
    """

    def __init__(
        self,
        clock: Clock,
        free: int,
        base: float = BACKOFF_BASE,
        cap: float = BACKOFF_CAP,
        forgetAfter: float = FORGET_AFTER,
        maxKeys: int = MAX_KEYS,
        *,
        delays: Sequence[float] | None = None,
    ) -> None:
        self.clock = clock
        self.free = free
        self.base = base
        self.cap = cap
        self.delays = tuple(delays) if delays else backoffDelays(base, cap)
        self.forgetAfter = forgetAfter
        self.maxKeys = maxKeys
        #: Least recently failed first, so pruning only looks at the front.
        self._keys: OrderedDict[str, _Failures] = OrderedDict()

    def retryAfter(self, key: str) -> float:
        """
        Seconds until C{key} may try again (0: now).
        """
        entry = self._current(key)
        if entry is None:
            return 0.0
        return max(0.0, entry.blockedUntil - self.clock.seconds())

    def reserve(self, key: str) -> float:
        """
        Start an attempt for C{key}: if it is blocked, the seconds to wait
        (and nothing is counted); otherwise 0, and the attempt is counted
        as a failure until L{release} or L{succeeded} says otherwise.
        """
        wait = self.retryAfter(key)
        if wait:
            return wait
        self.failed(key)
        return 0.0

    def failed(self, key: str) -> None:
        """
        Count one failure for C{key}.
        """
        now = self.clock.seconds()
        entry = self._current(key)
        if entry is None:
            self._prune(now)
            entry = _Failures()
        else:
            del self._keys[key]
        self._keys[key] = entry
        entry.count += 1
        entry.lastFailure = now
        if entry.count > self.free:
            entry.blockedUntil = now + self._delay(entry.count)

    def release(self, key: str) -> None:
        """
        Take back one reserved attempt that turned out not to be a failure
        (the check succeeded, or could not be made).
        """
        entry = self._keys.get(key)
        if entry is None:
            return
        entry.count -= 1
        if entry.count <= 0:
            del self._keys[key]
        elif entry.count <= self.free:
            entry.blockedUntil = 0.0
        else:
            entry.blockedUntil = entry.lastFailure + self._delay(entry.count)

    def _delay(self, count: int) -> float:
        """
        How long C{count} failures (more than the free ones) block a key.
        """
        return delayAfter(self.delays, count - self.free)

    def succeeded(self, key: str) -> None:
        """
        Clear C{key}: its owner proved who they are.
        """
        self._keys.pop(key, None)

    def _current(self, key: str) -> _Failures | None:
        entry = self._keys.get(key)
        if entry is not None and (
            self.clock.seconds() - entry.lastFailure > self.forgetAfter
        ):
            del self._keys[key]
            return None
        return entry

    def _prune(self, now: float) -> None:
        """
        Forget the oldest keys nobody has failed on for C{forgetAfter}, and
        the oldest of all past C{maxKeys}.  Amortised O(1): the front of the
        order is the least recently failed.
        """
        keys = self._keys
        while keys:
            key, entry = next(iter(keys.items()))
            stale = now - entry.lastFailure > self.forgetAfter
            if not stale and len(keys) < self.maxKeys:
                break
            del keys[key]

    def __len__(self) -> int:
        return len(self._keys)


@dataclass(frozen=True)
class RequestLimit:
    """
    The documented rate of one request kind: C{rate} per second sustained,
    C{burst} at once, drawn from the user's bucket (shared by all of a
    user's connections) or, before login and for C{perUser=False}, the
    connection's own.  Kinds that name the same C{bucket} share it (a room
    message and a private message both draw on a user's messages).
    """

    rate: float
    burst: int
    perUser: bool = True
    bucket: str = ""


@implementer(IThrottleBackend)
class LocalThrottles:
    """
    The throttles of a lone node, in its process: each named throttle a
    L{FailureThrottle}, each bucket a L{TokenBucket}, behind the
    interface the shared ones provide (every answer an already fired
    Deferred: the check stays synchronous, so nothing can interleave
    between the check and the count).
    """

    def __init__(self, clock: Clock, maxKeys: int = MAX_KEYS) -> None:
        self.clock = clock
        self.maxKeys = maxKeys
        self.failures: dict[str, FailureThrottle] = {}
        self.buckets: dict[str, TokenBucket] = {}

    def defineFailures(
        self, name: str, free: int, delays: Sequence[float], forgetAfter: float
    ) -> None:
        self.failures[name] = FailureThrottle(
            self.clock,
            free,
            forgetAfter=forgetAfter,
            maxKeys=self.maxKeys,
            delays=delays,
        )

    def defineBucket(self, name: str, burst: float, rate: float) -> None:
        self.buckets[name] = TokenBucket(self.clock, burst, rate, self.maxKeys)

    def reserve(self, attempt: Sequence[tuple[str, str]]) -> defer.Deferred[float]:
        for name, key in attempt:
            wait = self.failures[name].retryAfter(key)
            if wait:
                return defer.succeed(wait)
        for name, key in attempt:
            self.failures[name].failed(key)
        return defer.succeed(0.0)

    def release(self, attempt: Sequence[tuple[str, str]]) -> defer.Deferred[None]:
        for name, key in attempt:
            self.failures[name].release(key)
        return defer.succeed(None)

    def succeeded(self, attempt: Sequence[tuple[str, str]]) -> defer.Deferred[None]:
        for name, key in attempt:
            self.failures[name].succeeded(key)
        return defer.succeed(None)

    def retryAfter(self, name: str, key: str) -> defer.Deferred[float]:
        return defer.succeed(self.failures[name].retryAfter(key))

    def take(self, name: str, key: str) -> defer.Deferred[float]:
        return defer.succeed(self.buckets[name].take(key))
