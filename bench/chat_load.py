"""
Chat soak: 1,000 concurrent chat clients in 10 rooms exchanging messages
for a minute; every client checks that the seq of every message of its
room arrives in order and without gaps.

    python bench/chat_load.py [--clients 1000] [--rooms 10] [--duration 60]
                              [--rate 200]

--rate is messages per second across all clients (each delivered to the
~100 members of its room).  Prints messages sent, deliveries, and the
number of gaps or reorderings seen (must be 0).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import selectors
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from chat_bench import BIN, REPO, pinned  # noqa: E402

from twisted_lab.client.wire import FramedSocket  # noqa: E402

HEADER = struct.Struct("!I")
PASSWORD = "benchmark-password"


class Client:
    def __init__(self, sock: FramedSocket, room: str) -> None:
        self.sock = sock
        self.room = room
        self.buffer = bytearray()
        self.lastSeq: int | None = None
        self.deliveries = 0
        self.problems = 0
        self.closed = False

    def readable(self) -> None:
        try:
            data = self.sock.recv(1 << 18)
        except BlockingIOError:
            return
        if not data:
            self.closed = True
            return
        self.buffer += data
        offset = 0
        while len(self.buffer) - offset >= 4:
            (length,) = HEADER.unpack_from(self.buffer, offset)
            if len(self.buffer) - offset - 4 < length:
                break
            message = json.loads(bytes(self.buffer[offset + 4 : offset + 4 + length]))
            offset += 4 + length
            if message.get("type") == "message":
                seq = message["seq"]
                if self.lastSeq is not None and seq != self.lastSeq + 1:
                    self.problems += 1
                self.lastSeq = seq
                self.deliveries += 1
            elif message.get("type") == "error":
                self.problems += 1
        del self.buffer[:offset]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rooms", type=int, default=10)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--rate", type=float, default=200.0)
    options = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(
        resource.RLIMIT_NOFILE, (min(hard, options.clients + 1000), hard)
    )

    workdir = Path(tempfile.mkdtemp(prefix="netlab-chat-load-"))
    portFile = workdir / "port"
    import subprocess

    server = subprocess.Popen(
        pinned(
            0,
            [
                str(BIN / "twistd"),
                "-n",
                "--pidfile",
                "",
                "--logfile",
                str(workdir / "chat.log"),
                "netlab-chat",
                "--port",
                "0",
                "--port-file",
                str(portFile),
                "--db",
                str(workdir / "load.sqlite3"),
                "--hash-memory-kib",
                "1024",
                "--hash-time-cost",
                "1",
                "--registrations-per-hour",
                "1000000",
                "--max-connections-per-address",
                "0",
            ],
        ),  # fmt: skip
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        cwd=workdir,
    )
    try:
        deadline = time.monotonic() + 20
        while not portFile.exists():
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("the chat server did not start")
            time.sleep(0.05)
        port = int(portFile.read_text())
        selector = selectors.DefaultSelector()
        clients: list[Client] = []
        # One connection per registration: a connection may register 5 at once.
        for i in range(options.clients):
            with FramedSocket.connect_to("127.0.0.1", port) as s:
                s.send_json(
                    {"type": "register", "username": f"load{i}", "password": PASSWORD}
                )
                s.recv_json()
        for i in range(options.clients):
            room = f"room{i % options.rooms}"
            sock = FramedSocket.connect_to("127.0.0.1", port)
            sock.send_json(
                {"type": "login", "username": f"load{i}", "password": PASSWORD}
            )
            sock.recv_json()
            sock.send_json({"type": "join", "room": room})
            while True:
                reply = sock.recv_json()
                if reply.get("type") == "joined":
                    break
            sock.setblocking(False)
            client = Client(sock, room)
            client.lastSeq = reply["last_seq"]
            clients.append(client)
            selector.register(sock, selectors.EVENT_READ, client)
        print(f"{len(clients)} clients connected and joined {options.rooms} rooms")

        sent = 0
        start = time.monotonic()
        end = start + options.duration
        nextAt = start
        interval = 1.0 / options.rate
        while time.monotonic() < end:
            now = time.monotonic()
            while nextAt <= now:
                client = random.choice(clients)
                body = json.dumps(
                    {"type": "say", "room": client.room, "text": f"load message {sent}"}
                ).encode()
                client.sock.setblocking(True)
                client.sock.sendall(HEADER.pack(len(body)) + body)
                client.sock.setblocking(False)
                sent += 1
                nextAt += interval
            for key, _ in selector.select(
                max(0.0, min(nextAt - time.monotonic(), 0.05))
            ):
                key.data.readable()
        drain = time.monotonic() + 5
        while time.monotonic() < drain:
            for key, _ in selector.select(0.1):
                key.data.readable()
        deliveries = sum(c.deliveries for c in clients)
        problems = sum(c.problems for c in clients)
        closed = sum(c.closed for c in clients)
        expected = sent * options.clients // options.rooms
        print(
            f"{sent:,} messages in {options.duration:.0f} s "
            f"into {options.rooms} rooms: "
            f"{deliveries:,} deliveries (about {expected:,} expected), "
            f"gaps or reorderings: {problems}, clients disconnected: {closed}"
        )
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
