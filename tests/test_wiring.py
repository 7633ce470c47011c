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


#: What an Options class may define: usage's own hooks, which parse.
PARSING = {"__init__", "postOptions", "parseArgs", "getSynopsis", "getUsage"}


class OptionsOnlyParseTests(SynchronousTestCase):
    """
    Options parse; building belongs to each tap's makeService (and the
    wiring functions of twisted_lab.runtime.server), so an Options class
    holds no reactor, store, bus or service.
    """

    def test_optionsDefineOnlyParsingMethods(self) -> None:
        from twisted_lab.runtime import server

        classes = [server.ServerOptions, server.StoredServerOptions] + [
            module.Options for module in (echo, identity, auth, chat)
        ]
        for cls in classes:
            own = {
                name
                for name, value in vars(cls).items()
                if callable(value) and not isinstance(value, type)
            }
            extra = {
                name
                for name in own
                if name not in PARSING and not name.startswith("opt_")
            }
            self.assertEqual(extra, set(), cls.__qualname__)
