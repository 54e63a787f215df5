"""Admission limits: window arithmetic, reserve/settle/release, Redis atomicity, outages."""

from __future__ import annotations

import calendar
import contextlib
import itertools
import logging
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from services.gateway import limits_redis
from services.gateway.breaker import Breaker
from services.gateway.limits import (
    DAY,
    MINUTE,
    MONTH,
    InProcessAdmission,
    LimitExceeded,
    Limits,
    LimitStoreUnavailable,
    Scope,
    window_end,
    window_start,
)
from services.gateway.limits_redis import RedisAdmission
from services.launcher.local import free_port

T0 = calendar.timegm((2028, 2, 29, 23, 59, 30))  # future leap day, 30 s before midnight


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest, rds: redis.Redis, prefix: str):
    """(admission, clock, counter reader) for each implementation."""
    clock = Clock(T0)
    if request.param == "memory":
        adm = InProcessAdmission(clock=clock)
        return adm, clock, adm.used
    adm = RedisAdmission(rds, prefix=prefix, clock=clock)

    def used(key: str) -> int:
        v = rds.get(prefix + key)
        return int(v) if v is not None else 0

    return adm, clock, used


def key(scope: str, metric: str, period: str, now: float) -> str:
    return f"{scope}|{metric}|{period}|{window_start(period, now)}"


# --- window arithmetic ----------------------------------------------------------------------


def test_window_arithmetic_exact() -> None:
    t = T0 + 0.75
    assert window_start(MINUTE, t) == calendar.timegm((2028, 2, 29, 23, 59, 0))
    assert window_end(MINUTE, t) == calendar.timegm((2028, 3, 1, 0, 0, 0))
    assert window_start(DAY, t) == calendar.timegm((2028, 2, 29, 0, 0, 0))
    assert window_end(DAY, t) == calendar.timegm((2028, 3, 1, 0, 0, 0))
    assert window_start(MONTH, t) == calendar.timegm((2028, 2, 1, 0, 0, 0))
    assert window_end(MONTH, t) == calendar.timegm((2028, 3, 1, 0, 0, 0))
    dec = calendar.timegm((2027, 12, 31, 12, 0, 0))
    assert window_start(MONTH, dec) == calendar.timegm((2027, 12, 1, 0, 0, 0))
    assert window_end(MONTH, dec) == calendar.timegm((2028, 1, 1, 0, 0, 0))
    # a boundary instant belongs to the window it starts
    b = calendar.timegm((2028, 3, 1, 0, 0, 0))
    for period in (MINUTE, DAY, MONTH):
        assert window_start(period, b) == b
        assert window_start(period, b - 0.001) < b


# --- reserve / settle / release -------------------------------------------------------------


def test_reserve_settle_release_exact(backend) -> None:
    adm, clock, used = backend
    s = Scope(
        "key:a",
        Limits(
            requests_per_minute=10,
            tokens_per_minute=1000,
            tokens_per_day=5000,
            tokens_per_month=9000,
        ),
    )
    r = adm.reserve([s], 300)
    assert used(key("key:a", "requests", MINUTE, clock.t)) == 1
    for period in (MINUTE, DAY, MONTH):
        assert used(key("key:a", "tokens", period, clock.t)) == 300
    adm.settle(r, 120)
    for period in (MINUTE, DAY, MONTH):
        assert used(key("key:a", "tokens", period, clock.t)) == 120
    adm.settle(r, 5)  # second settle: no-op
    adm.release(r)  # release after settle: no-op too
    assert used(key("key:a", "tokens", DAY, clock.t)) == 120
    assert used(key("key:a", "requests", MINUTE, clock.t)) == 1

    r2 = adm.reserve([s], 200)
    adm.settle(r2, 450)  # more than estimated: charged anyway
    assert used(key("key:a", "tokens", DAY, clock.t)) == 570
    r3 = adm.reserve([s], 100)
    adm.release(r3)
    adm.release(r3)
    assert used(key("key:a", "tokens", DAY, clock.t)) == 570
    assert used(key("key:a", "requests", MINUTE, clock.t)) == 2


