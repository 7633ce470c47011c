"""
Event names: the stable C{event} field of every netlab server event.

Log processors match on these names (they are part of the operator's
interface), so every event a server writes is named here, once, and tests
and docs use the same list.  Payloads, passwords and tokens are never passed
as event fields: every keyword given to a L{twisted.logger.Logger} call is
serialised by the JSON observer.
"""

from __future__ import annotations

# Event names (the `event` field).  Kept here so tests and docs use one list.
SERVER_STARTED = "server_started"
LISTENING = "listening"
PORT_FALLBACK = "port_fallback"
LISTEN_FAILED = "listen_failed"
CLIENT_CONNECTED = "client_connected"
DATA_RECEIVED = "data_received"
DATA_SENT = "data_sent"
DATA_SUMMARY = "data_summary"
CLIENT_DISCONNECTED = "client_disconnected"
SERVER_STOPPING = "server_stopping"
SERVER_STOPPED = "server_stopped"
FRAME_TOO_LONG = "frame_too_long"
IDLE_TIMEOUT = "idle_timeout"
FRAME_TIMEOUT = "frame_timeout"
CONNECTION_REFUSED = "connection_refused"
SLOW_CONSUMER = "slow_consumer"
RATE_LIMITED = "rate_limited"
INTERNAL_ERROR = "internal_error"
EVENTS_SUPPRESSED = "events_suppressed"
STORE_FAILED = "store_failed"
SESSION_ENDED = "session_ended"

# Service events.
USER_REGISTERED = "user_registered"
SESSION_RESUMED = "session_resumed"
ROOM_LEFT = "room_left"
ROOM_JOINED = "room_joined"
PRIVATE_SENT = "private_sent"
PASSWORD_CHANGED = "password_changed"  # noqa: S105 (an event name)
NOTIFY_FAILED = "notify_failed"
METRICS_LISTENING = "metrics_listening"
MESSAGE_STORED = "message_stored"
LOGIN_FAILED = "login_failed"
LOGGED_OUT = "logged_out"
IDENTITY_STORED = "identity_stored"
IDENTITY_KNOWN = "identity_known"
IDENTITY_FORGOTTEN = "identity_forgotten"
IDENTITY_ASKED = "identity_asked"
LOGIN_SUCCEEDED = "login_succeeded"

# The web listener of netlab-chat (twisted_lab.transports.web).
WEB_ORIGIN_REFUSED = "web_origin_refused"
WEBSOCKET_OPENED = "websocket_opened"
WEB_REQUEST_TOO_LONG = "web_request_too_long"
WEBSOCKET_BINARY = "websocket_binary"

# The shared throttles of a cluster (twisted_lab.services.auth).
THROTTLES_UNAVAILABLE = "throttles_unavailable"

# The chat service as several nodes (issue 12): the bus between them, each
# room's feed, the presence directory.
BUS_PUBLISH_FAILED = "bus_publish_failed"
BUS_PAYLOAD_REFUSED = "bus_payload_refused"
CLUSTER_CATCH_UP = "cluster_catch_up"
FEED_READ_FAILED = "feed_read_failed"
FEED_STORE_GAP = "feed_store_gap"
NODE_GONE = "node_gone"
NODE_REAPED = "node_reaped"
PRESENCE_FAILED = "presence_failed"
PRESENCE_RESUMED = "presence_resumed"
PRESENCE_RESYNCED = "presence_resynced"

# The bus's own connections (twisted_lab.bus).
BUS_CONNECT_FAILED = "bus_connect_failed"
BUS_CONNECTED = "bus_connected"
BUS_CONNECTION_LOST = "bus_connection_lost"
BUS_PROTOCOL_ERROR = "bus_protocol_error"
BUS_RECONNECT_CALLBACK_FAILED = "bus_reconnect_callback_failed"
BUS_SETUP_FAILED = "bus_setup_failed"
BUS_SUBSCRIBER_FAILED = "bus_subscriber_failed"
BUS_SUBSCRIPTION_FAILED = "bus_subscription_failed"
BUS_UNRESPONSIVE = "bus_unresponsive"

# The web listener's hostile-client bounds (twisted_lab.transports.web).
WEB_UPGRADE_REFUSED = "web_upgrade_refused"
WEBSOCKET_TOO_FRAGMENTED = "websocket_too_fragmented"
WEBSOCKET_CONTROL_FLOOD = "websocket_control_flood"

# The chat cluster's review (issue 12): bounds that now say when they bite.
BUS_POSITION_DROPPED = "bus_position_dropped"
NODE_NAME_TAKEN = "node_name_taken"
