"""Prometheus counters for metering: requests, tokens, decisions and limit rejections.

Every counter is labelled by ``team`` and ``model`` and is incremented where the thing it
counts happens exactly once, so retries and duplicated settles never double-count:

- ``tandem_gateway_requests_total{team, model, outcome}`` and the token counters
  ``tandem_gateway_{prompt,completion,cached}_tokens_total{team, model}``: when the ledger
  inserts a request id for the first time (:meth:`GatewayMetrics.settled`, called by
  ``Ledger.record``; a second settle of the same id inserts nothing and counts nothing). The
  id is the one the gateway mints per call, so a client that reuses its own is counted
  every time it is served.
- ``tandem_gateway_decisions_total{team, model, decision, reason}``: on each committed audit
  append (:meth:`GatewayMetrics.decided`, called by ``AuditLog.append``); ``reason`` is a
  class, not the audit text (see :func:`reason_class`).
- ``tandem_gateway_limit_rejections_total{team, model, scope, limit}``: on each audited
  ``limit exceeded`` denial; ``scope`` is the scope's kind (``key``, ``user``, ``team``) and
  ``limit`` the limit's name (``requests_per_minute`` …).
- ``tandem_gateway_settles_pending``: a gauge of decisions queued for the settler
  (``services/gateway/settler.py``) and not yet written.
- ``tandem_gateway_streams``: a gauge of Generate streams being relayed (gRPC and HTTP);
  past the gateway's ``max_streams`` new ones are refused (reason class ``at_capacity``).

Counters count committed rows only: if the store write fails, nothing is counted.

Cardinality: ``model`` and (for OIDC callers) ``team`` come from the request or token, so
each label keeps at most :data:`MAX_LABEL_VALUES` distinct values and maps any further value
to ``_other``; an unauthenticated caller's model is always ``-`` (it is attacker-chosen).
Once the gateway gives it its policy's models (:meth:`GatewayMetrics.label_models`), a
model the policy does not list is ``_unlisted``: the admin role may name any model, and a
loop of made-up names took every model slot, counting real models as ``_other``.

:data:`METRICS` is the process-wide instance that ``Ledger`` and ``AuditLog`` count into
unless given another; the gateway serves ``METRICS.registry`` on ``--metrics-port``.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge

if TYPE_CHECKING:
    from services.gateway.audit import AuditEvent
    from services.gateway.ledger import UsageRecord

MAX_LABEL_VALUES = 1000
"""Distinct values kept per label (team, model); later ones are counted as ``_other``."""
OVERFLOW = "_other"
UNLISTED = "_unlisted"
"""The model label of a model the policy does not list (see the module docstring)."""

_LIMIT_NAME = re.compile(
    r"\b(requests_per_minute|tokens_per_minute|tokens_per_day|tokens_per_month)="
)
_DENY_CLASSES = (
    ("unauthenticated", "unauthenticated"),
    ("model not allowed", "model_not_allowed"),
    ("limit exceeded", "limit_exceeded"),
    ("admission failed", "admission_failed"),
    ("gateway at capacity", "at_capacity"),
)


def reason_class(decision: str, reason: str) -> str:
    """A bounded class for an audit reason.

    Allow records carry the outcome (``ok``, ``cancelled``, ``error``, optionally followed by
    the finish reason in parentheses): the class is that first word. Deny reasons start with
    a fixed phrase (``unauthenticated: …``, ``model not allowed``, ``limit exceeded: …``,
    ``admission failed: …``, ``gateway at capacity``); anything else is ``other``.
    """
    if decision == "allow":
        word = reason.split(" ", 1)[0].strip()
        return word if word in ("ok", "cancelled", "error") else "other"
    for prefix, name in _DENY_CLASSES:
        if reason.startswith(prefix):
            return name
    return "other"


def limit_of(reason: str) -> tuple[str, str]:
    """(scope kind, limit name) of a ``limit exceeded: <scope>: …<limit>=…`` reason."""
    rest = reason.removeprefix("limit exceeded:").strip()
    kind = rest.split(":", 1)[0] if ":" in rest else "unknown"
    found = _LIMIT_NAME.search(rest)
    return (kind if kind in ("key", "user", "team") else "unknown"), (
        found.group(1) if found else "unknown"
    )


class _Bounded:
    """Keeps at most ``limit`` distinct values of one label; the rest become ``_other``."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        if value in self._seen:  # the common case, without the lock (set reads are atomic)
            return value
        with self._lock:
            if value in self._seen:
                return value
            if len(self._seen) >= self._limit:
                return OVERFLOW
            self._seen.add(value)
            return value


