"""
Unit tests of the Prometheus metrics (L{twisted_lab.observe.metrics}): the counters
move as docs/operations.md says, read through the text exposition exactly
as a scrape reads them; each server has its own registry.
"""

from __future__ import annotations

import json
import socket

from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.helpers import connectProtocol, frames
from tests.servicehelpers import ServerHarness
from tests.test_messages import SampleFactory, replies
from twisted_lab.observe.metrics import LAG_INTERVAL, MetricsServer, ServerStats
from twisted_lab.runtime.server import NetlabService
from twisted_lab.runtime.startup import StartupFailed
from twisted_lab.runtime.systemd import whenOpened
from twisted_lab.services.limits import RequestLimit
from twisted_lab.transports.connection import ServerFactory
from twisted_lab.transports.echo import EchoFactory, RawEcho


def scrape(stats: ServerStats) -> dict[tuple[str, frozenset], float]:
    """
    Every sample of C{stats}' registry, as a scrape would see it, keyed by
    (sample name, labels).
    """
    text = generate_latest(stats.registry).decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


class EchoMetricsTests(SynchronousTestCase):
    def test_framesBytesConnections(self) -> None:
        """
        Frames and bytes in and out, connections accepted and open: what
        the echo served, counted where it reads and writes.
        """
        factory = EchoFactory(clock=Clock())
        before = scrape(factory.stats)
        self.assertEqual(value(before, "netlab_connections_accepted_total"), 0)
        protocol, transport, _ = connectProtocol(factory)
        data = frames(b"hello", b"", b"x" * 100)
        protocol.dataReceived(data[:7])  # a frame split between reads
        protocol.dataReceived(data[7:])
        self.assertEqual(transport.value(), data)
        after = scrape(factory.stats)
        self.assertEqual(value(after, "netlab_received_frames_total"), 3)
        self.assertEqual(value(after, "netlab_sent_frames_total"), 3)
        self.assertEqual(value(after, "netlab_received_bytes_total"), len(data))
        self.assertEqual(value(after, "netlab_sent_bytes_total"), len(data))
        self.assertEqual(value(after, "netlab_connections_accepted_total"), 1)
        self.assertEqual(value(after, "netlab_connections_open"), 1)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(value(scrape(factory.stats), "netlab_connections_open"), 0)

    def test_refusedByReason(self) -> None:
        """
        A connection over a cap is counted by the cap, never by address,
        and is neither accepted nor open.
        """
        factory = EchoFactory(
            clock=Clock(), maxConnections=3, maxConnectionsPerAddress=1
        )
        connectProtocol(factory, host="127.0.0.2")
        connectProtocol(factory, host="127.0.0.2")  # over the per-address cap
        connectProtocol(factory, host="127.0.0.3")
        connectProtocol(factory, host="127.0.0.4")
        connectProtocol(factory, host="127.0.0.5")  # over the server's cap
        samples = scrape(factory.stats)
        refused = "netlab_connections_refused_total"
        self.assertEqual(value(samples, refused, reason="max_connections"), 1)
        self.assertEqual(
            value(samples, refused, reason="max_connections_per_address"), 1
        )
        self.assertEqual(value(samples, "netlab_connections_accepted_total"), 3)
        self.assertEqual(value(samples, "netlab_connections_open"), 3)
        for (name, labels), _ in samples.items():
            for _, label in labels:
                self.assertNotIn("127.0.0", label, name)

    def test_registryPerServer(self) -> None:
        """
        Each server counts in a registry of its own; the global registry
        never sees netlab's metrics.
        """
        one, two = EchoFactory(clock=Clock()), EchoFactory(clock=Clock())
        self.assertIsNot(one.stats.registry, two.stats.registry)
        protocol, _, _ = connectProtocol(one)
        protocol.dataReceived(frames(b"only one"))
        self.assertEqual(value(scrape(one.stats), "netlab_received_frames_total"), 1)
        self.assertEqual(value(scrape(two.stats), "netlab_received_frames_total"), 0)
        names = {m.name for m in REGISTRY.collect()}
        self.assertFalse([n for n in names if n.startswith("netlab")], names)

    def test_slowConsumer(self) -> None:
        factory = ServerFactory(clock=Clock(), maxSendQueue=10)
        factory.protocol = RawEcho
        protocol, transport, _ = connectProtocol(factory)
        protocol.output.pauseProducing()  # the peer's buffer is full
        protocol.dataReceived(b"x" * 5000)
        self.assertEqual(value(scrape(factory.stats), "netlab_slow_consumers_total"), 1)

    def test_namesFollowPrometheusRules(self) -> None:
        """
        Every netlab metric starts with netlab_; counters end in _total;
        durations are in seconds.
        """
        factory = EchoFactory(clock=Clock())
        text = generate_latest(factory.stats.registry).decode()
        families = list(text_string_to_metric_families(text))
        self.assertTrue(families)
        for family in families:
            self.assertTrue(family.name.startswith("netlab_"), family.name)
            if family.type == "histogram":
                self.assertTrue(family.name.endswith("_seconds"), family.name)
            for sample in family.samples:
                if family.type == "counter" and not sample.name.endswith("_created"):
                    self.assertTrue(sample.name.endswith("_total"), sample.name)
        build = [f for f in families if f.name == "netlab_build_info"]
        self.assertEqual(len(build), 1)


