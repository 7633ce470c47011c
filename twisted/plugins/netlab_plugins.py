"""
twistd plugins for the netlab services: C{twistd -n netlab-echo} and friends.

Kept tiny on purpose: twistd imports every plugin file to list them, so this
module names each service's module and imports nothing heavy (never the
reactor).
"""

from twisted.application.service import ServiceMaker

netlabEcho = ServiceMaker(
    "netlab echo server",
    "twisted_lab.taps.echo",
    "Echo Int32-framed messages (or raw bytes) back to the sender.",
    "netlab-echo",
)

netlabIdentity = ServiceMaker(
    "netlab identity server",
    "twisted_lab.taps.identity",
    "Recognise clients by IP address and greet them by name.",
    "netlab-identity",
)

netlabAuth = ServiceMaker(
    "netlab auth server",
    "twisted_lab.taps.auth",
    "Accounts and sessions: register, login, tokens, argon2id hashes.",
    "netlab-auth",
)

netlabChat = ServiceMaker(
    "netlab chat server",
    "twisted_lab.taps.chat",
    "Chat rooms, private messages and lossless history on netlab accounts.",
    "netlab-chat",
)
