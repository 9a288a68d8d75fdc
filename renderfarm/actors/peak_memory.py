"""The peak memory of one render: on CUDA torch's own peak counters, on CPU the resident set's high-water
mark (actors/pipelines.py reports both in each RenderResult)."""

from __future__ import annotations

import threading
from typing import Self

import torch


class PeakMemory:
    """Peak memory of a render, in MiB.

    CUDA: `max_memory_allocated` after resetting the peak (`growth_mb`: less what was allocated at the start,
    the other pipelines held on the card among it). CPU: the growth of the resident set's high-water
    mark over the resident set at the start. Linux resets the mark when "5" is written to
    /proc/self/clear_refs, so no sampling is needed; a sampling thread is only the fallback (a thread
    waking every few milliseconds measurably slows small renders on a 2-core machine). 0.0 without /proc.
    """

    INTERVAL_S = 0.01

    def __init__(self, device: torch.device):
        self.device = device
        self.mb = 0.0
        self.growth_mb = 0.0
        self.reserved_mb = 0.0
        self._start_allocated = 0
        self._start_rss = 0
        self._peak_rss = 0
        self._hwm_reset = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start_allocated = torch.cuda.memory_allocated(self.device)
            return self
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._hwm_reset = True
        except OSError:
            self._hwm_reset = False
        self._start_rss = self._peak_rss = _status_kib("VmRSS") * 1024
        if not self._hwm_reset and self._start_rss:
            self._thread = threading.Thread(target=self._sample, name="renderfarm-peak-rss", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            self.mb = peak / 2**20
            self.growth_mb = max(0, peak - self._start_allocated) / 2**20
            self.reserved_mb = torch.cuda.max_memory_reserved(self.device) / 2**20
            return
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        if self._hwm_reset:
            self._peak_rss = max(self._peak_rss, _status_kib("VmHWM") * 1024)
        self._peak_rss = max(self._peak_rss, _status_kib("VmRSS") * 1024)
        self.mb = self.growth_mb = max(0, self._peak_rss - self._start_rss) / 2**20

    def _sample(self) -> None:
        while not self._stop.wait(self.INTERVAL_S):
            self._peak_rss = max(self._peak_rss, _status_kib("VmRSS") * 1024)


def _status_kib(field: str) -> int:
    """A `VmRSS`/`VmHWM` line of /proc/self/status in KiB; 0 where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0
