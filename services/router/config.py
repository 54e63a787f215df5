"""RouterConfig: every setting of the router in one place."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from services.rpc.drain import DEFAULT_DRAIN_TIMEOUT_S

if TYPE_CHECKING:
    from services.rpc.tls import TlsConfig

DEFAULT_POLICY = "kv-aware"


@dataclass(frozen=True)
class RouterConfig:
    """How the router listens, places requests and judges workers alive."""

    host: str = "127.0.0.1"
    """Interface to listen on; 0.0.0.0 to accept other machines (compose, Kubernetes)."""
    port: int = 0
    """Port to listen on; 0 picks a free one (tests), which serve() logs."""
    policy: str = DEFAULT_POLICY
    """Placement policy by name (see services.router.policies.POLICIES)."""
    policy_seed: int | None = None
    """Seed of the policy's random tie-breaking. None draws one per process (logged), so
    router replicas that see the same tied workers do not all pick the same one; set it
    to replay a placement."""
    heartbeat_interval_s: float = 1.0
    """How often workers are told to heartbeat (RegisterResponse.heartbeat_interval_ms)."""
    heartbeat_timeout_s: float | None = None
    """Silence after which a worker is removed; None means 3 × heartbeat_interval_s."""
    max_retries: int = 3
    """Most times one request moves to another worker after a failure (prefill
    retries and decode resumes together) before it fails with UNAVAILABLE."""
    decode_wait_s: float = 10.0
    """How long a request whose client already has tokens waits for a decode worker when
    none is left (the only one restarting), before it ends with an error message and
    UNAVAILABLE; the client's deadline bounds it too. Keep it under the prefill's KV lease
    (30 s): a decode worker found after the lease prefills the prompt again. Requests that
    sent nothing yet fail at once (UNAVAILABLE before any message is safe to retry). 0:
    never wait."""
    prefill_timeout_s: float = 60.0
    """Longest wait for one Prefill call; past it the worker counts as hung and the
    request is retried elsewhere. The client's own deadline, when shorter, wins."""
    kv_lease_ms: int = 0
    """PrefillRequest.lease_ms: how long a prefill worker keeps a prompt's blocks
    pinned for the decode worker; 0 leaves the worker's default (30 s), and more than the
    worker's --lease-s is cut to it (the worker's operator bounds its pool's pins)."""
    kv_timeout_ms: int = 0
    """DecodeRequest.kv_timeout_ms: how long a decode worker tries to read KV before
    prefilling locally; 0 leaves the worker's default."""
    release_timeout_s: float = 2.0
    """Deadline of the best-effort ReleaseKV sent when a decode leg fails, so the
    prefill worker unpins blocks nobody will read before their lease runs out."""
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S
    """On SIGINT/SIGTERM: how long the streams in flight get to finish while new calls are
    refused, before the rest are cut."""
    metrics_port: int = 0
    """Serve Prometheus /metrics on this port (TTFT, inter-token latency, retries); 0: off."""
    metrics_client_ca: Path | None = None
    """PEM CA bundle that signs the scrapers' certificates: /metrics requires one it signed
    and accepts no other (``tls.ca``'s neither), while the gRPC port keeps trusting
    ``tls.ca`` alone. Needs ``tls`` with a certificate. None: /metrics follows ``tls``."""
    local_prefill_max_tokens: int = 256
    """Conditional disaggregation (kv-aware policy only): when the part of the prompt the
    chosen decode worker does not hold is at most this many tokens, it prefills locally
    and the prefill pool is skipped (a KV handoff costs more than so short a prefill).
    ServingInfo.placement says "local-short-prompt". 0: only a fully held prompt. Also the
    slack for either local placement: not when the prefill queued on the decode worker
    would delay the first token by more than this many tokens beyond the least busy
    prefill worker."""
    local_prefill_min_cached: float = 0.9
    """Conditional disaggregation (kv-aware policy only): when the chosen decode worker
    already holds at least this share of the prompt (its cached prefix, per the router's
    index), it prefills the rest locally ("local-cached-prefix"). Above 1: never."""
    tls: TlsConfig | None = None
    """TLS on the router's port (mTLS when it requires client certificates: the gateway and
    workers must present ones signed by its CA), and the identity it presents to workers it
    dials. None: plaintext."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if not self.heartbeat_interval_s > 0:
            raise ValueError(
                f"heartbeat_interval_s must be above 0, got {self.heartbeat_interval_s}"
            )
        if self.heartbeat_timeout_s is not None and (
            self.heartbeat_timeout_s <= self.heartbeat_interval_s
        ):
            raise ValueError(
                f"heartbeat_timeout_s ({self.heartbeat_timeout_s}) must exceed "
                f"heartbeat_interval_s ({self.heartbeat_interval_s}), or every worker "
                "would expire between two heartbeats"
            )
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be 0 or more, got {self.max_retries}")
        for name in ("prefill_timeout_s", "release_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be above 0, got {getattr(self, name)}")
        for name in ("kv_lease_ms", "kv_timeout_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.local_prefill_max_tokens < 0:
            raise ValueError(
                f"local_prefill_max_tokens must be 0 or more, got {self.local_prefill_max_tokens}"
            )
        if not self.local_prefill_min_cached >= 0:
            raise ValueError(
                f"local_prefill_min_cached must be 0 or more, got {self.local_prefill_min_cached}"
            )
        if not self.decode_wait_s >= 0:
            raise ValueError(f"decode_wait_s must be 0 or more, got {self.decode_wait_s}")
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s must be 0 or more, got {self.drain_timeout_s}")

    @property
    def effective_heartbeat_timeout_s(self) -> float:
        """heartbeat_timeout_s, or 3 × heartbeat_interval_s when it is unset."""
        if self.heartbeat_timeout_s is not None:
            return self.heartbeat_timeout_s
        return 3 * self.heartbeat_interval_s
