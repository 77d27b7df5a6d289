"""Host-to-device copies that do not hold the host. A CUDA copy from pageable memory is staged by the driver and may
be synchronous (CUDA's documentation says so of `cudaMemcpyAsync` from pageable memory), which would stall a step
queued while the last one runs (overlapped decoding); from pinned memory it is queued and returns at once. Torch's
caching host allocator keeps the pinned buffers and reuses one only after the copy that read it has run."""

from __future__ import annotations

import torch
from torch import Tensor


def pinned(host: Tensor, device: torch.device) -> Tensor:
    """`host` in pinned memory when it is bound for a CUDA device; elsewhere `host` itself."""
    return host.pin_memory() if device.type == "cuda" else host


def to_device(host: Tensor, device: torch.device) -> Tensor:
    """`host` on `device`, the copy queued without waiting for the device."""
    return pinned(host, device).to(device, non_blocking=True)
