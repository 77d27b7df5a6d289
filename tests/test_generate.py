"""Generation on a tiny model: greedy parity with transformers, batching, sampling, stops, echo, timings."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import torch

from server.engine.generate import Batch, Engine, Launched
from server.engine.request import Request
from server.engine.sampling import SamplingError, SamplingParams
from tests.conftest import CharTokenizer, bos_word_tokenizer, tiny_llama

POLICIES = ["full", "skip:2", "pairs:1-4", "parallel:1-4", "loop:1-4x2", "reverse:1-4", "shuffle:1-4:3", "repeat:1-4",
            "schedule:0,1+3/sum,2,2,4-5"]


@pytest.fixture(params=[False, True], ids=["stepwise", "overlapped"])
def engine(request, tiny_engine, overlapped_engine) -> Engine:
    """The engine under test, decoding step by step or overlapped; references come from `tiny_engine` (step by
    step), so an overlapped test checks that overlap changes nothing."""
    return overlapped_engine if request.param else tiny_engine


def hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(hf(torch.tensor([ids])).logits[0, -1].argmax())
            out.append(nxt)
            ids.append(nxt)
    return out


def test_full_greedy_matches_transformers(tiny_engine):
    hf = tiny_llama()
    prompt = [5, 9, 17, 33, 4, 8]
    result = tiny_engine.generate([prompt], policy="full", params=SamplingParams(max_tokens=12, ignore_eos=True))[0]
    assert result.token_ids == hf_greedy(hf, prompt, 12)
    assert result.finish_reason == "length" and result.policy == "full"


@pytest.mark.parametrize("policy", POLICIES)
def test_batch_of_different_lengths_equals_each_alone(tiny_engine, policy):
    prompts = [[5, 9, 17], [40, 41, 42, 43, 44, 45, 46, 47], [7], [99, 98, 97, 96, 95]]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    together = tiny_engine.generate(prompts, policy=policy, params=params)
    for prompt, got in zip(prompts, together):
        alone = tiny_engine.generate([prompt], policy=policy, params=params)[0]
        assert got.token_ids == alone.token_ids
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(alone.logprobs), rtol=1e-4, atol=1e-4)


def test_rows_stay_correct_when_sequences_finish_early(tiny_engine):
    """Different max_tokens make sequences leave mid-batch (rows are compacted); the rest are unaffected."""
    schedule = tiny_engine.compile("pairs:1-4")
    prompts = [[5, 9, 17], [40, 41, 42, 43], [7, 8], [99, 98, 97, 96, 95]]
    lengths = [2, 9, 4, 7]
    batch = tiny_engine.new_batch(max_len=32, num_blocks=256)
    seqs = [tiny_engine.new_sequence(p, SamplingParams(max_tokens=n, ignore_eos=True), schedule) for p, n in zip(prompts, lengths)]
    batch.add(seqs)
    while batch.filter() is not None and batch.sequences:
        batch.step()
    for prompt, n, seq in zip(prompts, lengths, seqs):
        alone = tiny_engine.generate([prompt], policy="pairs:1-4", params=SamplingParams(max_tokens=n, ignore_eos=True))
        assert seq.output_ids == alone[0].token_ids


def test_sequences_join_a_running_batch(tiny_engine, engine):
    schedule = tiny_engine.compile("skip:2")
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    batch = engine.new_batch(max_len=32, num_blocks=256)
    a = tiny_engine.new_sequence([5, 6, 7, 8], params, schedule)
    batch.add([a])
    batch.step()
    batch.step()
    b = tiny_engine.new_sequence([20, 21], params, schedule)
    batch.add([b])
    while batch.filter() is not None and batch.sequences:
        batch.step()
    for seq, prompt in ((a, [5, 6, 7, 8]), (b, [20, 21])):
        assert seq.output_ids == tiny_engine.generate([prompt], policy="skip:2", params=params)[0].token_ids


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_engine):
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    one = tiny_engine.generate([[5, 6, 7]], policy="full", params=params)[0].token_ids
    again = tiny_engine.generate([[5, 6, 7]], policy="full", params=params)[0].token_ids
    batched = tiny_engine.generate([[9, 9], [5, 6, 7]], policy="full", params=params)[1].token_ids
    other = tiny_engine.generate([[5, 6, 7]], policy="full", params=SamplingParams(
        max_tokens=10, temperature=1.0, seed=99, ignore_eos=True))[0].token_ids
    assert one == again == batched
    assert one != other


def test_top_k_one_is_greedy(tiny_engine):
    greedy = tiny_engine.generate([[5, 6, 7]], params=SamplingParams(max_tokens=8, ignore_eos=True))[0]
    top1 = tiny_engine.generate([[5, 6, 7]], params=SamplingParams(
        max_tokens=8, temperature=0.8, top_k=1, seed=3, ignore_eos=True))[0]
    assert top1.token_ids == greedy.token_ids


def test_stop_token_and_min_tokens(tiny_engine, engine):
    free = tiny_engine.generate([[5, 6, 7]], params=SamplingParams(max_tokens=10, ignore_eos=True))[0].token_ids
    stop_at = free[3]
    first = free.index(stop_at)
    stopped = engine.generate([[5, 6, 7]], params=SamplingParams(max_tokens=10, stop_token_ids=(stop_at,)))[0]
    assert stopped.token_ids == free[: first + 1] and stopped.finish_reason == "stop"
    # min_tokens=first: the stop token may be token first+1, where greedy decoding chooses it
    at = engine.generate([[5, 6, 7]], params=SamplingParams(
        max_tokens=10, stop_token_ids=(stop_at,), min_tokens=first))[0]
    assert at.token_ids == stopped.token_ids and at.finish_reason == "stop"
    # one more: it may not be chosen there (masked, as vLLM's min_tokens), so another token comes and the request
    # goes on; overlapped, that row's token count includes the token in flight
    held = engine.generate([[5, 6, 7]], params=SamplingParams(
        max_tokens=10, stop_token_ids=(stop_at,), min_tokens=first + 1))[0]
    assert held.token_ids[:first] == free[:first] and held.token_ids[first] != stop_at
    assert len(held.token_ids) > first + 1
    want = tiny_engine.generate([[5, 6, 7] + held.token_ids[: first + 1]], params=SamplingParams(
        max_tokens=10 - first - 1, stop_token_ids=(stop_at,)))[0]
    assert held.token_ids[first + 1:] == want.token_ids  # afterwards a plain continuation


def penalized_greedy(hf, prompt: list[int], n: int, *, presence: float = 0.0, frequency: float = 0.0,
                     repetition: float = 1.0, sequence: bool = False) -> list[int]:
    """Greedy decoding with vLLM's penalties (TGI's frequency when `sequence`), written out token by token over
    transformers' logits: the reference for the batched, overlapped implementation."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            x = hf(torch.tensor([prompt + out])).logits[0, -1].clone()
            for t in set(prompt) | set(out):
                x[t] = x[t] / repetition if x[t] > 0 else x[t] * repetition
            counted = prompt + out if sequence else out
            for t in set(counted):
                x[t] -= frequency * counted.count(t) / (len(counted) if sequence else 1) + presence
            out.append(int(x.argmax()))
    return out


