"""The gateway's overhead (issue 5): added latency against the router, and requests/s on a core.

    python bench/gateway/overhead.py [--pairs 500 --duration 10 --concurrency 64
                                      --profile bench/gateway/profile.txt]

Two measurements, each against a gateway in its own process pinned to one core
(``os.sched_setaffinity``) doing everything it does in production for a request: verify a
JWT from the test Keycloak-compatible issuer (RS256, keys cached), check the policy, reserve
on in-process limits (user and team scopes, generous limits so nothing is refused), relay,
settle, write one ledger row and one audit record to SQLite.

1. **Added latency.** A real router with two scripted fake workers (``tests.router.fakes``:
   prefill + decode, no model, tokens at once) runs in another process. The same workload
   (16-token prompt, 8 tokens out) goes to the router directly and through the gateway,
   strictly alternating one request each way, one at a time, so noise hits both equally.
   Reported: TTFT (first token-bearing message) and end-to-end per path, and the gateway's
   added latency as p50(gateway) − p50(direct) and p99(gateway) − p99(direct), plus the
   p50/p99 of the per-pair differences. Targets: p50 added ≤ 2 ms, p99 ≤ 10 ms. The
   gateway's ablations (``VARIANTS``) and a bare relay (``Proxy``: no auth, limits or
   metering, same pinning) run in the same rotation, to split the cost. The burst is the
   worst case for a relay (eight messages back to back, each paying the hop in turn);
   a **paced** run repeats the gateway-vs-direct comparison with the decode worker
   streaming a token every ``--token-interval-ms`` (10 ms), as a real engine does, where
   the relay's per-message work overlaps the wait for the next token.
2. **Maximum requests/s on one core.** An instant upstream (an Inference server in another
   process that answers every Generate with one message of 8 tokens and usage) sits behind
   the gateway; ``--concurrency`` closed-loop clients drive it for ``--duration`` seconds.
   Reported: completed requests/s, the gateway process's CPU use over the window (≈ 1.0
   means it had the core to itself and saturated it), its CPU time per request and the
   rate a whole core would give (1000 / CPU ms per request: the figure that survives other
   processes sharing the core), and the same clients against the upstream directly (the
   ceiling of the load generator itself). Each gateway variant (``VARIANTS``) is measured.

The gateway runs on core 0, everything else (clients, router, fakes, issuer) on the other
cores. With ``--profile FILE`` the throughput gateway runs under cProfile and the top
functions by cumulative and internal time are written to FILE.

Writes ``bench/gateway/results.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import multiprocessing as mp
import os
import pstats
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from services.rpc import event_loop  # noqa: E402
from services.stubs.tandem.v1 import inference_pb2, inference_pb2_grpc  # noqa: E402

MODEL = "fake-model"
PROMPT = list(range(1, 17))
MAX_TOKENS = 8
GATEWAY_CORE = 0
POLICY = f"""
admin_role = "admin"

[models."{MODEL}"]
roles = ["model-user"]

[limits.user]
requests_per_minute = 1000000000
tokens_per_minute = 1000000000

