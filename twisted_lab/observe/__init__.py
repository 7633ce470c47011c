"""
Observing a server: its counters and Prometheus metrics, the data-event
meter and the JSON event log.  Below the transports (which count into it)
and above the codecs; the services are handed their counters, never import
them.
"""
