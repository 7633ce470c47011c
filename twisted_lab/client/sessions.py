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

A login through C{--server A --server B} (the nodes of one cluster, which
share their sessions) is saved for the I{set} of those servers, a
L{Cluster}: its key is the same in any order, and the token is sent to any
member of the set and to nothing else (L{chooseSession} only picks a
session whose set holds every server the command may connect to).  Such an
entry has C{"servers"} (every member, in the order given at login) besides
C{"server"} (the first), so a file written before clusters reads the same,
and an older client reading a cluster entry sees its first member only.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
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

    @property
    def members(self) -> tuple[Endpoint, ...]:
        """
        The servers a session of this endpoint may be sent to: itself.
        """
        return (self,)

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

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
class Cluster:
    """
    Several servers that share their sessions (the nodes of one cluster):
    a token issued by any of them is valid on all, and is sent to these
    only.  The members share their TLS settings (C{--tls} and C{--cafile}
    apply to every address).  C{members} keeps the order given at login;
    the key does not depend on it.
    """

    members: tuple[Endpoint, ...]

    @classmethod
    def of(
        cls,
        addresses: Sequence[tuple[str, int]],
        tls: bool = False,
        cafile: str | None = None,
    ) -> Endpoint | Cluster:
        """
        The servers for these addresses and connection settings: an
        L{Endpoint} for one address (the key of a single server, as before
        clusters), a L{Cluster} for several.  Duplicates count once.
        """
        if not addresses:
            raise ValueError("no server")
        first = Endpoint.of(addresses[0][0], addresses[0][1], tls, cafile)
        members: list[Endpoint] = []
        for host, port in addresses:
            member = Endpoint(
                normaliseHost(host), port, first.tls, first.cafile, first.ca
            )
            if member not in members:
                members.append(member)
        if len(members) == 1:
            return members[0]
        return cls(tuple(members))

    @property
    def tls(self) -> bool:
        return self.members[0].tls

    @property
    def cafile(self) -> str | None:
        return self.members[0].cafile

    @property
    def ca(self) -> str:
        return self.members[0].ca

    def key(self) -> str:
        """
        The key this cluster's session is saved under: the same for the
        same set of servers in any order.
        """
        addresses = ",".join(sorted({_hostPort(m) for m in self.members}))
        if not self.tls:
            return f"cluster:tcp:{addresses}"
        return f"cluster:tls:{self.ca}:{addresses}"

    def describe(self) -> str:
        """
        For people: C{host:port, host:port}, and C{(TLS)}.
        """
        return ", ".join(_hostPort(m) for m in self.members) + (
            " (TLS)" if self.tls else ""
        )


#: What a session belongs to: one server, or a cluster of them.
Servers = Endpoint | Cluster


def _hostPort(endpoint: Endpoint) -> str:
    host = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host
    return f"{host}:{endpoint.port}"


def addressesOf(servers: Servers) -> set[tuple[str, int]]:
    """
    The (host, port) of every member of C{servers}.
    """
    return {m.address for m in servers.members}


@dataclass(frozen=True)
class Session:
    """
    One saved login, for one server or for a cluster.
    """

    endpoint: Servers
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
        members = session.endpoint.members
        entry: dict[str, Any] = {
            "server": members[0].toJSON(),
            "username": session.username,
            "token": session.token,
            "expires_at": session.expiresAt,
        }
        if len(members) > 1:
            entry["servers"] = [m.toJSON() for m in members]
        with self._locked() as sessions:
            sessions[session.endpoint.key()] = entry
        return self.path

    def all(self) -> list[Session]:
        """
        Every saved session.
        """
        with self._locked() as sessions:
            return [s for s in map(_parse, sessions.values()) if s is not None]

    def get(self, endpoint: Servers) -> Session | None:
        """
        The session saved for exactly C{endpoint}, if any.
        """
        with self._locked() as sessions:
            return _parse(sessions.get(endpoint.key()))

    def forget(self, endpoint: Servers, token: str | None = None) -> None:
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
        members = data.get("servers")
        servers: Servers
        if isinstance(members, list) and len(members) > 1:
            servers = Cluster(tuple(Endpoint.fromJSON(m) for m in members))
        else:
            servers = Endpoint.fromJSON(data["server"])
        return Session(
            servers,
            str(data["username"]),
            str(data["token"]),
            str(data.get("expires_at", "")),
        )
    except (AttributeError, KeyError, TypeError, ValueError):
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
    servers: Sequence[tuple[str, int]] | None = None,
) -> Session:
    """
    The one saved session that fits what was given on the command line.
    Asking for TLS or a CA file only fits sessions made that way; not
    asking adopts the session's own TLS settings, so a token issued over
    TLS is sent over TLS again.

    With C{servers} (or both C{host} and C{port}), every one of them must
    be a member of the session's servers, since the token may be sent to
    any of them: a session saved for the cluster C{{A, B}} fits C{A, B},
    C{B, A}, C{A} alone and C{B} alone, never C{A, C}.  A session for
    exactly those servers is preferred to one for more.  Otherwise
    (C{host} or C{port} or neither), anything not given fits any value and
    a session fits when one of its servers does.

    @raise SessionChoiceError: none or several fit.
    """
    fingerprint = _fingerprintOrNone(cafile) if cafile is not None else None

    def tlsFits(s: Session) -> bool:
        return (not tls or s.endpoint.tls) and (
            cafile is None or (s.endpoint.tls and s.endpoint.ca == fingerprint)
        )

    if servers is None and host is not None and port is not None:
        servers = [(host, port)]
    if servers is not None:
        wanted: list[tuple[str, int]] = []
        for h, p in servers:
            if (normaliseHost(h), p) not in wanted:
                wanted.append((normaliseHost(h), p))
        candidates = [
            s for s in saved if tlsFits(s) and set(wanted) <= addressesOf(s.endpoint)
        ]
        exact = [s for s in candidates if addressesOf(s.endpoint) == set(wanted)]
        if len(exact) == 1:
            return exact[0]
        if not exact and len(candidates) == 1:
            return candidates[0]
        if exact:
            candidates = exact
        where = ", ".join(_where(h, p) for h, p in wanted)
    else:
        wantedHost = normaliseHost(host) if host is not None else None
        candidates = [
            s
            for s in saved
            if tlsFits(s) and any(fits(m, wantedHost, port) for m in s.endpoint.members)
        ]
        if len(candidates) == 1:
            return candidates[0]
        where = (
            "any server"
            if wantedHost is None and port is None
            else _where(wantedHost, port)
        )
    if not candidates:
        raise SessionChoiceError(
            f"not logged in to {where}: run 'netlab auth login' first"
        )
    names = "; ".join(sorted(s.endpoint.describe() for s in candidates))
    raise SessionChoiceError(
        f"logged in to several servers ({names}): choose one with --host/--port "
        "or --server",
        ambiguous=True,
    )


def fits(endpoint: Endpoint, host: str | None, port: int | None) -> bool:
    """
    Whether C{endpoint} is the server C{host} and C{port} name (anything
    not given fits any value).
    """
    return (host is None or endpoint.host == normaliseHost(host)) and (
        port is None or endpoint.port == port
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
