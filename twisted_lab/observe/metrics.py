"""
Prometheus metrics for every netlab server (the C{--metrics} option).

An operator who runs netlab under systemd watches it with Prometheus; this
module is what they scrape.  It keeps the hot path cheap: a read or a write
costs an integer addition on L{ServerStats} (no lock, no label lookup), and
a L{StatsCollector} turns those integers into Prometheus samples only when
C{/metrics} is scraped.  Work that is rare or already slow (a request, a
password hash, a database transaction, a chat fan-out) is timed into
C{prometheus_client} histograms, which are thread-safe (hashes and
transactions are timed in their own threads).

Each server has a L{CollectorRegistry} of its own (never the global one),
so two servers in one process, or in one test run, never share counters.
L{MetricsServer} serves it over HTTP through C{prometheus_client}'s Twisted
resource and measures the reactor's lag while it runs.

Names follow Prometheus's rules: the C{netlab_} prefix, base units
(seconds, bytes), C{_total} on counters; no label ever holds a user, a room
or an address.  C{docs/operations.md} lists every metric.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Site

from twisted_lab.codecs import events

#: Why a connection was refused (the C{reason} label): one per cap.
REFUSED_MAX_CONNECTIONS = "max_connections"
REFUSED_MAX_PER_ADDRESS = "max_connections_per_address"

#: The C{outcome} of a request that got its reply.
OK = "ok"

#: Seconds: request handling, hashing, transactions, fan-out, reactor lag.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
#: How often the reactor's lag is sampled while metrics are served.
LAG_INTERVAL = 0.5


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("twisted-lab")
    except Exception:  # noqa: BLE001 (a source tree without metadata)
        return "unknown"


class ServerStats:
    """
    The counters of one server: plain integers and dicts updated on the
    reactor thread, read at scrape time by L{StatsCollector}; histograms
    for what is timed.  Every server factory has one (cheap enough to keep
    even when nothing scrapes it), so the counting code has no branches.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.serviceName = ""
        self.factory: Any = None
        self.accepted = 0
        self.refused = {REFUSED_MAX_CONNECTIONS: 0, REFUSED_MAX_PER_ADDRESS: 0}
        self.bytesReceived = 0
        self.bytesSent = 0
        self.framesReceived = 0
        self.framesSent = 0
        #: (type, outcome) -> count
        self.requests: dict[tuple[str, str], int] = {}
        #: (method, result) -> count
        self.authAttempts: dict[tuple[str, str], int] = {}
        self.rateLimited = 0
        self.slowConsumers = 0
        self.chatMessagesStored = 0
        self.deliveries = {"room": 0, "private": 0}
        self.hasher: Any = None
        self.chat = False
        self.process = False
        self.requestSeconds: Histogram | None = None
        self.hashSeconds: Histogram | None = None
        self.transactionSeconds: Histogram | None = None
        self.deliverySeconds: Histogram | None = None
        self.reactorLag = Histogram(
            "netlab_reactor_lag_seconds",
            "How late the reactor ran a timer due every "
            f"{LAG_INTERVAL} s (sampled while metrics are served).",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(StatsCollector(self))

    # -- what a service has -----------------------------------------------------

    def enableRequests(self) -> None:
        """
        The server speaks JSON requests: time them.
        """
        if self.requestSeconds is None:
            self.requestSeconds = Histogram(
                "netlab_request_duration_seconds",
                "Time from a request's turn in its connection's queue to its "
                "reply, by request type.",
                ["type"],
                buckets=LATENCY_BUCKETS,
                registry=self.registry,
            )

    def enableStore(self, store: Any) -> None:
        """
        The server has a database: time its transactions.
        """
        if self.transactionSeconds is None:
            self.transactionSeconds = Histogram(
                "netlab_db_transaction_duration_seconds",
                "Time from BEGIN to the end of COMMIT of each database "
                "transaction, in the database thread.",
                buckets=LATENCY_BUCKETS,
                registry=self.registry,
            )
        store.onTransaction = self.transactionSeconds.observe

    def enableAuth(self, hasher: Any) -> None:
        """
        The server checks passwords with C{hasher}: time its hashes and
        report its queue.
        """
        self.hasher = hasher
        if self.hashSeconds is None:
            self.hashSeconds = Histogram(
                "netlab_password_hash_duration_seconds",
                "Time one argon2id hash or verification took in its thread.",
                buckets=LATENCY_BUCKETS,
                registry=self.registry,
            )
        hasher.onHashed = self.hashSeconds.observe

    def enableChat(self) -> None:
        """
        The server stores and fans out chat messages.
        """
        self.chat = True
        if self.deliverySeconds is None:
            self.deliverySeconds = Histogram(
                "netlab_chat_delivery_latency_seconds",
                "Time from the commit of a batch of room messages to their "
                "write to the last member of the room.",
                buckets=LATENCY_BUCKETS,
                registry=self.registry,
            )

    # -- counting -----------------------------------------------------------------

    def countRequest(self, kind: str, outcome: str) -> None:
        key = (kind, outcome)
        self.requests[key] = self.requests.get(key, 0) + 1

    def requestFinished(self, result: Any, kind: str, started: float) -> Any:
        """
        A callback and errback: count and time the request of C{kind}
        started at C{started} (L{time.perf_counter}); C{result} passes on.
        """
        if not isinstance(result, Failure):
            outcome = OK
        else:
            # (Imported here: the message layer imports this module.)
            from twisted_lab.codecs.message import RequestError

            error = result.value
            outcome = (
                error.code if isinstance(error, RequestError) else "internal_error"
            )
        self.countRequest(kind, outcome)
        if self.requestSeconds is not None:
            self.requestSeconds.labels(kind).observe(time.perf_counter() - started)
        return result

    def authAttempt(self, method: str, result: str) -> None:
        key = (method, result)
        self.authAttempts[key] = self.authAttempts.get(key, 0) + 1


class StatsCollector(Collector):
    """
    Reads a L{ServerStats} at scrape time (in the web server's thread:
    it only reads integers and copies dicts, which the GIL keeps whole).
    """

    def __init__(self, stats: ServerStats) -> None:
        self.stats = stats

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        build = GaugeMetricFamily(
            "netlab_build_info",
            "Always 1; the labels say what is running.",
            labels=["service", "version", "python_version", "twisted_version"],
        )
        from twisted import __version__ as twistedVersion

        build.add_metric(
            [s.serviceName, _version(), platform.python_version(), twistedVersion], 1
        )
        yield build
        connections = getattr(s.factory, "connections", ())
        yield GaugeMetricFamily(
            "netlab_connections_open",
            "Connections being served now (refused ones are never open).",
            value=len(connections),
        )
        yield CounterMetricFamily(
            "netlab_connections_accepted",
            "Connections admitted since the start.",
            value=s.accepted,
        )
        refused = CounterMetricFamily(
            "netlab_connections_refused",
            "Connections closed at once because a cap was reached, by cap.",
            labels=["reason"],
        )
        for reason, count in dict(s.refused).items():
            refused.add_metric([reason], count)
        yield refused
        for direction, value in (
            ("received", s.bytesReceived),
            ("sent", s.bytesSent),
        ):
            yield CounterMetricFamily(
                f"netlab_{direction}_bytes",
                f"Bytes {direction} on served connections.",
                value=value,
            )
        for direction, value in (
            ("received", s.framesReceived),
            ("sent", s.framesSent),
        ):
            yield CounterMetricFamily(
                f"netlab_{direction}_frames",
                f"Int32 frames {direction} (echo: frames whose header "
                "passed through; raw echo has none).",
                value=value,
            )
        yield CounterMetricFamily(
            "netlab_slow_consumers",
            "Connections cut off for leaving too much output unread.",
            value=s.slowConsumers,
        )
        if s.requestSeconds is not None:
            requests = CounterMetricFamily(
                "netlab_requests",
                "JSON requests answered, by type and outcome (ok, or the "
                "error code of the reply).",
                labels=["type", "outcome"],
            )
            for (kind, outcome), count in sorted(dict(s.requests).items()):
                requests.add_metric([kind, outcome], count)
            yield requests
            yield CounterMetricFamily(
                "netlab_rate_limited",
                "Requests and password attempts answered rate_limited.",
                value=s.rateLimited,
            )
        hasher = s.hasher
        semaphore = getattr(hasher, "semaphore", None)
        if hasher is not None:
            attempts = CounterMetricFamily(
                "netlab_auth_attempts",
                "Authentication attempts by method (password, token) and "
                "result (success, failure, throttled, error).",
                labels=["method", "result"],
            )
            for (method, result), count in sorted(dict(s.authAttempts).items()):
                attempts.add_metric([method, result], count)
            yield attempts
        if semaphore is not None:
            yield GaugeMetricFamily(
                "netlab_password_hashes_queued",
                "Password hashes waiting for a hashing thread.",
                value=len(semaphore.waiting),
            )
            yield GaugeMetricFamily(
                "netlab_password_hashes_running",
                "Password hashes running now.",
                value=semaphore.limit - semaphore.tokens,
            )
        if s.chat:
            yield CounterMetricFamily(
                "netlab_chat_messages_stored",
                "Room messages committed to the database.",
                value=s.chatMessagesStored,
            )
            deliveries = CounterMetricFamily(
                "netlab_chat_deliveries",
                "Messages written to member connections: room messages once "
                "per member connection, private messages once per "
                "connection of the addressee.",
                labels=["kind"],
            )
            for kind, count in dict(s.deliveries).items():
                deliveries.add_metric([kind], count)
            yield deliveries


class _QuietSite(Site):
    """
    A site that writes no access log line per scrape (and no "Starting
    factory" lines): a scrape every 15 s would fill the server's log.
    """

    noisy = False

    def log(self, request: Any) -> None:
        pass


class MetricsServer:
    """
    Serves C{/metrics} of one L{ServerStats} on a Twisted endpoint, and
    samples the reactor's lag while it runs.
    """

    log = Logger()

    def __init__(self, description: str, stats: ServerStats, reactor: Any) -> None:
        self.description = description
        self.stats = stats
        self.reactor = reactor
        self.port: IListeningPort | None = None
        self._lagCall: IDelayedCall | None = None
        self._due = 0.0
        if not stats.process:
            # The standard process_* metrics (CPU, memory, descriptors),
            # read from /proc at scrape time.
            ProcessCollector(registry=stats.registry)
            stats.process = True

    def resource(self) -> Resource:
        """
        The root resource: C{/metrics} is C{prometheus_client}'s Twisted
        resource on this server's registry.
        """
        # Imported here: it imports the reactor, which twistd installs
        # only after it has loaded this module.
        from prometheus_client.twisted import MetricsResource

        root = Resource()
        root.putChild(b"metrics", MetricsResource(registry=self.stats.registry))
        return root

    def listen(self) -> defer.Deferred[IListeningPort]:
        """
        Start listening; fires with the port (logged as C{metrics_listening}).
        """
        site = _QuietSite(self.resource())
        d = serverFromString(self.reactor, self.description).listen(site)

        def listening(port: IListeningPort) -> IListeningPort:
            self.port = port
            address = port.getHost()
            self.log.info(
                "metrics on http://{interface}:{port}/metrics",
                event=events.METRICS_LISTENING,
                interface=getattr(address, "host", str(address)),
                port=getattr(address, "port", None),
            )
            return port

        return d.addCallback(listening)

    def startSampling(self, clock: IReactorTime | None = None) -> None:
        """
        Sample the reactor's lag every L{LAG_INTERVAL} seconds: how late a
        timer runs is how long the reactor was busy with something else.
        """
        clock = clock or self.reactor
        self._due = clock.seconds() + LAG_INTERVAL
        self._lagCall = clock.callLater(LAG_INTERVAL, self._sample, clock)

    def _sample(self, clock: IReactorTime) -> None:
        now = clock.seconds()
        self.stats.reactorLag.observe(max(0.0, now - self._due))
        self._due = now + LAG_INTERVAL
        self._lagCall = clock.callLater(LAG_INTERVAL, self._sample, clock)

    def stop(self) -> defer.Deferred[Any]:
        """
        Stop sampling and listening.
        """
        if self._lagCall is not None and self._lagCall.active():
            self._lagCall.cancel()
        self._lagCall = None
        port, self.port = self.port, None
        if port is None:
            return defer.succeed(None)
        return defer.maybeDeferred(port.stopListening)