def test_settle_never_negative_and_after_rollover(backend) -> None:
    adm, clock, used = backend
    s = Scope("user:u", Limits(tokens_per_minute=1000, tokens_per_day=1000))
    r = adm.reserve([s], 400)
    clock.t += 31  # new minute and new day (T0 is 30 s before midnight)
    adm.settle(r, 0)
    assert used(key("user:u", "tokens", DAY, T0)) == 0
    assert used(key("user:u", "tokens", DAY, clock.t)) == 0
    # refunds go to the charged window, never below zero in the new one
    r2 = adm.reserve([s], 1000)
    assert used(key("user:u", "tokens", DAY, clock.t)) == 1000
    adm.settle(r2, 10)
    assert used(key("user:u", "tokens", DAY, clock.t)) == 10


def test_all_or_nothing_across_scopes(backend) -> None:
    adm, clock, used = backend
    clock.t = T0 - 3600  # 22:59:30 on Feb 29: a minute later is still February
    k = Scope("key:k", Limits(requests_per_minute=100, tokens_per_day=10_000))
    u = Scope("user:u", Limits(tokens_per_minute=500))
    t = Scope("team:t", Limits(tokens_per_month=700))
    adm.reserve([k, u, t], 400)
    with pytest.raises(LimitExceeded) as ei:
        adm.reserve([k, u, t], 350)  # user minute window: 400 + 350 > 500
    e = ei.value
    assert (e.scope, e.limit_name, e.limit, e.used, e.requested) == (
        "user:u",
        "tokens_per_minute",
        500,
        400,
        350,
    )
    # The minute slides: 30 s to the next one, where the 400 weigh fully and fall to the
    # 150 that leave room for 350 after another 60 * (1 - 150 / 400) = 37.5 s.
    assert e.retry_after_s == pytest.approx(67.5)
    assert e.reset_at == pytest.approx(clock.t + 67.5)
    assert not e.is_quota
    assert e.grpc_code == "RESOURCE_EXHAUSTED"
    # nothing was charged anywhere for the rejected request
    assert used(key("key:k", "requests", MINUTE, clock.t)) == 1
    assert used(key("key:k", "tokens", DAY, clock.t)) == 400
    assert used(key("team:t", "tokens", MONTH, clock.t)) == 400
    clock.t += 120  # the user's minutes are empty again, the team month budget is not
    with pytest.raises(LimitExceeded) as ei:
        adm.reserve([k, u, t], 350)
    e = ei.value
    assert (e.scope, e.limit_name, e.is_quota, e.retry_after_s) == (
        "team:t",
        "tokens_per_month",
        True,
        None,
    )
    assert e.reset_at == calendar.timegm((2028, 3, 1, 0, 0, 0))
    assert "team:t" in str(e) and "tokens_per_month=700" in str(e)
    adm.reserve([k, u, t], 300)
    assert used(key("team:t", "tokens", MONTH, clock.t)) == 700


def test_minute_rates_slide_over_the_boundary(backend) -> None:
    adm, clock, used = backend
    s = Scope("key:b", Limits(requests_per_minute=10))
    boundary = window_end(MINUTE, T0)
    clock.t = boundary - 0.5
    for _ in range(10):
        adm.reserve([s], 0)
    clock.t = boundary + 0.5  # fixed windows would admit 10 more here, 1 s after the 10
    with pytest.raises(LimitExceeded) as ei:
        adm.reserve([s], 0)
    e = ei.value
    # 10 * 59.5 / 60 + 0 = 9.92 used; room for 1 once the previous 10 weigh 9: at 6 s.
    assert (e.used, e.requested, e.is_quota) == (10, 1, False)
    assert e.retry_after_s == pytest.approx(5.5)
    clock.t = boundary + 6
    adm.reserve([s], 0)  # 10 * 54 / 60 + 0 = 9, +1 fits
    with pytest.raises(LimitExceeded) as ei:
        adm.reserve([s], 0)  # 9 + 1 + 1 > 10
    assert ei.value.retry_after_s == pytest.approx(6.0)  # until the 10 weigh 8
    clock.t = boundary + 30  # 10 * 30 / 60 + 1 = 6 used: 4 more, not 5
    assert sum(_admits(adm, s) for _ in range(6)) == 4
    assert used(key("key:b", "requests", MINUTE, clock.t)) == 5
    assert used(key("key:b", "requests", MINUTE, boundary - 1)) == 10
    with pytest.raises(LimitExceeded) as ei:
        adm.reserve([s], 0)  # 5 + 10 * 30 / 60 = 10 used
    assert ei.value.retry_after_s == pytest.approx(6.0)  # until the 10 weigh 4
    clock.t = boundary + 36
    adm.reserve([s], 0)


