"""
Metrics overhead measured in CPU time, in process (issue 14): what the
counting costs per read of the real FramedEcho, and what one scrape of
/metrics costs, independent of how busy the machine is.

    python bench/metrics_micro.py [--base REV] [--reads 200000] [--repeat 7]

The echo's read path (FramedEcho.dataReceived on a StringTransport, 16
frames of 64 bytes per read, the data-event meter folding as in the real
server) is timed in a fresh interpreter for the code before metrics
existed (`--base`, exported with `git archive`) and for this tree,
alternately; each figure is the best of `--repeat` runs, which is what
noise cannot make faster.  The scrape is generate_latest() on an echo
server's registry with the process metrics, as the web thread runs it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_BASE = "e06c0d6^"

READS = r"""
import json, sys, time
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger
from twisted_lab.transports.echo import EchoFactory
reads, repeat = int(sys.argv[1]), int(sys.argv[2])
factory = EchoFactory(clock=Clock())
factory.log = Logger(observer=lambda event: None)
address = IPv4Address("TCP", "127.0.0.1", 40000)
protocol = factory.buildProtocol(address)
transport = StringTransport(peerAddress=address)
protocol.makeConnection(transport)
frame = (64).to_bytes(4, "big") + b"x" * 64
data = frame * 16
best = float("inf")
for _ in range(repeat):
    started = time.perf_counter()
    for i in range(reads):
        protocol.dataReceived(data)
        if i % 1024 == 0:
            transport.clear()
    best = min(best, time.perf_counter() - started)
    transport.clear()
assert protocol.transport.disconnecting is False
print(json.dumps({"us_per_read": best / reads * 1e6}))
"""

SCRAPE = r"""
import json, sys, time
from prometheus_client import generate_latest
from twisted.internet.task import Clock
from twisted_lab.transports.echo import EchoFactory
from twisted_lab.observe.metrics import MetricsServer
factory = EchoFactory(clock=Clock())
MetricsServer("tcp:0", factory.stats, None)  # adds the process metrics
best = float("inf")
for _ in range(int(sys.argv[1])):
    started = time.perf_counter()
    for _ in range(100):
        body = generate_latest(factory.stats.registry)
    best = min(best, (time.perf_counter() - started) / 100)
print(json.dumps({"us_per_scrape": best * 1e6, "bytes": len(body)}))
"""


def exportRevision(revision: str, into: Path) -> Path:
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", revision],
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def run(tree: Path, script: str, *args: str, cwd: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", script, *args],
        env=dict(os.environ, PYTHONPATH=str(tree)),
        cwd=cwd,
        check=True,
        capture_output=True,
    )
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default=DEFAULT_BASE)
    parser.add_argument("--reads", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="netlab-metrics-micro-"))
    base = exportRevision(options.base, workdir / "base")
    args = (str(options.reads), str(options.repeat))
    best = {"before": float("inf"), "now": float("inf")}
    for round_ in range(1, options.rounds + 1):
        for kind, tree in (("before", base), ("now", REPO)):
            us = run(tree, READS, *args, cwd=workdir)["us_per_read"]
            best[kind] = min(best[kind], us)
            print(f"round {round_} {kind:6} {us:7.3f} us per read", flush=True)
    scrape = run(REPO, SCRAPE, str(options.repeat), cwd=workdir)
    before, now = best["before"], best["now"]
    print(
        f"\nper read of 16 x 64-byte frames (best of all runs): before "
        f"{before:.3f} us, now {now:.3f} us, counting costs "
        f"{now - before:+.3f} us ({(now / before - 1) * 100:+.1f} %)"
    )
    print(
        f"one scrape of an echo server: {scrape['us_per_scrape']:.0f} us "
        f"({scrape['bytes']} bytes of text)"
    )
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
