"""CUDA checks (skipped without a GPU): bf16 executor against the float32 CPU one, streams against batched."""

from __future__ import annotations

import pytest
import torch

from server.generate import Engine
from server.sampling import SamplingParams
from tests.conftest import CharTokenizer, tiny_llama

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("policy", ["full", "skip:2", "pairs:1-4", "loop:1-4x2"])
def test_cuda_logits_close_to_cpu(policy):
    from server.executor import Executor

    hf = tiny_llama()
    cpu = Engine(hf, CharTokenizer(), device="cpu")
    gpu = Engine(hf, CharTokenizer(), device="cuda", dtype=torch.float32)
    ids = torch.tensor([[5, 9, 17, 33, 4, 8]])
    out = []
    for eng in (cpu, gpu):
        ex = Executor(eng.model, eng.compile(policy), max_batch=1, max_len=8)
        out.append(ex.forward(ids.to(eng.model.device), rows=slice(0, 1), start=[0]).cpu())
    torch.testing.assert_close(out[1], out[0], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("policy", ["pairs:1-4", "parallel:1-4", "loop:1-4x2"])
def test_cuda_streams_equal_batched(policy):
    hf = tiny_llama()
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    a = Engine(hf, CharTokenizer(), device="cuda", dtype=torch.float32, group_mode="batched")
    b = Engine(hf, CharTokenizer(), device="cuda", dtype=torch.float32, group_mode="streams")
    ra = a.generate([[5, 6, 7], [8, 9]], policy=policy, params=params)
    rb = b.generate([[5, 6, 7], [8, 9]], policy=policy, params=params)
    assert [r.token_ids for r in ra] == [r.token_ids for r in rb]


def test_bf16_default_on_cuda():
    eng = Engine(tiny_llama(), CharTokenizer(), device="cuda")
    assert eng.model.dtype == torch.bfloat16
    r = eng.generate([[5, 6, 7]], params=SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert len(r.token_ids) == 4
