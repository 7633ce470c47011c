"""
The bus without a server: L{LocalBus} on a L{Clock}; the RESP2 codec; and
L{RedisBus}'s connection handling on L{StringTransport}s, playing the
server by hand (resubscription before C{onReconnect}, publications failing
while disconnected, the keep-alive dropping a silent connection).
"""

from __future__ import annotations

import hashlib
from typing import Any, cast

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import ILogObserver, Logger
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from twisted_lab.bus import (
    BusOverloaded,
    BusUnavailable,
    LocalBus,
    RedisBus,
    busFromURL,
    parseRedisURL,
)
from twisted_lab.bus.redis import RespClientProtocol, SubscriberProtocol
from twisted_lab.bus.resp import (
    RedisError,
    Reply,
    RespParser,
    RespProtocolError,
    encodeCommand,
)
from twisted_lab.ports import IBus


def capturedLog(owner: Any, attribute: str = "log") -> list[dict[str, Any]]:
    """
    Send what C{owner.log} logs to a list instead of the global log.
    """
    events: list[dict[str, Any]] = []
    observer = cast(ILogObserver, events.append)
    setattr(owner, attribute, Logger(observer=observer))
    return events


class LocalBusTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.bus = LocalBus(self.clock)

    def test_providesIBus(self) -> None:
        self.assertTrue(verifyObject(IBus, self.bus))

    def test_deliveredOnALaterTurn(self) -> None:
        got: list[bytes] = []
        subscribed = self.bus.subscribe("room", got.append)
        self.assertIsNone(self.successResultOf(subscribed), "in effect at once")
        published = self.bus.publish("room", b"hello")
        self.assertIsNone(self.successResultOf(published))
        self.assertEqual(got, [])
        self.clock.advance(0)
        self.assertEqual(got, [b"hello"])

    def test_publicationOrderPerChannel(self) -> None:
        got: list[tuple[str, bytes]] = []
        for channel in ("a", "b"):
            self.bus.subscribe(channel, lambda p, c=channel: got.append((c, p)))
        for i in range(50):
            self.bus.publish("a" if i % 3 else "b", b"%d" % i)
        self.clock.advance(0)
        for channel in ("a", "b"):
            numbers = [int(p) for c, p in got if c == channel]
            self.assertEqual(numbers, sorted(numbers))
        self.assertEqual(len(got), 50)

    def test_everySubscriberOfTheChannel(self) -> None:
        first: list[bytes] = []
        second: list[bytes] = []
        other: list[bytes] = []
        self.bus.subscribe("room", first.append)
        self.bus.subscribe("room", second.append)
        self.bus.subscribe("elsewhere", other.append)
        self.bus.publish("room", b"x")
        self.clock.advance(0)
        self.assertEqual((first, second, other), ([b"x"], [b"x"], []))

    def test_subscribingTwiceDeliversOnce(self) -> None:
        got: list[bytes] = []
        self.bus.subscribe("room", got.append)
        self.bus.subscribe("room", got.append)
        self.bus.publish("room", b"x")
        self.clock.advance(0)
        self.assertEqual(got, [b"x"])

    def test_aFailingSubscriberDoesNotStopTheOthers(self) -> None:
        events = capturedLog(self.bus._receivers)
        got: list[bytes] = []

        def broken(payload: bytes) -> None:
            raise ZeroDivisionError("boom")

        self.bus.subscribe("room", broken)
        self.bus.subscribe("room", got.append)
        self.bus.publish("room", b"1")
        self.bus.publish("room", b"2")
        self.clock.advance(0)
        self.assertEqual(got, [b"1", b"2"])
        self.assertEqual([e["event"] for e in events], ["bus_subscriber_failed"] * 2)
        self.assertEqual(events[0]["channel"], "room")
        self.assertIsInstance(events[0]["log_failure"].value, ZeroDivisionError)

    def test_publishingFromASubscriberNeverReenters(self) -> None:
        calls: list[str] = []

        def first(payload: bytes) -> None:
            calls.append(f"start {payload.decode()}")
            if payload == b"1":
                self.bus.publish("room", b"2")
            calls.append(f"end {payload.decode()}")

        self.bus.subscribe("room", first)
        self.bus.publish("room", b"1")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(0)
        # (A Clock runs the calls that fall due while it advances; a
        # reactor runs the second one on its next turn.)
        self.assertEqual(calls, ["start 1", "end 1", "start 2", "end 2"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_unsubscribedGetsNothingMore(self) -> None:
        got: list[bytes] = []
        self.bus.subscribe("room", got.append)
        self.bus.publish("room", b"queued")
        self.bus.unsubscribe("room", got.append)
        self.clock.advance(0)
        self.bus.publish("room", b"later")
        self.clock.advance(0)
        self.assertEqual(got, [])
        self.bus.unsubscribe("room", got.append)  # harmless twice

    def test_subscribedAfterThePublicationGetsNothing(self) -> None:
        got: list[bytes] = []
        self.bus.publish("room", b"before")
        self.bus.subscribe("room", got.append)
        self.clock.advance(0)
        self.assertEqual(got, [])

    def test_boundedQueue(self) -> None:
        bus = LocalBus(self.clock, maxQueued=2)
        got: list[bytes] = []
        bus.subscribe("room", got.append)
        bus.publish("room", b"1")
        bus.publish("room", b"2")
        self.failureResultOf(bus.publish("room", b"3"), BusOverloaded)
        self.clock.advance(0)
        self.assertEqual(got, [b"1", b"2"])
        self.successResultOf(bus.publish("room", b"4"))

    def test_stopDropsWhatIsQueued(self) -> None:
        got: list[bytes] = []
        self.bus.startService()
        self.bus.subscribe("room", got.append)
        self.bus.publish("room", b"x")
        self.bus.stopService()
        self.clock.advance(0)
        self.assertEqual((got, self.clock.getDelayedCalls()), ([], []))

    def test_payloadIsBytes(self) -> None:
        self.assertRaises(TypeError, self.bus.publish, "room", "text")

    def test_receiverIsCallable(self) -> None:
        self.assertRaises(TypeError, self.bus.subscribe, "room", "nope")
        self.assertRaises(TypeError, self.bus.onReconnect, None)

    def test_busFromURL(self) -> None:
        self.assertIsInstance(busFromURL(None, self.clock), LocalBus)
        self.assertIsInstance(busFromURL("", self.clock), LocalBus)
        reactor = MemoryReactorClock()
        redis = busFromURL("redis://localhost:6380/2", reactor)
        self.assertIsInstance(redis, RedisBus)
        self.assertEqual(reactor.tcpClients, [])  # nothing before startService
        self.assertRaises(ValueError, busFromURL, "amqp://x", reactor)


def encodeReply(reply: Reply) -> bytes:
    """
    What a server would send for C{reply} (the parser's inverse).
    """
    if reply is None:
        return b"$-1\r\n"
    if isinstance(reply, RedisError):
        return b"-" + reply.message.encode() + b"\r\n"
    if isinstance(reply, bool):
        raise TypeError(reply)
    if isinstance(reply, int):
        return b":%d\r\n" % (reply,)
    if isinstance(reply, str):
        return b"+" + reply.encode() + b"\r\n"
    if isinstance(reply, bytes):
        return b"$%d\r\n%s\r\n" % (len(reply), reply)
    return b"*%d\r\n" % (len(reply),) + b"".join(encodeReply(r) for r in reply)


simpleText = st.text(
    st.characters(codec="utf-8", exclude_characters="\r\n"),
    max_size=20,
)
replies = st.recursive(
    st.none()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.binary(max_size=40)
    | simpleText,
    lambda children: st.lists(children, max_size=5),
    max_leaves=20,
)


class RespTests(SynchronousTestCase):
    def test_encodeCommand(self) -> None:
        self.assertEqual(
            encodeCommand(b"SET", "clé", 12, 1.5),
            b"*4\r\n$3\r\nSET\r\n$4\r\ncl\xc3\xa9\r\n$2\r\n12\r\n$3\r\n1.5\r\n",
        )
        self.assertEqual(encodeCommand(b"X", b""), b"*2\r\n$1\r\nX\r\n$0\r\n\r\n")
        self.assertRaises(TypeError, encodeCommand, b"SET", True)
        self.assertRaises(TypeError, encodeCommand, b"SET", None)
        self.assertRaises(ValueError, encodeCommand)

    def test_everyKind(self) -> None:
        parser = RespParser()
        got = parser.feed(
            b"+OK\r\n-ERR unknown command 'X'\r\n:-42\r\n$5\r\nhe\r\no\r\n"
            b"$-1\r\n*-1\r\n*0\r\n*2\r\n*1\r\n:1\r\n$0\r\n\r\n"
        )
        self.assertEqual(got[0], "OK")
        self.assertIsInstance(got[1], RedisError)
        self.assertEqual(
            (got[1].kind, got[1].message),  # type: ignore[union-attr]
            ("ERR", "ERR unknown command 'X'"),
        )
        self.assertEqual(got[2:], [-42, b"he\r\no", None, None, [], [[1], b""]])
        self.assertEqual(parser.buffered, 0)

    def test_oneByteAtATime(self) -> None:
        parser = RespParser()
        data = b"*3\r\n$7\r\nmessage\r\n$4\r\nroom\r\n$3\r\nhi!\r\n:7\r\n"
        got: list[Reply] = []
        for i in range(len(data)):
            got += parser.feed(data[i : i + 1])
        self.assertEqual(got, [[b"message", b"room", b"hi!"], 7])

    @given(st.lists(replies, max_size=5), st.data())
    def test_anySplitParsesTheSame(self, sent: list[Reply], data: Any) -> None:
        encoded = b"".join(encodeReply(r) for r in sent)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(encoded)), max_size=6)))
        parser = RespParser()
        got: list[Reply] = []
        start = 0
        for cut in [*cuts, len(encoded)]:
            got += parser.feed(encoded[start:cut])
            start = cut
        self.assertEqual(got, sent)
        self.assertEqual(parser.buffered, 0)

    def test_limits(self) -> None:
        cases = [
            (RespParser(maxBulk=4), b"$5\r\n"),
            (RespParser(maxLine=8), b"+" + b"x" * 20),
            (RespParser(maxLine=8), b"+" + b"x" * 20 + b"\r\n"),
            (RespParser(maxElements=2), b"*3\r\n"),
            (RespParser(maxDepth=2), b"*1\r\n*1\r\n*1\r\n"),
            (RespParser(maxReply=20), b"*5\r\n$4\r\nabcd\r\n$4\r\nabcd\r\n"),
            (RespParser(maxReply=20), b"$10\r\n" + b"x" * 17),
        ]
        for parser, data in cases:
            self.assertRaises(RespProtocolError, parser.feed, data)

    def test_notResp(self) -> None:
        for data in (
            b"?what\r\n",
            b":12a\r\n",
            b": 12\r\n",
            b"$-2\r\n",
            b"*-5\r\n",
            b"$2\r\nabcd\r\n",
            b"$x\r\n",
        ):
            self.assertRaises(RespProtocolError, RespParser().feed, data)

    def test_replyBytesCountPerReply(self) -> None:
        parser = RespParser(maxReply=20)
        for _ in range(10):
            self.assertEqual(parser.feed(b"$10\r\n0123456789\r\n"), [b"0123456789"])


