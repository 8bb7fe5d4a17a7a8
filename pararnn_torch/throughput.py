"""Training throughput: tokens/s and model FLOPs utilisation (MFU) for the progress bar and the JSON log.

MFU = achieved model FLOP/s (``pararnn_core.sizing.training_flops_per_token`` x tokens/s)
divided by the peak of all devices together: ``--peak-tflops`` per device when given,
else the bf16 table entry for a known CUDA device (A100/H100/H200), else none (then
only tokens/s is reported, as on CPU).
"""

from __future__ import annotations

import time

import torch

from pararnn_core.lm_config import LMConfig
from pararnn_core.sizing import peak_tflops_for, training_flops_per_token


def device_peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given is not None:
        if given <= 0:
            raise SystemExit(f"error: --peak-tflops must be positive, got {given}")
        return given
    if device.type == "cuda":
        return peak_tflops_for(torch.cuda.get_device_name(device))
    return None


class ThroughputMeter:
    """Tokens/s and MFU since the meter started (the first step after a resume included)."""

    def __init__(self, config: LMConfig, tokens_per_step: int, world: int, peak_tflops: float | None):
        self.flops_per_token = training_flops_per_token(config)
        self.tokens_per_step = tokens_per_step
        self.peak_flops = peak_tflops * 1e12 * world if peak_tflops else None
        self.started = time.perf_counter()
        self.steps = 0

    def step(self):
        self.steps += 1

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    @property
    def tokens_per_sec(self) -> float:
        return self.steps * self.tokens_per_step / self.seconds if self.steps else 0.0

    @property
    def mfu(self) -> float | None:
        if self.peak_flops is None:
            return None
        return self.tokens_per_sec * self.flops_per_token / self.peak_flops

    def record(self) -> dict:
        """Fields for a metrics.jsonl line."""
        out = {"tokens_per_sec": round(self.tokens_per_sec, 1)}
        if self.mfu is not None:
            out["mfu"] = round(self.mfu, 5)
        return out

    def postfix(self) -> dict:
        """Fields for the progress bar."""
        out = {"tok_s": f"{self.tokens_per_sec:,.0f}"}
        if self.mfu is not None:
            out["mfu"] = f"{100 * self.mfu:.1f}%"
        return out
