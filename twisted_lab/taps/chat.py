"""
C{twistd netlab-chat}: the chat service (on the auth service) on the Int32
transport, its options, and the wiring that makes the running server.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet import defer
from twisted.internet.error import ReactorNotRunning
from twisted.python import usage

from twisted_lab.bus import RedisBus
from twisted_lab.runtime.server import openBus, openStore, positiveInt, storedService
from twisted_lab.runtime.weblistener import webService
from twisted_lab.services.chat import (
    DEFAULT_MESSAGE_BURST,
    DEFAULT_MESSAGE_RATE,
    DEFAULT_PORT,
    ChatService,
)
from twisted_lab.services.presence import HEARTBEAT, NODE_TTL, RedisPresence
from twisted_lab.taps import auth
from twisted_lab.taps.auth import AuthFactory, authSettings, passwordHasher
from twisted_lab.transports.web import normalizeOrigin


def positiveFloat(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError(f"{value} is not a positive number")
    return number


class ChatFactory(AuthFactory):
    """
    An Int32 server of the chat service on C{store}.
    """

    serviceClass = ChatService
    serviceSettings = (
        *AuthFactory.serviceSettings,
        "messageRate",
        "messageBurst",
        "presence",
    )


class ClusterService(Service):
    """
    The chat node's membership of its cluster: the presence heartbeats run
    while it runs.  Started after the server and stopped before it, so a
    clean stop takes the node's members out of the directory (their leaves
    announced on the other nodes) while the bus is still up; the node's
    link (L{ClusterLinkService}) closes only after the server.
    """

    name = "cluster"

    def __init__(self, chat: ChatService) -> None:
        self.chat = chat

    def startService(self) -> None:
        Service.startService(self)
        self.chat.startCluster()

    def stopService(self) -> defer.Deferred[None]:
        Service.stopService(self)
        return self.chat.stopCluster()


class ClusterLinkService(Service):
    """
    The chat node's link to the other nodes: placed before the server, it
    stops after the server has closed its connections, and before the bus
    closes.  A message committed while the server stops is still
    published (L{ChatService.closeLink} waits for the group commit).
    """

    name = "cluster-link"

    def __init__(self, chat: ChatService) -> None:
        self.chat = chat

    def stopService(self) -> defer.Deferred[None]:
        Service.stopService(self)
        return self.chat.closeLink()


def _insertBefore(parent: MultiService, child: Service, before: IService) -> None:
    """
    Add C{child} to C{parent} just before C{before} (started before it,
    stopped after it by L{OrderedServices}).
    """
    child.setServiceParent(parent)
    services = parent.services
    services.remove(child)
    services.insert(services.index(before), child)


def _refuse(reactor: Any) -> None:
    """
    Another process runs with this node's name (logged: node_name_taken):
    this one stops, cleanly (its members told server_shutdown); the
    directory refuses its changes, so the other's share stays whole.
    """
    try:
        reactor.stop()
    except ReactorNotRunning:
        pass


class Options(auth.Options):
    """
    Options of C{twistd netlab-chat}.
    """

    synopsis = "[options]"
    longdesc = (
        "Chat rooms, private messages and a history that loses nothing, on "
        "the accounts of netlab-auth.  Listens on 127.0.0.1:9093 by default."
    )
    defaultPort = DEFAULT_PORT
    optParameters = [
        [
            "message-rate",
            None,
            DEFAULT_MESSAGE_RATE,
            "Room and private messages per user per second (sustained).",
            positiveFloat,
        ],
        [
            "message-burst",
            None,
            DEFAULT_MESSAGE_BURST,
            "Room and private messages per user in a burst.",
            positiveInt,
        ],
        # The page and the WebSocket (docs/protocol.md section 4).
        [
            "web",
            None,
            None,
            "Also serve the chat page at / and the protocol as a WebSocket at "
            "/ws on this endpoint (tcp:8080:interface=127.0.0.1, "
            "ssl:8443:privateKey=key.pem:certKey=cert.pem).",
        ],
        ["web-port-file", None, None, "Write the web port being served to this file."],
        # A cluster (--bus redis://...; docs/cluster.md).
        [
            "presence-heartbeat",
            None,
            HEARTBEAT,
            "Seconds between this node's heartbeats in the presence directory.",
            positiveFloat,
        ],
        [
            "presence-ttl",
            None,
            NODE_TTL,
            "Seconds without a heartbeat after which a node is taken for dead"
            " and its members shown as gone.",
            positiveFloat,
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["web-origin"] = []

    def opt_web_origin(self, origin: str) -> None:
        """
        A page origin allowed to open the WebSocket (https://chat.example.org;
        repeatable).  Default: only the page's own origin (the Host it was
        served from).
        """
        try:
            self["web-origin"].append(normalizeOrigin(origin))
        except ValueError as e:
            raise usage.UsageError(f"--web-origin: {e}") from None

    def postOptions(self) -> None:
        super().postOptions()
        if self["web-origin"] and not self["web"]:
            raise usage.UsageError("--web-origin needs --web")
        if self["presence-ttl"] <= self["presence-heartbeat"]:
            raise usage.UsageError(
                "--presence-ttl must be longer than --presence-heartbeat"
            )


def makeService(config: Options, reactor: Any = None) -> IService:
    """
    The chat server described by C{config}: its services, not yet
    started.  twistd calls it with the options alone, after installing its
    reactor; tests pass their own.
    """
    if reactor is None:
        from twisted.internet import reactor
    store = openStore(config)
    bus = openBus(config, reactor)
    presence = None
    if isinstance(bus, RedisBus):
        presence = RedisPresence(
            bus,
            config["node"],
            reactor,
            heartbeat=config["presence-heartbeat"],
            ttl=config["presence-ttl"],
        )
    factory = ChatFactory(
        store,
        passwordHasher(config, reactor),
        messageRate=config["message-rate"],
        messageBurst=config["message-burst"],
        bus=bus,
        presence=presence,
        **authSettings(config, reactor),
    )
    top = storedService(config, "netlab-chat", store, factory, bus)
    server = top.services[-1]
    if config["web"]:
        # Started after the Int32 server, stopped before it.
        webService(
            config["web"],
            factory,
            reactor,
            config["web-origin"],
            portFile=config["web-port-file"],
        ).setServiceParent(top)
    if presence is not None:
        presence.onConflict(lambda node: _refuse(reactor))
        # Stopped first: the node leaves the directory while the server
        # still serves; then the server closes its connections; then the
        # link publishes what was committed meanwhile and closes; then the
        # bus.
        ClusterService(factory.service).setServiceParent(top)
        _insertBefore(top, ClusterLinkService(factory.service), server)
    return top
