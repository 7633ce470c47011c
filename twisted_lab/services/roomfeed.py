"""
One room's feed on one node: committed messages, however they arrive,
delivered to the node's members in C{seq} order, each exactly once, with no
gap.

A node learns of a room's committed messages three ways: its own group
commit, a publication on the bus from another node, and a read of the
store.  The first two are hints that may come out of order (two nodes
publish independently), twice (a node hears its own publication, a catch-up
overlaps a publication) or not at all (a bus restart, a publish that failed,
a node killed between its commit and its publish).  The store is the
record: C{seq} is gap-free there, and a message is published only after
its commit, so any C{seq} a node hears of can be read from the store.

The rule, the same for every source:
  - a C{seq} at or below the last one delivered is a duplicate: dropped;
  - the next one (delivered + 1) is delivered at once, with any held
    messages that follow it without a hole;
  - one further ahead is held, and a gap is open: if the missing messages
    do not arrive within L{GAP_GRACE} seconds (a reordering between nodes
    usually closes within a millisecond), they are read from the store,
    in L{FILL_BATCH}es, up to the highest C{seq} heard of;
  - a reason to think the store may hold more than was heard (the bus
    reconnected, a node died, a subscription is new) reads the store at
    once (L{RoomFeed.catchUp}).

What a feed holds is bounded, node-wide, by a L{HeldBudget}: past it,
messages are not held but only noted as heard (they are read from the
store when the gap is filled).  A read that fails (the database is down)
is retried with a back-off while the room has members here.  What a feed
logs goes through the node's log budget (C{admit}): with the database down,
every room of a node retries, and a few lines say so.
"""

from __future__ import annotations

from collections.abc import Callable
from sys import getsizeof
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from twisted_lab.codecs import events
from twisted_lab.ports import HistoryRow

#: Seconds a gap may stay open before the store is read: the time another
#: node's publication may take to overtake ours.
GAP_GRACE = 0.2
#: Rows read from the store at once while filling a gap.
FILL_BATCH = 100
#: Seconds between retries of a failed read (doubling up to the maximum).
RETRY_FIRST = 0.5
RETRY_MAX = 8.0
#: Bytes of held (out-of-order) messages a node keeps, all rooms together.
HELD_BYTES = 8 * 1024 * 1024
#: What one held row is counted as, besides its text.
ROW_OVERHEAD = 96

Fetch = Callable[[str, int, int], "defer.Deferred[list[HistoryRow]]"]
Deliver = Callable[[list[HistoryRow]], None]


def rowSize(row: HistoryRow) -> int:
    """
    What holding C{row} costs: the memory of its strings (a character of
    text outside Latin-1 takes 2 or 4 bytes), and its share of the rest.
    """
    return ROW_OVERHEAD + getsizeof(row[1]) + getsizeof(row[2]) + getsizeof(row[3])


class HeldBudget:
    """
    The bytes of out-of-order messages every feed of a node holds together.
    """

    def __init__(self, limit: int = HELD_BYTES) -> None:
        self.limit = limit
        self.used = 0

    def reserve(self, size: int) -> bool:
        if self.used + size > self.limit:
            return False
        self.used += size
        return True

    def release(self, size: int) -> None:
        self.used -= size


