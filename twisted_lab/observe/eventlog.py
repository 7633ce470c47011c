"""
The server's event log: the data-event meter, the log budget, the JSON
event log with its rotation.

Every netlab server event is a L{twisted.logger} event with a stable
C{event} field (named in L{twisted_lab.codecs.events}) and a readable
C{log_format}.

Per-read and per-write events are what an operator wants on a quiet server
and what would cost more than the work itself under a flood (about 21 us per
event with twistd's text observer).  L{DataEventMeter} therefore logs each
read and write individually up to a per-connection rate and folds the rest
into one C{data_summary} event per connection per interval, whose counts add
up exactly to what happened.
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import IO, Any, cast

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import (
    ILogObserver,
    Logger,
    LogPublisher,
    globalLogPublisher,
    jsonFileLogObserver,
)
from twisted.python.logfile import LogFile

from twisted_lab.codecs.events import (
    DATA_RECEIVED,
    DATA_SENT,
    DATA_SUMMARY,
)

#: Default number of individually logged data events per connection per
#: second; past it, the rest of that second is folded into a summary.
DEFAULT_DATA_EVENTS_PER_SECOND = 20

#: Bytes after which the JSON event log rotates: twistd's --logfile default.
DEFAULT_EVENT_LOG_ROTATE_LENGTH = 1_000_000


class DataEventMeter:
    """
    Logs C{data_received}/C{data_sent} per connection, folding floods.

    Within each interval the first C{limit} events are logged one by one;
    the rest are counted and reported in one C{data_summary} event when the
    interval ends (by a timer, so a flood that stops is still reported) or
    when the connection closes.  C{limit=None} never folds.
    """

    __slots__ = (
        "_log",
        "_peer",
        "_clock",
        "_limit",
        "_interval",
        "_windowEnd",
        "_count",
        "_reads",
        "_writes",
        "_bytesIn",
        "_bytesOut",
        "_timer",
    )

    def __init__(
        self,
        log: Logger,
        peer: str,
        clock: IReactorTime,
        limit: int | None = DEFAULT_DATA_EVENTS_PER_SECOND,
        interval: float = 1.0,
    ) -> None:
        self._log = log
        self._peer = peer
        self._clock = clock
        self._limit = limit
        self._interval = interval
        self._windowEnd = 0.0
        self._count = 0
        self._reads = self._writes = self._bytesIn = self._bytesOut = 0
        self._timer: IDelayedCall | None = None

    def received(self, nbytes: int) -> None:
        """
        One read of C{nbytes} bytes happened.
        """
        if self._admit():
            self._log.info(
                "{peer} -> {nbytes} bytes received",
                event=DATA_RECEIVED,
                peer=self._peer,
                nbytes=nbytes,
            )
        else:
            self._reads += 1
            self._bytesIn += nbytes

    def sent(self, nbytes: int, now: float | None = None) -> None:
        """
        One write of C{nbytes} bytes happened (at C{now}, if the caller
        already knows the time: a broadcast asks the clock once, not once
        per member).
        """
        if self._admit(now):
            self._log.info(
                "{peer} <- {nbytes} bytes sent",
                event=DATA_SENT,
                peer=self._peer,
                nbytes=nbytes,
            )
        else:
            self._writes += 1
            self._bytesOut += nbytes

    def _admit(self, now: float | None = None) -> bool:
        limit = self._limit
        if limit is None:
            return True
        if now is None:
            now = self._clock.seconds()
        if now >= self._windowEnd:
            self.flush()
            self._windowEnd = now + self._interval
            self._count = 0
        self._count += 1
        if self._count <= limit:
            return True
        if self._timer is None:
            self._timer = self._clock.callLater(self._windowEnd - now, self._timerFired)
        return False

    def _timerFired(self) -> None:
        self._timer = None
        self.flush()

    def flush(self) -> None:
        """
        Report what was folded so far, if anything.
        """
        if self._reads or self._writes:
            self._log.info(
                "{peer}: {reads} more reads ({bytes_received} bytes) and "
                "{writes} more writes ({bytes_sent} bytes) not logged "
                "one by one",
                event=DATA_SUMMARY,
                peer=self._peer,
                reads=self._reads,
                writes=self._writes,
                bytes_received=self._bytesIn,
                bytes_sent=self._bytesOut,
            )
            self._reads = self._writes = self._bytesIn = self._bytesOut = 0

    def close(self) -> None:
        """
        The connection is gone: report the remainder, stop the timer.
        """
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        self.flush()


class JSONEventLog:
    """
    Writes every log event as one JSON object per line to a file, for as
    long as it is started (the C{--event-log} option).

    The file rotates like twistd's own C{--logfile}
    (L{twisted.python.logfile.LogFile}): once it holds C{rotateLength}
    bytes (default 1 MB, as twistd's; 0 never) it becomes C{PATH.1}, the
    older ones C{PATH.2}, ..., keeping C{maxRotatedFiles} of them (L{None}:
    all).  Each event is one write, so a line is never split across files.

    With C{reactor} given, SIGUSR1 (which twistd's text log also answers)
    rotates it too, or, if the file was moved away meanwhile (logrotate),
    reopens it at C{path}; the handler twistd installed is still called.
    """

    def __init__(
        self,
        path: str,
        publisher: LogPublisher = globalLogPublisher,
        *,
        rotateLength: int = DEFAULT_EVENT_LOG_ROTATE_LENGTH,
        maxRotatedFiles: int | None = None,
        reactor: Any = None,
    ):
        self.path = path
        self._publisher = publisher
        self.rotateLength = rotateLength
        self.maxRotatedFiles = maxRotatedFiles
        self._reactor = reactor
        self._file: LogFile | None = None
        self._observer: ILogObserver | None = None
        self._previousHandler: Any = None
        self._handling = False

    def start(self) -> None:
        """
        Open the file (appending) and start observing.
        """
        self._file = LogFile.fromFullPath(
            self.path,
            rotateLength=self.rotateLength or None,
            maxRotatedFiles=self.maxRotatedFiles,
        )
        # A LogFile has the write and flush the observer uses.
        self._observer = jsonFileLogObserver(
            cast(IO[Any], self._file), recordSeparator=""
        )
        self._publisher.addObserver(self._observer)
        if self._reactor is not None:
            self._installSignalHandler()

    def rotateOrReopen(self) -> None:
        """
        What SIGUSR1 does: reopen the file if it is no longer at C{path}
        (an external tool moved it), else rotate it as twistd would.
        """
        logFile = self._file
        if logFile is None:
            return
        try:
            moved = os.stat(self.path).st_ino != os.fstat(logFile._file.fileno()).st_ino
        except OSError:
            moved = True
        if moved:
            logFile.reopen()
        else:
            logFile.rotate()

    def _installSignalHandler(self) -> None:
        try:
            previous = signal.getsignal(signal.SIGUSR1)
            signal.signal(signal.SIGUSR1, self._signalled)
        except (ValueError, AttributeError, OSError):
            return  # not the main thread, or no SIGUSR1 here
        self._previousHandler = previous
        self._handling = True

    def _signalled(self, signum: int, frame: Any) -> None:
        # A signal handler may run in the middle of a write: the work is
        # done by the reactor, between events.
        self._reactor.callFromThread(self.rotateOrReopen)
        previous = self._previousHandler
        if callable(previous):
            previous(signum, frame)

    def stop(self) -> None:
        """
        Stop observing and close the file.
        """
        if self._handling:
            self._handling = False
            with contextlib.suppress(ValueError, OSError):
                if signal.getsignal(signal.SIGUSR1) == self._signalled:
                    signal.signal(signal.SIGUSR1, self._previousHandler)
        if self._observer is not None:
            self._publisher.removeObserver(self._observer)
            self._observer = None
        if self._file is not None:
            self._file.close()
            self._file = None
