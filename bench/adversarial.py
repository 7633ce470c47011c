"""
Adversarial load (issue 9): hostile clients against real `twistd -n`
servers, each class of attack for a bounded time, measuring what it costs
the server.

    python bench/adversarial.py [--duration 4] [--only NAME] [--list]

Each class starts its own server processes on free loopback ports (each in
a temporary directory with its own --db, --logfile and --pidfile), lets the
server settle, then runs the attack for about --duration seconds (some
classes are bounded by a request count first) and waits up to --drain
seconds for the replies that are still due.  For each server it prints:

  - the server's RSS before the attack and its peak during it
    (/proc/<pid>/status VmRSS, sampled every 50 ms), and the growth;
  - replies lost: requests that a well-behaved client sent (a probe that
    pings every 50 ms from 127.0.0.2, a victim, an innocent user) or that a
    cooperating attacker sent and read for, that got no reply at all.  Any
    reply counts as an answer, errors included (`rate_limited`,
    `slow_consumer`, ...); so does a close announced by an `error` without
    an id (the requests behind it were refused, not lost);
  - lines of the server's log (all of its rotated files) with "Traceback",
    and with "CRITICAL" or "Unhandled", written during the attack, and the
    log bytes written.

It ends with a summary table and a verdict per class against the targets
of issue 9: RSS growth under 64 MiB, 0 replies lost, 0 tracebacks.  It is a
measurement, not a test: the exit status is 0 whatever it finds.  Every
connection goes to 127.0.0.1 (from 127.0.0.1, or from 127.0.0.2 for the
probe and the innocent user, so that per-address limits aimed at the
attacker do not hit them); every loop is bounded in count and time.  A
server whose RSS passes --rss-cap-mib has its attackers cut off at once.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import os
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BIN = Path(sys.executable).parent

HOST = "127.0.0.1"
#: Source address of well-behaved clients (the probe, the innocent user).
GOOD_ADDRESS = "127.0.0.2"
HEADER = struct.Struct("!I")
PASSWORD = "adversary-password"
MiB = 1024 * 1024
TARGET_GROWTH_MIB = 64
CHEAP_HASH = ["--hash-memory-kib", "1024", "--hash-time-cost", "1"]
MANY_REGISTRATIONS = ["--registrations-per-hour", "1000000"]
#: Failed logins an account gets before back-off (docs/protocol.md 3.2).
FREE_FAILURES = 5
#: Chat's default room rate and burst (docs/protocol.md 3.3).
ROOM_RATE, ROOM_BURST = 10, 20
#: Error codes a server sends, without an id, just before it closes.
CLOSING_CODES = {
    "bad_request",
    "frame_too_long",
    "frame_timeout",
    "idle_timeout",
    "slow_consumer",
    "too_many_connections",
    "server_shutdown",
    "rate_limited",
    "session_revoked",
    "session_expired",
}


# -- wire helpers ---------------------------------------------------------------


def frame(payload: bytes) -> bytes:
    return HEADER.pack(len(payload)) + payload


def request(message: dict[str, Any]) -> bytes:
    return frame(json.dumps(message, separators=(",", ":")).encode())


class Closed(Exception):
    """
    The server closed (or reset) the connection.
    """


class Conn:
    """
    A client socket to a server on 127.0.0.1 that speaks frames.

    The socket has a short fixed timeout, so that one thread may write
    while another reads; every wait is bounded by a deadline.
    """

    def __init__(
        self,
        port: int,
        *,
        source: str | None = None,
        rcvbuf: int | None = None,
        timeout: float = 10.0,
    ) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if rcvbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            if source is not None:
                sock.bind((source, 0))
            sock.settimeout(timeout)
            sock.connect((HOST, port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(0.2)
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self.buffer = bytearray()
        self.offset = 0
        self.eof = False
        self.reset = False
        self.nextId = itertools.count(1)

    # sending

    def send(
        self,
        data: bytes,
        until: float | None = None,
        stop: threading.Event | None = None,
    ) -> int:
        """
        Write C{data}; the bytes written, fewer if C{until} passed, C{stop}
        was set or the connection broke (30 s at most).
        """
        view = memoryview(data)
        until = time.monotonic() + 30 if until is None else until
        sent = 0
        while sent < len(view):
            if time.monotonic() > until or (stop is not None and stop.is_set()):
                break
            try:
                sent += self.sock.send(view[sent : sent + (1 << 20)])
            except TimeoutError:
                continue
            except OSError:
                self.reset = True
                break
        return sent

    def sendMessage(self, message: dict[str, Any]) -> None:
        data = request(message)
        if self.send(data) < len(data):
            raise Closed("could not send")

    # receiving

    def _popFrame(self) -> bytes | None:
        available = len(self.buffer) - self.offset
        if available < 4:
            return None
        (length,) = HEADER.unpack_from(self.buffer, self.offset)
        if available < 4 + length:
            return None
        start = self.offset + 4
        payload = bytes(self.buffer[start : start + length])
        self.offset = start + length
        if self.offset > 1 << 20 and self.offset * 2 > len(self.buffer):
            del self.buffer[: self.offset]
            self.offset = 0
        return payload

    def fill(self, until: float) -> bool:
        """
        Read once more into the buffer; False at the deadline.

        @raise Closed: at end of input or on a reset.
        """
        if self.eof:
            raise Closed("end of input")
        while time.monotonic() < until:
            try:
                data = self.sock.recv(1 << 18)
            except TimeoutError:
                continue
            except OSError as e:
                self.eof = self.reset = True
                raise Closed(str(e)) from None
            if not data:
                self.eof = True
                raise Closed("end of input")
            self.buffer += data
            return True
        return False

    def recvFrame(self, timeout: float = 10.0) -> bytes | None:
        """
        The next frame's payload, or None after C{timeout} seconds.
        """
        until = time.monotonic() + timeout
        while True:
            payload = self._popFrame()
            if payload is not None:
                return payload
            if not self.fill(until):
                return None

    def recvMessage(self, timeout: float = 10.0) -> dict[str, Any] | None:
        payload = self.recvFrame(timeout)
        if payload is None:
            return None
        try:
            message = json.loads(payload)
        except ValueError:
            return {"type": "undecodable"}
        return message if isinstance(message, dict) else {"type": "undecodable"}

    def call(self, message: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        """
        Send C{message} with a fresh id and return its reply (messages
        without that id are skipped).
        """
        requestId = next(self.nextId)
        self.sendMessage({**message, "id": requestId})
        until = time.monotonic() + timeout
        while (left := until - time.monotonic()) > 0:
            reply = self.recvMessage(left)
            if reply is not None and reply.get("id") == requestId:
                return reply
        raise TimeoutError(f"no reply to {message['type']} in {timeout} s")

    def close(self, abort: bool = False) -> None:
        if abort:
            with suppress(OSError):
                self.sock.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
        self.sock.close()


def closingCode(messages: list[dict[str, Any]]) -> str | None:
    """
    The code of the error (without an id) that announced a close, if the
    last message is one.
    """
    if messages:
        last = messages[-1]
        if last.get("type") == "error" and "id" not in last:
            code = last.get("code")
            if code in CLOSING_CODES:
                return str(code)
    return None


def account(
    port: int,
    username: str,
    *,
    register: bool = True,
    source: str | None = None,
    rcvbuf: int | None = None,
) -> Conn:
    """
    A connection logged in as C{username} (registered first if asked).
    """
    conn = Conn(port, source=source, rcvbuf=rcvbuf)
    if register:
        reply = conn.call(
            {"type": "register", "username": username, "password": PASSWORD}
        )
        if reply.get("type") != "registered" and reply.get("code") != "username_taken":
            raise RuntimeError(f"cannot register {username}: {reply}")
    reply = conn.call({"type": "login", "username": username, "password": PASSWORD})
    if reply.get("type") != "session":
        raise RuntimeError(f"cannot log in {username}: {reply}")
    return conn


def joinRoom(conn: Conn, room: str) -> dict[str, Any]:
    reply = conn.call({"type": "join", "room": room})
    if reply.get("type") != "joined":
        raise RuntimeError(f"cannot join {room}: {reply}")
    return reply


# -- pipelines ----------------------------------------------------------------


@dataclass
class Pipe:
    """
    What came back for a pipeline of requests on one connection.
    """

    total: int = 0  # requests meant to be sent
    sent: int = 0  # requests completely written
    answered: int = 0  # replies with an id
    ids: list[Any] = field(default_factory=list)  # reply ids, in arrival order
    codes: Counter[str] = field(default_factory=Counter)  # reply type or code
    unsolicited: int = 0
    closed: str | None = None  # "eof", "reset", or the closing error's code
    sendSeconds: float = 0.0
    seconds: float = 0.0

    @property
    def unanswered(self) -> int:
        return max(0, self.sent - self.answered)

    @property
    def lost(self) -> int:
        """
        Requests sent and never answered, unless an error announced the
        close (then they were refused).
        """
        if self.closed in CLOSING_CODES:
            return 0
        return self.unanswered


def pipeline(
    conn: Conn,
    frames: list[bytes],
    sendUntil: float,
    drainUntil: float,
    stop: threading.Event | None = None,
    keep: Callable[[dict[str, Any]], None] | None = None,
    giveUpAfter: float | None = None,
) -> Pipe:
    """
    Write C{frames} (requests with ids) from one thread while reading the
    replies in this one, until every request sent is answered, the server
    closes, C{drainUntil}, or (with C{giveUpAfter}) nothing came for that
    many seconds after the last request was written.
    """
    data = b"".join(frames)
    ends = list(itertools.accumulate(len(f) for f in frames))
    result = Pipe(total=len(frames))
    written = [0]
    done = threading.Event()
    start = time.monotonic()

    def write() -> None:
        written[0] = conn.send(data, until=sendUntil, stop=stop)
        result.sendSeconds = time.monotonic() - start
        done.set()

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    last: list[dict[str, Any]] = []
    lastReceived = start
    try:
        while (now := time.monotonic()) < drainUntil:
            if stop is not None and stop.is_set():
                break
            if done.is_set():
                result.sent = bisect.bisect_right(ends, written[0])
                if result.answered >= result.sent:
                    break
                if giveUpAfter is not None and now - lastReceived > giveUpAfter:
                    break
            message = conn.recvMessage(min(0.2, drainUntil - now))
            if message is None:
                continue
            lastReceived = time.monotonic()
            last = [message]
            if "id" in message:
                result.answered += 1
                result.ids.append(message["id"])
                result.codes[str(message.get("code", message.get("type")))] += 1
            else:
                result.unsolicited += 1
            if keep is not None:
                keep(message)
    except Closed:
        result.closed = closingCode(last) or ("reset" if conn.reset else "eof")
    writer.join(5)
    result.sent = bisect.bisect_right(ends, written[0])
    result.seconds = time.monotonic() - start
    return result


def checksAllowed(seconds: float) -> int:
    """
    Password checks the documented throttle allows on one account within
    C{seconds}: 5 free failures, one more, then one after each back-off
    (1 s, 2 s, 4 s, ...) has passed.
    """
    allowed = FREE_FAILURES + 1
    backoff, waited = 1.0, 1.0
    while waited <= seconds:
        allowed += 1
        backoff *= 2
        waited += backoff
    return allowed


def describe(codes: Counter[str]) -> str:
    return ", ".join(f"{code} {n:,}" for code, n in codes.most_common()) or "none"


# -- servers ------------------------------------------------------------------


class Server:
    """
    One real C{twistd -n} process on a free port of 127.0.0.1, in a
    temporary directory of its own.
    """

    def __init__(self, plugin: str, options: list[str], keep: bool = False) -> None:
        self.plugin = plugin
        self.options = options
        self.keep = keep
        self.workdir = Path(tempfile.mkdtemp(prefix=f"netlab-adversarial-{plugin}-"))
        self.logFile = self.workdir / "server.log"
        self.eventLog = self.workdir / "events.jsonl"
        self.portFile = self.workdir / "port"
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def json(self) -> bool:
        return self.plugin != "netlab-echo"

    def start(self) -> Server:
        command = [
            str(BIN / "twistd"),
            "-n",
            "--pidfile",
            str(self.workdir / "twistd.pid"),
            "--logfile",
            str(self.logFile),
            self.plugin,
            "--port",
            "0",
            "--port-file",
            str(self.portFile),
            "--event-log",
            str(self.eventLog),
        ]
        if self.json:
            command += ["--db", str(self.workdir / "db.sqlite3")]
        with open(self.workdir / "stdout", "wb") as out:
            self.process = subprocess.Popen(
                command + self.options,
                cwd=self.workdir,
                env=dict(os.environ, PYTHONPATH=str(REPO)),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while not self.portFile.exists():
            if time.monotonic() > deadline or self.process.poll() is not None:
                output = (self.workdir / "stdout").read_text(errors="replace")
                self.stop()
                raise RuntimeError(f"{self.plugin} did not start: {output[-300:]}")
            time.sleep(0.05)
        time.sleep(0.05)
        self.port = int(self.portFile.read_text())
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def rss(self) -> int:
        """
        The server's resident set size in bytes (0 once it has exited).
        """
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return 0
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def logStats(self) -> tuple[int, int, int]:
        """
        (bytes, "Traceback" lines, "CRITICAL"/"#critical]"/"Unhandled"
        lines) over the log file and its rotated copies.
        """
        size = tracebacks = critical = 0
        for path in self.workdir.glob("server.log*"):
            try:
                data = path.read_bytes()
            except OSError:
                continue
            size += len(data)
            if b"Traceback" in data or b"critical" in data.lower():
                for line in data.splitlines():
                    if b"Traceback" in line:
                        tracebacks += 1
                    # twistd's text log writes the level as "[...#critical]".
                    if (
                        b"CRITICAL" in line
                        or b"#critical]" in line
                        or b"Unhandled" in line
                    ):
                        critical += 1
        return size, tracebacks, critical

    def events(self) -> Counter[str]:
        """
        How many times each event (the C{event} field) was logged.
        """
        return Counter(str(record.get("event")) for record in self.eventRecords())

    def eventRecords(self, name: str | None = None) -> list[dict[str, Any]]:
        """
        The JSON event log's records (those named C{name}, if given), from
        the log and its rotated copies (in no particular order).
        """
        records = []
        # The event log rotates (events.jsonl.1, .2, ... are older).
        for path in self.workdir.glob("events.jsonl*"):
            try:
                with path.open("rb") as f:
                    for line in f:
                        if name is not None and name.encode() not in line:
                            continue
                        try:
                            record = json.loads(line)
                        except ValueError:
                            continue
                        if isinstance(record, dict) and "event" in record:
                            if name is None or record["event"] == name:
                                records.append(record)
            except OSError:
                continue
        return records

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)


class Sampler(threading.Thread):
    """
    Samples a server's RSS every 50 ms; sets C{overCap} past the cap.
    """

    def __init__(self, server: Server, cap: int) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.cap = cap
        self.peak = 0
        self.overCap = threading.Event()
        self.finished = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + 600
        while not self.finished.is_set() and time.monotonic() < deadline:
            rss = self.server.rss()
            self.peak = max(self.peak, rss)
            if rss > self.cap:
                self.overCap.set()
            self.finished.wait(0.05)


# -- the well-behaved probe ---------------------------------------------------------


class Probe(threading.Thread):
    """
    A well-behaved client on its own connection from GOOD_ADDRESS: one
    request every 50 ms (C{ping} on the JSON services, a small frame on
    echo), each waited for up to 5 s.  Counts the ones never answered.
    """

    def __init__(self, server: Server, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.interval = interval
        self.sent = 0
        self.lost = 0
        self.reconnects = 0
        self.worst = 0.0
        self.finished = threading.Event()

    def connect(self) -> Conn:
        conn = Conn(self.server.port, source=GOOD_ADDRESS, timeout=5)
        if self.server.plugin == "netlab-identity":
            conn.recvMessage(5)  # the greeting
        return conn

    def exchange(self, conn: Conn, n: int) -> bool:
        start = time.monotonic()
        if self.server.json:
            conn.sendMessage({"type": "ping", "id": n})
            until = start + 5
            while (left := until - time.monotonic()) > 0:
                reply = conn.recvMessage(left)
                if reply is not None and reply.get("id") == n:
                    self.worst = max(self.worst, time.monotonic() - start)
                    return True
            return False
        payload = b"probe %d" % n
        if conn.send(frame(payload)) < 4 + len(payload):
            raise Closed("could not send")
        reply = conn.recvFrame(5)
        self.worst = max(self.worst, time.monotonic() - start)
        return reply == payload

    def run(self) -> None:
        conn: Conn | None = None
        deadline = time.monotonic() + 600
        for n in range(1, 100_000):
            if self.finished.is_set() or time.monotonic() > deadline:
                break
            try:
                if conn is None:
                    conn = self.connect()
                self.sent += 1
                if not self.exchange(conn, n):
                    raise Closed("no reply")
            except (OSError, Closed):
                self.lost += 1
                if conn is not None:
                    conn.close()
                conn = None
                self.reconnects += 1
                self.finished.wait(0.2)
            self.finished.wait(self.interval)
        if conn is not None:
            conn.close()

    def stopped(self) -> Probe:
        self.finished.set()
        self.join(10)
        return self


# -- measurements ---------------------------------------------------------------


@dataclass
class Row:
    klass: str
    target: str
    baseline: int = 0
    peak: int = 0
    lost: int = 0
    tracebacks: int = 0
    critical: int = 0
    logBytes: int = 0
    capped: bool = False
    events: Counter[str] = field(default_factory=Counter)
    #: Documented limits the attack got past (a guesser's session, ...).
    breaches: list[str] = field(default_factory=list)

    @property
    def growth(self) -> int:
        return self.peak - self.baseline

    def failures(self) -> list[str]:
        why = []
        if self.growth >= TARGET_GROWTH_MIB * MiB or self.capped:
            why.append("rss")
        if self.lost:
            why.append("lost")
        if self.tracebacks or self.critical:
            why.append("tracebacks")
        if self.breaches:
            why.append("breach")
        return why


class Measurement:
    """
    One server under one attack: RSS sampling, log and event deltas, a
    well-behaved probe, and the replies lost that the attack reports.
    """

    def __init__(self, run: Run, server: Server, klass: str, target: str) -> None:
        self.run = run
        self.server = server
        self.row = Row(klass, target)
        self.sampler = Sampler(server, run.rssCap)
        self.probe: Probe | None = None

    @property
    def stop(self) -> threading.Event:
        """
        Set when the server's RSS passed the cap: attackers give up.
        """
        return self.sampler.overCap

    def lose(self, count: int, what: str) -> None:
        self.row.lost += count
        if count:
            self.note(f"{count:,} {what}")

    def note(self, text: str) -> None:
        print(f"  {self.row.target}: {text}", flush=True)

    def breach(self, text: str) -> None:
        """
        The attack got past a documented limit (reported as a failure).
        """
        self.row.breaches.append(text)
        self.note(f"BREACH: {text}")

    def __enter__(self) -> Measurement:
        time.sleep(0.3)  # let the setup's garbage settle
        self.row.baseline = self.server.rss()
        self.logBefore = self.server.logStats()
        self.eventsBefore = self.server.events()
        self.sampler.start()
        self.probe = Probe(self.server)
        self.probe.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.probe is not None
        probe = self.probe.stopped()
        self.sampler.finished.set()
        self.sampler.join(5)
        row = self.row
        row.peak = max(self.sampler.peak, row.baseline)
        row.capped = self.sampler.overCap.is_set()
        size, tracebacks, critical = self.server.logStats()
        row.logBytes = size - self.logBefore[0]
        row.tracebacks = tracebacks - self.logBefore[1]
        row.critical = critical - self.logBefore[2]
        row.events = self.server.events() - self.eventsBefore
        self.lose(probe.lost, f"of {probe.sent:,} probe requests unanswered")
        if not self.server.alive():
            self.note("THE SERVER EXITED")
        notable = {
            name: n
            for name, n in row.events.items()
            if name
            in {
                "slow_consumer",
                "rate_limited",
                "internal_error",
                "frame_timeout",
                "frame_too_long",
                "connection_refused",
                "idle_timeout",
                "login_failed",
                "private_sent",
            }
        }
        if row.capped:
            self.note(f"RSS passed the cap of {self.run.rssCap // MiB} MiB: stopped")
        self.note(
            f"probe: {probe.sent:,} requests, worst reply {probe.worst * 1000:.0f} ms"
            + (f"; server events: {describe(Counter(notable))}" if notable else "")
        )
        print(
            f"  {row.target}: RSS {row.baseline / MiB:.1f} -> "
            f"{row.peak / MiB:.1f} MiB (+{row.growth / MiB:.1f}); "
            f"lost {row.lost:,}; log: {row.tracebacks} Traceback, "
            f"{row.critical} CRITICAL/Unhandled lines, {row.logBytes / 1024:,.1f} KiB",
            flush=True,
        )
        self.run.rows.append(row)


class Run:
    """
    The options and the results of one run.
    """

    def __init__(self, options: argparse.Namespace) -> None:
        self.duration: float = options.duration
        self.drain: float = options.drain
        self.rssCap: int = options.rss_cap_mib * MiB
        self.keep: bool = options.keep
        self.rows: list[Row] = []
        self.servers: list[Server] = []

    def server(self, plugin: str, *options: str) -> Server:
        server = Server(plugin, list(options), keep=self.keep)
        self.servers.append(server)
        return server.start()

    @contextmanager
    def measure(self, server: Server, klass: str, target: str) -> Iterator[Measurement]:
        with Measurement(self, server, klass, target) as m:
            yield m
        server.stop()

    def stopAll(self) -> None:
        for server in self.servers:
            server.stop()


# -- the hostile classes ---------------------------------------------------------


def historyFlood(run: Run) -> None:
    """
    Chat history flood, never reading: a room with 200 messages of 4,000
    characters, then 5,000 `history` (limit 100) requests pipelined as fast
    as the server takes them (4 KiB receive buffer), never read.
    """
    server = run.server(
        "netlab-chat",
        *CHEAP_HASH,
        *MANY_REGISTRATIONS,
        # Only for the setup user's 200 messages; the attack is `history`.
        "--message-rate",
        "1000",
        "--message-burst",
        "1000",
    )
    poster = account(server.port, "poster")
    joinRoom(poster, "big")
    text = "h" * 4000
    for i in range(200):
        poster.sendMessage({"type": "say", "room": "big", "text": text, "id": i})
    seen = 0
    until = time.monotonic() + 30
    while seen < 200 and time.monotonic() < until:
        message = poster.recvMessage(1)
        if message is not None and message.get("type") == "message":
            seen += 1
    poster.close()
    attacker = account(server.port, "hoarder", rcvbuf=4096)
    frames = [
        request({"type": "history", "room": "big", "limit": 100, "id": i})
        for i in range(5000)
    ]
    data = b"".join(frames)
    ends = list(itertools.accumulate(len(f) for f in frames))
    with run.measure(server, "history-flood", "chat") as m:
        m.note(f"room 'big' has {seen} messages of 4,000 characters")
        start = time.monotonic()
        written = attacker.send(data, until=start + run.duration, stop=m.stop)
        sentSeconds = time.monotonic() - start
        m.note(
            f"attacker wrote {bisect.bisect_right(ends, written):,} of "
            f"{len(frames):,} history requests "
            f"({written / 1024:,.0f} KiB) in {sentSeconds:.1f} s, reading nothing"
        )
        m.stop.wait(max(0.0, start + run.duration - time.monotonic()) + 1)
        if m.stop.is_set():
            attacker.close(abort=True)
            m.note("attacker cut off to save the machine")
        else:
            # What happened to the attacker: read for up to 2 s.
            got = Counter[str]()
            received = 0
            until = time.monotonic() + 2
            try:
                while time.monotonic() < until:
                    payload = attacker.recvFrame(until - time.monotonic())
                    if payload is None:
                        break
                    received += len(payload) + 4
                    if payload.startswith(b'{"type":"error"'):
                        got[json.loads(payload).get("code", "?")] += 1
                    else:
                        got["reply"] += 1
                ending = "still open"
            except Closed:
                ending = "closed by the server"
            m.note(
                f"attacker then read for 2 s: {received / MiB:,.1f} MiB "
                f"({describe(got)}), {ending}"
            )
            attacker.close(abort=True)
        time.sleep(0.5)


def loginGuesses(run: Run) -> None:
    """
    Concurrent login guesses: 40 wrong `change_password` on one logged-in
    connection; then 300 wrong `login` for one account sent at once from
    one address (30 connections, 10 pipelined each), the right password
    right behind them, and an innocent user (another address) logging in
    during and after.
    """
    server = run.server("netlab-auth", *MANY_REGISTRATIONS)
    setup = Conn(server.port)
    for name in ("victim", "innocent", "changer"):
        setup.call({"type": "register", "username": name, "password": PASSWORD})
    setup.close()
    with run.measure(server, "login-guesses", "auth") as m:
        changer = account(server.port, "changer", register=False)
        frames = [
            request(
                {
                    "type": "change_password",
                    "old": f"wrong-old-{i}",
                    "new": "brand-new-password",
                    "id": i,
                }
            )
            for i in range(40)
        ]
        start = time.monotonic()
        pipe = pipeline(changer, frames, start + 10, start + 30, m.stop)
        changer.close()
        m.note(
            f"40 change_password with a wrong old password on one connection: "
            f"{describe(pipe.codes)} in {pipe.seconds:.2f} s"
        )
        m.lose(pipe.lost, "change_password requests unanswered")
        allowed = checksAllowed(pipe.seconds)
        if pipe.codes["bad_credentials"] > allowed:
            m.breach(
                f"{pipe.codes['bad_credentials']} wrong old passwords checked in "
                f"{pipe.seconds:.1f} s (the login throttle allows {allowed})"
            )

        conns = [Conn(server.port) for _ in range(30)]
        right = Conn(server.port)
        innocentLatencies: list[tuple[float, float, str]] = []
        innocentLost = [0]
        stormOver = threading.Event()

        def innocent() -> None:
            conn = Conn(server.port, source=GOOD_ADDRESS)
            deadline = time.monotonic() + 60
            extra = 2  # logins after the storm is over
            while extra and time.monotonic() < deadline:
                if stormOver.is_set():
                    extra -= 1
                began = time.monotonic()
                try:
                    reply = conn.call(
                        {
                            "type": "login",
                            "username": "innocent",
                            "password": PASSWORD,
                        },
                        timeout=30,
                    )
                except (TimeoutError, Closed, OSError):
                    innocentLost[0] += 1
                    break
                innocentLatencies.append(
                    (
                        began - start,
                        time.monotonic() - began,
                        str(reply.get("code", reply.get("type"))),
                    )
                )
                time.sleep(0.2)
            conn.close()

        guesses = [
            request(
                {
                    "type": "login",
                    "username": "victim",
                    "password": f"wrong-guess-{i}",
                    "id": i,
                }
            )
            for i in range(300)
        ]
        start = time.monotonic()
        helper = threading.Thread(target=innocent, daemon=True)
        helper.start()
        for i, conn in enumerate(conns):
            conn.send(b"".join(guesses[i * 10 : i * 10 + 10]))
        right.send(
            request(
                {"type": "login", "username": "victim", "password": PASSWORD, "id": 300}
            )
        )
        sentIn = time.monotonic() - start
        codes: Counter[str] = Counter()
        rightReply = "no reply"
        answered = 0
        selector = selectors.DefaultSelector()
        for conn in [*conns, right]:
            selector.register(conn.sock, selectors.EVENT_READ, conn)
        deadline = start + max(run.duration, 30)
        while answered < 301 and time.monotonic() < deadline:
            for key, _ in selector.select(0.2):
                conn = key.data
                try:
                    conn.fill(time.monotonic() + 0.01)
                except Closed:
                    selector.unregister(conn.sock)
                    continue
                while (payload := conn._popFrame()) is not None:
                    reply = json.loads(payload)
                    answered += 1
                    code = str(reply.get("code", reply.get("type")))
                    if conn is right:
                        rightReply = code
                    else:
                        codes[code] += 1
        stormSeconds = time.monotonic() - start
        stormOver.set()
        selector.close()
        for conn in [*conns, right]:
            conn.close()
        helper.join(60)
        m.note(
            f"300 wrong logins sent at once in {sentIn * 1000:.0f} ms "
            f"(30 connections x 10): {describe(codes)}; "
            f"all answered in {stormSeconds:.1f} s"
        )
        m.note(f"the right password right behind them: {rightReply}")
        if rightReply == "session":
            m.breach("the guesser's right password got a session")
        allowed = checksAllowed(stormSeconds)
        if codes["bad_credentials"] > allowed:
            m.breach(
                f"{codes['bad_credentials']} of the concurrent guesses were "
                f"checked in {stormSeconds:.1f} s (the throttle allows {allowed})"
            )
        m.lose(301 - answered, "login requests unanswered")
        during = [lat for at, lat, _ in innocentLatencies[:-2]]
        after = innocentLatencies[-2:]
        m.note(
            f"innocent user (from {GOOD_ADDRESS}): {len(during)} logins during "
            f"the storm, worst {max(during, default=0) * 1000:.0f} ms; after it: "
            + ", ".join(f"{lat * 1000:.0f} ms ({code})" for _, lat, code in after)
        )
        m.lose(innocentLost[0], "innocent logins unanswered")


def deepPipeline(run: Run) -> None:
    """
    Deep pipelining: 100,000 `ping` requests pipelined behind a slow one
    (a `login`, which hashes, on auth and chat; a `name`, which commits, on
    identity), replies read as they come; counted in order.
    """
    count = 100_000
    for plugin, target, options in (
        ("netlab-auth", "auth", MANY_REGISTRATIONS),
        ("netlab-chat", "chat", MANY_REGISTRATIONS),
        ("netlab-identity", "identity", []),
    ):
        server = run.server(plugin, *options)
        if plugin == "netlab-identity":
            slow = {"type": "name", "name": "Pipeliner", "id": -1}
        else:
            setup = Conn(server.port)
            setup.call({"type": "register", "username": "piper", "password": PASSWORD})
            setup.close()
            slow = {"type": "login", "username": "piper", "password": PASSWORD}
            slow["id"] = -1
        frames = [request(slow)] + [
            request({"type": "ping", "id": i}) for i in range(count)
        ]
        with run.measure(server, "deep-pipeline", target) as m:
            conn = Conn(server.port)
            if plugin == "netlab-identity":
                conn.recvMessage(5)  # the greeting
            start = time.monotonic()
            pipe = pipeline(
                conn,
                frames,
                start + max(run.duration, 10),
                start + max(run.duration, 10) + run.drain,
                m.stop,
                giveUpAfter=run.drain,
            )
            conn.close()
            inOrder = sum(
                1
                for previous, got in itertools.pairwise([-2, *pipe.ids])
                if isinstance(got, int) and got > previous
            )
            m.note(
                f"{pipe.sent:,} of {pipe.total:,} requests written in "
                f"{pipe.sendSeconds:.1f} s; {pipe.answered:,} replies "
                f"({inOrder:,} in order) in {pipe.seconds:.1f} s; "
                f"replies: {describe(pipe.codes)}; connection: "
                f"{pipe.closed or 'open'}"
            )
            m.lose(pipe.lost, "pipelined requests unanswered (sent - received)")
            if pipe.sent < pipe.total:
                m.lose(pipe.total - pipe.sent, "requests the server never read")


def privateFlood(run: Run) -> None:
    """
    Private message flood: one user pipelines `msg` at another online user
    as fast as the server takes them (reading its own replies); the victim
    reads normally and pings every 50 ms.
    """
    server = run.server("netlab-chat", *CHEAP_HASH, *MANY_REGISTRATIONS)
    flooder = account(server.port, "flooder")
    victim = account(server.port, "victim", source=GOOD_ADDRESS)
    text = "p" * 200
    frames = [
        request({"type": "msg", "to": "victim", "text": text, "id": i})
        for i in range(200_000)
    ]
    with run.measure(server, "private-flood", "chat") as m:
        stopVictim = threading.Event()
        got = Counter[str]()
        pings = {"sent": 0, "answered": 0}
        cut = ["no"]
        last: list[dict[str, Any]] = []

        def readVictim() -> None:
            deadline = time.monotonic() + 120
            nextPing = time.monotonic()
            try:
                while not stopVictim.is_set() and time.monotonic() < deadline:
                    if time.monotonic() >= nextPing:
                        pings["sent"] += 1
                        victim.sendMessage({"type": "ping", "id": pings["sent"]})
                        nextPing += 0.05
                    message = victim.recvMessage(0.05)
                    while message is not None:
                        last[:] = [message]
                        if message.get("type") == "pong":
                            pings["answered"] += 1
                        elif message.get("type") == "error":
                            got[f"error {message.get('code')}"] += 1
                        else:
                            got[str(message.get("type"))] += 1
                        message = victim.recvMessage(0)
            except Closed:
                cut[0] = f"YES ({closingCode(last) or 'closed without a reason'})"

        reader = threading.Thread(target=readVictim, daemon=True)
        reader.start()
        start = time.monotonic()
        pipe = pipeline(
            flooder, frames, start + run.duration, start + run.duration + run.drain
        )
        time.sleep(0.5)
        stopVictim.set()
        reader.join(10)
        flooder.close()
        victim.close()
        accepted = pipe.codes.get("sent", 0)
        m.note(
            f"flooder wrote {pipe.sent:,} msg in {pipe.sendSeconds:.1f} s: "
            f"{describe(pipe.codes)}; accepted {accepted / pipe.seconds:,.0f}/s; "
            f"connection: {pipe.closed or 'open'}"
        )
        m.note(
            f"victim received {describe(got)}; pings {pings['answered']:,} of "
            f"{pings['sent']:,} answered; cut off: {cut[0]}"
        )
        m.lose(pipe.lost, "msg requests unanswered")
        m.lose(pings["sent"] - pings["answered"], "victim pings unanswered")
        # The bucket refills while queued requests are still being handled:
        # count the whole pipeline, and a second more for rounding.
        allowed = ROOM_BURST + ROOM_RATE * (pipe.seconds + 1)
        if accepted > allowed:
            m.breach(
                f"{accepted:,} private messages delivered in {pipe.seconds:.1f} s "
                f"(the room rate, {ROOM_RATE}/s burst {ROOM_BURST}, allows "
                f"{allowed:.0f})"
            )


def bigNumbers(run: Run) -> None:
    """
    Out-of-range numbers: 2,000 `history` requests whose `after` has 20
    digits (past SQLite's 64-bit integers), pipelined; after a close the
    attacker logs in again and goes on.
    """
    server = run.server("netlab-chat", *CHEAP_HASH, *MANY_REGISTRATIONS)
    account(server.port, "numbers").close()
    after = int("9" * 20)
    with run.measure(server, "big-numbers", "chat") as m:
        codes: Counter[str] = Counter()
        closes: Counter[str] = Counter()
        start = time.monotonic()
        deadline = start + max(run.duration, 5)
        total = 2000
        sent = lost = 0
        for _ in range(200):
            if sent >= total or time.monotonic() > deadline:
                break
            conn = account(server.port, "numbers", register=False)
            frames = [
                request({"type": "history", "room": "r", "after": after, "id": i})
                for i in range(sent, total)
            ]
            pipe = pipeline(conn, frames, deadline, deadline + run.drain, m.stop)
            conn.close()
            codes += pipe.codes
            sent += pipe.answered if pipe.closed else pipe.sent
            lost += pipe.lost
            if pipe.closed:
                closes[pipe.closed] += 1
        m.note(
            f"{sum(codes.values()):,} of {total:,} answered in "
            f"{time.monotonic() - start:.1f} s: {describe(codes)}; "
            f"connections closed by the server: {describe(closes)}"
        )
        m.lose(lost, "history requests unanswered")


def trickle(run: Run) -> None:
    """
    Trickle: 64-byte frames back to back every 20 ms on echo (with
    --frame-timeout 2), each send ending 3 bytes into the next frame, for
    longer than the timeout; every frame completes within 20 ms.  Lost:
    frames the client meant to send in the window and did not get back.
    """
    timeout = 2.0
    server = run.server("netlab-echo", "--frame-timeout", str(timeout))
    with run.measure(server, "trickle", "echo") as m:
        conn = Conn(server.port)
        payload = b"t" * 64
        one = frame(payload)
        window = max(run.duration, 3 * timeout)
        interval = 0.02
        planned = int(window / interval)
        stream = one * (planned + 1)
        received = bytearray()
        ended = ["open"]
        finished = threading.Event()

        def read() -> None:
            try:
                until = time.monotonic() + window + 10
                while not finished.is_set() and time.monotonic() < until:
                    conn.fill(until)
                    received.extend(conn.buffer[conn.offset :])
                    conn.offset = len(conn.buffer)
            except Closed:
                ended[0] = "reset" if conn.reset else "closed"

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        start = time.monotonic()
        position = 0
        cutAt = None
        for i in range(planned):
            end = (i + 1) * len(one) + 3  # 3 bytes into the next frame
            if conn.send(stream[position:end], until=time.monotonic() + 1) < (
                end - position
            ):
                cutAt = time.monotonic() - start
                break
            position = end
            time.sleep(max(0.0, start + (i + 1) * interval - time.monotonic()))
        if cutAt is None:  # complete the last frame
            conn.send(stream[position : (planned + 1) * len(one)])
        time.sleep(1)
        finished.set()
        reader.join(5)
        conn.close()
        echoed = len(received) // len(one)
        if cutAt is None and ended[0] != "open":
            cutAt = time.monotonic() - start
        m.note(
            f"{planned:,} frames planned over {window:.0f} s, "
            f"{echoed:,} echoed back; connection "
            + (f"cut after {cutAt:.1f} s ({ended[0]})" if cutAt else "never cut")
        )
        m.lose(max(0, planned - echoed), "frames not echoed")


def halfClose(run: Run) -> None:
    """
    Half-close: a request, then shutdown(SHUT_WR), 10 connections at once
    per service (echo framed and raw, identity, auth, chat; `ping` on the
    JSON services); then on auth a `register` followed by SHUT_WR, checked
    afterwards with a login.
    """
    targets = [
        ("netlab-echo", "echo", []),
        ("netlab-echo", "echo-raw", ["--framing", "raw"]),
        ("netlab-identity", "identity", []),
        ("netlab-auth", "auth", [*CHEAP_HASH, *MANY_REGISTRATIONS]),
        ("netlab-chat", "chat", [*CHEAP_HASH]),
    ]
    for plugin, target, options in targets:
        server = run.server(plugin, *options)
        with run.measure(server, "half-close", target) as m:
            results: list[str] = []

            def attempt(
                n: int,
                server: Server = server,
                target: str = target,
                results: list[str] = results,
            ) -> None:
                try:
                    conn = Conn(server.port)
                except OSError:
                    results.append("connect failed")
                    return
                if target == "echo-raw":
                    data, expect = b"hello %d\n" % n, b"hello %d\n" % n
                elif target == "echo":
                    data = frame(b"hello %d" % n)
                    expect = data
                else:
                    data = request({"type": "ping", "id": n})
                    expect = b'"id":%d' % n
                conn.send(data)
                conn.sock.shutdown(socket.SHUT_WR)
                got = bytearray()
                until = time.monotonic() + 3
                try:
                    while time.monotonic() < until and conn.fill(until):
                        got += conn.buffer[conn.offset :]
                        conn.offset = len(conn.buffer)
                    results.append("timeout")
                except Closed:
                    results.append("answered" if expect in got else "closed")
                conn.close()

            workers = [
                threading.Thread(target=attempt, args=(n,), daemon=True)
                for n in range(10)
            ]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join(10)
            outcome = Counter(results)
            m.note(f"10 requests then SHUT_WR: {describe(outcome)}")
            m.lose(10 - outcome["answered"], "replies lost")
            if target == "auth":
                conn = Conn(server.port)
                conn.send(
                    request(
                        {
                            "type": "register",
                            "username": "halfway",
                            "password": PASSWORD,
                            "id": 1,
                        }
                    )
                )
                conn.sock.shutdown(socket.SHUT_WR)
                try:
                    reply = conn.recvMessage(3)
                except Closed:
                    reply = None
                conn.close()
                time.sleep(0.2)
                check = Conn(server.port)
                login = check.call(
                    {"type": "login", "username": "halfway", "password": PASSWORD}
                )
                check.close()
                m.note(
                    "register then SHUT_WR: reply "
                    + (str(reply.get("type")) if reply else "none")
                    + "; account exists afterwards: "
                    + ("yes" if login.get("type") == "session" else "no")
                )
                m.lose(0 if reply else 1, "register replies lost")


def oversizedAfterValid(run: Run) -> None:
    """
    Oversized after valid: on echo, 10 frames of 1,000 bytes then a header
    of max-length + 1, in one write (10 connections); on auth, `register`
    and 2 `ping` then an oversized header (10 connections).
    """
    server = run.server("netlab-echo")
    with run.measure(server, "oversized-after-valid", "echo") as m:
        echoed = 0
        endings: Counter[str] = Counter()
        for n in range(10):
            conn = Conn(server.port)
            one = frame(bytes([65 + n]) * 1000)
            conn.send(one * 10 + HEADER.pack(1024 * 1024 + 1) + b"x" * 100)
            got = bytearray()
            until = time.monotonic() + 5
            try:
                while conn.fill(until):
                    got += conn.buffer[conn.offset :]
                    conn.offset = len(conn.buffer)
                endings["timeout"] += 1
            except Closed:
                endings["reset" if conn.reset else "closed"] += 1
            conn.close()
            echoed += min(10, bytes(got).count(one))
        m.note(
            f"100 valid frames before an oversized header: {echoed} echoed; "
            f"connections: {describe(endings)}"
        )
        m.lose(100 - echoed, "frames not echoed")
    server = run.server("netlab-auth", *CHEAP_HASH, *MANY_REGISTRATIONS)
    with run.measure(server, "oversized-after-valid", "auth") as m:
        answered = registered = 0
        registerReplies: list[bool] = []
        last: Counter[str] = Counter()
        for n in range(10):
            conn = Conn(server.port)
            user = f"oversize{n}"
            conn.send(
                request(
                    {
                        "type": "register",
                        "username": user,
                        "password": PASSWORD,
                        "id": 1,
                    }
                )
                + request({"type": "ping", "id": 2})
                + request({"type": "ping", "id": 3})
                + HEADER.pack(65536 + 1)
                + b"x" * 100
            )
            messages: list[dict[str, Any]] = []
            until = time.monotonic() + 8
            try:
                while (left := until - time.monotonic()) > 0:
                    message = conn.recvMessage(left)
                    if message is None:
                        break
                    messages.append(message)
            except Closed:
                pass
            conn.close()
            answered += sum(1 for msg in messages if msg.get("id") in (1, 2, 3))
            registerReplies.append(any(msg.get("id") == 1 for msg in messages))
            if messages:
                last[str(messages[-1].get("code", messages[-1].get("type")))] += 1
            else:
                last["nothing"] += 1
            check = Conn(server.port)
            login = check.call(
                {"type": "login", "username": user, "password": PASSWORD}
            )
            check.close()
            registered += login.get("type") == "session"
        m.note(
            f"30 requests before an oversized header: {answered} answered; "
            f"last message: {describe(last)}; accounts created: {registered}/10"
        )
        registeredUnanswered = registered - sum(
            1 for outcome in registerReplies if outcome
        )
        if registeredUnanswered > 0:
            m.note(f"{registeredUnanswered} accounts were created without a reply")
        m.lose(30 - answered, "replies lost")


def slowReaders(run: Run) -> None:
    """
    Slow readers: 100 echo connections that send 64 KiB frames and never
    read, plus one sending 1 MiB frames; then 20 chat members that never
    read (4 KiB receive buffers) in a room that another member floods (a
    server with --message-rate/--message-burst 2000, so that the flood is
    fast), while one member reads everything.
    """
    server = run.server("netlab-echo")
    with run.measure(server, "slow-readers", "echo") as m:
        conns = [Conn(server.port) for _ in range(100)]
        big = Conn(server.port)
        chunk = frame(b"s" * 65536)
        bigChunk = frame(b"B" * (1024 * 1024))
        accepted = [0] * len(conns)
        bigAccepted = 0
        start = time.monotonic()
        for sock in [c.sock for c in conns] + [big.sock]:
            sock.setblocking(False)
        while time.monotonic() < start + run.duration and not m.stop.is_set():
            for i, conn in enumerate(conns):
                with suppress(BlockingIOError, OSError):
                    accepted[i] += conn.sock.send(chunk)
            with suppress(BlockingIOError, OSError):
                bigAccepted += big.sock.send(bigChunk)
            time.sleep(0.05)
        m.note(
            f"100 non-readers: the server took {sum(accepted) / MiB:,.1f} MiB "
            f"(at most {max(accepted) / MiB:.1f} MiB from one); the 1 MiB-frame "
            f"sender: {bigAccepted / MiB:.1f} MiB"
        )
        for conn in [*conns, big]:
            conn.close(abort=True)
        time.sleep(0.5)

    server = run.server(
        "netlab-chat",
        *CHEAP_HASH,
        *MANY_REGISTRATIONS,
        "--message-rate",
        "2000",
        "--message-burst",
        "2000",
    )
    sleepers = []
    for i in range(20):
        sleeper = account(server.port, f"sleeper{i}", rcvbuf=4096)
        joinRoom(sleeper, "flood")
        sleepers.append(sleeper)
    reader = account(server.port, "reader", source=GOOD_ADDRESS)
    joinRoom(reader, "flood")
    flooder = account(server.port, "flooder")
    joinRoom(flooder, "flood")
    with run.measure(server, "slow-readers", "chat") as m:
        readerSeqs: set[int] = set()
        readerEnd = ["open"]
        finished = threading.Event()

        def read() -> None:
            until = time.monotonic() + run.duration + run.drain + 30
            try:
                while not finished.is_set() and time.monotonic() < until:
                    message = reader.recvMessage(0.2)
                    if message is not None and message.get("type") == "message":
                        readerSeqs.add(message["seq"])
            except Closed:
                readerEnd[0] = "closed"

        thread = threading.Thread(target=read, daemon=True)
        thread.start()
        flooderSeqs: set[int] = set()

        def keep(message: dict[str, Any]) -> None:
            if message.get("type") == "message" and message.get("from") == "flooder":
                flooderSeqs.add(message["seq"])

        frames = [
            request({"type": "say", "room": "flood", "text": "f" * 4000, "id": i})
            for i in range(40_000)
        ]
        start = time.monotonic()
        pipe = pipeline(
            flooder,
            frames,
            start + run.duration,
            start + run.duration + run.drain,
            m.stop,
            keep,
        )
        # A `say` has no reply of its own: its broadcast is the answer.
        answered = pipe.answered + len(flooderSeqs)
        time.sleep(1)
        finished.set()
        thread.join(5)
        missing = len(flooderSeqs - readerSeqs)
        records = m.server.eventRecords("slow_consumer")
        cut = {str(record.get("peer")) for record in records}
        m.note(
            f"flooder wrote {pipe.sent:,} say of 4,000 characters in "
            f"{pipe.sendSeconds:.1f} s: {len(flooderSeqs):,} stored, "
            f"errors: {describe(pipe.codes)}; flooder connection: "
            f"{pipe.closed or 'open'}"
        )
        m.note(
            f"the reading member got {len(readerSeqs):,} messages "
            f"({missing:,} of the flood missing; {readerEnd[0]}); "
            f"non-readers cut off: {len(cut)}/20 "
            f"({len(records)} slow_consumer events)"
        )
        if pipe.closed not in CLOSING_CODES:
            m.lose(max(0, pipe.sent - answered), "say requests unanswered")
        m.lose(missing, "messages the reading member never got")
        for conn in [*sleepers, reader, flooder]:
            conn.close(abort=True)


def manyConnections(run: Run) -> None:
    """
    Many idle connections: on chat and on echo, open connections from one
    address up to the per-address cap (1,000 by default) and 20 more, in
    batches of 25, each checked with a ping (a frame on echo); then let them
    idle and check the admitted ones again.  Lost: admitted connections (up
    to the cap) that did not answer.
    """
    cap = 1000
    for plugin, target, options in (
        ("netlab-chat", "chat", [*CHEAP_HASH]),
        ("netlab-echo", "echo", []),
    ):
        server = run.server(plugin, *options)
        with run.measure(server, "many-connections", target) as m:

            def ping(conn: Conn, n: int, server: Server = server) -> str:
                try:
                    if server.json:
                        conn.sendMessage({"type": "ping", "id": n})
                        reply = conn.recvMessage(3)
                        if reply is None:
                            return "no reply"
                        if reply.get("id") == n:
                            return "answered"
                        return str(reply.get("code", reply.get("type")))
                    conn.send(frame(b"%d" % n))
                    got = conn.recvFrame(3)
                    return "answered" if got == b"%d" % n else "no reply"
                except Closed:
                    return "closed"

            conns: list[Conn] = []
            admitted: list[Conn] = []
            first: Counter[str] = Counter()
            failed = slowConnects = 0
            start = time.monotonic()
            while len(conns) + failed < cap + 20:
                if m.stop.is_set() or time.monotonic() > start + 60:
                    break
                batch = []
                for _ in range(min(25, cap + 20 - len(conns) - failed)):
                    began = time.monotonic()
                    try:
                        batch.append(Conn(server.port, timeout=5))
                    except OSError:
                        failed += 1
                    slowConnects += time.monotonic() - began > 0.5
                for conn in batch:
                    outcome = ping(conn, len(conns))
                    first[outcome] += 1
                    conns.append(conn)
                    if outcome == "answered":
                        admitted.append(conn)
            opened = time.monotonic() - start
            rss = server.rss()
            time.sleep(max(0.0, start + run.duration - time.monotonic()))
            second = Counter(ping(conn, n) for n, conn in enumerate(admitted))
            perConnection = (rss - m.row.baseline) / max(1, len(admitted)) / 1024
            m.note(
                f"{len(conns):,} connections opened in {opened:.1f} s "
                f"({failed} failed to connect, {slowConnects} took over 0.5 s): "
                f"{describe(first)}; {perConnection:.1f} KiB each"
            )
            m.note(f"the {len(admitted):,} admitted, after idling: {describe(second)}")
            m.lose(
                max(0, min(cap, len(conns) + failed) - first["answered"]),
                "connections under the cap not served",
            )
            m.lose(len(admitted) - second["answered"], "pings after idling unanswered")
            for conn in conns:
                conn.close(abort=True)


CLASSES: list[tuple[str, Callable[[Run], None]]] = [
    ("history-flood", historyFlood),
    ("login-guesses", loginGuesses),
    ("deep-pipeline", deepPipeline),
    ("private-flood", privateFlood),
    ("big-numbers", bigNumbers),
    ("trickle", trickle),
    ("half-close", halfClose),
    ("oversized-after-valid", oversizedAfterValid),
    ("slow-readers", slowReaders),
    ("many-connections", manyConnections),
]


# -- the report -----------------------------------------------------------------


def summary(rows: list[Row], classes: list[str]) -> None:
    print()
    print(
        f"targets: RSS growth < {TARGET_GROWTH_MIB} MiB per hostile class, "
        "0 replies lost, 0 tracebacks"
    )
    header = (
        f"{'class':<22} {'server':<9} {'base MiB':>8} {'peak MiB':>9} "
        f"{'growth':>8} {'lost':>7} {'tb':>5} {'crit':>5} {'log KiB':>9}  verdict"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        why = row.failures()
        print(
            f"{row.klass:<22} {row.target:<9} {row.baseline / MiB:>8.1f} "
            f"{row.peak / MiB:>9.1f} {row.growth / MiB:>+8.1f} {row.lost:>7,} "
            f"{row.tracebacks:>5,} {row.critical:>5,} {row.logBytes / 1024:>9,.1f}  "
            + ("ok" if not why else "FAIL " + ",".join(why))
        )
    print()
    for klass in classes:
        mine = [row for row in rows if row.klass == klass]
        if not mine:
            print(f"{klass:<22} NOT RUN (setup failed)")
            continue
        why = sorted({w for row in mine for w in row.failures()})
        growth = max(row.growth for row in mine) / MiB
        lost = sum(row.lost for row in mine)
        tracebacks = sum(row.tracebacks for row in mine)
        critical = sum(row.critical for row in mine)
        breaches = [b for row in mine for b in row.breaches]
        print(
            f"{klass:<22} {'PASS' if not why else 'FAIL':<4}  "
            f"growth {growth:+.1f} MiB, lost {lost:,}, Traceback lines "
            f"{tracebacks:,}, CRITICAL/Unhandled lines {critical:,}"
            + (f"  ({', '.join(why)})" if why else "")
        )
        for text in breaches:
            print(f"{'':<28}breach: {text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--duration",
        type=float,
        default=4.0,
        help="seconds of attack per class and server (default 4)",
    )
    parser.add_argument(
        "--drain",
        type=float,
        default=3.0,
        help="seconds to wait for replies still due after an attack (default 3)",
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="run only this class (a name or number from --list; repeatable)",
    )
    parser.add_argument("--list", action="store_true", help="list the classes")
    parser.add_argument(
        "--rss-cap-mib",
        type=int,
        default=4096,
        help="cut the attackers off when the server's RSS passes this (4096)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the servers' directories"
    )
    options = parser.parse_args()
    names = [name for name, _ in CLASSES]
    if options.list:
        for i, (name, function) in enumerate(CLASSES, 1):
            doc = " ".join((function.__doc__ or "").split())
            print(f"{i:>2} {name:<22} {doc}")
        return
    chosen = CLASSES
    if options.only:
        wanted = {
            names[int(n) - 1] if n.isdigit() and 0 < int(n) <= len(names) else n
            for n in options.only
        }
        unknown = sorted(wanted - set(names))
        if unknown:
            parser.error(f"unknown class {unknown[0]!r}; --list shows them")
        chosen = [(name, f) for name, f in CLASSES if name in wanted]

    run = Run(options)
    began = time.monotonic()
    print(
        f"netlab adversarial load, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
        f"{os.cpu_count()} cores; --duration {options.duration:g} "
        f"--drain {options.drain:g}; servers from {REPO}",
        flush=True,
    )
    try:
        for i, (name, function) in enumerate(chosen, 1):
            print(f"\n[{i}/{len(chosen)}] {name}", flush=True)
            try:
                function(run)
            except Exception as e:  # a measurement goes on with the next class
                print(f"  {name}: setup or attack failed: {e!r}", flush=True)
            finally:
                run.stopAll()
    except KeyboardInterrupt:
        print("\ninterrupted")
    finally:
        run.stopAll()
    summary(run.rows, [name for name, _ in chosen])
    print(f"\ntotal {time.monotonic() - began:.0f} s")


if __name__ == "__main__":
    main()
