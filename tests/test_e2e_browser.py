"""
End to end in a real browser: headless Chromium (Debian's C{chromium},
driven through Playwright's Python package) against a real C{twistd -n
netlab-chat --web ...}, with a terminal client (a L{FramedSocket} on the
Int32 port) in the same rooms.

  - two browser users and a terminal user chat in one room and all three
    see the same messages in the same order (the room's seq order);
  - closing the page and opening it again, and a reload, resume the
    session from the saved token and catch up on what was said meanwhile,
    beyond the 50 messages a join brings, with no gap and no duplicate;
  - after the server restarts, the open pages reconnect by themselves,
    resume, and catch up on what was said before they were back;
  - a page from a foreign origin cannot open the socket;
  - errors (rate limits, a slow consumer) are shown plainly;
  - the page works at phone size (and the screenshots in docs/ are taken
    here: set C{NETLAB_SCREENSHOTS=docs/screenshots} to refresh them).

Playwright cannot download its own browsers here, so Debian's is used:
C{apt-get install chromium} (C{.ci/run} does it).  Without it, or without
the C{playwright} package, these tests are skipped with that advice, except
under CI (C{CI} set), where they fail.

The tests block (Playwright's sync API, blocking sockets, a polled port
file): the servers are separate processes, so nothing waits on the reactor.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any
from unittest import SkipTest

from twisted.trial.unittest import SynchronousTestCase

from tests.e2e import DEADLINE, Server
from tests.helpers import subprocessEnv
from twisted_lab.client.wire import FramedSocket

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
FAST_HASH = ("--hash-memory-kib", "1024", "--hash-time-cost", "1")
PASSWORD = "password1"
#: How long a page may take to see something happen (ms): reconnecting
#: after a restart waits for the page's back-off.
SLOW_MS = 40_000

#: The messages shown in the current conversation, in page order.
SHOWN = """() => [...document.querySelectorAll('#messages li.message[data-seq]')]
  .map(e => [Number(e.dataset.seq),
             e.querySelector('.from').textContent,
             e.querySelector('.text').textContent])"""


def requireBrowser(test: SynchronousTestCase) -> None:
    missing = []
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package (pip install '.[test]')")
    if not os.access(CHROMIUM, os.X_OK):
        missing.append(f"Debian's chromium at {CHROMIUM} (apt-get install chromium)")
    if missing:
        why = "the browser tests need " + " and ".join(missing)
        if os.environ.get("CI"):
            test.fail(why + "; CI is set, so they fail instead of skipping")
        raise SkipTest(why)


class WebChat(Server):
    """
    A real C{twistd -n netlab-chat --web tcp:PORT:interface=127.0.0.1},
    started and stopped synchronously.
    """

    def __init__(
        self,
        workdir: Path,
        db: Path,
        *extra: str,
        port: int = 0,
        webPort: int = 0,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        self.webPortFile = workdir / "web.port"
        web = f"tcp:{webPort}:interface=127.0.0.1"
        if tls is not None:
            key, cert = tls
            web = f"ssl:{webPort}:interface=127.0.0.1:privateKey={key}:certKey={cert}"
        self.scheme = "https" if tls is not None else "http"
        fixed = ("--no-port-fallback",) if port else ()
        super().__init__(
            workdir,
            "netlab-chat",
            "--port",
            str(port),
            "--db",
            str(db),
            *FAST_HASH,
            *fixed,
            "--web",
            web,
            "--web-port-file",
            str(self.webPortFile),
            *extra,
        )
        self.webPort = 0

    @property
    def url(self) -> str:
        host = "localhost" if self.scheme == "https" else "127.0.0.1"
        return f"{self.scheme}://{host}:{self.webPort}/"

    def startBlocking(self) -> WebChat:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for path in (self.portFile, self.webPortFile):
            if path.exists():
                path.unlink()
        with self.outputFile.open("ab") as output:
            self.process = subprocess.Popen(
                self.command(),
                cwd=self.workdir,
                env=subprocessEnv(),
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + DEADLINE
        while not (self.portFile.exists() and self.webPortFile.exists()):
            if self.process.poll() is not None:
                raise AssertionError(f"twistd exited early:\n{self.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no port files after {DEADLINE} s:\n{self.log()}")
            time.sleep(0.05)
        self.port = int(self.portFile.read_text())
        self.webPort = int(self.webPortFile.read_text())
        return self

    def stopBlocking(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=DEADLINE)


class Terminal:
    """
    A terminal user: JSON requests over the Int32 port, blocking.
    """

    def __init__(self, port: int) -> None:
        self.sock = FramedSocket.connect_to("127.0.0.1", port, timeout=DEADLINE)
        self.unprompted: list[dict[str, Any]] = []
        self.nextId = 1

    def close(self) -> None:
        self.sock.close()

    def call(self, message: dict[str, Any]) -> dict[str, Any]:
        requestId = self.nextId
        self.nextId += 1
        self.sock.send_json({**message, "id": requestId})
        while True:
            reply = self.sock.recv_json()
            if reply.get("id") == requestId:
                return reply
            self.unprompted.append(reply)

    def login(self, username: str, register: bool = False) -> None:
        if register:
            reply = self.call(
                {"type": "register", "username": username, "password": PASSWORD}
            )
            assert reply["type"] == "registered", reply
        reply = self.call({"type": "login", "username": username, "password": PASSWORD})
        assert reply["type"] == "session", reply

    def say(self, room: str, text: str) -> None:
        # No reply of its own: the broadcast comes back like to everyone.
        self.sock.send_json({"type": "say", "room": room, "text": text})

    def roomMessages(self, room: str) -> list[tuple[int, str, str]]:
        return [
            (m["seq"], m["from"], m["text"])
            for m in self.unprompted
            if m.get("type") == "message" and m.get("room") == room
        ]

    def waitFor(self, kind: str, count: int) -> list[dict[str, Any]]:
        while True:
            found = [m for m in self.unprompted if m.get("type") == kind]
            if len(found) >= count:
                return found
            self.unprompted.append(self.sock.recv_json())


class BrowserTestCase(SynchronousTestCase):
    """
    One Chromium per test, one fresh browser context (storage) per user.
    """

    def setUp(self) -> None:
        requireBrowser(self)
        from playwright.sync_api import sync_playwright

        self.workdir = Path(self.mktemp()).absolute()
        self.workdir.mkdir(parents=True)
        self.db = self.workdir / "netlab.sqlite3"
        self.playwright = sync_playwright().start()
        self.addCleanup(self.playwright.stop)
        self.browser = self.playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS
        )
        self.addCleanup(self.browser.close)
        self.pageErrors: list[str] = []

    def server(
        self,
        *extra: str,
        port: int = 0,
        webPort: int = 0,
        tls: tuple[Path, Path] | None = None,
    ) -> WebChat:
        server = WebChat(
            self.workdir / "server",
            self.db,
            *extra,
            port=port,
            webPort=webPort,
            tls=tls,
        )
        self.addCleanup(server.cleanup)
        return server.startBlocking()

    def terminal(self, port: int) -> Terminal:
        terminal = Terminal(port)
        self.addCleanup(terminal.close)
        return terminal

    def page(self, url: str, **context: Any) -> Any:
        page = self.browser.new_context(**context).new_page()
        # Uncaught exceptions, and anything the page's policy refused (but
        # not a failed connection while a server is down: that is expected).
        page.on("pageerror", lambda error: self.pageErrors.append(str(error)))
        page.on(
            "console",
            lambda m: (
                self.pageErrors.append(m.text)
                if "Content Security Policy" in m.text
                else None
            ),
        )
        page.goto(url)
        return page

    # -- what a person does on the page ------------------------------------------

    def register(self, page: Any, username: str) -> None:
        from playwright.sync_api import expect

        page.fill("#login-username", username)
        page.fill("#login-password", PASSWORD)
        page.click("#register-button")
        expect(page.locator("#whoami")).to_have_text(username)

    def login(self, page: Any, username: str) -> None:
        from playwright.sync_api import expect

        page.fill("#login-username", username)
        page.fill("#login-password", PASSWORD)
        page.click("#login-button")
        expect(page.locator("#whoami")).to_have_text(username)

    def join(self, page: Any, room: str) -> None:
        from playwright.sync_api import expect

        page.fill("#room-input", room)
        page.click("#join-button")
        expect(page.locator("#conversation-title")).to_have_text(f"#{room}")
        expect(page.locator("#send-button")).to_be_enabled()

    def say(self, page: Any, text: str) -> None:
        page.fill("#composer-input", text)
        page.press("#composer-input", "Enter")

    def shown(self, page: Any) -> list[tuple[int, str, str]]:
        return [tuple(row) for row in page.evaluate(SHOWN)]

    def waitShown(self, page: Any, count: int, timeout: float = 10_000) -> None:
        page.wait_for_function(
            "n => document.querySelectorAll("
            "'#messages li.message[data-seq]').length >= n",
            arg=count,
            timeout=timeout,
        )

    def assertInSeqOrder(self, rows: list[tuple[int, str, str]]) -> None:
        seqs = [row[0] for row in rows]
        self.assertEqual(seqs, sorted(set(seqs)), "out of order or duplicated")
        self.assertEqual(seqs, list(range(seqs[0], seqs[0] + len(seqs))), "a gap")

    def tearDown(self) -> None:
        self.assertEqual(self.pageErrors, [])


class ChatInTheBrowserTests(BrowserTestCase):
    def test_twoBrowsersAndATerminalSeeOneOrder(self) -> None:
        from playwright.sync_api import expect

        server = self.server()
        carol = self.terminal(server.port)
        carol.login("carol", register=True)
        self.assertEqual(
            carol.call({"type": "join", "room": "lobby"})["type"], "joined"
        )

        alice = self.page(server.url)
        self.register(alice, "alice")
        self.join(alice, "lobby")
        bob = self.page(server.url)
        self.register(bob, "bob")
        self.join(bob, "lobby")
        # Presence: alice sees bob and carol in the room.
        expect(alice.locator("#members li")).to_have_text(["alice", "bob", "carol"])

        for i in range(3):
            self.say(alice, f"alice {i}")
            carol.say("lobby", f"carol {i}")
            self.say(bob, f"bob {i}")
        self.say(bob, '<img src=x onerror="window.pwned=1"> & <b>bold</b>')
        self.waitShown(alice, 10)
        self.waitShown(bob, 10)
        carol.waitFor("message", 10)

        seen = self.shown(alice)
        self.assertEqual(self.shown(bob), seen)
        self.assertEqual(carol.roomMessages("lobby"), seen)
        self.assertInSeqOrder(seen)
        self.assertEqual(
            sorted(text for _, _, text in seen[:9]),
            sorted(f"{who} {i}" for who in ("alice", "bob", "carol") for i in range(3)),
        )
        # Each user's own messages in the order they were said.
        for who in ("alice", "bob", "carol"):
            self.assertEqual(
                [text for _, sender, text in seen if sender == who][:3],
                [f"{who} {i}" for i in range(3)],
            )
        # Text is text: nothing in it became markup.
        self.assertEqual(
            seen[-1][2], '<img src=x onerror="window.pwned=1"> & <b>bold</b>'
        )
        self.assertEqual(alice.locator("#messages img, #messages b").count(), 0)
        self.assertIsNone(alice.evaluate("window.pwned"))

        # Private messages both ways between the terminal and a page.
        self.assertEqual(
            carol.call({"type": "msg", "to": "alice", "text": "psst <i>alice</i>"})[
                "type"
            ],
            "sent",
        )
        alice.locator('#private-list button[data-user="carol"]').click()
        expect(alice.locator("#messages li.message .text")).to_have_text(
            ["psst <i>alice</i>"]
        )
        self.say(alice, "hello carol")
        [private] = carol.waitFor("private", 1)
        self.assertEqual((private["from"], private["text"]), ("alice", "hello carol"))
        expect(alice.locator("#messages li.message .text")).to_have_text(
            ["psst <i>alice</i>", "hello carol"]
        )

        # Leaving: the others see it.
        alice.locator('#room-list button[data-room="lobby"]').click()
        bob.click("#leave-button")
        expect(alice.locator("#members li")).to_have_text(["alice", "carol"])

    def test_reloadResumesTheSessionAndCatchesUp(self) -> None:
        from playwright.sync_api import expect

        server = self.server("--message-burst", "200", "--message-rate", "100")
        carol = self.terminal(server.port)
        carol.login("carol", register=True)
        carol.call({"type": "join", "room": "lobby"})
        alice = self.page(server.url)
        self.register(alice, "alice")
        self.join(alice, "lobby")
        carol.say("lobby", "before")
        self.waitShown(alice, 1)
        token = alice.evaluate("JSON.parse(localStorage.getItem('netlab-chat')).token")
        self.assertTrue(token)

        # The page is closed; 60 messages are said (more than a join brings).
        alice.goto("about:blank")
        for i in range(60):
            carol.say("lobby", f"while away {i}")
        carol.waitFor("message", 61)

        alice.goto(server.url)
        expect(alice.locator("#whoami")).to_have_text("alice")
        self.assertFalse(alice.locator("#login-view").is_visible())
        # Everything after the last message seen, though a join brings the
        # last 50 only: the page asked history after its last seq.
        self.waitShown(alice, 60)
        seen = self.shown(alice)
        self.assertInSeqOrder(seen)
        self.assertEqual(
            [text for _, _, text in seen], [f"while away {i}" for i in range(60)]
        )

        # A reload: the same session, the same messages, none twice.
        carol.say("lobby", "after")
        alice.wait_for_function(
            "() => [...document.querySelectorAll('#messages .text')]"
            ".some(e => e.textContent === 'after')"
        )
        alice.reload()
        expect(alice.locator("#whoami")).to_have_text("alice")
        expect(alice.locator("#status")).to_have_text("online")
        alice.wait_for_function(
            "() => [...document.querySelectorAll('#messages .text')]"
            ".some(e => e.textContent === 'after')"
        )
        again = self.shown(alice)
        self.assertInSeqOrder(again)
        self.assertEqual(again[-1][2], "after")
        self.assertEqual(
            alice.evaluate("JSON.parse(localStorage.getItem('netlab-chat')).token"),
            token,
        )
        # The token is never in a URL, nor in a log.
        self.assertNotIn(token, alice.url)
        for logged in server.workdir.iterdir():
            if logged.is_file() and logged.suffix != ".sqlite3":
                self.assertNotIn(token, logged.read_text(errors="replace"), logged)

        # Logging out forgets the token: a reload asks to log in.
        alice.click("#logout-button")
        expect(alice.locator("#login-view")).to_be_visible()
        alice.reload()
        expect(alice.locator("#login-view")).to_be_visible()
        self.assertIsNone(
            alice.evaluate("JSON.parse(localStorage.getItem('netlab-chat')).token")
        )

    def test_serverRestartReconnectsAndCatchesUp(self) -> None:
        from playwright.sync_api import expect

        first = self.server()
        carol = self.terminal(first.port)
        carol.login("carol", register=True)
        alice = self.page(first.url)
        self.register(alice, "alice")
        self.join(alice, "lobby")
        bob = self.page(first.url)
        self.register(bob, "bob")
        self.join(bob, "lobby")
        self.say(alice, "before the restart")
        self.waitShown(bob, 1)
        carol.close()

        # (twistd ends with the signal that stopped it, after a clean stop.)
        self.assertIn(first.stopBlocking(), (0, -signal.SIGTERM))
        self.assertEqual(first.eventNames()[-1], "server_stopped")
        for page in (alice, bob):
            expect(page.locator("#status")).to_have_attribute("data-state", "offline")

        second = self.server(port=first.port, webPort=first.webPort)
        # Said at once, most likely before the pages are back: they catch up.
        carol = self.terminal(second.port)
        carol.login("carol")
        carol.call({"type": "join", "room": "lobby"})
        for i in range(3):
            carol.say("lobby", f"while you were away {i}")
        carol.waitFor("message", 3)

        for page in (alice, bob):
            expect(page.locator("#status")).to_have_text("online", timeout=SLOW_MS)
            self.waitShown(page, 4, timeout=SLOW_MS)
            seen = self.shown(page)
            self.assertInSeqOrder(seen)
            self.assertEqual(
                [text for _, _, text in seen],
                ["before the restart"] + [f"while you were away {i}" for i in range(3)],
            )
        # And the reconnected pages chat on.
        self.say(alice, "back again")
        self.waitShown(bob, 5)
        self.assertEqual(self.shown(bob)[-1][1:], ("alice", "back again"))
        carol.waitFor("message", 4)

    def test_aForeignOriginCannotOpenTheSocket(self) -> None:
        server = self.server()
        socketUrl = f"ws://127.0.0.1:{server.webPort}/ws"
        opening = """url => new Promise(done => {
            const ws = new WebSocket(url);
            ws.onopen = () => { done("open"); ws.close(); };
            ws.onclose = (e) => done("closed " + e.code);
        })"""
        # A page of another origin: another port of the same host, served
        # by the test itself.
        elsewhere = self.otherSite()
        foreign = self.browser.new_context().new_page()
        foreign.goto(elsewhere)
        self.assertEqual(foreign.evaluate(opening, socketUrl), "closed 1006")
        refused = [e for e in server.events() if e.get("event") == "web_origin_refused"]
        self.assertEqual([e["origin"] for e in refused], [elsewhere.rstrip("/")])
        # The page's own origin, under another name for the same host, may.
        own = self.page(f"http://localhost:{server.webPort}/")
        self.assertEqual(
            own.evaluate(opening, f"ws://localhost:{server.webPort}/ws"), "open"
        )
        # And the page's policy keeps its scripts from connecting elsewhere.
        blocked = own.evaluate(
            """() => new Promise(done => {
                document.addEventListener(
                    "securitypolicyviolation", (e) => done(e.effectiveDirective));
                new WebSocket("ws://127.0.0.1:9/ws");
            })"""
        )
        self.pageErrors.clear()  # (Chromium reports the refusal as an error)
        self.assertEqual(blocked, "connect-src")

    def test_overTLS(self) -> None:
        from playwright.sync_api import expect

        from tests.test_e2e_auth import selfSignedCertificate

        server = self.server(tls=selfSignedCertificate(self.workdir))
        self.assertTrue(server.url.startswith("https://localhost:"))
        # (The certificate is the test's own: the browser is told to accept it.)
        alice = self.page(server.url, ignore_https_errors=True)
        self.register(alice, "alice")
        self.join(alice, "lobby")
        self.say(alice, "over wss")
        self.waitShown(alice, 1)
        self.assertEqual(self.shown(alice)[0][1:], ("alice", "over wss"))
        self.assertEqual(
            alice.evaluate("location.protocol"), "https:"
        )  # and so the page chose wss://
        expect(alice.locator("#status")).to_have_text("online")

    def otherSite(self) -> str:
        """
        A plain page on another port (so of another origin), served from a
        thread for the length of the test.
        """

        class Page(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                body = b"<!doctype html><p>elsewhere</p>"
                self.send_response(200)
                self.send_header("content-type", "text/html")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
        thread = threading.Thread(target=site.serve_forever, daemon=True)
        thread.start()
        self.addCleanup(thread.join)
        self.addCleanup(site.server_close)
        self.addCleanup(site.shutdown)
        return f"http://127.0.0.1:{site.server_address[1]}/"

    def test_errorsAreShownPlainly(self) -> None:
        from playwright.sync_api import expect

        server = self.server("--message-burst", "2", "--message-rate", "0.2")
        alice = self.page(server.url)
        self.register(alice, "alice")
        self.join(alice, "lobby")
        for i in range(4):
            self.say(alice, f"flood {i}")
        notice = alice.locator('#notices .notice[data-code="rate_limited"]')
        expect(notice).to_be_visible()
        expect(notice).to_contain_text("You are sending too fast")
        self.assertEqual(
            [text for _, _, text in self.shown(alice)], ["flood 0", "flood 1"]
        )
        # What could not be sent stays in the box, to send again.
        self.assertTrue(alice.input_value("#composer-input").startswith("flood"))

        # A slow consumer, as the server says it before closing: the page
        # says so, reconnects and resumes.  (Only a page that stops reading
        # is cut off, which a browser does not do: the message is injected
        # through a proxy of the socket.)
        bob = self.browser.new_context().new_page()
        bob.on("pageerror", lambda error: self.pageErrors.append(str(error)))
        proxies: list[Any] = []

        def proxy(ws: Any) -> None:
            ws.connect_to_server()
            proxies.append(ws)

        bob.route_web_socket(f"ws://127.0.0.1:{server.webPort}/ws", proxy)
        bob.goto(server.url)
        self.register(bob, "bob")
        self.join(bob, "lobby")
        proxies[-1].send(
            json.dumps(
                {
                    "type": "error",
                    "code": "slow_consumer",
                    "message": "you are not reading fast enough; disconnecting",
                }
            )
        )
        proxies[-1].close()
        slow = bob.locator('#notices .notice[data-code="slow_consumer"]')
        expect(slow).to_contain_text("not reading fast enough")
        expect(bob.locator("#status")).to_have_text("online", timeout=SLOW_MS)
        self.assertEqual(len(proxies), 2)
        expect(bob.locator("#conversation-title")).to_have_text("#lobby")

    def test_aBusyRoomKeepsTheNewestAndOlderBringsMoreBack(self) -> None:
        """
        A conversation keeps its newest 500 entries (the page would
        otherwise grow with every message for as long as it is open); the
        "older" button asks for earlier ones again, and keeps them; the
        saved last seq is written at most once a second, and when the page
        goes away.
        """
        from playwright.sync_api import expect

        server = self.server("--message-rate", "1000", "--message-burst", "1000")
        carol = self.terminal(server.port)
        carol.login("carol", register=True)
        carol.call({"type": "join", "room": "busy"})
        page = self.page(server.url)
        self.register(page, "alice")
        self.join(page, "busy")
        writes = "window.__writes = 0; const set = Storage.prototype.setItem;"
        writes += "Storage.prototype.setItem = function (...a) {"
        writes += " window.__writes += 1; return set.apply(this, a); };"
        page.evaluate(f"() => {{ {writes} }}")
        for i in range(700):
            carol.say("busy", f"line {i}")
        page.wait_for_function(
            "() => [...document.querySelectorAll('#messages .text')]"
            ".some(e => e.textContent === 'line 699')"
        )
        shown = self.shown(page)
        self.assertEqual(len(page.locator("#messages li").all()), 500)
        self.assertInSeqOrder(shown)
        self.assertEqual(shown[-1][2], "line 699")
        first = shown[0][0]
        self.assertLessEqual(page.evaluate("window.__writes"), 10)  # (was 700)

        older = page.locator("#older-button")
        expect(older).to_be_visible()
        older.click()
        page.wait_for_function(
            "seq => document.querySelector("
            "`#messages li.message[data-seq='${seq}']`) !== null",
            arg=first - 100,
        )
        again = self.shown(page)
        self.assertInSeqOrder(again)
        self.assertEqual((again[0][0], again[-1][0]), (first - 100, shown[-1][0]))

        # Leaving the page saves where it was: the next visit asks for
        # nothing it has seen.
        page.goto(server.url + "not-the-page")  # (same origin: its storage)
        saved = page.evaluate("JSON.parse(localStorage.getItem('netlab-chat'))")
        self.assertEqual(saved["rooms"]["busy"], shown[-1][0])

    def test_privateConversationsAreBounded(self) -> None:
        """
        Anyone can open a private conversation with a page: it keeps the
        50 most recently active (and the one shown).
        """
        from playwright.sync_api import expect

        server = self.server()
        page = self.browser.new_context().new_page()
        page.on("pageerror", lambda error: self.pageErrors.append(str(error)))
        proxies: list[Any] = []

        def proxy(ws: Any) -> None:
            ws.connect_to_server()
            proxies.append(ws)

        page.route_web_socket(f"ws://127.0.0.1:{server.webPort}/ws", proxy)
        page.goto(server.url)
        self.register(page, "alice")
        self.join(page, "lobby")
        for i in range(60):
            message = {"type": "private", "from": f"user{i}", "text": f"hi {i}"}
            proxies[-1].send(json.dumps(message))
        expect(page.locator("#private-list li")).to_have_count(50)
        names = page.locator("#private-list button").evaluate_all(
            "buttons => buttons.map(b => b.dataset.user)"
        )
        self.assertEqual(names, [f"user{i}" for i in range(10, 60)])

    def test_phoneSizeAndScreenshots(self) -> None:
        from playwright.sync_api import expect

        server = self.server()
        carol = self.terminal(server.port)
        carol.login("carol", register=True)
        carol.call({"type": "join", "room": "lobby"})
        bob = self.page(server.url)
        self.register(bob, "bob")
        self.join(bob, "lobby")
        desktop = self.page(server.url, viewport={"width": 1280, "height": 800})
        self.register(desktop, "alice")
        self.join(desktop, "lobby")
        self.join(desktop, "random")
        desktop.locator('#room-list button[data-room="lobby"]').click()
        for who, text in [
            ("carol", "Morning! Anyone up for the lab at 10?"),
            ("bob", "Yes, I have the cables."),
            ("alice", "On my way, from the browser this time."),
            ("carol", "Typed in my terminal: <b>tags</b> stay text."),
        ]:
            before = len(self.shown(desktop))
            if who == "carol":
                carol.say("lobby", text)
            else:
                self.say(bob if who == "bob" else desktop, text)
            self.waitShown(desktop, before + 1)
        directory = Path(os.environ.get("NETLAB_SCREENSHOTS", self.workdir))
        directory.mkdir(parents=True, exist_ok=True)
        desktop.click("#rooms-refresh")
        expect(desktop.locator("#directory button")).to_have_count(2)
        desktop.screenshot(path=str(directory / "chat-desktop.png"))

        phone = self.page(
            server.url,
            viewport={"width": 390, "height": 844},
            device_scale_factor=2,
            is_mobile=True,
            has_touch=True,
        )
        self.login(phone, "alice")
        # The rooms are in a drawer; choosing one closes it.
        for room in ("random", "lobby"):
            phone.click("#drawer-button")
            self.join(phone, room)
            expect(phone.locator("#sidebar")).to_be_hidden()
        self.waitShown(phone, 4)
        # Nothing wider than the screen; the message box and the drawer
        # button within reach; the room list in a drawer.
        self.assertLessEqual(
            phone.evaluate("document.documentElement.scrollWidth"), 390
        )
        for selector in ("#composer-input", "#send-button", "#drawer-button"):
            expect(phone.locator(selector)).to_be_in_viewport()
        expect(phone.locator("#sidebar")).to_be_hidden()
        phone.screenshot(path=str(directory / "chat-phone.png"))
        phone.click("#drawer-button")
        expect(phone.locator("#sidebar")).to_be_visible()
        phone.screenshot(path=str(directory / "chat-phone-rooms.png"))
        phone.locator('#room-list button[data-room="random"]').click()
        expect(phone.locator("#sidebar")).to_be_hidden()
        expect(phone.locator("#conversation-title")).to_have_text("#random")
