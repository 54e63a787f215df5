"""A worker whose blocks would never match the others' is refused, loudly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.e2e.conftest import start_cluster


def test_worker_with_another_block_size_is_refused_and_exits(
    tmp_path: Path, tandem_home: Path
) -> None:
    cluster = start_cluster(tmp_path, prefill=0, decode=1)
    try:
        odd = subprocess.run(
            [sys.executable, "-m", "services.cli.main", "decode", "--router", cluster.address,
             "--worker-id", "odd", "--block-size", "32", "--kv-cache-gib", "0.25"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    finally:
        cluster.stop()
    assert odd.returncode == 1
    assert "refused" in odd.stderr and "block_size" in odd.stderr
