"""Where a run computes (``train.device``) and what the record says about it.

``auto`` is CUDA when torch sees a GPU, else the CPU.  Model, batches, calibration batches,
salience, masks, SPSFT importance, GLUE prediction and lm-eval all run on the one resolved device.
"""

from __future__ import annotations

import subprocess
from typing import Any

import torch

from speft_bench.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """``auto | cpu | cuda | cuda:N`` → a device that exists here, or a ConfigError naming the knob."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device={name}: torch sees no CUDA device here (torch {torch.__version__}); "
                              f"use train.device=cpu or train.device=auto")
        if (device.index or 0) >= torch.cuda.device_count():
            raise ConfigError(f"train.device={name}: only {torch.cuda.device_count()} CUDA device(s) here; "
                              f"allowed values: auto, cpu, cuda, cuda:0 … cuda:{torch.cuda.device_count() - 1}")
    return device


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _driver_version() -> str | None:
    try:  # torch exposes the CUDA runtime version, not the driver's
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10, check=True)
        return done.stdout.split("\n")[0].strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def device_record(device: torch.device) -> dict[str, Any]:
    """The device, and on CUDA its name, CUDA/driver versions and peak allocated/reserved memory (MB)."""
    record: dict[str, Any] = {"device": str(device), "type": device.type}
    if device.type == "cuda":
        mb = 1024 ** 2
        record |= {"name": torch.cuda.get_device_name(device), "cuda_version": torch.version.cuda,
                   "driver_version": _driver_version(),
                   "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
                   "peak_allocated_mb": torch.cuda.max_memory_allocated(device) / mb,
                   "peak_reserved_mb": torch.cuda.max_memory_reserved(device) / mb}
    return record
