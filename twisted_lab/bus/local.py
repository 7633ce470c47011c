"""
The in-process bus: one node, no server.  What a single-node netlab uses,
and what unit tests of the services hand them.

A publication is delivered on a later reactor turn, never inside
C{publish}: a service that publishes while it holds half-updated state is
not re-entered by its own subscriber.  Deliveries keep publication order
(one queue, drained by one scheduled call, rather than one C{callLater}
each: the reactor does not promise an order for calls due at the same
time).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from twisted_lab.bus.errors import BusOverloaded
from twisted_lab.codecs import events
from twisted_lab.ports import IBus

#: Called with each payload of a channel.
Receiver = Callable[[bytes], object]


def checkedCallable(thing: object, what: str) -> Callable[..., object]:
    if not callable(thing):
        raise TypeError(f"a bus {what} is callable, not {type(thing).__name__}")
    return thing


class Receivers:
    """
    The receivers of each channel, in subscription order; shared by both
    buses.  A receiver that raises is logged and the others still run.
    """

    log = Logger()

    def __init__(self) -> None:
        self.byChannel: dict[str, list[Receiver]] = {}

    def add(self, channel: str, receiver: object) -> bool:
        """
        Subscribe C{receiver} (once); True if C{channel} had no receiver.
        """
        receiver = checkedCallable(receiver, "receiver")
        receivers = self.byChannel.setdefault(channel, [])
        if receiver not in receivers:
            receivers.append(receiver)
        return len(receivers) == 1

    def remove(self, channel: str, receiver: object) -> bool:
        """
        Unsubscribe C{receiver}; True if C{channel} has no receiver left.
        """
        receivers = self.byChannel.get(channel)
        if receivers is None or receiver not in receivers:
            return False
        receivers.remove(receiver)
        if receivers:
            return False
        del self.byChannel[channel]
        return True

    def channels(self) -> list[str]:
        return sorted(self.byChannel)

    def snapshot(self, channel: str) -> tuple[Receiver, ...]:
        return tuple(self.byChannel.get(channel, ()))

    def deliver(
        self, channel: str, payload: bytes, receivers: tuple[Receiver, ...]
    ) -> None:
        """
        Call each of C{receivers} still subscribed to C{channel}.
        """
        for receiver in receivers:
            if receiver not in self.byChannel.get(channel, ()):
                continue  # unsubscribed meanwhile
            try:
                result = receiver(payload)
            except Exception:  # noqa: BLE001 (one receiver's bug stays its own)
                self.log.failure(
                    "a receiver of bus channel {channel} failed",
                    event=events.BUS_SUBSCRIBER_FAILED,
                    channel=channel,
                )
                continue
            if isinstance(result, defer.Deferred):
                result.addErrback(self._failedLater, channel)

    def _failedLater(self, failure: Any, channel: str) -> None:
        self.log.failure(
            "a receiver of bus channel {channel} failed",
            failure,
            event=events.BUS_SUBSCRIBER_FAILED,
            channel=channel,
        )


@implementer(IBus)
class LocalBus(Service):
    """
    Publish/subscribe within this process.

    @param clock: the reactor (or a L{twisted.internet.task.Clock}):
        deliveries are scheduled on it.
    @param maxQueued: publications waiting for delivery past which
        C{publish} fails with L{BusOverloaded}.
    """

    name = "bus"

    def __init__(self, clock: IReactorTime, maxQueued: int = 100_000) -> None:
        self._clock = clock
        self.maxQueued = maxQueued
        self._receivers = Receivers()
        self._queue: deque[tuple[str, bytes, tuple[Receiver, ...]]] = deque()
        self._drain: IDelayedCall | None = None
        self._reconnectCallbacks: list[Callable[..., object]] = []

    def publish(self, channel: str, payload: bytes) -> defer.Deferred[None]:
        if not isinstance(payload, bytes):
            raise TypeError("a bus payload is bytes")
        if len(self._queue) >= self.maxQueued:
            return defer.fail(
                BusOverloaded(f"{len(self._queue)} publications await delivery")
            )
        receivers = self._receivers.snapshot(channel)
        if receivers:
            self._queue.append((channel, payload, receivers))
            if self._drain is None:
                self._drain = self._clock.callLater(0, self._deliver)
        return defer.succeed(None)

    def _deliver(self) -> None:
        self._drain = None
        # Only what was queued before this turn: a receiver that publishes
        # is answered on a later turn, and cannot starve the reactor.
        for _ in range(len(self._queue)):
            channel, payload, receivers = self._queue.popleft()
            self._receivers.deliver(channel, payload, receivers)
        if self._queue and self._drain is None:
            self._drain = self._clock.callLater(0, self._deliver)

    def subscribe(self, channel: str, receiver: object) -> defer.Deferred[None]:
        """
        In effect at once: the Deferred has fired.
        """
        self._receivers.add(channel, receiver)
        return defer.succeed(None)

    def unsubscribe(self, channel: str, receiver: object) -> None:
        self._receivers.remove(channel, receiver)

    def onReconnect(self, callback: object) -> None:
        """
        Kept, never called: an in-process bus is never disconnected.
        """
        self._reconnectCallbacks.append(checkedCallable(callback, "callback"))

    @property
    def queued(self) -> int:
        """
        Publications waiting for delivery.
        """
        return len(self._queue)

    def stopService(self) -> None:
        """
        Deliver nothing more: what is still queued is dropped (a hint).
        """
        Service.stopService(self)
        if self._drain is not None and self._drain.active():
            self._drain.cancel()
        self._drain = None
        self._queue.clear()
