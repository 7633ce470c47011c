"""
Unit tests of the saved sessions (L{twisted_lab.client.sessions}): keyed by
server, private, side by side, and chosen so a token only goes back to the
server that issued it.
"""

from __future__ import annotations

import argparse
import os
import stat
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from twisted_lab.client.sessions import (
    SYSTEM_TRUST,
    Endpoint,
    Session,
    SessionChoiceError,
    SessionStore,
    chooseSession,
    normaliseHost,
)


class EndpointTests(SynchronousTestCase):
    def test_hostIsNormalised(self) -> None:
        self.assertEqual(normaliseHost(" [::1] "), "::1")
        self.assertEqual(normaliseHost("LocalHost"), "localhost")
        self.assertEqual(Endpoint.of("[::1]", 9092).describe(), "[::1]:9092")

    def test_keysDifferByEverythingThatNamesTheServer(self) -> None:
        ca = Path(self.mktemp())
        ca.write_bytes(b"one CA")
        other = Path(self.mktemp())
        other.write_bytes(b"another CA")
        keys = {
            Endpoint.of("localhost", 9092).key(),
            Endpoint.of("localhost", 9093).key(),
            Endpoint.of("127.0.0.1", 9092).key(),
            Endpoint.of("localhost", 9092, tls=True).key(),
            Endpoint.of("localhost", 9092, cafile=str(ca)).key(),
            Endpoint.of("localhost", 9092, cafile=str(other)).key(),
        }
        self.assertEqual(len(keys), 6)

    def test_cafileImpliesTLSAndIsFingerprinted(self) -> None:
        ca = Path(self.mktemp())
        ca.write_bytes(b"CA")
        endpoint = Endpoint.of("h", 1, cafile=str(ca))
        self.assertTrue(endpoint.tls)
        self.assertTrue(endpoint.ca.startswith("sha256:"))
        self.assertEqual(endpoint.cafile, os.path.abspath(ca))
        self.assertEqual(Endpoint.of("h", 1, tls=True).ca, SYSTEM_TRUST)


class SessionStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = Path(self.mktemp()) / "netlab"
        self.store = SessionStore(self.directory)

    def test_savedPrivately(self) -> None:
        path = self.store.save(Session(Endpoint.of("h", 1), "alice", "t1"))
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(self.directory).st_mode), 0o700)

    def test_severalServersCoexist(self) -> None:
        a, b = Endpoint.of("h", 1), Endpoint.of("h", 2, tls=True)
        self.store.save(Session(a, "alice", "ta"))
        self.store.save(Session(b, "bob", "tb"))
        self.assertEqual(self.store.get(a), Session(a, "alice", "ta"))
        self.assertEqual(self.store.get(b), Session(b, "bob", "tb"))
        self.store.save(Session(a, "carol", "tc"))  # a new login replaces a's only
        self.assertEqual(self.store.get(a).token, "tc")
        self.assertEqual(self.store.get(b).token, "tb")
        self.assertEqual(len(self.store.all()), 2)

    def test_forgetOnlyThatServerAndThatToken(self) -> None:
        a, b = Endpoint.of("h", 1), Endpoint.of("h", 2)
        self.store.save(Session(a, "alice", "ta"))
        self.store.save(Session(b, "alice", "tb"))
        self.store.forget(a, "an older token")  # a newer login survives
        self.assertIsNotNone(self.store.get(a))
        self.store.forget(a, "ta")
        self.assertIsNone(self.store.get(a))
        self.assertIsNotNone(self.store.get(b))

    def test_aDamagedFileIsNoSession(self) -> None:
        self.directory.mkdir(parents=True)
        (self.directory / "sessions.json").write_text("{not json")
        self.assertEqual(self.store.all(), [])
        self.store.save(Session(Endpoint.of("h", 1), "alice", "t"))
        self.assertEqual(len(self.store.all()), 1)


class ChooseSessionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.plain = Session(Endpoint.of("localhost", 9092), "alice", "plain")
        self.tls = Session(Endpoint.of("secure", 9443, tls=True), "alice", "tls")

    def test_theOnlySessionNamesTheServer(self) -> None:
        self.assertIs(chooseSession([self.tls], None, None, False, None), self.tls)

    def test_severalSessionsNeedAChoice(self) -> None:
        with self.assertRaises(SessionChoiceError) as raised:
            chooseSession([self.plain, self.tls], None, None, False, None)
        self.assertTrue(raised.exception.ambiguous)
        self.assertIn("secure:9443 (TLS)", str(raised.exception))
        self.assertIs(
            chooseSession([self.plain, self.tls], None, 9443, False, None), self.tls
        )
        self.assertIs(
            chooseSession([self.plain, self.tls], "LOCALHOST", None, False, None),
            self.plain,
        )

    def test_noSessionForThatServer(self) -> None:
        with self.assertRaises(SessionChoiceError) as raised:
            chooseSession([self.plain], "other", 9092, False, None)
        self.assertFalse(raised.exception.ambiguous)
        self.assertIn("not logged in to other:9092", str(raised.exception))

    def test_askingForTLSNeverPicksAPlainSession(self) -> None:
        with self.assertRaises(SessionChoiceError):
            chooseSession([self.plain], "localhost", 9092, True, None)

    def test_notAskingForTLSAdoptsTheSessionsTLS(self) -> None:
        chosen = chooseSession([self.tls], "secure", 9443, False, None)
        self.assertTrue(chosen.endpoint.tls)

    def test_anotherCAIsAnotherServer(self) -> None:
        ca, other = Path(self.mktemp()), Path(self.mktemp())
        ca.write_bytes(b"CA")
        other.write_bytes(b"other CA")
        pinned = Session(Endpoint.of("h", 1, cafile=str(ca)), "alice", "t")
        self.assertIs(chooseSession([pinned], "h", 1, True, str(ca)), pinned)
        with self.assertRaises(SessionChoiceError):
            chooseSession([pinned], "h", 1, True, str(other))


class SavedSessionOptionsTests(SynchronousTestCase):
    """
    L{twisted_lab.client.cli.useSavedSession}: whoami, logout and passwd take the
    server, port and TLS settings from the session.
    """

    def setUp(self) -> None:
        config = Path(self.mktemp()).absolute()
        os.environ["XDG_CONFIG_HOME"] = str(config)
        self.addCleanup(os.environ.pop, "XDG_CONFIG_HOME")
        self.ca = config / "ca.pem"
        config.mkdir(parents=True)
        self.ca.write_bytes(b"CA")
        SessionStore().save(
            Session(Endpoint.of("127.0.0.1", 9443, cafile=str(self.ca)), "a", "t")
        )

    def options(self, **given: object) -> argparse.Namespace:
        values: dict[str, object] = {
            "host": None,
            "port": None,
            "tls": False,
            "cafile": None,
            "command": "auth",
            "interactive": False,
        }
        values.update(given)
        return argparse.Namespace(**values)

    def test_serverComesFromTheSession(self) -> None:
        from twisted_lab.client.cli import useSavedSession

        options = self.options()
        useSavedSession(options, takeServer=True)
        self.assertEqual(
            (options.host, options.port, options.tls, options.cafile),
            ("127.0.0.1", 9443, True, str(self.ca)),
        )
        self.assertEqual(options.session.token, "t")

    def test_aChangedCAFileIsRefused(self) -> None:
        from twisted_lab.client.cli import Abort, useSavedSession

        self.ca.write_bytes(b"a different CA")
        with self.assertRaises(Abort) as raised:
            useSavedSession(self.options(), takeServer=True)
        self.assertEqual(raised.exception.code, 5)
        self.assertIn("changed", str(raised.exception))

    def test_anotherServerHasNoSession(self) -> None:
        from twisted_lab.client.cli import Abort, useSavedSession

        with self.assertRaises(Abort) as raised:
            useSavedSession(self.options(port=9092), takeServer=True)
        self.assertEqual(raised.exception.code, 5)
        options = self.options(host="127.0.0.1", port=9093, command="chat")
        self.assertIsNone(useSavedSession(options, takeServer=False))
        self.assertFalse(options.tls)