def test_retry_after_reaching_into_the_next_minute(backend) -> None:
    adm, clock, _ = backend
    s = Scope("key:n", Limits(requests_per_minute=3))
    clock.t = window_start(MINUTE, T0) + 10
    for _ in range(3):
        adm.reserve([s], 0)
    with pytest.raises(LimitExceeded) as ei:
        adm.reserve([s], 0)
    # This minute's 3 leave no room until they are the previous minute's and weigh 2:
    # 50 s to the boundary, then 60 * (1 - 2 / 3) = 20 s.
    assert ei.value.retry_after_s == pytest.approx(70.0)
    clock.t += 69.9
    assert not _admits(adm, s)
    clock.t += 0.1
    assert _admits(adm, s)


def _admits(adm, scope: Scope) -> bool:
    try:
        adm.reserve([scope], 0)
    except LimitExceeded:
        return False
    return True


def test_request_over_limit_outright_is_quota(backend) -> None:
    adm, _, _ = backend
    with pytest.raises(LimitExceeded) as ei:
        adm.reserve([Scope("key:x", Limits(tokens_per_minute=100))], 101)
    assert ei.value.is_quota and ei.value.retry_after_s is None


def test_in_process_thread_safe() -> None:
    adm = InProcessAdmission(clock=Clock(T0))
    s = Scope("key:t", Limits(requests_per_minute=37))
    ok = _hammer(lambda: adm.reserve([s], 1), 200)
    assert ok == 37


# --- Redis: replicas, concurrency -----------------------------------------------------------


def _hammer(fn: Callable[[], object], n: int) -> int:
    barrier = threading.Barrier(min(n, 50))
    ok = 0
    lock = threading.Lock()

    def one(i: int) -> None:
        nonlocal ok
        if i < 50:
            barrier.wait()
        try:
            fn()
        except LimitExceeded:
            return
        with lock:
            ok += 1

    with ThreadPoolExecutor(max_workers=50) as pool:
        list(pool.map(one, range(n)))
    return ok


def test_two_replicas_admit_exactly_n(rds: redis.Redis, prefix: str) -> None:
    clock = Clock(time.time())  # frozen, so the run cannot straddle a minute boundary
    replicas = [
        RedisAdmission(redis.Redis(host="127.0.0.1", port=6379), prefix=prefix, clock=clock)
        for _ in range(2)
    ]
    s = Scope("key:shared", Limits(requests_per_minute=37))
    calls = itertools.count()
    ok = _hammer(lambda: replicas[next(calls) % 2].reserve([s], 0), 200)
    assert ok == 37
    ks = list(rds.scan_iter(match=prefix + "key:shared|requests|*"))
    assert len(ks) == 1
    assert int(rds.get(ks[0])) == 37
    assert 60 < rds.ttl(ks[0]) <= 60 + 60 + 120  # the next minute reads it too


def test_daily_quota_concurrent_never_exceeded(rds: redis.Redis, prefix: str) -> None:
    clock = Clock(T0 - 3600)
    replicas = [
        RedisAdmission(redis.Redis(host="127.0.0.1", port=6379), prefix=prefix, clock=clock)
        for _ in range(2)
    ]
    s = Scope("team:q", Limits(tokens_per_day=1000))
    held = []
    lock = threading.Lock()
    calls = itertools.count()

    def take() -> None:
        r = replicas[next(calls) % 2].reserve([s], 30)
        with lock:
            held.append(r)

    assert _hammer(take, 200) == 33  # 33 * 30 = 990 <= 1000 < 34 * 30
    k = prefix + key("team:q", "tokens", DAY, clock.t)
    assert int(rds.get(k)) == 990
    for i, r in enumerate(held):
        replicas[i % 2].settle(r, 10)
    assert int(rds.get(k)) == 330  # unused tokens returned
    assert _hammer(lambda: replicas[0].reserve([s], 30), 100) == 22  # 330 + 22*30 = 990
    assert int(rds.get(k)) == 990


# --- store outages --------------------------------------------------------------------------


def _dead_client() -> redis.Redis:
    return redis.Redis(
        host="127.0.0.1",
        port=free_port(),  # nothing listens there
        socket_connect_timeout=0.5,
        socket_timeout=0.5,
        retry=Retry(NoBackoff(), 0),
    )