# about the spread of the tiny model's top logits (0.44, 0.35, 0.29, ...): a count off by one changes the tokens
@pytest.mark.parametrize("penalties", [dict(repetition=1.3), dict(frequency=0.06, presence=0.03),
                                       dict(repetition=1.2, frequency=-0.04, presence=0.1),
                                       dict(frequency=1.0, repetition=1.2, sequence=True)],
                         ids=["repetition", "frequency+presence", "all", "tgi"])
def test_penalties_count_every_token_so_far(tiny_engine, engine, penalties):
    """Each step's penalties count the prompt (repetition; TGI's frequency) and every output token so far,
    overlapped too, where the latest is still on the device: the tokens equal a step-by-step reference, and
    differ from plain greedy decoding (the test is not vacuous)."""
    prompt = [5, 9, 17, 5, 9, 17]
    params = SamplingParams(max_tokens=20, ignore_eos=True, repetition_penalty=penalties.get("repetition", 1.0),
                            frequency_penalty=penalties.get("frequency", 0.0),
                            presence_penalty=penalties.get("presence", 0.0),
                            frequency_of="sequence" if penalties.get("sequence") else "output")
    got = engine.generate([prompt], params=params)[0].token_ids
    assert got == penalized_greedy(tiny_llama(), prompt, 20, **penalties)
    assert got != tiny_engine.generate([prompt], params=SamplingParams(max_tokens=20, ignore_eos=True))[0].token_ids


def test_processors_apply_to_their_own_rows_only(tiny_engine, engine):
    """One step holds penalized, biased, restricted and min-p rows beside plain greedy and plain drawing ones, and
    two drawing choices of one prompt with their own seeds: every row's tokens are those it gets alone, so no row
    counts, biases or restricts a neighbour, and each choice counts its own output."""
    rows = [SamplingParams(max_tokens=8, ignore_eos=True, frequency_penalty=1.5, repetition_penalty=1.5),
            SamplingParams(max_tokens=8, ignore_eos=True),
            SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.9, seed=5),
            SamplingParams(max_tokens=8, ignore_eos=True, logit_bias=((40, 5.0), (41, -100.0)), min_p=0.2,
                           temperature=1.0, seed=6),
            SamplingParams(max_tokens=8, ignore_eos=True, allowed_token_ids=(20, 30, 40), temperature=1.0, seed=7),
            SamplingParams(max_tokens=8, ignore_eos=True, temperature=1.0, seed=8, presence_penalty=2.0),
            SamplingParams(max_tokens=8, ignore_eos=True, temperature=1.0, seed=9, presence_penalty=2.0)]
    prompt = [5, 6, 7]
    alone = [tiny_engine.generate([prompt], params=p)[0].token_ids for p in rows]
    seqs = [engine.new_sequence(prompt, p, engine.compile("full")) for p in rows]
    batch = engine.new_batch(max_len=32, num_blocks=64)
    batch.add(seqs[:3])
    batch.step()
    batch.add(seqs[3:])  # they join while a step is in flight (overlapped)
    while batch.filter() is not None and batch.sequences:
        batch.step()
    assert [s.result().token_ids for s in seqs] == alone
    assert set(alone[4]) <= {20, 30, 40} and alone[5] != alone[6]


def test_logprobs_stay_the_raw_models(tiny_engine):
    """As vLLM's default (and min_tokens' mask): the logprobs returned are the model's, before any processor, so a
    token the bias made certain has the logprob the model gives it."""
    plain = tiny_engine.generate([[5, 6, 7]], params=SamplingParams(max_tokens=1, logprobs=3))[0]
    forced = tiny_engine.generate([[5, 6, 7]], params=SamplingParams(
        max_tokens=1, logprobs=3, logit_bias=((50, 100.0),), repetition_penalty=2.0, frequency_penalty=2.0))[0]
    assert forced.token_ids == [50] and forced.top_logprobs == plain.top_logprobs
    assert forced.logprobs[0] < plain.logprobs[0]  # 50 is not the model's own choice


def test_min_tokens_masks_only_its_own_row(tiny_engine, engine):
    """A row under min_tokens may not choose its stop tokens; its neighbours in the step, greedy or drawing, choose
    as they would alone."""
    free = tiny_engine.generate([[5, 6, 7]], params=SamplingParams(max_tokens=6, ignore_eos=True))[0].token_ids
    rows = [SamplingParams(max_tokens=6, stop_token_ids=tuple(set(free)), min_tokens=6),
            SamplingParams(max_tokens=6, stop_token_ids=(free[2],)),
            SamplingParams(max_tokens=6, temperature=0.9, seed=5, ignore_eos=True)]
    alone = [tiny_engine.generate([[5, 6, 7]], params=p)[0].token_ids for p in rows]
    seqs = [engine.new_sequence([5, 6, 7], p, engine.compile("full")) for p in rows]
    batch = engine.new_batch(max_len=32, num_blocks=64)
    batch.add(seqs)
    while batch.filter() is not None and batch.sequences:
        batch.step()
    got = [s.result().token_ids for s in seqs]
    assert got == alone
    assert len(got[0]) == 6 and not set(got[0]) & set(free)  # none of its stop tokens, all six masked
    assert got[1] == free[: free.index(free[2]) + 1]


def test_stop_string_truncates_text(tiny_engine, engine):
    free = tiny_engine.generate([[5, 6, 7]], params=SamplingParams(max_tokens=10, ignore_eos=True))[0]
    assert len(free.text) >= 6
    stop = free.text[3:5]
    got = engine.generate([[5, 6, 7]], params=SamplingParams(max_tokens=10, ignore_eos=True, stop=(stop,)))[0]
    assert got.finish_reason == "stop"
    assert got.text == free.text[: free.text.find(stop)]
    assert stop not in got.text


def test_include_stop_str_in_output_cuts_after_the_stop_string(tiny_engine, engine):
    """vLLM's include_stop_str_in_output: the text ends with the stop string (cut after the first match, not before
    it). A stop token's text is left out, as vLLM leaves it out, unless include_stop_str_in_output keeps it."""
    free = tiny_engine.generate([[5, 6, 7]], params=SamplingParams(max_tokens=10, ignore_eos=True))[0]
    stop = free.text[3:5]
    got = engine.generate([[5, 6, 7]], params=SamplingParams(max_tokens=10, ignore_eos=True, stop=(stop,),
                                                              include_stop_str_in_output=True))[0]
    assert (got.finish_reason, got.text) == ("stop", free.text[: free.text.find(stop) + len(stop)])
    stop_at = free.token_ids[3]
    first = free.token_ids.index(stop_at)
    left, kept = (engine.generate([[5, 6, 7]], params=SamplingParams(
        max_tokens=10, stop_token_ids=(stop_at,), include_stop_str_in_output=keep))[0] for keep in (False, True))
    assert left.token_ids == kept.token_ids == free.token_ids[: first + 1]
    assert (left.text, kept.text) == (free.text[:first], free.text[: first + 1])


