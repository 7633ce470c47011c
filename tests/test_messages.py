"""
Unit tests of the JSON message layer: every malformed frame gets an error
and leaves the connection usable; replies keep request order.
"""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import connectProtocol, frames
from twisted_lab.codecs.framing import FrameReceiver
from twisted_lab.codecs.message import (
    Integer,
    RequestError,
    Text,
    decodeRequest,
    encodeMessage,
)
from twisted_lab.dispatch import MAX_CONSECUTIVE_ERRORS, MAX_QUEUED_REQUESTS
from twisted_lab.services.handler import RequestHandler
from twisted_lab.transports.int32 import MessageFactory


class Sample(RequestHandler):
    """
    A service's request handler, as the dispatcher sees it: requests, their
    schemas, replies (some of them late, some failures).
    """

    requests = {
        "ping": {},
        "say": {"text": Text(maxChars=10)},
        "count": {"n": Integer(minimum=0, maximum=10), "label": Text(required=False)},
        "slow": {},
        "fail": {},
        "boom": {},
    }

    def __init__(self, channel, context) -> None:
        super().__init__(channel, context)
        self.pending: list[defer.Deferred] = []

    def request_ping(self, message):
        return {"type": "pong"}

    def request_say(self, message):
        return {"type": "said", "text": message["text"]}

    def request_count(self, message):
        return {"type": "counted", "n": message["n"], "label": message.get("label")}

    def request_slow(self, message):
        d = defer.Deferred()
        self.pending.append(d)
        return d

    def request_fail(self, message):
        raise RequestError("no_such_user", "nobody by that name")

    def request_boom(self, message):
        raise ZeroDivisionError("a bug")


class SampleService:
    def __init__(self, context) -> None:
        self.context = context
        context.stats.enableRequests()

    def handlerFor(self, channel) -> Sample:
        return Sample(channel, self.context)


class SampleFactory(MessageFactory):
    def __init__(self, **settings) -> None:
        super().__init__(SampleService, **settings)


class Decoder(FrameReceiver):
    """
    Splits what the server wrote back into JSON messages.
    """

    def __init__(self) -> None:
        self.messages: list[dict] = []

    def stringReceived(self, string: bytes) -> None:
        self.messages.append(json.loads(string))


def replies(transport) -> list[dict]:
    decoder = Decoder()
    decoder.makeConnection(StringTransport())
    decoder.dataReceived(transport.value())
    return decoder.messages


class Harness(SynchronousTestCase):
    def connect(self, **settings):
        settings.setdefault("clock", Clock())
        settings.setdefault("maxLength", 64 * 1024)
        factory = SampleFactory(**settings)
        protocol, transport, recorder = connectProtocol(factory)
        self.clock = settings["clock"]
        return protocol, transport, recorder

    def exchange(self, *payloads: bytes) -> list[dict]:
        protocol, transport, _ = self.connect()
        protocol.dataReceived(frames(*payloads))
        return replies(transport)

    def assertError(self, payload: bytes, code: str, text: str = "") -> dict:
        """
        C{payload} gets one C{error} with C{code}, and the connection still
        answers a ping afterwards.
        """
        protocol, transport, _ = self.connect()
        protocol.dataReceived(frames(payload, b'{"type":"ping"}'))
        got = replies(transport)
        self.assertEqual(len(got), 2, got)
        error, pong = got
        self.assertEqual((error["type"], error["code"]), ("error", code), error)
        self.assertIn(text, error["message"])
        self.assertEqual(pong, {"type": "pong"})
        self.assertFalse(transport.disconnecting)
        return error


