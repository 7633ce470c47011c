"""
Servers of the JSON services (identity, auth, chat) under test, driven
through the real Int32 adapter (L{MessageProtocol} on L{StringTransport}s,
built by the factories of L{twisted_lab.taps}).

L{ServerHarness} is what the service tests use: the service on a
L{MemoryStore}, a L{Clock} and an L{InlineHasher}.  No real reactor, no
thread, no polling: every reply is there when the call that sends the
request returns, or once the clock is advanced (L{ServerHarness.flush}
runs the chat group commit, which is scheduled for the next turn;
C{SessionWatch} polls every C{POLL_SECONDS} of the clock).  Where a test is
about something happening while a store call or a hash is in flight, it
holds that call with L{Held} and chooses when it ends.

L{SQLiteHarness} is for the few tests whose point is SQLite itself (a
restart on the same database file, what the file holds): the same servers
over a real SQLite file with the real threaded hasher, on the real
reactor, waiting for replies with L{waitFor}.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from tests.helpers import EventRecorder, closeIfOpen, frames, openConnection, waitFor
from tests.test_messages import replies
from twisted_lab.codecs.message import Outgoing
from twisted_lab.dispatch import RequestDispatcher
from twisted_lab.ports import IRequestChannel
from twisted_lab.services.accounts import PasswordHasher
from twisted_lab.storage.memory import MemoryStore
from twisted_lab.storage.sqlite import Store
from twisted_lab.taps.auth import AuthFactory
from twisted_lab.taps.chat import ChatFactory
from twisted_lab.taps.identity import IdentityFactory

#: The password of the users the harnesses make.
PASSWORD = "password1"
#: Where the harness clocks start (an ordinary date, not the epoch).
START = 1_800_000_000

Connection = tuple[Any, StringTransport]


class InlineHasher(PasswordHasher):
    """
    The real argon2id hasher, with test-sized costs, hashing on the calling
    thread: a hash has finished when C{hash} or C{verify} returns.  It
    still goes through the hasher's semaphore and reports each hash to
    C{onHashed}, so the hashing metrics count as in a server.
    """

    def __init__(self, timeCost: int = 1) -> None:
        super().__init__(memoryKiB=8, timeCost=timeCost, parallelism=1, reactor=None)
        # The calling thread is the test runner's: leave its priority alone
        # (the real hasher lowers the priority of its own threads).
        self._niced.done = True

    def _inThread(self, function: Any, *args: Any) -> defer.Deferred[Any]:
        return self.semaphore.run(defer.maybeDeferred, self._run, function, *args)


_serials = itertools.count(1)


@implementer(IRequestChannel)
class RecordingChannel:
    """
    A connection as the dispatcher and the services see it, with no
    transport: it keeps every L{Outgoing} it is sent, as given (so a test
    can check that a broadcast is one object for all its members).
    """

    peer = "test"
    outputCongested = False

    def __init__(self, address: str = "127.0.0.9") -> None:
        self.address = self.group = address
        self.serial = next(_serials)
        self.lost = False
        self.closing = False
        self.outgoing: list[Outgoing] = []
        self.paused: set[str] = set()

    @property
    def messages(self) -> list[dict[str, Any]]:
        return [json.loads(m) for o in self.outgoing for m in o.json()]

    def send(self, outgoing: Outgoing) -> None:
        assert not self.closing, "a message sent to a closed channel"
        self.outgoing.append(outgoing)

    def pauseReading(self, reason: str) -> None:
        self.paused.add(reason)

    def resumeReading(self, reason: str) -> None:
        self.paused.discard(reason)

    def closeAfterFlush(self) -> None:
        self.closing = True


class ChannelClient:
    """
    One connection to a service (any object with C{handlerFor} and
    C{context}) through the real request dispatcher, on a
    L{RecordingChannel}.
    """

    def __init__(self, service: Any, address: str = "127.0.0.9") -> None:
        self.channel = RecordingChannel(address)
        self.handler = service.handlerFor(self.channel)
        self.dispatcher = RequestDispatcher(self.channel, self.handler, service.context)

    def send(self, **request: Any) -> None:
        self.dispatcher.requestReceived(json.dumps(request).encode())

    def ask(self, **request: Any) -> dict[str, Any]:
        """
        Send one request; its reply (the last message sent back).
        """
        before = len(self.channel.messages)
        self.send(**request)
        got = self.channel.messages[before:]
        assert got, f"no reply (yet) to {request}"
        return got[-1]

    def received(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.channel.messages if m["type"] == kind]

    @property
    def last(self) -> dict[str, Any] | None:
        messages = self.channel.messages
        return messages[-1] if messages else None

    def close(self) -> None:
        self.channel.lost = self.channel.closing = True
        self.dispatcher.connectionLost()


def cheapHasher(timeCost: int = 1) -> PasswordHasher:
    """
    The real threaded argon2id hasher on the real reactor, with test-sized
    costs (the defaults take ~30 ms a hash); C{stop} it when done.
    """
    from twisted.internet import reactor

    return PasswordHasher(
        memoryKiB=1024, timeCost=timeCost, parallelism=1, reactor=reactor
    )


class Held:
    """
    C{owner.name} (a method returning a Deferred) replaced by one whose
    calls wait: each is kept, unanswered, until L{release} makes it with
    the real method.  For what must happen while a store call or a hash is
    in flight, which an in-memory store and an inline hasher otherwise
    finish at once.
    """

    def __init__(self, owner: Any, name: str) -> None:
        self.owner = owner
        self.name = name
        self.real: Callable[..., Any] = getattr(owner, name)
        self._shadowed = name in vars(owner)
        self._previous = vars(owner).get(name)
        self.calls: list[tuple[defer.Deferred[Any], tuple[Any, ...], dict]] = []
        setattr(owner, name, self._call)

    def _call(self, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.calls.append((d, args, kwargs))
        return d

    def release(self) -> None:
        """
        Stop holding calls, then make every held one, in the order made.
        """
        if self._shadowed:
            setattr(self.owner, self.name, self._previous)
        else:
            delattr(self.owner, self.name)
        calls, self.calls = self.calls, []
        for d, args, kwargs in calls:
            defer.maybeDeferred(self.real, *args, **kwargs).chainDeferred(d)


def run(test: Callable[..., Any]) -> Callable[..., Any]:
    """
    Run an async test method as a Deferred (trial and pytest both wait).
    """

    def wrapper(self: Any) -> defer.Deferred[Any]:
        return defer.ensureDeferred(test(self))

    wrapper.__name__ = test.__name__
    wrapper.__doc__ = test.__doc__
    return wrapper


class Connections:
    """
    Client connections to a server's factory, on L{StringTransport}s.
    """

    def connect(self, factory: Any, host: str = "127.0.0.2") -> Connection:
        return openConnection(self, factory, IPv4Address("TCP", host, 40000))

    def disconnect(self, factory: Any, protocol: Any) -> None:
        closeIfOpen(factory, protocol)

    @staticmethod
    def send(connection: Connection, *requests: dict[str, Any]) -> None:
        """
        C{requests} as Int32 frames, in one read.
        """
        connection[0].dataReceived(frames(*[json.dumps(r).encode() for r in requests]))

    @staticmethod
    def received(connection: Connection, kind: str | None = None) -> list[dict]:
        """
        Everything the connection was sent (only messages of type C{kind}).
        """
        got = replies(connection[1])
        return got if kind is None else [m for m in got if m["type"] == kind]


class ServerHarness(Connections, SynchronousTestCase):
    """
    Servers on a L{MemoryStore}, a L{Clock} (C{self.clock}) and an
    L{InlineHasher}: nothing to wait for.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        #: The session token of each user made by L{user}.
        self.tokens: dict[str, str] = {}

    def openStore(self) -> MemoryStore:
        store = MemoryStore()
        self.successResultOf(defer.ensureDeferred(store.open()))
        return store

    def _record(self, factory: Any) -> Any:
        self.recorder = EventRecorder()
        factory.log = self.recorder.logger
        return factory

    def makeAuth(
        self,
        store: Any = None,
        hasher: Any = None,
        factoryClass: type[AuthFactory] = AuthFactory,
        **settings: Any,
    ) -> Any:
        """
        An auth server (C{factoryClass}: a chat one) on C{store} (a new
        L{MemoryStore}) with C{hasher} (a new L{InlineHasher}).
        """
        settings.setdefault("idleTimeout", None)  # tests move the clock by hours
        factory = factoryClass(
            store if store is not None else self.openStore(),
            hasher if hasher is not None else InlineHasher(),
            clock=self.clock,
            **settings,
        )
        return self._record(factory)

    def makeChat(self, store: Any = None, **settings: Any) -> Any:
        return self.makeAuth(store, factoryClass=ChatFactory, **settings)

    def makeIdentity(self, store: Any = None) -> IdentityFactory:
        factory = IdentityFactory(
            store if store is not None else self.openStore(), clock=self.clock
        )
        return self._record(factory)

    def flush(self) -> None:
        """
        End the current turn: run what was scheduled for it (the chat
        group commit, and the commits of says that waited for it).
        """
        self.clock.advance(0)

    def ask(self, connection: Connection, *requests: dict[str, Any]) -> list[dict]:
        """
        Send C{requests} and end the turn; what the connection was sent
        meanwhile, which must hold at least one reply to each.
        """
        before = len(self.received(connection))
        self.send(connection, *requests)
        self.flush()
        got = self.received(connection)[before:]
        if len(got) < len(requests):
            self.fail(
                f"{len(got)} replies to {[r['type'] for r in requests]} "
                f"with nothing left to wait for: {got}"
            )
        return got

    def one(self, connection: Connection, request: dict[str, Any]) -> dict:
        [reply] = self.ask(connection, request)
        return reply

    def expect(
        self, connection: Connection, predicate: Callable[[dict], Any], what: str
    ) -> None:
        """
        The connection has been sent a message for which C{predicate} holds.
        """
        if not any(predicate(m) for m in self.received(connection)):
            self.fail(f"not sent {what}: {self.received(connection)}")

    def registerAndLogin(
        self,
        factory: Any,
        username: str = "alice",
        password: str = PASSWORD,
        host: str = "127.0.0.2",
    ) -> tuple[Connection, dict]:
        """
        A new connection that registered C{username} and logged in; the
        C{session} reply.
        """
        connection = self.connect(factory, host)
        registered = self.one(
            connection, {"type": "register", "username": username, "password": password}
        )
        self.assertEqual(registered["type"], "registered", registered)
        session = self.one(
            connection, {"type": "login", "username": username, "password": password}
        )
        self.assertEqual(session["type"], "session", session)
        return connection, session

    def user(self, factory: Any, name: str, host: str = "127.0.0.2") -> Connection:
        """
        A new connection that registered C{name} and logged in, both
        requests in one read; its token is kept in C{self.tokens}.
        """
        connection = self.connect(factory, host)
        got = self.ask(
            connection,
            {"type": "register", "username": name, "password": PASSWORD},
            {"type": "login", "username": name, "password": PASSWORD},
        )
        self.assertEqual([m["type"] for m in got], ["registered", "session"], got)
        self.tokens[name] = got[1]["token"]
        return connection

    def login(self, factory: Any, name: str, host: str = "127.0.0.3") -> Connection:
        """
        A new connection that resumed the session of L{user} C{name}.
        """
        connection = self.connect(factory, host)
        reply = self.one(connection, {"type": "resume", "token": self.tokens[name]})
        self.assertEqual(reply["type"], "session", reply)
        return connection