[limits.team]
tokens_per_day = 1000000000000
"""


# ---- child processes --------------------------------------------------------------------


def _pin(cores: set[int]) -> None:
    available = os.sched_getaffinity(0)
    os.sched_setaffinity(0, (cores & available) or available)


def _other_cores() -> set[int]:
    return (os.sched_getaffinity(0) - {GATEWAY_CORE}) or os.sched_getaffinity(0)


def _serve_forever(start: Any, ready: Any, profile_path: str | None = None) -> None:
    """Run ``start()`` (a coroutine returning a server), report its port, wait for SIGTERM."""

    async def main() -> None:
        profiler = cProfile.Profile() if profile_path else None
        server = await start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        ready.put(server.port)
        if profiler:
            profiler.enable()
        await stop.wait()
        if profiler:
            profiler.disable()
            profiler.dump_stats(profile_path)
        await server.stop(0)

    event_loop.run(main())  # the loop the services run on (uvloop)


def router_process(ready: Any, token_interval_s: float = 0.0) -> None:
    """A real router with a fake prefill and decode worker (no model: tokens at once)."""
    _pin(_other_cores())
    from services.router.config import RouterConfig
    from services.router.server import start_router
    from tests.router.fakes import Behaviour, FakeWorker
    from tests.router.harness import DECODE, PREFILL

    class Stack:
        """The router and its workers, stopped together."""

        def __init__(self, router: Any, workers: list[FakeWorker]) -> None:
            self.port, self._router, self._workers = router.port, router, workers

        async def stop(self, grace: float) -> None:
            for worker in self._workers:
                await worker.stop()
            await self._router.stop(grace)

    async def start() -> Stack:
        router = await start_router(RouterConfig(local_prefill_max_tokens=0))
        workers = []
        paced = Behaviour(token_interval_s=token_interval_s)
        for worker_id, role in (("p1", PREFILL), ("d1", DECODE)):
            workers.append(await FakeWorker(worker_id, role, behaviour=paced).start())
            await workers[-1].register(router.address)
        return Stack(router, workers)

    _serve_forever(start, ready)


class Instant(inference_pb2_grpc.InferenceServicer):
    """Answers every Generate at once: one message with the tokens, finish and usage."""

    async def Generate(self, request: Any, context: Any) -> Any:
        n = request.max_tokens if request.HasField("max_tokens") else 16
        yield inference_pb2.GenerateResponse(
            request_id=request.request_id,
            token_ids=list(range(1000, 1000 + n)),
            finish_reason=inference_pb2.FINISH_REASON_LENGTH,
            usage=inference_pb2.Usage(
                prompt_tokens=len(request.prompt_token_ids), completion_tokens=n
            ),
        )


def instant_process(ready: Any) -> None:
    _pin(_other_cores())
    from services.rpc.server import Servicer, start_server

    async def start() -> Any:
        servicer = Servicer(
            Instant(), inference_pb2_grpc.add_InferenceServicer_to_server, "tandem.v1.Inference"
        )
        return await start_server([servicer])

    _serve_forever(start, ready)


VARIANTS = ("full", "sync-normal", "no-store")
"""Gateway variants (ablations, to see what the store writes cost):

- ``full``: the gateway as shipped;
- ``sync-normal``: its SQLite store with ``PRAGMA synchronous=NORMAL`` (WAL: no fsync per
  commit; a commit survives a process crash, not a power loss) — a proposed fix;
