"""
Metrics overhead (issue 14): the real `twistd netlab-echo` with --metrics
(and /metrics scraped every second while it runs) against the same server
without --metrics, and against the code from before metrics existed.

    python bench/metrics_bench.py [--rounds 5] [--duration 5] [--base REV]

Same method as echo_bench.py: each server pinned to core 0, the C load
generator from shared/bench to core 1, the servers alternating within
every round (in turn first); the figure that matters is the median of the
per-round ratios (on / off, off / before), since absolute numbers move with
the machine's noise.  A server with metrics is scraped once before the load
starts (a server that has run a while has been scraped before), then every
second during it.  `--base` is the revision without metrics (default: the
parent of the commit that added them), exported with `git archive`.

Scenarios:
  small   64-byte frames, 64 connections, 16 frames in flight each (msgs/s)
  large   64 KiB frames, 8 connections, 4 in flight each (MB/s)
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from echo_bench import buildLoadgen, loadgen, pinned  # noqa: E402

BIN = Path(sys.executable).parent
#: The parent of the commit that added --metrics.
DEFAULT_BASE = "e06c0d6^"


class Server:
    """
    twistd netlab-echo from source tree `tree`, optionally with --metrics
    (then /metrics is scraped every second while it runs).
    """

    def __init__(self, tree: Path, workdir: Path, metrics: bool) -> None:
        self.tree = tree
        self.workdir = workdir
        self.metrics = metrics
        self.portFile = workdir / "echo.port"
        self.process: subprocess.Popen[bytes] | None = None
        self.scrapes = 0
        self._stop = threading.Event()
        self._scraper: threading.Thread | None = None

    def __enter__(self) -> int:
        if self.portFile.exists():
            self.portFile.unlink()
        metricsPort = freePort()
        command = [
            str(BIN / "twistd"), "-n", "--pidfile", "",
            "--logfile", str(self.workdir / "netlab-echo.log"),
            "netlab-echo", "--port", "0", "--port-file", str(self.portFile),
        ]  # fmt: skip
        if self.metrics:
            command += ["--metrics", f"tcp:{metricsPort}:interface=127.0.0.1"]
        env = dict(os.environ, PYTHONPATH=str(self.tree))
        self.process = subprocess.Popen(pinned(0, command), env=env, cwd=self.workdir)
        deadline = time.monotonic() + 20
        while not self.portFile.exists():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise SystemExit("the server did not start")
            time.sleep(0.05)
        time.sleep(0.2)
        if self.metrics:
            url = f"http://127.0.0.1:{metricsPort}/metrics"
            # A server that has run a while has been scraped before: the
            # first scrape's one-time work (imports, the web thread) is
            # not part of the steady state measured here.
            self._scrapeOnce(url)
            self._scraper = threading.Thread(target=self._scrape, args=(url,))
            self._scraper.start()
        return int(self.portFile.read_text())

    def _scrape(self, url: str) -> None:
        while not self._stop.wait(1.0):
            self._scrapeOnce(url)

    def _scrapeOnce(self, url: str) -> None:
        with urllib.request.urlopen(url, timeout=10) as response:
            body = response.read()
        assert b"netlab_received_frames_total" in body
        self.scrapes += 1

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._scraper is not None:
            self._scraper.join()
        assert self.process is not None
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def exportRevision(revision: str, into: Path) -> Path:
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", revision],
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--base", default=DEFAULT_BASE)
    parser.add_argument(
        "--skip-before", action="store_true", help="compare on and off only"
    )
    options = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="netlab-metrics-bench-"))
    binary = buildLoadgen(workdir)
    base = exportRevision(options.base, workdir / "base")
    kinds = {
        "before": (base, False),
        "off": (REPO, False),
        "on": (REPO, True),
    }
    if options.skip_before:
        del kinds["before"]
    scenarios = {
        "small": dict(size=64, conns=64, window=16),
        "large": dict(size=65536, conns=8, window=4),
    }
    results: dict[str, dict[str, list[float]]] = {}
    for round_ in range(1, options.rounds + 1):
        for name, shape in scenarios.items():
            # Alternate the order too, so that neither always runs first.
            order = list(kinds.items())
            if round_ % 2 == 0:
                order.reverse()
            for kind, (tree, metrics) in order:
                server = Server(tree, workdir, metrics)
                with server as port:
                    r = loadgen(binary, port, duration=options.duration, **shape)
                errors = {k: v for k, v in r.get("errors", {}).items() if v}
                metric = r["msgs_per_s"] if name == "small" else r["mb_per_s"]
                results.setdefault(name, {}).setdefault(kind, []).append(metric)
                print(
                    f"round {round_} {name:5} {kind:6} {metric:12,.1f} "
                    f"{'msgs/s' if name == 'small' else 'MB/s'}"
                    f"  p99 {r.get('lat_us', {}).get('p99', '?')} us"
                    f"{f'  ({server.scrapes} scrapes)' if metrics else ''}"
                    f"{'  ERRORS ' + str(errors) if errors else ''}",
                    flush=True,
                )

    print("\nmedian over rounds (ratios of the same round):")
    for name, byKind in results.items():
        off, on = byKind["off"], byKind["on"]
        onOff = [n / f for n, f in zip(on, off, strict=True)]
        line = f"  {name:5} "
        before = byKind.get("before")
        if before is not None:
            line += f"before {statistics.median(before):12,.1f}  "
        line += (
            f"off {statistics.median(off):12,.1f}  "
            f"on {statistics.median(on):12,.1f}  "
            f"on/off {statistics.median(onOff):5.3f}"
        )
        if before is not None:
            offBefore = [f / b for f, b in zip(off, before, strict=True)]
            line += f"  off/before {statistics.median(offBefore):5.3f}"
        print(line)
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
