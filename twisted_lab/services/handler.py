"""
The base of every service's per-connection request handler (an identity
visit, an auth or chat session): what the dispatcher calls, and how a
handler answers, refuses or tells its connection something.

A handler is given its connection as an L{IRequestChannel} and never knows
which transport that is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from twisted_lab.codecs.message import Message, Outgoing, RequestError, Schema
from twisted_lab.ports import IRequestChannel
from twisted_lab.services.context import ServerContext
from twisted_lab.services.limits import RequestLimit


class RequestHandler:
    """
    The base of a service's per-connection request handler.

    Subclasses list their requests in C{requests} (type -> schema) and their
    rates in C{limits} (type -> L{RequestLimit}), and handle each request in
    a method C{request_<type>(message)} returning the reply (a dict),
    L{None} for no reply, or a Deferred of either; raising (or failing with)
    L{RequestError} replies with that error.
    """

    requests: ClassVar[dict[str, Schema]] = {}
    limits: ClassVar[dict[str, RequestLimit]] = {}

    def __init__(self, channel: IRequestChannel, context: ServerContext) -> None:
        self.channel = channel
        self.context = context

    @property
    def log(self) -> Any:
        return self.context.log

    @property
    def peer(self) -> str:
        return str(self.channel.peer)

    #: Work to run before the first request (a callable that may return a
    #: Deferred: a greeting that needs the store), or L{None}.
    greeting: Callable[[], Any] | None = None

    def rateKey(self) -> str | None:
        """
        Whose bucket per-user limits draw from: the logged-in user (shared
        by all of their connections), or L{None} for this connection.
        """
        return None

    def rateLimited(self, seconds: float, what: str) -> RequestError:
        """
        The C{rate_limited} error for C{what}, logged within the log budget.
        """
        return self.context.rateLimited(self.peer, seconds, what)

    def send(self, message: Message) -> None:
        """
        Send one message (not a reply) to this connection.
        """
        if not self.channel.closing:
            self.channel.send(Outgoing(message))

    def connectionLost(self) -> None:
        """
        The connection is gone: let go of what it held.
        """