- ``no-store``: the ledger insert and the audit append return at once without touching
  SQLite; everything else, thread hops included, unchanged."""


def _apply_variant(variant: str) -> None:
    if variant == "sync-normal":
        from services.gateway import store

        init = store.SqliteStore.__init__

        def patched(self: Any, path: str) -> None:
            init(self, path)
            self._conn.execute("PRAGMA synchronous=NORMAL")

        store.SqliteStore.__init__ = patched  # type: ignore[method-assign]
    elif variant == "no-store":
        from services.gateway.audit import AuditLog
        from services.gateway.ledger import Ledger

        # the settle writes both inside one transaction (insert / append_in); other
        # records (denials) go through record / append
        Ledger.record = lambda self, rec: True  # type: ignore[method-assign]
        Ledger.insert = lambda self, tx, rec: True  # type: ignore[method-assign]
        AuditLog.append = lambda self, event: None  # type: ignore[method-assign,assignment,return-value]
        AuditLog.append_in = lambda self, tx, event: None  # type: ignore[method-assign,assignment,return-value]
    elif variant != "full":
        raise ValueError(f"unknown variant {variant!r}")


def _install_breakdown(stats: dict[str, list[float]]) -> None:
    """Time every thread hop (wall, and the function's own run inside the thread), the JWT
    verification and the pipeline's steps, into ``stats`` (seconds per call)."""
    import functools

    from services.gateway import identity, pipeline, settler

    to_thread = asyncio.to_thread

    async def timed_to_thread(func: Any, *a: Any, **kw: Any) -> Any:
        name = getattr(func, "__qualname__", repr(func))
        inner = [0.0]

        def run() -> Any:
            t = time.perf_counter()
            try:
                return func(*a, **kw)
            finally:
                inner[0] = time.perf_counter() - t

        t = time.perf_counter()
        try:
            return await to_thread(run)
        finally:
            stats[f"thread hop + {name}"].append(time.perf_counter() - t)
            stats[f"{name} (in the thread)"].append(inner[0])

    def wrap(cls: type, method: str, label: str) -> None:
        original = getattr(cls, method)
        if asyncio.iscoroutinefunction(original):

            async def timed(*a: Any, **kw: Any) -> Any:
                t = time.perf_counter()
                try:
                    return await original(*a, **kw)
                finally:
                    stats[label].append(time.perf_counter() - t)
        else:

            def timed(*a: Any, **kw: Any) -> Any:  # type: ignore[misc]
                t = time.perf_counter()
                try:
                    return original(*a, **kw)
                finally:
                    stats[label].append(time.perf_counter() - t)

        setattr(cls, method, functools.wraps(original)(timed))

    asyncio.to_thread = timed_to_thread  # type: ignore[assignment]
    wrap(identity.OidcVerifier, "verify", "OidcVerifier.verify (JWT)")
    wrap(pipeline.Pipeline, "_reserve", "Pipeline._reserve")
    wrap(pipeline.Pipeline, "_settle", "Pipeline._settle (on the loop: admission, queue the row)")
    wrap(settler.Settler, "_write", "Settler._write (its thread, after the call: one commit)")


def gateway_process(
    ready: Any,
    upstream: str,
    issuer_url: str,
    workdir: str,
    variant: str = "full",
    profile: str | None = None,
    breakdown: str | None = None,
) -> None:
    """The gateway, pinned to one core, with SQLite metering and in-process limits."""
    _pin({GATEWAY_CORE})
    from collections import defaultdict

    from services.gateway.server import GatewayConfig, start_gateway

    _apply_variant(variant)
    stats: dict[str, list[float]] = defaultdict(list)
    if breakdown:
        _install_breakdown(stats)
    policy = Path(workdir) / "policy.toml"
    policy.write_text(POLICY)
    config = GatewayConfig(
        router_address=upstream,
        policy_path=policy,
        store_url=f"sqlite:{Path(workdir) / 'gateway.db'}",
        issuer_url=issuer_url,
    )
    _serve_forever(lambda: start_gateway(config), ready, profile)
    if breakdown:
        summary = {
            name: {"calls": len(v), "p50_ms": round(pct(v, 50) * 1e3, 3),
                   "mean_ms": round(statistics.fmean(v) * 1e3, 3)}
            for name, v in stats.items()
        }  # fmt: skip
        Path(breakdown).write_text(json.dumps(summary, indent=1))


class Proxy(inference_pb2_grpc.InferenceServicer):
    """A bare relay: no auth, limits or metering; what a Python gRPC hop costs by itself."""

    def __init__(self, upstream: Any) -> None:
        self._upstream = upstream

    async def Generate(self, request: Any, context: Any) -> Any:
        async for message in self._upstream.Generate(request, timeout=context.time_remaining()):
            yield message


def proxy_process(ready: Any, upstream: str) -> None:
    _pin({GATEWAY_CORE})
    from services.rpc.server import Servicer, client_channel, start_server

    async def start() -> Any:
        stub = inference_pb2_grpc.InferenceStub(client_channel(upstream))
        servicer = Servicer(
            Proxy(stub), inference_pb2_grpc.add_InferenceServicer_to_server, "tandem.v1.Inference"
        )
        return await start_server([servicer])

    _serve_forever(start, ready)


def spawn(target: Any, *args: Any) -> tuple[mp.Process, int]:
    ctx = mp.get_context("spawn")
    ready = ctx.Queue()
    proc = ctx.Process(target=target, args=(ready, *args), daemon=True)
    proc.start()
    return proc, ready.get(timeout=60)


def stop(proc: mp.Process) -> None:
    if proc.is_alive():
        os.kill(proc.pid, signal.SIGTERM)
    proc.join(timeout=30)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (seconds)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---- clients ----------------------------------------------------------------------------


async def one(stub: Any, metadata: tuple, request_id: str) -> tuple[float, float, int, float]:
    """(TTFT s, end-to-end s, tokens, final s) of one request: end-to-end runs to the end of
    the stream (the status), final to the message with finish reason and usage."""
    request = inference_pb2.GenerateRequest(
        model=MODEL, prompt_token_ids=PROMPT, max_tokens=MAX_TOKENS, request_id=request_id
    )
    start = time.perf_counter()
    ttft, tokens, final = 0.0, 0, 0.0
    async for message in stub.Generate(request, metadata=metadata, timeout=30):
        if message.token_ids and not tokens:
            ttft = time.perf_counter() - start
        tokens += len(message.token_ids)
        if message.finish_reason:
            final = time.perf_counter() - start
    return ttft, time.perf_counter() - start, tokens, final


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summary_ms(values: list[float]) -> dict[str, float]:
    return {
        "p50": round(pct(values, 50) * 1e3, 3),
        "p99": round(pct(values, 99) * 1e3, 3),
        "mean": round(statistics.fmean(values) * 1e3, 3),
    }


async def latency(
    paths: dict[str, str], token: str, pairs: int, warmup: int = 20
) -> dict[str, Any]:
    """One request on each path in turn (the order rotating), ``pairs`` rounds after
    ``warmup``; every path but ``direct`` is compared with ``direct``."""
    from services.rpc.server import client_channel

    channels = {name: client_channel(address) for name, address in paths.items()}
    stubs = {name: inference_pb2_grpc.InferenceStub(ch) for name, ch in channels.items()}
    auth = (("authorization", f"Bearer {token}"),)
    names = list(paths)
    runs: dict[str, list[tuple[float, float, int, float]]] = {name: [] for name in names}
    for i in range(pairs + warmup):
        shift = i % len(names)  # rotate who goes first, so no path always follows another
        for name in names[shift:] + names[:shift]:
            result = await one(stubs[name], () if name == "direct" else auth, f"{name}-{i}")
            assert result[2] == MAX_TOKENS, result
            if i >= warmup:
                runs[name].append(result)
    for ch in channels.values():
        await ch.close()
    out: dict[str, Any] = {"rounds": pairs}
    for metric, k in (("ttft", 0), ("e2e", 1), ("final", 3)):
        d = [r[k] for r in runs["direct"]]
        out[metric] = {"direct_ms": summary_ms(d)}
        for name in names[1:]:
            g = [r[k] for r in runs[name]]
            diffs = [b - a for a, b in zip(d, g, strict=True)]
            out[metric][name] = {
                "ms": summary_ms(g),
                "added_ms": {
                    "p50": round((pct(g, 50) - pct(d, 50)) * 1e3, 3),
                    "p99": round((pct(g, 99) - pct(d, 99)) * 1e3, 3),
                },
                "paired_difference_ms": {
                    "p50": round(pct(diffs, 50) * 1e3, 3),
                    "p99": round(pct(diffs, 99) * 1e3, 3),
                },
            }
    return out


async def throughput(
    address: str, metadata: tuple, concurrency: int, duration: float, pid: int | None
) -> dict[str, Any]:
    """Closed loop: ``concurrency`` clients for 1 s of warm-up, then ``duration`` seconds."""
    from services.rpc.server import client_channel

    channels = [client_channel(address) for _ in range(4)]
    stubs = [inference_pb2_grpc.InferenceStub(c) for c in channels]
    done = {"n": 0, "errors": 0}
    counting = asyncio.Event()
    end = time.perf_counter() + 1 + duration

    async def client(k: int) -> None:
        i = 0
        while time.perf_counter() < end:
            try:
                await one(stubs[k % len(stubs)], metadata, f"t{k}-{i}")
                if counting.is_set():
                    done["n"] += 1
            except grpc.aio.AioRpcError:
                done["errors"] += 1
            i += 1

    tasks = [asyncio.create_task(client(k)) for k in range(concurrency)]
    await asyncio.sleep(1)
    counting.set()
    t0, cpu0 = time.perf_counter(), cpu_seconds(pid) if pid else 0.0
    await asyncio.sleep(duration)
    counted, elapsed = done["n"], time.perf_counter() - t0
    cpu = (cpu_seconds(pid) - cpu0) / elapsed if pid else None
    await asyncio.gather(*tasks)
    for c in channels:
        await c.close()
    rate = counted / elapsed
    out: dict[str, Any] = {"requests_per_s": round(rate, 1), "errors": done["errors"]}
    if cpu is not None:
        # CPU per request is what survives a shared machine: the rate is what the gateway
        # got of its core, 1000 / cpu_ms_per_request what a whole core would give
        cpu_ms = cpu / rate * 1e3
        out |= {
            "gateway_cpu_cores": round(cpu, 3),
            "gateway_cpu_ms_per_request": round(cpu_ms, 3),
            "implied_requests_per_s_on_a_whole_core": round(1e3 / cpu_ms, 1),
        }
    return out


# ---- the run ----------------------------------------------------------------------------


def profile_text(path: str, top: int = 40) -> str:
    out = io.StringIO()
    stats = pstats.Stats(path, stream=out)
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)
    return out.getvalue()


