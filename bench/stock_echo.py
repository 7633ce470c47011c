"""
The reference peer for the echo benchmark: Twisted's stock
Int32StringReceiver echo (stringReceived -> sendString), nothing else.

    python bench/stock_echo.py PORT_FILE [MAX_LENGTH]

Listens on 127.0.0.1, an OS-chosen port, written to PORT_FILE.
"""

import sys

from twisted.internet import protocol, reactor
from twisted.protocols.basic import Int32StringReceiver


class StockEcho(Int32StringReceiver):
    def stringReceived(self, string):
        self.sendString(string)


def main():
    portFile = sys.argv[1]
    maxLength = int(sys.argv[2]) if len(sys.argv) > 2 else 1024 * 1024
    StockEcho.MAX_LENGTH = maxLength
    factory = protocol.Factory.forProtocol(StockEcho)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    with open(portFile, "w") as f:
        f.write(f"{port.getHost().port}\n")
    reactor.run()


if __name__ == "__main__":
    main()
