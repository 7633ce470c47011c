"""
netlab: a teaching-grade and production-honest suite of TCP services on
Twisted (echo, identity, auth, chat) with their client.
"""

__version__ = "0.1.0"
