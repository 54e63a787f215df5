"""`tandem bench serve` against a real gRPC server that follows a script (test_serve_fake)."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import grpc
import pytest

from services.bench.serve import ServeConfig, measure_serving
from services.bench.serve_workload import poisson_schedule
from services.cli.main import main
from services.launcher.local import free_port
from tests.bench.test_serve_fake import MAX_CONTEXT, Failure, ScriptedInference, serving

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIRST_TOKEN_S = 0.05
TOKEN_GAP_S = 0.01


def _bench(target: str, *flags: str) -> int:
    base = ["bench", "serve", "--target", target, "--input-len", "6", "--output-len", "4"]
    return main([*base, *flags])


def test_counts_failures_latencies_json_and_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = ScriptedInference(
        first_token_s=FIRST_TOKEN_S,
        token_gap_s=TOKEN_GAP_S,
        failures={
            "bench-1": Failure(grpc.StatusCode.RESOURCE_EXHAUSTED),
            "bench-4": Failure(grpc.StatusCode.INTERNAL, after_tokens=2),
        },
    )
    out_json, out_png = tmp_path / "serve.json", tmp_path / "serve.png"
    with serving(fake) as target:
        status = _bench(
            target,
            *("--num-prompts", "8", "--request-rate", "inf", "--seed", "3"),
            *("--goodput", "ttft_ms=10000,tpot_ms=10000"),
            *("--json", str(out_json), "--plot", str(out_png)),
        )
    assert status == 0
    table = capsys.readouterr().out
    assert "6 OK, 2 failed, INTERNAL 1, RESOURCE_EXHAUSTED 1" in table
    for row in ("TTFT", "TPOT", "ITL", "E2E", "goodput"):
        assert row in table
    assert "requested inf (all at once)\n" in table  # no "achieved" rate for a burst

    # What the server was sent: 8 timed requests after the warm-up, as the workload says.
    timed = [r for r in fake.requests if r.request_id != "bench-warmup"]
    assert sorted(r.request_id for r in timed) == [f"bench-{i}" for i in range(8)]
    assert len({tuple(r.prompt_token_ids) for r in timed}) == 8
    for r in timed:
        assert (len(r.prompt_token_ids), r.max_tokens, r.min_tokens) == (6, 4, 4)
        assert r.HasField("temperature") and r.temperature == 0.0 and r.ignore_eos
        assert not r.prompt

    data = json.loads(out_json.read_text())
    m = data["metrics"]
    assert (m["num_requests"], m["completed"]) == (8, 6)
    assert m["failures"] == {"INTERNAL": 1, "RESOURCE_EXHAUSTED": 1}
    assert (m["prompt_tokens"], m["output_tokens"], m["cached_tokens"]) == (36, 24, 12)
    assert m["cache_hit_rate"] == 12 / 36
    assert m["ttft"]["count"] == 6 and m["itl"]["count"] == 6 * 3
    assert m["goodput"]["met"] == 6 and m["goodput"]["attainment"] == 6 / 8
    assert data["config"]["request_rate"] == "inf"
    assert data["environment"]["command_line"].startswith("tandem bench serve")

    records = {r["request_id"]: r for r in data["requests"]}
    ok = [r for r in records.values() if r["status"] == "OK"]
    for r in ok:
        ttft = r["token_times_s"][0] - r["sent_s"]
        assert ttft >= FIRST_TOKEN_S
        # Arrival gaps can undercut the server's sleeps (a late first arrival shortens
        # the next gap), but the server's total time cannot hide: it starts after the send.
        assert len(r["token_times_s"]) == 4
        assert r["end_s"] - r["sent_s"] >= FIRST_TOKEN_S + 3 * TOKEN_GAP_S
        assert r["usage"] == {"prompt_tokens": 6, "completion_tokens": 4, "cached_tokens": 2}
        assert r["finish_reason"] == "length"
    assert m["ttft"]["p50_ms"] >= FIRST_TOKEN_S * 1000
    assert records["bench-1"]["token_times_s"] == []
    assert records["bench-4"]["finish_reason"] == "error"
    assert len(records["bench-4"]["token_times_s"]) == 2

    served_ok = Counter(w for rid, w in fake.served.items() if records.get(rid) in ok)
    assert m["decode_workers"] == dict(served_ok)
    assert sum(data["worker_shares"]["decode"].values()) == pytest.approx(1.0)
    assert m["prefill_workers"] == {"prefill-0": 6}
    assert out_png.read_bytes()[:8] == PNG_MAGIC


def test_arrivals_follow_the_seeded_schedule() -> None:
    config = ServeConfig(
        target="",
        num_prompts=6,
        input_len=5,
        output_len=2,
        request_rate=50.0,
        seed=11,
        show_progress=False,
    )
    fake = ScriptedInference(first_token_s=0.0, token_gap_s=0.0)
    with serving(fake) as target:
        result = measure_serving(dataclasses.replace(config, target=target))
    scheduled = [r.scheduled_s for r in result.records]
    assert scheduled == poisson_schedule(6, 50.0, seed=11)
    assert all(r.sent_s >= r.scheduled_s for r in result.records)
    assert result.metrics.completed == 6 and result.short_outputs == 0


def test_max_concurrency_caps_requests_in_flight_and_the_wait_is_the_send_delay() -> None:
    fake = ScriptedInference(first_token_s=0.05, token_gap_s=0.0)
    config = dict(num_prompts=6, input_len=5, output_len=1, max_concurrency=2)
    with serving(fake) as target:
        result = measure_serving(ServeConfig(target=target, show_progress=False, **config))
    assert fake.max_in_flight == 2
    # Sent at once, served two at a time: the last pair waited for two pairs before it.
    last = max(result.records, key=lambda r: r.sent_s)
    assert last.sent_s - last.scheduled_s >= 2 * 0.05
    # Its latency starts at the send, as vLLM's does; the wait before it is the send delay.
    assert last.ttft_s == last.token_times_s[0] - last.sent_s and last.ttft_s >= 0.05
    send_delay = result.metrics.send_delay
    assert send_delay is not None and send_delay.p99_ms >= 2 * 0.05 * 1000


def test_shared_prefix_sends_grouped_prompts() -> None:
    fake = ScriptedInference(first_token_s=0.0, token_gap_s=0.0)
    with serving(fake) as target:
        config = ServeConfig(
            target=target,
            workload="shared-prefix",
            num_prompts=9,
            num_groups=3,
            prefix_len=8,
            input_len=4,
            output_len=2,
            show_progress=False,
        )
        result = measure_serving(config)
    prompts = [tuple(r.prompt_token_ids) for r in fake.requests if r.request_id != "bench-warmup"]
    assert all(len(p) == 12 for p in prompts)
    assert sorted(Counter(p[:8] for p in prompts).values()) == [3, 3, 3]
    assert result.metrics.prompt_tokens == 9 * 12


def test_unreachable_target_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    target = f"127.0.0.1:{free_port()}"
    assert _bench(target, "--num-prompts", "2", "--request-rate", "inf") == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot list the models at {target}: UNAVAILABLE")


def test_failed_warm_up_stops_the_run(capsys: pytest.CaptureFixture[str]) -> None:
    fake = ScriptedInference(failures={"bench-warmup": Failure(grpc.StatusCode.UNAVAILABLE)})
    with serving(fake) as target:
        assert _bench(target, "--num-prompts", "2", "--request-rate", "inf") == 1
    assert "error: the warm-up request to" in capsys.readouterr().err
    assert [r.request_id for r in fake.requests] == ["bench-warmup"]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--model", "other"], "error: model 'other' is not served at"),
        (["--input-len", str(MAX_CONTEXT)], "--input-len + --output-len: is 260 tokens"),
        (["--workload", "shared-prefix"], "--num-groups: is required with --workload shared"),
        (["--prefix-len", "4"], "--prefix-len: applies to --workload shared-prefix only"),
        (["--goodput", "itl_ms=5"], "expected NAME=MILLISECONDS pairs"),
        (
            ["--request-rate", "0"],
            "argument --request-rate: expected requests/s above 0, or inf; got '0'",
        ),
        # checked before the run, not in a traceback after it
        (["--json", "pyproject.toml/x.json"], "pyproject.toml is not a directory this user"),
        (["--json", "tests"], "'tests' is a directory: name a file in it"),
        (["--plot", "cdf.txt"], "argument --plot: must be a .png file name, got 'cdf.txt'"),
        # beyond what a gRPC deadline holds: every request failed at once
        (["--timeout", "1e10"], "--timeout: must be above 0 and at most 1e+09 s"),
    ],
)
def test_bad_requests_exit_2(
    capsys: pytest.CaptureFixture[str], flags: list[str], expected: str
) -> None:
    with serving(ScriptedInference()) as target:
        status = _bench(target, "--num-prompts", "2", "--request-rate", "inf", *flags)
    assert status == 2
    assert expected in capsys.readouterr().err
