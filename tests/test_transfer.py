"""Host-to-device copies (server/engine/transfer.py): pinned only when bound for CUDA, the values unchanged."""

from __future__ import annotations

import pytest
import torch

from server.engine.transfer import pinned, to_device

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_a_cpu_copy_is_the_tensor_itself():
    """On the CPU there is nothing to pin (pinning needs a CUDA runtime) and nothing to copy."""
    host = torch.arange(6).reshape(2, 3).T  # not contiguous, as the packed index pairs are
    assert pinned(host, torch.device("cpu")) is host
    assert to_device(host, torch.device("cpu")) is host


@CUDA
@pytest.mark.gpu
def test_a_cuda_copy_comes_from_pinned_memory_and_keeps_its_values():
    host = torch.arange(6, dtype=torch.float64).reshape(2, 3).T
    cuda = torch.device("cuda")
    assert pinned(host, cuda).is_pinned() and not host.is_pinned()
    out = to_device(host, cuda)
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), host)