class Transport(StringTransport):
    """
    A L{StringTransport} that remembers an abort (apart from a close).
    """

    aborted = False

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


def aborted(protocol: RespClientProtocol) -> bool:
    transport = protocol.transport
    assert isinstance(transport, Transport)
    return transport.aborted


def closing(protocol: RespClientProtocol) -> bool:
    transport = protocol.transport
    assert isinstance(transport, Transport)
    return bool(transport.disconnecting)


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """
    A client endpoint whose connection attempts the test completes (on a
    L{StringTransport}) or fails by hand.
    """

    def __init__(self) -> None:
        self.attempts: list[tuple[Any, defer.Deferred[Any]]] = []

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        attempt: defer.Deferred[Any] = defer.Deferred()
        self.attempts.append((factory, attempt))
        return attempt

    def succeed(self) -> list[RespClientProtocol]:
        """
        Complete every waiting attempt; the protocols connected.
        """
        made = []
        attempts, self.attempts = self.attempts, []
        for factory, attempt in attempts:
            protocol = factory.buildProtocol(None)
            protocol.makeConnection(Transport())
            attempt.callback(protocol)
            made.append(protocol)
        return made

    def fail(self) -> None:
        attempts, self.attempts = self.attempts, []
        for _, attempt in attempts:
            attempt.errback(ConnectionRefusedError("refused"))


