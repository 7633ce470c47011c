"""
Saved sessions, like a browser's cookies: each token is kept with the server
that issued it, and is only ever sent back to that server.

A server is its host, its port, whether it was reached over TLS and the
certificate authority its certificate was verified against (the SHA-256 of
the C{--cafile} given at login, or the system's trust store).  The file is
C{$XDG_CONFIG_HOME/netlab/sessions.json} (C{~/.config/netlab/...} by
default), mode 0600 in a directory of mode 0700; sessions for several
servers live side by side in it.  Reads and writes hold an exclusive lock,
so two clients saving at once lose nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: What C{ca} is when the server was verified against the system's
#: authorities rather than a C{--cafile}.
SYSTEM_TRUST = "system"


def normaliseHost(host: str) -> str:
    """
    C{host} as it is compared and saved: no surrounding white space or
    brackets (C{[::1]} is C{::1}), lower case.
    """
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host.lower()


def caFingerprint(cafile: str | None) -> str:
    """
    The SHA-256 of C{cafile}'s contents, or L{SYSTEM_TRUST}.

    @raise OSError: the file cannot be read.
    """
    if cafile is None:
        return SYSTEM_TRUST
    with open(cafile, "rb") as f:
        return "sha256:" + hashlib.sha256(f.read()).hexdigest()


@dataclass(frozen=True)
class Endpoint:
    """
    The server a session belongs to.  C{ca} is only meaningful with TLS.
    """

    host: str
    port: int
    tls: bool = False
    cafile: str | None = None
    ca: str = SYSTEM_TRUST

    @classmethod
    def of(
        cls, host: str, port: int, tls: bool = False, cafile: str | None = None
    ) -> Endpoint:
        """
        The endpoint for these connection settings; C{--cafile} implies TLS
        and is remembered by absolute path and fingerprint.
        """
        tls = tls or cafile is not None
        path = os.path.abspath(cafile) if cafile else None
        return cls(
            normaliseHost(host),
            port,
            tls,
            path if tls else None,
            caFingerprint(path) if tls else SYSTEM_TRUST,
        )

    def key(self) -> str:
        """
        The key this endpoint's session is saved under.
        """
        if not self.tls:
            return f"tcp:{self.host}:{self.port}"
        return f"tls:{self.host}:{self.port}:{self.ca}"

    def describe(self) -> str:
        """
        For people: C{host:port}, with brackets for IPv6, and C{(TLS)}.
        """
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}" + (" (TLS)" if self.tls else "")

    def toJSON(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "port": self.port,
            "tls": self.tls,
            "cafile": self.cafile,
            "ca": self.ca,
        }

    @classmethod
    def fromJSON(cls, data: dict[str, Any]) -> Endpoint:
        return cls(
            str(data["host"]),
            int(data["port"]),
            bool(data.get("tls", False)),
            data.get("cafile"),
            str(data.get("ca", SYSTEM_TRUST)),
        )


@dataclass(frozen=True)
class Session:
    """
    One saved login.
    """

    endpoint: Endpoint
    username: str
    token: str
    expiresAt: str = ""


def configDirectory() -> Path:
    """
    C{$XDG_CONFIG_HOME/netlab}, or C{~/.config/netlab}.
    """
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(
        os.path.expanduser("~"), ".config"
    )
    return Path(base) / "netlab"


class SessionStore:
    """
    The sessions file.  Every method reads it afresh under a lock.
    """

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory if directory is not None else configDirectory()
        self.path = self.directory / "sessions.json"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        lockPath = self.directory / ".sessions.lock"
        fd = os.open(lockPath, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            sessions = self._read()
            before = json.dumps(sessions, sort_keys=True)
            yield sessions
            if json.dumps(sessions, sort_keys=True) != before:
                self._write(sessions)
        finally:
            os.close(fd)

    def _read(self) -> dict[str, Any]:
        try:
            with self.path.open(encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            return {}
        sessions = data.get("sessions") if isinstance(data, dict) else None
        return sessions if isinstance(sessions, dict) else {}

    def _write(self, sessions: dict[str, Any]) -> None:
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"version": 1, "sessions": sessions}, f, indent=1)
        os.replace(temporary, self.path)

    def save(self, session: Session) -> Path:
        """
        Save C{session} for its endpoint, replacing that endpoint's previous
        one only.
        """
        with self._locked() as sessions:
            sessions[session.endpoint.key()] = {
                "server": session.endpoint.toJSON(),
                "username": session.username,
                "token": session.token,
                "expires_at": session.expiresAt,
            }
        return self.path

    def all(self) -> list[Session]:
        """
        Every saved session.
        """
        with self._locked() as sessions:
            return [s for s in map(_parse, sessions.values()) if s is not None]

    def get(self, endpoint: Endpoint) -> Session | None:
        """
        The session saved for exactly C{endpoint}, if any.
        """
        with self._locked() as sessions:
            return _parse(sessions.get(endpoint.key()))

    def forget(self, endpoint: Endpoint, token: str | None = None) -> None:
        """
        Forget C{endpoint}'s session (only if it still holds C{token}, when
        given: a newer login since must survive).
        """
        with self._locked() as sessions:
            saved = sessions.get(endpoint.key())
            if saved is not None and (token is None or saved.get("token") == token):
                del sessions[endpoint.key()]


def _parse(data: Any) -> Session | None:
    try:
        return Session(
            Endpoint.fromJSON(data["server"]),
            str(data["username"]),
            str(data["token"]),
            str(data.get("expires_at", "")),
        )
    except (KeyError, TypeError, ValueError):
        return None


class SessionChoiceError(Exception):
    """
    No saved session fits, or several do and the person must choose.
    """

    def __init__(self, message: str, ambiguous: bool = False) -> None:
        super().__init__(message)
        self.ambiguous = ambiguous


def chooseSession(
    saved: list[Session],
    host: str | None,
    port: int | None,
    tls: bool,
    cafile: str | None,
) -> Session:
    """
    The one saved session that fits what was given on the command line
    (anything not given fits any value).  Asking for TLS or a CA file only
    fits sessions made that way; not asking adopts the session's own TLS
    settings, so a token issued over TLS is sent over TLS again.

    @raise SessionChoiceError: none or several fit.
    """
    wanted = normaliseHost(host) if host is not None else None
    candidates = [
        s
        for s in saved
        if (wanted is None or s.endpoint.host == wanted)
        and (port is None or s.endpoint.port == port)
        and (not tls or s.endpoint.tls)
        and (
            cafile is None
            or (s.endpoint.tls and s.endpoint.ca == _fingerprintOrNone(cafile))
        )
    ]
    if len(candidates) == 1:
        return candidates[0]
    where = "any server" if wanted is None and port is None else _where(wanted, port)
    if not candidates:
        raise SessionChoiceError(
            f"not logged in to {where}: run 'netlab auth login' first"
        )
    names = ", ".join(sorted(s.endpoint.describe() for s in candidates))
    raise SessionChoiceError(
        f"logged in to several servers ({names}): choose one with --host/--port",
        ambiguous=True,
    )


def _where(host: str | None, port: int | None) -> str:
    shown = host if host is not None else "*"
    if ":" in shown:
        shown = f"[{shown}]"
    return f"{shown}:{port if port is not None else '*'}"


def _fingerprintOrNone(cafile: str) -> str | None:
    try:
        return caFingerprint(cafile)
    except OSError:
        return None
