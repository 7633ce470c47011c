"""
Idle-connection benchmark: 10,000 concurrent connections held open against
netlab-echo and against the stock Int32StringReceiver echo, every one
checked to still answer, and the server's memory per connection reported
(VmRSS sampled by the C load generator's idle mode).

    python bench/idle_bench.py [--conns 10000] [--hold 3]

Target (issue 6): netlab-echo <= 4 KiB per connection.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import echo_bench  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conns", type=int, default=10_000)
    parser.add_argument("--hold", type=float, default=3.0)
    options = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = options.conns + 1000
    if soft < wanted:
        # Raised here and inherited by the servers this script starts.
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    workdir = Path(tempfile.mkdtemp(prefix="netlab-idle-bench-"))
    binary = echo_bench.buildLoadgen(workdir)
    for kind in ("stock", "netlab"):
        # All the connections come from 127.0.0.1: lift the per-address cap.
        server = echo_bench.Server(
            kind, workdir, 1024 * 1024, ("--max-connections-per-address", "0")
        )
        with server as port:
            assert server.process is not None
            result = echo_bench.subprocess.run(
                echo_bench.pinned(
                    1,
                    [
                        str(binary),
                        "--port",
                        str(port),
                        "--mode",
                        "idle",
                        "--conns",
                        str(options.conns),
                        "--hold",
                        str(options.hold),
                        "--server-pid",
                        str(server.process.pid),
                    ],
                ),  # fmt: skip
                capture_output=True,
                timeout=120,
            )
        r = json.loads(result.stdout.decode().strip().splitlines()[-1])
        print(
            f"{kind:6} {r['conns_open']:,} connections open, "
            f"{r['final_echo_ok']:,} still answering, "
            f"{r['kib_per_conn']:.2f} KiB per connection, errors {r['error_total']}"
        )


if __name__ == "__main__":
    main()
