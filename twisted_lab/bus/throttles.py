"""
The throttles of a cluster, on its Redis-protocol server: the login
throttles and the registrations per address that every node shares, so
that N nodes give an attacker no more guesses than one
(L{twisted_lab.ports.IThrottleBackend}).

Each operation is one Lua script (C{EVALSHA}, through L{RedisBus.eval}),
run atomically by the server: checking a key and counting a failure on it
cannot be split by another node's attempt, so guesses sent at once to any
number of nodes are counted as they arrive, before any password is hashed.

Time is the server's (C{TIME} inside the script), in whole milliseconds:
the nodes' clocks may disagree, the server's is one.  The back-off is not
computed here: each throttle is handed its table of delays
(L{twisted_lab.services.limits.backoffDelays}), which the scripts index.

Keys (C{PREFIX} is C{netlab:} by default)::

    PREFIX throttle:NAME:DIGEST   a hash: n (failures), t (time of the last,
                                  ms), b (blocked until, ms); expires
                                  forgetAfter (1 h) after the last failure
    PREFIX bucket:NAME:DIGEST     a hash: k (tokens), t (when counted, ms);
                                  expires once the bucket would be full
                                  again (the same as absent)

C{NAME} is the throttle's name (a word chosen by the code: C{account},
C{address}, C{registrations}); C{DIGEST} is a 128-bit BLAKE2b digest of the
key (a username, an address group), so what an attacker types never
becomes part of a key name, whatever its size, and every key lives until
its TTL at most: memory is bounded by the keys touched in the last hour.

When the server cannot be reached every operation fails (with
L{twisted_lab.bus.errors.BusUnavailable}, or a timeout after
C{timeout} seconds while the server does not answer): the service then
refuses the login or registration, it never runs it unthrottled.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from twisted_lab.ports import IThrottleBackend

#: Seconds an operation may wait for the server before it fails.
DEFAULT_TIMEOUT = 2.0

_NAME = re.compile(r"[a-z][a-z0-9_.-]{0,31}\Z")

_HELPERS = """
local function nowMs()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function delayMs(delays, excess)
  local found, i = 0, 0
  for d in string.gmatch(delays, '[^,]+') do
    i = i + 1
    found = tonumber(d)
    if i >= excess then break end
  end
  return found
end
"""

#: KEYS: one per failure throttle; ARGV, three per key: its free failures,
#: forget-after (ms), delays (ms, comma-separated).  Returns 0 (a failure
#: counted on every key) or the ms the first blocked key still is (nothing
#: counted).
RESERVE = (
    _HELPERS
    + """
local now = nowMs()
local counts = {}
for i, key in ipairs(KEYS) do
  local forget = tonumber(ARGV[3 * i - 1])
  local state = redis.call('HMGET', key, 'n', 't', 'b')
  local n = tonumber(state[1]) or 0
  if n > 0 and now - tonumber(state[2]) > forget then
    n = 0
  elseif n > 0 then
    local blocked = tonumber(state[3]) or 0
    if blocked > now then
      return blocked - now
    end
  end
  counts[i] = n
end
for i, key in ipairs(KEYS) do
  local free = tonumber(ARGV[3 * i - 2])
  local forget = tonumber(ARGV[3 * i - 1])
  local n = counts[i] + 1
  local blocked = 0
  if n > free then
    blocked = now + delayMs(ARGV[3 * i], n - free)
  end
  redis.call('HSET', key, 'n', n, 't', now, 'b', blocked)
  redis.call('PEXPIRE', key, math.max(forget, blocked - now) + 1000)
end
return 0
"""
)

#: Same KEYS and ARGV as RESERVE: one reserved failure taken back from each.
RELEASE = (
    _HELPERS
    + """
for i, key in ipairs(KEYS) do
  local free = tonumber(ARGV[3 * i - 2])
  local state = redis.call('HMGET', key, 'n', 't')
  local n = tonumber(state[1])
  if n then
    n = n - 1
    if n <= 0 then
      redis.call('DEL', key)
    elseif n <= free then
      redis.call('HSET', key, 'n', n, 'b', 0)
    else
      local blocked = tonumber(state[2]) + delayMs(ARGV[3 * i], n - free)
      redis.call('HSET', key, 'n', n, 'b', blocked)
    end
  end
end
return 0
"""
)

#: KEYS[1]: a failure throttle's key; ARGV[1]: forget-after (ms).  Returns
#: the ms it is still blocked (0: not).
RETRY_AFTER = (
    _HELPERS
    + """
local now = nowMs()
local state = redis.call('HMGET', KEYS[1], 'n', 't', 'b')
local n = tonumber(state[1]) or 0
if n == 0 or now - tonumber(state[2]) > tonumber(ARGV[1]) then
  return 0
end
local blocked = tonumber(state[3]) or 0
if blocked > now then
  return blocked - now
end
return 0
"""
)

#: KEYS[1]: a bucket's key; ARGV[1]: its burst; ARGV[2]: its rate (tokens
#: per ms).  Returns 0 (a token taken) or the ms until there is one.
TAKE = (
    _HELPERS
    + """
