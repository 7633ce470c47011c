"""
The Int32 transport of the JSON services: each frame's payload is one JSON
message (C{docs/protocol.md} sections 2 and 3), over TCP, TLS or a unix
socket.

A thin adapter: L{MessageProtocol} is a L{FramedServerProtocol} (caps,
deadlines, one bounded output account) that hands each frame to the
service's L{RequestDispatcher} and encodes what the service sends, once
per L{Outgoing} however many connections it goes to.  Everything about
requests (validation, order, rates, errors) is the dispatcher's; everything
about accounts and rooms is the service's.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_lab.codecs.errors import ErrorCode
from twisted_lab.codecs.framing import FrameReceiver, encodeFrame
from twisted_lab.codecs.message import Message, Outgoing
from twisted_lab.dispatch import QUEUE_FULL, RequestDispatcher
from twisted_lab.ports import IRequestChannel
from twisted_lab.services.context import ServerContext
from twisted_lab.services.handler import RequestHandler
from twisted_lab.transports.connection import FramedServerProtocol, ServerFactory

#: The name of the Int32 wire format in L{Outgoing.form}.
INT32 = "int32"

_serials = itertools.count(1)


def int32Frames(payloads: tuple[bytes, ...]) -> bytes:
    """
    JSON payloads as consecutive Int32 frames, in one string: one write per
    connection however many messages a batch holds.
    """
    return b"".join(encodeFrame(payload) for payload in payloads)


@implementer(IRequestChannel)
class MessageProtocol(FramedServerProtocol):
    """
    A connection speaking JSON requests and replies in Int32 frames: the
    channel of one service handler.
    """

    factory: MessageFactory
    handler: RequestHandler
    dispatcher: RequestDispatcher | None = None
    _serial = 0
    _resuming = False

    def connectionMade(self) -> None:
        FramedServerProtocol.connectionMade(self)
        if not self.admitted:
            return
        self.handler = self.factory.service.handlerFor(self)
        self.dispatcher = RequestDispatcher(self, self.handler, self.factory.context)

    @property
    def serial(self) -> int:
        """
        A number no other connection of this process has had (unlike
        C{id(self)}, never reused), for per-connection buckets.
        """
        if not self._serial:
            self._serial = next(_serials)
        return self._serial

    @property
    def closing(self) -> bool:
        return bool(self.lost or self.transport.disconnecting)

    # -- from the peer ---------------------------------------------------------------

    def stringReceived(self, frame: bytes) -> None:
        if self.dispatcher is not None:
            self.dispatcher.requestReceived(frame)

    def pauseReading(self, reason: str) -> None:
        if reason == QUEUE_FULL:
            # Hold the rest of this read as bytes (not as queued frames):
            # the queue stays bounded whatever one read holds.
            self.paused = True
        FramedServerProtocol.pauseReading(self, reason)

    def resumeReading(self, reason: str) -> None:
        if reason != QUEUE_FULL:
            FramedServerProtocol.resumeReading(self, reason)
            return
        if not self.paused or self._resuming:
            return
        # Deliver the frames held back first, then read again.  (Delivering
        # may fill the queue and pause once more.)
        self._resuming = True
        try:
            self.paused = False
            FrameReceiver.dataReceived(self, b"")
        finally:
            self._resuming = False
        if not self.paused:
            FramedServerProtocol.resumeReading(self, reason)

    def outputDrained(self) -> None:
        FramedServerProtocol.outputDrained(self)
        if self.dispatcher is not None:
            self.dispatcher.outputDrained()

    def frameTooLong(self, length: int) -> None:
        # Answer what came before the oversized header first, then say so;
        # the grace period runs from now, whatever the queue waits for.
        self.startCloseTimer()
        message = f"a {length}-byte frame is over the {self.MAX_LENGTH}-byte limit"
        if self.dispatcher is None:
            self.closeWithError(ErrorCode.FRAME_TOO_LONG, message)
        else:
            self.dispatcher.closeWith(ErrorCode.FRAME_TOO_LONG, message)

    def endOfInput(self) -> None:
        if self.dispatcher is None:
            self.closeAfterFlush()
        else:
            self.dispatcher.endOfInput()

    # -- to the peer -----------------------------------------------------------------

    def send(self, outgoing: Outgoing) -> None:
        """
        Write C{outgoing} as Int32 frames, encoded once for every
        connection it goes to.
        """
        if self.closing:
            return
        self.factory.stats.framesSent += len(outgoing)
        self.write(outgoing.form(INT32, int32Frames))

    def sendMessage(self, message: Message) -> None:
        """
        Send one message of the server's own (an error before closing).
        """
        self.send(Outgoing(message))

    def closeWithError(self, code: str, message: str) -> None:
        """
        Say why in an C{error}, then close; abort if the peer does not let
        the error be delivered within a few seconds.
        """
        self.sendMessage({"type": "error", "code": code, "message": message})
        self.closeAfterFlush()

    def refuse(self, reason: str) -> None:
        self.closeWithError(ErrorCode.TOO_MANY_CONNECTIONS, reason)

    def frameTimedOut(self) -> None:
        self.closeWithError(
            ErrorCode.FRAME_TIMEOUT, "a frame stayed incomplete too long; closing"
        )

    def slowConsumer(self) -> None:
        if not self.transport.disconnecting:
            # Most likely never read; said for a peer that reads again at last.
            self.transport.write(
                encodeFrame(
                    Outgoing(
                        {
                            "type": "error",
                            "code": ErrorCode.SLOW_CONSUMER,
                            "message": "you are not reading fast enough; disconnecting",
                        }
                    ).json()[0]
                )
            )
        FramedServerProtocol.slowConsumer(self)

    def idleTimedOut(self) -> None:
        self.sendMessage(
            {
                "type": "error",
                "code": ErrorCode.IDLE_TIMEOUT,
                "message": "closing an idle connection",
            }
        )

    def serverStopping(self) -> None:
        self.sendMessage(
            {
                "type": "error",
                "code": ErrorCode.SERVER_SHUTDOWN,
                "message": "the server is shutting down",
            }
        )

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        dispatcher, self.dispatcher = self.dispatcher, None
        if dispatcher is not None:
            dispatcher.connectionLost()
        FramedServerProtocol.connectionLost(self, reason)


class MessageFactory(ServerFactory):
    """
    An Int32 server of one JSON service.  C{makeService(context)} builds
    the service on the server's context; its C{handlerFor(channel)} makes
    each connection's request handler.
    """

    protocol = MessageProtocol

    def __init__(
        self, makeService: Callable[[ServerContext], Any], **settings: Any
    ) -> None:
        super().__init__(**settings)
        self.service = makeService(self.context)
