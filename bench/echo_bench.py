"""
Echo benchmark: netlab-echo (the real twistd plugin, logging every event to
a --logfile as it does by default) against Twisted's stock
Int32StringReceiver echo, side by side in one run.

    python bench/echo_bench.py [--rounds 3] [--duration 5]

Each server runs pinned to core 0 and the C load generator from
shared/bench (built on the fly) to core 1; the two servers alternate within
every round, and the figure that matters is the median of the per-round
ratios netlab / stock, since absolute numbers move with the machine's noise.

Scenarios:
  small   64-byte frames, 64 connections, 16 frames in flight each (msgs/s)
  large   64 KiB frames, 8 connections, 4 in flight each (MB/s)
  big     one 32 MiB frame sent in 4 KiB pieces (seconds until fully echoed)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED_BENCH = REPO.parent / "shared" / "bench"
BIN = Path(sys.executable).parent
BIG = 32 * 1024 * 1024


def pinned(core: int, command: list[str]) -> list[str]:
    if shutil.which("taskset"):
        return ["taskset", "-c", str(core)] + command
    return command


class Server:
    def __init__(
        self, kind: str, workdir: Path, maxLength: int, extra: tuple[str, ...] = ()
    ) -> None:
        self.extra = list(extra)
        self.kind = kind
        self.workdir = workdir
        self.maxLength = maxLength
        self.portFile = workdir / f"{kind}.port"
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> int:
        if self.portFile.exists():
            self.portFile.unlink()
        if self.kind == "stock":
            command = [
                sys.executable,
                str(HERE / "stock_echo.py"),
                str(self.portFile),
                str(self.maxLength),
            ]
        else:
            command = [
                str(BIN / "twistd"),
                "-n",
                "--pidfile",
                "",
                "--logfile",
                str(self.workdir / "netlab-echo.log"),
                "netlab-echo",
                "--port",
                "0",
                "--port-file",
                str(self.portFile),
                "--max-length",
                str(self.maxLength),
                *self.extra,
            ]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.process = subprocess.Popen(pinned(0, command), env=env, cwd=self.workdir)
        deadline = time.monotonic() + 20
        while not self.portFile.exists():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise SystemExit(f"{self.kind} server did not start")
            time.sleep(0.05)
        time.sleep(0.2)  # let the port file's writer finish logging
        return int(self.portFile.read_text())

    def __exit__(self, *exc: object) -> None:
        assert self.process is not None
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def buildLoadgen(workdir: Path) -> Path:
    build = SHARED_BENCH / "build.sh"
    if not build.exists():
        raise SystemExit(f"no load generator: {build} is missing")
    out = subprocess.run(
        ["bash", str(build), str(workdir / "lg")], check=True, capture_output=True
    )
    return Path(out.stdout.decode().strip())


def loadgen(
    binary: Path, port: int, size: int, conns: int, window: int, duration: float
):
    command = [
        str(binary),
        "--port", str(port),
        "--mode", "throughput",
        "--conns", str(conns),
        "--size", str(size),
        "--window", str(window),
        "--duration", str(duration),
        "--warmup", "1",
    ]  # fmt: skip
    out = subprocess.run(pinned(1, command), capture_output=True, timeout=120)
    line = out.stdout.decode().strip().splitlines()[-1]
    return json.loads(line)


def bigFrame(port: int, piece: int = 4096) -> float:
    """
    Send one 32 MiB frame in `piece`-byte writes; seconds until its echo
    has fully arrived (and matched).
    """
    payload = os.urandom(1024) * (BIG // 1024)
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    received = bytearray()
    expected = 4 + BIG

    def reader() -> None:
        while len(received) < expected:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            received.extend(chunk)

    thread = threading.Thread(target=reader)
    start = time.perf_counter()
    thread.start()
    data = struct.pack("!I", BIG) + payload
    view = memoryview(data)
    for i in range(0, len(data), piece):
        sock.sendall(view[i : i + piece])
    thread.join(120)
    elapsed = time.perf_counter() - start
    sock.close()
    if bytes(received[4:]) != payload:
        raise SystemExit("big frame: the echo did not match")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--skip-big", action="store_true")
    options = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="netlab-bench-"))
    binary = buildLoadgen(workdir)
    scenarios = {
        "small": dict(size=64, conns=64, window=16),
        "large": dict(size=65536, conns=8, window=4),
    }
    results: dict[str, dict[str, list[float]]] = {}
    for round_ in range(1, options.rounds + 1):
        for name, shape in scenarios.items():
            for kind in ("stock", "netlab"):
                with Server(kind, workdir, 1024 * 1024) as port:
                    r = loadgen(binary, port, duration=options.duration, **shape)
                errors = {k: v for k, v in r.get("errors", {}).items() if v}
                metric = r["msgs_per_s"] if name == "small" else r["mb_per_s"]
                results.setdefault(name, {}).setdefault(kind, []).append(metric)
                print(
                    f"round {round_} {name:5} {kind:6} {metric:12,.1f} "
                    f"{'msgs/s' if name == 'small' else 'MB/s'}"
                    f"  p99 {r.get('lat_us', {}).get('p99', '?')} us"
                    f"{'  ERRORS ' + str(errors) if errors else ''}",
                    flush=True,
                )
        if not options.skip_big:
            for kind in ("stock", "netlab"):
                with Server(kind, workdir, 64 * 1024 * 1024) as port:
                    seconds = bigFrame(port)
                results.setdefault("big", {}).setdefault(kind, []).append(seconds)
                print(f"round {round_} big   {kind:6} {seconds:12.3f} s", flush=True)

    print("\nmedian over rounds (ratio = netlab / stock; for 'big', stock / netlab):")
    for name, byKind in results.items():
        stock, netlab = byKind["stock"], byKind["netlab"]
        if name == "big":
            ratios = [s / n for s, n in zip(stock, netlab, strict=True)]
        else:
            ratios = [n / s for s, n in zip(stock, netlab, strict=True)]
        print(
            f"  {name:5} stock {statistics.median(stock):12,.2f}  "
            f"netlab {statistics.median(netlab):12,.2f}  "
            f"ratio {statistics.median(ratios):6.2f}x"
        )
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
