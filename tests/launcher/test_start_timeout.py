"""A service too slow to start is one message naming it, the flag to raise and its log, and
leaves nothing running (it was a TimeoutError traceback from `tandem up`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.cli.main import build_parser
from services.cli.up import cluster_config
from services.cli.up_preflight import StartFailed, start_failed
from services.launcher.local import ClusterConfig, LocalCluster, StartTimeout, free_port


def test_a_service_not_serving_by_the_deadline_is_named_with_its_log(
    tmp_path: Path, tandem_home: Path
) -> None:
    config = ClusterConfig(
        prefill=0, decode=1, port=free_port(), log_dir=tmp_path, startup_timeout_s=0.01
    )
    cluster = LocalCluster(config)
    with pytest.raises(StartTimeout) as caught:
        cluster.start()  # no Python process serves 10 ms after its launch
    assert str(caught.value) == (
        "router did not start serving within 0.01 s (tandem up --startup-timeout); "
        f"its output is in {tmp_path / 'router.log'}"
    )
    assert all(c.process.returncode is not None for c in cluster.children)
    failed = start_failed(caught.value)  # what `tandem up` prints: one message, no traceback
    assert isinstance(failed, StartFailed) and str(failed).startswith(str(caught.value))


def test_startup_timeout_flag_reaches_the_cluster(tmp_path: Path) -> None:
    parser = build_parser()
    default = parser.parse_args(["up", "--no-gateway", "--port", "1"])
    assert cluster_config(default, tmp_path).startup_timeout_s == 180.0
    args = parser.parse_args(["up", "--no-gateway", "--port", "1", "--startup-timeout", "900"])
    assert cluster_config(args, tmp_path).startup_timeout_s == 900.0
