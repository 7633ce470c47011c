"""
systemd readiness: C{READY=1} once a server serves, C{STOPPING=1} when it
stops (C{Type=notify} units, C{contrib/systemd/}).

sd_notify is one datagram to the unix socket named by C{$NOTIFY_SOCKET}
(in the abstract namespace when the name starts with C{@}), so it is a few
lines here rather than a dependency.  Without C{$NOTIFY_SOCKET} (not
started by systemd) every notification is a no-op.

Socket activation needs nothing of ours: C{--listen
systemd:domain=INET:index=0} is Twisted's own endpoint, which adopts the
socket systemd passes (C{LISTEN_FDS}, C{LISTEN_PID}).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from twisted_lab.codecs import events

READY = "READY=1"
STOPPING = "STOPPING=1"


class SystemdNotifier:
    """
    Sends sd_notify datagrams to C{address} (L{None}: nowhere).
    """

    log = Logger()

    def __init__(self, address: str | None) -> None:
        self.address = address or None

    @classmethod
    def fromEnvironment(
        cls, environ: Mapping[str, str] = os.environ
    ) -> SystemdNotifier:
        """
        The notifier C{$NOTIFY_SOCKET} asks for.
        """
        return cls(environ.get("NOTIFY_SOCKET"))

    def notify(self, *assignments: str) -> bool:
        """
        Send C{assignments} (C{"READY=1"}, C{"STATUS=..."}) in one
        datagram; whether it was sent.  A failure is logged, never raised:
        a server does not stop serving because its supervisor went away.
        """
        if self.address is None:
            return False
        address = self.address
        if address.startswith("@"):
            address = "\0" + address[1:]
        message = "\n".join(assignments).encode("utf-8")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)
                sock.connect(address)
                sock.send(message)
        except OSError as e:
            self.log.warn(
                "cannot notify systemd at {address}: {reason}",
                event=events.NOTIFY_FAILED,
                address=self.address,
                reason=str(e),
            )
            return False
        return True

    def ready(self, status: str, after: defer.Deferred[Any] | None = None) -> None:
        """
        Say C{READY=1} (with C{status}) now, or once C{after} fires with a
        true result (the database is open); never if it fires false.
        """

        def tell(ok: Any) -> None:
            if ok:
                self.notify(READY, f"STATUS={status}")

        if after is None:
            tell(True)
        else:
            after.addCallback(tell)

    def stopping(self) -> None:
        self.notify(STOPPING, "STATUS=stopping")


def whenOpened(storeService: Any) -> defer.Deferred[bool]:
    """
    Fires True once C{storeService}'s store is open, False if it could not
    be opened, leaving its own C{opened} Deferred as it was.
    """
    from twisted_lab.storage.sqlite import Store

    result: defer.Deferred[bool] = defer.Deferred()
    opened = storeService.opened
    if opened is None:
        return defer.succeed(False)

    def passOn(outcome: Any) -> Any:
        result.callback(isinstance(outcome, Store))
        return outcome

    opened.addBoth(passOn)
    return result
