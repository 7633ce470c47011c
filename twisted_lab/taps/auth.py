"""
C{twistd netlab-auth}: the auth service on the Int32 transport, its
options, and the wiring that makes the running server.

The wiring decides where the login throttles and the registrations per
address are kept: with C{--bus redis://...} on the cluster's server,
shared by every node (L{twisted_lab.bus.throttles.RedisThrottles}); alone,
in the process (the service's default).
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService
from twisted.python.usage import UsageError

from twisted_lab.bus import RedisBus
from twisted_lab.bus.throttles import RedisThrottles
from twisted_lab.codecs.message import DEFAULT_MAX_LENGTH
from twisted_lab.runtime.server import (
    StoredServerOptions,
    nonNegativeFloat,
    openBus,
    openStore,
    positiveInt,
    serverSettings,
    storedService,
)
from twisted_lab.services.accounts import (
    DEFAULT_MEMORY_KIB,
    DEFAULT_PARALLELISM,
    DEFAULT_TIME_COST,
    PasswordHasher,
)
from twisted_lab.services.auth import (
    DEFAULT_PORT,
    DEFAULT_REGISTRATIONS_PER_HOUR,
    DEFAULT_SESSION_IDLE,
    DEFAULT_SESSION_MAX,
    AuthService,
)
from twisted_lab.transports.int32 import MessageFactory


def throttlesFor(bus: Any, clock: Any) -> Any:
    """
    The throttles of a service on C{bus}: the cluster's, kept on its
    Redis server, when the nodes share one; else L{None} (the service
    keeps its own, in the process).
    """
    if isinstance(bus, RedisBus):
        return RedisThrottles(bus, clock)
    return None


class AuthFactory(MessageFactory):
    """
    An Int32 server of the auth service on C{store}.  The settings named
    in C{serviceSettings} are the service's; the rest are the server's.
    Unless C{throttles} is given, they are made for the C{bus}
    (L{throttlesFor}).
    """

    serviceClass: type[AuthService] = AuthService
    serviceSettings: tuple[str, ...] = (
        "sessionIdle",
        "sessionMax",
        "registrationsPerHour",
        "bus",
        "node",
        "throttles",
    )

    def __init__(self, store: Any, hasher: PasswordHasher, **settings: Any) -> None:
        if settings.get("throttles") is None:
            settings["throttles"] = throttlesFor(
                settings.get("bus"), settings.get("clock")
            )
        ofService = {
            key: settings.pop(key) for key in self.serviceSettings if key in settings
        }
        settings.setdefault("maxLength", DEFAULT_MAX_LENGTH)
        self.store = store
        super().__init__(
            lambda context: self.serviceClass(store, hasher, context, **ofService),
            **settings,
        )


class Options(StoredServerOptions):
    """
    Options of C{twistd netlab-auth}.
    """

    synopsis = "[options]"
    longdesc = (
        "Accounts and sessions: register, login, resume, whoami, logout, "
        "change_password.  Listens on 127.0.0.1:9092 by default."
    )
    defaultPort = DEFAULT_PORT
    defaultMaxLength = DEFAULT_MAX_LENGTH
    optParameters = [
        ["hash-memory-kib", None, DEFAULT_MEMORY_KIB, "argon2id memory cost.", int],
        ["hash-time-cost", None, DEFAULT_TIME_COST, "argon2id iterations.", int],
        ["hash-parallelism", None, DEFAULT_PARALLELISM, "argon2id lanes.", int],
        [
            "session-idle",
            None,
            DEFAULT_SESSION_IDLE,
            "Seconds a session lives unused.",
            nonNegativeFloat,
        ],
        [
            "session-max",
            None,
            DEFAULT_SESSION_MAX,
            "Seconds a session lives at most.",
            nonNegativeFloat,
        ],
        [
            "registrations-per-hour",
            None,
            DEFAULT_REGISTRATIONS_PER_HOUR,
            "Registrations allowed per client address per hour.",
            positiveInt,
        ],
    ]

    def postOptions(self) -> None:
        if self["hash-memory-kib"] < 8 * self["hash-parallelism"]:
            raise UsageError("--hash-memory-kib must be at least 8 per lane")
        if self["hash-time-cost"] < 1 or self["hash-parallelism"] < 1:
            raise UsageError("--hash-time-cost and --hash-parallelism must be >= 1")
        super().postOptions()


def passwordHasher(config: Options, reactor: Any) -> PasswordHasher:
    """
    The argon2id hasher C{config} describes.
    """
    return PasswordHasher(
        config["hash-memory-kib"],
        config["hash-time-cost"],
        config["hash-parallelism"],
        reactor=reactor,
    )


def authSettings(config: Options, reactor: Any) -> dict[str, Any]:
    """
    The keyword arguments of an L{AuthFactory} (and a chat factory), from
    C{config}.
    """
    return {
        "sessionIdle": config["session-idle"],
        "sessionMax": config["session-max"],
        "registrationsPerHour": config["registrations-per-hour"],
        "node": config["node"],
        **serverSettings(config, reactor),
    }


def makeService(config: Options, reactor: Any = None) -> IService:
    """
    The auth server described by C{config}: its services, not yet
    started.  twistd calls it with the options alone, after installing its
    reactor; tests pass their own.
    """
    if reactor is None:
        from twisted.internet import reactor
    store = openStore(config)
    bus = openBus(config, reactor)
    factory = AuthFactory(
        store, passwordHasher(config, reactor), bus=bus, **authSettings(config, reactor)
    )
    return storedService(config, "netlab-auth", store, factory, bus)