class MalformedFrameTests(Harness):
    def test_invalidUTF8(self) -> None:
        self.assertError(b'{"type":"ping","x":"\xff\xfe"}', "bad_request", "UTF-8")

    def test_invalidJSON(self) -> None:
        self.assertError(b'{"type": "ping"', "bad_request", "not valid JSON")

    def test_emptyFrame(self) -> None:
        self.assertError(b"", "bad_request", "not valid JSON")

    def test_scalars(self) -> None:
        for payload in (b"42", b'"ping"', b"null", b"true", b"1.5"):
            self.assertError(payload, "bad_request", "must be a JSON object")

    def test_list(self) -> None:
        self.assertError(b'[{"type":"ping"}]', "bad_request", "not an array")

    def test_nanAndInfinity(self) -> None:
        for constant in (b"NaN", b"Infinity", b"-Infinity"):
            self.assertError(
                b'{"type":"count","n":' + constant + b"}", "bad_request", "JSON"
            )

    def test_deepNesting(self) -> None:
        deep = b'{"type":"ping","x":' + b"[" * 30000 + b"]" * 30000 + b"}"
        self.assertError(deep, "bad_request", "nested too deeply")

    def test_hugeInteger(self) -> None:
        self.assertError(
            b'{"type":"count","n":' + b"9" * 5000 + b"}", "bad_request", "integer"
        )

    def test_duplicateKeys(self) -> None:
        self.assertError(b'{"type":"ping","type":"say"}', "bad_request", "duplicate")

    def test_missingType(self) -> None:
        self.assertError(b'{"text":"hi"}', "bad_request", '"type"')

    def test_typeNotAString(self) -> None:
        self.assertError(b'{"type":7}', "bad_request", '"type"')

    def test_unknownType(self) -> None:
        self.assertError(b'{"type":"launch"}', "unknown_type", "launch")

    def test_missingField(self) -> None:
        self.assertError(b'{"type":"say"}', "bad_request", '"text" is required')

    def test_wrongFieldType(self) -> None:
        self.assertError(b'{"type":"say","text":5}', "bad_request", "a string")
        self.assertError(b'{"type":"count","n":"5"}', "bad_request", "an integer")
        self.assertError(b'{"type":"count","n":true}', "bad_request", "an integer")
        self.assertError(b'{"type":"count","n":1.0}', "bad_request", "an integer")

    def test_fieldLimits(self) -> None:
        self.assertError(b'{"type":"say","text":"12345678901"}', "bad_request", "10")
        self.assertError(b'{"type":"count","n":11}', "bad_request", "at most 10")
        self.assertError(b'{"type":"count","n":-1}', "bad_request", "at least 0")

    def test_loneSurrogate(self) -> None:
        self.assertError(
            b'{"type":"say","text":"\\ud800"}', "bad_request", "not valid Unicode"
        )

    def test_badId(self) -> None:
        for bad in (b"true", b"[1]", b'{"a":1}', b"1.5", b'"' + b"x" * 200 + b'"'):
            error = self.assertError(
                b'{"type":"ping","id":' + bad + b"}", "bad_request"
            )
            self.assertNotIn("id", error)


