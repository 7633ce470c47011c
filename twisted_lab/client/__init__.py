"""
The client side: the C{netlab} command, its chat session and terminal UI,
saved sessions, the Deferred-based L{frames.FrameClient} and the blocking
L{wire.FramedSocket}.  Nothing here imports the server side.
"""
