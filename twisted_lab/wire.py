"""
C{twisted_lab.wire} is where scripts have always imported L{FramedSocket}
from (README, docs/guide.md); it now lives in L{twisted_lab.client.wire}.
"""

from twisted_lab.client.wire import (
    ConnectionClosed,
    FramedSocket,
    FramedTLSSocket,
    FrameTooLong,
)

__all__ = ["ConnectionClosed", "FrameTooLong", "FramedSocket", "FramedTLSSocket"]
