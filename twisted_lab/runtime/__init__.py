"""
Running a server: listening (port fallback, port file), start-up failures,
the event log, metrics and systemd readiness.
"""