def ledger_rows(workdir: str) -> int:
    import sqlite3

    with sqlite3.connect(Path(workdir) / "gateway.db") as conn:
        return int(conn.execute("SELECT COUNT(*) FROM usage_ledger").fetchone()[0])


def latency_phase(
    issuer_url: str,
    token: str,
    pairs: int,
    work: Path,
    token_interval_s: float = 0.0,
    variants: tuple[str, ...] = VARIANTS,
) -> dict[str, Any]:
    """Router upstream: direct and each gateway variant, one request each in turn. With
    ``token_interval_s`` the decode worker paces its tokens as a real engine does."""
    router, router_port = spawn(router_process, token_interval_s)
    upstream = f"127.0.0.1:{router_port}"
    procs, paths = [router], {"direct": upstream}
    name = "latency" if token_interval_s == 0 else "latency-paced"
    try:
        for variant in variants:
            workdir = work / f"{name}-{variant}"
            workdir.mkdir()
            proc, port = spawn(gateway_process, upstream, issuer_url, str(workdir), variant)
            procs.append(proc)
            paths["gateway" if variant == "full" else f"gateway_{variant}"] = f"127.0.0.1:{port}"
        proc, port = spawn(proxy_process, upstream)
        procs.append(proc)
        paths["bare_proxy"] = f"127.0.0.1:{port}"
        out = asyncio.run(latency(paths, token, pairs))
    finally:
        for proc in procs:
            stop(proc)
    out["ledger_rows"] = ledger_rows(str(work / f"{name}-full"))
    out["token_interval_ms"] = token_interval_s * 1e3
    return out