def test_of_two_stop_strings_kept_from_one_place_the_shorter_is(tiny_engine):
    """Stops "XYZ" and "XY" both start in the text one token writes ("XYZ"): with include_stop_str_in_output the text
    ends where it first holds a stop string, after "XY"."""
    free = tiny_engine.generate([[5, 6, 7]], params=SamplingParams(max_tokens=10, ignore_eos=True))[0].token_ids
    k = next(i for i in range(1, 10) if free[i] not in free[:i])
    wide = free[k]

    class Wide(CharTokenizer):  # `wide` is "XYZ"
        def decode(self, ids, skip_special_tokens=True):
            return "".join("XYZ" if i == wide else CharTokenizer.decode(self, [i]) for i in ids)

    e = Engine(tiny_engine.model, Wide(), eos_ids=tiny_engine.eos_ids, config=tiny_engine.config)
    got = e.generate([[5, 6, 7]], params=SamplingParams(max_tokens=10, ignore_eos=True, stop=("XYZ", "XY"),
                                                         include_stop_str_in_output=True))[0]
    assert got.token_ids == free[: k + 1] and got.text == Wide().decode(free[:k]) + "XY"


def test_of_two_stop_strings_completed_by_one_token_the_earlier_match_cuts(tiny_engine, engine):
    """Stops "ab" and "b" both end at the token that writes "b": the text is cut where the first match starts
    (before "a"), not where the last one does."""
    free = tiny_engine.generate([[5, 6, 7]], params=SamplingParams(max_tokens=10, ignore_eos=True))[0].text
    k = next(i for i in range(1, len(free)) if free[i] not in free[:i] and free[i - 1 : i + 1] not in free[: i])
    stops = (free[k - 1 : k + 1], free[k])
    got = engine.generate([[5, 6, 7]], params=SamplingParams(max_tokens=10, ignore_eos=True, stop=stops))[0]
    assert got.finish_reason == "stop" and got.text == free[: k - 1]


def test_a_stop_string_completed_by_the_text_held_back_at_the_end_stops(tiny_engine):
    """A token can end in part of a character (byte-level BPE): its text waits for the next token, and is released
    when the request ends by its length. A stop string inside that last text still stops the request."""
    free = tiny_engine.generate([[5, 6, 7]], params=SamplingParams(max_tokens=12, ignore_eos=True))[0].token_ids
    n = next(i for i in range(12, 0, -1) if free[i - 1] not in free[: i - 1])  # its last token appears once
    last = free[n - 1]

    class PartialLast(CharTokenizer):  # `last` is "XY" and a byte of a character its successor would complete
        def decode(self, ids, skip_special_tokens=True):
            return "".join(("XY\ufffd" if j == len(ids) - 1 else "XYz") if i == last else CharTokenizer.decode(self, [i])
                           for j, i in enumerate(ids))

    e = Engine(tiny_engine.model, PartialLast(), eos_ids=tiny_engine.eos_ids, config=tiny_engine.config)
    plain = e.generate([[5, 6, 7]], params=SamplingParams(max_tokens=n, ignore_eos=True))[0]
    assert plain.text.endswith("XY\ufffd") and plain.finish_reason == "length"
    got = e.generate([[5, 6, 7]], params=SamplingParams(max_tokens=n, ignore_eos=True, stop=("Y",)))[0]
    assert (got.text, got.finish_reason, got.token_ids) == (plain.text[:-2], "stop", plain.token_ids)


def test_a_stop_token_releases_the_text_held_back_before_it(tiny_engine):
    """A stop token that decodes to nothing (a special token, as an EOS is) after a token that ends in part of a
    character: the request ends, and its text is the decode of all its tokens, the incomplete character included
    (as when it ends by length above)."""
    free = tiny_engine.generate([[5, 6, 7]], params=SamplingParams(max_tokens=12, ignore_eos=True))[0].token_ids
    k = next(i for i in range(1, 12) if free[i] not in free[:i])  # stop at free[k], its first occurrence
    last, stop_at = free[k - 1], free[k]

    class PartialBeforeStop(CharTokenizer):  # `last` as in the test above; `stop_at` decodes to nothing
        def decode(self, ids, skip_special_tokens=True):
            ids = [i for i in ids if i != stop_at]
            return "".join(("XY\ufffd" if j == len(ids) - 1 else "XYz") if i == last else CharTokenizer.decode(self, [i])
                           for j, i in enumerate(ids))

    e = Engine(tiny_engine.model, PartialBeforeStop(), eos_ids=tiny_engine.eos_ids, config=tiny_engine.config)
    got = e.generate([[5, 6, 7]], params=SamplingParams(max_tokens=12, stop_token_ids=(stop_at,)))[0]
    assert got.finish_reason == "stop" and got.token_ids == free[: k + 1]
    assert got.text == e.tokenizer.decode(got.token_ids) and got.text.endswith("XY\ufffd")


def test_echo_scores_prompt_like_transformers(tiny_engine):
    hf = tiny_llama()
    prompt = [5, 9, 17, 33, 4, 8, 60]
    result = tiny_engine.generate([prompt], policy="full", params=SamplingParams(max_tokens=0, echo=True, logprobs=3))[0]
    assert result.token_ids == [] and result.finish_reason == "length"
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0], -1)
    expected = [ref[t - 1, prompt[t]].item() for t in range(1, len(prompt))]
    assert result.prompt_logprobs[0] is None
    torch.testing.assert_close(torch.tensor(result.prompt_logprobs[1:]), torch.tensor(expected), rtol=1e-4, atol=1e-4)
    assert len(result.prompt_top_logprobs) == len(prompt) and len(result.prompt_top_logprobs[1]) == 3
    ranks = [int((ref[t - 1] > ref[t - 1, prompt[t]]).sum()) + 1 for t in range(1, len(prompt))]
    assert result.prompt_ranks == [None, *ranks] and max(ranks) > 1


def test_prompt_logprobs_score_the_prompt_with_their_own_alternatives(tiny_engine):
    """vLLM's prompt_logprobs: the prompt is scored with that many alternatives, whatever `logprobs` asks of the
    generated tokens; beside an echo, each is served from one scoring with the larger count."""
    prompt = [5, 9, 17, 33, 4, 8, 60]
    echo = tiny_engine.generate([prompt], params=SamplingParams(max_tokens=0, echo=True, logprobs=3))[0]
    got = tiny_engine.generate([prompt], params=SamplingParams(max_tokens=2, prompt_logprobs=3, logprobs=None))[0]
    assert got.prompt_logprobs == echo.prompt_logprobs and got.prompt_ranks == echo.prompt_ranks
    assert got.prompt_top_logprobs == echo.prompt_top_logprobs and got.logprobs == []
    both = tiny_engine.generate([prompt], params=SamplingParams(max_tokens=0, echo=True, logprobs=1,
                                                                 prompt_logprobs=3))[0]
    assert both.prompt_top_logprobs == echo.prompt_top_logprobs
    assert SamplingParams(prompt_logprobs=0).prompt_alternatives == 0 and SamplingParams().prompt_alternatives is None