local now = nowMs()
local burst = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'k', 't')
local tokens = burst
if state[1] then
  local elapsed = math.max(0, now - tonumber(state[2]))
  tokens = math.min(burst, tonumber(state[1]) + elapsed * rate)
end
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = math.ceil((1 - tokens) / rate)
end
redis.call('HSET', KEYS[1], 'k', tokens, 't', now)
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate) + 1000)
return wait
"""
)


class Commands(Protocol):
    """
    What the throttles need of the bus (L{twisted_lab.bus.RedisBus}).
    """

    def eval(
        self, script: str, keys: Iterable[str | bytes] = (), args: Iterable[Any] = ()
    ) -> defer.Deferred[Any]: ...

    def delete(self, *keys: str | bytes) -> defer.Deferred[int]: ...


def keyDigest(key: str) -> str:
    """
    The fixed-size name of C{key} in the server (128-bit BLAKE2b, hex).
    """
    data = key.encode("utf-8", "surrogatepass")
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _milliseconds(seconds: float) -> int:
    return max(0, math.ceil(seconds * 1000))


@implementer(IThrottleBackend)
class RedisThrottles:
    """
    Failure throttles and token buckets kept on the cluster's server.

    @param bus: the L{twisted_lab.bus.RedisBus} (its commands connection).
    @param clock: the reactor, to bound the wait for an answer
        (C{timeout}); L{None}: wait as long as the bus does (its
        keep-alive fails a silent connection within about ten seconds).
    @param prefix: the start of every key (several clusters may share a
        server with different prefixes).
    """

    def __init__(
        self,
        bus: Commands,
        clock: IReactorTime | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        prefix: str = "netlab:",
    ) -> None:
        self.bus = bus
        self.clock = clock
        self.timeout = timeout
        self.prefix = prefix
        #: name -> (free, forget-after in ms, delays in ms as text)
        self._failures: dict[str, tuple[int, int, str]] = {}
        #: name -> (burst, rate in tokens per ms)
        self._buckets: dict[str, tuple[float, float]] = {}

    def _checkName(self, name: str) -> None:
        if not _NAME.match(name):
            raise ValueError(f"a throttle name is a short lowercase word: {name!r}")

    def defineFailures(
        self, name: str, free: int, delays: Sequence[float], forgetAfter: float
    ) -> None:
        self._checkName(name)
        if not delays:
            raise ValueError("a failure throttle needs at least one delay")
        table = ",".join(str(_milliseconds(delay)) for delay in delays)
        self._failures[name] = (int(free), _milliseconds(forgetAfter), table)

    def defineBucket(self, name: str, burst: float, rate: float) -> None:
        self._checkName(name)
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs rate > 0 and burst >= 1")
        self._buckets[name] = (float(burst), rate / 1000.0)

    def failureKey(self, name: str, key: str) -> str:
        return f"{self.prefix}throttle:{name}:{keyDigest(key)}"

    def bucketKey(self, name: str, key: str) -> str:
        return f"{self.prefix}bucket:{name}:{keyDigest(key)}"

    def _bounded(self, running: defer.Deferred[Any]) -> defer.Deferred[Any]:
        if self.clock is not None and self.timeout:
            running.addTimeout(self.timeout, self.clock)
        return running

    def _script(
        self, script: str, attempt: Sequence[tuple[str, str]]
    ) -> defer.Deferred[Any]:
        keys = []
        args: list[Any] = []
        for name, key in attempt:
            free, forget, table = self._failures[name]
            keys.append(self.failureKey(name, key))
            args += [free, forget, table]
        return self._bounded(self.bus.eval(script, keys, args))

    def reserve(self, attempt: Sequence[tuple[str, str]]) -> defer.Deferred[float]:
        if not attempt:
            return defer.succeed(0.0)
        return self._script(RESERVE, attempt).addCallback(_seconds)

    def release(self, attempt: Sequence[tuple[str, str]]) -> defer.Deferred[None]:
        if not attempt:
            return defer.succeed(None)
        return self._script(RELEASE, attempt).addCallback(lambda _: None)

    def succeeded(self, attempt: Sequence[tuple[str, str]]) -> defer.Deferred[None]:
        if not attempt:
            return defer.succeed(None)
        for name, _ in attempt:
            if name not in self._failures:
                raise KeyError(f"no failure throttle {name!r}")
        keys = [self.failureKey(name, key) for name, key in attempt]
        return self._bounded(self.bus.delete(*keys)).addCallback(lambda _: None)

    def retryAfter(self, name: str, key: str) -> defer.Deferred[float]:
        _, forget, _ = self._failures[name]
        running = self.bus.eval(RETRY_AFTER, [self.failureKey(name, key)], [forget])
        return self._bounded(running).addCallback(_seconds)

    def take(self, name: str, key: str) -> defer.Deferred[float]:
        burst, rate = self._buckets[name]
        running = self.bus.eval(
            TAKE, [self.bucketKey(name, key)], [repr(burst), repr(rate)]
        )
        return self._bounded(running).addCallback(_seconds)


def _seconds(milliseconds: Any) -> float:
    if not isinstance(milliseconds, int):
        raise TypeError(f"a throttle script answered {milliseconds!r}")
    return milliseconds / 1000.0
