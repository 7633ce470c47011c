"""
Chat in the browser: the page, and the JSON protocol of C{docs/protocol.md}
over a WebSocket (section 4 there).

One listener (any endpoint string: C{tcp:8080:interface=127.0.0.1},
C{ssl:8443:privateKey=key.pem:certKey=cert.pem}) serves

  - C{/}: the page (C{twisted_lab/static}: HTML, CSS, JavaScript shipped in
    the package), with a Content-Security-Policy and the other security
    headers on every response;
  - C{/ws}: the WebSocket (RFC 6455, on wsproto), one text message per
    JSON message, behind an C{Origin} check.

Every TCP connection of the listener is a L{WebConnection}: a
L{ServedConnection} of the chat server's own L{ServerFactory}, so the
browser gets the limits of the Int32 transport from the same code and the
same counters (connection caps per server and per address, the idle
timeout, per-frame deadlines, one bounded output account with
C{slow_consumer}, and C{--max-length} per message).  Inside it runs a
twisted.web C{HTTPChannel} for the page and the upgrade; after the upgrade
the bytes go to a L{WebSocketWire} (wsproto's connection), watched on their
way by a L{FrameScanner} that refuses, at its header and before wsproto
parses it, an oversized message, a message in too many fragments and
control frames past their rate.  L{WebSocketChannel} is the
L{IRequestChannel} the request dispatcher and the chat service see.

Why not twisted.web.websocket's own C{WebSocketResource} and wire protocol
(as the first version did): it logs every handshake wsproto refuses (an
error line with the URL, or a critical traceback for a bad C{Host}) with no
budget; it gathers a fragmented text message into a Python string (a
concatenation per fragment, quadratic, and 4 bytes a character once one
character needs them); and it leaves the bytes that arrive with the
upgrade in the HTTP channel's buffer.  The handshake here is wsproto's own
C{H11Handshake}, run on the request's headers before anything is
answered, so what wsproto would refuse gets a C{400} and at most the
budgeted log line; the messages are gathered as UTF-8 bytes.

Nothing here logs a URL, a token or a message's text.  Events a client can
provoke at will (refused upgrades, the reasons a WebSocket is closed) pass
the server's log budget (C{docs/protocol.md} section 3.5).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import itertools
import re
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol
from urllib.parse import urlsplit

import h11
from twisted.internet import defer
from twisted.internet.interfaces import (
    IAddress,
    IProtocolNegotiationFactory,
    IReactorTime,
    ISSLTransport,
    ITransport,
)
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from wsproto import Connection as WSProtoConnection
from wsproto import ConnectionType
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    TextMessage,
)
from wsproto.handshake import H11Handshake
from wsproto.utilities import ProtocolError as WSProtoError
from zope.interface import directlyProvides, implementer, providedBy

from twisted_lab.codecs import events
from twisted_lab.codecs.errors import ErrorCode
from twisted_lab.codecs.message import Outgoing, encodeMessage
from twisted_lab.dispatch import QUEUE_FULL, RequestDispatcher
from twisted_lab.ports import IRequestChannel
from twisted_lab.services.limits import TokenBucket
from twisted_lab.transports.connection import (
    CLOSING,
    END_OF_INPUT,
    ServedConnection,
    ServerFactory,
    canonicalAddress,
)

# -- events of this transport (the C{event} field) ------------------------------

#: A WebSocket upgrade was refused: its C{Origin} is not allowed.
WEB_ORIGIN_REFUSED = events.WEB_ORIGIN_REFUSED
#: A WebSocket was opened (after the Origin check).
WEBSOCKET_OPENED = events.WEBSOCKET_OPENED
#: An HTTP request (headers and body) went over L{HTTP_REQUEST_LIMIT}.
WEB_REQUEST_TOO_LONG = events.WEB_REQUEST_TOO_LONG
#: A binary WebSocket message arrived (the protocol is JSON text).
WEBSOCKET_BINARY = events.WEBSOCKET_BINARY
#: A WebSocket upgrade wsproto would refuse (or with a body) got C{400}.
WEB_UPGRADE_REFUSED = events.WEB_UPGRADE_REFUSED
#: A message came in more than L{MAX_FRAGMENTS} frames.
WEBSOCKET_TOO_FRAGMENTED = events.WEBSOCKET_TOO_FRAGMENTED
#: Control frames (ping, pong, close) came faster than their rate.
WEBSOCKET_CONTROL_FLOOD = events.WEBSOCKET_CONTROL_FLOOD

# -- WebSocket close codes (RFC 6455 section 7.4.1) ------------------------------

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_POLICY_VIOLATION = 1008
CLOSE_MESSAGE_TOO_BIG = 1009

#: Bytes one HTTP request (request line, headers, body) may take: the page
#: needs no body, and twisted.web would otherwise buffer any body it is sent.
HTTP_REQUEST_LIMIT = 64 * 1024

#: HTTP requests one connection may make at once, and per second after
#: that (the rate of the C{ping} request; a page load is five requests).
#: Past it: C{429} and the connection closed.  Each request costs the
#: reactor about 40 microseconds however it is answered, and a client can
#: pipeline a thousand in one read.
HTTP_REQUEST_BURST = 500
HTTP_REQUEST_RATE = 50.0

SOCKET_PATH = b"ws"

#: Frames one message may come in.  A browser sends each message as one
#: frame; this leaves room for clients that fragment a large message.
#: Every frame costs wsproto's parsing whatever its size, and empty
#: continuation fragments would otherwise let a message grow no longer,
#: never end and cost the reactor without limit.
MAX_FRAGMENTS = 64

#: Control frames (ping, pong, close) a connection may send at once, and
#: per second after that: the rate of the C{ping} request (section 3.5).
#: Each is parsed (and a ping answered) without being a request, so no
#: request rate covers them.
CONTROL_FRAME_BURST = 500
CONTROL_FRAME_RATE = 50.0

#: How long browsers are told to use only https for the host (served
#: over TLS only): a year.
HSTS_MAX_AGE = 365 * 24 * 3600

_serials = itertools.count(1_000_000_001)


def nextSerial() -> int:
    """
    A connection number for per-connection rate buckets, from a range the
    Int32 transport's counter does not reach.
    """
    return next(_serials)


# -- the page ----------------------------------------------------------------------


@dataclass(frozen=True)
class StaticFile:
    """
    One file of the page, held in memory (they are small): its bytes, type
    and entity tag.
    """

    body: bytes
    contentType: bytes
    etag: bytes


#: URL path segment -> (file in twisted_lab/static, Content-Type).
STATIC_FILES: dict[bytes, tuple[str, bytes]] = {
    b"": ("index.html", b"text/html; charset=utf-8"),
    b"index.html": ("index.html", b"text/html; charset=utf-8"),
    b"app.js": ("app.js", b"text/javascript; charset=utf-8"),
    b"style.css": ("style.css", b"text/css; charset=utf-8"),
    b"favicon.svg": ("favicon.svg", b"image/svg+xml"),
}


def loadStaticFiles() -> dict[bytes, StaticFile]:
    """
    The page's files, read from the installed package.
    """
    folder = resources.files("twisted_lab").joinpath("static")
    loaded: dict[bytes, StaticFile] = {}
    for segment, (name, contentType) in STATIC_FILES.items():
        body = folder.joinpath(name).read_bytes()
        etag = b'"' + hashlib.sha256(body).hexdigest()[:32].encode("ascii") + b'"'
        loaded[segment] = StaticFile(body, contentType, etag)
    return loaded


_HOST = re.compile(
    r"^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}\])"
    r"(?::[0-9]{1,5})?$"
)


def requestHost(request: Request) -> str | None:
    """
    The request's C{Host} header, when it is a plain host[:port] (nothing
    that could end a header value or a CSP source), else L{None}.
    """
    raw = request.getHeader(b"host")
    if raw is None:
        return None
    try:
        host = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    return host if _HOST.match(host) else None


def contentSecurityPolicy(host: str | None, secure: bool) -> bytes:
    """
    The page's policy: everything from its own origin only, no inline
    script or style, no framing, and WebSocket connections to the page's
    own host (C{'self'} covers ws/wss in current browsers; the explicit
    source is for older ones).
    """
    connect = "'self'"
    if host is not None:
        connect += f" {'wss' if secure else 'ws'}://{host}"
    return (
        "default-src 'self'; script-src 'self'; style-src 'self'; "
        f"img-src 'self'; connect-src {connect}; object-src 'none'; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ).encode("ascii")


def setSecurityHeaders(request: Request) -> None:
    """
    The headers every response of the listener carries.
    """
    secure = request.isSecure()
    request.setHeader(
        b"content-security-policy",
        contentSecurityPolicy(requestHost(request), secure),
    )
    request.setHeader(b"x-content-type-options", b"nosniff")
    request.setHeader(b"referrer-policy", b"no-referrer")
    request.setHeader(b"x-frame-options", b"DENY")
    request.setHeader(b"cross-origin-opener-policy", b"same-origin")
    request.setHeader(b"cross-origin-resource-policy", b"same-origin")
    request.setHeader(
        b"permissions-policy", b"camera=(), microphone=(), geolocation=()"
    )
    request.setHeader(b"server", b"netlab")
    if secure:
        request.setHeader(b"strict-transport-security", b"max-age=%d" % HSTS_MAX_AGE)


class StaticResource(Resource):
    """
    One file of the page: GET and HEAD, with an entity tag (a reload asks
    again and gets C{304 Not Modified} while the file is unchanged).
    """

    isLeaf = True
    allowedMethods = (b"GET", b"HEAD")

    def __init__(self, static: StaticFile) -> None:
        super().__init__()
        self.static = static

    def render(self, request: Request) -> bytes:
        if request.method not in self.allowedMethods:
            # (Not twisted.web's HTML error page: a short plain answer.)
            request.setHeader(b"allow", b", ".join(self.allowedMethods))
            return _plain(request, 405, b"only GET and HEAD here\n")
        return super().render(request)

    def render_GET(self, request: Request) -> bytes:
        static = self.static
        request.setHeader(b"content-type", static.contentType)
        request.setHeader(b"cache-control", b"no-cache")
        if request.setETag(static.etag):  # CACHED: 304, no body
            return b""
        return static.body

    def render_HEAD(self, request: Request) -> bytes:
        body = self.render_GET(request)
        if body:
            request.setHeader(b"content-length", b"%d" % len(body))
        return b""


class NotFound(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return _body(request, b"not found\n")


class TooManyRequests(Resource):
    """
    The answer to a request over the connection's rate: C{429}, and the
    connection closed (a page makes a few requests a load; pipelined
    requests past the burst are a client hogging the reactor).
    """

    isLeaf = True

    def render(self, request: Request) -> bytes:
        request.setHeader(b"connection", b"close")
        request.setHeader(b"retry-after", b"1")
        connection = connectionOf(request)
        if connection is not None:
            # Once this answer is written (the channel keeps reading
            # pipelined requests otherwise).
            request.notifyFinish().addBoth(lambda _: connection.closeAfterFlush())
        return _plain(request, 429, b"too many requests on this connection\n")


TOO_MANY_REQUESTS = TooManyRequests()


class WebRoot(Resource):
    """
    C{/} and the page's files, C{/ws}, and 404 for anything else.
    """

    def __init__(self, files: dict[bytes, StaticFile], socket: Resource) -> None:
        super().__init__()
        self.files = {name: StaticResource(f) for name, f in files.items()}
        self.socket = socket
        self.notFound = NotFound()

    def getChild(self, path: bytes, request: Request) -> Resource:
        if request.postpath:  # anything below a file: /app.js/x
            return self.notFound
        if path == SOCKET_PATH:
            return self.socket
        return self.files.get(path, self.notFound)

    def render(self, request: Request) -> bytes:
        return self.notFound.render(request)


# -- the Origin check --------------------------------------------------------------

_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalizeOrigin(text: str) -> str:
    """
    An origin as browsers send it (C{scheme://host[:port]}, lower case, no
    default port), or L{ValueError} for anything that is not one.
    """
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError as e:
        raise ValueError(f"{text!r} is not an origin ({e})") from None
    scheme = parts.scheme.lower()
    host = parts.hostname
    if (
        scheme not in _DEFAULT_PORTS
        or not host
        or parts.username is not None
        or parts.password is not None
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
    ):
        raise ValueError(
            f"{text!r} is not an origin: expected scheme://host[:port], "
            "with http or https"
        )
    if ":" in host:
        host = f"[{host}]"
    if port is None or port == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


class OriginPolicy:
    """
    Which pages may open the WebSocket.

    With no origins configured, only the page's own origin: the scheme the
    request came in on and its C{Host}.  With C{--web-origin}, exactly the
    origins listed (list the page's public origin too: behind a proxy that
    terminates TLS, or to pin the names a browser may use).

    A request without an C{Origin} header is not from a browser page (every
    browser sends one with a WebSocket); it is let through, since a program
    can send any header it likes anyway: the check protects users' browsers
    from other sites' pages, it does not authenticate anyone.
    """

    def __init__(self, allowed: Iterable[str] = ()) -> None:
        self.allowed = frozenset(normalizeOrigin(o) for o in allowed)

    def ownOrigin(self, request: Request) -> str | None:
        host = requestHost(request)
        if host is None:
            return None
        scheme = "https" if request.isSecure() else "http"
        try:
            return normalizeOrigin(f"{scheme}://{host}")
        except ValueError:
            return None

    def allows(self, request: Request, origin: str) -> bool:
        try:
            normal = normalizeOrigin(origin)
        except ValueError:
            return False  # "null" (sandboxed frames, file:), garbage
        if self.allowed:
            return normal in self.allowed
        return normal == self.ownOrigin(request)


def _printable(value: bytes, limit: int = 200) -> str:
    """
    A header value for a log line: ASCII, printable, bounded.
    """
    text = value[:limit].decode("ascii", "replace")
    return "".join(c if " " <= c <= "~" else "?" for c in text)


# -- the WebSocket ---------------------------------------------------------------


class Dispatcher(Protocol):
    """
    What L{WebSocketChannel} needs of the request dispatcher
    (L{twisted_lab.dispatch.RequestDispatcher}).
    """

    @property
    def queueFull(self) -> bool: ...

    def requestReceived(self, payload: bytes) -> None: ...

    def closeWith(self, code: str | None = None, message: str = "") -> None: ...

    def endOfInput(self) -> None: ...

    def outputDrained(self) -> None: ...

    def connectionLost(self) -> None: ...


#: Makes the dispatcher (and the service's handler behind it) of a channel.
DispatcherFactory = Callable[[IRequestChannel], Dispatcher]


def textFrames(payloads: tuple[bytes, ...]) -> bytes:
    """
    UTF-8 JSON payloads as WebSocket text frames (RFC 6455 section 5.2),
    in one string.  A server's frames are not masked and no extension is
    negotiated, so the frames of a broadcast are the same bytes for every
    member: made once per L{Outgoing}, not once per connection by wsproto.
    """
    frames = []
    for payload in payloads:
        size = len(payload)
        if size < 126:
            header = bytes((0x81, size))
        elif size < 1 << 16:
            header = bytes((0x81, 126)) + size.to_bytes(2, "big")
        else:
            header = bytes((0x81, 127)) + size.to_bytes(8, "big")
        frames.append(header)
        frames.append(payload)
    return b"".join(frames)


@dataclass(frozen=True)
class _Close:
    """
    Held in order behind messages not yet handed over: close (with an
    error C{code} first, if any) once they have been answered.
    """

    code: str | None = None
    message: str = ""


@implementer(IRequestChannel)
class WebSocketChannel:
    """
    One browser's WebSocket: its L{WebSocketWire} on one side, the
    L{IRequestChannel} of the request dispatcher on the other.

    Each text message is one request; each message sent is one text
    message.  While the dispatcher's queue is full, messages that arrive
    in the same read are held here (at most one read's worth: reading has
    stopped) and handed over, in order, as it drains.
    """

    transport: WebSocketWire | None = None
    dispatcher: Dispatcher | None = None
    #: The code of the close frame this side sends when it closes.
    closeCode = CLOSE_NORMAL
    #: A close frame was sent (or the peer's was answered).
    closeSent = False
    _releasing = False

    def __init__(self, connection: WebConnection, makeDispatcher: DispatcherFactory):
        self.connection = connection
        self.makeDispatcher = makeDispatcher
        self.serial = nextSerial()
        self._held: deque[bytes | _Close] = deque()

    # -- IRequestChannel -----------------------------------------------------------

    @property
    def peer(self) -> str:
        return self.connection.peer

    @property
    def group(self) -> str:
        return self.connection.group

    @property
    def address(self) -> str:
        host = getattr(self.connection.transport.getPeer(), "host", None)
        return canonicalAddress(host) if host else ""

    @property
    def lost(self) -> bool:
        return self.connection.lost

    @property
    def outputCongested(self) -> bool:
        return self.connection.outputCongested

    @property
    def closing(self) -> bool:
        connection = self.connection
        return bool(
            connection.lost or self.closeSent or connection.transport.disconnecting
        )

    def send(self, outgoing: Outgoing) -> None:
        transport = self.transport
        if transport is None or self.closing:
            return
        transport.sendFrames(outgoing.form("ws", textFrames))
        self.connection.factory.stats.framesSent += len(outgoing)

    def sendMessage(self, message: dict[str, Any]) -> None:
        self.send(Outgoing(message))

    def pauseReading(self, reason: str) -> None:
        self.connection.pauseReading(reason)

    def resumeReading(self, reason: str) -> None:
        if reason == QUEUE_FULL:
            if self._releasing:
                return  # handing over held messages: the loop below goes on
            self._releasing = True
            try:
                self._release()
            finally:
                self._releasing = False
            if self._held:
                return  # still full: resumed again as it drains
        self.connection.resumeReading(reason)

    def closeAfterFlush(self) -> None:
        self.connection.closeAfterFlush()

    # -- what its wire tells it -------------------------------------------------------

    def opened(self) -> None:
        """
        The 101 response is written: the WebSocket is open.
        """
        self.connection.log.info(
            "WebSocket opened by {peer}",
            event=WEBSOCKET_OPENED,
            peer=self.peer,
        )
        self.dispatcher = self.makeDispatcher(self)

    def messageReceived(self, payload: bytes) -> None:
        """
        A whole text message, as UTF-8 (valid: wsproto checked it).
        """
        if (
            self.closing
            or self.dispatcher is None
            or self.connection.readingPausedFor(CLOSING)
        ):
            return
        if self._held or self.dispatcher.queueFull:
            self._held.append(payload)
            return
        self.dispatcher.requestReceived(payload)

    def binaryReceived(self) -> None:
        """
        A binary message began (its bytes are not kept).
        """
        if self.closing:
            return
        log = self.connection.log
        if self.connection.factory.logBudget.admit(WEBSOCKET_BINARY):
            log.info(
                "{peer} sent a binary message; closing",
                event=WEBSOCKET_BINARY,
                peer=self.peer,
            )
        self.closeCode = CLOSE_UNSUPPORTED_DATA
        self.closeWith(
            ErrorCode.BAD_REQUEST,
            "binary messages are not part of the protocol: send JSON as text",
        )

    def connectionLost(self, reason: Failure) -> None:
        self._held.clear()
        if self.dispatcher is not None:
            self.dispatcher.connectionLost()

    # -- what the connection tells it ------------------------------------------------

    def closeWith(self, code: str | None = None, message: str = "") -> None:
        """
        After every message received so far is answered, send an C{error}
        C{code} (if any) and close.
        """
        dispatcher = self.dispatcher
        if dispatcher is None:
            self.closeAfterFlush()
        elif self._held:
            self._held.append(_Close(code, message))
        else:
            dispatcher.closeWith(code, message)

    def messageTooLong(self, length: int, limit: int) -> None:
        """
        A frame header announced a message over C{limit} bytes: nothing
        after it is read; what came before is answered, then
        C{frame_too_long} and a close with 1009.
        """
        self.refuse(
            CLOSE_MESSAGE_TOO_BIG,
            ErrorCode.FRAME_TOO_LONG,
            f"a {length}-byte message is over the {limit}-byte limit",
        )

    def refuse(self, closeCode: int, code: str, message: str) -> None:
        """
        Nothing after the frame header now read is read: what came before
        is answered, then an C{error} C{code} and a close with C{closeCode}.
        """
        self.closeCode = closeCode
        self.connection.startCloseTimer()
        self.closeWith(code, message)

    def endOfInput(self) -> None:
        self.closeWith()

    def outputDrained(self) -> None:
        if self.dispatcher is not None:
            self.dispatcher.outputDrained()

    def _release(self) -> None:
        held = self._held
        dispatcher = self.dispatcher
        while held and dispatcher is not None and not dispatcher.queueFull:
            item = held.popleft()
            if isinstance(item, _Close):
                held.clear()
                dispatcher.closeWith(item.code, item.message)
                return
            dispatcher.requestReceived(item)


#: Why L{FrameScanner.feed} stopped at a header.
TOO_LONG = "too long"
TOO_FRAGMENTED = "too fragmented"
CONTROL_FLOOD = "control flood"


def _headerSize(second: int) -> int:
    """
    The size of a frame header, from its second byte.
    """
    size = 6 if second & 0x80 else 2
    short = second & 0x7F
    if short == 126:
        return size + 2
    if short == 127:
        return size + 8
    return size


def _announced(buffer: bytes | bytearray, at: int) -> int:
    """
    The payload length of the frame header at C{buffer[at:]} (complete).
    """
    short = buffer[at + 1] & 0x7F
    if short == 126:
        return (buffer[at + 2] << 8) | buffer[at + 3]
    if short == 127:
        return int.from_bytes(buffer[at + 2 : at + 10], "big")
    return short


class FrameScanner:
    """
    Reads WebSocket frame headers (RFC 6455 section 5.2) as the client's
    bytes pass by on their way to wsproto, without keeping any payload and
    reading each byte once (offsets into the read, no copies of its rest).

    It knows where the frame in progress is and where the I{unit} in
    progress is (a frame, or a fragmented message from its first frame to
    its final one, with the control frames between), for the deadlines;
    and it stops at the header of a data frame that would take a message
    over C{maxLength} bytes or past C{maxFragments} frames, or of a
    control frame that C{controlFrame()} does not allow, before wsproto
    parses any of it.
    """

    def __init__(
        self,
        maxLength: int,
        maxFragments: int = MAX_FRAGMENTS,
        controlFrame: Callable[[], bool] | None = None,
    ) -> None:
        self.maxLength = maxLength
        self.maxFragments = maxFragments
        self.controlFrame = controlFrame
        #: A header split across reads: its bytes so far.
        self._header = bytearray()
        self._headerStart = 0
        #: Payload bytes of the frame in progress still to come.
        self.remaining = 0
        #: Payload bytes of the frame in progress received so far.
        self.payloadReceived = 0
        #: Data bytes announced so far for the message in progress.
        self.messageLength = 0
        #: Data frames of the message in progress.
        self.fragments = 0
        #: A data message is begun and its final frame not yet seen.
        self.inMessage = False
        #: Frames begun so far (a new number: a new frame).
        self.frames = 0
        #: Units begun so far, and the unit in progress: payload bytes
        #: received, and whether its first header is complete.
        self.units = 0
        self.unitPayload = 0
        self.unitHeaderComplete = False
        #: Why the scanner stopped (L{TOO_LONG}, L{TOO_FRAGMENTED},
        #: L{CONTROL_FLOOD}), once it has.
        self.refused: str | None = None
        #: The announced length of the oversized message, once found.
        self.tooLong = 0

    @property
    def inFrame(self) -> bool:
        return bool(self._header) or self.remaining > 0

    @property
    def headerComplete(self) -> bool:
        return not self._header

    @property
    def inUnit(self) -> bool:
        return self.inMessage or self.inFrame

    def feed(self, data: bytes) -> int | None:
        """
        Scan C{data}; the offset in it where the header of a refused frame
        begins (everything before it may be handed on; L{refused} says
        why), or L{None}.
        """
        i = 0
        end = len(data)
        header = self._header
        while i < end:
            remaining = self.remaining
            if remaining:
                take = remaining if remaining <= end - i else end - i
                self.remaining = remaining - take
                self.payloadReceived += take
                self.unitPayload += take
                i += take
                continue
            if header:  # the rest of a header begun in an earlier read
                if len(header) < 2:
                    header.append(data[i])
                    i += 1
                    continue
                need = _headerSize(header[1]) - len(header)
                take = need if need <= end - i else end - i
                header += data[i : i + take]
                i += take
                if take < need:
                    break
                first = header[0]
                length = _announced(header, 0)
                header.clear()
                if not self._frame(first, length):
                    return max(0, self._headerStart)
                continue
            # A new frame.
            self.frames += 1
            self.payloadReceived = 0
            if not self.inMessage:
                self.units += 1
                self.unitPayload = 0
                self.unitHeaderComplete = False
            self._headerStart = i
            if end - i >= 2:
                size = _headerSize(data[i + 1])
                if end - i >= size:
                    first = data[i]
                    length = _announced(data, i)
                    if not self._frame(first, length):
                        return i
                    i += size
                    continue
            header += data[i:end]  # (less than a header: at most 13 bytes)
            break
        if header:
            self._headerStart = -1  # begun in an earlier read
        return None

    def _frame(self, first: int, length: int) -> bool:
        """
        A complete header: whether the frame may be read.
        """
        self.unitHeaderComplete = True
        opcode = first & 0x0F
        if opcode >= 0x8:  # close, ping, pong
            if self.controlFrame is not None and not self.controlFrame():
                self.refused = CONTROL_FLOOD
                return False
        else:  # continuation, text, binary
            if opcode:
                total = length
                self.fragments = 1
            else:
                total = self.messageLength + length
                self.fragments += 1
            if total > self.maxLength:
                self.refused = TOO_LONG
                self.tooLong = total
                return False
            if self.fragments > self.maxFragments:
                self.refused = TOO_FRAGMENTED
                return False
            if first & 0x80:  # final
                self.messageLength = 0
                self.fragments = 0
                self.inMessage = False
            else:
                self.messageLength = total
                self.inMessage = True
        self.remaining = length
        return True


class WebSocketWire:
    """
    The server side of one WebSocket on wsproto, after the upgrade: bytes
    in, events out to its L{WebSocketChannel}; text out.

    A text message is gathered as UTF-8 bytes (wsproto checks and decodes
    each chunk; it is encoded back at once), so an unfinished message holds
    its own size; a binary message is refused at its first chunk and
    never kept.  Pings are answered, pongs ignored, the peer's close is
    answered and the connection closed.
    """

    def __init__(
        self,
        connection: WebConnection,
        wsproto: WSProtoConnection,
        websocket: WebSocketChannel,
    ) -> None:
        self.connection = connection
        self.wsproto = wsproto
        self.websocket = websocket
        self._message = bytearray()
        self._binary = False

    @property
    def open(self) -> bool:
        return self.wsproto.state is ConnectionState.OPEN

    def dataReceived(self, data: bytes) -> None:
        wsproto = self.wsproto
        if wsproto.state not in (ConnectionState.OPEN, ConnectionState.LOCAL_CLOSING):
            return  # (wsproto raises for bytes after a close)
        wsproto.receive_data(data)
        websocket = self.websocket
        for event in wsproto.events():
            if isinstance(event, TextMessage):
                self._message += event.data.encode("utf-8")
                if event.message_finished:
                    payload = bytes(self._message)
                    self._message = bytearray()
                    websocket.messageReceived(payload)
            elif isinstance(event, BytesMessage):
                if not self._binary:
                    self._binary = True
                    websocket.binaryReceived()
            elif isinstance(event, Ping):
                if self.open:
                    self.connection.write(wsproto.send(event.response()))
            elif isinstance(event, CloseConnection):
                # The peer's close, or wsproto's verdict on a frame it
                # could not parse (1002, 1007): answered with its code.
                websocket.closeSent = True
                if wsproto.state in (
                    ConnectionState.OPEN,
                    ConnectionState.REMOTE_CLOSING,
                ):
                    self.connection.write(wsproto.send(event.response()))
                self._message = bytearray()
                self.connection.closeAfterFlush()
                return  # nothing after a close is read
            # (Pong: nothing to do; its rate is the scanner's.)

    def sendFrames(self, frames: bytes) -> None:
        """
        Write text frames made by L{textFrames} (shared by every member of
        a broadcast).
        """
        if self.open:
            self.connection.write(frames)

    def sendClose(self, code: int) -> None:
        """
        Send a close frame with C{code}, if one may still be sent.
        """
        if self.wsproto.state in (
            ConnectionState.OPEN,
            ConnectionState.REMOTE_CLOSING,
        ):
            self.connection.write(self.wsproto.send(CloseConnection(code)))

    def connectionLost(self, reason: Failure) -> None:
        self._message = bytearray()
        self.websocket.connectionLost(reason)


# -- one TCP connection of the listener ------------------------------------------------


@implementer(ITransport)
class _ChannelTransport:
    """
    The transport twisted.web's C{HTTPChannel} (and, after the upgrade,
    Twisted's WebSocket protocol) writes to: every byte goes through the
    connection's output account, and closing goes through its
    close-after-flush with its grace period.

    It is not a producer: twisted.web's own flow control is not needed
    (the page's files are small and in memory), and the account is the
    one producer registered with the real transport.
    """

    def __init__(self, connection: WebConnection) -> None:
        self.connection = connection
        if ISSLTransport.providedBy(connection.transport):
            directlyProvides(self, providedBy(self), ISSLTransport)

    @property
    def disconnecting(self) -> bool:
        return bool(self.connection.transport.disconnecting)

    def write(self, data: bytes) -> None:
        self.connection.write(data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.connection.writeSequence(list(data))

    def loseConnection(self) -> None:
        self.connection.closeAfterFlush()

    def abortConnection(self) -> None:
        self.connection.transport.abortConnection()

    def getPeer(self) -> IAddress:
        return self.connection.transport.getPeer()

    def getHost(self) -> IAddress:
        return self.connection.transport.getHost()

    def setTcpNoDelay(self, enabled: bool) -> None:
        # (Set already by the connection; twisted.web asks again.)
        setNoDelay = getattr(self.connection.transport, "setTcpNoDelay", None)
        if setNoDelay is not None:
            with contextlib.suppress(OSError):
                setNoDelay(enabled)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        # ISSLTransport's getPeerCertificate, and the like (never the
        # private or special names: adaptation looks for __conform__).
        if name.startswith("_") or name == "connection":
            raise AttributeError(name)
        return getattr(self.connection.transport, name)


class WebConnection(ServedConnection):
    """
    One TCP (or TLS) connection of the web listener: HTTP for the page,
    then, once upgraded, one WebSocket.

    Its C{factory} is the chat server's L{ServerFactory}: it is counted in
    that server's caps and closed by its stop like an Int32 connection.
    While in HTTP, a request's bytes count as one "frame" (its header must
    be complete within C{--header-timeout}) and may not exceed
    L{HTTP_REQUEST_LIMIT}; once upgraded, each WebSocket frame, or each
    fragmented message from its first frame to its final one, has the
    deadlines of an Int32 frame, each message C{--max-length} and
    L{MAX_FRAGMENTS}, and control frames a rate.
    """

    websocket: WebSocketChannel | None = None
    #: The HTTP channel, then (once upgraded) the L{WebSocketWire}.
    channel: Any = None
    scanner: FrameScanner | None = None
    _requestBytes = 0
    _unitSerial = 0
    #: Bytes that came after the upgrade request in its read.
    _leftover = b""
    #: The connection's bucket of HTTP requests (made at the first).
    _requests: TokenBucket | None = None

    def __init__(self, web: WebFactory) -> None:
        self.web = web

    # -- the life of the connection -------------------------------------------------

    def connectionMade(self) -> None:
        ServedConnection.connectionMade(self)
        if not self.admitted:
            return
        self.web.connections.add(self)
        self.channel = self.web.site.buildProtocol(self.transport.getPeer())
        self.channel.makeConnection(_ChannelTransport(self))

    def refuse(self, reason: str) -> None:
        body = f"{reason}\n".encode()
        self.write(
            b"HTTP/1.1 503 Service Unavailable\r\n"
            b"content-type: text/plain; charset=utf-8\r\n"
            b"retry-after: 5\r\n"
            b"connection: close\r\n"
            b"content-length: " + str(len(body)).encode("ascii") + b"\r\n\r\n" + body
        )
        self.closeAfterFlush()

    def upgrade(
        self,
        makeDispatcher: DispatcherFactory,
        wsproto: WSProtoConnection,
        response: bytes,
        leftover: bytes,
    ) -> None:
        """
        The upgrade request was accepted: write the C{101} C{response};
        from now on the bytes are WebSocket frames, beginning with
        C{leftover} (what came after the request in its read).
        """
        websocket = WebSocketChannel(self, makeDispatcher)
        wire = websocket.transport = WebSocketWire(self, wsproto, websocket)
        self.websocket = websocket
        self.channel = wire
        clock = self.factory.clock
        assert clock is not None
        control = TokenBucket(
            clock, burst=CONTROL_FRAME_BURST, rate=CONTROL_FRAME_RATE, maxKeys=1
        )
        self.scanner = FrameScanner(
            self.factory.maxLength, controlFrame=lambda: not control.take("")
        )
        self.frameStarted = None
        self._requestBytes = 0
        self._leftover = leftover
        self.write(response)
        websocket.opened()

    def requestArrived(self) -> bool:
        """
        twisted.web has a whole request: its deadline and size are met.
        Whether it is within the connection's rate of requests.
        """
        self.frameStarted = None
        self._requestBytes = 0
        if self._requests is None:
            clock = self.factory.clock
            assert clock is not None
            self._requests = TokenBucket(
                clock, burst=HTTP_REQUEST_BURST, rate=HTTP_REQUEST_RATE, maxKeys=1
            )
        wait = self._requests.take("")
        if wait:
            self.factory.context.rateLimited(self.peer, wait, "HTTP")
            return False
        return True

    def dataReceived(self, data: bytes) -> None:
        if (
            self.channel is None
            or self.transport.disconnecting
            or CLOSING in self._readPauses
        ):
            return
        now = self.noteReceived(len(data))
        if self.websocket is None:
            self._httpReceived(now, data)
        else:
            self._frameReceived(now, data)

    def _httpReceived(self, now: float, data: bytes) -> None:
        if self.frameStarted is None:
            self.frameStarted = now
            self.frameHeaderAt = None
            self.framePayload = 0
        self._requestBytes += len(data)
        if self._requestBytes > HTTP_REQUEST_LIMIT:
            self.log.warn(
                "{peer} sent an HTTP request of more than {limit} bytes; closing",
                event=WEB_REQUEST_TOO_LONG,
                peer=self.peer,
                limit=HTTP_REQUEST_LIMIT,
            )
            self.transport.abortConnection()
            return
        self.channel.dataReceived(data)
        if self._leftover:
            # Upgraded by that request: frames sent with it are frames.
            leftover, self._leftover = self._leftover, b""
            if not self.transport.disconnecting and CLOSING not in self._readPauses:
                self._frameReceived(now, leftover)

    def _frameReceived(self, now: float, data: bytes) -> None:
        scanner = self.scanner
        websocket = self.websocket
        assert scanner is not None and websocket is not None
        stop = scanner.feed(data)
        if stop is not None:
            # What came before the refused header is handled; nothing
            # from it on is read.
            if stop:
                self.channel.dataReceived(data[:stop])
            self.pauseReading(CLOSING)
            self.frameStarted = None
            self._refused(scanner, websocket)
            return
        if not scanner.inUnit:
            self.frameStarted = None
        else:
            # The deadlines of the unit in progress: a frame, or a whole
            # fragmented message (each of its frames is complete, so
            # per-frame deadlines would never end it).
            if self.frameStarted is None or scanner.units != self._unitSerial:
                self.frameStarted = now
                self.frameHeaderAt = now if scanner.unitHeaderComplete else None
            elif self.frameHeaderAt is None and scanner.unitHeaderComplete:
                self.frameHeaderAt = now
            self.framePayload = scanner.unitPayload
        self._unitSerial = scanner.units
        self.channel.dataReceived(data)

    def _refused(self, scanner: FrameScanner, websocket: WebSocketChannel) -> None:
        """
        The scanner stopped at a header: log why (within the log budget,
        except C{frame_too_long}, logged as on the Int32 port) and close.
        """
        if scanner.refused == TOO_LONG:
            self.log.warn(
                "{peer} announced a {length}-byte message (limit {limit}); closing",
                event=events.FRAME_TOO_LONG,
                peer=self.peer,
                length=scanner.tooLong,
                limit=scanner.maxLength,
            )
            websocket.messageTooLong(scanner.tooLong, scanner.maxLength)
        elif scanner.refused == TOO_FRAGMENTED:
            if self.factory.logBudget.admit(WEBSOCKET_TOO_FRAGMENTED):
                self.log.info(
                    "{peer} sent a message in more than {limit} frames; closing",
                    event=WEBSOCKET_TOO_FRAGMENTED,
                    peer=self.peer,
                    limit=scanner.maxFragments,
                )
            websocket.refuse(
                CLOSE_POLICY_VIOLATION,
                ErrorCode.BAD_REQUEST,
                f"a message may come in at most {scanner.maxFragments} frames "
                "(send each message as one frame); closing",
            )
        else:
            if self.factory.logBudget.admit(WEBSOCKET_CONTROL_FLOOD):
                self.log.info(
                    "{peer} sent control frames over their rate; closing",
                    event=WEBSOCKET_CONTROL_FLOOD,
                    peer=self.peer,
                )
            websocket.refuse(
                CLOSE_POLICY_VIOLATION,
                ErrorCode.BAD_REQUEST,
                f"more than {CONTROL_FRAME_BURST} ping, pong or close frames "
                f"at once ({CONTROL_FRAME_RATE:g} a second); closing",
            )

    def readConnectionLost(self) -> None:
        if self.websocket is None:
            ServedConnection.readConnectionLost(self)
            return
        self._readPauses = self._readPauses | {END_OF_INPUT}
        self.frameStarted = None
        self.websocket.endOfInput()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        channel, self.channel = self.channel, None
        if channel is not None:
            # (After the upgrade this is the WebSocketWire.)
            channel.connectionLost(reason)
        self.web.connectionClosed(self)
        ServedConnection.connectionLost(self, reason)

    # -- closing -----------------------------------------------------------------------

    def closeAfterFlush(self) -> None:
        websocket = self.websocket
        if (
            websocket is not None
            and websocket.transport is not None
            and not websocket.closeSent
            and not self.lost
            and not self.transport.disconnecting
        ):
            websocket.closeSent = True
            websocket.transport.sendClose(websocket.closeCode)
        ServedConnection.closeAfterFlush(self)

    def outputDrained(self) -> None:
        ServedConnection.outputDrained(self)
        if self.websocket is not None:
            self.websocket.outputDrained()

    # -- hooks of ServedConnection ---------------------------------------------------

    def idleTimedOut(self) -> None:
        if self.websocket is not None:
            self.websocket.sendMessage(
                {
                    "type": "error",
                    "code": ErrorCode.IDLE_TIMEOUT,
                    "message": "closing an idle connection",
                }
            )

    def frameTimedOut(self) -> None:
        websocket = self.websocket
        if websocket is None:
            self.transport.abortConnection()
            return
        websocket.closeCode = CLOSE_POLICY_VIOLATION
        websocket.sendMessage(
            {
                "type": "error",
                "code": ErrorCode.FRAME_TIMEOUT,
                "message": "a frame stayed incomplete too long; closing",
            }
        )
        self.closeAfterFlush()

    def serverStopping(self) -> None:
        websocket = self.websocket
        if websocket is not None:
            websocket.closeCode = CLOSE_GOING_AWAY
            websocket.sendMessage(
                {
                    "type": "error",
                    "code": ErrorCode.SERVER_SHUTDOWN,
                    "message": "the server is shutting down",
                }
            )

    def slowConsumer(self) -> None:
        websocket = self.websocket
        if (
            websocket is not None
            and websocket.transport is not None
            and not websocket.closing
        ):
            # Most likely never read; said for a peer that reads again at
            # last.  Written past the account (which is what cut it off).
            websocket.closeSent = True
            self._unaccounted(
                lambda: websocket.transport.sendFrames(  # type: ignore[union-attr]
                    textFrames(
                        (
                            encodeMessage(
                                {
                                    "type": "error",
                                    "code": ErrorCode.SLOW_CONSUMER,
                                    "message": "you are not reading fast enough; "
                                    "disconnecting",
                                }
                            ),
                        )
                    )
                )
            )
        ServedConnection.slowConsumer(self)

    _bypass = False

    def _unaccounted(self, work: Callable[[], None]) -> None:
        self._bypass = True
        try:
            work()
        finally:
            self._bypass = False

    def write(self, data: bytes, now: float | None = None) -> None:
        if self._bypass:
            if not self.transport.disconnecting:
                self.transport.write(data)
            return
        ServedConnection.write(self, data, now)

    def writeSequence(self, parts: Sequence[bytes]) -> None:
        if self._bypass:
            self.write(b"".join(parts))
            return
        ServedConnection.writeSequence(self, parts)


# -- the site and the listener ---------------------------------------------------------


class WebSite(Site):
    """
    twisted.web's C{Site} for the page and the socket: HTTP/1.1 only (the
    WebSocket upgrade is an HTTP/1.1 request), no timeout of its own (the
    connection's deadlines apply), no access log (events are logged
    instead, without URLs), and the security headers on every response.
    """

    def buildProtocol(self, addr: IAddress | None) -> Any:
        channel: Any = HTTPChannel()
        channel.factory = self
        channel.callLater = self.reactor.callLater
        channel.timeOut = None
        channel.requestFactory = self.requestFactory
        channel.site = self
        return channel

    def getResourceFor(self, request: Request) -> Any:
        connection = connectionOf(request)
        setSecurityHeaders(request)
        if connection is not None and not connection.requestArrived():
            return TOO_MANY_REQUESTS
        return super().getResourceFor(request)

    def log(self, request: Any) -> None:
        pass


def connectionOf(request: Request) -> WebConnection | None:
    """
    The L{WebConnection} a request came in on (L{None} on any other).
    """
    transport = getattr(request.channel, "transport", None)
    return transport.connection if isinstance(transport, _ChannelTransport) else None


_WS_KEY = re.compile(rb"^[A-Za-z0-9+/]{22}==$")


class ChatSocketResource(Resource):
    """
    C{/ws}: the Origin check, then the WebSocket upgrade.

    A request that is not a WebSocket upgrade gets C{426 Upgrade Required};
    a browser page from an origin that is not allowed, C{403 Forbidden}
    (and a C{web_origin_refused} event); an upgrade wsproto would refuse
    (its C{Host}, C{Connection} or C{Upgrade} headers) or one with a body,
    C{400} (and a C{web_upgrade_refused} event); a method other than GET,
    C{405}.  These events are within the log budget: a client can pipeline
    refused requests on one connection at wire speed.
    """

    isLeaf = True
    log = Logger()

    def __init__(self, origins: OriginPolicy, makeDispatcher: DispatcherFactory):
        super().__init__()
        self.origins = origins
        self.makeDispatcher = makeDispatcher

    def render(self, request: Request) -> bytes | int:
        if request.method != b"GET":
            # (HEAD too: twisted.web would answer it with render_GET.)
            request.setHeader(b"allow", b"GET")
            return _plain(request, 405, b"only GET (a WebSocket upgrade) here\n")
        return self.render_GET(request)

    def render_GET(self, request: Request) -> bytes | int:
        connection = connectionOf(request)
        origin = request.getHeader(b"origin")
        allowed = origin is None or self.origins.allows(
            request, origin.decode("latin-1")
        )
        if not allowed:
            assert origin is not None
            self._logRefusal(
                connection,
                WEB_ORIGIN_REFUSED,
                "refusing a WebSocket from {peer}: origin {origin} is not allowed",
                origin=_printable(origin),
            )
            return _plain(request, 403, b"this origin may not open the chat socket\n")
        if not _isUpgrade(request):
            request.setHeader(b"upgrade", b"websocket")
            request.setHeader(b"sec-websocket-version", b"13")
            return _plain(request, 426, b"a WebSocket upgrade is required here\n")
        if connection is None:
            return _plain(request, 500, b"not served by a netlab web listener\n")
        handshake = _handshake(request)
        if isinstance(handshake, str):
            self._logRefusal(
                connection,
                WEB_UPGRADE_REFUSED,
                "refusing a WebSocket upgrade from {peer}: {reason}",
                reason=handshake,
            )
            return _plain(request, 400, b"a malformed WebSocket upgrade\n")
        response = handshake.send(AcceptConnection())
        wsproto = handshake.connection
        assert wsproto is not None, "accepted"
        # What the client sent after the request (in the same read) is
        # still in the HTTP channel's buffer: the first frames.
        leftover = request.channel.clearLineBuffer()
        connection.upgrade(self.makeDispatcher, wsproto, response, leftover)
        return NOT_DONE_YET

    def _logRefusal(
        self,
        connection: WebConnection | None,
        name: str,
        format: str,
        **fields: Any,
    ) -> None:
        if connection is None:
            self.log.warn(format, event=name, peer="?", **fields)
        elif connection.factory.logBudget.admit(name):
            connection.log.warn(format, event=name, peer=connection.peer, **fields)


def _handshake(request: Request) -> H11Handshake | str:
    """
    wsproto's own server handshake on the request's headers (so what it
    accepts is exactly what wsproto accepts), ready to accept; or why
    it refuses, as text for the log (never a header's value or the URL).
    """
    headers = request.requestHeaders
    length = headers.getRawHeaders(b"content-length", [b"0"])
    if length != [b"0"] or headers.hasHeader(b"transfer-encoding"):
        return "an upgrade request with a body"
    handshake = H11Handshake(ConnectionType.SERVER)
    raw = [
        (name, value) for name, values in headers.getAllRawHeaders() for value in values
    ]
    try:
        handshake.initiate_upgrade_connection(raw, request.path)
    except WSProtoError as e:
        # (wsproto's reasons are fixed texts: "Missing header, 'Host'".)
        return _printable(str(e).encode("ascii", "replace"), 100)
    except (h11.ProtocolError, ValueError) as e:
        # h11's texts can quote the request: only the kind is said.
        return f"refused by h11 or wsproto ({type(e).__name__})"
    return handshake


def _isUpgrade(request: Request) -> bool:
    """
    Whether C{request} is a well-formed WebSocket upgrade (RFC 6455 4.2.1),
    checked here so wsproto never has to refuse one (Twisted logs each
    refusal as an error, which a client could use to flood the log).
    """
    headers = request.requestHeaders
    connection = b",".join(headers.getRawHeaders(b"connection", []))
    upgrade = b",".join(headers.getRawHeaders(b"upgrade", []))
    key = headers.getRawHeaders(b"sec-websocket-key", [])
    version = headers.getRawHeaders(b"sec-websocket-version", [])
    if b"upgrade" not in [t.strip().lower() for t in connection.split(b",")]:
        return False
    if b"websocket" not in [t.strip().lower() for t in upgrade.split(b",")]:
        return False
    if len(key) != 1 or not _WS_KEY.match(key[0].strip()):
        return False
    try:
        if len(base64.b64decode(key[0].strip(), validate=True)) != 16:
            return False
    except binascii.Error:
        return False
    return version == [b"13"]


_REASONS = {426: b"Upgrade Required", 429: b"Too Many Requests"}


def _plain(request: Request, code: int, body: bytes) -> bytes:
    request.setResponseCode(code, _REASONS.get(code))
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    return _body(request, body)


def _body(request: Request, body: bytes) -> bytes:
    """
    C{body}, or nothing for a HEAD request (with C{body}'s length): for a
    HEAD answered with a body, twisted.web logs a warning with the URL.
    """
    if request.method == b"HEAD":
        request.setHeader(b"content-length", b"%d" % len(body))
        return b""
    return body


@implementer(IProtocolNegotiationFactory)
class WebFactory(Factory):
    """
    What the web listener listens with: each connection is a
    L{WebConnection} of the chat server's L{ServerFactory} (C{server}).
    """

    noisy = False

    def acceptableProtocols(self) -> list[bytes]:
        """
        ALPN on C{ssl:}: HTTP/1.1, the only HTTP a WebSocket upgrade is
        made on.  (Said even so because Twisted 26.10 fails the handshake of
        a client that offers ALPN, as every browser does, when the factory
        names no protocol: its selection callback answers b"".)
        """
        return [b"http/1.1"]

    def __init__(
        self,
        server: ServerFactory,
        makeDispatcher: DispatcherFactory,
        origins: OriginPolicy,
        reactor: IReactorTime,
        files: dict[bytes, StaticFile] | None = None,
    ) -> None:
        self.server = server
        self.origins = origins
        self.socket = ChatSocketResource(origins, makeDispatcher)
        root = WebRoot(loadStaticFiles() if files is None else files, self.socket)
        self.site = WebSite(
            root, reactor=reactor, timeout=None, parsePOSTFormSubmission=False
        )
        self.connections: set[WebConnection] = set()
        self._allGone: list[defer.Deferred[None]] = []

    def buildProtocol(self, addr: IAddress | None) -> Any:
        # (A WebConnection's factory is the chat server's, not this one.)
        connection = WebConnection(self)
        connection.factory = self.server
        return connection

    def connectionClosed(self, connection: WebConnection) -> None:
        self.connections.discard(connection)
        if not self.connections:
            waiters, self._allGone = self._allGone, []
            for waiter in waiters:
                waiter.callback(None)

    def closeAll(self, timeout: float = 3.0) -> defer.Deferred[None]:
        """
        Close every connection of this listener (telling WebSockets
        C{server_shutdown}), aborting those still open after C{timeout}.
        """
        if not self.connections:
            return defer.succeed(None)
        clock = self.server.clock
        assert clock is not None
        done: defer.Deferred[None] = defer.Deferred()
        self._allGone.append(done)
        for connection in list(self.connections):
            connection.serverStopping()
            connection.closeAfterFlush()

        def abortStragglers() -> None:
            for connection in list(self.connections):
                connection.transport.abortConnection()

        timer = clock.callLater(timeout, abortStragglers)

        def cancelTimer(result: None) -> None:
            if timer.active():
                timer.cancel()

        done.addCallback(cancelTimer)
        return done


def serviceDispatchers(server: Any) -> DispatcherFactory:
    """
    The dispatchers of a JSON server's WebSockets: the same service, request
    handlers and context (limits, buckets, counters) as its Int32
    connections (C{server} is its L{twisted_lab.transports.int32.MessageFactory}).
    """

    def makeDispatcher(channel: IRequestChannel) -> Dispatcher:
        handler = server.service.handlerFor(channel)
        return RequestDispatcher(channel, handler, server.context)

    return makeDispatcher
