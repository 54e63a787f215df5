"""The metering counters: counted once per ledger row and per audit record, exact values.

Through the real gateway the process-wide ``METRICS`` is read, under a team name of this
test's own (and, for the label shared by every unauthenticated caller, as a difference).
"""

from __future__ import annotations

import asyncio
import dataclasses
import urllib.request
import uuid
from pathlib import Path

import grpc
import pytest

from services.engine.errors import InvalidRequestError
from services.gateway.audit import AuditEvent, AuditLog
from services.gateway.ledger import Ledger, UsageRecord
from services.gateway.metrics import (
    METRICS,
    OVERFLOW,
    UNLISTED,
    GatewayMetrics,
    limit_of,
    reason_class,
)
from services.gateway.server import GatewayConfig, _metrics_tls
from services.gateway.store import Store
from services.rpc.metrics_http import serve_metrics
from services.rpc.tls import TlsConfig
from tests.gateway import harness
from tests.gateway.harness import MODEL, PAUSE, stack
from tests.gateway.issuer import Issuer
from tests.router.harness import run


def _rec(request_id: str, **kw: object) -> UsageRecord:
    fields: dict[str, object] = dict(
        request_id=request_id, principal="ann", team="ml", model="m", prompt_tokens=7,
        completion_tokens=5, cached_tokens=3, outcome="ok",
    )  # fmt: skip
    fields.update(kw)
    return UsageRecord(**fields)  # type: ignore[arg-type]


def test_a_duplicated_settle_is_counted_once(store: Store) -> None:
    m = GatewayMetrics()
    ledger = Ledger(store, metrics=m)
    assert ledger.record(_rec("r1")) is True
    assert ledger.record(_rec("r1")) is False
    assert ledger.record(_rec("r1", completion_tokens=99)) is False  # a retried settle
    ledger.record(
        _rec("r2", outcome="cancelled", prompt_tokens=2, completion_tokens=1, cached_tokens=0)
    )
    with pytest.raises(InvalidRequestError):
        ledger.record(_rec("r3", prompt_tokens=-1))  # refused: nothing counted
    tm = {"team": "ml", "model": "m"}
    assert m.value("tandem_gateway_requests_total", **tm, outcome="ok") == 1
    assert m.value("tandem_gateway_requests_total", **tm, outcome="cancelled") == 1
    assert m.value("tandem_gateway_prompt_tokens_total", **tm) == 9
    assert m.value("tandem_gateway_completion_tokens_total", **tm) == 6
    assert m.value("tandem_gateway_cached_tokens_total", **tm) == 3


def test_each_audit_append_counts_one_decision(store: Store) -> None:
    m = GatewayMetrics()
    log = AuditLog(store, metrics=m)
    log.append(AuditEvent("ann", "allow", "ok", team="ml", model="m"))
    log.append(AuditEvent("ann", "allow", "cancelled (FINISH_REASON_CANCELLED)", "ml", "m"))
    log.append(AuditEvent("anonymous", "deny", "unauthenticated: token expired", model="x"))
    reason = (
        "limit exceeded: team:ml: tokens_per_day=10 exceeded (9 used, 4 requested); "
        "resets at 2030-01-01T00:00:00Z"
    )
    log.append(AuditEvent("ann", "deny", reason, team="ml", model="m"))
    with pytest.raises(InvalidRequestError):
        log.append(AuditEvent("ann", "maybe", "ok", team="ml", model="m"))
    d = "tandem_gateway_decisions_total"
    assert m.value(d, team="ml", model="m", decision="allow", reason="ok") == 1
    assert m.value(d, team="ml", model="m", decision="allow", reason="cancelled") == 1
    # the unauthenticated caller's model is not a label: it is theirs to invent
    assert m.value(d, team="-", model="-", decision="deny", reason="unauthenticated") == 1
    assert m.value(d, team="ml", model="m", decision="deny", reason="limit_exceeded") == 1
    rejections = "tandem_gateway_limit_rejections_total"
    labels = {"team": "ml", "model": "m", "scope": "team", "limit": "tokens_per_day"}
    assert m.value(rejections, **labels) == 1


