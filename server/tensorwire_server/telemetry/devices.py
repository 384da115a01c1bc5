"""GPU utilisation and memory per device, read from NVML at each scrape.

Present only where the server runs on CUDA devices and NVML answers (the driver's
library and the ``nvidia-ml-py`` package): on a CPU server the series are absent, never
faked as zeros. Devices are matched to NVML's by UUID, since NVML numbers every GPU on
the host while CUDA numbers those ``CUDA_VISIBLE_DEVICES`` lets the process see.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)


class GpuCollector(Collector):
    """Utilisation and memory of the server's GPUs, from NVML."""

    def __init__(self, nvml: Any, handles: dict[str, Any]) -> None:
        self.nvml = nvml
        #: NVML's handle of each device, by the server's name for it ("cuda:0").
        self.handles = handles

    @classmethod
    def open(cls, devices: Sequence[torch.device]) -> GpuCollector | None:
        """A collector for the CUDA devices among ``devices``; None when there are none
        or NVML cannot be had (logged once: the metrics are simply absent)."""
        gpus = [d for d in devices if d.type == "cuda"]
        if not gpus:
            return None
        try:
            import pynvml  # type: ignore[import-untyped]  # NVIDIA ships no types

            pynvml.nvmlInit()
            handles = {}
            for device in gpus:
                index = device.index if device.index is not None else torch.cuda.current_device()
                uuid = str(torch.cuda.get_device_properties(index).uuid)
                name = uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
                handles[f"cuda:{index}"] = pynvml.nvmlDeviceGetHandleByUUID(name)
        except Exception as exc:  # no package, no driver library, an unknown device
            log.info("GPU utilisation metrics are off: NVML is not available (%s)", exc)
            return None
        return cls(pynvml, handles)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        utilization = GaugeMetricFamily(
            "tensorwire_gpu_utilization_ratio",
            "Fraction of the last sample period (NVML's, about 1/6 s to 1 s) in which a "
            "kernel ran on the GPU.",
            labels=["device"],
        )
        used = GaugeMetricFamily(
            "tensorwire_gpu_memory_used_bytes",
            "GPU memory in use by every process on the device (NVML).",
            labels=["device"],
        )
        total = GaugeMetricFamily(
            "tensorwire_gpu_memory_total_bytes", "GPU memory on the device.", labels=["device"]
        )
        for device, handle in self.handles.items():
            try:
                rates = self.nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = self.nvml.nvmlDeviceGetMemoryInfo(handle)
            except Exception as exc:  # a GPU fallen off the bus: its series go missing
                log.warning("NVML could not read %s: %s", device, exc)
                continue
            utilization.add_metric([device], rates.gpu / 100)
            used.add_metric([device], memory.used)
            total.add_metric([device], memory.total)
        yield utilization
        yield used
        yield total