def test_echo_mixed_with_plain_requests_in_one_batch(tiny_engine):
    params_echo = SamplingParams(max_tokens=3, echo=True, ignore_eos=True)
    alone = tiny_engine.generate([[5, 9, 17, 33]], params=params_echo)[0]
    schedule = tiny_engine.compile("full")
    batch = tiny_engine.new_batch(max_len=16, num_blocks=256)
    a = tiny_engine.new_sequence([5, 9, 17, 33], params_echo, schedule)
    b = tiny_engine.new_sequence([7, 7], SamplingParams(max_tokens=3, ignore_eos=True), schedule)
    batch.add([a, b])
    while batch.filter() is not None and batch.sequences:
        batch.step()
    assert a.output_ids == alone.token_ids
    torch.testing.assert_close(torch.tensor(a.prompt_logprobs[1:]), torch.tensor(alone.prompt_logprobs[1:]))
    assert b.prompt_logprobs is None


def test_logprobs_and_top_alternatives(tiny_engine):
    r = tiny_engine.generate([[5, 6, 7]], params=SamplingParams(max_tokens=5, logprobs=4, ignore_eos=True))[0]
    assert len(r.logprobs) == len(r.top_logprobs) == 5
    for token, lp, top in zip(r.token_ids, r.logprobs, r.top_logprobs):
        assert len(top) == 4
        assert max(top, key=top.get) == token  # greedy picks the most likely
        assert top[token] == pytest.approx(lp)
        assert all(v <= 0 for v in top.values())


@pytest.mark.parametrize("sampled", [False, True])
def test_rows_without_logprobs_get_the_same_tokens_and_no_logprobs(tiny_engine, sampled):
    """logprobs=None (an OpenAI request without `logprobs`) skips the logprob pass: the same tokens, no logprobs,
    whether the whole batch asks for none or it shares a step with rows that ask for the token's own (0) or more."""
    def params(logprobs):
        return SamplingParams(max_tokens=6, ignore_eos=True, logprobs=logprobs, seed=7,
                              temperature=0.9 if sampled else 0.0, top_k=20 if sampled else 0)

    prompt = [5, 6, 7]
    want = tiny_engine.generate([prompt], params=params(0))[0]
    alone = tiny_engine.generate([prompt], params=params(None))[0]
    assert alone.token_ids == want.token_ids and alone.logprobs == [] and alone.top_logprobs is None
    batch = tiny_engine.new_batch(max_len=32, num_blocks=64)
    seqs = [tiny_engine.new_sequence(prompt, params(n), tiny_engine.compile("full")) for n in (None, 0, 3)]
    batch.add(seqs)
    while batch.filter() is not None and batch.sequences:
        batch.step()
    none, zero, three = (s.result() for s in seqs)
    assert none.token_ids == zero.token_ids == three.token_ids == want.token_ids
    assert none.logprobs == [] and len(zero.logprobs) == len(three.logprobs) == 6
    torch.testing.assert_close(torch.tensor(zero.logprobs), torch.tensor(want.logprobs), rtol=1e-5, atol=1e-5)
    assert zero.top_logprobs is None and [len(t) for t in three.top_logprobs] == [3] * 6


def test_timings_are_filled(tiny_engine):
    r = tiny_engine.generate([[5, 6, 7]], params=SamplingParams(max_tokens=6, ignore_eos=True))[0]
    t = r.timings
    assert t.prefill_s > 0 and t.decode_s > 0 and t.ttft_s >= t.prefill_s
    assert len(t.per_token_s) == 5 and t.tpot_s == pytest.approx(t.decode_s / 5)


def test_text_prompt_uses_tokenizer(tiny_engine):
    r = tiny_engine.generate("hello", params=SamplingParams(max_tokens=2, ignore_eos=True))[0]
    assert r.prompt_token_ids == CharTokenizer().encode("hello")


def test_text_prompts_get_the_special_tokens_the_tokenizer_adds_by_default():
    """Gemma's tokenizer adds <bos> by default and the model needs it; a rendered chat template holds it already."""
    tok = bos_word_tokenizer()
    engine = Engine.from_hf(tiny_llama(), tok, device="cpu")
    assert engine.encode("hello world") == tok("hello world").input_ids == [1, 3, 4]
    r = engine.generate("hello world", params=SamplingParams(max_tokens=2, ignore_eos=True))[0]
    assert r.prompt_token_ids == [1, 3, 4]
    chat = [{"role": "user", "content": "hi there"}]
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ids = engine.encode(text, add_special_tokens=False)
    assert ids == tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)["input_ids"]
    assert ids.count(1) == 1
    assert engine.encode([5, 6]) == [5, 6]  # token ids pass through


@pytest.mark.parametrize("bad", [dict(max_tokens=-1), dict(temperature=-0.5), dict(top_p=0), dict(top_p=1.5),
                                 dict(top_k=-2), dict(logprobs=50), dict(stop=("",))])
def test_bad_sampling_params_raise_clear_errors(bad):
    with pytest.raises(SamplingError, match="must"):
        SamplingParams(**bad)


def test_bad_policy_raises_before_running(tiny_engine):
    from server.policy.policy import PolicyError

    with pytest.raises(PolicyError, match="0-5"):
        tiny_engine.generate([[5]], policy="skip:3-9")


def test_streams_mode_equals_batched():
    batched = Engine.from_hf(tiny_llama(), CharTokenizer(), group_mode="batched")
    streams = Engine.from_hf(tiny_llama(), CharTokenizer(), group_mode="streams")
    for policy in ("pairs:1-4", "parallel:1-4", "loop:1-4x3"):
        params = SamplingParams(max_tokens=6, ignore_eos=True)
        a = batched.generate([[5, 6, 7], [8, 9]], policy=policy, params=params)
        b = streams.generate([[5, 6, 7], [8, 9]], policy=policy, params=params)
        assert [r.token_ids for r in a] == [r.token_ids for r in b]


# -- mixed schedules in one batch ----------------------------------------------------------------------------------

MIX = ["full", "skip:2", "skip:1-3", "pairs", "pairs:1-4", "parallel", "loop:x2", "reverse", "shuffle:1-4:3", "repeat",
       "schedule:0,2+3/sum,1,4-5"]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(MIX), st.integers(1, 9), st.integers(1, 6), st.integers(0, 4)),
                min_size=1, max_size=6))
def test_any_mix_decoded_together_equals_each_alone(tiny_engine, engine, requests):
    """Requests of random policies and prompt lengths join at random steps and leave when done (different
    max_tokens); each gets the greedy tokens and logprobs it gets alone."""
    batch = engine.new_batch(max_len=32, num_blocks=600)
    pending = []
    for i, (policy, n_prompt, n_new, join_at) in enumerate(requests):
        prompt = [3 + (7 * i + 5 * t) % 120 for t in range(n_prompt)]
        seq = tiny_engine.new_sequence(prompt, SamplingParams(max_tokens=n_new, ignore_eos=True, logprobs=1),
                                       tiny_engine.compile(policy))
        pending.append((join_at, policy, prompt, seq))
    step = 0
    waiting = sorted(pending, key=lambda p: p[0])
    while waiting or batch.sequences:
        batch.add([p[3] for p in waiting if p[0] <= step])
        waiting = [p for p in waiting if p[0] > step]
        batch.filter()
        batch.step()
        batch.filter()
        step += 1
    for _, policy, prompt, seq in pending:
        alone = tiny_engine.generate([prompt], policy=policy, params=seq.params)[0]
        assert seq.output_ids == alone.token_ids, policy
        torch.testing.assert_close(torch.tensor(seq.logprobs), torch.tensor(alone.logprobs), rtol=1e-4, atol=1e-4)


