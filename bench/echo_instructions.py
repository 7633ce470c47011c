"""
Echo cost in CPU instructions per message, counted by valgrind's callgrind:
the real twistd netlab-echo of one or more source trees against Twisted's
stock Int32StringReceiver echo.

Why instructions: echo_bench.py measures messages per second, which on a
shared 2-core machine moves by tens of percent with whatever else runs.
An instruction count does not: the same server, input and hash seed give
nearly the same count however loaded the machine is, so "before and after
a refactor, within 5 %" can be checked at any time.  It is not a
throughput: valgrind slows the server ~50x; the count is what each message
costs the server's CPU, the figure a throughput is the inverse of.

Each server is started under callgrind with instrumentation off; it is
switched on once the server listens, the C load generator of shared/bench
runs a fixed workload (no warm-up), then it is switched off and the count is
read from what callgrind writes at exit (the server is stopped with SIGINT,
which both servers answer by exiting normally).  Instructions per echoed
message are printed per server and scenario, with the ratio to the stock
echo.

    python bench/echo_instructions.py                      # this tree
    python bench/echo_instructions.py --tree old=/path/to/old/checkout
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BIN = Path(sys.executable).parent
SHARED_BENCH = REPO.parent / "shared" / "bench"

SCENARIOS = {
    # name: (frame bytes, connections, window, seconds)
    "small": (64, 8, 16, 6.0),
    "large": (65536, 4, 2, 6.0),
}


def buildLoadgen(workdir: Path) -> Path:
    out = subprocess.run(
        [str(SHARED_BENCH / "build.sh"), str(workdir / "loadgen")],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(out.stdout.strip().splitlines()[-1])


def serverCommand(kind: str, tree: Path, workdir: Path, portFile: Path) -> list[str]:
    if kind == "stock":
        return [sys.executable, str(HERE / "stock_echo.py"), str(portFile), "1048576"]
    return [
        str(BIN / "twistd"),
        "-n",
        "--pidfile",
        "",
        "--logfile",
        str(workdir / "netlab-echo.log"),
        "netlab-echo",
        "--port",
        "0",
        "--port-file",
        str(portFile),
    ]


def measure(
    kind: str, tree: Path, loadgen: Path, scenario: tuple[int, int, int, float]
) -> tuple[int, int]:
    """
    (instructions, messages) of one run of C{scenario} against one server.
    """
    size, conns, window, duration = scenario
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        portFile = workdir / "port"
        out = workdir / "callgrind.out"
        command = [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={out}",
            *serverCommand(kind, tree, workdir, portFile),
        ]
        env = dict(os.environ, PYTHONPATH=str(tree), PYTHONHASHSEED="0")
        server = subprocess.Popen(
            command,
            cwd=workdir,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 120
            while not (portFile.exists() and portFile.read_text().strip()):
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit(f"{kind} server did not start under valgrind")
                time.sleep(0.1)
            time.sleep(0.5)
            port = int(portFile.read_text())
            subprocess.run(
                ["callgrind_control", "-i", "on", str(server.pid)],
                check=True,
                capture_output=True,
            )
            result = subprocess.run(
                [
                    str(loadgen),
                    "--port",
                    str(port),
                    "--mode",
                    "throughput",
                    "--conns",
                    str(conns),
                    "--size",
                    str(size),
                    "--window",
                    str(window),
                    "--warmup",
                    "0",
                    "--duration",
                    str(duration),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            subprocess.run(
                ["callgrind_control", "-i", "off", str(server.pid)],
                check=True,
                capture_output=True,
            )
            report = json.loads(result.stdout.strip().splitlines()[-1])
            if report["error_total"]:
                raise SystemExit(f"{kind}: the load generator saw errors: {report}")
            messages = int(report["msgs"])
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        # Written at exit: every instruction run while instrumentation was on.
        found = re.search(r"^totals: (\d+)", out.read_text(errors="replace"), re.M)
        if found is None or not int(found.group(1)):
            raise SystemExit(f"{kind}: callgrind counted nothing")
        return int(found.group(1)), messages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tree",
        action="append",
        default=[],
        help="NAME=PATH of another source tree whose netlab-echo to measure",
    )
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), action="append")
    args = parser.parse_args()
    trees = [("this", REPO)] + [
        (name, Path(path).resolve())
        for name, path in (item.split("=", 1) for item in args.tree)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        loadgen = buildLoadgen(Path(tmp))
        for name in args.scenario or sorted(SCENARIOS):
            scenario = SCENARIOS[name]
            instructions, messages = measure("stock", REPO, loadgen, scenario)
            stock = instructions / messages
            print(
                f"{name:6} stock         {stock:12,.0f} instructions/msg "
                f"({messages:,} msgs)",
                flush=True,
            )
            for label, tree in trees:
                instructions, messages = measure("netlab", tree, loadgen, scenario)
                perMessage = instructions / messages
                print(
                    f"{name:6} netlab {label:6} {perMessage:12,.0f} instructions/msg "
                    f"({messages:,} msgs)  stock/netlab {stock / perMessage:5.2f}x",
                    flush=True,
                )


if __name__ == "__main__":
    main()
