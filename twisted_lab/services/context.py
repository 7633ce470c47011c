"""
What every service and the request dispatcher of one server share: its
clock, its log (and the budget that keeps a flood of one event to a few
lines), the rate of each request kind, its counters and its message size.

One L{ServerContext} per server, made by the wiring and handed down; the
transport's factory exposes the same clock and log (tests replace them
there).  Nothing here knows how bytes travel or where rows live.
"""

from __future__ import annotations

import math
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from twisted_lab.codecs import events
from twisted_lab.codecs.errors import ErrorCode
from twisted_lab.codecs.events import EVENTS_SUPPRESSED
from twisted_lab.codecs.message import DEFAULT_MAX_LENGTH, RequestError
from twisted_lab.services.limits import RequestLimit, TokenBucket


class ServerContext:
    """
    The shared state of one server's requests.

    C{stats} is the server's counters (L{twisted_lab.observe.metrics.ServerStats}
    in a server, anything with the same methods in a test): the services
    count what they do there, and the metrics endpoint reads them.
    """

    def __init__(
        self,
        clock: IReactorTime | None = None,
        log: Logger | None = None,
        stats: Any = None,
        maxLength: int = DEFAULT_MAX_LENGTH,
    ) -> None:
        self.clock = clock
        self.log = log if log is not None else Logger()
        self.stats = stats
        #: The largest message a client may send or be sent, in bytes.
        self.maxLength = maxLength
        #: The rate of each request kind: the services' defaults, which
        #: the wiring may change from options.
        self.requestLimits: dict[str, RequestLimit] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self._logBudget: LogBudget | None = None

    def now(self) -> float:
        """
        The current time on the server's clock.
        """
        assert self.clock is not None, "the clock is set when the service starts"
        return self.clock.seconds()

    def requestBuckets(self, kind: str) -> tuple[RequestLimit, TokenBucket] | None:
        """
        The limit of requests of C{kind} and their buckets (one per user or
        connection); L{None} for a kind with no limit.
        """
        limit = self.requestLimits.get(kind)
        if limit is None:
            return None
        name = limit.bucket or kind
        buckets = self._buckets.get(name)
        if buckets is None:
            assert self.clock is not None
            buckets = self._buckets[name] = TokenBucket(
                self.clock, burst=limit.burst, rate=limit.rate
            )
        return limit, buckets

    @property
    def logBudget(self) -> LogBudget:
        """
        How many events of each kind this server logs one by one before it
        folds the rest into a summary.
        """
        if self._logBudget is None:
            assert self.clock is not None
            self._logBudget = LogBudget(self.log, self.clock)
        elif self._logBudget.log is not self.log:
            self._logBudget.log = self.log
        return self._logBudget

    def hasLogBudget(self) -> bool:
        return self._logBudget is not None

    def rateLimited(self, peer: str, seconds: float, what: str) -> RequestError:
        """
        The C{rate_limited} error for C{what}, logged (within the log
        budget: a flood of them folds into one summary).
        """
        retry = max(1, math.ceil(seconds))
        if self.stats is not None:
            self.stats.rateLimited += 1
        if self.logBudget.admit(events.RATE_LIMITED):
            self.log.info(
                "{peer}: {what} rate limited for {retry_after} s",
                event=events.RATE_LIMITED,
                peer=peer,
                what=what,
                retry_after=retry,
            )
        return RequestError(
            ErrorCode.RATE_LIMITED,
            f"too many {what} requests; try again in {retry} s",
            retry_after=retry,
        )


class LogBudget:
    """
    At most C{limit} events of one name per C{interval} seconds are logged;
    the rest are counted and reported in one C{events_suppressed} event
    once the interval is over, so a client that provokes the same error
    thousands of times writes a few lines, not megabytes.

    It keeps no timer of its own: the server's deadline sweeper calls
    L{tick}, and L{flush} reports what is left when the last connection
    has gone.
    """

    def __init__(
        self,
        log: Logger,
        clock: IReactorTime,
        limit: int = 20,
        interval: float = 60.0,
    ) -> None:
        self.log = log
        self.clock = clock
        self.limit = limit
        self.interval = interval
        #: event name -> [window start, logged, suppressed]
        self._windows: dict[str, list[float]] = {}

    def admit(self, name: str) -> bool:
        """
        Whether an event called C{name} may be logged now (if not, it is
        counted for the summary).
        """
        now = self.clock.seconds()
        window = self._windows.get(name)
        if window is None or now - window[0] >= self.interval:
            self._report(name)
            window = self._windows[name] = [now, 0, 0]
        if window[1] < self.limit:
            window[1] += 1
            return True
        window[2] += 1
        return False

    def tick(self) -> None:
        """
        Report the counts of the intervals that are over.
        """
        now = self.clock.seconds()
        for name, window in list(self._windows.items()):
            if now - window[0] >= self.interval:
                self._report(name)

    def flush(self) -> None:
        """
        Report every count now.
        """
        for name in list(self._windows):
            self._report(name)

    def _report(self, name: str) -> None:
        window = self._windows.pop(name, None)
        if window is not None and window[2]:
            self.log.warn(
                "{count} more {suppressed} events were not logged one by one",
                event=EVENTS_SUPPRESSED,
                suppressed=name,
                count=int(window[2]),
            )
