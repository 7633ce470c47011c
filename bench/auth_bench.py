"""
Auth benchmark: logins per second against the hash-bound limit, and the
latency of `whoami` on another connection during the login storm.

    python bench/auth_bench.py [--duration 10] [--clients 8]

The hash-bound limit is measured in the same run: the seconds one argon2id
verification takes here with the server's default parameters, and
limit = cores / seconds-per-hash (hashing is the work a login cannot avoid).
The storm: --clients connections each logging in again and again for
--duration seconds.  Meanwhile a separate process logs in once and sends
`whoami` every 10 ms on its own connection, recording each round trip.
Targets (issue 4): logins/s >= 80 % of the limit; whoami p99 < 20 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO))

from twisted_lab.client.wire import FramedSocket  # noqa: E402
from twisted_lab.services.accounts import PasswordHasher  # noqa: E402

PASSWORD = "benchmark-password"


def secondsPerHash(samples: int = 20) -> float:
    context = PasswordHasher(reactor=None).context
    stored = context.hash(PASSWORD)
    start = time.perf_counter()
    for _ in range(samples):
        context.verify(PASSWORD, stored)
    return (time.perf_counter() - start) / samples


def startServer(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    portFile = workdir / "port"
    process = subprocess.Popen(
        [
            str(BIN / "twistd"),
            "-n",
            "--pidfile",
            "",
            "--logfile",
            str(workdir / "auth.log"),
            "netlab-auth",
            "--port",
            "0",
            "--port-file",
            str(portFile),
            "--db",
            str(workdir / "bench.sqlite3"),
            "--registrations-per-hour",
            "1000000",
        ],
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        cwd=workdir,
    )
    deadline = time.monotonic() + 20
    while not portFile.exists():
        if time.monotonic() > deadline or process.poll() is not None:
            raise SystemExit("the auth server did not start")
        time.sleep(0.05)
    return process, int(portFile.read_text())


PROBERS = 10


def call(sock: FramedSocket, message: dict) -> dict:
    sock.send_json(message)
    return sock.recv_json()


def probe(port: int, duration: float) -> None:
    """
    (Run as a subprocess.) Log in, then whoami every 10 ms; print the
    latencies in milliseconds as JSON.
    """
    # whoami has a rate per user (10/s): the probe takes turns among users.
    sockets = []
    for i in range(PROBERS):
        s = FramedSocket.connect_to("127.0.0.1", port)
        name = f"prober{i}"
        reply = call(s, {"type": "login", "username": name, "password": PASSWORD})
        assert reply["type"] == "session", reply
        sockets.append((s, name))
    latencies = []
    end = time.monotonic() + duration
    turn = 0
    while time.monotonic() < end:
        s, name = sockets[turn % PROBERS]
        turn += 1
        start = time.perf_counter()
        reply = call(s, {"type": "whoami"})
        latencies.append((time.perf_counter() - start) * 1000)
        assert reply == {"type": "identity", "username": name}, reply
        time.sleep(0.01)
    for s, _ in sockets:
        s.close()
    print(json.dumps(latencies))


def register(port: int, names: list[str]) -> None:
    """
    Register C{names}, five per connection (one connection may register
    five at once).
    """
    for start in range(0, len(names), 5):
        with FramedSocket.connect_to("127.0.0.1", port) as s:
            for name in names[start : start + 5]:
                reply = call(
                    s, {"type": "register", "username": name, "password": PASSWORD}
                )
                assert reply["type"] == "registered", reply


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--probe", nargs=2, metavar=("PORT", "DURATION"))
    options = parser.parse_args()
    if options.probe:
        probe(int(options.probe[0]), float(options.probe[1]))
        return

    cores = os.cpu_count() or 1
    perHash = secondsPerHash()
    limit = cores / perHash
    print(f"one argon2id verification: {perHash * 1000:.1f} ms; {cores} cores")
    print(f"hash-bound limit: {limit:.1f} logins/s")

    workdir = Path(tempfile.mkdtemp(prefix="netlab-auth-bench-"))
    server, port = startServer(workdir)
    try:
        register(
            port,
            [f"user{i}" for i in range(options.clients)]
            + [f"prober{i}" for i in range(PROBERS)],
        )

        counts = [0] * options.clients
        errors: list[str] = []
        stop = threading.Event()

        def storm(i: int) -> None:
            # A fresh connection every 10 logins: one connection may log in
            # 10 times at once, then 2 a second (docs/protocol.md 3.5).
            while not stop.is_set():
                with FramedSocket.connect_to("127.0.0.1", port) as s:
                    for _ in range(10):
                        if stop.is_set():
                            break
                        reply = call(
                            s,
                            {
                                "type": "login",
                                "username": f"user{i}",
                                "password": PASSWORD,
                            },
                        )
                        if reply.get("type") == "session":
                            counts[i] += 1
                        else:
                            errors.append(str(reply))

        prober = subprocess.Popen(
            [sys.executable, __file__, "--probe", str(port), str(options.duration)],
            stdout=subprocess.PIPE,
        )
        threads = [
            threading.Thread(target=storm, args=(i,)) for i in range(options.clients)
        ]
        start = time.perf_counter()
        for t in threads:
            t.start()
        out, _ = prober.communicate(timeout=options.duration + 60)
        stop.set()
        for t in threads:
            t.join(30)
        elapsed = time.perf_counter() - start
        latencies = json.loads(out)
    finally:
        server.terminate()
        server.wait(10)

    rate = sum(counts) / elapsed
    print(
        f"logins: {sum(counts)} in {elapsed:.1f} s = {rate:.1f}/s "
        f"({rate / limit:.0%} of the hash-bound limit); errors: {len(errors)}"
    )
    print(
        f"whoami during the storm: {len(latencies)} calls, "
        f"p50 {statistics.median(latencies):.2f} ms, "
        f"p99 {percentile(latencies, 99):.2f} ms, max {max(latencies):.2f} ms"
    )


if __name__ == "__main__":
    main()
