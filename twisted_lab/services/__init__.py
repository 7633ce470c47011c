"""
Service logic: identity, auth (cred realm, checkers, throttles) and chat
(rooms, membership, seq, fan-out).

Plain objects handed a clock, their stores and their clients.  They never
import a transport, a frame encoder, a database module or the reactor
(C{tests/test_layers.py} checks it), so the Int32 and WebSocket transports,
and the SQLite, memory and PostgreSQL stores, all serve the same logic.
"""
