"""The router's counts of what the orchestrator decides: placements by reason
(conditional disaggregation) and retries.

``PLACEMENTS`` and ``RETRIES`` are process-wide Prometheus counters, registered in
no registry of their own: RouterMetrics adds them to the registry it serves. The
orchestrator increments PLACEMENTS once per attempt that reaches a worker, labelled
with the placement (the same strings as ServingInfo.placement), and RETRIES once
per retry it makes, when it makes it (a request that then fails or is cancelled
keeps its retries counted; its final message, which reports them, never comes).
"""

from __future__ import annotations

from prometheus_client import Counter

DISAGGREGATED = "disaggregated"
LOCAL_SHORT_PROMPT = "local-short-prompt"
LOCAL_CACHED_PREFIX = "local-cached-prefix"
LOCAL_NO_PREFILL_WORKER = "local-no-prefill-worker"
LOCAL_PREFILL_FAILED = "local-prefill-failed"
PLACEMENT_REASONS = (
    DISAGGREGATED,
    LOCAL_SHORT_PROMPT,
    LOCAL_CACHED_PREFIX,
    LOCAL_NO_PREFILL_WORKER,
    LOCAL_PREFILL_FAILED,
)

PLACEMENTS = Counter(
    "tandem_router_placements",
    "Attempts by where the prompt was prefilled: a prefill worker (disaggregated) or "
    "the decode worker itself, and why",
    ["placement"],
    registry=None,
)
for _reason in PLACEMENT_REASONS:
    PLACEMENTS.labels(_reason)  # every reason exported from the start, at 0

RETRIES = Counter(
    "tandem_router_retries",
    "Requests moved to another worker after a failure",
    registry=None,
)
