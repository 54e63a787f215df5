"""Status details survive a real grpc.aio server and ``rpc_status.from_call`` on the client."""

from __future__ import annotations

import asyncio
import calendar

import grpc
import grpc.aio
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.engine.errors import InvalidRequestError
from services.gateway.limits import InProcessAdmission, LimitExceeded, Limits, Scope
from services.gateway.status_details import (
    abort_with_details,
    from_error,
    invalid_argument,
    limit_exceeded,
    permission_denied,
    retry_delay,
    unauthenticated,
)

T0 = calendar.timegm((2028, 2, 29, 22, 59, 30))


def _exceeded(limits: Limits, tokens: int) -> LimitExceeded:
    adm = InProcessAdmission(clock=lambda: T0)
    s = Scope("team:ml", limits)
    adm.reserve([s], tokens)
    with pytest.raises(LimitExceeded) as ei:
        adm.reserve([s], tokens)
    return ei.value


def _statuses() -> dict[str, status_pb2.Status]:
    return {
        "rate": limit_exceeded(_exceeded(Limits(tokens_per_minute=100), 60)),
        "month": limit_exceeded(_exceeded(Limits(tokens_per_month=100), 60)),
        "bad": invalid_argument(
            "max_tokens: must be > 0", [("max_tokens", "must be > 0"), ("model", "empty")]
        ),
        "denied": permission_denied(
            "caller may not use model m", "MODEL_NOT_ALLOWED", metadata={"model": "m"}
        ),
        "unauth": unauthenticated("missing credential", "NO_CREDENTIAL"),
    }


def _unpack(status: status_pb2.Status) -> dict[str, object]:
    out: dict[str, object] = {}
    for any_ in status.details:
        for cls in (
            error_details_pb2.RetryInfo,
            error_details_pb2.QuotaFailure,
            error_details_pb2.BadRequest,
            error_details_pb2.ErrorInfo,
        ):
            if any_.Is(cls.DESCRIPTOR):
                msg = cls()
                any_.Unpack(msg)
                out[cls.__name__] = msg
    return out


def _roundtrip(
    statuses: dict[str, status_pb2.Status],
) -> dict[str, tuple[grpc.StatusCode, str, status_pb2.Status | None]]:
    async def main() -> dict[str, tuple[grpc.StatusCode, str, status_pb2.Status | None]]:
        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            await abort_with_details(context, statuses[request.decode()])
            return b""

        server = grpc.aio.server()
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "test.Svc", {"Call": grpc.unary_unary_rpc_method_handler(handle)}
                ),
            )
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:

            def client() -> dict[str, tuple[grpc.StatusCode, str, status_pb2.Status | None]]:
                got = {}
                with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                    call = ch.unary_unary("/test.Svc/Call")
                    for name in statuses:
                        with pytest.raises(grpc.RpcError) as ei:
                            call(name.encode(), timeout=5)
                        err = ei.value
                        got[name] = (err.code(), err.details(), rpc_status.from_call(err))
                return got

            return await asyncio.to_thread(client)
        finally:
            await server.stop(None)

    return asyncio.run(main())


def test_details_roundtrip_real_server() -> None:
    statuses = _statuses()
    got = _roundtrip(statuses)
    for name, sent in statuses.items():
        code, message, status = got[name]
        assert status is not None, name
        assert status == sent, name
        assert code.value[0] == status.code and message == status.message, name

    code, message, st = got["rate"]
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    d = _unpack(st)
    # 30 s to the next minute, where the 60 tokens fade to the 40 that leave room: 20 s more.
    assert d["RetryInfo"].retry_delay.seconds == 50  # type: ignore[attr-defined]
    qf = d["QuotaFailure"].violations[0]  # type: ignore[attr-defined]
    assert qf.subject == "team:ml" and "tokens_per_minute=100" in qf.description
    assert "team:ml" in message and "tokens_per_minute=100" in message

    code, _, st = got["month"]
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    d = _unpack(st)
    assert "RetryInfo" not in d  # an exhausted monthly budget: no retry advice
    qf = d["QuotaFailure"].violations[0]  # type: ignore[attr-defined]
    assert qf.subject == "team:ml" and "quota tokens_per_month=100" in qf.description
    assert str(calendar.timegm((2028, 3, 1, 0, 0, 0))) in qf.description

    code, _, st = got["bad"]
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    fv = _unpack(st)["BadRequest"].field_violations  # type: ignore[attr-defined]
    assert [(v.field, v.description) for v in fv] == [
        ("max_tokens", "must be > 0"),
        ("model", "empty"),
    ]

    for name, want, reason in (
        ("denied", grpc.StatusCode.PERMISSION_DENIED, "MODEL_NOT_ALLOWED"),
        ("unauth", grpc.StatusCode.UNAUTHENTICATED, "NO_CREDENTIAL"),
    ):
        code, _, st = got[name]
        assert code == want
        info = _unpack(st)["ErrorInfo"]
        assert info.reason == reason and info.domain == "tandem.gateway"  # type: ignore
    assert dict(_unpack(got["denied"][2])["ErrorInfo"].metadata) == {"model": "m"}  # type: ignore


def test_retry_delay_rounds_up() -> None:
    d = retry_delay(1.2344)
    assert (d.seconds, d.nanos) == (1, 235_000_000)
    assert retry_delay(-3).seconds == 0


def test_from_error_maps_tandem_errors() -> None:
    st = from_error(InvalidRequestError("temperature", "must be >= 0"))
    assert st.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "BadRequest" in _unpack(st)
    exc = _exceeded(Limits(requests_per_minute=1), 0)
    st = from_error(exc)
    assert st.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and st.message == str(exc)
