"""What a result was measured on, recorded next to the figures so runs can be compared."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shlex
from pathlib import Path
from typing import Any

import torch

CPUINFO = Path("/proc/cpuinfo")


def describe_environment(command_line: list[str]) -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command_line": shlex.join(command_line),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "transformers_version": _version("transformers"),
        "grpcio_version": _version("grpcio"),
        # gRPC core's switches (bench/gateway/README.md: its TCP stack changes CPU per call)
        "grpc_experiments": os.environ.get("GRPC_EXPERIMENTS"),
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def cpu_model() -> str | None:
    """The "model name" line of /proc/cpuinfo (None where there is none, e.g. macOS)."""
    try:
        lines = CPUINFO.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