class GatewayMetrics:
    """The gateway's metering counters on their own registry."""

    def __init__(self, max_label_values: int = MAX_LABEL_VALUES) -> None:
        self.registry = r = CollectorRegistry()
        self._team = _Bounded(max_label_values)
        self._model = _Bounded(max_label_values)
        self._listed: frozenset[str] | None = None  # None: every model is a label
        tm = ["team", "model"]
        self.requests = Counter(
            "tandem_gateway_requests",
            "Requests settled (one per request id), by how they ended",
            [*tm, "outcome"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "tandem_gateway_prompt_tokens", "Prompt tokens metered", tm, registry=r
        )
        self.completion_tokens = Counter(
            "tandem_gateway_completion_tokens", "Completion tokens metered", tm, registry=r
        )
        self.cached_tokens = Counter(
            "tandem_gateway_cached_tokens",
            "Prompt tokens served from the prefix cache (a subset of prompt tokens)",
            tm,
            registry=r,
        )
        self.decisions = Counter(
            "tandem_gateway_decisions",
            "Audited decisions, by decision (allow/deny) and reason class",
            [*tm, "decision", "reason"],
            registry=r,
        )
        self.limit_rejections = Counter(
            "tandem_gateway_limit_rejections",
            "Requests refused by a rate limit or quota, by scope kind and limit",
            [*tm, "scope", "limit"],
            registry=r,
        )

        self.settles_pending = Gauge(
            "tandem_gateway_settles_pending",
            "Decisions (ledger rows and audit records) queued to be written after their "
            "calls ended; it grows while the store is slow or down",
            registry=r,
        )
        self.streams = Gauge(
            "tandem_gateway_streams",
            "Generate streams being relayed now (gRPC and HTTP); past the gateway's "
            "max_streams new ones are refused UNAVAILABLE",
            registry=r,
        )

    def label_models(self, models: Iterable[str]) -> None:
        """Label only ``models`` (the policy's); any other model is ``_unlisted``."""
        self._listed = frozenset(models)

    def _labels(self, team: str, model: str) -> tuple[str, str]:
        if not model:
            model = "-"
        elif self._listed is not None and model not in self._listed:
            model = UNLISTED
        return self._team(team or "-"), self._model(model)

    def settled(self, rec: UsageRecord) -> None:
        """Count a request the ledger recorded for the first time."""
        team, model = self._labels(rec.team, rec.model)
        outcome = rec.outcome if rec.outcome in ("ok", "cancelled", "error") else "other"
        self.requests.labels(team, model, outcome).inc()
        self.prompt_tokens.labels(team, model).inc(rec.prompt_tokens)
        self.completion_tokens.labels(team, model).inc(rec.completion_tokens)
        self.cached_tokens.labels(team, model).inc(rec.cached_tokens)

    def decided(self, event: AuditEvent) -> None:
        """Count an audit record that was appended."""
        cls = reason_class(event.decision, event.reason)
        # Only a model the policy let the caller use becomes a label (allowed, or refused
        # later by a limit): otherwise the caller chose the name freely, and a thousand
        # made-up names took every model slot, so real models were counted as _other.
        authorized = event.decision == "allow" or cls in ("limit_exceeded", "admission_failed")
        model = event.model if authorized else ""
        team, model = self._labels(event.team, model)
        self.decisions.labels(team, model, event.decision, cls).inc()
        if cls == "limit_exceeded":
            self.limit_rejections.labels(team, model, *limit_of(event.reason)).inc()

    def value(self, name: str, **labels: str) -> float:
        """A sample's current value (0 when never incremented); for tests and tools."""
        found = self.registry.get_sample_value(name, labels)
        return 0.0 if found is None else found


METRICS = GatewayMetrics()
"""The process-wide instance the ledger and audit log count into by default."""