class RequestMetricsTests(SynchronousTestCase):
    def factory(self) -> SampleFactory:
        factory = SampleFactory(clock=Clock())
        factory.requestLimits = {"ping": RequestLimit(rate=1.0, burst=2, perUser=False)}
        return factory

    def test_requestsByTypeAndOutcome(self) -> None:
        """
        Every request is counted by its type and outcome (ok, or the code
        of the error it got); a type the service does not know, or a frame
        that is not a request, is counted as "invalid", never under the
        name the client chose.
        """
        factory = self.factory()
        protocol, transport, _ = connectProtocol(factory)
        requests = [
            {"type": "ping"},
            {"type": "ping"},
            {"type": "ping"},  # over its burst of 2
            {"type": "fail"},
            {"type": "say", "text": "far too long for this"},
            {"type": "no-such-type-chosen-by-client"},
        ]
        protocol.dataReceived(
            frames(*[json.dumps(r).encode() for r in requests], b"not json")
        )
        self.assertEqual(len(replies(transport)), 7)
        samples = scrape(factory.stats)
        total = "netlab_requests_total"
        self.assertEqual(value(samples, total, type="ping", outcome="ok"), 2)
        self.assertEqual(value(samples, total, type="ping", outcome="rate_limited"), 1)
        self.assertEqual(value(samples, total, type="fail", outcome="no_such_user"), 1)
        self.assertEqual(value(samples, total, type="say", outcome="bad_request"), 1)
        self.assertEqual(
            value(samples, total, type="invalid", outcome="unknown_type"), 1
        )
        self.assertEqual(
            value(samples, total, type="invalid", outcome="bad_request"), 1
        )
        self.assertEqual(value(samples, "netlab_rate_limited_total"), 1)
        self.assertEqual(value(samples, "netlab_received_frames_total"), 7)
        self.assertEqual(value(samples, "netlab_sent_frames_total"), 7)
        # Handled requests are timed; refused ones cost nothing to time.
        duration = "netlab_request_duration_seconds_count"
        self.assertEqual(value(samples, duration, type="ping"), 2)
        self.assertEqual(value(samples, duration, type="fail"), 1)
        self.assertNotIn(
            b"no-such-type-chosen-by-client", generate_latest(factory.stats.registry)
        )

    def test_internalError(self) -> None:
        factory = self.factory()
        protocol, transport, _ = connectProtocol(factory)
        protocol.dataReceived(frames(b'{"type": "boom"}'))
        samples = scrape(factory.stats)
        self.assertEqual(
            value(
                samples, "netlab_requests_total", type="boom", outcome="internal_error"
            ),
            1,
        )
        self.flushLoggedErrors()


class ReactorLagTests(SynchronousTestCase):
    def test_lagIsHowLateTheTimerRan(self) -> None:
        clock = Clock()
        stats = ServerStats()
        server = MetricsServer("tcp:0", stats, reactor=clock)
        server.startSampling(clock)
        clock.advance(LAG_INTERVAL)  # on time
        clock.advance(LAG_INTERVAL + 0.3)  # the reactor was busy for 0.3 s
        samples = scrape(stats)
        self.assertEqual(value(samples, "netlab_reactor_lag_seconds_count"), 2)
        self.assertAlmostEqual(value(samples, "netlab_reactor_lag_seconds_sum"), 0.3)
        self.successResultOf(server.stop())
        self.assertEqual(clock.getDelayedCalls(), [])