def test_a_row_whose_sampling_fails_ends_alone(tiny_engine, engine, poisoned_seed):
    """One row's sampler raises: that row ends with an error, its neighbour (another policy) finishes normally."""
    batch = engine.new_batch(max_len=32, num_blocks=256)
    good = tiny_engine.new_sequence([5, 6, 7], SamplingParams(max_tokens=8, ignore_eos=True), tiny_engine.compile("full"))
    bad = tiny_engine.new_sequence([5, 6], SamplingParams(max_tokens=8, temperature=1.0, seed=poisoned_seed,
                                                          ignore_eos=True),
                                   tiny_engine.compile("skip:2"))
    batch.add([good])
    batch.step()
    batch.add([bad])
    while batch.filter() is not None and batch.sequences:
        batch.step()
    assert bad.finish_reason == "error" and "probability tensor" in bad.error
    assert good.finish_reason == "length"
    assert good.output_ids == tiny_engine.generate([[5, 6, 7]], params=good.params)[0].token_ids
    assert batch.kv_usage() == 0.0, "both rows' KV blocks are free again"


# -- overlapped decoding -------------------------------------------------------------------------------------------


def test_overlapped_decoding_gives_what_stepwise_decoding_gives(tiny_engine, overlapped_engine):
    """A mix of policies, lengths, stop tokens, stop strings, min_tokens, seeded sampling and logprobs: every row's
    tokens, logprobs, alternatives, text and finish reason are those of decoding step by step."""
    prompts = [[5, 9, 17], [40, 41, 42, 43, 44], [7], [99, 98, 97], [12, 13], [60, 61, 62, 63]]
    policies = ["full", "skip:2", "pairs:1-4", "loop:1-4x2", "reverse:1-4", "full"]
    free = tiny_engine.generate(prompts, policy=policies, params=SamplingParams(max_tokens=12, ignore_eos=True))
    params = [
        SamplingParams(max_tokens=12, stop_token_ids=(free[0].token_ids[2],)),  # stops mid-way: one step too many
        SamplingParams(max_tokens=3, ignore_eos=True, logprobs=2),  # ends by length: never decoded past it
        SamplingParams(max_tokens=12, ignore_eos=True, stop=(free[2].text[2:4],)),
        SamplingParams(max_tokens=9, temperature=0.9, top_p=0.8, seed=7, ignore_eos=True, logprobs=1),
        SamplingParams(max_tokens=12, stop_token_ids=(free[4].token_ids[1],), min_tokens=4),
        SamplingParams(max_tokens=1, ignore_eos=True),  # ends at its prefill
    ]
    results = {}
    for e in (tiny_engine, overlapped_engine):
        seqs = [e.new_sequence(p, sp, e.compile(pol)) for p, sp, pol in zip(prompts, params, policies)]
        batch = e.new_batch(max_len=32, num_blocks=600)
        batch.add(seqs[:4])
        batch.filter()
        batch.step()
        batch.add(seqs[4:])  # they join while a step is in flight
        while batch.filter() is not None and batch.sequences:
            batch.step()
        assert batch.kv_usage() == 0.0
        results[e is overlapped_engine] = [s.result() for s in seqs]
    for got, want in zip(results[True], results[False]):
        assert (got.token_ids, got.text, got.finish_reason) == (want.token_ids, want.text, want.finish_reason)
        # the same alternatives with the same log-probabilities; the values only to float noise, since rows that join
        # mid-flight share steps of other sizes (torch 2.11's CPU GEMMs differ in the last bit there, 2.13's do not)
        assert got.logprobs == pytest.approx(want.logprobs, abs=1e-5)
        got_top, want_top = got.top_logprobs or [], want.top_logprobs or []
        assert (got.top_logprobs is None) == (want.top_logprobs is None)
        assert [list(t) for t in got_top] == [list(t) for t in want_top]
        assert [v for t in got_top for v in t.values()] == pytest.approx([v for t in want_top for v in t.values()],
                                                                          abs=1e-5)
    assert [r.finish_reason for r in results[True]] == ["stop", "length", "stop", "length", "stop", "length"]


def _launches(monkeypatch) -> list[tuple[str, int]]:
    """Records every `Batch.launch` ("launch", rows) and every read of a launched step's results ("read", rows)."""
    events: list[tuple[str, int]] = []
    launch, result = Batch.launch, Launched.result

    def launch_(batch, inp):
        events.append(("launch", len(inp.rows)))
        return launch(batch, inp)

    def result_(launched):
        events.append(("read", len(launched.inp.rows)))
        return result(launched)

    monkeypatch.setattr(Batch, "launch", launch_)
    monkeypatch.setattr(Launched, "result", result_)
    return events


