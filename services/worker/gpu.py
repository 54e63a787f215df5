"""GPU memory and utilisation for heartbeats, via NVML (nvidia-ml-py); zeros without a GPU."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GpuFigures:
    memory_used_bytes: int = 0
    memory_total_bytes: int = 0
    utilization_percent: int = 0


class GpuMonitor:
    def __init__(self, device_index: int = 0) -> None:
        self._handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
            self._nvml = pynvml
        except Exception:  # no driver, no GPU: NVML raises its own error types
            self._handle = None

    def read(self) -> GpuFigures:
        if self._handle is None:
            return GpuFigures()
        memory = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
        util = self._nvml.nvmlDeviceGetUtilizationRates(self._handle)
        return GpuFigures(int(memory.used), int(memory.total), int(util.gpu))