class RoomFeed:
    """
    Delivers the committed messages of one room to this node's members.

    @param fetch: C{fetch(room, after, limit)}: rows of the store (the
        history query), oldest first.
    @param deliver: called with each run of rows to deliver, in C{seq}
        order, each row once.
    @ivar delivered: the highest C{seq} delivered here.
    @ivar heardOf: the highest C{seq} known to be committed.
    """

    log = Logger()

    def __init__(
        self,
        room: str,
        delivered: int,
        *,
        clock: IReactorTime,
        fetch: Fetch,
        deliver: Deliver,
        budget: HeldBudget | None = None,
        grace: float = GAP_GRACE,
        log: Logger | None = None,
        admit: Callable[[str], bool] = lambda event: True,
    ) -> None:
        if log is not None:
            self.log = log
        #: Whether an event may be logged now (the node's log budget: a
        #: database down while every room retries writes a few lines).
        self.admit = admit
        self.room = room
        self.delivered = delivered
        self.heardOf = delivered
        self._clock = clock
        self._fetch = fetch
        self._deliver = deliver
        self._budget = budget if budget is not None else HeldBudget()
        self._grace = grace
        self._held: dict[int, HistoryRow] = {}
        self._heldBytes = 0
        self._timer: IDelayedCall | None = None
        self._settle: IDelayedCall | None = None
        self._filling = False
        #: A reason to read the store again arrived during a fill.
        self._again = False
        self._retryDelay = RETRY_FIRST
        self.closed = False
        #: Reads of the store made (for tests and metrics).
        self.reads = 0

    # -- what happens to the room ------------------------------------------------

    def offer(self, rows: list[HistoryRow]) -> None:
        """
        Committed rows, from this node's commit or another's publication:
        in any order, perhaps already delivered.
        """
        if self.closed:
            return
        run: list[HistoryRow] = []
        expected = self.delivered + 1
        for row in rows:
            seq = row[0]
            if seq < expected or seq in self._held:
                continue
            if seq > self.heardOf:
                self.heardOf = seq
            if seq == expected and not self._filling:
                # The common case: in order, nothing held.
                run.append(row)
                expected += 1
                continue
            size = rowSize(row)
            if self._budget.reserve(size):
                self._held[seq] = row
                self._heldBytes += size
        if run:
            self._deliverRun(run)
        self._drainHeld()
        self._watchGap()

    def heard(self, seq: int) -> None:
        """
        The room has reached C{seq} somewhere (a position notice from a
        node whose publication of it may have been lost).
        """
        if self.closed or seq <= self.heardOf:
            return
        self.heardOf = seq
        self._watchGap()

    def catchUp(self) -> None:
        """
        The store may hold more than was heard of (the bus reconnected, a
        node died, this node subscribed a moment ago): read it now.
        """
        if self.closed:
            return
        if self._filling:
            self._again = True
            return
        self._startFill()

    def catchUpLater(self, seconds: float) -> None:
        """
        L{catchUp} in C{seconds} (a subscription taking effect on the bus
        server).
        """
        if self._settle is None and not self.closed:
            self._settle = self._clock.callLater(seconds, self._settled)

    def _settled(self) -> None:
        self._settle = None
        self.catchUp()

    def close(self) -> None:
        """
        The room has no member here any more: forget what is held, stop
        timers.
        """
        self.closed = True
        self._cancelTimer()
        if self._settle is not None and self._settle.active():
            self._settle.cancel()
        self._settle = None
        self._dropHeld()

    @property
    def gapOpen(self) -> bool:
        return self.heardOf > self.delivered

    # -- delivery ----------------------------------------------------------------

    def _deliverRun(self, rows: list[HistoryRow]) -> None:
        self.delivered = rows[-1][0]
        self._deliver(rows)

    def _drainHeld(self) -> None:
        """
        Deliver the held rows that now follow the last delivered one.
        """
        if self._filling or not self._held:
            return
        run = []
        nextSeq = self.delivered + 1
        while nextSeq in self._held:
            row = self._held.pop(nextSeq)
            size = rowSize(row)
            self._heldBytes -= size
            self._budget.release(size)
            run.append(row)
            nextSeq += 1
        if run:
            self._deliverRun(run)

    def _dropHeld(self) -> None:
        self._held.clear()
        self._budget.release(self._heldBytes)
        self._heldBytes = 0

    # -- gaps ----------------------------------------------------------------------

    def _watchGap(self) -> None:
        if self._filling:
            return
        if not self.gapOpen:
            self._cancelTimer()
            self._retryDelay = RETRY_FIRST
        elif self._timer is None:
            self._timer = self._clock.callLater(self._grace, self._graceOver)

    def _graceOver(self) -> None:
        self._timer = None
        if self.gapOpen and not self._filling:
            self._startFill()

    def _cancelTimer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _startFill(self) -> None:
        self._cancelTimer()
        self._filling = True
        self._again = False
        defer.ensureDeferred(self._fill()).addErrback(self._fillBroke)

    async def _fill(self) -> None:
        """
        Read the store from the last delivered C{seq} until it has nothing
        more (or, having had a reason to look again, once more).
        """
        try:
            while not self.closed:
                self.reads += 1
                rows = await self._fetch(self.room, self.delivered, FILL_BATCH)
                if self.closed:
                    return
                self._accept(rows)
                if len(rows) < FILL_BATCH and not self._again:
                    break
                self._again = False
        except Exception as e:  # noqa: BLE001 (the store is down: retry later)
            self._filling = False
            if not self.closed:
                self._readFailed(e)
            return
        self._filling = False
        if self.closed:
            return
        self._drainHeld()
        if not self.gapOpen:
            self._retryDelay = RETRY_FIRST
            return
        # Heard of, and not in the store that was read: a publication ahead
        # of a commit another reader cannot see yet, or a position that is
        # wrong.  Look again later, less and less often; at the longest
        # interval, give the claim up (the next message reopens a real gap).
        if self._retryDelay >= RETRY_MAX:
            if self.admit(events.FEED_STORE_GAP):
                self.log.error(
                    "{room}: seq {heard} was announced and is not in the store"
                    " (delivered up to {delivered}): given up",
                    event=events.FEED_STORE_GAP,
                    room=self.room,
                    heard=self.heardOf,
                    delivered=self.delivered,
                )
            self.heardOf = self.delivered
            self._retryDelay = RETRY_FIRST
            self._dropHeld()
            return
        delay = self._retryDelay
        self._retryDelay = min(delay * 2, RETRY_MAX)
        self._timer = self._clock.callLater(delay, self._retry)

    def _accept(self, rows: list[HistoryRow]) -> None:
        """
        Deliver the rows read from the store that follow the last delivered
        one (those held meanwhile are dropped: the store's copy is the same).
        """
        run = []
        nextSeq = self.delivered + 1
        for row in rows:
            seq = row[0]
            if seq < nextSeq:
                continue
            if seq != nextSeq:
                if self.admit(events.FEED_STORE_GAP):
                    self.log.error(
                        "{room}: the store skipped from seq {expected} to {seq}",
                        event=events.FEED_STORE_GAP,
                        room=self.room,
                        expected=nextSeq,
                        seq=seq,
                    )
                break
            held = self._held.pop(seq, None)
            if held is not None:
                size = rowSize(held)
                self._heldBytes -= size
                self._budget.release(size)
            run.append(row)
            nextSeq += 1
        if run:
            if run[-1][0] > self.heardOf:
                self.heardOf = run[-1][0]
            self._deliverRun(run)

    def _readFailed(self, error: Exception) -> None:
        delay = self._retryDelay
        self._retryDelay = min(self._retryDelay * 2, RETRY_MAX)
        if self.admit(events.FEED_READ_FAILED):
            self.log.warn(
                "{room}: cannot read the store to catch up ({reason});"
                " again in {delay} s",
                event=events.FEED_READ_FAILED,
                room=self.room,
                reason=str(error) or type(error).__name__,
                delay=delay,
            )
        self._cancelTimer()
        self._timer = self._clock.callLater(delay, self._retry)

    def _retry(self) -> None:
        self._timer = None
        if not self.closed and not self._filling:
            self._startFill()

    def _fillBroke(self, failure: Any) -> None:
        self._filling = False
        if self.admit(events.FEED_READ_FAILED):
            self.log.failure(
                "{room}: the catch-up failed",
                failure,
                event=events.FEED_READ_FAILED,
                room=self.room,
            )