def test_overlapped_decode_queues_each_step_before_reading_the_last(overlapped_engine, monkeypatch):
    """The first decode step is queued on the prefill's token before the prefill is read; then every decode queues
    step N before it reads step N-1, and a row that its token in flight ends by length is not queued again:
    max_tokens=4 queues 3 decode steps, as step by step."""
    events = _launches(monkeypatch)
    r = overlapped_engine.generate([[5, 6, 7]], params=SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert len(r.token_ids) == 4 and r.finish_reason == "length"
    L, R = ("launch", 1), ("read", 1)
    assert events == [L, L, R, L, R, L, R, R]


def test_overlapped_decode_does_not_queue_a_row_past_the_batchs_max_len(overlapped_engine, monkeypatch):
    """As max_tokens above, max_len: a row whose token in flight fills the context is not queued again (its next
    token would be dropped), so a 3-token prompt in a 7-token context queues 3 decode steps."""
    events = _launches(monkeypatch)
    e = overlapped_engine
    r = e.new_sequence([5, 6, 7], SamplingParams(max_tokens=20, ignore_eos=True), e.compile("full"))
    batch = e.new_batch(max_len=7, num_blocks=64)
    batch.add([r])
    while batch.sequences:
        batch.step()
        batch.filter()
    assert len(r.output_ids) == 4 and r.finish_reason == "length"
    L, R = ("launch", 1), ("read", 1)
    assert events == [L, L, R, L, R, L, R, R]


def test_prompt_scoring_computes_its_logits_a_few_positions_at_a_time(tiny_engine, monkeypatch):
    """Scoring a prompt (echo) reads every position's logits: all at once, one 2,000-token prompt added ~900 MB on
    SmolLM2. The prefill returns the final hidden states, and the logits are computed from them within
    SCORE_LOGITS_BYTES; the scores are those of computing them at once, and echo prompts prefill together."""
    from server.engine import generate

    schedule = tiny_engine.compile("skip:2")
    echo, plain = SamplingParams(max_tokens=1, echo=True, logprobs=2), SamplingParams(max_tokens=1)

    def scored(budget: int) -> tuple[list[Request], list[int], list[tuple[int, ...]]]:
        monkeypatch.setattr(generate, "SCORE_LOGITS_BYTES", budget)
        batch = tiny_engine.new_batch(max_len=64, num_blocks=256)
        rows, forward = [], batch.executor.forward
        monkeypatch.setattr(batch.executor, "forward",
                            lambda tokens, *a, **k: rows.append(len(tokens)) or forward(tokens, *a, **k))
        shapes, logits = [], tiny_engine.model.logits
        monkeypatch.setattr(tiny_engine.model, "logits", lambda h: shapes.append(tuple(h.shape[:-1])) or logits(h))
        seqs = [tiny_engine.new_sequence([5 + i] * (10 + 10 * i), p, schedule)
                for i, p in enumerate([echo, plain, echo, plain, echo])]
        batch.add(seqs)
        monkeypatch.undo()
        return seqs, rows, shapes

    seqs, rows, shapes = scored(7 * 4 * tiny_engine.model.args.vocab_size)  # 7 positions
    assert sorted(rows) == [2, 3]  # the plain prompts, then the echo prompts together
    assert all(len(shape) == 1 and shape[0] <= 7 for shape in shapes)
    at_once, _, _ = scored(2**40)
    for s, want in zip(seqs, at_once):
        if s.params.echo:
            assert len(s.prompt_logprobs) == len(s.prompt_ids) and s.prompt_logprobs[0] is None
            assert s.prompt_logprobs[1:] == pytest.approx(want.prompt_logprobs[1:], abs=1e-5)
            assert [sorted(t) for t in s.prompt_top_logprobs[1:]] == [sorted(t) for t in want.prompt_top_logprobs[1:]]
        assert s.output_ids == want.output_ids


def test_an_echo_prefill_is_read_at_once(overlapped_engine, monkeypatch):
    """Prompt scoring needs every position's logits on the host before the prompt is published to the prefix
    cache: an echo prefill is read before anything else is queued."""
    events = _launches(monkeypatch)
    r = overlapped_engine.generate([[5, 6, 7]], params=SamplingParams(max_tokens=2, ignore_eos=True, echo=True,
                                                                      logprobs=1))[0]
    assert len(r.token_ids) == 2 and len(r.prompt_logprobs) == 3
    L, R = ("launch", 1), ("read", 1)
    assert events == [L, R, L, R]  # the prefill, then one decode step (max_tokens=2), read at once by the last call


def test_rows_join_a_step_in_flight_on_their_first_token_still_on_the_device(tiny_engine, overlapped_engine,
                                                                             monkeypatch):
    """Two rows decode with a step in flight while two more are prefilled: the next step takes its tokens from
    both queued steps (no read in between), and every row's tokens are those of decoding step by step."""
    prompts = [[5, 6, 7], [9, 10], [11, 12, 13, 14], [15]]
    policies = ["full", "skip:2", "pairs:1-4", "full"]
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    want = [r.token_ids for r in tiny_engine.generate(prompts, policy=policies, params=params)]
    e = overlapped_engine
    seqs = [e.new_sequence(p, params, e.compile(pol)) for p, pol in zip(prompts, policies)]
    batch = e.new_batch(max_len=32, num_blocks=200)
    batch.add(seqs[:2])
    batch.step()  # queues the first decode of rows 0-1, reads their prefill
    events = _launches(monkeypatch)
    batch.add(seqs[2:])
    assert [s.output_ids for s in seqs[2:]] == [[], []]  # queued, not read
    read = batch.decode()
    assert events == [("launch", 2), ("launch", 4), ("read", 2), ("read", 2)]
    assert {s.id for s in read} == {s.id for s in seqs}
    while batch.sequences:
        batch.step()
        batch.filter()
    assert [s.output_ids for s in seqs] == want


@pytest.mark.parametrize("at", [0, 1], ids=["first-token", "decoded-token"])
def test_a_row_stopped_by_its_token_in_flight_decodes_once_more_and_drops_it(tiny_engine, overlapped_engine,
                                                                             monkeypatch, at):
    """Stopped by its prefill's token (read after its first decode step is queued) or by a decoded one."""
    free = tiny_engine.generate([[5, 6, 7]], params=SamplingParams(max_tokens=8, ignore_eos=True))[0].token_ids
    stop_at = free[at]
    want = free[: free.index(stop_at) + 1]
    events = _launches(monkeypatch)
    got = overlapped_engine.generate([[5, 6, 7]], params=SamplingParams(max_tokens=8, stop_token_ids=(stop_at,)))[0]
    assert got.token_ids == want and got.finish_reason == "stop"
    decode_steps = sum(1 for kind, _ in events if kind == "launch") - 1
    assert decode_steps == len(want)  # step by step: len(want) - 1; the last one's token is dropped


def test_overlapped_timings_add_up_to_the_decode_time(overlapped_engine):
    """Each token's time is the wall time since the previous one, so per-token times sum to the decode wall time
    rather than counting overlapping steps twice."""
    import time

    t = time.perf_counter()
    r = overlapped_engine.generate([[5, 6, 7]], params=SamplingParams(max_tokens=8, ignore_eos=True))[0]
    wall = time.perf_counter() - t
    tm = r.timings
    assert len(tm.per_token_s) == 7 and all(x > 0 for x in tm.per_token_s)
    assert tm.prefill_s + tm.decode_s <= wall



def test_a_step_that_admits_rows_counts_its_wait_for_the_running_rows(engine, monkeypatch):
    """Every launch takes at least 30 ms (a sleep stands in for the device), so every token of a running row does,
    and the one that waited for an admitted prefill's launch too took two: a token's time is the wall time since the
    row's previous token, as its client sees it (vLLM's inter-token latency). Overlapped, timed from the prefill's
    read, their token took 0 s; step by step, timed from its own step's launch, it left the prefill out."""
    import time

    launch = Batch.launch

    def slow(self, inp):
        launched = launch(self, inp)
        time.sleep(0.03)
        return launched

    monkeypatch.setattr(Batch, "launch", slow)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    running, admitted = (engine.new_sequence(p, params, engine.compile("full")) for p in ([5, 6, 7], [8, 9]))
    batch = engine.new_batch(max_len=32, num_blocks=200)
    batch.add([running])
    batch.decode()
    batch.decode()
    batch.add([admitted])
    while batch.sequences:
        batch.decode()
        batch.filter()
    assert running.finished and len(running.timings.per_token_s) == 5
    assert min(running.timings.per_token_s) >= 0.03, running.timings.per_token_s
    assert max(running.timings.per_token_s) >= 0.06, running.timings.per_token_s  # the admission's stall
    tm = running.timings
    assert tm.decode_s == pytest.approx(sum(tm.per_token_s)) and tm.total_s == pytest.approx(tm.ttft_s + tm.decode_s)

# -- bounded memory ------------------------------------------------------------------------------------------------


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


@pytest.mark.slow
def test_distinct_hostile_schedules_leave_no_weight_copies_behind(smollm2_engine):
    """Parallel groups of non-adjacent layers used to be gathered into cached weight copies (up to 256 of them, each
    several layers of SmolLM2: gigabytes). Now each layer is applied from its own view: a stream of distinct such
    schedules keeps RSS flat."""
    import random

    rng = random.Random(0)

    def hostile() -> str:
        group = "+".join(map(str, sorted(rng.sample(range(30), 6))))
        return "schedule:" + ",".join([f"{group}/mean"] * 8)

    params = SamplingParams(max_tokens=2, ignore_eos=True)
    for _ in range(6):  # warm-up: allocator pools, plan cache entries
        smollm2_engine.generate(["Hello there"], policy=hostile(), params=params)
    before = _rss_mb()
    for _ in range(30):  # six-layer copies of SmolLM2 would add ~27 MB each
        smollm2_engine.generate(["Hello there"], policy=hostile(), params=params)
    assert _rss_mb() - before < 100, f"RSS grew from {before:.0f} MB to {_rss_mb():.0f} MB"


# -- prefix reuse ------------------------------------------------------------------------------------------------


def _run(engine, waves, *, prefix_caching):
    """Each wave: (prompt, policy, params) requests added together, decoded until done, before the next wave."""
    batch = engine.new_batch(max_len=64, num_blocks=800, block_size=4, prefix_caching=prefix_caching)
    results = []
    for wave in waves:
        seqs = [engine.new_sequence(p, params, engine.compile(policy)) for p, policy, params in wave]
        batch.add(seqs)
        while batch.filter() is not None and batch.sequences:
            batch.step()
        results += [s.result() for s in seqs]
    return results, batch


def test_prefix_reuse_gives_the_same_scores_and_tokens(tiny_engine):
    """Loglikelihood-style requests (echo + logprobs, max_tokens 0) sharing a context, in the same step and in later
    steps, and generations: identical answers with and without reuse, and reuse did happen."""
    context = [5, 9, 17, 33, 4, 8, 60, 7, 11, 12, 13]  # 2 full blocks of 4, and 3 tokens
    score = SamplingParams(max_tokens=0, echo=True, logprobs=2)
    gen = SamplingParams(max_tokens=5, ignore_eos=True, logprobs=1)
    waves = [
        [(context + [40, 41], "full", score), (context + [50], "full", score), (context + [60, 61, 62], "skip:2", score)],
        [(context + [70, 71], "full", score), (context + [40, 41], "pairs", score), (context[:8] + [1, 2], "full", gen)],
        [(context + [40, 41], "full", SamplingParams(max_tokens=0, echo=True, logprobs=3))],  # wants more top-n
        [(context + [80], "full", gen), (context + [80, 81, 82, 83, 84, 85], "full", score)],
        [(context + [40, 41], "full", SamplingParams(max_tokens=1, prompt_logprobs=1, logprobs=None))],  # vLLM's
    ]
    plain, _ = _run(tiny_engine, waves, prefix_caching=False)
    reused, batch = _run(tiny_engine, waves, prefix_caching=True)
    assert batch.reused_tokens >= 5 * 8, "the shared 8-token prefix was reused"
    for a, b in zip(plain, reused):
        assert a.token_ids == b.token_ids and a.prompt_token_ids == b.prompt_token_ids
        if a.prompt_logprobs is not None:
            assert a.prompt_logprobs[0] is None and b.prompt_logprobs[0] is None
            torch.testing.assert_close(torch.tensor(b.prompt_logprobs[1:]), torch.tensor(a.prompt_logprobs[1:]),
                                       rtol=1e-5, atol=1e-5)
            for ta, tb in zip(a.prompt_top_logprobs[1:], b.prompt_top_logprobs[1:]):
                assert list(ta) == list(tb)
            assert a.prompt_ranks == b.prompt_ranks
        torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs), rtol=1e-5, atol=1e-5)
    assert batch.kv_usage() == 0.0, "registered blocks that no one holds are not counted as used"