def sent(protocol: RespClientProtocol) -> bytes:
    """
    What C{protocol} wrote since the last call.
    """
    transport = protocol.transport
    assert isinstance(transport, StringTransport)
    value = transport.value()
    transport.clear()
    return value


def confirmations(kind: bytes, *channels: str) -> bytes:
    return b"".join(
        encodeReply([kind, channel.encode(), i + 1])
        for i, channel in enumerate(channels)
    )


def message(channel: str, payload: bytes) -> bytes:
    return encodeReply([b"message", channel.encode(), payload])


def resubscribed(
    test: SynchronousTestCase, subscriber: RespClientProtocol, *channels: str
) -> None:
    """
    A new subscriber connection's set-up: a PING (it is ready only once
    the server answers), then SUBSCRIBE to every channel; answer both.
    """
    expected = encodeCommand(b"PING")
    if channels:
        expected += encodeCommand(b"SUBSCRIBE", *channels)
    test.assertEqual(sent(subscriber), expected)
    subscriber.dataReceived(b"+PONG\r\n")
    if channels:
        subscriber.dataReceived(confirmations(b"subscribe", *channels))


def lose(protocol: RespClientProtocol, reason: Exception | None = None) -> None:
    protocol.connectionLost(Failure(reason or ConnectionDone()))


