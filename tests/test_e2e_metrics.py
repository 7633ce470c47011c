"""
End to end: scrape C{/metrics} of real C{twistd} servers (echo and chat)
started with C{--metrics}, before and after real traffic, and check that
the counters move as docs/operations.md says.
"""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, threads
from twisted.trial.unittest import TestCase

from tests.e2e import DEADLINE, Server, pause
from twisted_lab.client.wire import FramedSocket

Samples = dict[tuple[str, frozenset], float]


def get(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310
        return (
            response.status,
            response.headers.get("Content-Type", ""),
            response.read().decode(),
        )


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


class MetricsEndToEndTests(TestCase):
    timeout = 90

    async def start(self, plugin: str, *options: str) -> tuple[Server, str]:
        server = Server(
            Path(self.mktemp()).absolute(),
            plugin,
            "--port",
            "0",
            "--metrics",
            "tcp:0:interface=127.0.0.1",
            *options,
        )
        self.addCleanup(server.cleanup)
        await server.start()
        waited = 0.0
        while True:
            found = [
                e for e in server.events() if e.get("event") == "metrics_listening"
            ]
            if found:
                break
            if waited > DEADLINE:
                raise AssertionError(f"no metrics_listening event:\n{server.log()}")
            await pause()
            waited += 0.05
        return server, f"http://127.0.0.1:{found[0]['port']}/metrics"

    async def scrape(self, url: str) -> Samples:
        status, contentType, text = await threads.deferToThread(get, url)
        self.assertEqual(status, 200)
        self.assertTrue(contentType.startswith("text/plain"), contentType)
        return parse(text)

    @defer.inlineCallbacks
    def test_echoUnderTraffic(self):
        server, url = yield defer.ensureDeferred(self.start("netlab-echo"))
        before = yield defer.ensureDeferred(self.scrape(url))
        self.assertEqual(value(before, "netlab_received_frames_total"), 0)
        [(labels, one)] = [
            (dict(labels), v)
            for (name, labels), v in before.items()
            if name == "netlab_build_info"
        ]
        self.assertEqual((labels["service"], one), ("netlab-echo", 1))
        payloads = [b"x" * n for n in (0, 1, 100, 5000)] * 25
        clients = 3
        yield threads.deferToThread(self.echoTraffic, server.port, payloads, clients)
        after = yield defer.ensureDeferred(self.scrape(url))
        frames = len(payloads) * clients
        wire = sum(4 + len(p) for p in payloads) * clients
        self.assertEqual(value(after, "netlab_received_frames_total"), frames)
        self.assertEqual(value(after, "netlab_sent_frames_total"), frames)
        self.assertEqual(value(after, "netlab_received_bytes_total"), wire)
        self.assertEqual(value(after, "netlab_sent_bytes_total"), wire)
        self.assertEqual(value(after, "netlab_connections_accepted_total"), clients)
        self.assertEqual(value(after, "netlab_connections_open"), 0)
        # The reactor's lag is sampled while metrics are served; the
        # process_* metrics come along.
        self.assertGreater(value(after, "process_resident_memory_bytes"), 0)
        waited = 0.0
        while not value(after, "netlab_reactor_lag_seconds_count"):
            self.assertLess(waited, DEADLINE, "the reactor's lag is not sampled")
            yield defer.ensureDeferred(pause(0.1))
            waited += 0.1
            after = yield defer.ensureDeferred(self.scrape(url))
        yield defer.ensureDeferred(server.stop())

    def echoTraffic(self, port: int, payloads: list[bytes], clients: int) -> None:
        for _ in range(clients):
            with FramedSocket.connect_to("127.0.0.1", port, timeout=10) as s:
                for payload in payloads:
                    s.send_message(payload)
                    assert s.recv_message() == payload
                s.shutdown(socket.SHUT_WR)
                assert s.recv(1) == b""

    @defer.inlineCallbacks
    def test_chatUnderTraffic(self):
        server, url = yield defer.ensureDeferred(
            self.start(
                "netlab-chat",
                "--db",
                "chat.sqlite3",
                "--hash-memory-kib",
                "64",
                "--hash-time-cost",
                "1",
            )
        )
        before = yield defer.ensureDeferred(self.scrape(url))
        self.assertEqual(value(before, "netlab_chat_messages_stored_total"), 0)
        said = yield threads.deferToThread(self.chatTraffic, server.port)
        after = yield defer.ensureDeferred(self.scrape(url))
        self.assertEqual(value(after, "netlab_chat_messages_stored_total"), said)
        # Two members: each message is written to both (the sender too).
        self.assertEqual(
            value(after, "netlab_chat_deliveries_total", kind="room"), 2 * said
        )
        self.assertEqual(
            value(after, "netlab_chat_deliveries_total", kind="private"), 1
        )
        self.assertEqual(
            value(after, "netlab_requests_total", type="say", outcome="ok"), said
        )
        self.assertEqual(
            value(after, "netlab_requests_total", type="login", outcome="ok"), 2
        )
        self.assertEqual(
            value(
                after, "netlab_requests_total", type="login", outcome="bad_credentials"
            ),
            1,
        )
        attempts = "netlab_auth_attempts_total"
        self.assertEqual(value(after, attempts, method="password", result="success"), 2)
        self.assertEqual(value(after, attempts, method="password", result="failure"), 1)
        # 2 registrations + 3 logins.
        self.assertEqual(value(after, "netlab_password_hash_duration_seconds_count"), 5)
        self.assertGreaterEqual(
            value(after, "netlab_chat_delivery_latency_seconds_count"), 1
        )
        self.assertGreater(
            value(after, "netlab_db_transaction_duration_seconds_count"),
            value(before, "netlab_db_transaction_duration_seconds_count"),
        )
        self.assertGreater(
            value(after, "netlab_request_duration_seconds_count", type="say"), 0
        )
        self.assertEqual(value(after, "netlab_connections_accepted_total"), 3)
        # Never a user, a room or an address in a label.
        _, _, text = yield threads.deferToThread(get, url)
        for secret in ("alice", "bob", "lobby", "127.0.0.1"):
            self.assertNotIn(secret, text)
        yield defer.ensureDeferred(server.stop())

    def chatTraffic(self, port: int) -> int:
        def connect() -> FramedSocket:
            return FramedSocket.connect_to("127.0.0.1", port, timeout=10)

        def ask(s: FramedSocket, request: dict, until: str) -> dict:
            s.send_json(request)
            while True:
                reply = s.recv_json()
                if reply.get("type") in (until, "error"):
                    return reply

        texts = [f"message {n}" for n in range(12)]
        with connect() as alice, connect() as bob, connect() as stranger:
            for s, name in ((alice, "alice"), (bob, "bob")):
                for kind, until in (("register", "registered"), ("login", "session")):
                    reply = ask(
                        s,
                        {"type": kind, "username": name, "password": "password1"},
                        until,
                    )
                    assert reply["type"] == until, reply
                assert ask(s, {"type": "join", "room": "lobby"}, "joined")["type"] == (
                    "joined"
                )
            for text in texts:
                reply = ask(
                    alice, {"type": "say", "room": "lobby", "text": text}, "message"
                )
                assert reply["type"] == "message", reply
            assert (
                ask(alice, {"type": "msg", "to": "bob", "text": "hi"}, "sent")["type"]
                == "sent"
            )
            wrong = ask(
                stranger,
                {"type": "login", "username": "alice", "password": "not-hers!"},
                "session",
            )
            assert wrong.get("code") == "bad_credentials", wrong
            # Bob has seen every message before we scrape.
            seen = 0
            while seen < len(texts):
                if bob.recv_json().get("type") == "message":
                    seen += 1
        return len(texts)