def test_a_cache_salt_shares_cached_prompt_blocks_only_with_the_same_salt(tiny_engine):
    """vLLM's cache_salt: a salted prompt reuses nothing an unsalted one or another salt cached, and reuses what its
    own salt cached, with the same answers as without reuse."""
    batch = tiny_engine.new_batch(max_len=64, num_blocks=800, block_size=4, prefix_caching=True)
    context = [5, 9, 17, 33, 4, 8, 60, 7, 11, 12, 13]  # 2 full blocks of 4, and 3 tokens
    gen = SamplingParams(max_tokens=3, ignore_eos=True, logprobs=1)
    reused, results = [], []
    for salt in (None, "tenant-a", "tenant-b", "tenant-a", None):
        seq = tiny_engine.new_sequence(context + [40], gen, tiny_engine.compile("full"))
        seq.cache_salt = salt
        before = batch.reused_tokens
        batch.add([seq])
        while batch.filter() is not None and batch.sequences:
            batch.step()
        reused.append(batch.reused_tokens - before)
        results.append(seq.result())
    assert reused == [0, 0, 0, 11, 11], "each salt (and no salt) reuses only its own blocks"
    assert all(r.token_ids == results[0].token_ids for r in results)


def test_prefix_reuse_shares_a_context_to_the_token_not_to_the_block(tiny_engine):
    """Blocks of 4: a 10-token context ends 2 tokens into its third block. A continuation computes from the
    context's last token (a generation) or the one before it (echo: its logprob comes from the cache), not from the
    block boundary at 8, and its answers equal a run without reuse."""
    context = [5, 9, 17, 33, 4, 8, 60, 7, 11, 12]
    score = SamplingParams(max_tokens=0, echo=True, logprobs=1)
    gen = SamplingParams(max_tokens=4, ignore_eos=True, logprobs=1)
    waves = [[(context + [40, 41], "full", score)], [(context + [50], "full", score)],
             [(context + [60, 61], "full", gen)], [(context[:3] + [70], "full", score)]]
    plain, _ = _run(tiny_engine, waves, prefix_caching=False)
    reused, batch = _run(tiny_engine, waves, prefix_caching=True)
    assert batch.reused_tokens == 9 + 10 + 2, "to the token: 9 (echo), 10, and 2 of a first block"
    for a, b in zip(plain, reused):
        assert a.token_ids == b.token_ids
        if a.prompt_logprobs is not None:
            torch.testing.assert_close(torch.tensor(b.prompt_logprobs[1:]), torch.tensor(a.prompt_logprobs[1:]),
                                       rtol=1e-5, atol=1e-5)
            assert [list(t) for t in a.prompt_top_logprobs[1:]] == [list(t) for t in b.prompt_top_logprobs[1:]]
            assert a.prompt_ranks == b.prompt_ranks
        torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs), rtol=1e-5, atol=1e-5)


# -- chunked prefill -----------------------------------------------------------------------------------------------


