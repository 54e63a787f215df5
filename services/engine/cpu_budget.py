"""How many CPUs this process may really use: its affinity, and its cgroup's CPU quota.

torch sizes its thread pool from the machine's cores. In a container with a CPU limit (a
Kubernetes pod's ``limits.cpu: 4`` on a 64-core node, ``docker run --cpus 4``) that is
16 threads for 4 CPUs' worth of time: the kernel throttles the pod for most of every
100 ms period, and a step that should take 10 ms takes 80. The quota is read from cgroup v2
(``cpu.max``) or v1 (``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs the cgroup's quota allows (e.g. 4.0, 0.5); None when unlimited or unknown."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]  # v2: "400000 100000"
        if quota == "max":
            return None
        return int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # v1
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def usable_cpus(root: Path = CGROUP_ROOT) -> int:
    """CPUs this process can run on at once: its affinity, capped by the cgroup's quota
    (rounded up, at least 1)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        cpus = min(cpus or 1, math.ceil(limit))
    return max(1, cpus or 1)