class RedisBusProtocolTests(SynchronousTestCase):
    """
    L{RedisBus} against a server played by hand.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.endpoint = FakeEndpoint()
        self.bus = RedisBus(
            "redis://example.invalid:6379/3",
            self.clock,
            endpoint=self.endpoint,
            pingInterval=5.0,
            pingTimeout=4.0,
            retryPolicy=lambda attempt: 1.0,
        )
        self.events = capturedLog(self.bus)
        for link in (self.bus._commands, self.bus._subscriber):
            capturedLog(link)
        self.reconnects: list[str] = []
        self.bus.onReconnect(lambda: self.reconnects.append("reconnected"))

    def connect(self, *channels: str) -> tuple[RespClientProtocol, SubscriberProtocol]:
        """
        Complete both connections: SELECT on one, SUBSCRIBE on the other.
        """
        made = self.endpoint.succeed()
        commands = next(p for p in made if not isinstance(p, SubscriberProtocol))
        subscriber = next(p for p in made if isinstance(p, SubscriberProtocol))
        self.assertEqual(
            sent(commands), encodeCommand(b"SELECT", 3) + encodeCommand(b"PING")
        )
        commands.dataReceived(b"+OK\r\n+PONG\r\n")
        resubscribed(self, subscriber, *channels)
        return commands, subscriber

    def test_providesIBus(self) -> None:
        self.assertTrue(verifyObject(IBus, self.bus))

    def test_connectsInStartService(self) -> None:
        self.assertEqual(self.endpoint.attempts, [])
        self.bus.startService()
        self.assertEqual(len(self.endpoint.attempts), 2)

    def test_publishAndReceive(self) -> None:
        got: list[bytes] = []
        self.bus.subscribe("room", got.append)
        self.bus.startService()
        connected = self.bus.whenConnected()
        self.assertNoResult(connected)
        commands, subscriber = self.connect("room")
        self.successResultOf(connected)
        self.assertTrue(self.bus.connected)

        published = self.bus.publish("room", b"hi")
        self.assertEqual(sent(commands), encodeCommand(b"PUBLISH", "room", b"hi"))
        self.assertNoResult(published)
        commands.dataReceived(b":2\r\n")
        self.assertEqual(self.successResultOf(published), 2)

        subscriber.dataReceived(message("room", b"hi") + message("other", b"no"))
        self.assertEqual(got, [b"hi"])
        self.assertEqual(self.reconnects, [])  # a first connection

    def test_subscribeAndUnsubscribeWhileConnected(self) -> None:
        self.bus.startService()
        commands, subscriber = self.connect()
        got: list[bytes] = []
        self.bus.subscribe("room", got.append)
        self.assertEqual(sent(subscriber), encodeCommand(b"SUBSCRIBE", "room"))
        self.bus.subscribe("room", print)  # not the first: nothing sent
        self.assertEqual(sent(subscriber), b"")
        subscriber.dataReceived(confirmations(b"subscribe", "room"))
        subscriber.dataReceived(message("room", b"1"))
        self.assertEqual(got, [b"1"])
        self.bus.unsubscribe("room", print)
        self.assertEqual(sent(subscriber), b"")
        self.bus.unsubscribe("room", got.append)
        self.assertEqual(sent(subscriber), encodeCommand(b"UNSUBSCRIBE", "room"))
        subscriber.dataReceived(message("room", b"late"))
        subscriber.dataReceived(confirmations(b"unsubscribe", "room"))
        self.assertEqual(got, [b"1"])
        self.assertEqual(subscriber.pending, 0)

    def test_subscribeFiresOnceTheServerHasAnswered(self) -> None:
        """
        What a subscriber publishes before its subscription takes effect
        is not received: C{subscribe} says when it has (the SUBSCRIBE
        reply; or, while disconnected, the next connection's set-up).
        """
        early = self.bus.subscribe("early", print)
        self.bus.startService()
        made = self.endpoint.succeed()
        commands = next(p for p in made if not isinstance(p, SubscriberProtocol))
        subscriber = next(p for p in made if isinstance(p, SubscriberProtocol))
        sent(commands)
        commands.dataReceived(b"+OK\r\n+PONG\r\n")
        self.assertEqual(
            sent(subscriber),
            encodeCommand(b"PING") + encodeCommand(b"SUBSCRIBE", "early"),
        )
        during = self.bus.subscribe("during", print)
        subscriber.dataReceived(b"+PONG\r\n" + confirmations(b"subscribe", "early"))
        self.successResultOf(early)
        self.assertNoResult(during)
        subscriber.dataReceived(confirmations(b"subscribe", "during"))
        self.successResultOf(during)
        self.successResultOf(self.bus.subscribe("during", repr))  # in effect

        # Unsubscribed, then subscribed again before the server answered:
        # the old SUBSCRIBE's answer is not the new one's.
        self.bus.unsubscribe("early", print)
        again = self.bus.subscribe("early", print)
        sent(subscriber)
        subscriber.dataReceived(confirmations(b"unsubscribe", "early"))
        self.assertNoResult(again)
        subscriber.dataReceived(confirmations(b"subscribe", "early"))
        self.successResultOf(again)

        # A lost connection: in effect again once the next one is set up.
        lose(subscriber)
        waiting = self.bus.subscribe("early", repr)
        self.clock.advance(1.0)
        [fresh] = self.endpoint.succeed()
        self.assertNoResult(waiting)
        resubscribed(self, fresh, "during", "early")
        self.successResultOf(waiting)

    def test_resubscribeThenOnReconnect(self) -> None:
        """
        After a loss, every channel is subscribed again first; only once
        the server has confirmed them all are the callbacks called.
        """
        got: list[bytes] = []
        self.bus.subscribe("a", got.append)
        self.bus.subscribe("b", got.append)
        self.bus.startService()
        commands, subscriber = self.connect("a", "b")

        lose(subscriber)
        self.assertFalse(self.bus.connected)
        self.assertEqual(self.endpoint.attempts, [])
        self.clock.advance(1.0)
        [again] = self.endpoint.succeed()
        self.assertIsInstance(again, SubscriberProtocol)
        self.assertEqual(
            sent(again), encodeCommand(b"PING") + encodeCommand(b"SUBSCRIBE", "a", "b")
        )
        again.dataReceived(b"+PONG\r\n")
        again.dataReceived(confirmations(b"subscribe", "a"))
        self.assertEqual(self.reconnects, [])
        again.dataReceived(confirmations(b"subscribe", "b")[:-3])
        self.assertEqual(self.reconnects, [])
        again.dataReceived(confirmations(b"subscribe", "b")[-3:])
        self.assertEqual(self.reconnects, ["reconnected"])
        again.dataReceived(message("b", b"after"))
        self.assertEqual(got, [b"after"])

    def test_lostWhileResubscribing(self) -> None:
        """
        A connection lost before the resubscription is confirmed calls no
        callback; the next one does.
        """
        self.bus.subscribe("a", print)
        self.bus.startService()
        commands, subscriber = self.connect("a")
        lose(subscriber)
        self.clock.advance(1.0)
        [again] = self.endpoint.succeed()
        lose(again)
        self.assertEqual(self.reconnects, [])
        self.clock.advance(1.0)
        [third] = self.endpoint.succeed()
        resubscribed(self, third, "a")
        self.assertEqual(self.reconnects, ["reconnected"])

    def test_subscribedDuringTheResubscription(self) -> None:
        self.bus.subscribe("a", print)
        self.bus.startService()
        commands, subscriber = self.connect("a")
        lose(subscriber)
        self.clock.advance(1.0)
        [again] = self.endpoint.succeed()
        self.bus.subscribe("b", print)
        self.assertEqual(
            sent(again),
            encodeCommand(b"PING")
            + encodeCommand(b"SUBSCRIBE", "a")
            + encodeCommand(b"SUBSCRIBE", "b"),
        )

    def test_aFirstConnectionAfterFailuresCallsOnReconnect(self) -> None:
        """
        A node that could not reach the server when it started may have
        missed publications: its first connection counts as a reconnection.
        """
        self.bus.subscribe("a", print)
        self.bus.startService()
        self.endpoint.fail()
        self.clock.advance(1.0)
        self.connect("a")
        self.assertEqual(self.reconnects, ["reconnected"])

    def test_aLostCommandsConnectionCallsOnReconnectToo(self) -> None:
        """
        The commands connection made again may reach another server (a
        failover) or one restarted with older state: the callbacks are
        called once both connections are ready again.
        """
        self.bus.startService()
        commands, subscriber = self.connect()
        lose(commands)
        self.clock.advance(1.0)
        [again] = self.endpoint.succeed()
        self.assertEqual(self.reconnects, [])
        self.assertEqual(
            sent(again), encodeCommand(b"SELECT", 3) + encodeCommand(b"PING")
        )
        again.dataReceived(b"+OK\r\n+PONG\r\n")
        self.assertEqual(self.reconnects, ["reconnected"])

    def test_aFailingCallbackDoesNotStopTheOthers(self) -> None:
        def broken() -> None:
            raise ZeroDivisionError

        self.bus._reconnectCallbacks.insert(0, broken)
        self.bus.startService()
        commands, subscriber = self.connect()
        lose(subscriber)
        self.clock.advance(1.0)
        [again] = self.endpoint.succeed()
        self.assertEqual(self.reconnects, [], "ready once the server answers")
        resubscribed(self, again)
        self.assertEqual(self.reconnects, ["reconnected"])
        self.assertEqual(
            [e.get("event") for e in self.events], ["bus_reconnect_callback_failed"]
        )

    def test_publishFailsWhileDisconnected(self) -> None:
        self.failureResultOf(self.bus.publish("room", b"x"), BusUnavailable)
        self.bus.startService()
        self.failureResultOf(self.bus.publish("room", b"x"), BusUnavailable)
        commands, subscriber = self.connect()
        waiting = self.bus.publish("room", b"1")
        lose(commands, ConnectionAborted())
        self.failureResultOf(waiting, BusUnavailable)
        self.failureResultOf(self.bus.publish("room", b"2"), BusUnavailable)
        self.failureResultOf(self.bus.get("k"), BusUnavailable)
        # The subscriber connection is not what publishes.
        self.assertIsNotNone(self.bus._subscriber.ready)

        self.clock.advance(1.0)
        [again] = self.endpoint.succeed()
        self.assertEqual(
            sent(again), encodeCommand(b"SELECT", 3) + encodeCommand(b"PING")
        )
        self.failureResultOf(self.bus.publish("room", b"3"), BusUnavailable)
        again.dataReceived(b"+OK\r\n")
        self.failureResultOf(self.bus.publish("room", b"3"), BusUnavailable)
        again.dataReceived(b"+PONG\r\n")
        published = self.bus.publish("room", b"4")
        again.dataReceived(b":0\r\n")
        self.assertEqual(self.successResultOf(published), 0)

    def test_boundedPending(self) -> None:
        bus = RedisBus(
            "redis://h/0",
            self.clock,
            endpoint=self.endpoint,
            maxPending=2,
            maxPendingBytes=200,
        )
        bus.startService()
        made = self.endpoint.succeed()
        commands = next(p for p in made if not isinstance(p, SubscriberProtocol))
        commands.dataReceived(b"+PONG\r\n")  # the set-up's PING
        first = bus.publish("room", b"1")
        second = bus.publish("room", b"2")
        self.failureResultOf(bus.publish("room", b"3"), BusOverloaded)
        commands.dataReceived(b":1\r\n")
        self.successResultOf(first)
        self.failureResultOf(bus.publish("room", b"x" * 200), BusOverloaded)
        third = bus.publish("room", b"3")
        commands.dataReceived(b":1\r\n:1\r\n")
        self.assertEqual(
            (self.successResultOf(second), self.successResultOf(third)), (1, 1)
        )
        bus.stopService()

    def test_pingOnAnIdleConnection(self) -> None:
        self.bus.startService()
        commands, subscriber = self.connect()
        self.clock.advance(4.9)
        self.assertEqual((sent(commands), sent(subscriber)), (b"", b""))
        self.clock.advance(0.1)
        ping = encodeCommand(b"PING")
        self.assertEqual((sent(commands), sent(subscriber)), (ping, ping))
        commands.dataReceived(b"+PONG\r\n")
        subscriber.dataReceived(encodeReply([b"pong", b""]))
        self.clock.advance(4.0)
        for protocol in (commands, subscriber):
            self.assertFalse(closing(protocol))
        self.clock.advance(1.0)
        self.assertEqual((sent(commands), sent(subscriber)), (ping, ping))

    def test_trafficDefersThePing(self) -> None:
        self.bus.startService()
        commands, subscriber = self.connect()
        for _ in range(5):
            self.clock.advance(3.0)
            subscriber.dataReceived(message("room", b"x"))
        self.assertEqual(sent(subscriber), b"")
        self.assertEqual(sent(commands), encodeCommand(b"PING"))

    def test_silentConnectionDroppedAndMadeAgain(self) -> None:
        self.bus.subscribe("a", print)
        self.bus.startService()
        commands, subscriber = self.connect("a")
        logged = capturedLog(commands)
        waiting = self.bus.publish("a", b"never answered")
        self.clock.advance(5.0)
        self.assertIn(encodeCommand(b"PING"), sent(subscriber))
        self.assertFalse(aborted(subscriber))
        self.clock.advance(4.0)
        for protocol in (commands, subscriber):
            self.assertTrue(aborted(protocol))
        self.assertEqual([e["event"] for e in logged], ["bus_unresponsive"])
        lose(commands, ConnectionAborted())
        lose(subscriber, ConnectionAborted())
        self.failureResultOf(waiting, BusUnavailable)
        self.clock.advance(1.0)
        self.assertEqual(len(self.endpoint.attempts), 2)
        self.connect("a")
        self.assertEqual(self.reconnects, ["reconnected"])

    def test_brokenProtocolDropsTheConnection(self) -> None:
        self.bus.startService()
        commands, subscriber = self.connect()
        commands.dataReceived(b":1\r\n")  # answers nothing that was asked
        self.assertTrue(aborted(commands))
        subscriber.dataReceived(b"!garbage\r\n")
        self.assertTrue(aborted(subscriber))

    def test_setupRefused(self) -> None:
        bus = RedisBus(
            "redis://user:secret@h:1/0",
            self.clock,
            endpoint=self.endpoint,
            retryPolicy=lambda attempt: 1.0,
        )
        for link in (bus._commands, bus._subscriber):
            capturedLog(link)
        bus.startService()
        for protocol in self.endpoint.succeed():
            self.assertTrue(
                sent(protocol).startswith(encodeCommand(b"AUTH", "user", "secret"))
            )
            protocol.dataReceived(b"-WRONGPASS invalid username-password pair\r\n")
            self.assertTrue(aborted(protocol))
            lose(protocol, ConnectionAborted())
        self.assertFalse(bus.connected)
        self.clock.advance(1.0)
        self.assertEqual(len(self.endpoint.attempts), 2)
        bus.stopService()

    def test_stopService(self) -> None:
        self.bus.startService()
        commands, subscriber = self.connect()
        stopped = self.bus.stopService()
        self.assertNoResult(stopped)
        for protocol in (commands, subscriber):
            self.assertTrue(closing(protocol))
            lose(protocol)
        self.successResultOf(stopped)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.endpoint.attempts, [])

    def test_stopWhileWaitingToReconnect(self) -> None:
        self.bus.startService()
        self.endpoint.fail()
        self.assertEqual(len(self.clock.getDelayedCalls()), 2)
        self.successResultOf(self.bus.stopService())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stopWhileConnecting(self) -> None:
        self.bus.startService()
        cancelled = [attempt for _, attempt in self.endpoint.attempts]
        self.successResultOf(self.bus.stopService())
        for attempt in cancelled:
            self.assertTrue(attempt.called)  # cancelled, and the failure handled
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_commands(self) -> None:
        self.bus.startService()
        commands, subscriber = self.connect()
        cases: list[tuple[Any, bytes, bytes, Any]] = [
            (
                lambda: self.bus.set("k", b"v", px=1500),
                encodeCommand(b"SET", "k", b"v", b"PX", 1500),
                b"+OK\r\n",
                True,
            ),
            (
                lambda: self.bus.set("k", "v", nx=True),
                encodeCommand(b"SET", "k", "v", b"NX"),
                b"$-1\r\n",
                False,
            ),
            (
                lambda: self.bus.get("k"),
                encodeCommand(b"GET", "k"),
                b"$1\r\nv\r\n",
                b"v",
            ),
            (
                lambda: self.bus.delete("k", "j"),
                encodeCommand(b"DEL", "k", "j"),
                b":1\r\n",
                1,
            ),
            (lambda: self.bus.incr("n"), encodeCommand(b"INCR", "n"), b":5\r\n", 5),
            (
                lambda: self.bus.pexpire("n", 250),
                encodeCommand(b"PEXPIRE", "n", 250),
                b":1\r\n",
                True,
            ),
            (
                lambda: self.bus.expire("n", 2),
                encodeCommand(b"EXPIRE", "n", 2),
                b":0\r\n",
                False,
            ),
            (
                lambda: self.bus.hset("h", {"a": 1, "b": b"2"}),
                encodeCommand(b"HSET", "h", "a", 1, "b", b"2"),
                b":2\r\n",
                2,
            ),
            (
                lambda: self.bus.hgetall("h"),
                encodeCommand(b"HGETALL", "h"),
                encodeReply([b"a", b"1", b"b", b"2"]),
                {b"a": b"1", b"b": b"2"},
            ),
            (
                lambda: self.bus.hdel("h", "a"),
                encodeCommand(b"HDEL", "h", "a"),
                b":1\r\n",
                1,
            ),
        ]
        for call, request, answer, expected in cases:
            result = call()
            self.assertEqual(sent(commands), request)
            commands.dataReceived(answer)
            self.assertEqual(self.successResultOf(result), expected)

        failing = self.bus.incr("h")
        commands.dataReceived(b"-WRONGTYPE Operation against a key\r\n")
        self.assertEqual(
            self.failureResultOf(failing, RedisError).value.kind, "WRONGTYPE"
        )
        self.assertRaises(ValueError, self.bus.hset, "h", {})

    def test_evalLoadsTheScriptAheadOfItsFirstEvalsha(self) -> None:
        """
        A script new to the connection is sent with SCRIPT LOAD pipelined
        ahead of its EVALSHA: it runs where it was sent, never after a
        command sent behind it (an EVAL sent only once a NOSCRIPT error
        came back would).
        """
        self.bus.startService()
        commands, subscriber = self.connect()
        script = "return redis.call('INCR', KEYS[1])"
        sha = hashlib.sha1(script.encode()).hexdigest()
        result = self.bus.eval(script, ["n"], [7])
        behind = self.bus.get("n")
        self.assertEqual(
            sent(commands),
            encodeCommand(b"SCRIPT", b"LOAD", script)
            + encodeCommand(b"EVALSHA", sha, 1, "n", 7)
            + encodeCommand(b"GET", "n"),
        )
        commands.dataReceived(f"${len(sha)}\r\n{sha}\r\n:1\r\n$1\r\n1\r\n".encode())
        self.assertEqual(self.successResultOf(result), 1)
        self.assertEqual(self.successResultOf(behind), b"1")

        again = self.bus.eval(script, ["n"])
        self.assertEqual(sent(commands), encodeCommand(b"EVALSHA", sha, 1, "n"))
        commands.dataReceived(b":2\r\n")
        self.assertEqual(self.successResultOf(again), 2)

        # A new connection (a restarted server knows no script) loads every
        # script before it is ready.
        lose(commands)
        self.clock.advance(1.0)
        [fresh] = self.endpoint.succeed()
        self.assertEqual(
            sent(fresh),
            encodeCommand(b"SELECT", 3)
            + encodeCommand(b"SCRIPT", b"LOAD", script)
            + encodeCommand(b"PING"),
        )
        self.failureResultOf(self.bus.eval(script, ["n"]), BusUnavailable)
        fresh.dataReceived(f"+OK\r\n${len(sha)}\r\n{sha}\r\n+PONG\r\n".encode())
        third = self.bus.eval(script, ["n"])
        self.assertEqual(sent(fresh), encodeCommand(b"EVALSHA", sha, 1, "n"))
        fresh.dataReceived(b":3\r\n")
        self.assertEqual(self.successResultOf(third), 3)

    def test_scriptsLostUnderALiveConnection(self) -> None:
        """
        The server lost its scripts under a live connection (SCRIPT FLUSH):
        EVAL is sent in place of an EVALSHA only when nothing was sent
        behind it; otherwise the eval fails (its caller writes its state
        again) rather than run out of order.
        """
        self.bus.startService()
        commands, subscriber = self.connect()
        script = "return 1"
        sha = hashlib.sha1(script.encode()).hexdigest()
        loaded = f"${len(sha)}\r\n{sha}\r\n".encode()
        first = self.bus.eval(script)
        commands.dataReceived(loaded + b":1\r\n")
        self.successResultOf(first)
        sent(commands)

        alone = self.bus.eval(script)
        self.assertEqual(sent(commands), encodeCommand(b"EVALSHA", sha, 0))
        commands.dataReceived(b"-NOSCRIPT No matching script.\r\n")
        self.assertEqual(sent(commands), encodeCommand(b"EVAL", script, 0))
        commands.dataReceived(b":1\r\n")
        self.assertEqual(self.successResultOf(alone), 1)

        # (The script is loaded again ahead of the next EVALSHA.)
        followed = self.bus.eval(script)
        behind = self.bus.get("k")
        self.assertEqual(
            sent(commands),
            encodeCommand(b"SCRIPT", b"LOAD", script)
            + encodeCommand(b"EVALSHA", sha, 0)
            + encodeCommand(b"GET", "k"),
        )
        commands.dataReceived(loaded + b"-NOSCRIPT No matching script.\r\n")
        failure = self.failureResultOf(followed, RedisError)
        self.assertEqual(failure.value.kind, "NOSCRIPT")
        self.assertEqual(sent(commands), b"", "no EVAL behind the GET")
        commands.dataReceived(b"$-1\r\n")
        self.assertIsNone(self.successResultOf(behind))


class RedisURLTests(SynchronousTestCase):
    def test_parse(self) -> None:
        self.assertEqual(
            tuple(parseRedisURL("redis://localhost")),
            ("localhost", 6379, 0, None, None),
        )
        self.assertEqual(
            tuple(parseRedisURL("redis://:p%40ss@10.0.0.1:6380/2")),
            ("10.0.0.1", 6380, 2, None, "p@ss"),
        )
        self.assertEqual(
            tuple(parseRedisURL("redis://me:pw@[::1]:7000/")),
            ("::1", 7000, 0, "me", "pw"),
        )
        self.assertEqual(str(parseRedisURL("redis://h:1/4")), "redis://h:1/4")

    def test_refused(self) -> None:
        for url in (
            "http://h",
            "rediss://h",
            "redis://",
            "redis://h:notaport",
            "redis://h/db",
        ):
            self.assertRaises(ValueError, parseRedisURL, url)