def _serve(engine, waves, *, prefill_tokens, prefix_caching=False, max_len=96):
    """Each wave: (prompt, policy, params) requests added together while the earlier ones decode; every request run
    to its end. Returns the results and the batch."""
    batch = engine.new_batch(max_len=max_len, num_blocks=1200, block_size=4, prefix_caching=prefix_caching,
                             prefill_tokens=prefill_tokens)
    seqs = []
    for wave in waves:
        new = [engine.new_sequence(p, params, engine.compile(policy)) for p, policy, params in wave]
        seqs += new
        batch.add(new)
        batch.step()  # the earlier ones decode while the new ones' prompts are computed
    while batch.filter() is not None and batch.busy:
        batch.step()
    return [s.result() for s in seqs], batch


def test_chunked_prefill_answers_what_whole_prompts_answer(engine):
    """Prompts computed a few tokens per step (budgets of 1, 5 and 16 prompt tokens per step, below and above the
    prompts' lengths), under mixed policies, beside rows already decoding, with and without prefix reuse: the same
    tokens and logprobs as whole prompts, and an echo request's prompt scores too (it is computed whole)."""
    gen = SamplingParams(max_tokens=6, ignore_eos=True, logprobs=2)
    drawn = SamplingParams(max_tokens=6, ignore_eos=True, temperature=0.9, seed=3, logprobs=1)
    long = list(range(5, 45))  # 40 tokens
    waves = [
        [(long[:7], "full", gen), (long, "skip:2", gen)],
        [(long + [50, 51], "full", drawn), (long[:30], "pairs", gen),
         (long[:12], "full", SamplingParams(max_tokens=2, echo=True, logprobs=1))],
        [(long, "full", gen), ([9, 8, 7], "parallel:1-4", gen)],
    ]
    for caching in (False, True):
        whole, _ = _serve(engine, waves, prefill_tokens=None, prefix_caching=caching)
        for budget in (1, 5, 16):
            pieced, batch = _serve(engine, waves, prefill_tokens=budget, prefix_caching=caching)
            assert not batch.pieces and batch.kv_usage() == 0.0
            for a, b in zip(whole, pieced):
                assert a.token_ids == b.token_ids, (caching, budget)
                torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs), rtol=1e-5, atol=1e-5)
                assert [list(t) for t in a.top_logprobs or []] == [list(t) for t in b.top_logprobs or []]
                if a.prompt_logprobs is not None:
                    torch.testing.assert_close(torch.tensor(b.prompt_logprobs[1:]),
                                               torch.tensor(a.prompt_logprobs[1:]), rtol=1e-5, atol=1e-5)


def test_a_long_prompt_is_computed_a_piece_per_step_while_others_decode(tiny_engine):
    """Budget 8: a 40-token prompt takes five `add`s (4 pieces of 8, then its last 8 tokens with its first token),
    and the row already decoding gets a token at each of those steps; a prompt admitted meanwhile waits behind it
    (oldest first)."""
    batch = tiny_engine.new_batch(max_len=96, num_blocks=400, block_size=4, prefill_tokens=8)
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    running = tiny_engine.new_sequence([5, 6, 7], params, tiny_engine.compile("full"))
    batch.add([running])
    batch.step()
    long = tiny_engine.new_sequence(list(range(5, 45)), params, tiny_engine.compile("full"))
    short = tiny_engine.new_sequence([9, 9, 9], params, tiny_engine.compile("full"))
    batch.add([long])
    made = [len(running.output_ids)]
    for step in range(4):
        assert batch.pieces[0].request is long and long not in batch.sequences
        assert batch.pieces[0].at == 8 * (step + 1)
        batch.decode()
        made.append(len(running.output_ids))
        if step == 0:
            batch.add([short])  # waits: the budget goes to the older prompt first
            assert [p.request for p in batch.pieces] == [long, short] and short.output_ids == []
        else:
            batch.add([])
    assert made == [2, 3, 4, 5, 6], "the decoding row got a token at every step"
    assert long in batch.sequences and len(long.output_ids) == 1 and long.timings.prefill_s > 0
    assert [p.request for p in batch.pieces] == [short]  # the budget's rest went to it (0 left after long's 8)


def test_a_prompt_pieced_then_finished_is_found_whole_by_the_prefix_cache(tiny_engine):
    batch = tiny_engine.new_batch(max_len=96, num_blocks=400, block_size=4, prefix_caching=True, prefill_tokens=6)
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    prompt = list(range(5, 35))
    for _ in range(2):
        before = batch.reused_tokens
        seq = tiny_engine.new_sequence(prompt, params, tiny_engine.compile("full"))
        batch.add([seq])
        while batch.filter() is not None and batch.busy:
            batch.step()
    assert batch.reused_tokens - before == len(prompt) - 1, "every block of the first, registered once it was whole"


def test_prompts_alike_share_a_pieced_prompt_through_the_prefix_cache(tiny_engine):
    """Four identical 60-token prompts added together (n = 4, or a burst with one system prompt), budget 16: the
    first is computed in pieces, the others wait for it and find it whole in the cache, as without chunking (each
    had computed all of it: prefix reuse found nothing registered until a piecewise prompt's end). One arriving
    while a prompt alike is half computed waits its turn, then finds what they share."""
    prompt = list(range(5, 65))
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    got = {}
    for budget in (None, 16):
        batch = tiny_engine.new_batch(max_len=96, num_blocks=800, block_size=4, prefix_caching=True,
                                      prefill_tokens=budget)
        seqs = [tiny_engine.new_sequence(prompt, params, tiny_engine.compile("full")) for _ in range(4)]
        batch.add(seqs)
        while batch.filter() is not None and batch.busy:
            batch.step()
        got[budget] = ([s.cached_tokens for s in seqs], batch.reused_tokens, [s.output_ids for s in seqs])
    assert got[16] == got[None] and got[16][0] == [0, 59, 59, 59]
    batch = tiny_engine.new_batch(max_len=96, num_blocks=800, block_size=4, prefix_caching=True, prefill_tokens=16)
    first = tiny_engine.new_sequence(list(range(5, 65)), params, tiny_engine.compile("full"))
    batch.add([first])
    batch.step()  # two pieces of 16 computed
    later = tiny_engine.new_sequence(list(range(5, 45)) + [99] * 20, params, tiny_engine.compile("full"))
    batch.add([later])
    assert batch.pieces[-1].reused is None  # not looked up while it waits
    while batch.filter() is not None and batch.busy:
        batch.step()
    assert later.cached_tokens == 40  # the 40 tokens it shares, all registered once the first was whole


def test_a_request_ended_while_its_prompt_is_pieced_leaves_nothing_behind(tiny_engine):
    batch = tiny_engine.new_batch(max_len=96, num_blocks=400, block_size=4, prefill_tokens=4)
    seq = tiny_engine.new_sequence(list(range(5, 45)), SamplingParams(max_tokens=4), tiny_engine.compile("full"))
    batch.add([seq])
    batch.step()
    assert batch.pieces and batch.kv.used_blocks > 0
    seq.set_finished("abort")
    assert batch.filter() == [seq]
    assert not batch.pieces and not batch.busy and batch.kv.used_blocks == 0