class SQLiteHarness(Connections, TestCase):
    """
    Servers over a real SQLite file (C{self.dbPath}; each L{makeAuth} or
    L{makeChat} opens it again, as a restarted server does) with the real
    threaded hasher, on the real reactor: replies come in later turns and
    are waited for.  Only for tests whose point is the database itself.
    """

    def setUp(self) -> None:
        self.dbPath = str(Path(self.mktemp()).absolute())

    async def _make(self, factoryClass: type[AuthFactory], clock: Any) -> Any:
        store = Store(self.dbPath)
        self.addCleanup(store.close)
        await store.open()
        hasher = cheapHasher()
        self.addCleanup(hasher.stop)
        self.clock = clock
        factory = factoryClass(store, hasher, clock=clock, idleTimeout=None)
        self.recorder = EventRecorder()
        factory.log = self.recorder.logger
        return factory

    async def makeAuth(self) -> AuthFactory:
        """
        An auth server on a L{Clock} (the store and hasher on the reactor).
        """
        clock = Clock()
        clock.advance(START)
        return await self._make(AuthFactory, clock)

    async def makeChat(self) -> ChatFactory:
        """
        A chat server whose clock is the reactor, which runs its commits.
        """
        from twisted.internet import reactor

        return await self._make(ChatFactory, reactor)

    async def ask(self, connection: Connection, *requests: dict[str, Any]) -> list:
        """
        Send requests; wait for as many replies; return the new ones.
        """
        before = len(self.received(connection))
        self.send(connection, *requests)
        await waitFor(
            lambda: len(self.received(connection)) >= before + len(requests),
            what=f"replies to {[r['type'] for r in requests]}",
        )
        return self.received(connection)[before:]

    async def one(self, connection: Connection, request: dict[str, Any]) -> dict:
        [reply] = await self.ask(connection, request)
        return reply

    async def registerAndLogin(
        self, factory: Any, username: str = "alice", password: str = PASSWORD
    ) -> tuple[Connection, dict]:
        connection = self.connect(factory)
        registered = await self.one(
            connection, {"type": "register", "username": username, "password": password}
        )
        self.assertEqual(registered["type"], "registered", registered)
        session = await self.one(
            connection, {"type": "login", "username": username, "password": password}
        )
        self.assertEqual(session["type"], "session", session)
        return connection, session
