"""`tandem gateway` flags that become GatewayConfig fields: the GetUsage period cap, CORS,
the stream cap."""

from __future__ import annotations

import pytest

from services.cli.gateway import gateway_config
from services.cli.main import build_parser, main
from services.gateway.pipeline import MAX_STREAMS
from services.gateway.usage_service import MAX_PERIOD_DAYS

REQUIRED = ("gateway", "--port", "0", "--router", "r:1", "--policy", "p.toml")


def test_the_cap_comes_from_its_flag_and_defaults_to_the_services() -> None:
    parser = build_parser()
    assert gateway_config(parser.parse_args(REQUIRED)).usage_max_period_days == MAX_PERIOD_DAYS
    flagged = parser.parse_args((*REQUIRED, "--usage-max-period-days", "31"))
    assert gateway_config(flagged).usage_max_period_days == 31


@pytest.mark.parametrize("value", ["0", "-1", "a year"])
def test_a_cap_that_is_not_a_positive_number_of_days_is_a_usage_error(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*REQUIRED, "--usage-max-period-days", value]) == 2
    assert "--usage-max-period-days" in capsys.readouterr().err


def test_cors_origins_come_from_their_flag_and_default_to_none() -> None:
    """`--cors-origin` (repeatable) lets browser pages call the HTTP API; none by default."""
    parser = build_parser()
    assert gateway_config(parser.parse_args(REQUIRED)).cors_origins == ()
    flagged = parser.parse_args(
        (*REQUIRED, "--cors-origin", "https://a.example", "--cors-origin", "*")
    )
    assert gateway_config(flagged).cors_origins == ("https://a.example", "*")


def test_the_stream_cap_comes_from_its_flag_and_defaults_to_the_pipelines() -> None:
    parser = build_parser()
    assert gateway_config(parser.parse_args(REQUIRED)).max_streams == MAX_STREAMS
    flagged = parser.parse_args((*REQUIRED, "--max-streams", "64"))
    assert gateway_config(flagged).max_streams == 64
    assert main([*REQUIRED, "--max-streams", "0"]) == 2
