"""
Wiring: each service's C{makeService(config, reactor)} builds its services
on the reactor it is given (a MemoryReactorClock here), binds only when
started, and never reaches for the global reactor.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from twisted_lab.runtime.server import NetlabService
from twisted_lab.taps import auth, chat, echo, identity


def netlabServices(top) -> list[NetlabService]:
    if isinstance(top, NetlabService):
        return [top]
    return [s for s in top if isinstance(s, NetlabService)]


class MakeServiceTests(SynchronousTestCase):
    def test_everyServiceUsesTheReactorItIsGiven(self) -> None:
        db = str(Path(self.mktemp()).absolute())
        for module, args in (
            (echo, ["--port", "7001"]),
            (identity, ["--port", "7002", "--db", db]),
            (auth, ["--port", "7003", "--db", db]),
            (chat, ["--port", "7004", "--db", db]),
        ):
            reactor = MemoryReactorClock()
            config = module.Options()
            config.parseOptions(args)
            top = module.makeService(config, reactor)
            [server] = netlabServices(top)
            self.addCleanup(server.console.close)
            self.assertIs(server.reactor, reactor)
            self.assertIs(server.factory.clock, reactor)
            self.assertEqual(reactor.tcpServers, [], "nothing bound before start")
            server.privilegedStartService()
            [(port, _factory, _backlog, interface)] = reactor.tcpServers
            self.assertEqual((port, interface), (int(args[1]), "127.0.0.1"))
