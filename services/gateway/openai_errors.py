"""Gateway refusals and upstream failures as OpenAI error responses.

Body: ``{"error": {"message", "type", "param", "code"}}``, as OpenAI sends it. Status codes:

==================  ====  ==========================================================
gRPC code           HTTP  type / code
==================  ====  ==========================================================
INVALID_ARGUMENT    400   invalid_request_error; param = the field the message names
UNAUTHENTICATED     401   invalid_request_error / invalid_api_key
PERMISSION_DENIED   403   permission_error / model_not_allowed (param ``model``)
NOT_FOUND           404   invalid_request_error / model_not_found (param ``model``)
RESOURCE_EXHAUSTED  429   rate_limit_error / rate_limit_exceeded, with ``Retry-After``
                          (whole seconds, rounded up, from RetryInfo); a day or month
                          quota has no RetryInfo: insufficient_quota, no Retry-After.
                          Without QuotaFailure (a request no worker's KV cache can
                          hold): 400, since retrying cannot help.
UNAVAILABLE         503   server_error / service_unavailable
DEADLINE_EXCEEDED   504   server_error / timeout
anything else       500   server_error
==================  ====  ==========================================================
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import grpc
from aiohttp import web
from google.rpc import error_details_pb2

from services.gateway.pipeline import GatewayError

_BY_CODE: dict[grpc.StatusCode, tuple[int, str, str | None]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    grpc.StatusCode.UNAUTHENTICATED: (401, "invalid_request_error", "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error", "model_not_allowed"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", "model_not_found"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error", "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error", "timeout"),
}
_MODEL_CODES = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND)
_PROTO_TO_OPENAI = {"prompt_token_ids": "prompt"}
"""Request fields whose OpenAI parameter has another name (max_tokens: whichever was sent)."""


def error_body(
    message: str, kind: str, param: str | None = None, code: str | None = None
) -> dict[str, object]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    kind: str,
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    return web.json_response(error_body(message, kind, param, code), status=status, headers=headers)


def gateway_error(
    error: GatewayError, max_tokens_param: str = "max_tokens"
) -> tuple[int, dict[str, object], dict[str, str]]:
    """(HTTP status, body, headers) for a GatewayError."""
    code = error.code
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return _exhausted(error)
    status, kind, openai_code = _BY_CODE.get(code, (500, "server_error", None))
    param = None
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        param = _field(error.message, max_tokens_param)
    elif code in _MODEL_CODES:
        param = "model"
    headers = {}
    if code == grpc.StatusCode.UNAVAILABLE and error.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after_s)))
    return status, error_body(error.message, kind, param, openai_code), headers


def _exhausted(error: GatewayError) -> tuple[int, dict[str, object], dict[str, str]]:
    if error.detail(error_details_pb2.QuotaFailure) is None:
        return 400, error_body(error.message, "invalid_request_error"), {}
    retry_after = error.retry_after_s
    if retry_after is None:
        body = error_body(error.message, "insufficient_quota", None, "insufficient_quota")
        return 429, body, {}
    body = error_body(error.message, "rate_limit_error", None, "rate_limit_exceeded")
    return 429, body, {"Retry-After": str(max(1, math.ceil(retry_after)))}


def _field(message: str, max_tokens_param: str) -> str | None:
    """The request field an INVALID_ARGUMENT message starts with (``"field: what"``)."""
    field, sep, _ = message.partition(":")
    if not sep or " " in field:
        return None
    if field == "max_tokens":
        return max_tokens_param
    return _PROTO_TO_OPENAI.get(field, field)
