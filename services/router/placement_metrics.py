"""The router's count of placements by reason (conditional disaggregation).

``PLACEMENTS`` is one process-wide Prometheus counter, registered in no registry
of its own: RouterMetrics adds it to the registry it serves, and the
orchestrator increments it once per attempt that reaches a worker, labelled
with the placement (the same strings as ServingInfo.placement).
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