def test_fail_open_admits_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    adm = RedisAdmission(_dead_client())  # default: fail-open
    s = Scope("key:o", Limits(requests_per_minute=1))
    with caplog.at_level(logging.WARNING):
        r1 = adm.reserve([s], 10)
        r2 = adm.reserve([s], 10)
    assert r1.uncertain and r1.charges
    assert (r2.uncertain, r2.charges) == (False, ())  # not tried: Redis failed just now
    adm.settle(r1, 5)
    adm.release(r2)
    adm.settled_later()  # tried in the background, failing the same way
    assert "fail-open" in caplog.text and "unavailable" in caplog.text
    # an outage fails every call the same way: one warning for the interval, not one each
    assert len([r for r in caplog.records if "fail-open" in r.getMessage()]) == 1
    adm.close()  # stop retrying (Redis never comes back here)


def test_close_names_the_settles_whose_last_try_failed(caplog: pytest.LogCaptureFixture) -> None:
    """Redis down at the stop: each waiting settle's last try fails and leaves the queue,
    so an empty queue does not mean they landed (close said nothing of dropped refunds)."""
    adm = RedisAdmission(_dead_client(), breaker=Breaker(0))  # every call tries Redis
    scope = Scope("key:c", Limits(tokens_per_month=10_000))
    reservations = [adm.reserve([scope], 99) for _ in range(3)]  # uncertain charges
    for r in reservations:
        adm.settle(r, 1)
    with caplog.at_level(logging.WARNING):
        adm.close()
    assert adm.abandoned_settles == 3
    assert "closing with 3 rate-limit settle(s) Redis did not take" in caplog.text


