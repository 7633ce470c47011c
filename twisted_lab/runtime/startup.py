"""
What a server does when it cannot start, and how it still talks to the
person who started it once twistd has made it a daemon.
"""

from __future__ import annotations

import os

from twisted.logger import Logger


class StartupFailed(SystemExit, Exception):
    """
    The server cannot start (its port, its database, its schema).

    An L{Exception}, so that twistd's daemon mode tells the waiting parent
    through its status pipe, removes the pid file and exits non-zero; a
    L{SystemExit}, so that in the foreground it ends the program with this
    one-line message instead of a traceback.
    """


class Console:
    """
    The terminal of the person who started the server, kept open across
    twistd's daemonisation (which points file descriptors 0-2 at
    C{/dev/null}): a copy of standard error taken before it, closed once
    the server has started, so a daemon can still say where it listens.
    """

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    @classmethod
    def ofStandardError(cls) -> Console:
        try:
            return cls(os.dup(2))
        except OSError:
            return cls(None)

    def say(self, line: str) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, (line + "\n").encode("utf-8", "replace"))
        except OSError as e:
            # A closed terminal: the log has the same line.
            Logger().debug("console gone: {error}", error=str(e))

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
