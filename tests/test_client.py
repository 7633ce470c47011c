"""
Unit tests of the Deferred-based client and the command-line prompts.
"""

from __future__ import annotations

import io

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.helpers import frames
from twisted_lab.client.cli import Abort, resolveTarget, validHost, validPort
from twisted_lab.client.frames import FrameClient


class FrameClientTests(SynchronousTestCase):
    def client(self) -> tuple[FrameClient, StringTransport, list[str]]:
        reports: list[str] = []
        client = FrameClient(reports.append, label="test:1")
        transport = StringTransport()
        client.makeConnection(transport)
        return client, transport, reports

    def test_requestAndReply(self) -> None:
        client, transport, reports = self.client()
        d = client.request(b"hi")
        self.assertEqual(transport.value(), frames(b"hi"))
        self.assertNoResult(d)
        client.dataReceived(frames(b"hi"))
        self.assertEqual(self.successResultOf(d), b"hi")
        self.assertEqual(
            reports, ["connected to test:1", "sent 2 bytes", "received 2 bytes"]
        )

    def test_earlyFramesAreQueued(self) -> None:
        client, _, _ = self.client()
        client.dataReceived(frames(b"one", b"two"))
        self.assertEqual(self.successResultOf(client.receive()), b"one")
        self.assertEqual(self.successResultOf(client.receive()), b"two")

    def test_waitersFailOnDisconnect(self) -> None:
        client, _, reports = self.client()
        d = client.receive()
        client.connectionLost(Failure(ConnectionLost("reset")))
        self.failureResultOf(d, ConnectionLost)
        self.failureResultOf(client.receive(), ConnectionLost)
        self.assertIsNone(self.successResultOf(client.disconnected))
        self.assertTrue(reports[-1].startswith("disconnected: "))

    def test_cleanDisconnect(self) -> None:
        client, _, reports = self.client()
        client.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(reports[-1], "disconnected")


class PromptTests(SynchronousTestCase):
    def answers(self, *replies: str):
        queue = list(replies)
        asked: list[str] = []

        def ask(question: str) -> str:
            asked.append(question)
            if not queue:
                raise EOFError
            return queue.pop(0)

        return ask, asked

    def test_validPort(self) -> None:
        self.assertEqual(validPort(" 9090 "), 9090)
        for bad in ("x", "0", "65536", "-1", ""):
            self.assertRaises(ValueError, validPort, bad)

    def test_validHost(self) -> None:
        self.assertEqual(validHost("localhost"), "localhost")
        self.assertEqual(validHost("127.0.0.1"), "127.0.0.1")
        self.assertRaises(ValueError, validHost, "")
        self.assertRaises(ValueError, validHost, "no such host.invalid")

    def test_enterAcceptsDefaults(self) -> None:
        ask, asked = self.answers("", "")
        self.assertEqual(
            resolveTarget(None, None, 9090, True, ask, io.StringIO()),
            ("localhost", 9090),
        )
        self.assertEqual(asked, ["Host [localhost]: ", "Port [9090]: "])

    def test_asksAgainOnInvalidInput(self) -> None:
        ask, asked = self.answers("bad host.invalid", "127.0.0.1", "http", "99999", "7")
        out = io.StringIO()
        self.assertEqual(
            resolveTarget(None, None, 9090, True, ask, out), ("127.0.0.1", 7)
        )
        self.assertEqual(len(asked), 5)
        messages = out.getvalue()
        self.assertIn("cannot resolve", messages)
        self.assertIn("is not a number", messages)
        self.assertIn("not between 1 and 65535", messages)

    def test_givenValuesAreNotAsked(self) -> None:
        ask, asked = self.answers()
        self.assertEqual(
            resolveTarget("h", 1, 9090, True, ask, io.StringIO()), ("h", 1)
        )
        self.assertEqual(asked, [])

    def test_noTerminalUsesDefaults(self) -> None:
        ask, asked = self.answers()
        self.assertEqual(
            resolveTarget(None, None, 9091, False, ask, io.StringIO()),
            ("localhost", 9091),
        )
        self.assertEqual(asked, [])

    def test_endOfInputAborts(self) -> None:
        ask, _ = self.answers()
        with self.assertRaises(Abort) as raised:
            resolveTarget(None, None, 9090, True, ask, io.StringIO())
        self.assertEqual(raised.exception.code, 2)


