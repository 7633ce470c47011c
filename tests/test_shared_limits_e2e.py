"""
End to end (issue 12, shared limits): two real C{twistd -n netlab-auth}
nodes sharing one SQLite file and one real valkey (C{--bus redis://...}),
against one node alone.

  - Wrong-password guesses sent at once, spread over both nodes, reach the
    hash exactly as often as on one node: at one account (5 free and the
    one that starts the back-off), then at many accounts from one address
    (the address's 20 free failures, shared).  Counted from the replies
    (C{bad_credentials} is only ever answered after a hash) and from both
    nodes' C{netlab_auth_attempts_total} metrics.
  - Registrations per address: the hourly allowance is one for the cluster.
  - A logout on node A ends the same session's connection on node B within
    the documented second (the bus hint makes it milliseconds; the
    revocation log, polled every 0.5 s, is the record).

Needs a Redis-protocol server (L{tests.redisserver}): skipped without one,
failed under CI.
"""

from __future__ import annotations

import os
import time
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor, threads
from twisted.trial.unittest import TestCase

from tests.e2e import DEADLINE, Server, pause
from tests.redisserver import RedisServer, requireServer
from twisted_lab.client.wire import FramedSocket
from twisted_lab.services.auth import ACCOUNT_FREE_FAILURES, ADDRESS_FREE_FAILURES

GUESSES = 40
PASSWORD = "password1"
REGISTRATIONS_PER_HOUR = 4
#: What the documentation promises for a revocation to reach a connection
#: on any node (docs/protocol.md 3.2, "Live sessions").
REVOCATION_BOUND = 1.0


def connect(port: int) -> FramedSocket:
    s = FramedSocket.connect_to("127.0.0.1", port)
    s.settimeout(30)
    return s


def ask(port: int, request: dict[str, Any]) -> dict[str, Any]:
    with connect(port) as s:
        s.send_json(request)
        return dict(s.recv_json())


