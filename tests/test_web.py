"""
The web listener of netlab-chat (C{twisted_lab.transports.web}): the page
and its headers, the Origin check, and the WebSocket adapter on in-memory
transports with a fake clock (a recording dispatcher stands in for the
chat service), then a real listener (TCP and TLS) on the reactor.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any, cast

from twisted.internet import defer, reactor, threads
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    Request,
    TextMessage,
)
from zope.interface import directlyProvides
from zope.interface.verify import verifyObject

from tests.helpers import REPO, EventRecorder
from tests.servicehelpers import PASSWORD, ServerHarness
from twisted_lab.codecs import events
from twisted_lab.codecs.message import Outgoing
from twisted_lab.ports import IRequestChannel
from twisted_lab.runtime.weblistener import webService
from twisted_lab.transports.connection import ServerFactory
from twisted_lab.transports.web import (
    CONTROL_FLOOD,
    CONTROL_FRAME_BURST,
    CONTROL_FRAME_RATE,
    HTTP_REQUEST_BURST,
    HTTP_REQUEST_LIMIT,
    HTTP_REQUEST_RATE,
    MAX_FRAGMENTS,
    QUEUE_FULL,
    TOO_FRAGMENTED,
    WEB_ORIGIN_REFUSED,
    WEB_REQUEST_TOO_LONG,
    WEB_UPGRADE_REFUSED,
    WEBSOCKET_CONTROL_FLOOD,
    WEBSOCKET_TOO_FRAGMENTED,
    FrameScanner,
    OriginPolicy,
    WebConnection,
    WebFactory,
    WebSocketChannel,
    loadStaticFiles,
    normalizeOrigin,
    serviceDispatchers,
)

HOST = "chat.test:8080"
OWN_ORIGIN = f"http://{HOST}"
STATIC = REPO / "twisted_lab" / "static"


class RecordingDispatcher:
    """
    Stands in for the request dispatcher: records each request's bytes and
    answers C{{"type": "echo"}} with the request's id, so the adapter can
    be driven message by message.
    """

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self.requests: list[bytes] = []
        self.closedWith: list[tuple[str | None, str]] = []
        self.lost = False
        self.drained = 0
        self.full = False
        self.answer = True

    @property
    def queueFull(self) -> bool:
        return self.full

    def requestReceived(self, payload: bytes) -> None:
        self.requests.append(payload)
        if self.answer:
            message = json.loads(payload)
            reply: dict[str, Any] = {"type": "echo"}
            if isinstance(message, dict) and "id" in message:
                reply["id"] = message["id"]
            self.channel.send(Outgoing(reply))

    def closeWith(self, code: str | None = None, message: str = "") -> None:
        self.closedWith.append((code, message))
        if code is not None:
            self.channel.send(
                Outgoing({"type": "error", "code": code, "message": message})
            )
        self.channel.closeAfterFlush()

    def endOfInput(self) -> None:
        self.closeWith()

    def outputDrained(self) -> None:
        self.drained += 1

    def connectionLost(self) -> None:
        self.lost = True


class Server:
    """
    A chat server's factory with a web listener's factory on a fake clock.
    """

    def __init__(self, origins: tuple[str, ...] = (), **settings: Any) -> None:
        self.clock = Clock()
        self.recorder = EventRecorder()
        settings.setdefault("maxLength", 1000)
        self.factory = ServerFactory(clock=self.clock, **settings)
        self.factory.log = self.recorder.logger
        self.dispatchers: list[RecordingDispatcher] = []
        self.web = WebFactory(
            self.factory, self.makeDispatcher, OriginPolicy(origins), self.clock
        )
        self.web.socket.log = self.recorder.logger

    def makeDispatcher(self, channel: Any) -> RecordingDispatcher:
        dispatcher = RecordingDispatcher(channel)
        self.dispatchers.append(dispatcher)
        return dispatcher

    def connect(
        self, host: str = "127.0.0.2", port: int = 40000, secure: bool = False
    ) -> Browser:
        address = IPv4Address("TCP", host, port)
        connection = self.web.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        if secure:
            from twisted.internet.interfaces import ISSLTransport

            directlyProvides(transport, ISSLTransport)
        connection.makeConnection(transport)
        return Browser(self, connection, transport)


class Browser:
    """
    One client connection on a L{StringTransport}: HTTP requests, then a
    WebSocket spoken with wsproto's client side.
    """

    def __init__(self, server: Server, connection: Any, transport: StringTransport):
        self.server = server
        self.connection: WebConnection = connection
        self.transport = transport
        self.ws: WSConnection | None = None
        self.events: list[Any] = []

    # -- HTTP ------------------------------------------------------------------------

    def get(
        self, path: str, method: str = "GET", headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        head = {"Host": HOST, **(headers or {})}
        lines = [f"{method} {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in head.items()]
        self.connection.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode())
        return self.response()

    def response(self) -> tuple[int, dict[str, str], bytes]:
        raw = self.transport.value()
        self.transport.clear()
        head, _, body = raw.partition(b"\r\n\r\n")
        status, *fields = head.decode("latin-1").split("\r\n")
        code = int(status.split()[1])
        headers = {}
        for field in fields:
            name, _, value = field.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", len(body)))
        return code, headers, body[:length]

    # -- WebSocket ------------------------------------------------------------------

    def upgrade(self, origin: str | None = OWN_ORIGIN) -> Any:
        """
        Ask for the WebSocket; the wsproto event that answers it.
        """
        self.ws = WSConnection(ConnectionType.CLIENT)
        extra = [(b"origin", origin.encode())] if origin is not None else []
        before = len(self.server.dispatchers)
        self.connection.dataReceived(
            self.ws.send(Request(host=HOST, target="/ws", extra_headers=extra))
        )
        if len(self.server.dispatchers) > before:
            self._dispatcher = self.server.dispatchers[-1]
        return self.receive()[0]

    def send(self, text: str) -> None:
        assert self.ws is not None
        self.connection.dataReceived(self.ws.send(TextMessage(text)))

    def sendRaw(self, data: bytes) -> None:
        self.connection.dataReceived(data)

    def receive(self) -> list[Any]:
        """
        The wsproto events of everything the server wrote since last time
        (text messages whole).
        """
        assert self.ws is not None
        self.ws.receive_data(self.transport.value())
        self.transport.clear()
        found = list(self.ws.events())
        self.events += found
        return found

    def messages(self) -> list[dict[str, Any]]:
        return [
            json.loads(e.data) for e in self.receive() if isinstance(e, TextMessage)
        ]

    def closeCode(self) -> int | None:
        for event in self.events + self.receive():
            if isinstance(event, CloseConnection):
                return event.code
        return None

    @property
    def dispatcher(self) -> RecordingDispatcher:
        return self._dispatcher


def maskedFrame(opcode: int, payload: bytes, final: bool = True) -> bytes:
    """
    One client frame (masked with a zero key, as RFC 6455 allows), built by
    hand for the cases wsproto's client would not produce.
    """
    first = (0x80 if final else 0) | opcode
    n = len(payload)
    if n < 126:
        head = bytes([first, 0x80 | n])
    elif n < 65536:
        head = bytes([first, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([first, 0x80 | 127]) + n.to_bytes(8, "big")
    return head + b"\x00\x00\x00\x00" + payload


# -- the page -------------------------------------------------------------------------


class PageTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.server = Server()
        self.browser = self.server.connect()

    def test_pageHasItsSecurityHeaders(self) -> None:
        code, headers, body = self.browser.get("/")
        self.assertEqual(code, 200)
        self.assertEqual(body, (STATIC / "index.html").read_bytes())
        self.assertEqual(headers["content-type"], "text/html; charset=utf-8")
        csp = [d.strip() for d in headers["content-security-policy"].split(";")]
        self.assertIn("default-src 'self'", csp)
        self.assertIn("script-src 'self'", csp)
        self.assertIn("style-src 'self'", csp)
        self.assertIn(f"connect-src 'self' ws://{HOST}", csp)
        self.assertIn("frame-ancestors 'none'", csp)
        self.assertIn("object-src 'none'", csp)
        self.assertNotIn("unsafe-inline", headers["content-security-policy"])
        self.assertNotIn("unsafe-eval", headers["content-security-policy"])
        self.assertEqual(headers["x-content-type-options"], "nosniff")
        self.assertEqual(headers["referrer-policy"], "no-referrer")
        self.assertEqual(headers["x-frame-options"], "DENY")
        self.assertEqual(headers["server"], "netlab")

    def test_pageOverTLSConnectsWithWss(self) -> None:
        browser = self.server.connect(secure=True)
        code, headers, _ = browser.get("/")
        self.assertEqual(code, 200)
        self.assertIn(f"wss://{HOST}", headers["content-security-policy"])
        self.assertNotIn(f"ws://{HOST}", headers["content-security-policy"])

    def test_aHostThatCouldInjectIsLeftOut(self) -> None:
        code, headers, _ = self.browser.get("/", headers={"Host": "a; script-src *"})
        self.assertEqual(code, 200)
        self.assertIn("connect-src 'self';", headers["content-security-policy"])
        self.assertNotIn("script-src *", headers["content-security-policy"])

    def test_staticFiles(self) -> None:
        for path, name, kind in [
            ("/app.js", "app.js", "text/javascript; charset=utf-8"),
            ("/style.css", "style.css", "text/css; charset=utf-8"),
            ("/favicon.svg", "favicon.svg", "image/svg+xml"),
            ("/index.html", "index.html", "text/html; charset=utf-8"),
        ]:
            code, headers, body = self.browser.get(path)
            self.assertEqual((code, headers["content-type"]), (200, kind), path)
            self.assertEqual(body, (STATIC / name).read_bytes(), path)
            self.assertIn("default-src 'self'", headers["content-security-policy"])
            self.assertEqual(headers["x-content-type-options"], "nosniff")

    def test_unknownPathsAre404WithTheHeaders(self) -> None:
        for path in [
            "/nope",
            "/app.js/x",
            "/static/app.js",
            "/ws/x",
            "/../pyproject.toml",
        ]:
            code, headers, body = self.browser.get(path)
            self.assertEqual(code, 404, path)
            self.assertEqual(body, b"not found\n")
            self.assertIn("frame-ancestors 'none'", headers["content-security-policy"])

    def test_headAndRevalidation(self) -> None:
        code, headers, body = self.browser.get("/app.js", method="HEAD")
        self.assertEqual(code, 200)
        self.assertEqual(body, b"")
        self.assertEqual(
            int(headers["content-length"]), len((STATIC / "app.js").read_bytes())
        )
        code, headers, body = self.browser.get(
            "/app.js", headers={"If-None-Match": headers["etag"]}
        )
        self.assertEqual((code, body), (304, b""))
        self.assertEqual(headers["cache-control"], "no-cache")

    def test_otherMethodsAreRefused(self) -> None:
        code, headers, _ = self.browser.get(
            "/", method="POST", headers={"Content-Length": "0"}
        )
        self.assertEqual(code, 405)
        self.assertIn("GET", headers["allow"])

    def test_socketWithoutUpgradeIs426(self) -> None:
        code, headers, _ = self.browser.get("/ws")
        self.assertEqual(code, 426)
        self.assertEqual(headers["upgrade"], "websocket")

    def test_theSocketIsGETOnly(self) -> None:
        """
        C{HEAD /ws} with the upgrade headers is not an upgrade (twisted.web
        answers a HEAD with C{render_GET} unless told otherwise): 405, as
        for any method but GET.
        """
        upgrade = {
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version": "13",
        }
        for method in ("HEAD", "POST", "PUT"):
            code, headers, body = self.browser.get("/ws", method, upgrade)
            self.assertEqual((code, headers["allow"]), (405, "GET"), method)
            self.assertNotIn("sec-websocket-accept", headers)
        self.assertEqual(self.server.dispatchers, [])

    def test_aHEADIsAnsweredWithoutABodyOrALogLine(self) -> None:
        """
        twisted.web logs a warning, with the URL, for every HEAD answered
        with a body: none is.
        """
        logged: list[dict[str, Any]] = []
        observer = cast(ILogObserver, logged.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        for path in ("/nope?secret", "/ws?secret", "/?secret"):
            code, headers, body = self.browser.get(path, "HEAD")
            self.assertEqual(body, b"", path)
        self.assertEqual(logged, [])

    def test_HSTSOverTLSOnly(self) -> None:
        _, headers, _ = self.server.connect(secure=True).get("/")
        self.assertEqual(headers["strict-transport-security"], "max-age=31536000")
        _, headers, _ = self.browser.get("/")
        self.assertNotIn("strict-transport-security", headers)

    def test_pipelinedRequestsHaveARate(self) -> None:
        """
        A connection may make L{HTTP_REQUEST_BURST} requests at once, then
        L{HTTP_REQUEST_RATE} a second; past that, C{429} and the
        connection closed (within the log budget).
        """
        request = f"GET /nope HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()
        self.browser.connection.dataReceived(request * (HTTP_REQUEST_BURST + 100))
        raw = self.browser.transport.value()
        self.assertEqual(raw.count(b"HTTP/1.1 404"), HTTP_REQUEST_BURST)
        self.assertEqual(raw.count(b"HTTP/1.1 429"), 1)
        self.assertTrue(self.browser.transport.disconnecting)
        self.assertEqual(len(self.server.recorder.named(events.RATE_LIMITED)), 1)
        # Refilled at the rate.
        other = self.server.connect(port=40001)
        other.connection.dataReceived(request * HTTP_REQUEST_BURST)
        self.server.clock.advance(1)
        other.transport.clear()
        other.connection.dataReceived(request * int(HTTP_REQUEST_RATE))
        self.assertEqual(other.transport.value().count(b"HTTP/1.1 404"), 50)
        self.assertFalse(other.transport.disconnecting)

    def test_theShippedPageHasNoInlineCodeAndNoInnerHTML(self) -> None:
        html = (STATIC / "index.html").read_text()
        for tag in re.findall(r"<script\b[^>]*>", html):
            self.assertIn("src=", tag)
        self.assertNotRegex(html, r"<script\b[^>]*>\s*[^<\s]")
        self.assertNotRegex(html, r"<style\b")
        self.assertNotRegex(html, r"\sstyle=")
        self.assertNotRegex(html, r"\son[a-z]+=")
        self.assertNotRegex(html, r"(?i)https?://")  # nothing from the internet
        script = (STATIC / "app.js").read_text()
        code = "\n".join(
            line for line in script.splitlines() if not line.strip().startswith("//")
        )
        for sink in (
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "eval(",
            "document.write",
        ):
            self.assertNotIn(sink, code)
        self.assertNotIn("?token", code)  # the token is never put in a URL
        css = (STATIC / "style.css").read_text()
        self.assertNotRegex(css, r"(?i)url\(|@import")

    def test_theFilesComeFromThePackage(self) -> None:
        files = loadStaticFiles()
        self.assertEqual(files[b""].body, (STATIC / "index.html").read_bytes())
        self.assertEqual(files[b"app.js"].body, (STATIC / "app.js").read_bytes())

    def test_noAccessLogAndNoURLsLogged(self) -> None:
        self.browser.get("/?token=secret-in-a-url")
        for event in self.server.recorder.events:
            self.assertNotIn("secret-in-a-url", json.dumps(event, default=str))


# -- the Origin check -------------------------------------------------------------


class OriginTests(SynchronousTestCase):
    def test_normalizeOrigin(self) -> None:
        self.assertEqual(
            normalizeOrigin("HTTPS://Chat.Example.org"), "https://chat.example.org"
        )
        self.assertEqual(normalizeOrigin("https://a.example:443"), "https://a.example")
        self.assertEqual(normalizeOrigin("http://a.example:80/"), "http://a.example")
        self.assertEqual(
            normalizeOrigin("http://a.example:8080"), "http://a.example:8080"
        )
        self.assertEqual(normalizeOrigin("http://[::1]:8080"), "http://[::1]:8080")
        for bad in [
            "null",
            "chat.example.org",
            "ftp://a.example",
            "https://a.example/path",
            "https://user@a.example",
            "https://a.example?x=1",
            "https://a.example:99999",
            "",
        ]:
            self.assertRaises(ValueError, normalizeOrigin, bad)

    def test_ownOriginIsAccepted(self) -> None:
        server = Server()
        browser = server.connect()
        accepted = browser.upgrade(OWN_ORIGIN)
        self.assertIsInstance(accepted, AcceptConnection)
        self.assertEqual(server.recorder.named(WEB_ORIGIN_REFUSED), [])

    def test_foreignOriginIsRefused(self) -> None:
        server = Server()
        browser = server.connect()
        for origin in [
            "http://evil.example",
            "https://chat.test:8080",  # another scheme is another origin
            "http://chat.test:8081",
            "http://chat.test",
            "null",
        ]:
            refused = browser.upgrade(origin)
            self.assertIsInstance(refused, RejectConnection, origin)
            self.assertEqual(refused.status_code, 403, origin)
            browser.receive()
        self.assertEqual(server.dispatchers, [])
        named = server.recorder.named(WEB_ORIGIN_REFUSED)
        self.assertEqual(named[0]["origin"], "http://evil.example")
        self.assertEqual(named[0]["peer"], "127.0.0.2:40000")

    def test_configuredOriginsOnly(self) -> None:
        server = Server(origins=("https://chat.example.org", "http://localhost:9000"))
        self.assertIsInstance(
            server.connect().upgrade("https://chat.example.org"), AcceptConnection
        )
        self.assertIsInstance(
            server.connect().upgrade("http://localhost:9000"), AcceptConnection
        )
        self.assertIsInstance(server.connect().upgrade(OWN_ORIGIN), RejectConnection)

    def test_overTLSTheOwnOriginIsHttps(self) -> None:
        server = Server()
        self.assertIsInstance(
            server.connect(secure=True).upgrade(f"https://{HOST}"), AcceptConnection
        )
        self.assertIsInstance(
            server.connect(secure=True).upgrade(OWN_ORIGIN), RejectConnection
        )

    def test_anUpgradeWsprotoRefusesIs400(self) -> None:
        """
        Upgrades that pass the shape check (426 otherwise) but that wsproto
        would refuse, or with a body: 400, within the log budget.
        """
        server = Server()
        key = {
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version": "13",
        }
        browser = server.connect()
        code, _, _ = browser.get("/ws", headers={**key, "Upgrade": "websocket, h2c"})
        self.assertEqual(code, 400)
        head = "".join(f"{k}: {v}\r\n" for k, v in key.items()).encode()
        for body in (
            b"Content-Length: 2\r\n\r\nab",
            b"Transfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n",
        ):
            browser.connection.dataReceived(
                b"GET /ws HTTP/1.1\r\nHost: a\r\n" + head + body
            )
            self.assertEqual(browser.response()[0], 400)
        self.assertEqual(server.dispatchers, [])
        refused = server.recorder.named(WEB_UPGRADE_REFUSED)
        self.assertEqual(len(refused), 3)
        self.assertEqual(refused[0]["reason"], "Missing header, 'Upgrade: websocket'")
        self.assertEqual(refused[2]["reason"], "an upgrade request with a body")

    def test_noOriginIsNotABrowser(self) -> None:
        server = Server()
        self.assertIsInstance(server.connect().upgrade(None), AcceptConnection)

    def test_anOriginLogLineIsBoundedAndPrintable(self) -> None:
        server = Server()
        server.connect().upgrade("http://" + "\u00e9" * 500)
        [event] = server.recorder.named(WEB_ORIGIN_REFUSED)
        self.assertLessEqual(len(event["origin"]), 200)
        self.assertTrue(event["origin"].isprintable())


# -- the WebSocket adapter ----------------------------------------------------------


class SocketTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.server = Server(maxLength=100, idleTimeout=300.0)
        self.browser = self.server.connect()
        self.assertIsInstance(self.browser.upgrade(), AcceptConnection)

    def test_channelProvidesTheInterface(self) -> None:
        channel = self.browser.dispatcher.channel
        self.assertIsInstance(channel, WebSocketChannel)
        verifyObject(IRequestChannel, channel)
        self.assertEqual(channel.peer, "127.0.0.2:40000")
        self.assertEqual(channel.address, "127.0.0.2")
        self.assertEqual(channel.group, "127.0.0.2")
        self.assertFalse(channel.closing)
        other = self.server.connect()
        other.upgrade()
        self.assertNotEqual(other.dispatcher.channel.serial, channel.serial)
        self.assertEqual(
            [e["event"] for e in self.server.recorder.named("websocket_opened")],
            ["websocket_opened", "websocket_opened"],
        )

    def test_oneTextMessageIsOneRequest(self) -> None:
        self.browser.send('{"type":"ping","id":1}')
        self.browser.send('{"type":"ping","id":"two"}')
        self.assertEqual(
            self.browser.dispatcher.requests,
            [b'{"type":"ping","id":1}', b'{"type":"ping","id":"two"}'],
        )
        self.assertEqual(
            self.browser.messages(),
            [{"type": "echo", "id": 1}, {"type": "echo", "id": "two"}],
        )

    def test_unicodeTravelsAsUTF8(self) -> None:
        self.browser.send('{"type":"say","text":"h\u00e9 \U0001f600"}')
        self.assertEqual(
            self.browser.dispatcher.requests,
            ['{"type":"say","text":"h\u00e9 \U0001f600"}'.encode()],
        )
        self.browser.dispatcher.channel.send(Outgoing({"text": "\u00e9\U0001f600"}))
        self.assertEqual(self.browser.messages()[-1], {"text": "\u00e9\U0001f600"})

    def test_aBroadcastIsEncodedOncePerFormat(self) -> None:
        other = self.server.connect()
        other.upgrade()
        made: list[str] = []

        class Counted(Outgoing):
            def form(self, name: str, make: Callable[..., Any]) -> Any:
                def counted(*args: Any) -> Any:
                    made.append(name)
                    return make(*args)

                return Outgoing.form(self, name, counted)

        outgoing = Counted({"type": "message", "n": 1}, {"type": "message", "n": 2})
        self.browser.dispatcher.channel.send(outgoing)
        other.dispatcher.channel.send(outgoing)
        self.assertEqual(made, ["ws"])
        self.assertEqual(
            self.browser.messages(),
            [{"type": "message", "n": 1}, {"type": "message", "n": 2}],
        )
        self.assertEqual(len(other.messages()), 2)

    def test_aMessageOfTheMaximumIsAccepted(self) -> None:
        text = '{"type":"x","p":"' + "a" * (100 - 19) + '"}'
        self.assertEqual(len(text), 100)
        self.browser.send(text)
        self.assertEqual(self.browser.dispatcher.requests, [text.encode()])

    def test_anOversizedMessageIsRefusedAtItsHeader(self) -> None:
        self.browser.dispatcher.answer = True
        before = '{"type":"ping","id":1}'
        assert self.browser.ws is not None
        data = self.browser.ws.send(TextMessage(before))
        # Only the header of a 101-byte message, and bytes after it.
        header = maskedFrame(0x1, b"a" * 101)[:6]
        self.browser.sendRaw(data + header + b"more bytes that are never read")
        dispatcher = self.browser.dispatcher
        self.assertEqual(dispatcher.requests, [before.encode()])
        self.assertEqual(
            dispatcher.closedWith,
            [("frame_too_long", "a 101-byte message is over the 100-byte limit")],
        )
        messages = self.browser.messages()
        self.assertEqual(messages[0], {"type": "echo", "id": 1})
        self.assertEqual(messages[1]["code"], "frame_too_long")
        self.assertEqual(self.browser.closeCode(), 1009)
        self.assertTrue(self.browser.transport.disconnecting)
        [event] = self.server.recorder.named(events.FRAME_TOO_LONG)
        self.assertEqual((event["length"], event["limit"]), (101, 100))

    def test_aFragmentedMessageCountsWhole(self) -> None:
        self.browser.sendRaw(
            maskedFrame(0x1, b'{"type":', final=False) + maskedFrame(0x0, b'"ping"}')
        )
        self.assertEqual(self.browser.dispatcher.requests, [b'{"type":"ping"}'])
        self.browser.sendRaw(
            maskedFrame(0x1, b"a" * 60, final=False) + maskedFrame(0x0, b"a" * 41)
        )
        self.assertEqual(self.browser.closeCode(), 1009)
        self.assertEqual(len(self.browser.dispatcher.requests), 1)

    def test_everySplitOfTheBytesWorks(self) -> None:
        assert self.browser.ws is not None
        self.browser.dispatcher.answer = False
        texts = ['{"type":"ping","id":%d}' % i for i in range(3)] + ["x" * 100]
        data = b"".join(self.browser.ws.send(TextMessage(t)) for t in texts)
        for size in (1, 2, 3, 7):
            for i in range(0, len(data), size):
                self.browser.sendRaw(data[i : i + size])
        requests = self.browser.dispatcher.requests
        self.assertEqual(requests, [t.encode() for t in texts] * 4)

    def test_aBinaryMessageClosesWith1003(self) -> None:
        assert self.browser.ws is not None
        self.browser.sendRaw(self.browser.ws.send(BytesMessage(b'{"type":"ping"}')))
        self.assertEqual(self.browser.dispatcher.requests, [])
        self.assertEqual(self.browser.messages()[0]["code"], "bad_request")
        self.assertEqual(self.browser.closeCode(), 1003)

    def test_invalidUTF8ClosesWith1007(self) -> None:
        self.browser.sendRaw(maskedFrame(0x1, b'{"type":"\xff"}'))
        self.assertEqual(self.browser.dispatcher.requests, [])
        self.assertEqual(self.browser.closeCode(), 1007)
        self.assertTrue(self.browser.transport.disconnecting)

    def test_aMessageMayComeInUpToMaxFragments(self) -> None:
        frames = [maskedFrame(0x1, b'"', final=False)]
        frames += [maskedFrame(0x0, b"x", final=False)] * (MAX_FRAGMENTS - 2)
        frames.append(maskedFrame(0x0, b'"'))
        self.browser.dispatcher.answer = False
        self.browser.sendRaw(b"".join(frames))
        self.assertEqual(
            self.browser.dispatcher.requests,
            [b'"' + b"x" * (MAX_FRAGMENTS - 2) + b'"'],
        )
        self.assertFalse(self.browser.transport.disconnecting)

    def test_aMessageInMoreFragmentsClosesWith1008(self) -> None:
        """
        Requests before it are answered; at the header of the fragment
        past L{MAX_FRAGMENTS}, C{bad_request} and a close (1008); nothing
        after it is read.
        """
        assert self.browser.ws is not None
        before = self.browser.ws.send(TextMessage('{"type":"ping","id":1}'))
        frames = [maskedFrame(0x1, b"", final=False)]
        frames += [maskedFrame(0x0, b"", final=False)] * MAX_FRAGMENTS
        self.browser.sendRaw(before + b"".join(frames) + maskedFrame(0x0, b"{}"))
        self.assertEqual(self.browser.dispatcher.requests, [b'{"type":"ping","id":1}'])
        messages = self.browser.messages()
        self.assertEqual(messages[0], {"type": "echo", "id": 1})
        self.assertEqual(messages[1]["code"], "bad_request")
        self.assertIn(f"at most {MAX_FRAGMENTS} frames", messages[1]["message"])
        self.assertEqual(self.browser.closeCode(), 1008)
        self.assertEqual(len(self.server.recorder.named(WEBSOCKET_TOO_FRAGMENTED)), 1)

    def test_controlFramesHaveARate(self) -> None:
        """
        L{CONTROL_FRAME_BURST} pings (or pongs) at once, then
        L{CONTROL_FRAME_RATE} a second; past that, C{bad_request} and a
        close (1008), without parsing the frame.
        """
        self.browser.sendRaw(maskedFrame(0x9, b"p") * CONTROL_FRAME_BURST)
        pongs = [e for e in self.browser.receive() if isinstance(e, Pong)]
        self.assertEqual(len(pongs), CONTROL_FRAME_BURST)
        self.server.clock.advance(1)
        self.browser.sendRaw(maskedFrame(0xA, b"") * int(CONTROL_FRAME_RATE))
        self.assertFalse(self.browser.transport.disconnecting)
        self.browser.sendRaw(maskedFrame(0x9, b"p"))
        self.assertEqual(self.browser.messages()[0]["code"], "bad_request")
        self.assertEqual(self.browser.closeCode(), 1008)
        self.assertEqual(len(self.server.recorder.named(WEBSOCKET_CONTROL_FLOOD)), 1)

    def test_aFragmentedMessageThatKeepsTheRateIsNotCut(self) -> None:
        """
        The deadline of a fragmented message is that of one frame of its
        size (C{--frame-timeout} plus its bytes at C{--frame-min-rate}),
        from its first fragment: a message sent at a good pace arrives.
        """
        self.browser.dispatcher.answer = False
        self.browser.sendRaw(maskedFrame(0x1, b"[0", final=False))
        for _ in range(5):
            self.server.clock.advance(10)
            self.browser.sendRaw(maskedFrame(0x9, b"") + maskedFrame(0x0, b",0", False))
        self.browser.sendRaw(maskedFrame(0x0, b"]"))
        self.assertEqual(self.browser.dispatcher.requests, [b"[0,0,0,0,0,0]"])
        self.server.clock.advance(60)  # nothing is in progress now
        self.assertIsNone(self.browser.closeCode())

    def test_anUnfinishedMessageTimesOutWithFrameTimeout(self) -> None:
        self.browser.sendRaw(maskedFrame(0x1, b"[", final=False))
        for _ in range(7):
            self.server.clock.advance(10)
            self.browser.sendRaw(maskedFrame(0x0, b"0", final=False))
        [error] = self.browser.messages()
        self.assertEqual(error["code"], "frame_timeout")
        self.assertEqual(self.browser.closeCode(), 1008)

    def test_pingIsAnswered(self) -> None:
        assert self.browser.ws is not None
        self.browser.sendRaw(self.browser.ws.send(Ping(b"hi")))
        self.assertIn(Pong(b"hi"), self.browser.receive())

    def test_thePeersCloseIsAnswered(self) -> None:
        assert self.browser.ws is not None
        self.browser.sendRaw(self.browser.ws.send(CloseConnection(1000)))
        self.assertEqual(self.browser.closeCode(), 1000)
        self.assertTrue(self.browser.transport.disconnecting)
        # Bytes after it are not read.
        self.browser.sendRaw(maskedFrame(0x1, b'{"type":"ping"}'))
        self.assertEqual(self.browser.dispatcher.requests, [])

    def test_closeAfterFlushSendsACloseFrame(self) -> None:
        channel = self.browser.dispatcher.channel
        channel.closeAfterFlush()
        self.assertTrue(channel.closing)
        self.assertEqual(self.browser.closeCode(), 1000)
        self.assertTrue(self.browser.transport.disconnecting)
        channel.send(Outgoing({"type": "late"}))  # dropped, no error
        self.assertEqual(self.browser.messages(), [])

    def test_connectionLostReachesTheDispatcher(self) -> None:
        dispatcher = self.browser.dispatcher
        self.browser.connection.connectionLost()
        self.assertTrue(dispatcher.lost)
        self.assertTrue(dispatcher.channel.lost)
        self.assertEqual(self.server.factory.connections, set())
        self.assertEqual(self.server.web.connections, set())

    def test_idleTimeout(self) -> None:
        self.server.clock.advance(299)
        self.assertEqual(self.browser.messages(), [])
        self.server.clock.advance(10)
        [error] = self.browser.messages()
        self.assertEqual(error["code"], "idle_timeout")
        self.assertEqual(self.browser.closeCode(), 1000)
        self.assertTrue(self.browser.server.recorder.named(events.IDLE_TIMEOUT))

    def test_aFrameHeaderHasItsDeadline(self) -> None:
        self.browser.sendRaw(b"\x81")  # one byte of a header, then nothing
        self.server.clock.advance(15)
        [error] = self.browser.messages()
        self.assertEqual(error["code"], "frame_timeout")
        self.assertEqual(self.browser.closeCode(), 1008)

    def test_aSlowFrameIsNotCutWhileItKeepsTheRate(self) -> None:
        self.browser.dispatcher.answer = False
        frame = maskedFrame(0x1, b"x" * 100)
        self.browser.sendRaw(frame[:10])
        for i in range(10, len(frame)):
            self.server.clock.advance(0.5)
            self.browser.sendRaw(frame[i : i + 1])
        self.assertEqual(self.browser.closeCode(), None)
        self.assertEqual(len(self.browser.dispatcher.requests), 1)

    def test_aSlowConsumerIsCutOff(self) -> None:
        connection = self.browser.connection
        connection.output.pauseProducing()  # the send buffer is full
        channel = self.browser.dispatcher.channel
        for _ in range(200):
            channel.send(Outgoing({"type": "message", "text": "x" * 10_000}))
            if self.browser.transport.disconnected:
                break
        self.assertTrue(self.browser.transport.disconnected)  # aborted
        self.assertEqual(self.server.factory.stats.slowConsumers, 1)
        [event] = self.server.recorder.named(events.SLOW_CONSUMER)
        self.assertEqual(event["peer"], "127.0.0.2:40000")

    def test_outputBacklogStopsReadingUntilDrained(self) -> None:
        connection = self.browser.connection
        connection.output.pauseProducing()
        channel = self.browser.dispatcher.channel
        channel.send(Outgoing({"type": "message"}))
        self.assertTrue(channel.outputCongested)
        self.assertEqual(self.browser.transport.producerState, "paused")
        connection.output.resumeProducing()
        self.assertFalse(channel.outputCongested)
        self.assertEqual(self.browser.transport.producerState, "producing")
        self.assertEqual(self.browser.dispatcher.drained, 1)

    def test_messagesWaitWhileTheQueueIsFull(self) -> None:
        dispatcher = self.browser.dispatcher
        channel = dispatcher.channel
        assert self.browser.ws is not None
        dispatcher.full = True
        channel.pauseReading(QUEUE_FULL)
        self.assertEqual(self.browser.transport.producerState, "paused")
        # The rest of a read that was under way arrives anyway: held.
        self.browser.sendRaw(
            b"".join(
                self.browser.ws.send(TextMessage(f'{{"n":{i}}}')) for i in range(3)
            )
        )
        self.assertEqual(dispatcher.requests, [])
        dispatcher.full = False
        channel.resumeReading(QUEUE_FULL)
        self.assertEqual(dispatcher.requests, [b'{"n":0}', b'{"n":1}', b'{"n":2}'])
        self.assertEqual(self.browser.transport.producerState, "producing")

    def test_aCloseWaitsBehindHeldMessages(self) -> None:
        dispatcher = self.browser.dispatcher
        channel = dispatcher.channel
        assert self.browser.ws is not None
        dispatcher.full = True
        channel.pauseReading(QUEUE_FULL)
        self.browser.sendRaw(
            self.browser.ws.send(TextMessage('{"n":1}'))
            + maskedFrame(0x1, b"x" * 101)[:6]
        )
        self.assertEqual(dispatcher.closedWith, [])
        dispatcher.full = False
        channel.resumeReading(QUEUE_FULL)
        self.assertEqual(dispatcher.requests, [b'{"n":1}'])
        self.assertEqual(dispatcher.closedWith[0][0], "frame_too_long")

    def test_serverShutdown(self) -> None:
        d = self.server.web.closeAll(timeout=3.0)
        [error] = self.browser.messages()
        self.assertEqual(error["code"], "server_shutdown")
        self.assertEqual(self.browser.closeCode(), 1001)
        self.browser.connection.connectionLost()
        self.assertIsNone(self.successResultOf(d))

    def test_shutdownAbortsThoseThatDoNotGo(self) -> None:
        d = self.server.web.closeAll(timeout=3.0)
        self.assertNoResult(d)
        self.server.clock.advance(3)
        self.assertTrue(self.browser.transport.disconnected)

    def test_halfCloseAnswersThenCloses(self) -> None:
        self.browser.send('{"type":"ping","id":9}')
        self.browser.connection.readConnectionLost()
        self.assertEqual(self.browser.dispatcher.closedWith, [(None, "")])
        self.assertEqual(self.browser.messages(), [{"type": "echo", "id": 9}])
        self.assertEqual(self.browser.closeCode(), 1000)

    def test_noTokenOrTextInTheLog(self) -> None:
        self.browser.send('{"type":"resume","token":"TOKEN-abc123","id":1}')
        self.browser.send('{"type":"say","room":"r","text":"SECRET words"}')
        self.browser.dispatcher.channel.send(
            Outgoing({"type": "session", "token": "TOKEN-abc123"})
        )
        self.browser.dispatcher.channel.closeAfterFlush()
        self.browser.connection.connectionLost()
        logged = json.dumps(self.server.recorder.events, default=str)
        self.assertNotIn("TOKEN-abc123", logged)
        self.assertNotIn("SECRET", logged)


# -- the limits of the connection, HTTP side ------------------------------------------


class ConnectionLimitTests(SynchronousTestCase):
    def test_perAddressCapAnswers503(self) -> None:
        server = Server(maxConnectionsPerAddress=1)
        first = server.connect()
        second = server.connect(port=40001)
        code, headers, body = second.response()
        self.assertEqual(code, 503)
        self.assertIn(b"127.0.0.2 has its maximum of 1", body)
        self.assertTrue(second.transport.disconnecting)
        self.assertEqual(
            server.recorder.named(events.CONNECTION_REFUSED)[0]["peer"],
            "127.0.0.2:40001",
        )
        self.assertIn(first.connection, server.factory.connections)
        # Another address is still served.
        self.assertEqual(server.connect(host="127.0.0.3").get("/")[0], 200)

    def test_webAndOtherConnectionsShareTheServersCaps(self) -> None:
        server = Server(maxConnections=2)
        server.connect()
        server.connect(port=40001)
        third = server.connect(port=40002)
        self.assertEqual(third.response()[0], 503)

    def test_anHTTPRequestHasAHeaderDeadline(self) -> None:
        server = Server()
        browser = server.connect()
        browser.connection.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n")
        server.clock.advance(15)
        self.assertTrue(browser.transport.disconnected)
        self.assertTrue(server.recorder.named(events.FRAME_TIMEOUT))

    def test_anIdleKeepAliveConnectionIsClosed(self) -> None:
        server = Server(idleTimeout=30.0)
        browser = server.connect()
        self.assertEqual(browser.get("/")[0], 200)
        server.clock.advance(40)
        self.assertTrue(browser.transport.disconnecting)
        self.assertFalse(browser.transport.disconnected)  # closed, not aborted

    def test_aHugeRequestIsCutOff(self) -> None:
        server = Server()
        browser = server.connect()
        browser.connection.dataReceived(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n"
        )
        for _ in range(HTTP_REQUEST_LIMIT // 4096 + 2):
            if browser.transport.disconnected:
                break
            browser.connection.dataReceived(b"x" * 4096)
        self.assertTrue(browser.transport.disconnected)
        [event] = server.recorder.named(WEB_REQUEST_TOO_LONG)
        self.assertEqual(event["limit"], HTTP_REQUEST_LIMIT)


# -- the frame scanner -------------------------------------------------------------


class FrameScannerTests(SynchronousTestCase):
    def test_lengthEncodings(self) -> None:
        for size in (0, 1, 125, 126, 127, 65535, 65536, 70000):
            scanner = FrameScanner(maxLength=100_000)
            frame = maskedFrame(0x1, b"a" * size)
            self.assertIsNone(scanner.feed(frame))
            self.assertFalse(scanner.inFrame, size)
            self.assertEqual(scanner.frames, 1)

    def test_splitAnywhere(self) -> None:
        frames = [maskedFrame(0x1, b"a" * n) for n in (3, 130, 70000)]
        data = b"".join(frames)
        for cut in list(range(0, 20)) + [135, 136, 137, 140, 150, 160]:
            scanner = FrameScanner(maxLength=100_000)
            self.assertIsNone(scanner.feed(data[:cut]))
            self.assertIsNone(scanner.feed(data[cut:]))
            self.assertFalse(scanner.inFrame)
            self.assertEqual(scanner.frames, 3)

    def test_progressOfAFrame(self) -> None:
        scanner = FrameScanner(maxLength=1000)
        frame = maskedFrame(0x1, b"a" * 200)
        scanner.feed(frame[:3])
        self.assertTrue(scanner.inFrame)
        self.assertFalse(scanner.headerComplete)
        scanner.feed(frame[3:58])
        self.assertTrue(scanner.headerComplete)
        self.assertEqual(scanner.payloadReceived, 50)
        scanner.feed(frame[58:])
        self.assertFalse(scanner.inFrame)

    def test_tooLongAcrossFragmentsAndControlFramesBetween(self) -> None:
        scanner = FrameScanner(maxLength=100)
        ok = maskedFrame(0x1, b"a" * 60, final=False) + maskedFrame(0x9, b"ping")
        self.assertIsNone(scanner.feed(ok))
        last = maskedFrame(0x0, b"a" * 41)
        self.assertEqual(scanner.feed(b"pad"[:0] + last), 0)
        self.assertEqual(scanner.tooLong, 101)

    def test_aFragmentedMessageIsOneUnit(self) -> None:
        """
        The deadlines' unit: a frame, or a fragmented message with the
        control frames between its fragments.
        """
        scanner = FrameScanner(maxLength=1000)
        scanner.feed(maskedFrame(0x1, b"ab", final=False))
        self.assertTrue(scanner.inUnit)
        self.assertFalse(scanner.inFrame)
        scanner.feed(maskedFrame(0x9, b"p") + maskedFrame(0x0, b"cd", final=False))
        self.assertEqual((scanner.units, scanner.frames), (1, 3))
        self.assertEqual(scanner.unitPayload, 5)
        scanner.feed(maskedFrame(0x0, b"e"))
        self.assertFalse(scanner.inUnit)
        scanner.feed(maskedFrame(0x9, b""))
        self.assertEqual((scanner.units, scanner.unitPayload), (2, 0))

    def test_refusedFragmentsAndControlFrames(self) -> None:
        scanner = FrameScanner(maxLength=1000, maxFragments=3)
        frames = maskedFrame(0x1, b"a", final=False) + maskedFrame(0x0, b"", False) * 2
        self.assertEqual(scanner.feed(frames + maskedFrame(0x0, b"")), len(frames))
        self.assertEqual(scanner.refused, TOO_FRAGMENTED)
        allowed = [True, False]
        scanner = FrameScanner(maxLength=1000, controlFrame=lambda: allowed.pop(0))
        ping = maskedFrame(0x9, b"")
        self.assertEqual(scanner.feed(ping + maskedFrame(0x1, b"x") + ping), 13)
        self.assertEqual(scanner.refused, CONTROL_FLOOD)

    def test_theOffsetIsWhereTheHeaderBegins(self) -> None:
        scanner = FrameScanner(maxLength=10)
        good = maskedFrame(0x1, b"a" * 10)
        self.assertEqual(scanner.feed(good + maskedFrame(0x2, b"b" * 11)), len(good))


# -- a real listener ---------------------------------------------------------------


class ListenerTests(TestCase):
    timeout = 30

    def makeService(self, description: str, **kw: Any) -> Any:
        factory = ServerFactory(clock=reactor, maxLength=1000)
        self.dispatchers: list[RecordingDispatcher] = []

        def make(channel: Any) -> RecordingDispatcher:
            d = RecordingDispatcher(channel)
            self.dispatchers.append(d)
            return d

        service = webService(description, factory, reactor, makeDispatcher=make, **kw)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        return service

    @defer.inlineCallbacks
    def test_servesThePageAndTheSocket(self):
        portFile = self.mktemp()
        service = self.makeService("tcp:0:interface=127.0.0.1", portFile=portFile)
        port = service.port.getHost().port
        with open(portFile) as f:
            self.assertEqual(int(f.read()), port)
        from twisted.web.client import Agent, readBody

        response = yield Agent(reactor).request(
            b"GET", f"http://127.0.0.1:{port}/".encode()
        )
        body = yield readBody(response)
        self.assertEqual(body, (STATIC / "index.html").read_bytes())
        reply = yield defer.ensureDeferred(self.roundTrip(f"ws://127.0.0.1:{port}/ws"))
        self.assertEqual(reply, {"type": "echo", "id": 7})

    @defer.inlineCallbacks
    def test_tls(self):
        from pathlib import Path

        from tests.test_e2e_auth import selfSignedCertificate

        directory = Path(self.mktemp())
        directory.mkdir()
        key, cert = selfSignedCertificate(directory)
        service = self.makeService(
            f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
        )
        port = service.port.getHost().port
        from twisted.internet import ssl
        from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, readBody

        authority = ssl.Certificate.loadPEM(cert.read_bytes())
        policy = BrowserLikePolicyForHTTPS(trustRoot=authority)
        response = yield Agent(reactor, contextFactory=policy).request(
            b"GET", f"https://localhost:{port}/".encode()
        )
        self.assertIn(
            b"wss://localhost:",
            response.headers.getRawHeaders(b"content-security-policy")[0],
        )
        yield readBody(response)
        reply = yield defer.ensureDeferred(
            self.roundTrip(f"wss://localhost:{port}/ws", policy)
        )
        self.assertEqual(reply, {"type": "echo", "id": 7})
        # A browser offers ALPN (h2 first): HTTP/1.1 is chosen, the handshake
        # does not fail.
        chosen = yield threads.deferToThread(self.handshakeWithALPN, cert, port)
        self.assertEqual(chosen, "http/1.1")

    @staticmethod
    def handshakeWithALPN(cert: Any, port: int) -> str | None:
        import socket
        import ssl as stdlibSSL

        context = stdlibSSL.create_default_context(cafile=str(cert))
        context.set_alpn_protocols(["h2", "http/1.1"])
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            return tls.selected_alpn_protocol()

    def test_aPortInUseFailsTheStart(self):
        service = self.makeService("tcp:0:interface=127.0.0.1")
        port = service.port.getHost().port
        factory = ServerFactory(clock=reactor)
        second = webService(
            f"tcp:{port}:interface=127.0.0.1",
            factory,
            reactor,
            makeDispatcher=RecordingDispatcher,
        )
        with self.assertRaises(SystemExit) as caught:
            second.privilegedStartService()
        self.assertIn("cannot listen on", str(caught.exception))

    async def roundTrip(self, url: str, policy: Any = None) -> dict[str, Any]:
        from twisted.web.websocket import WebSocketClientEndpoint

        received: defer.Deferred[str] = defer.Deferred()

        class Client:
            def negotiationStarted(self, transport: Any) -> None:
                self.transport = transport

            def negotiationFinished(self) -> None:
                self.transport.sendTextMessage('{"type":"ping","id":7}')

            def textMessageReceived(self, message: str) -> None:
                if not received.called:  # (then server_shutdown, maybe)
                    received.callback(message)
                    # (Twisted's loseConnection may be called only once.)
                    self.transport.loseConnection()

            def bytesMessageReceived(self, data: bytes | bytearray) -> None:
                pass

            def pongReceived(self, payload: bytes) -> None:
                pass

            def connectionLost(self, reason: Any) -> None:
                pass

        class ClientFactory:
            def buildProtocol(self, url: str) -> Client:
                return Client()

        kw = {"tlsPolicy": policy} if policy is not None else {}
        endpoint = WebSocketClientEndpoint.new(reactor, url, **kw)
        await endpoint.connect(ClientFactory())
        return json.loads(await received)


# -- the real chat service behind the socket ---------------------------------------


class ChatOverWebSocketTests(ServerHarness):
    """
    The chat service (on a MemoryStore and a Clock) answering WebSockets
    and Int32 connections at once: one service, one set of rules.
    """

    def setUp(self) -> None:
        super().setUp()
        self.factory = self.makeChat(messageBurst=3)
        self.dispatchers: list[Any] = []
        make = serviceDispatchers(self.factory)

        def record(channel: Any) -> Any:
            dispatcher = make(channel)
            self.dispatchers.append(dispatcher)
            return dispatcher

        self.web = WebFactory(self.factory, record, OriginPolicy(), self.clock)

    def browser(self, host: str = "127.0.0.5") -> Browser:
        address = IPv4Address("TCP", host, 50000)
        connection = self.web.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        connection.makeConnection(transport)
        self.addCleanup(
            lambda: connection.lost or connection.connectionLost(connectionDone)
        )
        browser = Browser(self, connection, transport)  # type: ignore[arg-type]
        self.assertIsInstance(browser.upgrade(), AcceptConnection)
        return browser

    def call(self, browser: Browser, *requests: dict[str, Any]) -> list[dict]:
        for request in requests:
            browser.send(json.dumps(request))
        self.flush()
        return browser.messages()

    def test_aBrowserAndATerminalInOneRoom(self) -> None:
        carol = self.user(self.factory, "carol")
        self.one(carol, {"type": "join", "room": "lobby"})
        alice = self.browser()
        got = self.call(
            alice,
            {"type": "register", "username": "alice", "password": PASSWORD, "id": 1},
            {"type": "login", "username": "alice", "password": PASSWORD, "id": 2},
            {"type": "join", "room": "lobby", "id": 3},
        )
        self.assertEqual([m["type"] for m in got], ["registered", "session", "joined"])
        self.assertEqual([m["id"] for m in got], [1, 2, 3])
        self.assertEqual(got[2]["members"], ["alice", "carol"])
        [presence] = self.received(carol, "presence")
        self.assertEqual((presence["user"], presence["event"]), ("alice", "join"))

        self.call(alice, {"type": "say", "room": "lobby", "text": "from the web"})
        self.send(carol, {"type": "say", "room": "lobby", "text": "from a terminal"})
        self.flush()
        fromWeb = [m for m in alice.events if isinstance(m, TextMessage)]
        web = [json.loads(m.data) for m in fromWeb] + alice.messages()
        inBrowser = [
            (m["seq"], m["from"], m["text"]) for m in web if m["type"] == "message"
        ]
        inTerminal = [
            (m["seq"], m["from"], m["text"]) for m in self.received(carol, "message")
        ]
        self.assertEqual(
            inBrowser, [(1, "alice", "from the web"), (2, "carol", "from a terminal")]
        )
        self.assertEqual(inTerminal, inBrowser)

        # Private messages both ways; errors are the same JSON.
        got = self.call(alice, {"type": "msg", "to": "carol", "text": "hi", "id": 4})
        self.assertEqual(got, [{"type": "sent", "to": "carol", "id": 4}])
        [private] = self.received(carol, "private")
        self.assertEqual((private["from"], private["text"]), ("alice", "hi"))
        got = self.call(alice, {"type": "msg", "to": "nobody", "text": "hi", "id": 5})
        self.assertEqual((got[0]["code"], got[0]["id"]), ("no_such_user", 5))
        alice.send("not json")
        alice.send('{"type":"dance","id":6}')
        got = alice.messages()
        self.assertEqual([m["code"] for m in got], ["bad_request", "unknown_type"])

    def test_oneUserOneBucketOnBothTransports(self) -> None:
        terminal = self.user(self.factory, "alice")
        self.one(terminal, {"type": "join", "room": "lobby"})
        web = self.browser()
        got = self.call(
            web,
            {"type": "resume", "token": self.tokens["alice"], "id": 1},
            {"type": "join", "room": "lobby", "id": 2},
        )
        self.assertEqual([m["type"] for m in got], ["session", "joined"])
        self.send(terminal, *[{"type": "say", "room": "lobby", "text": "t"}] * 2)
        got = self.call(
            web,
            {"type": "say", "room": "lobby", "text": "w", "id": 3},
            {"type": "say", "room": "lobby", "text": "w", "id": 4},
        )
        errors = [m for m in got if m["type"] == "error"]
        self.assertEqual([(e["code"], e["id"]) for e in errors], [("rate_limited", 4)])

    def test_aSessionEndedElsewhereReachesTheBrowser(self) -> None:
        self.user(self.factory, "alice")
        web = self.browser()
        self.call(web, {"type": "resume", "token": self.tokens["alice"]})
        other = self.login(self.factory, "alice")
        self.one(other, {"type": "logout"})
        self.clock.advance(2)
        got = web.messages()
        self.assertEqual([m.get("code") for m in got], ["session_revoked"])

    def test_connectionsCountOnTheChatServer(self) -> None:
        web = self.browser()
        self.assertIn(web.connection, self.factory.connections)
        self.assertEqual(self.factory.perAddress["127.0.0.5"], 1)
        web.connection.connectionLost(connectionDone)
        self.assertNotIn(web.connection, self.factory.connections)
        self.assertEqual(self.factory.perAddress.get("127.0.0.5"), None)


class TextFramesTests(SynchronousTestCase):
    """
    A broadcast's WebSocket frames are made once, by textFrames, and are
    the frames wsproto itself would send.
    """

    def test_theFramesAreWsprotosFrames(self) -> None:
        from wsproto import Connection as WSConnection
        from wsproto import ConnectionType
        from wsproto.events import TextMessage

        from twisted_lab.transports.web import textFrames

        server = WSConnection(ConnectionType.SERVER)
        for size in (0, 1, 125, 126, 127, 65535, 65536, 70000):
            text = ("é" * (size // 2)) + ("x" * (size % 2))
            payload = text.encode("utf-8")
            self.assertEqual(
                textFrames((payload,)), server.send(TextMessage(text)), size
            )
        two = textFrames((b'{"a":1}', b'{"b":2}'))
        self.assertEqual(
            two,
            server.send(TextMessage('{"a":1}')) + server.send(TextMessage('{"b":2}')),
        )

    def test_aBroadcastIsFramedOnce(self) -> None:
        from twisted_lab.codecs.message import Outgoing
        from twisted_lab.transports.web import textFrames

        calls = []

        def counting(payloads: tuple[bytes, ...]) -> bytes:
            calls.append(payloads)
            return textFrames(payloads)

        outgoing = Outgoing({"type": "message", "text": "hi"})
        first = outgoing.form("ws", counting)
        second = outgoing.form("ws", counting)
        self.assertIs(first, second)
        self.assertEqual(len(calls), 1)