def test_reason_classes_and_limit_names() -> None:
    assert reason_class("allow", "ok") == "ok"
    assert reason_class("allow", "error (FINISH_REASON_ERROR)") == "error"
    assert reason_class("deny", "model not allowed") == "model_not_allowed"
    assert reason_class("deny", "admission failed: Redis down") == "admission_failed"
    assert reason_class("deny", "something new") == "other"
    assert limit_of("limit exceeded: key:ab12: requests_per_minute=3 exceeded (3 used") == (
        "key",
        "requests_per_minute",
    )
    assert limit_of(
        "limit exceeded: user:bob: request needs 900 tokens, more than tokens_per_minute=500"
    ) == ("user", "tokens_per_minute")


def test_label_values_are_bounded() -> None:
    m = GatewayMetrics(max_label_values=2)
    for model in ("a", "b", "c", "d"):
        m.decided(AuditEvent("ann", "allow", "ok", team="ml", model=model))
    d = "tandem_gateway_decisions_total"
    kw = {"team": "ml", "decision": "allow", "reason": "ok"}
    assert [m.value(d, model=x, **kw) for x in ("a", "b", "c", OVERFLOW)] == [1, 1, 0, 2]


def test_a_model_the_caller_may_not_use_is_never_a_label() -> None:
    """A thousand made-up model names, each refused, once took every model slot: the next
    real model was metered as _other, and the counters no longer matched the ledger."""
    m = GatewayMetrics(max_label_values=2)
    for model in ("made-up-1", "made-up-2", "made-up-3"):
        m.decided(AuditEvent("eve", "deny", "model not allowed", team="ml", model=model))
        m.decided(AuditEvent("eve", "deny", "invalid argument (max_tokens)", "ml", model))
    m.settled(_rec("r1", model="real"))
    d = "tandem_gateway_decisions_total"
    assert m.value(d, team="ml", model="-", decision="deny", reason="model_not_allowed") == 3
    assert m.value(d, team="ml", model="-", decision="deny", reason="other") == 3
    assert m.value("tandem_gateway_requests_total", team="ml", model="real", outcome="ok") == 1


def test_a_model_the_policy_does_not_list_is_no_label() -> None:
    """The admin role may name any model: a loop of made-up names (each refused by the
    router, so settled as errors and audited as allowed) took every model slot, and the
    real model was counted as _other until a restart."""
    m = GatewayMetrics(max_label_values=3)
    m.label_models(["real"])
    for i in range(5):
        m.decided(AuditEvent("ops", "allow", "error", team="ml", model=f"typo-{i}"))
        m.settled(_rec(f"r{i}", model=f"typo-{i}", outcome="error"))
    m.settled(_rec("r-real", model="real"))
    requests = "tandem_gateway_requests_total"
    assert m.value(requests, team="ml", model="real", outcome="ok") == 1
    assert m.value(requests, team="ml", model=UNLISTED, outcome="error") == 5
    d = "tandem_gateway_decisions_total"
    assert m.value(d, team="ml", model=UNLISTED, decision="allow", reason="error") == 5


def test_metrics_are_served_over_http() -> None:
    m = GatewayMetrics()
    m.settled(_rec("r1"))
    server = serve_metrics(m.registry, 0, "127.0.0.1")
    url = f"http://127.0.0.1:{server.port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    server.close()
    assert 'tandem_gateway_completion_tokens_total{model="m",team="ml"} 5.0' in text
    assert 'tandem_gateway_requests_total{model="m",outcome="ok",team="ml"} 1.0' in text