def burst(ports: list[int], requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """
    Send every request at once, each on a connection of its own, spread
    round-robin over C{ports}; then read every reply.
    """
    sockets = [connect(ports[i % len(ports)]) for i in range(len(requests))]
    try:
        for s, request in zip(sockets, requests, strict=True):
            s.send_json(request)
        return [dict(s.recv_json()) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def codes(replies: list[dict[str, Any]]) -> dict[str, int]:
    found: dict[str, int] = {}
    for reply in replies:
        code = reply.get("code", reply["type"])
        found[code] = found.get(code, 0) + 1
    return found


def passwordFailures(metricsURL: str) -> float:
    with urllib.request.urlopen(metricsURL, timeout=10) as response:  # noqa: S310
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "netlab_auth_attempts_total" and sample.labels == {
                "method": "password",
                "result": "failure",
            }:
                return float(sample.value)
    return 0.0


class Node:
    def __init__(self, server: Server) -> None:
        self.server = server
        self.metricsURL = ""

    @property
    def port(self) -> int:
        return self.server.port


class SharedLimitsEndToEndTests(TestCase):
    timeout = 180

    def setUp(self) -> Any:
        self.redis = RedisServer(requireServer(), reactor)
        self.addCleanup(self.redis.cleanup)
        return self.redis.start()

    async def node(self, workdir: Path, name: str, db: Path, *extra: str) -> Node:
        server = Server(
            workdir / name,
            "netlab-auth",
            "--port",
            "0",
            "--db",
            str(db),
            "--node",
            name,
            "--metrics",
            "tcp:0:interface=127.0.0.1",
            "--registrations-per-hour",
            str(REGISTRATIONS_PER_HOUR),
            "--hash-memory-kib",
            "1024",
            "--hash-time-cost",
            "1",
            *extra,
        )
        self.addCleanup(server.cleanup)
        await server.start()
        node = Node(server)
        needed = {"metrics_listening"}
        if extra:
            needed.add("bus_connected")  # both connections of its bus
        waited = 0.0
        while True:
            names = server.eventNames()
            if needed <= set(names) and names.count("bus_connected") >= (
                2 if extra else 0
            ):
                break
            if waited > DEADLINE:
                raise AssertionError(f"{name} is not ready:\n{server.log()}")
            await pause()
            waited += 0.05
        [listening] = [
            e for e in server.events() if e.get("event") == "metrics_listening"
        ]
        node.metricsURL = f"http://127.0.0.1:{listening['port']}/metrics"
        return node

    async def scenario(self, nodes: list[Node]) -> dict[str, Any]:
        """
        The same attack on C{nodes}: what reached the hash, what was
        registered.
        """
        ports = [n.port for n in nodes]
        results: dict[str, Any] = {}
        for name in ("alice", "bob"):
            reply = await threads.deferToThread(
                ask,
                ports[0],
                {"type": "register", "username": name, "password": PASSWORD},
            )
            self.assertEqual(reply["type"], "registered", reply)
        wrong = {"type": "login", "username": "alice", "password": "wrong-guess"}
        replies = await threads.deferToThread(burst, ports, [wrong] * GUESSES)
        results["account"] = codes(replies)
        many = [
            {"type": "login", "username": f"nobody{i}", "password": "wrong-guess"}
            for i in range(GUESSES)
        ]
        replies = await threads.deferToThread(burst, ports, many)
        results["address"] = codes(replies)
        registrations = [
            {"type": "register", "username": f"newuser{i}", "password": PASSWORD}
            for i in range(6)
        ]
        replies = await threads.deferToThread(burst, ports, registrations)
        results["registrations"] = codes(replies)
        failures = []
        for node in nodes:
            failures.append(
                await threads.deferToThread(passwordFailures, node.metricsURL)
            )
        results["hashed by node"] = failures
        return results

    async def revocationLatency(self, a: Node, b: Node) -> float:
        """
        Log in on A, resume the same session on B, log out on A: the
        seconds until B's connection is told.
        """

        def measure() -> float:
            with connect(a.port) as onA, connect(b.port) as onB:
                onA.send_json(
                    {"type": "login", "username": "bob", "password": PASSWORD}
                )
                session = onA.recv_json()
                assert session["type"] == "session", session
                onB.send_json({"type": "resume", "token": session["token"]})
                assert onB.recv_json()["type"] == "session"
                onB.send_json({"type": "whoami"})
                assert onB.recv_json() == {"type": "identity", "username": "bob"}
                time.sleep(0.6)  # B has read the revocation log by now
                started = time.monotonic()
                onA.send_json({"type": "logout"})
                onB.settimeout(REVOCATION_BOUND * 5)
                try:
                    ended = onB.recv_json()
                except TimeoutError:
                    return float("inf")
                took = time.monotonic() - started
                assert onA.recv_json() == {"type": "logged_out"}
                assert ended["code"] == "session_revoked", ended
                onB.send_json({"type": "whoami"})
                assert onB.recv_json()["code"] == "not_authenticated"
                return took

        return await threads.deferToThread(measure)

    @defer.inlineCallbacks
    def test_twoNodesThrottleAsOne(self) -> Any:
        workdir = Path(self.mktemp()).absolute()
        workdir.mkdir(parents=True)
        alone = yield defer.ensureDeferred(
            self.node(workdir, "alone", workdir / "alone.sqlite3")
        )
        single = yield defer.ensureDeferred(self.scenario([alone]))
        yield defer.ensureDeferred(alone.server.stop())

        # Two nodes on one database without a bus: each keeps its own
        # throttles (what the shared ones are for).
        apart = workdir / "apart.sqlite3"
        nodes = []
        for name in ("apart-a", "apart-b"):
            nodes.append((yield defer.ensureDeferred(self.node(workdir, name, apart))))
        unshared = yield defer.ensureDeferred(self.scenario(nodes))
        for node in nodes:
            yield defer.ensureDeferred(node.server.stop())

        shared = workdir / "cluster.sqlite3"
        bus = ("--bus", self.redis.url)
        a = yield defer.ensureDeferred(self.node(workdir, "a", shared, *bus))
        b = yield defer.ensureDeferred(self.node(workdir, "b", shared, *bus))
        cluster = yield defer.ensureDeferred(self.scenario([a, b]))
        # The password of bob may be checked: the address block of the
        # scenario (1 s) is over first.
        yield defer.ensureDeferred(pauseFor(1.1))
        latency = yield defer.ensureDeferred(self.revocationLatency(a, b))
        report = (
            f"one node: {single}\ntwo nodes sharing valkey: {cluster}\n"
            f"two nodes, no bus: {unshared}\n"
            f"logout on A reached B in {latency * 1000:.1f} ms"
        )
        if os.environ.get("NETLAB_REPORT"):
            print("\n" + report)

        # One account: 5 free failures and the one that starts the back-off.
        accountChecked = ACCOUNT_FREE_FAILURES + 1
        self.assertEqual(
            single["account"],
            {
                "bad_credentials": accountChecked,
                "rate_limited": GUESSES - accountChecked,
            },
            report,
        )
        self.assertEqual(cluster["account"], single["account"], report)
        # Many accounts from one address: the address's 20 free failures,
        # 6 of them spent above, and the one that starts its back-off.
        addressChecked = ADDRESS_FREE_FAILURES - accountChecked + 1
        self.assertEqual(
            single["address"],
            {
                "bad_credentials": addressChecked,
                "rate_limited": GUESSES - addressChecked,
            },
            report,
        )
        self.assertEqual(cluster["address"], single["address"], report)
        # What reached the hash, as the nodes count it.
        self.assertEqual(sum(single["hashed by node"]), accountChecked + addressChecked)
        self.assertEqual(
            sum(cluster["hashed by node"]), sum(single["hashed by node"]), report
        )
        # Without the shared throttles each node would have let as many.
        self.assertEqual(
            sum(unshared["hashed by node"]), 2 * sum(single["hashed by node"]), report
        )
        # 4 registrations an hour per address: 2 used by alice and bob.
        self.assertEqual(
            single["registrations"], {"registered": 2, "rate_limited": 4}, report
        )
        self.assertEqual(cluster["registrations"], single["registrations"], report)
        self.assertLess(latency, REVOCATION_BOUND, report)
        for node in (a, b):
            yield defer.ensureDeferred(node.server.stop())
            self.assertNotIn("Traceback", node.server.log())


async def pauseFor(seconds: float) -> None:
    waited = 0.0
    while waited < seconds:
        await pause()
        waited += 0.05
