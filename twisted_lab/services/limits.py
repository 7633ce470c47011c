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
imports Twisted's reactor or any other part of netlab; the clock is passed in.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol


class Clock(Protocol):
    def seconds(self) -> float: ...


#: Keys a throttle or bucket holds at most; past it the least recently
#: touched are forgotten (an attacker cycling names cannot grow memory).
MAX_KEYS = 100_000


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
    key for C{base * 2 ** (n - free - 1)} seconds, capped at C{cap}.  A
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
        base: float = 1.0,
        cap: float = 900.0,
        forgetAfter: float = 3600.0,
        maxKeys: int = MAX_KEYS,
    ) -> None:
        self.clock = clock
        self.free = free
        self.base = base
        self.cap = cap
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
        return min(self.cap, self.base * 2 ** min(count - self.free - 1, 30))

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
