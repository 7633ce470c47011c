"""
Transports: how requests reach the dispatcher and replies reach the peer.

C{connection} is the life of one served connection (caps, deadlines, one
bounded output account); C{int32} adapts Int32 frames over TCP, TLS and unix
sockets to L{twisted_lab.dispatch}; C{echo} is the echo protocols' fast path.
"""
