"""
Framing micro-benchmark, in one process, no sockets: one 32 MiB frame fed in
4 KiB pieces to Twisted's stock Int32StringReceiver and to netlab's
FrameReceiver (the reassembling receiver the JSON services use).

    python bench/framing_bench.py [--size-mib 32] [--piece 4096]

Prints the seconds each took and the ratio stock / netlab.
"""

from __future__ import annotations

import argparse
import time

from twisted.internet.testing import StringTransport
from twisted.protocols.basic import Int32StringReceiver

from twisted_lab.codecs.framing import FrameReceiver, encodeFrame


class StockSink(Int32StringReceiver):
    MAX_LENGTH = 2**31

    def stringReceived(self, string: bytes) -> None:
        self.got = len(string)


class NetlabSink(FrameReceiver):
    MAX_LENGTH = 2**31

    def stringReceived(self, string: bytes) -> None:
        self.got = len(string)


def feed(receiverClass: type, data: bytes, piece: int) -> float:
    receiver = receiverClass()
    receiver.makeConnection(StringTransport())
    view = memoryview(data)
    start = time.perf_counter()
    for i in range(0, len(data), piece):
        receiver.dataReceived(bytes(view[i : i + piece]))
    elapsed = time.perf_counter() - start
    assert receiver.got == len(data) - 4
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=32)
    parser.add_argument("--piece", type=int, default=4096)
    options = parser.parse_args()
    data = encodeFrame(b"\xab" * (options.size_mib * 1024 * 1024))
    netlab = feed(NetlabSink, data, options.piece)
    stock = feed(StockSink, data, options.piece)
    print(
        f"{options.size_mib} MiB in {options.piece}-byte pieces: "
        f"stock {stock:.3f} s, netlab {netlab:.3f} s, "
        f"ratio {stock / netlab:.0f}x"
    )


if __name__ == "__main__":
    main()
