"""
Every error code a netlab server sends (C{docs/protocol.md}, "Error
codes"), in one enum.

Clients branch on these codes, so they are part of the protocol: a code is
added here and in the document together, and never renamed.
L{ErrorCode} is a L{StrEnum}, so a member is the string on the wire.
C{tests/test_errors.py} checks that this list and the document's table
are the same.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    BAD_REQUEST = "bad_request"
    UNKNOWN_TYPE = "unknown_type"
    FRAME_TOO_LONG = "frame_too_long"
    NOT_AUTHENTICATED = "not_authenticated"
    RATE_LIMITED = "rate_limited"
    INTERNAL_ERROR = "internal_error"
    INVALID_NAME = "invalid_name"
    INVALID_USERNAME = "invalid_username"
    WEAK_PASSWORD = "weak_password"  # noqa: S105 (a code, not a password)
    USERNAME_TAKEN = "username_taken"
    BAD_CREDENTIALS = "bad_credentials"
    INVALID_TOKEN = "invalid_token"  # noqa: S105 (a code, not a token)
    IDLE_TIMEOUT = "idle_timeout"
    FRAME_TIMEOUT = "frame_timeout"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    SERVER_SHUTDOWN = "server_shutdown"
    NO_SUCH_USER = "no_such_user"
    SLOW_CONSUMER = "slow_consumer"
    SESSION_REVOKED = "session_revoked"
    SESSION_EXPIRED = "session_expired"
    TOO_MANY_ROOMS = "too_many_rooms"
    NOT_IN_ROOM = "not_in_room"
    INVALID_ROOM = "invalid_room"