class PasswordPromptTests(SynchronousTestCase):
    def answers(self, *replies: str):
        queue = list(replies)
        asked: list[str] = []

        def ask(question: str) -> str:
            asked.append(question)
            if not queue:
                raise EOFError
            return queue.pop(0)

        return ask, asked

    def test_noEmptyBrackets(self) -> None:
        from twisted_lab.client.cli import askUntilValid

        ask, asked = self.answers("alice")
        self.assertEqual(askUntilValid("Username", "", str.strip, ask), "alice")
        self.assertEqual(asked, ["Username: "])

    def test_newPasswordAskedTwiceUntilBothAgreeAndItIsLongEnough(self) -> None:
        from twisted_lab.client.cli import askNewPassword

        ask, asked = self.answers(
            "short", "long enough", "typo here", "long enough", "long enough"
        )
        out = io.StringIO()
        self.assertEqual(askNewPassword(ask, out), "long enough")
        self.assertEqual(
            asked,
            [
                "New password: ",
                "New password: ",
                "New password (again): ",
                "New password: ",
                "New password (again): ",
            ],
        )
        self.assertIn("at least 8 characters", out.getvalue())
        self.assertIn("the passwords differ", out.getvalue())

    def test_endOfInputAtAPasswordPrompt(self) -> None:
        from twisted_lab.client.cli import askNewPassword

        ask, _ = self.answers()
        with self.assertRaises(Abort) as raised:
            askNewPassword(ask, io.StringIO())
        self.assertEqual(raised.exception.code, 2)

    def test_passwordRules(self) -> None:
        from twisted_lab.client.cli import passwordProblem

        self.assertIsNone(passwordProblem("12345678"))
        self.assertIsNotNone(passwordProblem("1234567"))
        self.assertIsNotNone(passwordProblem("é" * 513))  # 1026 bytes


class FailureMessageTests(SynchronousTestCase):
    """
    Every command turns the usual failures into one line, and only those.
    """

    def message(self, e: Exception):
        import argparse

        from twisted_lab.client.cli import failureMessage

        abort = failureMessage(e, argparse.Namespace(host="h", port=1))
        return None if abort is None else str(abort)

    def test_serverErrors(self) -> None:
        from twisted_lab.client.frames import ServerError

        self.assertEqual(
            self.message(ServerError({"code": "bad_credentials", "message": "wrong"})),
            "bad_credentials: wrong",
        )
        self.assertEqual(
            self.message(ServerError({"code": "rate_limited", "retry_after": 4})),
            "rate limited: try again in 4 s",
        )

    def test_connectionFailures(self) -> None:
        from twisted.internet import error

        self.assertEqual(
            self.message(error.ConnectionRefusedError()),
            "cannot connect to h:1: connection refused (is the server running?)",
        )
        self.assertIn("connection lost", self.message(ConnectionLost("reset")))
        self.assertIsNone(self.message(ZeroDivisionError("a bug")))

    def test_tlsErrorsAreReadable(self) -> None:
        from OpenSSL.SSL import Error as SSLError

        raw = SSLError([("SSL routines", "", "certificate verify failed")])
        message = self.message(raw)
        self.assertEqual(
            message,
            "TLS failed: certificate verify failed (the server's certificate is "
            "not trusted: give its CA with --cafile)",
        )
        self.assertNotIn("SSL routines", message)

    def test_exitCodes(self) -> None:
        import argparse

        from twisted.internet import error

        from twisted_lab.client.cli import failureMessage
        from twisted_lab.client.frames import (
            ClosedByServer,
            ServerError,
            ServerSpeaksTLS,
        )

        def code(e: Exception) -> int:
            abort = failureMessage(e, argparse.Namespace(host="h", port=1))
            assert abort is not None
            return abort.code

        self.assertEqual(code(ServerError({"code": "bad_credentials"})), 1)
        self.assertEqual(code(ServerError({"code": "some_future_code"})), 1)
        for session in ("invalid_token", "session_revoked", "session_expired"):
            self.assertEqual(code(ServerError({"code": session})), 5)
        self.assertEqual(code(error.ConnectionRefusedError()), 3)
        self.assertEqual(code(error.DNSLookupError("x")), 3)
        self.assertEqual(code(ServerSpeaksTLS("h:1 speaks TLS")), 3)
        self.assertEqual(code(ClosedByServer("idle_timeout", "idle")), 4)
        self.assertEqual(code(ConnectionLost("reset")), 4)
        self.assertEqual(
            self.message(ClosedByServer("server_shutdown", "stopping")),
            "the server closed the connection: server_shutdown: stopping",
        )


class TLSDetectionTests(SynchronousTestCase):
    def test_aTLSAnswerToAPlainClientSaysSo(self) -> None:
        from twisted_lab.client.frames import MessageClient, ServerSpeaksTLS

        client = MessageClient()
        client.makeConnection(StringTransport())
        d = client.call({"type": "ping"})
        client.dataReceived(b"\x15\x03\x03\x00\x02\x02\x46")  # a TLS alert
        self.assertTrue(client.transport.disconnecting)
        client.connectionLost(Failure(ConnectionLost()))
        failure = self.failureResultOf(d, ServerSpeaksTLS)
        self.assertIn("speaks TLS: connect with --tls", str(failure.value))

    def test_closingErrorIsTheReason(self) -> None:
        from twisted_lab.client.frames import ClosedByServer, MessageClient

        client = MessageClient()
        client.makeConnection(StringTransport())
        d = client.call({"type": "ping"})
        client.dataReceived(
            frames(b'{"type":"error","code":"idle_timeout","message":"idle"}')
        )
        client.connectionLost(Failure(ConnectionDone()))
        failure = self.failureResultOf(d, ClosedByServer)
        self.assertEqual(failure.value.code, "idle_timeout")
