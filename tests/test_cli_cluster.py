"""
Unit tests of the client for a cluster (issue 12): C{--server} addresses
(L{twisted_lab.client.cluster}), the order they are tried in, the saved
session of a set of servers (L{twisted_lab.client.sessions.Cluster}), and a
chat session that loses its node, resumes on another one and catches up
without a gap or a duplicate (L{twisted_lab.client.chat.ChatSession}, on
L{StringTransport}s and a L{MemoryReactorClock}).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
from pathlib import Path
from typing import Any

from twisted.internet import defer, error
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.test_cli_chat import decodeFrames, frame
from twisted_lab.client.chat import ChatSession, View
from twisted_lab.client.cluster import (
    Failover,
    NoServerReachable,
    parseServer,
    parseServers,
    withPorts,
)
from twisted_lab.client.frames import MessageClient
from twisted_lab.client.sessions import (
    Cluster,
    Endpoint,
    Session,
    SessionChoiceError,
    SessionStore,
    chooseSession,
)

A, B, C = ("127.0.0.1", 7001), ("127.0.0.1", 7002), ("127.0.0.1", 7003)


# -- addresses -------------------------------------------------------------------


class ParseServerTests(SynchronousTestCase):
    def test_forms(self) -> None:
        self.assertEqual(parseServer("localhost:9093"), ("localhost", 9093))
        self.assertEqual(parseServer(" LocalHost "), ("localhost", None))
        self.assertEqual(parseServer("127.0.0.1"), ("127.0.0.1", None))
        self.assertEqual(parseServer("[::1]:9093"), ("::1", 9093))
        self.assertEqual(parseServer("[::1]"), ("::1", None))
        # A bare IPv6 address has no port: a port needs the brackets.
        self.assertEqual(parseServer("::1"), ("::1", None))
        self.assertEqual(parseServer("fe80::1"), ("fe80::1", None))

    def test_lists(self) -> None:
        self.assertEqual(
            parseServers("a:1, b:2 ,[::1]:3,c"),
            [("a", 1), ("b", 2), ("::1", 3), ("c", None)],
        )

    def test_invalid(self) -> None:
        for text in (
            "",
            "a:1,",
            ",a:1",
            ":9093",
            "a:",
            "a:x",
            "a:0",
            "a:65536",
            "[::1",
            "[::1]9093",
            "[]:1",
            "a b:1",
            "a\x1b:1",
        ):
            with self.assertRaises(ValueError, msg=repr(text)):
                parseServers(text)

    def test_portsFilledAndDuplicatesDropped(self) -> None:
        self.assertEqual(
            withPorts([("a", None), ("b", 2), ("a", 9093), ("b", 2)], 9093),
            [("a", 9093), ("b", 2)],
        )


class OptionsTests(SynchronousTestCase):
    """
    C{--server} next to the options every script already uses.
    """

    def parse(self, *argv: str) -> argparse.Namespace:
        from twisted_lab.client.cli import parseOptions

        return parseOptions(list(argv))

    def resolved(self, *argv: str) -> argparse.Namespace:
        from twisted_lab.client.cli import resolveOptionsTarget

        options = self.parse(*argv)
        options.interactive = options.terminal = False
        resolveOptionsTarget(options)
        return options

    def test_repeatedAndCommaSeparated(self) -> None:
        options = self.resolved(
            "chat", "--server", "127.0.0.1:7001", "--server", "127.0.0.1:7002,[::1]"
        )
        self.assertEqual(
            options.targets, [("127.0.0.1", 7001), ("127.0.0.1", 7002), ("::1", 9093)]
        )
        self.assertEqual((options.host, options.port), ("127.0.0.1", 7001))
        self.assertFalse(options.shuffle)

    def test_portIsTheDefaultForAddressesWithout(self) -> None:
        options = self.resolved("auth", "whoami", "--port", "7000", "--server", "a,b:1")
        self.assertEqual(options.targets, [("a", 7000), ("b", 1)])

    def test_hostAndPortAsBefore(self) -> None:
        options = self.resolved("chat", "--host", "[::1]", "--port", "7001")
        self.assertEqual(options.targets, [("::1", 7001)])
        self.assertIsNone(options.servers)
        self.assertEqual(self.resolved("echo").targets, [("localhost", 9090)])

    def test_hostWithServerIsAUsageError(self) -> None:
        stderr = io.StringIO()
        self.patch(__import__("sys"), "stderr", stderr)
        with self.assertRaises(SystemExit) as raised:
            self.parse("chat", "--host", "a", "--server", "b:1")
        self.assertEqual(raised.exception.code, 2)
        self.assertIn("--host and --server do not go together", stderr.getvalue())
        with self.assertRaises(SystemExit) as raised:
            self.parse("chat", "--server", "b:99999")
        self.assertEqual(raised.exception.code, 2)
        self.assertIn("not between 1 and 65535", stderr.getvalue())

    def test_everyCommandTakesServer(self) -> None:
        for argv in (
            ["echo", "hi"],
            ["identity"],
            ["auth", "login"],
            ["auth", "whoami"],
            ["auth", "logout"],
            ["chat"],
        ):
            options = self.parse(*argv, "--server", "a:1", "--server", "b:2")
            self.assertEqual(options.servers, [("a", 1), ("b", 2)], argv)
            self.assertTrue(self.parse(*argv, "--shuffle").shuffle)

    def test_helpDocumentsIt(self) -> None:
        stdout = io.StringIO()
        self.patch(__import__("sys"), "stdout", stdout)
        with self.assertRaises(SystemExit) as raised:
            self.parse("chat", "--help")
        self.assertEqual(raised.exception.code, 0)
        text = stdout.getvalue()
        self.assertIn("--server HOST[:PORT]", text)
        self.assertIn("--shuffle", text)
        self.assertIn("next node in turn", " ".join(text.split()))


# -- the order servers are tried in -------------------------------------------


class FakeNetwork:
    """
    Connections that succeed, or fail as C{failures} says, at once.
    """

    def __init__(self, failures: dict[Any, Exception] | None = None) -> None:
        self.failures = failures or {}
        self.tried: list[Any] = []

    async def connectTo(self, address: Any, client: Any) -> Any:
        self.tried.append(address)
        failure = self.failures.get(address)
        if failure is not None:
            raise failure
        return client


class FailoverTests(SynchronousTestCase):
    def connect(self, failover: Failover) -> Any:
        return defer.ensureDeferred(failover.connect(object()))

    def test_inTheOrderGivenFallingThrough(self) -> None:
        network = FakeNetwork(
            {
                A: error.ConnectionRefusedError(),
                B: error.TimeoutError(),
                C: error.DNSLookupError("no such host"),
            }
        )
        D = ("127.0.0.1", 7004)
        told: list[tuple[Any, str, Any]] = []
        failover = Failover(
            [A, B, C, D],
            network.connectTo,
            onFailure=lambda a, e, n: told.append((a, type(e).__name__, n)),
        )
        self.successResultOf(self.connect(failover))
        self.assertEqual(network.tried, [A, B, C, D])
        self.assertEqual(failover.current, D)
        self.assertEqual(
            told,
            [
                (A, "ConnectionRefusedError", B),
                (B, "TimeoutError", C),
                (C, "DNSLookupError", D),
            ],
        )

    def test_afterAConnectionTheNextRoundStartsWithTheNextServer(self) -> None:
        network = FakeNetwork()
        failover = Failover([A, B, C], network.connectTo)
        for expected in (A, B, C, A):
            self.successResultOf(self.connect(failover))
            self.assertEqual(failover.current, expected)
        # A lost node is skipped; the one after it is tried first anyway.
        network.failures[B] = error.ConnectionRefusedError()
        self.successResultOf(self.connect(failover))
        self.assertEqual(network.tried[-2:], [B, C])

    def test_allFailing(self) -> None:
        network = FakeNetwork(
            {A: error.ConnectionRefusedError(), B: error.TimeoutError()}
        )
        failover = Failover([A, B], network.connectTo)
        failure = self.failureResultOf(self.connect(failover), NoServerReachable)
        self.assertIsInstance(failure.value, error.ConnectError)
        self.assertEqual(
            failure.value.describe(),
            "127.0.0.1:7001: connection refused (is the server running?); "
            "127.0.0.1:7002: timed out",
        )
        # The next round starts one further on.
        self.failureResultOf(self.connect(failover), NoServerReachable)
        self.assertEqual(network.tried, [A, B, B, A])

    def test_oneServerFailsAsBefore(self) -> None:
        network = FakeNetwork({A: error.ConnectionRefusedError()})
        failover = Failover([A], network.connectTo)
        self.failureResultOf(self.connect(failover), error.ConnectionRefusedError)

    def test_otherErrorsAreNotFallenThrough(self) -> None:
        network = FakeNetwork({A: OSError(2, "No such file", "ca.pem")})
        failover = Failover([A, B], network.connectTo)
        self.failureResultOf(self.connect(failover), OSError)
        self.assertEqual(network.tried, [A])
        self.assertEqual(failover.trying, A)

    def test_duplicatesOnce(self) -> None:
        self.assertEqual(Failover([A, B, A], FakeNetwork().connectTo).servers, [A, B])

    def test_shuffle(self) -> None:
        servers = [("h", port) for port in range(1, 9)]
        given = Failover(servers, FakeNetwork().connectTo)
        self.assertEqual(given.servers, servers)
        one = Failover(
            servers, FakeNetwork().connectTo, shuffle=True, rng=random.Random(4)
        )
        again = Failover(
            servers, FakeNetwork().connectTo, shuffle=True, rng=random.Random(4)
        )
        self.assertEqual(one.servers, again.servers)
        self.assertEqual(sorted(one.servers), servers)
        self.assertNotEqual(one.servers, servers)

    def test_oneLineMessage(self) -> None:
        from twisted_lab.client.cli import failureMessage

        abort = failureMessage(
            NoServerReachable(
                [
                    (A, error.ConnectionRefusedError()),
                    (("::1", 7), error.TimeoutError()),
                ]
            ),
            argparse.Namespace(host="127.0.0.1", port=7001),
        )
        assert abort is not None
        self.assertEqual(abort.code, 3)
        self.assertEqual(
            str(abort),
            "cannot connect to any server: 127.0.0.1:7001: connection refused "
            "(is the server running?); [::1]:7: timed out",
        )


# -- saved sessions of a set of servers ----------------------------------------


class ClusterKeyTests(SynchronousTestCase):
    def test_theSameSetInAnyOrder(self) -> None:
        ab, ba = Cluster.of([A, B]), Cluster.of([B, A])
        self.assertIsInstance(ab, Cluster)
        self.assertEqual(ab.key(), ba.key())
        self.assertEqual(Cluster.of([A, B, A]).key(), ab.key())
        self.assertEqual(ab.describe(), "127.0.0.1:7001, 127.0.0.1:7002")
        self.assertEqual(ba.describe(), "127.0.0.1:7002, 127.0.0.1:7001")
        self.assertNotEqual(Cluster.of([A, C]).key(), ab.key())
        self.assertNotEqual(Cluster.of([A, B, C]).key(), ab.key())

    def test_oneServerIsKeyedAsBefore(self) -> None:
        self.assertEqual(Cluster.of([A]), Endpoint.of(*A))
        self.assertEqual(Cluster.of([A, A]).key(), "tcp:127.0.0.1:7001")
        self.assertEqual(Cluster.of([("[::1]", 1)]).key(), "tcp:::1:1")

    def test_tlsAppliesToEveryMemberAndIsInTheKey(self) -> None:
        ca, other = Path(self.mktemp()), Path(self.mktemp())
        ca.write_bytes(b"one CA")
        other.write_bytes(b"another CA")
        pinned = Cluster.of([A, B], cafile=str(ca))
        self.assertTrue(all(m.tls and m.ca == pinned.ca for m in pinned.members))
        self.assertEqual(pinned.describe(), "127.0.0.1:7001, 127.0.0.1:7002 (TLS)")
        keys = {
            Cluster.of([A, B]).key(),
            Cluster.of([A, B], tls=True).key(),
            pinned.key(),
            Cluster.of([A, B], cafile=str(other)).key(),
        }
        self.assertEqual(len(keys), 4)


class ClusterStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = Path(self.mktemp()) / "netlab"
        self.store = SessionStore(self.directory)

    def test_savedOnceFoundInAnyOrder(self) -> None:
        ab = Cluster.of([A, B])
        self.store.save(Session(ab, "alice", "t"))
        found = self.store.get(Cluster.of([B, A]))
        assert found is not None
        self.assertEqual(found.token, "t")
        self.assertEqual(found.endpoint, ab, "the order of the login is kept")
        self.store.forget(Cluster.of([B, A]), "t")
        self.assertEqual(self.store.all(), [])

    def test_fileFormatBackwardAndForward(self) -> None:
        # A file written before clusters: read as it always was.
        self.directory.mkdir(parents=True)
        old: dict[str, Any] = {
            "version": 1,
            "sessions": {
                "tcp:localhost:9093": {
                    "server": {
                        "host": "localhost",
                        "port": 9093,
                        "tls": False,
                        "cafile": None,
                        "ca": "system",
                    },
                    "username": "alice",
                    "token": "old",
                    "expires_at": "2099-01-01T00:00:00Z",
                }
            },
        }
        (self.directory / "sessions.json").write_text(json.dumps(old))
        [session] = self.store.all()
        self.assertEqual(session.endpoint, Endpoint.of("localhost", 9093))
        self.assertEqual(session.token, "old")
        # A cluster saved next to it leaves it as it was; its entry has the
        # first server under "server", as an older client reads it.
        self.store.save(Session(Cluster.of([B, A]), "alice", "new"))
        data = json.loads((self.directory / "sessions.json").read_text())
        self.assertEqual(data["version"], 1)
        self.assertEqual(
            data["sessions"]["tcp:localhost:9093"],
            old["sessions"]["tcp:localhost:9093"],
        )
        entry = data["sessions"][Cluster.of([A, B]).key()]
        self.assertEqual((entry["server"]["host"], entry["server"]["port"]), B)
        self.assertEqual([(s["host"], s["port"]) for s in entry["servers"]], [B, A])
        self.assertEqual(len(self.store.all()), 2)

    def test_damagedClusterEntryIsNoSession(self) -> None:
        self.directory.mkdir(parents=True)
        (self.directory / "sessions.json").write_text(
            json.dumps(
                {
                    "version": 1,
                    "sessions": {
                        "cluster:tcp:x": {
                            "server": {"host": "a", "port": 1},
                            "servers": [{"host": "a"}, {"port": 2}],
                            "username": "alice",
                            "token": "t",
                        },
                        "junk": "not an object",
                    },
                }
            )
        )
        self.assertEqual(self.store.all(), [])


class ChooseClusterSessionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.cluster = Session(Cluster.of([A, B]), "alice", "cluster")
        self.single = Session(Endpoint.of(*B), "alice", "single")

    def choose(self, saved: list[Session], *servers: tuple[str, int]) -> Session:
        return chooseSession(saved, None, None, False, None, servers=list(servers))

    def test_foundThroughAnyMemberInAnyOrder(self) -> None:
        for servers in ([A, B], [B, A], [A], [B]):
            self.assertIs(self.choose([self.cluster], *servers), self.cluster)
        self.assertIs(
            chooseSession([self.cluster], "127.0.0.1", 7002, False, None), self.cluster
        )

    def test_neverForAServerOutsideTheSet(self) -> None:
        for servers in ([A, C], [C], [B, A, C]):
            with self.assertRaises(SessionChoiceError) as raised:
                self.choose([self.cluster], *servers)
            self.assertFalse(raised.exception.ambiguous)
        self.assertIn(
            "not logged in to 127.0.0.1:7001, 127.0.0.1:7003",
            str(
                self.assertRaises(SessionChoiceError, self.choose, [self.cluster], A, C)
            ),
        )

    def test_aSingleServerSessionIsNotACluster(self) -> None:
        # Its token was issued for B alone: never sent to A.
        with self.assertRaises(SessionChoiceError):
            self.choose([self.single], A, B)

    def test_exactSetPreferred(self) -> None:
        both = [self.cluster, self.single]
        self.assertIs(self.choose(both, B), self.single)
        self.assertIs(self.choose(both, B, A), self.cluster)
        self.assertIs(self.choose(both, A), self.cluster)

    def test_twoClustersHoldingTheServerMustBeChosenBetween(self) -> None:
        other = Session(Cluster.of([B, C]), "bob", "other")
        with self.assertRaises(SessionChoiceError) as raised:
            self.choose([self.cluster, other], B)
        self.assertTrue(raised.exception.ambiguous)
        self.assertIs(self.choose([self.cluster, other], B, C), other)

    def test_partialChoiceMatchesAMember(self) -> None:
        self.assertIs(
            chooseSession([self.cluster], None, 7002, False, None), self.cluster
        )
        self.assertIs(
            chooseSession([self.cluster], None, None, False, None), self.cluster
        )
        with self.assertRaises(SessionChoiceError):
            chooseSession([self.cluster], None, 7003, False, None)

    def test_askingForTLSNeverPicksAPlainCluster(self) -> None:
        with self.assertRaises(SessionChoiceError):
            chooseSession([self.cluster], None, None, True, None, servers=[A, B])
        secure = Session(Cluster.of([A, B], tls=True), "alice", "tls")
        chosen = self.choose([secure], B)
        self.assertTrue(chosen.endpoint.tls, "not asking adopts the session's TLS")


class SavedClusterOptionsTests(SynchronousTestCase):
    """
    L{twisted_lab.client.cli.useSavedSession} with a cluster's session: the
    servers it connects to, and the TLS settings every one of them gets.
    """

    def setUp(self) -> None:
        config = Path(self.mktemp()).absolute()
        config.mkdir(parents=True)
        os.environ["XDG_CONFIG_HOME"] = str(config)
        self.addCleanup(os.environ.pop, "XDG_CONFIG_HOME")
        self.ca = config / "ca.pem"
        self.ca.write_bytes(b"CA")
        SessionStore().save(
            Session(Cluster.of([B, A], cafile=str(self.ca)), "alice", "t")
        )

    def options(self, **given: object) -> argparse.Namespace:
        values: dict[str, object] = {
            "host": None,
            "port": None,
            "servers": None,
            "tls": False,
            "cafile": None,
            "command": "auth",
            "interactive": False,
        }
        values.update(given)
        return argparse.Namespace(**values)

    def test_whoamiTakesEveryServerOfTheSession(self) -> None:
        from twisted_lab.client.cli import useSavedSession

        options = self.options()
        useSavedSession(options, takeServer=True)
        self.assertEqual(options.targets, [B, A], "in the order of the login")
        self.assertEqual((options.tls, options.cafile), (True, str(self.ca)))
        self.assertEqual(options.session.token, "t")

    def test_oneMemberNamed(self) -> None:
        from twisted_lab.client.cli import useSavedSession

        options = self.options(host="127.0.0.1", port=7001)
        useSavedSession(options, takeServer=True)
        self.assertEqual(options.targets, [A])
        self.assertTrue(options.tls)

    def test_serversInAnotherOrder(self) -> None:
        from twisted_lab.client.cli import useSavedSession

        options = self.options(command="chat", servers=[A, B])
        self.assertIsNotNone(useSavedSession(options, takeServer=False))
        self.assertEqual(options.targets, [A, B], "in the order given now")

    def test_aServerOutsideTheSetHasNoSession(self) -> None:
        from twisted_lab.client.cli import Abort, useSavedSession

        options = self.options(command="chat", servers=[A, C])
        self.assertIsNone(useSavedSession(options, takeServer=False))
        self.assertFalse(options.tls)
        with self.assertRaises(Abort) as raised:
            useSavedSession(self.options(servers=[A, C]), takeServer=True)
        self.assertEqual(raised.exception.code, 5)

    def test_aChangedCAFileIsRefused(self) -> None:
        from twisted_lab.client.cli import Abort, useSavedSession

        self.ca.write_bytes(b"a different CA")
        with self.assertRaises(Abort) as raised:
            useSavedSession(self.options(), takeServer=True)
        self.assertEqual(raised.exception.code, 5)


# -- a chat session moving to another node ---------------------------------------


class ClusterHarness:
    """
    A chat session with two servers, A and B, reached through a real
    L{Failover}; each connection is a L{StringTransport} and the test plays
    the server at the other end.
    """

    def __init__(self, maxAttempts: int | None = None) -> None:
        self.clock = MemoryReactorClock()
        self.out, self.asides = io.StringIO(), io.StringIO()
        self.view = View(stream=self.out, asides=self.asides)
        self.down: set[Any] = set()
        self.connections: list[tuple[Any, MessageClient, StringTransport]] = []

        async def connectTo(address: Any, client: MessageClient) -> MessageClient:
            if address in self.down:
                raise error.ConnectionRefusedError()
            transport = StringTransport()
            client.label = f"{address[0]}:{address[1]}"
            client.makeConnection(transport)
            self.connections.append((address, client, transport))
            return client

        self.failover = Failover(
            [A, B],
            connectTo,
            onFailure=lambda a, e, n: self.view.info(f"cannot connect to {a}"),
        )

        async def connector(client: MessageClient) -> Any:
            return await self.failover.connect(client)

        self.session = ChatSession(
            self.clock,
            self.view,
            connector,
            token="tok",
            room="dev",
            maxAttempts=maxAttempts,
        )

    @property
    def address(self) -> Any:
        return self.connections[-1][0]

    @property
    def client(self) -> MessageClient:
        return self.connections[-1][1]

    def sent(self) -> list[dict[str, Any]]:
        transport = self.connections[-1][2]
        messages = decodeFrames(transport.value())
        transport.clear()
        return messages

    def send(self, message: dict[str, Any]) -> None:
        self.client.dataReceived(frame(message))

    def reply(self, request: dict[str, Any], **fields: Any) -> None:
        self.send({**fields, "id": request["id"]})

    def handshake(self, lastSeq: int, history: list[dict[str, Any]] = ()) -> None:  # type: ignore[assignment]
        [resume] = self.sent()
        assert resume == {"type": "resume", "token": "tok", "id": resume["id"]}, resume
        self.reply(resume, type="session", username="alice", token="tok")
        [join] = self.sent()
        assert join["type"] == "join" and join["room"] == "dev", join
        self.reply(
            join,
            type="joined",
            room="dev",
            members=["alice", "bob"],
            history=list(history),
            last_seq=lastSeq,
        )

    def drop(self) -> None:
        self.client.connectionLost(Failure(error.ConnectionLost("node killed")))

    def shown(self) -> list[str]:
        return [line.split("> ", 1)[1] for line in self.out.getvalue().splitlines()]


def message(seq: int, text: str | None = None, sender: str = "bob") -> dict[str, Any]:
    return {
        "type": "message",
        "room": "dev",
        "from": sender,
        "text": text if text is not None else f"m{seq}",
        "ts": "2026-01-02T03:04:05Z",
        "seq": seq,
    }


class NodeSwitchTests(SynchronousTestCase):
    def started(self, **kwargs: Any) -> ClusterHarness:
        h = ClusterHarness(**kwargs)
        defer.ensureDeferred(h.session.start())
        h.handshake(lastSeq=0)
        for seq in (1, 2):
            h.send(message(seq))
        self.assertEqual(h.address, A)
        return h

    def test_resumedOnTheNextNodeAndCaughtUpWithoutGapOrDuplicate(self) -> None:
        h = self.started()
        h.down.add(A)  # SIGKILLed: it refuses connections from now on
        h.drop()
        h.session.typed("while away")
        self.assertIn("!!! connection lost (", h.asides.getvalue())
        h.clock.advance(1)  # the first back-off: straight to B
        self.assertEqual(h.address, B)
        self.assertEqual(len(h.connections), 2, "A was not tried first")
        h.handshake(lastSeq=4, history=[message(3), message(4)])
        [history] = h.sent()
        self.assertEqual(
            {k: history[k] for k in ("type", "room", "after")},
            {"type": "history", "room": "dev", "after": 2},
        )
        # Live on B while the catch-up is on its way: held, not shown yet.
        h.send(message(5))
        h.send(message(4))
        self.assertEqual(h.shown(), ["m1", "m2"])
        self.assertFalse(h.session.isLive)
        h.reply(history, type="history", room="dev", messages=[message(3), message(4)])
        self.assertEqual(h.shown(), ["m1", "m2", "m3", "m4", "m5"])
        self.assertTrue(h.session.isLive)
        self.assertIn("reconnected to 127.0.0.1:7002", h.asides.getvalue())
        # The line typed meanwhile is said on B, after the catch-up.
        [say] = h.sent()
        self.assertEqual((say["type"], say["text"]), ("say", "while away"))
        h.send(message(6, "while away", sender="alice"))
        h.send(message(6, "while away", sender="alice"))
        self.assertEqual(h.shown(), ["m1", "m2", "m3", "m4", "m5", "while away"])

    def test_aLongCatchUpAcrossTheSwitchIsPaged(self) -> None:
        h = self.started()
        h.session.historyPage = 3
        h.down.add(A)
        h.drop()
        h.clock.advance(1)
        h.handshake(lastSeq=9)
        afters = []
        pages = {2: [3, 4, 5], 5: [6, 7], 7: [8, 9], 9: []}
        while True:
            [history] = h.sent()
            afters.append(history["after"])
            seqs = pages[history["after"]]
            # 6, 7 is a short page that says "more" (a reply that filled a
            # frame): the client asks again.
            h.reply(
                history,
                type="history",
                room="dev",
                messages=[message(s) for s in seqs],
                **({"more": True} if seqs == [6, 7] else {}),
            )
            if h.session.isLive:
                break
        self.assertEqual(afters, [2, 5, 7])
        self.assertEqual(h.shown(), [f"m{n}" for n in range(1, 10)])

    def test_rateLimitedCatchUpWaitsInsteadOfReconnecting(self) -> None:
        h = self.started()
        h.down.add(A)
        h.drop()
        h.clock.advance(1)
        h.handshake(lastSeq=3)
        [history] = h.sent()
        h.reply(
            history, type="error", code="rate_limited", message="wait", retry_after=2
        )
        h.clock.advance(2)
        [again] = h.sent()
        self.assertEqual((again["type"], again["after"]), ("history", 2))
        h.reply(again, type="history", room="dev", messages=[message(3)])
        self.assertTrue(h.session.isLive)
        self.assertEqual(len(h.connections), 2)
        self.assertEqual(h.shown(), ["m1", "m2", "m3"])

    def test_backAndForth(self) -> None:
        h = self.started()
        h.drop()  # A is still up, but the next node is tried first
        h.clock.advance(1)
        self.assertEqual(h.address, B)
        h.handshake(lastSeq=2)
        [history] = h.sent()
        h.reply(history, type="history", room="dev", messages=[])
        h.send(message(3))
        h.down.add(B)
        h.drop()
        h.clock.advance(1)
        self.assertEqual(h.address, A)
        h.handshake(lastSeq=3)
        [history] = h.sent()
        self.assertEqual(history["after"], 3)

    def test_bothDownBackOffThenGiveUp(self) -> None:
        h = self.started(maxAttempts=3)
        h.down.update({A, B})
        h.drop()
        for delay in (1, 2, 4):
            self.assertNoResult(h.session.done)
            h.clock.advance(delay)
        failure = self.failureResultOf(h.session.done)
        self.assertEqual(failure.value.code, 4)
        self.assertEqual(len(h.connections), 1, "no connection after A's")
        self.assertEqual(h.asides.getvalue().count("cannot connect to"), 3)

    def test_aNodeComingBackIsUsed(self) -> None:
        h = self.started()
        h.down.update({A, B})
        h.drop()
        h.clock.advance(1)  # round 1: B, A refused
        h.down.discard(A)
        h.clock.advance(2)  # round 2 starts one further on: A, which is back
        self.assertEqual(h.address, A)
        self.assertEqual(len(h.connections), 2)


class GapTests(SynchronousTestCase):
    """
    A room's messages are shown in seq order without a hole, whatever the
    node delivers live (a node without a bus does not deliver what was said
    on another node).
    """

    def ready(self) -> ClusterHarness:
        h = ClusterHarness()
        defer.ensureDeferred(h.session.start())
        h.handshake(lastSeq=2, history=[message(1), message(2)])
        self.assertEqual(h.shown(), ["m1", "m2"])
        return h

    def test_aSkippedSeqIsFetched(self) -> None:
        h = self.ready()
        h.send(message(5))
        [history] = h.sent()
        self.assertEqual((history["type"], history["after"]), ("history", 2))
        h.send(message(6))  # meanwhile: held too, no second request
        self.assertEqual(h.sent(), [])
        self.assertEqual(h.shown(), ["m1", "m2"])
        h.reply(
            history,
            type="history",
            room="dev",
            messages=[message(3), message(4), message(5)],
        )
        self.assertEqual(h.shown(), [f"m{n}" for n in range(1, 7)])
        h.send(message(7))
        self.assertEqual(h.sent(), [])
        self.assertEqual(h.shown()[-1], "m7")

    def test_ownLineConfirmedAfterTheGapIsFilled(self) -> None:
        h = self.ready()
        h.session.typed("mine")
        h.session.inputEnded()
        [say] = h.sent()
        h.send(message(4, "mine", sender="alice"))
        [history] = h.sent()
        self.assertNoResult(h.session.done)
        h.reply(history, type="history", room="dev", messages=[message(3)])
        self.assertEqual(h.shown(), ["m1", "m2", "m3", "mine"])
        self.assertEqual(self.successResultOf(h.session.done), 0)

    def test_connectionLostWhileFillingKeepsTheOrder(self) -> None:
        h = self.ready()
        h.send(message(5))
        h.sent()
        h.drop()  # the fill's request fails; m5 stays held
        self.assertEqual(h.shown(), ["m1", "m2"])
        h.clock.advance(1)
        h.handshake(lastSeq=5)
        [history] = h.sent()
        self.assertEqual(history["after"], 2)
        h.reply(
            history,
            type="history",
            room="dev",
            messages=[message(3), message(4), message(5)],
        )
        self.assertEqual(h.shown(), [f"m{n}" for n in range(1, 6)])

    def test_historyRefusedShowsWhatIsHeld(self) -> None:
        h = self.ready()
        h.send(message(5))
        [history] = h.sent()
        h.reply(history, type="error", code="internal_error", message="db down")
        self.assertEqual(h.shown(), ["m1", "m2", "m5"])
        self.assertIn("cannot fetch the missing messages of #dev", h.asides.getvalue())

    def test_partForgetsWhatIsHeld(self) -> None:
        h = self.ready()
        h.send(message(5))
        [history] = h.sent()
        h.session.typed("/part")
        [leave] = h.sent()
        h.reply(leave, type="left", room="dev")
        h.reply(history, type="history", room="dev", messages=[message(3)])
        self.assertEqual(h.shown(), ["m1", "m2"])