class DispatchTests(Harness):
    def test_idIsCopied(self) -> None:
        got = self.exchange(
            b'{"type":"ping","id":7}',
            b'{"type":"ping","id":"abc"}',
            b'{"type":"ping"}',
            b'{"type":"launch","id":9}',
        )
        self.assertEqual(got[0], {"type": "pong", "id": 7})
        self.assertEqual(got[1], {"type": "pong", "id": "abc"})
        self.assertEqual(got[2], {"type": "pong"})
        self.assertEqual((got[3]["code"], got[3]["id"]), ("unknown_type", 9))

    def test_extraFieldsIgnored(self) -> None:
        got = self.exchange(b'{"type":"say","text":"hi","future":{"x":[1]}}')
        self.assertEqual(got, [{"type": "said", "text": "hi"}])

    def test_optionalField(self) -> None:
        got = self.exchange(
            b'{"type":"count","n":3}', b'{"type":"count","n":3,"label":"x"}'
        )
        self.assertEqual(got[0]["label"], None)
        self.assertEqual(got[1]["label"], "x")

    def test_handlerRequestError(self) -> None:
        got = self.exchange(b'{"type":"fail","id":1}')
        self.assertEqual(
            got,
            [
                {
                    "type": "error",
                    "code": "no_such_user",
                    "message": "nobody by that name",
                    "id": 1,
                }
            ],
        )

    def test_handlerBugIsInternalError(self) -> None:
        protocol, transport, recorder = self.connect()
        protocol.dataReceived(frames(b'{"type":"boom"}', b'{"type":"ping"}'))
        got = replies(transport)
        self.assertEqual(got[0]["code"], "internal_error")
        self.assertNotIn("ZeroDivision", got[0]["message"])
        self.assertEqual(got[1], {"type": "pong"})
        self.assertEqual(len(recorder.named("internal_error")), 1)
        self.flushLoggedErrors(ZeroDivisionError)

    def test_repliesKeepRequestOrder(self) -> None:
        """
        A request behind a slow one waits for it: replies (and effects)
        happen in the order of the requests.
        """
        protocol, transport, _ = self.connect()
        protocol.dataReceived(
            frames(b'{"type":"slow","id":1}', b'{"type":"ping","id":2}')
        )
        self.assertEqual(replies(transport), [])
        protocol.handler.pending[0].callback({"type": "done"})
        self.assertEqual(
            replies(transport), [{"type": "done", "id": 1}, {"type": "pong", "id": 2}]
        )

    def test_pipelinedRequests(self) -> None:
        protocol, transport, _ = self.connect()
        payloads = [
            b'{"type":"count","n":%d,"id":%d}' % (i % 10, i) for i in range(1000)
        ]
        protocol.dataReceived(frames(*payloads))
        got = replies(transport)
        self.assertEqual([m["id"] for m in got], list(range(1000)))

    def test_readingPausedWhileQueueIsLong(self) -> None:
        protocol, transport, _ = self.connect()
        protocol.dataReceived(frames(b'{"type":"slow"}'))
        protocol.dataReceived(frames(*[b'{"type":"ping"}'] * MAX_QUEUED_REQUESTS))
        self.assertEqual(transport.producerState, "paused")
        protocol.handler.pending[0].callback(None)
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(len(replies(transport)), MAX_QUEUED_REQUESTS)

    def test_closesAfterRepeatedErrors(self) -> None:
        protocol, transport, _ = self.connect()
        protocol.dataReceived(frames(*[b"junk"] * (MAX_CONSECUTIVE_ERRORS - 1)))
        self.assertFalse(transport.disconnecting)
        protocol.dataReceived(frames(b"junk", b'{"type":"ping"}'))
        got = replies(transport)
        self.assertEqual(len(got), MAX_CONSECUTIVE_ERRORS + 1)
        self.assertIn("in a row", got[-1]["message"])
        self.assertTrue(transport.disconnecting)

    def test_goodRequestResetsTheErrorCount(self) -> None:
        protocol, transport, _ = self.connect()
        for _ in range(3):
            protocol.dataReceived(frames(*[b"junk"] * (MAX_CONSECUTIVE_ERRORS - 1)))
            protocol.dataReceived(frames(b'{"type":"ping"}'))
        self.assertFalse(transport.disconnecting)

    def test_frameTooLong(self) -> None:
        protocol, transport, _ = self.connect(maxLength=100)
        protocol.dataReceived(b"\x00\x00\x00\x65")
        [error] = replies(transport)
        self.assertEqual(error["code"], "frame_too_long")
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.disconnected)
        self.clock.advance(10)
        self.assertTrue(transport.disconnected, "aborted if the peer does not read")

    def test_idleTimeoutSaysWhy(self) -> None:
        protocol, transport, _ = self.connect(idleTimeout=5)
        self.clock.advance(5)
        [error] = replies(transport)
        self.assertEqual(error["code"], "idle_timeout")
        self.assertTrue(transport.disconnecting)


class DecodeTests(SynchronousTestCase):
    def test_roundTrip(self) -> None:
        message = {"type": "say", "text": "héllo ✓", "id": 3}
        self.assertEqual(decodeRequest(encodeMessage(message)), message)

    def test_encodeIsCompactUTF8(self) -> None:
        self.assertEqual(encodeMessage({"a": "é"}), '{"a":"é"}'.encode())


class HostileBytesTests(Harness):
    @settings(max_examples=150, deadline=None)
    @given(st.lists(st.binary(max_size=200), max_size=MAX_CONSECUTIVE_ERRORS - 2))
    def test_anyFramesGetOneReplyEachAndStayUsable(self, payloads) -> None:
        protocol, transport, _ = self.connect()
        protocol.dataReceived(
            frames(*payloads) + frames(b'{"type":"ping","id":"last"}')
        )
        got = replies(transport)
        self.assertEqual(len(got), len(payloads) + 1)
        self.assertEqual(got[-1], {"type": "pong", "id": "last"})

    @settings(max_examples=150, deadline=None)
    @given(st.binary(max_size=2000))
    def test_anyStreamNeverRaises(self, data) -> None:
        protocol, transport, _ = self.connect(maxLength=1000)
        protocol.dataReceived(data)
        for message in replies(transport):
            self.assertIn(message["type"], ("error", "pong", "said", "counted"))
