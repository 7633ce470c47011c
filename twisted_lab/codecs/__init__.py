"""
Codecs: what travels on the wire and how it is named.

Int32 framing, the JSON message codec with its schemas, the error codes and
the event names.  Nothing here imports another part of netlab, a Twisted
service or the reactor: every other layer may use it, and other clients can
read it as the protocol's executable description.
"""
