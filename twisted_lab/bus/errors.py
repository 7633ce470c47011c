"""
Why a publication or a command was not handed to the bus.  Callers treat
the bus as a hint: they log these and carry on (the store is the record).
"""

from __future__ import annotations


class BusUnavailable(Exception):
    """
    The bus is not connected (not started, stopped, or reconnecting).
    """


class BusOverloaded(BusUnavailable):
    """
    Too much is already waiting (for the server's answers, or for
    delivery): this one is refused rather than buffered without bound.
    """
