"""The real embedded SmolLM2-135M: logits equal transformers, greedy text equals transformers generate."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from server.engine.executor import Executor, Row
from server.engine.sampling import SamplingParams
from server.model import triton_attention

pytestmark = pytest.mark.slow
PROMPT = "The capital of France is Paris. The capital of Italy is"


def test_full_logits_equal_transformers(smollm2, smollm2_hf, smollm2_engine):
    ids = smollm2.tokenizer.encode(PROMPT, return_tensors="pt")
    with torch.no_grad():
        ref = smollm2_hf(ids).logits
    schedule = smollm2_engine.compile("full")
    ex = Executor(smollm2_engine.model, num_blocks=schedule.num_slots * 4 + 1, max_len=ids.shape[1])
    ours = ex.forward(ids, [Row(0, schedule, 0, ids.shape[1])])
    torch.testing.assert_close(ours, ref, rtol=1e-3, atol=1e-3)


def test_greedy_generation_equals_transformers_generate(smollm2, smollm2_hf, smollm2_engine):
    ids = smollm2.tokenizer.encode(PROMPT, return_tensors="pt")
    with torch.no_grad():
        ref = smollm2_hf.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False)
    ours = smollm2_engine.generate([ids[0].tolist()], params=SamplingParams(max_tokens=24, ignore_eos=True))[0]
    assert ours.token_ids == ref[0, ids.shape[1]:].tolist()
    assert "Rome" in ours.text


def test_repetition_penalty_equals_transformers_generate(smollm2, smollm2_hf, smollm2_engine):
    """vLLM's repetition_penalty is CTRL's, as transformers' RepetitionPenaltyLogitsProcessor: a token of prompt or
    output has its logit divided by the penalty when positive, multiplied when negative."""
    ids = smollm2.tokenizer.encode(PROMPT, return_tensors="pt")
    with torch.no_grad():
        ref = smollm2_hf.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False, repetition_penalty=1.3)
    ours = smollm2_engine.generate([ids[0].tolist()], params=SamplingParams(max_tokens=24, ignore_eos=True,
                                                                            repetition_penalty=1.3))[0]
    plain = smollm2_engine.generate([ids[0].tolist()], params=SamplingParams(max_tokens=24, ignore_eos=True))[0]
    assert ours.token_ids == ref[0, ids.shape[1]:].tolist() and ours.token_ids != plain.token_ids


def test_logit_bias_and_allowed_token_ids_steer_greedy_decoding(smollm2, smollm2_engine):
    """-100 on the greedy token removes it; +100 on a token makes it every token; allowed_token_ids restrict every
    token to them."""
    def greedy(**kwargs) -> list[int]:
        return smollm2_engine.generate([PROMPT], params=SamplingParams(max_tokens=8, ignore_eos=True,
                                                                       **kwargs))[0].token_ids

    plain = greedy()
    assert greedy(logit_bias=((plain[0], -100.0),))[0] != plain[0]
    banana = smollm2.tokenizer.encode(" banana", add_special_tokens=False)[0]
    assert greedy(logit_bias=((banana, 100.0),)) == [banana] * 8
    cities = tuple(smollm2.tokenizer.encode(" Rome Paris Milan", add_special_tokens=False))
    restricted = greedy(allowed_token_ids=cities)
    assert set(restricted) <= set(cities) and restricted != plain


def test_a_frequency_penalty_breaks_a_loop(smollm2, smollm2_engine):
    """Greedy decoding repeats "red" twelve times in sixteen tokens; with frequency_penalty 2 no token comes more
    than three times."""
    prompt = "red red red red red red"
    counts = {}
    for penalty in (0.0, 2.0):
        out = smollm2_engine.generate([prompt], params=SamplingParams(max_tokens=16, ignore_eos=True,
                                                                      frequency_penalty=penalty))[0].token_ids
        counts[penalty] = max(out.count(t) for t in out)
    assert counts[0.0] >= 10 and counts[2.0] <= 3, counts


@pytest.mark.parametrize("policy", ["skip:10", "pairs", "parallel:8-22", "loop:8-22x3", "reverse:8-22",
                                    "shuffle:8-22:7", "repeat:8-22"])
def test_every_policy_generates_on_the_real_model(smollm2_engine, policy):
    r = smollm2_engine.generate([PROMPT, "Once upon a time"], policy=policy,
                                params=SamplingParams(max_tokens=8, ignore_eos=True, logprobs=2))
    for one in r:
        assert len(one.token_ids) == 8 and all(lp <= 0 for lp in one.logprobs)
        assert one.policy == smollm2_engine.compile(policy).policy


def test_mixed_policies_in_one_batch_equal_each_alone_on_the_real_model(smollm2_engine):
    policies = ["full", "skip:8", "pairs", "loop:8-22x3", "reverse:8-22"]
    params = SamplingParams(max_tokens=12, ignore_eos=True, logprobs=1)
    together = smollm2_engine.generate([PROMPT] * len(policies), policy=policies, params=params)
    for policy, got in zip(policies, together):
        alone = smollm2_engine.generate([PROMPT], policy=policy, params=params)[0]
        assert got.token_ids == alone.token_ids, policy
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(alone.logprobs), rtol=1e-3, atol=1e-3)


def test_cli_generate_json():
    from server.cli import app

    out = CliRunner().invoke(app, ["generate", "--policy", "skip:10", "--prompt", PROMPT, "--max-tokens", "6",
                                   "--ignore-eos", "--json"])
    assert out.exit_code == 0, out.output
    obj = json.loads(out.stdout.strip().splitlines()[-1])
    assert obj["policy"] == "skip:10-19"
    assert len(obj["token_ids"]) == 6 and len(obj["logprobs"]) == 6 and obj["prompt_token_ids"]
    assert obj["timings"]["prefill_s"] > 0 and isinstance(obj["text"], str)


def test_cli_rejects_bad_policy_with_allowed_range():
    from server.cli import app

    out = CliRunner().invoke(app, ["generate", "--policy", "skip:25-40", "--prompt", "x"])
    assert out.exit_code == 2
    assert "0-29" in out.output


@pytest.mark.skipif(not triton_attention.available(), reason="needs the triton package")
def test_the_server_setting_attention_triton_serves_the_same_text(smollm2_engine):
    """PAINTERS_ATTENTION=triton reaches the engine the server loads (the Triton kernel, in Triton's interpreter on
    the CPU), and the real model's greedy text, under a mixed batch, is the gathered path's."""
    from server.app import load_engine
    from server.settings import Settings

    engine = load_engine(Settings(model="smollm2-135m", device="cpu", attention="triton"))
    assert engine.attention == "triton"
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    policies = ["full", "skip:10"]
    want = smollm2_engine.generate([PROMPT] * 2, policy=policies, params=params)
    got = engine.generate([PROMPT] * 2, policy=policies, params=params)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]


def test_fused_captured_steps_serve_the_real_models_text(smollm2_engine):
    """The padded decode step with its layer math through torch.compile (`fuse`; on CUDA inside the captured graph)
    gives the real model's greedy text under a mixed batch; PAINTERS_FUSE_DECODE reaches the engine the server
    loads, and is refused without captured steps."""
    from pydantic import ValidationError

    from server.app import load_engine
    from server.engine.generate import Engine
    from server.settings import Settings

    fused = Engine(smollm2_engine.model, smollm2_engine.tokenizer, eos_ids=smollm2_engine.eos_ids, graphs=True,
                   fuse=True, attention="gathered")
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    policies = ["full", "skip:10", "pairs:14-15"]
    want = smollm2_engine.generate([PROMPT] * 3, policy=policies, params=params)
    got = fused.generate([PROMPT] * 3, policy=policies, params=params)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert load_engine(Settings(model="smollm2-135m", device="cpu", fuse_decode=True)).fuse
    with pytest.raises(ValidationError, match="fuse_decode needs cuda_graphs"):
        Settings(fuse_decode=True, cuda_graphs=False)


def test_overlapped_decode_serves_the_real_models_text(smollm2_engine):
    """Overlapped decoding (the CUDA default, forced here on the CPU) gives the real model's text under a mixed
    batch whose rows stop on a string, on a token and by length at different steps; PAINTERS_OVERLAP_DECODE reaches
    the engine the server loads."""
    from server.app import load_engine
    from server.engine.generate import Engine
    from server.settings import Settings

    e = smollm2_engine
    overlapped = Engine(e.model, e.tokenizer, eos_ids=e.eos_ids, overlap=True)
    policies = ["full", "skip:10", "pairs:14-15", "full"]
    free = e.generate([PROMPT] * 4, policy=policies, params=SamplingParams(max_tokens=12, ignore_eos=True))
    params = [SamplingParams(max_tokens=12, stop=(free[0].text[4:7],)),
              SamplingParams(max_tokens=12, stop_token_ids=(free[1].token_ids[3],)),
              SamplingParams(max_tokens=5, ignore_eos=True), SamplingParams(max_tokens=12)]
    results = []
    for engine in (e, overlapped):
        seqs = [engine.new_sequence(PROMPT, sp, engine.compile(p)) for sp, p in zip(params, policies)]
        batch = engine.new_batch(max_len=64, num_blocks=4 * 64 * 30)
        batch.add(seqs)
        while batch.filter() is not None and batch.sequences:
            batch.step()
        results.append([(s.text, s.output_ids, s.finish_reason) for s in seqs])
    assert results[1] == results[0]
    assert [r[2] for r in results[0]][:3] == ["stop", "stop", "length"]
    assert load_engine(Settings(model="smollm2-135m", device="cpu", overlap_decode=True)).overlap is True
