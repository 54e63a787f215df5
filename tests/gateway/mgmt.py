"""A real gateway for the Admin / UsageService tests, on a SQLite file or a PostgreSQL schema.

These services never reach the router, so the gateway points at a closed loopback port.
``store_url`` (conftest) yields a store URL the gateway can open by itself (PostgreSQL: a fresh
schema chosen with libpq's ``options=-csearch_path=…``), with the skip rule of
``conftest.open_same``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.gateway.api_keys import ApiKeys
from services.gateway.audit import AuditEvent, AuditLog
from services.gateway.server import Gateway, GatewayConfig, start_gateway
from services.gateway.store import Store, open_store
from services.launcher.local import free_port
from services.rpc.server import client_channel
from services.stubs.tandem.v1 import admin_pb2_grpc
from tests.gateway.issuer import Issuer

POLICY = """
admin_role = "admin"

[models.m1]
roles = ["model-user"]
teams = ["ml"]
"""


@dataclass
class Mgmt:
    """A running gateway, stubs for its management services, and its store."""

    gateway: Gateway
    admin: admin_pb2_grpc.AdminStub
    usage: admin_pb2_grpc.UsageServiceStub

    @property
    def store(self) -> Store:
        return self.gateway.store

    def audit(self) -> list[AuditEvent]:
        return [r.event for r in AuditLog(self.store).records()]

    def admin_key(self) -> str:
        """A fresh admin API key's secret, minted straight in the store."""
        return ApiKeys(self.store).mint("ops", ["m1"], admin=True).secret


@asynccontextmanager
async def management(
    tmp_path: Path,
    store_url: str,
    issuer: Issuer | None = None,
    metrics_port: int | None = None,
    **overrides: Any,
) -> AsyncIterator[Mgmt]:
    """``overrides``: further GatewayConfig fields (e.g. usage_max_period_days)."""
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    config = GatewayConfig(
        router_address=f"127.0.0.1:{free_port()}",  # never called by Admin / UsageService
        policy_path=policy,
        store_url=store_url,
        issuer_url=issuer.url if issuer else None,
        metrics_port=metrics_port,
        **overrides,
    )
    gateway = await start_gateway(config)
    channel = client_channel(gateway.address)
    try:
        yield Mgmt(
            gateway, admin_pb2_grpc.AdminStub(channel), admin_pb2_grpc.UsageServiceStub(channel)
        )
    finally:
        await channel.close()
        await gateway.stop(grace=0)


def bearer(credential: str | None) -> tuple[tuple[str, str], ...]:
    return () if credential is None else (("authorization", f"Bearer {credential}"),)


async def call(method, request, credential: str | None):  # type: ignore[no-untyped-def]
    """(response or None, status code, google.rpc.Status or None) of one unary call."""
    try:
        response = await method(request, metadata=bearer(credential), timeout=10)
    except grpc.aio.AioRpcError as exc:
        return None, exc.code(), rpc_status.from_call(exc), exc.details()
    return response, grpc.StatusCode.OK, None, ""


def field_violations(status) -> list[str]:  # type: ignore[no-untyped-def]
    bad = error_details_pb2.BadRequest()
    assert status is not None and status.details[0].Unpack(bad)
    return [v.field for v in bad.field_violations]


def error_reason(status) -> str:  # type: ignore[no-untyped-def]
    info = error_details_pb2.ErrorInfo()
    assert status is not None and status.details[0].Unpack(info)
    return info.reason


def open_same_store(url: str) -> Store:
    """A second connection to the gateway's database (to seed or inspect it)."""
    return open_store(url)
