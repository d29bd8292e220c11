"""MLflow system metrics of a training run, sampled by rank 0 and delivered through the run's outbox.

What is sampled is what ``mlflow.start_run(log_system_metrics=True)`` samples, with MLflow's own monitors
(so the names and the UI's "System metrics" tab are MLflow's): every ``interval_s`` seconds

    system/cpu_utilization_percentage, system/system_memory_usage_megabytes, …_percentage   (psutil)
    system/disk_usage_megabytes, …_percentage, system/disk_available_megabytes
    system/network_receive_megabytes, system/network_transmit_megabytes    (since sampling started in this process)
    system/gpu_<i>_utilization_percentage, system/gpu_<i>_memory_usage_percentage, …_megabytes,
    system/gpu_<i>_power_usage_watts, …_percentage        for every GPU of rank 0's machine, when
                                                          nvidia-ml-py is installed and NVML finds a GPU
                                                          (NVML sees all of the machine's GPUs)

and, whenever the trainer logs (``log_now``), system/data_wait_percentage: the share of the last logging
window that the ranks spent waiting for the next batch, in percent (the mean over ranks).

The step of a system metric is the whole number of seconds since the MLflow run started (its start time),
so a resumed run continues the same axis; the timestamp is the wall clock. Delivery goes through the
outbox (pipeline/outbox.py): sampling never waits for the tracking server, and samples taken during an
outage are journaled and delivered later. Only rank 0's machine is sampled.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

PREFIX = "system/"


class SystemMetrics:
    """A daemon thread sampling every ``interval_s`` seconds into ``outbox`` until ``stop``."""

    def __init__(self, outbox: Any, run_id: str, tracking_uri: str, interval_s: float,
                 run_start_ms: int | None = None) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        if interval_s <= 0:
            raise ValueError(f"system metrics interval {interval_s} s: must be > 0")
        self.outbox, self.interval_s = outbox, float(interval_s)
        self.start_ms = int(run_start_ms if run_start_ms is not None else time.time() * 1000)
        # MLflow's monitor set (CPU, disk, network, and an NVIDIA or AMD GPU monitor when one initialises);
        # its own thread is never started: sampling and delivery are ours.
        self.monitor = SystemMetricsMonitor(run_id, sampling_interval=self.interval_s, tracking_uri=tracking_uri)
        self.gpu = any(type(m).__name__ in ("GPUMonitor", "ROCMMonitor") for m in self.monitor.monitors)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.samples = 0

    def step(self, now_ms: int | None = None) -> int:
        """Whole seconds since the run started (never negative)."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        return max(0, (now_ms - self.start_ms) // 1000)

    def start(self) -> SystemMetrics:
        self._collect()  # primes psutil's CPU counter: the first sample then covers one interval
        self._clear()
        self._thread = threading.Thread(target=self._run, name="cscctrl-system-metrics", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling (the last partial interval is not sampled)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None

    def log_now(self, values: dict[str, float]) -> None:
        """Log ``values`` as system metrics (system/<name>) at the current step."""
        now = int(time.time() * 1000)
        self.outbox.put({"kind": "metrics", "step": self.step(now), "timestamp": now,
                         "metrics": {PREFIX + k: float(v) for k, v in values.items()}})

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._collect()
                values = self.monitor.aggregate_metrics()
            except Exception as e:  # a monitor failing (NVML gone) ends sampling, never the training
                log.warning("system metrics: sampling failed (%s: %s); no more system metrics for this run",
                            type(e).__name__, e)
                return
            finally:
                self._clear()
            if values:
                self.log_now(values)
                self.samples += 1

    def _collect(self) -> None:
        for m in self.monitor.monitors:
            m.collect_metrics()

    def _clear(self) -> None:
        for m in self.monitor.monitors:
            m.clear_metrics()