class ReadinessTests(SynchronousTestCase):
    def test_whenOpened(self) -> None:
        """
        Readiness waits for the store: true once it opened, false if it
        failed; the store service's own Deferred keeps its result.
        """
        from twisted_lab.storage.sqlite import Store

        class FakeStoreService:
            opened: defer.Deferred | None = None

        service = FakeStoreService()
        service.opened = defer.Deferred()
        ready = whenOpened(service)
        self.assertNoResult(ready)
        store = Store(":memory:")
        service.opened.callback(store)
        self.assertIs(self.successResultOf(ready), True)
        self.assertIs(self.successResultOf(service.opened), store)

        failed = FakeStoreService()
        failed.opened = defer.succeed(None)  # _cannotOpen swallowed the error
        self.assertIs(self.successResultOf(whenOpened(failed)), False)
        self.assertIs(self.successResultOf(whenOpened(FakeStoreService())), False)


class ChatMetricsTests(ServerHarness):
    def test_chatAuthAndStoreMetrics(self) -> None:
        """
        Two members, three messages: three stored, six room deliveries
        (every member connection, the sender's too), one private delivery,
        password attempts by result, hashes and transactions timed.
        """
        factory = self.makeChat()
        alice = self.user(factory, "alice")
        bob = self.user(factory, "bob", host="127.0.0.3")
        for who in (alice, bob):
            self.one(who, {"type": "join", "room": "lobby"})
        for text in ("one", "two", "three"):
            self.one(alice, {"type": "say", "room": "lobby", "text": text})
        self.one(alice, {"type": "msg", "to": "bob", "text": "psst"})
        wrong = self.connect(factory, "127.0.0.4")
        reply = self.one(
            wrong, {"type": "login", "username": "alice", "password": "wrong-one"}
        )
        self.assertEqual(reply["code"], "bad_credentials")
        bad = self.one(wrong, {"type": "resume", "token": "nonsense"})
        self.assertEqual(bad["code"], "invalid_token")
        samples = scrape(factory.stats)
        self.assertEqual(value(samples, "netlab_chat_messages_stored_total"), 3)
        deliveries = "netlab_chat_deliveries_total"
        self.assertEqual(value(samples, deliveries, kind="room"), 6)
        self.assertEqual(value(samples, deliveries, kind="private"), 1)
        self.assertEqual(
            value(samples, "netlab_chat_delivery_latency_seconds_count"), 3
        )
        attempts = "netlab_auth_attempts_total"
        self.assertEqual(
            value(samples, attempts, method="password", result="success"), 2
        )
        self.assertEqual(
            value(samples, attempts, method="password", result="failure"), 1
        )
        self.assertEqual(value(samples, attempts, method="token", result="failure"), 1)
        # 2 registrations, 3 logins: 5 hashes; none waiting now.
        self.assertEqual(
            value(samples, "netlab_password_hash_duration_seconds_count"), 5
        )
        self.assertEqual(value(samples, "netlab_password_hashes_queued"), 0)
        self.assertEqual(value(samples, "netlab_password_hashes_running"), 0)
        self.assertGreaterEqual(
            value(samples, "netlab_db_transaction_duration_seconds_count"), 3
        )
        self.assertEqual(
            value(samples, "netlab_requests_total", type="say", outcome="ok"), 3
        )
        for name in ("alice", "bob", "lobby", "127.0.0"):
            self.assertNotIn(name.encode(), generate_latest(factory.stats.registry))
        for c in (alice, bob, wrong):
            self.disconnect(factory, c[0])


class MetricsListeningTests(TestCase):
    def test_takenMetricsPortStopsTheStart(self) -> None:
        """
        A metrics port that cannot be had fails the start in one line, and
        the service's own port is not left listening.
        """
        from twisted.internet import reactor

        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        service = NetlabService(
            "netlab-echo",
            EchoFactory(clock=reactor),
            "tcp:0:interface=127.0.0.1",
            reactor=reactor,
            metrics=f"tcp:{port}:interface=127.0.0.1",
        )
        service.log = Logger(observer=lambda event: None)
        with self.assertRaises(StartupFailed) as caught:
            service.privilegedStartService()
        self.assertIn(f"cannot serve metrics on tcp:{port}", str(caught.exception))
        self.assertIsNone(service.port)
