"""CUDA checks (skipped without a GPU): the executor on CUDA against the float32 CPU one, mixed-schedule batches,
streams against batched, bf16 by default."""

from __future__ import annotations

import os

import pytest
import torch

from server.engine.executor import Executor, Row
from server.engine.generate import Engine
from server.engine.sampling import SamplingParams
from tests.conftest import CharTokenizer, tiny_llama

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("policy", ["full", "skip:2", "pairs:1-4", "loop:1-4x2"])
def test_cuda_logits_close_to_cpu(policy):
    hf = tiny_llama()
    ids = torch.tensor([[5, 9, 17, 33, 4, 8]])
    out = []
    for device in ("cpu", "cuda"):
        eng = Engine.from_hf(hf, CharTokenizer(), device=device, dtype=torch.float32)
        schedule = eng.compile(policy)
        ex = Executor(eng.model, num_blocks=schedule.num_slots + 1, max_len=16)
        out.append(ex.forward(ids.to(device), [Row(0, schedule, 0, ids.shape[1])]).cpu())
    torch.testing.assert_close(out[1], out[0], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("policy", ["full", "pairs", "parallel", "reverse"])
def test_cuda_gemma3_logits_close_to_cpu(policy):
    """Gemma 3 (sliding and global layers with their own RoPE bases, post-norms) on CUDA in float32 and bfloat16."""
    from tests.reference import tiny_model

    hf = tiny_model("gemma3")
    ids = torch.tensor([[5, 9, 17, 33, 4, 8, 21, 40, 3, 11]])
    out = {}
    for device, dtype in (("cpu", torch.float32), ("cuda", torch.float32), ("cuda", torch.bfloat16)):
        eng = Engine.from_hf(hf, CharTokenizer(), device=device, dtype=dtype)
        schedule = eng.compile(policy)
        ex = Executor(eng.model, num_blocks=schedule.num_slots + 1, max_len=16)
        out[(device, dtype)] = ex.forward(ids.to(device), [Row(0, schedule, 0, ids.shape[1])]).float().cpu()
    cpu = out[("cpu", torch.float32)]
    torch.testing.assert_close(out[("cuda", torch.float32)], cpu, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(out[("cuda", torch.bfloat16)], cpu, rtol=0.1, atol=0.15)


def test_cuda_mixed_batch_equals_each_alone():
    eng = Engine.from_hf(tiny_llama(), CharTokenizer(), device="cuda", dtype=torch.float32)
    policies = ["full", "skip:2", "pairs:1-4", "parallel:1-4", "loop:1-4x2", "reverse:1-4"]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    together = eng.generate([[5, 6, 7]] * len(policies), policy=policies, params=params)
    for policy, got in zip(policies, together):
        assert got.token_ids == eng.generate([[5, 6, 7]], policy=policy, params=params)[0].token_ids, policy


@pytest.mark.parametrize("policy", ["pairs:1-4", "parallel:1-4", "loop:1-4x2"])
def test_cuda_streams_equal_batched(policy):
    hf = tiny_llama()
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    a = Engine.from_hf(hf, CharTokenizer(), device="cuda", dtype=torch.float32, group_mode="batched")
    b = Engine.from_hf(hf, CharTokenizer(), device="cuda", dtype=torch.float32, group_mode="streams")
    ra = a.generate([[5, 6, 7], [8, 9]], policy=policy, params=params)
    rb = b.generate([[5, 6, 7], [8, 9]], policy=policy, params=params)
    assert [r.token_ids for r in ra] == [r.token_ids for r in rb]


def test_bf16_default_on_cuda():
    eng = Engine.from_hf(tiny_llama(), CharTokenizer(), device="cuda")
    assert eng.model.dtype == torch.bfloat16
    r = eng.generate([[5, 6, 7]], params=SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert len(r.token_ids) == 4


def test_cuda_prefix_reuse_to_the_token_equals_no_reuse():
    """Whole blocks adopted and a partly agreeing block copied on the GPU: the same prompt logprobs and tokens."""
    eng = Engine.from_hf(tiny_llama(), CharTokenizer(), device="cuda", dtype=torch.float32)
    context = [5, 9, 17, 33, 4, 8, 60, 7, 11, 12]
    score = SamplingParams(max_tokens=0, echo=True, logprobs=1)
    gen = SamplingParams(max_tokens=4, ignore_eos=True)
    waves = [[(context + [40, 41], score)], [(context + [50], score), (context + [60, 61], gen)]]
    runs = []
    for reuse in (False, True):
        batch = eng.new_batch(max_len=64, num_blocks=200, block_size=4, prefix_caching=reuse)
        results = []
        for wave in waves:
            seqs = [eng.new_sequence(p, params, eng.compile("full")) for p, params in wave]
            batch.add(seqs)
            while batch.filter() is not None and batch.sequences:
                batch.step()
            results += [s.result() for s in seqs]
        runs.append((results, batch.reused_tokens))
    (plain, _), (reused, count) = runs
    assert count == 9 + 10
    for a, b in zip(plain, reused):
        assert a.token_ids == b.token_ids
        if a.prompt_logprobs is not None:
            torch.testing.assert_close(torch.tensor(b.prompt_logprobs[1:]), torch.tensor(a.prompt_logprobs[1:]),
                                       rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["ngram", "layer_skip"])
def test_cuda_speculation_answers_what_decoding_one_at_a_time_answers(method):
    """Speculative decoding on CUDA (captured draft steps, an eager verifying forward, generators on the device
    rewound past refused draws): greedy and seeded rows, mixed policies, the same tokens as without drafts, and
    nothing left in the pool."""
    from server.engine.speculative import Speculation

    plain = Engine.from_hf(tiny_llama(), CharTokenizer(), device="cuda", dtype=torch.float32)
    spec = Speculation("ngram", 3, lookup_min=1) if method == "ngram" else Speculation("layer_skip", 2, draft="skip:2")
    eng = Engine(plain.model, plain.tokenizer, eos_ids=plain.eos_ids, config=plain.config, speculation=spec)
    loop = [5, 6, 7, 5, 6, 7, 5, 6, 7, 5, 6]
    prompts, policies = [loop, loop, loop[:5], list(range(5, 30))], ["full", "pairs:1-4", "full", "skip:2"]
    for params in (SamplingParams(max_tokens=20, ignore_eos=True, logprobs=1),
                   SamplingParams(max_tokens=20, ignore_eos=True, temperature=0.05, seed=3)):
        want = plain.generate(prompts, policy=policies, params=params)
        got = eng.generate(prompts, policy=policies, params=params)
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert sum(r.speculated.accepted_tokens for r in got) > 0


@pytest.mark.parametrize(("attention", "fuse"), [("gathered", False), ("triton", False), ("triton", True)])
@pytest.mark.parametrize("model", ["llama", "gemma3"])
def test_cuda_captured_decode_equals_eager(model, attention, fuse):
    """Decode steps replayed from CUDA graphs (server.engine.graphs) give the eager step's tokens and logprobs, for a
    mix of policies whose rows join, grow past context buckets and leave; graphs are captured once per layout and
    replayed after; with the Triton kernel too (float32: its dots in IEEE precision), and with the layer math fused
    by torch.compile inside the graphs. (FlexAttention in place is
    checked on the CPU, tests/test_graphs.py: on CUDA its decode kernel compiles per number of rows, too slow for
    this suite.)"""
    from tests.reference import tiny_model

    hf = tiny_llama() if model == "llama" else tiny_model("gemma3")
    policies = ["full", "skip:2", "pairs", "full", "skip:2", "parallel:1-4", "full"]
    prompts = [[5 + (i * 7 + j) % 90 for j in range(3 + 4 * i)] for i in range(len(policies))]
    params = SamplingParams(max_tokens=30, ignore_eos=True, logprobs=2)
    out = {}
    for graphs in (False, True):
        eng = Engine.from_hf(hf, CharTokenizer(), device="cuda", dtype=torch.float32, graphs=graphs,
                             attention=attention if graphs else "gathered",  # the eager gathered step: the reference
                             fuse=fuse and graphs, overlap=graphs)  # ... read before the next step is queued
        batch = eng.new_batch(max_len=64, num_blocks=400)
        out[graphs] = eng.generate(prompts, policy=policies, params=params, batch=batch)
        if graphs:
            stats = batch.executor.graphs.stats()
            assert stats["failures"] == 0 and stats["captures"] >= 1 and stats["replays"] > stats["captures"], stats
        else:
            assert batch.executor.graphs is None
    for want, got in zip(out[False], out[True]):
        assert got.token_ids == want.token_ids
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(want.logprobs), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("graphs", [False, True])
def test_cuda_overlapped_decode_equals_stepwise(graphs):
    """Overlapped decoding (the CUDA default: step N queued before step N-1's results are read, its input tokens
    still on the device) gives what reading every step before the next gives: rows join while a step is in flight,
    stop on a token or a string one step before the host knows, end by length, sample with seeds."""
    hf = tiny_llama()
    prompts = [[5, 9, 17], [40, 41, 42, 43, 44], [7], [99, 98, 97], [12, 13], [60, 61, 62, 63]]
    policies = ["full", "skip:2", "pairs:1-4", "loop:1-4x2", "reverse:1-4", "full"]
    ref = Engine.from_hf(hf, CharTokenizer(), device="cuda", dtype=torch.float32, graphs=graphs, overlap=False)
    free = ref.generate(prompts, policy=policies, params=SamplingParams(max_tokens=12, ignore_eos=True))
    params = [SamplingParams(max_tokens=12, stop_token_ids=(free[0].token_ids[2],)),
              SamplingParams(max_tokens=3, ignore_eos=True, logprobs=2),
              SamplingParams(max_tokens=12, ignore_eos=True, stop=(free[2].text[2:4],)),
              SamplingParams(max_tokens=9, temperature=0.9, top_p=0.8, seed=7, ignore_eos=True, logprobs=1),
              SamplingParams(max_tokens=12, stop_token_ids=(free[4].token_ids[1],), min_tokens=4),
              SamplingParams(max_tokens=1, ignore_eos=True)]
    out = {}
    for overlap in (False, True):
        eng = Engine(ref.model, ref.tokenizer, eos_ids=ref.eos_ids, graphs=graphs, overlap=overlap)
        seqs = [eng.new_sequence(p, sp, eng.compile(pol)) for p, sp, pol in zip(prompts, params, policies)]
        batch = eng.new_batch(max_len=32, num_blocks=600)
        batch.add(seqs[:4])
        batch.filter()
        batch.step()
        batch.add(seqs[4:])
        while batch.filter() is not None and batch.sequences:
            batch.step()
        assert batch.kv_usage() == 0.0
        out[overlap] = [s.result() for s in seqs]
    for got, want in zip(out[True], out[False]):
        assert (got.token_ids, got.text, got.finish_reason) == (want.token_ids, want.text, want.finish_reason)
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(want.logprobs), rtol=1e-5, atol=1e-5)


def test_cuda_overlapped_decode_queues_a_step_without_waiting_for_the_device(monkeypatch):
    """Overlap only pays if queuing a step never waits for the device: every launch of a steady decode (layouts
    captured) and every prefill queued while a decode step is in flight (its program compiled then) runs under
    torch's sync debug mode set to raise, with rows crossing KV block boundaries (new blocks in the table), joining
    from a prefill whose token is still on the device, sampling with seeds, min_tokens masking the EOS, and a row
    with every logit processor (allowed tokens, and its top logprobs ranked among them as a beam search's, bad
    words matched against its token in flight, bias, penalties counting it, min-p, typical-p)."""
    from server.engine.generate import Batch

    eng = Engine.from_hf(tiny_llama(), CharTokenizer(), device="cuda", dtype=torch.float32, overlap=True)
    policies = ["full", "skip:2", "full", "full"]
    params = [SamplingParams(max_tokens=40, ignore_eos=True),
              SamplingParams(max_tokens=40, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True, logprobs=1),
              SamplingParams(max_tokens=30, min_tokens=20),
              SamplingParams(max_tokens=30, temperature=0.7, seed=4, ignore_eos=True, frequency_penalty=0.5,
                             presence_penalty=0.2, repetition_penalty=1.2, min_p=0.05, typical_p=0.95,
                             logit_bias=((9, 2.0),),
                             allowed_token_ids=tuple(range(3, 60)), bad_words_ids=((11,), (12, 13)), logprobs=3,
                             top_from_allowed=True)]
    batch = eng.new_batch(max_len=64, num_blocks=200)

    def run() -> list[list[int]]:
        seqs = [eng.new_sequence([5 + i, 6, 7], sp, eng.compile(p)) for i, (sp, p) in enumerate(zip(params, policies))]
        batch.add(seqs[:2])
        batch.step()
        batch.add(seqs[2:])
        while batch.filter() is not None and batch.sequences:
            batch.step()
        return [s.output_ids for s in seqs]

    want = run()  # captures every layout this load makes, compiles their programs
    launch, checked = Batch.launch, []

    def launch_without_sync(self, inp):
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = launch(self, inp)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        checked.append(inp.tokens.shape[1])  # 1: a decode step; more: a prefill
        return out

    monkeypatch.setattr(Batch, "launch", launch_without_sync)
    # the prefills' programs compile again, under the check: their index tensors are copied without a sync (a
    # blocking copy each had made the host wait for the step in flight whenever a new layout compiled)
    batch.executor._compiled.clear()
    assert run() == want
    assert checked.count(1) >= 39 and checked.count(3) == 2 and batch.executor.graphs.stats()["failures"] == 0


@pytest.mark.parametrize(("attention", "fuse"), [("gathered", False), ("triton", False), ("triton", True)])
def test_cuda_captured_decode_bf16_same_top1(attention, fuse):
    """bfloat16 (the CUDA default): the captured step picks the eager gathered step's greedy tokens."""
    from tests.reference import tiny_model

    hf = tiny_model("gemma3")
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    got = {g: Engine.from_hf(hf, CharTokenizer(), device="cuda", graphs=g,
                             attention=attention if g else "gathered", fuse=fuse and g).generate(
        [[5, 9, 17, 33], [4, 8, 21]], policy=["full", "pairs"], params=params) for g in (False, True)}
    assert [r.token_ids for r in got[True]] == [r.token_ids for r in got[False]]


def test_cuda_triton_attention_matches_gathered():
    """The kernel compiled for the GPU (the CPU suite runs it interpreted): bf16 and float32, GQA and MHA, a window,
    several splits, rows of 1 to 700 tokens on shuffled blocks; in bf16 at every tiling the engine may choose."""
    from server.model.paged_attention import gathered_attention
    from server.model.triton_attention import Tiling, candidates, paged_decode_attention

    g = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        for heads, kv, hd, window in ((8, 2, 64, None), (32, 32, 128, None), (4, 1, 256, 100)):
            pool = torch.randn(200, 16, 2 * kv, hd, generator=g).to("cuda", dtype)
            lens = torch.tensor([1, 40, 700, 333])
            tables = (torch.randperm(199, generator=g) + 1)[: 4 * 45].view(4, 45).cuda()
            positions = (lens - 1)[:, None].cuda()
            q = torch.randn(4, 1, heads, hd, generator=g).to("cuda", dtype).transpose(1, 2)
            want = gathered_attention(q.float(), pool.float(), tables, positions, lens.cuda(), window=window)
            runs = [(splits, Tiling()) for splits in (None, 1, 5)]  # each split count and tiling compiles anew
            runs += [(5, t) for t in candidates(heads // kv) if dtype == torch.bfloat16 and t != Tiling()]
            for splits, tiling in runs:
                got = paged_decode_attention(q, pool, tables, positions, lens.cuda(), window=window, splits=splits,
                                             tiling=tiling)
                torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


def test_cuda_triton_attention_past_int32_offsets():
    """A pool of more than 2**31 elements (4.4 GB in bf16; a 7B server's pool is larger) read where its element
    offsets pass int32: a row on the pool's last blocks gets what gathering gives (the CPU suite checks FlexAttention
    the same way)."""
    from server.model.paged_attention import gathered_attention
    from server.model.triton_attention import paged_decode_attention

    kv, hd, n_blocks = 2, 64, 540_000
    pool = torch.empty(n_blocks, 16, 2 * kv, hd, device="cuda", dtype=torch.bfloat16)
    tables = torch.tensor([[n_blocks - 1 - i for i in range(8)], [1 + i for i in range(8)]], device="cuda")
    pool[tables.flatten()] = torch.randn(16, 16, 2 * kv, hd, device="cuda").to(torch.bfloat16)
    lens = torch.tensor([120, 120], device="cuda")
    positions = (lens - 1)[:, None]
    q = torch.randn(2, 8, 1, hd, device="cuda").to(torch.bfloat16)
    want = gathered_attention(q.float(), pool[tables.flatten()].float().view(16, 16, 2 * kv, hd),
                              torch.arange(16, device="cuda").view(2, 8), positions, lens)
    got = paged_decode_attention(q, pool, tables, positions, lens)
    del pool
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


def test_cuda_engine_runs_the_kernel_at_its_fastest_tiling():
    """At load the kernel is timed at every candidate tiling, once per shape; the engine runs the fastest."""
    from server.model import triton_attention

    eng = Engine.from_hf(tiny_llama(), CharTokenizer(), device="cuda", dtype=torch.bfloat16, attention="triton")
    batch = eng.new_batch(max_len=32, num_blocks=50)
    a = eng.model.args
    times = triton_attention.timings(heads=a.n_heads, kv_heads=a.n_kv_heads, head_dim=a.head_dim,
                                     dtype=torch.bfloat16, device=eng.model.device)
    assert times is not None and set(times.tilings_ms) == set(triton_attention.candidates(a.n_heads // a.n_kv_heads))
    assert batch.executor.tiling == times.best


def test_cuda_warm_up_captures_before_the_first_request():
    """The server's warm-up (fused layer math: it compiles too) captures the one- and two-row steps of a schedule;
    a request of that schedule then only replays."""
    eng = Engine.from_hf(tiny_llama(), CharTokenizer(), device="cuda", dtype=torch.float32, fuse=True)
    batch = eng.new_batch(max_len=32, num_blocks=50)
    batch.warm_up(eng.compile("full"))
    stats = batch.executor.graphs.stats()
    assert stats["captures"] == 2 and stats["failures"] == 0, stats
    eng.generate([[5, 6, 7]], params=SamplingParams(max_tokens=4, ignore_eos=True), batch=batch)
    after = batch.executor.graphs.stats()
    assert after["captures"] == 2 and after["replays"] == 3, after  # three decode steps, inside one block


@pytest.mark.skipif(not os.environ.get("PAINTERS_GPU_GGUF"),
                    reason="PAINTERS_GPU_GGUF names no checkpoint (make bench-gpu sets it where .ckpt/ holds SmolLM2's)")
def test_cuda_real_checkpoint_captured_bf16_same_top1(tmp_path, monkeypatch):
    """The real SmolLM2 checkpoint in bfloat16: decode steps replayed from CUDA graphs, with the decode attention the
    server would pick, choose the eager gathered step's greedy tokens for a mix of policies. A row may part only at
    a near tie (the eager step's two best tokens within 0.1 in logprob), which bf16 rounding in another kernel may
    flip; after it the rows are different texts and are not compared."""
    from server.model.loader import load_model

    monkeypatch.setenv("PAINTERS_CACHE_DIR", os.environ.get("PAINTERS_CACHE_DIR", str(tmp_path)))
    loaded = load_model(os.environ["PAINTERS_GPU_GGUF"], device="cuda")
    assert loaded.weights.embed.dtype == torch.bfloat16
    texts = ["The capital of France is", "def fibonacci(n):", "Water boils at a temperature of",
             "Once upon a time, in a small village,", "The three primary colours are", "import numpy as np\n"]
    policies = ["full", "skip:10", "pairs", "full", "skip:6", "parallel:12-17"]
    params = SamplingParams(max_tokens=24, ignore_eos=True, logprobs=2)
    got = {}
    for graphs in (False, True):
        eng = Engine.from_loaded(loaded, graphs=graphs, attention="auto" if graphs else "gathered")
        got[graphs] = eng.generate([eng.encode(t) for t in texts], policy=policies, params=params)
    parted = 0  # rows whose tokens part from the eager step's
    for want, have in zip(got[False], got[True]):
        n = next((i for i, (a, b) in enumerate(zip(want.token_ids, have.token_ids)) if a != b), None)
        if n is None:
            continue
        parted += 1
        best = sorted(want.top_logprobs[n].values(), reverse=True)
        assert best[0] - best[1] < 0.1, (n, want.token_ids[: n + 1], have.token_ids[: n + 1], best)
    assert parted < len(texts), "no row kept the eager step's tokens"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_model_on_the_second_gpu_serves_what_the_first_serves():
    """Triton launches, CUDA events and graph capture follow the current device, not the tensors': with the model on
    cuda:1 and no device set they ran on GPU 0. The engine loop's thread and the load set it (Engine.use_device)."""
    from server.engine.loop import EngineLoop
    from server.engine.request import Request

    params = SamplingParams(max_tokens=8, ignore_eos=True)
    got = {}
    for device in ("cuda:0", "cuda:1"):
        eng = Engine.from_hf(tiny_llama(), CharTokenizer(), device=device, dtype=torch.float32)
        eng.use_device()
        loop = EngineLoop(eng, max_num_seqs=4, max_model_len=64, queue_capacity=8, kv_budget_tokens=4096)
        outs = []
        loop.submit(Request("r", [5, 6, 7], params, eng.compile("pairs:1-4")), outs.append)
        while loop.num_requests:
            loop.step()
        got[device] = outs[-1].result.token_ids
    assert got["cuda:1"] == got["cuda:0"]