def test_metrics_take_the_cluster_identity_not_the_public_one(tmp_path: Path) -> None:
    """Public port: server-auth TLS (callers carry tokens); /metrics: the router-facing
    certificate and CA, client certificates required (the counters are internal)."""
    cert, key, ca, public_ca = (tmp_path / n for n in ("c.pem", "k.pem", "ca.pem", "p.pem"))
    base = GatewayConfig("127.0.0.1:1", tmp_path / "p.toml", store_url="sqlite:x")
    public = TlsConfig(cert, key)
    internal = TlsConfig(cert, key, ca)
    config = dataclasses.replace(base, tls=public, router_tls=internal)
    assert _metrics_tls(config) == TlsConfig(cert, key, ca, require_client_auth=True)
    public_mtls = TlsConfig(cert, key, public_ca, require_client_auth=True)
    config = dataclasses.replace(base, tls=public_mtls, router_tls=internal)
    assert _metrics_tls(config) == TlsConfig(cert, key, ca, require_client_auth=True)
    no_cluster_ca = dataclasses.replace(base, tls=public, router_tls=TlsConfig(cert, key))
    assert _metrics_tls(no_cluster_ca) == TlsConfig(cert, key)
    assert _metrics_tls(base) is None


def test_counter_values_after_real_requests(tmp_path: Path, issuer: Issuer) -> None:
    team = f"t-{uuid.uuid4().hex[:8]}"
    limits = "\n[limits.team]\nrequests_per_minute = 3\n"
    tm = {"team": team, "model": MODEL}
    d = "tandem_gateway_decisions_total"
    anonymous = {"team": "-", "model": "-", "decision": "deny", "reason": "unauthenticated"}

    async def body() -> None:
        unauthenticated_before = METRICS.value(d, **anonymous)
        async with stack(tmp_path, f"sqlite:{tmp_path / 'gw.db'}", issuer.url, limits=limits) as s:
            user = harness.token(issuer, sub="ann", team=team)
            ok = await s.generate(user, prompt_token_ids=[1, 2, 3], max_tokens=4)
            cancelled = await s.generate(
                user, prompt_token_ids=[PAUSE + 1, 2], max_tokens=6, cancel_after=2
            )
            ok2 = await s.generate(user, prompt_token_ids=[1, 2], max_tokens=2)
            over = await s.generate(user, prompt_token_ids=[1], max_tokens=2)
            assert [r.code for r in (ok, cancelled, ok2, over)] == [
                grpc.StatusCode.OK,
                grpc.StatusCode.CANCELLED,
                grpc.StatusCode.OK,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            ]
            outsider = issuer.mint(realm_roles=["other"], groups=[f"/{team}"], sub="eve")
            denied = await s.generate(outsider, prompt_token_ids=[1])
            assert denied.code == grpc.StatusCode.PERMISSION_DENIED
            for credential in (None, "garbage"):
                bad = await s.generate(credential, prompt_token_ids=[1])
                assert bad.code == grpc.StatusCode.UNAUTHENTICATED
            await harness.until(lambda: len(s.audit()) == 7)  # the cancel settles late
            await asyncio.sleep(0.2)  # nothing else may land

        r = "tandem_gateway_requests_total"
        assert METRICS.value(r, **tm, outcome="ok") == 2
        assert METRICS.value(r, **tm, outcome="cancelled") == 1
        assert METRICS.value("tandem_gateway_prompt_tokens_total", **tm) == 3 + 2 + 2
        assert METRICS.value("tandem_gateway_completion_tokens_total", **tm) == 4 + 2 + 2
        assert METRICS.value(d, **tm, decision="allow", reason="ok") == 2
        assert METRICS.value(d, **tm, decision="allow", reason="cancelled") == 1
        assert METRICS.value(d, **tm, decision="deny", reason="limit_exceeded") == 1
        refused = {"team": team, "model": "-"}  # the model it was refused is not a label
        assert METRICS.value(d, **refused, decision="deny", reason="model_not_allowed") == 1
        rejected = {**tm, "scope": "team", "limit": "requests_per_minute"}
        assert METRICS.value("tandem_gateway_limit_rejections_total", **rejected) == 1
        assert METRICS.value(d, **anonymous) - unauthenticated_before == 2

    run(body())