def instant_phase(
    issuer_url: str, token: str, args: argparse.Namespace, work: Path
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Instant upstream: latency (direct vs gateway, with the per-step breakdown), then the
    maximum requests/s of each gateway variant and of the upstream itself."""
    auth = (("authorization", f"Bearer {token}"),)
    upstream, up_port = spawn(instant_process)
    address = f"127.0.0.1:{up_port}"
    rates: dict[str, Any] = {}
    try:
        workdir = work / "instant-latency"
        workdir.mkdir()
        breakdown = work / "breakdown.json"
        gw, port = spawn(
            gateway_process, address, issuer_url, str(workdir), "full", None, str(breakdown)
        )
        paths = {"direct": address, "gateway": f"127.0.0.1:{port}"}
        try:
            lat = asyncio.run(latency(paths, token, args.pairs))
        finally:
            stop(gw)
        steps = json.loads(breakdown.read_text())
        for variant in VARIANTS:
            workdir = work / f"throughput-{variant}"
            workdir.mkdir()
            profile = None
            if args.profile and variant == "full":
                profile = str(workdir / "profile.pstats")
            gw, port = spawn(gateway_process, address, issuer_url, str(workdir), variant, profile)
            try:
                rates[f"gateway_{variant}"] = asyncio.run(
                    throughput(f"127.0.0.1:{port}", auth, args.concurrency, args.duration, gw.pid)
                )
            finally:
                stop(gw)
            rates[f"gateway_{variant}"]["ledger_rows"] = ledger_rows(str(workdir))
            if profile:
                args.profile.write_text(profile_text(profile))
        rates["upstream_direct"] = asyncio.run(
            throughput(address, (), args.concurrency, args.duration, None)
        )
    finally:
        stop(upstream)
    return lat, steps, rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--pairs",
        type=int,
        default=500,
        help="rounds of the burst and instant-upstream latency phases, one request per path "
        "each, after 20 warm-up rounds (default 500)",
    )
    parser.add_argument(
        "--paced-pairs", type=int, default=150, help="rounds of the paced-token phase"
    )
    parser.add_argument(
        "--token-interval-ms",
        type=float,
        default=10.0,
        help="inter-token latency of the paced phase's decode worker (default 10)",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=10.0,
        help="seconds each throughput run drives its target (default 10)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=64,
        help="closed-loop clients in the throughput runs (default 64)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="run the full gateway's throughput run under cProfile and write its top functions "
        "by cumulative and internal time to this file (default: no profile)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "bench/gateway/results.json",
        help="where to write the results JSON (default bench/gateway/results.json)",
    )
    args = parser.parse_args()
    _pin(_other_cores())  # the clients stay off the gateway's core

    from services.bench.environment import describe_environment
    from tests.gateway.issuer import Issuer

    issuer = Issuer()
    token = issuer.mint(realm_roles=["model-user"], groups=["/ml"], lifetime_s=3600)
    results: dict[str, Any] = {
        "environment": describe_environment(sys.argv),
        "gateway_core": GATEWAY_CORE,
        "workload": {"prompt_tokens": len(PROMPT), "max_tokens": MAX_TOKENS},
        "config": {k: str(v) for k, v in vars(args).items()},
    }
    with tempfile.TemporaryDirectory() as work:
        results["latency"] = latency_phase(issuer.url, token, args.pairs, Path(work))
        # Tokens as a real decode streams them: the relay's per-message work overlaps the
        # wait for the next token instead of adding up, as in the burst above.
        results["latency_paced"] = latency_phase(
            issuer.url, token, args.paced_pairs, Path(work), args.token_interval_ms / 1e3,
            variants=("full",),
        )  # fmt: skip
        results["latency_instant_upstream"], results["breakdown"], results["throughput"] = (
            instant_phase(issuer.url, token, args, Path(work))
        )
    issuer.close()
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    brief = {
        f"{phase}.{metric}.{name}": results[phase][metric][name]["added_ms"]
        for phase in ("latency", "latency_paced", "latency_instant_upstream")
        for metric in ("ttft", "e2e")
        for name in results[phase][metric]
        if name != "direct_ms"
    }
    rates = {
        k: [v["requests_per_s"], v.get("implied_requests_per_s_on_a_whole_core")]
        for k, v in results["throughput"].items()
    }
    print(json.dumps(brief | {"requests_per_s": rates}, indent=2))


if __name__ == "__main__":
    main()
