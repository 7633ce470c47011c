"""
Chat fan-out benchmark: one room, 200 members, a few senders.

    python bench/chat_bench.py [--members 200] [--rate 1000] [--duration 10]

The real `twistd netlab-chat` runs pinned to core 0 (history persisted as
always: every message committed before it is broadcast); this process, the
load, runs on core 1.  One selectors loop reads all member connections,
counting frames by their headers; 10 members also decode every message to
measure delivery latency (send time is in the text, one clock).

Phase 1, fixed offered load: the senders say --rate messages/s in total for
--duration seconds; reported: deliveries/s and latency p50/p99.
Phase 2, saturation: the senders keep 8 messages each in flight; reported:
deliveries/s.  Targets (issue 5): >= 100,000 deliveries/s; p99 < 50 ms at
1,000 messages/s into 200 members.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO))

from twisted_lab.client.wire import FramedSocket  # noqa: E402

HEADER = struct.Struct("!I")
PASSWORD = "benchmark-password"
SENDERS = 4
LATENCY_MEMBERS = 10


def pinned(core: int, command: list[str]) -> list[str]:
    return (["taskset", "-c", str(core)] if shutil.which("taskset") else []) + command


def call(sock: FramedSocket, message: dict) -> dict:
    sock.send_json(message)
    while True:
        reply = sock.recv_json()
        if reply.get("type") not in ("presence", "message"):
            return reply


class Member:
    """
    A member connection read by the selectors loop.
    """

    def __init__(self, sock: socket.socket, decode: bool) -> None:
        self.sock = sock
        self.decode = decode
        self.buffer = bytearray()
        self.frames = 0
        self.latencies: list[float] = []
        self.closed = False

    def readable(self) -> None:
        try:
            data = self.sock.recv(1 << 20)
        except BlockingIOError:
            return
        if not data:
            self.closed = True
            return
        buffer = self.buffer
        buffer += data
        offset = 0
        end = len(buffer)
        now = time.time()
        while end - offset >= 4:
            (length,) = HEADER.unpack_from(buffer, offset)
            if end - offset - 4 < length:
                break
            if self.decode:
                message = json.loads(bytes(buffer[offset + 4 : offset + 4 + length]))
                if message.get("type") == "message":
                    sent = float(message["text"].split()[0])
                    self.latencies.append((now - sent) * 1000)
                    self.frames += 1
            else:
                self.frames += 1
            offset += 4 + length
        del buffer[:offset]


def serverCpu(pid: int) -> float:
    """
    CPU seconds the server process has used (from /proc).
    """
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def startServer(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    portFile = workdir / "port"
    command = [
        str(BIN / "twistd"), "-n", "--pidfile", "",
        "--logfile", str(workdir / "chat.log"),
        "netlab-chat", "--port", "0", "--port-file", str(portFile),
        "--db", str(workdir / "bench.sqlite3"),
        "--hash-memory-kib", "1024", "--hash-time-cost", "1",
        "--registrations-per-hour", "1000000",
        "--message-rate", "1000000", "--message-burst", "1000000",
    ]  # fmt: skip
    process = subprocess.Popen(
        pinned(0, command), env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=workdir
    )
    deadline = time.monotonic() + 20
    while not portFile.exists():
        if time.monotonic() > deadline or process.poll() is not None:
            raise SystemExit("the chat server did not start")
        time.sleep(0.05)
    return process, int(portFile.read_text())


def run(options: argparse.Namespace, port: int) -> None:
    names = [f"member{i}" for i in range(options.members)]
    senderNames = [f"sender{i}" for i in range(SENDERS)]
    # One connection per registration: a connection may register 5 at once.
    for name in names + senderNames:
        with FramedSocket.connect_to("127.0.0.1", port) as s:
            call(s, {"type": "register", "username": name, "password": PASSWORD})

    selector = selectors.DefaultSelector()
    members: list[Member] = []
    for i, name in enumerate(names):
        sock = FramedSocket.connect_to("127.0.0.1", port)
        call(sock, {"type": "login", "username": name, "password": PASSWORD})
        call(sock, {"type": "join", "room": "bench"})
        sock.setblocking(False)
        member = Member(sock, decode=i < LATENCY_MEMBERS)
        members.append(member)
        selector.register(sock, selectors.EVENT_READ, member)
    senders = []
    for name in senderNames:
        sock = FramedSocket.connect_to("127.0.0.1", port)
        call(sock, {"type": "login", "username": name, "password": PASSWORD})
        call(sock, {"type": "join", "room": "bench"})
        sock.setblocking(False)
        senders.append(Member(sock, decode=False))
        selector.register(sock, selectors.EVENT_READ, senders[-1])

    def pump(until: float) -> None:
        while True:
            timeout = until - time.monotonic()
            if timeout <= 0:
                return
            for key, _ in selector.select(timeout):
                key.data.readable()

    def say(sender: Member) -> None:
        text = f"{time.time():.6f} fan-out benchmark payload"
        frame = json.dumps({"type": "say", "room": "bench", "text": text}).encode()
        sender.sock.setblocking(True)
        sender.sock.sendall(HEADER.pack(len(frame)) + frame)
        sender.sock.setblocking(False)

    pump(time.monotonic() + 1.0)  # drain presence traffic

    def reset() -> None:
        for m in members + senders:
            m.frames = 0
            m.latencies.clear()

    # Phase 1: fixed offered load.
    reset()
    cpuStart = time.process_time()
    serverStart = serverCpu(options.serverPid)
    interval = SENDERS / options.rate
    start = time.monotonic()
    end = start + options.duration
    sent = 0
    nextAt = start
    while time.monotonic() < end:
        for sender in senders:
            say(sender)
            sent += 1
        nextAt += interval
        pump(nextAt)
    loadCpu = (time.process_time() - cpuStart) / options.duration
    serverLoad = (serverCpu(options.serverPid) - serverStart) / options.duration
    pump(time.monotonic() + 2.0)  # let the last ones arrive
    delivered = sum(m.frames for m in members)
    latencies = [x for m in members for x in m.latencies]
    expected = sent * len(members)
    closed = sum(m.closed for m in members)
    print(
        f"phase 1: offered {sent / options.duration:,.0f} msgs/s into "
        f"{len(members)} members for {options.duration:.0f} s: "
        f"{delivered / options.duration:,.0f} deliveries/s "
        f"({delivered:,} of {expected:,} expected); "
        f"latency p50 {statistics.median(latencies):.1f} ms, "
        f"p99 {sorted(latencies)[int(0.99 * len(latencies))]:.1f} ms, "
        f"max {max(latencies):.1f} ms; members cut off: {closed}; "
        f"CPU: server {serverLoad:.0%}, load generator {loadCpu:.0%} of a core"
    )

    # Phase 2: saturation, measured by deliveries while the senders keep
    # sending as fast as their own echoes come back (8 in flight each).
    reset()
    window = 8
    inFlight = {id(s): 0 for s in senders}
    start = time.monotonic()
    end = start + options.duration
    lastFrames = {id(s): 0 for s in senders}
    while time.monotonic() < end:
        for sender in senders:
            done = sender.frames - lastFrames[id(sender)]
            lastFrames[id(sender)] = sender.frames
            inFlight[id(sender)] -= done
            while inFlight[id(sender)] < window:
                say(sender)
                inFlight[id(sender)] += 1
        pump(time.monotonic() + 0.002)
    elapsed = time.monotonic() - start
    delivered = sum(m.frames for m in members)
    latencies = [x for m in members for x in m.latencies]
    print(
        f"phase 2: saturation: {delivered / elapsed:,.0f} deliveries/s "
        f"({delivered / elapsed / len(members):,.0f} msgs/s into {len(members)} "
        f"members); latency p50 {statistics.median(latencies):.1f} ms, "
        f"p99 {sorted(latencies)[int(0.99 * len(latencies))]:.1f} ms; "
        f"members cut off: {sum(m.closed for m in members) - closed}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=200)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--duration", type=float, default=10.0)
    options = parser.parse_args()
    if shutil.which("taskset"):
        os.sched_setaffinity(0, {1})
    workdir = Path(tempfile.mkdtemp(prefix="netlab-chat-bench-"))
    server, port = startServer(workdir)
    options.serverPid = server.pid
    try:
        run(options, port)
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