class OwnRedis:
    """A redis-server of the test's own on a free port, restartable with its data (the
    shared one is never stopped)."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed (.ci/run installs and starts it)")
        self.port = free_port()
        self._args = [binary, "--port", str(self.port), "--dir", str(directory)]
        self._args += ["--save", "", "--appendonly", "no", "--daemonize", "no"]
        self._process: subprocess.Popen[bytes] | None = None

    def client(self) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            socket_connect_timeout=0.5,
            socket_timeout=0.5,
            retry=Retry(NoBackoff(), 0),
        )

    def start(self) -> None:
        self._process = subprocess.Popen(self._args, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(redis.ConnectionError):
                if self.client().ping():
                    return
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop it, its data saved for the next start."""
        with contextlib.suppress(redis.ConnectionError):
            self.client().shutdown(save=True)
        if self._process is not None:
            self._process.wait(10)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_settles_waiting_for_redis_land_once_a_call_finds_it_back(
    own_redis: OwnRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The retry thread pauses up to 30 s between tries while Redis is down; a refund must
    not wait that long once Redis is back (its caller, at its budget, is refused)."""
    monkeypatch.setattr(limits_redis, "RETRY_PAUSE_S", (60.0, 60.0))
    adm = RedisAdmission(own_redis.client(), prefix="", breaker=Breaker(0))
    scope = Scope("team:w", Limits(tokens_per_day=1_000))
    held = adm.reserve([scope], 900)
    own_redis.stop()
    adm.settle(held, 10)  # fails; queued for the retry thread, which then pauses 60 s
    deadline = time.monotonic() + 10
    while adm.failed_retries == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    own_redis.start()
    with pytest.raises(LimitExceeded):
        adm.reserve([scope], 500)  # reaches Redis: 900 still charged
    used = key("team:w", "tokens", DAY, time.time())
    deadline = time.monotonic() + 5
    while int(own_redis.client().get(used) or 0) != 10:
        assert time.monotonic() < deadline, "the refund waited for the retry thread's pause"
        time.sleep(0.02)
    adm.reserve([scope], 500)  # admitted now
    adm.close()


def test_fail_closed_raises_unavailable() -> None:
    adm = RedisAdmission(_dead_client(), on_store_error="fail-closed")
    with pytest.raises(LimitStoreUnavailable) as ei:
        adm.reserve([Scope("key:c", Limits(requests_per_minute=5))], 1)
    assert ei.value.grpc_code == "UNAVAILABLE"
    assert "Redis" in str(ei.value) and "fail closed" in str(ei.value)
    adm.close()  # the refund of what the reserve may have charged retries until then


def test_bad_on_store_error(rds: redis.Redis) -> None:
    with pytest.raises(ValueError, match="on_store_error"):
        RedisAdmission(rds, on_store_error="ignore")  # type: ignore[arg-type]


# --- a reserve whose reply is lost -------------------------------------------------------


def _reply_lost(adm: RedisAdmission, ran: bool) -> None:
    """Make the reserve script's reply time out, after Redis ran it (``ran``) or before."""
    script = adm._reserve

    def lost(**kwargs: object) -> object:
        if ran:
            script(**kwargs)
        raise redis.TimeoutError("Timeout reading from socket")

    adm._reserve = lost  # type: ignore[assignment]


LOST = Scope("key:lost", Limits(requests_per_minute=10, tokens_per_day=1000))


@pytest.mark.parametrize("ran", [True, False])
def test_fail_open_settles_a_reserve_whose_reply_was_lost(
    rds: redis.Redis, prefix: str, ran: bool
) -> None:
    clock = Clock(T0 - 3600)
    adm = RedisAdmission(rds, prefix=prefix, clock=clock)
    _reply_lost(adm, ran)
    r = adm.reserve([LOST], 300)  # admitted, fail-open
    assert r.uncertain
    day = prefix + key("key:lost", "tokens", DAY, clock.t)
    assert rds.get(day) == (b"300" if ran else None)
    adm.settle(r, 40)
    adm.settled_later()
    # What ran is settled to the tokens used, as any reservation; what did not, untouched.
    assert rds.get(day) == (b"40" if ran else None)
    adm.settle(r, 0)
    adm.settled_later()
    assert rds.get(day) == (b"40" if ran else None)  # a second settle does nothing
    assert list(rds.scan_iter(match=prefix + "res|*")) == []  # no marker outlives its call


def test_fail_closed_refunds_a_refused_reserve_whose_reply_was_lost(
    rds: redis.Redis, prefix: str
) -> None:
    clock = Clock(T0 - 3600)
    adm = RedisAdmission(rds, prefix=prefix, clock=clock, on_store_error="fail-closed")
    _reply_lost(adm, ran=True)
    with pytest.raises(LimitStoreUnavailable):
        adm.reserve([LOST], 300)
    adm.settled_later()
    assert rds.get(prefix + key("key:lost", "tokens", DAY, clock.t)) == b"0"
    assert rds.get(prefix + key("key:lost", "requests", MINUTE, clock.t)) == b"0"


def test_markers_live_only_while_their_request_runs(rds: redis.Redis, prefix: str) -> None:
    adm = RedisAdmission(rds, prefix=prefix, clock=Clock(T0 - 3600))
    held = [adm.reserve([LOST], 10) for _ in range(3)]
    assert len(list(rds.scan_iter(match=prefix + "res|*"))) == 3
    for r in held:
        adm.settle(r, 1)
    assert list(rds.scan_iter(match=prefix + "res|*")) == []


class _Hold(threading.Event):
    """Queued for the background thread: once reached, keeps it there until released."""

    def __init__(self) -> None:
        super().__init__()
        self.reached, self.released = threading.Event(), threading.Event()

    def set(self) -> None:
        self.reached.set()
        self.released.wait()
        super().set()


def test_settles_past_the_backlog_are_dropped_not_queued(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("services.gateway.limits_redis.SETTLE_BACKLOG", 2)
    adm = RedisAdmission(_dead_client(), breaker=Breaker(0))  # every reserve tries Redis
    hold = _Hold()
    adm._later_queue().put(hold)
    assert hold.reached.wait(5)  # the thread waits in hold.set(): nothing drains
    for _ in range(4):
        adm.settle(adm.reserve([LOST], 10), 1)
    assert adm.dropped_settles == 2
    hold.released.set()
    adm.close()


# --- a settle that cannot reach Redis ----------------------------------------------------


def _client(socket_timeout: float) -> redis.Redis:
    return redis.Redis(
        host="127.0.0.1", port=6379, socket_timeout=socket_timeout, retry=Retry(NoBackoff(), 0)
    )


@pytest.fixture
def paused(rds: redis.Redis) -> Iterator[Callable[[int], None]]:
    """Pause Redis's writes (scripts included) for some milliseconds: a real outage, to
    every client, that keeps the data. Unpaused at the end whatever happens."""
    yield lambda ms: rds.client_pause(ms, all=False)
    rds.client_unpause()


@pytest.mark.parametrize("on_error", ["fail-open", "fail-closed"])
def test_a_settle_that_cannot_reach_redis_lands_when_it_is_back(
    rds: redis.Redis, prefix: str, paused: Callable[[int], None], on_error: str
) -> None:
    """Before, the failed settle was logged and dropped: the 260 unused tokens of the
    estimate stayed charged to the day's budget until midnight."""
    clock = Clock(T0 - 3600)
    adm = RedisAdmission(_client(0.3), prefix=prefix, clock=clock, on_store_error=on_error)
    r = adm.reserve([LOST], 300)
    day = prefix + key("key:lost", "tokens", DAY, clock.t)
    paused(1500)
    if on_error == "fail-closed":
        with pytest.raises(LimitStoreUnavailable):
            adm.settle(r, 40)
    else:
        adm.settle(r, 40)
    assert rds.get(day) == b"300"  # reads go on during the pause
    deadline = time.monotonic() + 20
    while rds.get(day) != b"40":
        assert time.monotonic() < deadline, "the settle never landed"
        time.sleep(0.05)
    adm.settled_later()
    assert rds.get(day) == b"40"  # applied once, however many attempts it took
    assert list(rds.scan_iter(match=prefix + "res|*")) == []
    adm.close()


@pytest.fixture
def refusing(rds: redis.Redis) -> Iterator[tuple[redis.Redis, Callable[[bool], None]]]:
    """A client of its own Redis user, and a switch that takes its scripts away (NOPERM, a
    RedisError as an outage raises) or gives them back: an outage that ends exactly when
    the test says, with no command left pending in the server to land later."""
    user, password = f"tandem-test-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex

    def scripts(allowed: bool) -> None:
        rds.acl_setuser(user, enabled=True, passwords=[f"+{password}"], keys=["*"],
                        commands=["+@all" if allowed else "-@scripting"])  # fmt: skip

    scripts(True)
    client = redis.Redis(host="127.0.0.1", port=6379, username=user, password=password)
    yield client, scripts
    client.close()
    rds.acl_deluser(user)


def _settle_refused(
    refusing: tuple[redis.Redis, Callable[[bool], None]], prefix: str
) -> tuple[RedisAdmission, Clock, str]:
    """Reserve 300 tokens of a day's budget, take Redis's scripts away, settle 40 (refused,
    so queued for the background thread). Returns the admission, its clock and the day's
    counter key."""
    client, scripts = refusing
    clock = Clock(T0 - 3600)
    adm = RedisAdmission(client, prefix=prefix, clock=clock)
    r = adm.reserve([LOST], 300)
    scripts(False)
    adm.settle(r, 40)
    return adm, clock, prefix + key("key:lost", "tokens", DAY, clock.t)


def test_a_settle_is_given_up_once_its_windows_have_ended(
    rds: redis.Redis, prefix: str, refusing, caplog: pytest.LogCaptureFixture
) -> None:
    adm, clock, day = _settle_refused(refusing, prefix)
    scripts = refusing[1]
    clock.t = T0 + 86400 * 2  # past the day's window and its grace
    with caplog.at_level(logging.WARNING):
        adm.settled_later()  # its background attempt is refused too, and given up
    assert "gave up the settle of reservation" in caplog.text
    scripts(True)
    adm.settled_later()
    assert rds.get(day) == b"300"  # nothing retried it
    adm.close()


def test_close_gives_waiting_settles_one_last_try(
    rds: redis.Redis, prefix: str, refusing, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("services.gateway.limits_redis.RETRY_PAUSE_S", (60.0, 60.0))
    adm, _, day = _settle_refused(refusing, prefix)
    scripts = refusing[1]
    # The background thread's try is refused too, then it pauses 60 s.
    deadline = time.monotonic() + 10
    while adm.failed_retries == 0:
        assert time.monotonic() < deadline, "the background thread never tried"
        time.sleep(0.01)
    scripts(True)
    assert rds.get(day) == b"300"  # nothing retries during the pause...
    adm.close()  # ...but closing does, at once
    assert rds.get(day) == b"40"


def test_settle_many_settles_and_releases_exactly_once(backend) -> None:
    """The settler's batch: used tokens settle (0 too: the request counts), None releases
    (requests refunded), and a reservation already settled is left alone, as with one call
    each."""
    adm, clock, used = backend
    s = Scope("key:m", Limits(requests_per_minute=10, tokens_per_day=5000))
    a, b, c, d = (adm.reserve([s], 300) for _ in range(4))
    adm.settle(c, 50)
    adm.settle_many([(a, 120), (b, None), (c, 999), (d, 0)])
    assert used(key("key:m", "tokens", DAY, clock.t)) == 120 + 50
    # b's request was refunded; d's (refused by the router, no token) still counts
    assert used(key("key:m", "requests", MINUTE, clock.t)) == 3
    adm.settle_many([(a, 7), (b, 7), (d, None)])  # a second time: nothing
    assert used(key("key:m", "tokens", DAY, clock.t)) == 170
    assert used(key("key:m", "requests", MINUTE, clock.t)) == 3


def test_settles_redis_refuses_in_a_batch_land_later(refusing, prefix: str) -> None:
    """One pipeline for the batch; each adjustment Redis refuses goes to the retry thread
    and lands once Redis takes scripts again."""
    client, scripts = refusing
    clock = Clock(T0 - 3600)
    adm = RedisAdmission(client, prefix=prefix, clock=clock)
    first, second = adm.reserve([LOST], 300), adm.reserve([LOST], 300)
    day = prefix + key("key:lost", "tokens", DAY, clock.t)
    scripts(False)
    adm.settle_many([(first, 40), (second, None)])
    assert client.get(day) == b"600"
    scripts(True)
    adm.settled_later()
    assert client.get(day) == b"40"
    assert list(client.scan_iter(match=prefix + "res|*")) == []
    adm.close()


# --- skipping a Redis that just failed -------------------------------------------------------


class StepClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize("on_error", ["fail-open", "fail-closed"])
def test_calls_skip_redis_for_a_moment_after_it_fails_then_one_probes(
    rds: redis.Redis, prefix: str, paused: Callable[[int], None], on_error: str
) -> None:
    """Every call waiting out the timeout during an outage queued them behind the gateway's
    few worker threads (30 concurrent calls: 5 s to be admitted fail-open). After a
    failure, calls decide at once without Redis for a cool-down; then one probes."""
    clock, steps = Clock(T0 - 3600), StepClock()
    adm = RedisAdmission(
        _client(0.3), prefix=prefix, clock=clock, on_store_error=on_error,
        breaker=Breaker(1.0, clock=steps),
    )  # fmt: skip
    day = prefix + key("key:lost", "tokens", DAY, clock.t)
    kept = adm.reserve([LOST], 100)
    paused(800)
    with contextlib.suppress(LimitStoreUnavailable):
        adm.reserve([LOST], 100)  # waits out the timeout: the breaker opens
    assert adm.breaker.is_open
    for _ in range(20):  # each decided without Redis: uncharged, or "not tried"
        if on_error == "fail-open":
            skipped = adm.reserve([LOST], 100)
            assert (skipped.uncertain, skipped.charges) == (False, ())  # admitted, uncharged
        else:
            with pytest.raises(LimitStoreUnavailable, match="not tried again yet"):
                adm.reserve([LOST], 100)
    rds.client_unpause()
    steps.t += 1.0  # the cool-down is over: the next call probes, finds Redis, closes it
    probe = adm.reserve([LOST], 100)
    assert probe.charges and not adm.breaker.is_open
    adm.settle(probe, 10)
    adm.settle(kept, 20)
    adm.settled_later()  # the paused call's refund, retried in the background
    assert rds.get(day) == b"30"
    adm.close()


def test_a_batch_is_one_round_trip_and_survives_redis_losing_the_script(
    rds: redis.Redis, prefix: str
) -> None:
    """settle_many sends EVALSHA on a plain pipeline (a queued Script made redis-py ask
    SCRIPT EXISTS first, a second round trip per batch) and reloads the script when Redis
    has lost it (restarted, flushed)."""
    clock = Clock(T0 - 3600)
    adm = RedisAdmission(rds, prefix=prefix, clock=clock)
    day = prefix + key("key:lost", "tokens", DAY, clock.t)
    first = [adm.reserve([LOST], 100) for _ in range(3)]
    before = rds.info("commandstats").get("cmdstat_script|exists", {}).get("calls", 0)
    adm.settle_many([(r, 10) for r in first])
    after = rds.info("commandstats").get("cmdstat_script|exists", {}).get("calls", 0)
    assert (rds.get(day), after) == (b"30", before)
    second = [adm.reserve([LOST], 100) for _ in range(2)]
    rds.script_flush()
    adm.settle_many([(r, 5) for r in second])
    assert rds.get(day) == b"40" and not adm.breaker.is_open
    assert list(rds.scan_iter(match=prefix + "res|*")) == []
    adm.close()
