"""Options every channel Tandem dials carries (the service clients and the launchers' health
checks alike)."""

from __future__ import annotations

RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
"""Every channel Tandem dials retries a peer that is down at least once a second.

gRPC's default backs off from 1 s by 1.6x up to 120 s, so a channel finds a peer that came
back up to two minutes late: a worker whose router restarted after a minute's outage
re-registered (and the gateway relayed again) only when its backoff ran out, and ``tandem
up`` saw each service serving 1-3 s after it did. The peers are a handful of internal
services and a refused connection costs nothing. Not ``grpc.min_reconnect_backoff_ms``: gRPC
also takes it as the shortest deadline of one connection attempt (20 s), which a slow TLS
handshake needs."""
