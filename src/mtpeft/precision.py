"""Mixed precision on CPU: bf16 where the processor has native bf16 matmuls."""

from __future__ import annotations

import contextlib
import functools

import torch


@functools.cache
def cpu_has_bf16() -> bool:
    """True on CPUs with AVX512-BF16 or AMX-BF16, where bf16 matmuls beat fp32 several-fold."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_supported(device: torch.device | str) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        # torch.cuda.is_bf16_supported asks about the current GPU only, so "cuda:1" is asked about
        # itself here. Native bf16 only (Ampere and later, or ROCm): emulated bf16 runs slower than fp32.
        if torch.version.hip:
            return True
        if not torch.cuda.is_available():
            return False
        index = torch.cuda.current_device() if device.index is None else device.index
        return torch.cuda.get_device_capability(index)[0] >= 8
    return device.type == "cpu" and cpu_has_bf16()


def resolve_bf16(setting: bool | None, device: torch.device | str) -> bool:
    """``None`` means: bf16 when the device supports it fast."""
    return bf16_supported(device) if setting is None else setting


def autocast(device: torch.device | str, enabled: bool):
    """bf16 autocast on ``device`` when enabled, else a no-op context."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
