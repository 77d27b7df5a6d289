"""Timing on a CUDA device, for the choices made once at load by measuring (torch.mm or bmm for one row, the Triton
decode-attention kernel or the gathered path): which of two ways is faster here depends on the card and the library
versions, so it is timed rather than assumed."""

from __future__ import annotations

from collections.abc import Callable

import torch


def cuda_ms(fn: Callable[[], object], *, repeats: int = 30, warm: int = 3) -> float:
    """Milliseconds per call of `fn` on the current CUDA stream (after `warm` untimed calls), by CUDA events."""
    for _ in range(warm):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


def faster(baseline: Callable[[], object], candidate: Callable[[], object], *, repeats: int = 30,
         margin: float = 0.03) -> tuple[bool, float, float]:
    """Whether `candidate` beats `baseline` by `margin` or more -> (it does, baseline ms, candidate ms)."""
    base, cand = cuda_ms(baseline, repeats=repeats), cuda_ms(candidate, repeats=repeats)
    return cand < (1 - margin) * base, base, cand
