"""Next-token choice: each row's own parameters and generator, every accepted value, row isolation, validation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from server.engine.sampling import (MAX_STOP_LENGTH, MAX_STOP_STRINGS, MIN_TEMPERATURE, SEED, TOP_K, SamplingError,
                             SamplingBatch, SamplingParams, alternatives, make_generator, process_logits, sample,
                             sample_batch, sample_isolated, unpack_bitmask)
from server.engine.sampling_params import MAX_BAD_WORD_SEQUENCES, MAX_BAD_WORD_TOKENS, StructuredOutput, bad_word_ids

CPU = torch.device("cpu")


def draws(logits, params, seed, n=300):
    g = make_generator(seed, torch.device("cpu"))
    return {int(sample(logits[None].clone(), [params], [g])[0]) for _ in range(n)}


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 0.0, 1.0]])
    gens = [make_generator(0, torch.device("cpu"))] * 2
    assert sample(logits, [SamplingParams()] * 2, gens).tolist() == [1, 0]


def test_top_k_limits_support():
    logits = torch.tensor([1.0, 0.9, 0.8, 0.7, 0.6, 0.5])
    assert draws(logits, SamplingParams(temperature=1.0, top_k=2), 0) == {0, 1}


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert draws(logits, SamplingParams(temperature=1.0, top_p=0.7), 1) == {0, 1}
    assert draws(logits, SamplingParams(temperature=1.0, top_p=0.4), 1) == {0}


def test_temperature_sampling_covers_the_distribution_and_seeds_repeat():
    logits = torch.zeros(5)
    assert draws(logits, SamplingParams(temperature=1.0), 2) == set(range(5))
    p = SamplingParams(temperature=1.0, seed=5)
    a = [int(sample(logits[None].clone(), [p], [g])[0]) for g in [make_generator(5, torch.device("cpu"))] for _ in range(20)]
    g = make_generator(5, torch.device("cpu"))
    b = [int(sample(logits[None].clone(), [p], [g])[0]) for _ in range(20)]
    assert a == b


@pytest.mark.parametrize("neighbour", [SamplingParams(), SamplingParams(temperature=1.0, top_p=0.9),
                                       SamplingParams(temperature=0.7, top_k=3), SamplingParams(temperature=1.0)],
                         ids=["greedy", "top-p", "top-k", "plain"])
@pytest.mark.parametrize("own", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, top_k=4),
                                 SamplingParams(temperature=1.0, top_p=0.8)], ids=["plain", "top-k", "top-p"])
def test_a_seeded_row_draws_the_same_token_alone_and_beside_any_neighbour(own, neighbour):
    """A batch in which some row filters used to invert every drawing row's distribution in sorted order: a seeded
    row drew another token beside a top-p neighbour than alone (17 of 20 seeds). The draw is in vocabulary order."""
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(0))
    for seed in range(20):
        alone = sample(logits[:1].clone(), [own], [make_generator(seed, CPU)])
        beside = sample(logits.clone(), [own, neighbour], [make_generator(seed, CPU), make_generator(99, CPU)])
        assert int(alone[0]) == int(beside[0]), seed


def test_banned_tokens_are_never_chosen_and_leave_the_logits_alone():
    """min_tokens' mask: a (row, token) pair is -inf for that row's choice, greedy or drawn, filtered or not; other
    rows and the caller's logits (which logprobs are computed from) are unchanged."""
    logits = torch.tensor([[9.0, 1.0, 0.5, 0.0], [9.0, 1.0, 0.5, 0.0], [9.0, 8.0, 0.0, 0.0]])
    before = logits.clone()
    rows = [SamplingParams(), SamplingParams(temperature=1.0, top_k=2), SamplingParams(temperature=1.0, top_p=0.5)]
    for seed in range(40):
        gens = [make_generator(seed, CPU) for _ in rows]
        batch = SamplingBatch.of(rows, gens, CPU, banned=[(0, 0), (1, 0), (2, 0), (2, 1)])
        tokens, alive, errors = sample_batch(logits, batch)
        assert tokens[0] == 1 and tokens[1] in (1, 2) and tokens[2] in (2, 3), seed
        assert alive.all() and not errors
    assert torch.equal(logits, before)
    plain = sample_batch(logits, SamplingBatch.of(rows[:1] * 3, [None] * 3, CPU))[0]
    assert plain.tolist() == [0, 0, 0]


@pytest.mark.parametrize("own", [SamplingParams(temperature=1.0, top_k=2),
                                 SamplingParams(temperature=1.0, top_k=2, top_p=0.8)], ids=["top_k", "then_top_p"])
def test_top_k_keeps_the_tokens_tied_with_its_last(own: SamplingParams):
    """As HF's TopKLogitsWarper: a token tied with the k-th logit stays, whatever the batch (keeping the batch's top
    `cap` by torch.topk dropped ties past it, alone but not beside a wider top_k). Top-p then measures the mass of
    what top-k keeps, ties included: [5, 3, 3, 3] has 0.71 on token 0, so top_p=0.8 keeps the next tokens too
    (sorting only the batch's `cap` left the ties out of that mass: alone the row saw [5, 3], 0.88 on token 0, and
    drew token 0 only)."""
    logits = torch.tensor([5.0, 3.0, 3.0, 3.0, 0.0, 0.0])
    assert draws(logits, own, 0, n=600) == {0, 1, 2, 3}
    wide = SamplingParams(temperature=1.0, top_k=4)
    for seed in range(30):
        alone = sample(logits[None].clone(), [own], [make_generator(seed, CPU)])
        beside = sample(torch.stack([logits, logits]), [own, wide], [make_generator(seed, CPU), make_generator(1, CPU)])
        assert int(alone[0]) == int(beside[0]), seed


# -- logit processors: allowed tokens, logit bias, penalties, min-p ---------------------------------------------------


def processed(logits: torch.Tensor, params: list[SamplingParams], **history) -> torch.Tensor:
    """What greedy choice and temperature see (a copy: `logits` itself must stay as it was)."""
    before = logits.clone()
    out = process_logits(logits, SamplingBatch.of(params, [None] * len(params), CPU, **history))
    assert torch.equal(logits, before), "the caller's logits (logprobs come from them) are unchanged"
    return out


def test_allowed_token_ids_leave_every_other_token_out_of_its_own_row():
    logits = torch.tensor([[9.0, 1.0, 0.5, 0.0], [9.0, 1.0, 0.5, 0.0]])
    own = SamplingParams(allowed_token_ids=(2, 3))
    got = processed(logits, [own, SamplingParams()])
    assert got.tolist() == [[-INF, -INF, 0.5, 0.0], [9.0, 1.0, 0.5, 0.0]]
    assert sample(logits, [own, SamplingParams()], [None, None]).tolist() == [2, 0]
    assert draws(logits[0], SamplingParams(temperature=1.0, allowed_token_ids=(1, 3)), 0, n=200) == {1, 3}


def test_top_from_allowed_ranks_a_rows_alternatives_among_its_allowed_tokens_only():
    """A beam search's candidates: the row that asks ranks only its allowed tokens (their logprobs as they are); a
    row limited the same way that does not ask, and a free row, rank every token (vLLM's raw top logprobs)."""
    logprobs = torch.log_softmax(torch.tensor([[9.0, 1.0, 0.5, 0.0]] * 3), -1)
    rows = [SamplingParams(allowed_token_ids=(2, 3), top_from_allowed=True), SamplingParams(allowed_token_ids=(2, 3)),
            SamplingParams()]
    batch = SamplingBatch.of(rows, [None] * 3, CPU)
    got = alternatives(logprobs, batch)
    assert got[0].tolist() == [-INF, -INF, *logprobs[0, 2:].tolist()]
    assert torch.equal(got[1:], logprobs[1:])
    assert SamplingBatch.of(rows[1:], [None] * 2, CPU).top_from_allowed is None  # nobody asks: nothing to mask


def test_top_from_allowed_ranks_a_structured_rows_alternatives_among_its_grammars_tokens_only():
    """A structured beam's candidates: the structured rows that ask rank only what their grammar's mask allows (and
    their allowed_token_ids, where they have a list too: both limit them); a structured row that does not ask ranks
    every token, as does a row the grammar batch does not hold."""
    V = 40
    logprobs = torch.log_softmax(torch.arange(4 * V, dtype=torch.float32).view(4, V) % 7, -1)
    mask = torch.zeros(3, 2, dtype=torch.int32)
    for t in (1, 5, 33):
        mask[:, t // 32] |= 1 << (t % 32)
    json = StructuredOutput("json_object")
    rows = [SamplingParams(structured=json, top_from_allowed=True), SamplingParams(structured=json),
            SamplingParams(structured=json, allowed_token_ids=(5, 33, 34), top_from_allowed=True),
            SamplingParams(allowed_token_ids=(1, 2), top_from_allowed=True)]
    got = alternatives(logprobs, SamplingBatch.of(rows, [None] * 4, CPU, grammar=([0, 1, 2], mask)))
    kept = [[t for t in range(V) if got[b, t] > -INF] for b in range(4)]
    assert kept == [[1, 5, 33], list(range(V)), [5, 33], [1, 2]]
    assert all(torch.equal(got[b, kept[b]], logprobs[b, kept[b]]) for b in range(4))  # as they are: not renormalized


def test_a_grammar_mask_leaves_out_what_its_row_may_not_choose_and_no_other_row():
    """xgrammar's bitmask (bit t % 32 of word t // 32: token t allowed) over 40 tokens, for row 1 of 3: its other
    tokens are -inf, whatever allowed_token_ids allow (the two intersect) and however logit_bias raises them (a bias
    added to -inf stays -inf); rows 0 and 2 are untouched."""
    V = 40
    logits = torch.arange(3 * V, dtype=torch.float32).view(3, V)
    allowed = [0, 5, 31, 32, 39]
    mask = torch.zeros(1, 2, dtype=torch.int32)
    for t in allowed:
        mask[0, t // 32] |= 1 << (t % 32)
    mask[0, 0] |= torch.tensor(-2**31, dtype=torch.int32)  # bit 31 is the sign bit: token 31, twice set is set
    batch = SamplingBatch.of([SamplingParams(), SamplingParams(allowed_token_ids=(5, 6, 31, 32), logit_bias=((6, 50.0), (5, 30.0))),
                              SamplingParams()], [None] * 3, CPU, grammar=([1], mask))
    before = logits.clone()
    got = process_logits(logits, batch)
    assert torch.equal(logits, before)
    want = torch.full((V,), -INF)
    want[[5, 31, 32]] = logits[1, [5, 31, 32]] + torch.tensor([30.0, 0.0, 0.0])
    assert got[1].tolist() == want.tolist() and torch.equal(got[[0, 2]], logits[[0, 2]])
    assert sample_batch(logits, batch)[0].tolist() == [V - 1, 5, V - 1]


def test_unpack_bitmask_reads_xgrammars_layout():
    """The mask as xgrammar's own kernel applies it, on random bits over a vocabulary that is no multiple of 32."""
    import xgrammar as xgr

    V = 100
    mask = torch.randint(-2**31, 2**31 - 1, (4, 4), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    logits = torch.zeros(4, V)
    xgr.apply_token_bitmask_inplace(logits, mask, vocab_size=V)
    assert torch.equal(unpack_bitmask(mask, V), logits == 0)


def test_logit_bias_adds_to_its_own_rows_logits():
    logits = torch.tensor([[3.0, 1.0, 0.5, 0.0], [3.0, 1.0, 0.5, 0.0]])
    own = SamplingParams(logit_bias=((0, -100.0), (2, 2.75), (2, 2.25)))  # a token given twice: the last
    got = processed(logits, [own, SamplingParams()])
    assert got.tolist() == [[-97.0, 1.0, 2.75, 0.0], [3.0, 1.0, 0.5, 0.0]]
    assert sample(logits, [own, SamplingParams()], [None, None]).tolist() == [2, 0]
    # beside the allowed ones and a banned token (min_tokens' mask), as vLLM applies them all to the raw logits
    both = SamplingBatch.of([SamplingParams(allowed_token_ids=(0, 1), logit_bias=((1, 3.0), (3, 9.0)))], [None], CPU,
                            banned=[(0, 0)])
    assert process_logits(logits[:1], both).tolist() == [[-INF, 4.0, -INF, -INF]]


def test_penalties_arithmetic_as_vllm():
    """Output tokens [4, 1, 1] (the last 1 still on the device, in flight), prompt [2, 3]: repetition divides a seen
    token's positive logit and multiplies its negative one (CTRL's rule, prompt and output); frequency subtracts per
    occurrence in the output, presence once; unseen tokens and the neighbour row are untouched."""
    logits = torch.tensor([[2.0, 3.0, -1.0, 0.0, -2.0, 1.0], [2.0, 3.0, -1.0, 0.0, -2.0, 1.0]])
    history = dict(prompts=[torch.tensor([2, 3])] * 2, outputs=[[4, 1]] * 2, recent=torch.tensor([1, 1]))
    one = processed(logits, [SamplingParams(repetition_penalty=2.0), SamplingParams()], **history)
    assert one.tolist() == [[2.0, 1.5, -2.0, 0.0, -4.0, 1.0], logits[1].tolist()]
    freq = processed(logits[:1], [SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)], **{
        k: v[:1] for k, v in history.items()})
    assert freq.tolist() == [[2.0, 3.0 - 1.0 - 0.25, -1.0, 0.0, -2.0 - 0.5 - 0.25, 1.0]]  # the prompt is not counted
    every = processed(logits[:1], [SamplingParams(repetition_penalty=2.0, frequency_penalty=-0.5,
                                                  presence_penalty=1.0)], **{k: v[:1] for k, v in history.items()})
    assert every.tolist() == [[2.0, 1.5 + 1.0 - 1.0, -2.0, 0.0, -4.0 + 0.5 - 1.0, 1.0]]
    # after the logit bias: (1 + 3) / 2, not 1 / 2 + 3
    biased = processed(logits[:1, :4], [SamplingParams(repetition_penalty=2.0, logit_bias=((3, 3.0),))],
                       prompts=[torch.tensor([3])], outputs=[[]])
    assert biased.tolist() == [[2.0, 3.0, -1.0, 1.5]]


def test_tgi_frequency_penalty_counts_the_share_of_the_whole_sequence():
    """TGI's frequency_penalty: penalty x count / length over prompt and output (4 tokens here, one in flight)."""
    logits = torch.zeros(1, 4)
    got = processed(logits, [SamplingParams(frequency_penalty=1.0, frequency_of="sequence")],
                    prompts=[torch.tensor([1, 1])], outputs=[[2]], recent=torch.tensor([1]))
    assert got.tolist() == [[0.0, -0.75, -0.25, 0.0]]


def test_the_neutral_values_carry_no_tensors():
    """A batch in which no row asks for a processor takes the plain path: no tensor for any of them (histories
    handed in or not)."""
    rows = [SamplingParams(), SamplingParams(temperature=1.0, top_p=0.5, min_p=0.0, repetition_penalty=1.0,
                                             typical_p=1.0)]
    batch = SamplingBatch.of(rows, [None, None], CPU, prompts=[torch.tensor([1])] * 2, outputs=[[2], [2]],
                             recent=torch.tensor([3, 3]))
    assert (batch.allowed, batch.bias, batch.bias_at, batch.bad_words, batch.penalties, batch.min_p,
            batch.typical_p) == (None,) * 7
    logits = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert process_logits(logits, batch) is logits
    greedy_min_p = SamplingBatch.of([SamplingParams(min_p=0.5)], [None], CPU)
    assert greedy_min_p.min_p is None  # a greedy row's choice is the most likely token whatever min_p keeps


def test_min_p_keeps_what_is_at_least_min_p_times_the_most_likely_after_temperature():
    """[0.5, 0.26, 0.14, 0.1]: min_p 0.5 keeps 0.25 and above, min_p 0.25 keeps 0.125 and above; at temperature 2 the
    ratios are the square roots (0.72, 0.53, 0.45), so min_p 0.5 keeps three."""
    logits = torch.tensor([0.5, 0.26, 0.14, 0.1]).log()
    assert draws(logits, SamplingParams(temperature=1.0, min_p=0.5), 0) == {0, 1}
    assert draws(logits, SamplingParams(temperature=1.0, min_p=0.25), 0) == {0, 1, 2}
    assert draws(logits, SamplingParams(temperature=2.0, min_p=0.5), 0) == {0, 1, 2}
    assert draws(logits, SamplingParams(temperature=1.0, min_p=1.0), 0) == {0}
    # with top-k and top-p: each filter cuts what the others left (top-p's mass over min-p's survivors)
    assert draws(logits, SamplingParams(temperature=2.0, min_p=0.5, top_k=2), 0) == {0, 1}
    assert draws(logits, SamplingParams(temperature=1.0, min_p=0.25, top_p=0.6), 0) == {0, 1}
    # a neighbour without min-p is not cut
    for seed in range(20):
        plain = SamplingParams(temperature=1.0)
        alone = sample(logits[None], [plain], [make_generator(seed, CPU)])
        beside = sample(torch.stack([logits, logits]), [SamplingParams(temperature=1.0, min_p=1.0), plain],
                        [make_generator(0, CPU), make_generator(seed, CPU)])
        assert int(alone[0]) == int(beside[1]), seed


def test_typical_p_keeps_what_transformers_typical_warper_keeps():
    """TGI's typical_p: on random rows (some tokens already filtered to -inf), after temperature, the tokens left are
    exactly those transformers' TypicalLogitsWarper leaves, at every mass; a mass of 1 leaves them all."""
    from transformers import TypicalLogitsWarper

    from server.engine.sampling import _typical

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 50, generator=g) * 3
    x[1, 10:30] = -INF
    x[4] = torch.linspace(0, -12, 50)
    for mass in (0.05, 0.2, 0.5, 0.9, 0.99):
        hf = TypicalLogitsWarper(mass=mass)(torch.zeros(6, 1, dtype=torch.long), x.clone())
        ours = _typical(x, torch.full((6,), mass))
        assert torch.equal(ours, hf == -INF), mass
    assert not _typical(x, torch.ones(6)).any()


def test_typical_p_draws_from_the_typical_set_renormalised_and_leaves_its_neighbour_alone():
    """Draws follow the softmax over the tokens typical decoding keeps ([0.5, 0.26, 0.14, 0.1] at mass 0.5: the
    entropy is 1.20 nats, the surprises 0.69, 1.35, 1.97, 2.30, so 1 then 0 are kept); a neighbour without it is not
    cut, and typical_p alone makes a row draw (it is not greedy)."""
    p = torch.tensor([0.5, 0.26, 0.14, 0.1])
    g = make_generator(5, CPU)
    params = SamplingParams(temperature=1.0, typical_p=0.5)
    counts = torch.bincount(torch.stack([sample(p.log()[None], [params], [g])[0] for _ in range(3000)]), minlength=4)
    assert counts[2] == counts[3] == 0
    assert torch.allclose(counts[:2] / 3000, torch.tensor([0.5, 0.26]) / 0.76, atol=0.04), counts
    for seed in range(20):
        plain = SamplingParams(temperature=1.0)
        alone = sample(p.log()[None], [plain], [make_generator(seed, CPU)])
        beside = sample(torch.stack([p.log(), p.log()]), [SamplingParams(temperature=1.0, typical_p=0.01), plain],
                        [make_generator(0, CPU), make_generator(seed, CPU)])
        assert int(alone[0]) == int(beside[1]), seed
    with pytest.raises(SamplingError, match="typical_p"):
        SamplingParams(typical_p=0.0).check()


# -- bad words (vLLM's bad_words) -------------------------------------------------------------------------------------


def vllm_bad_words(logits: torch.Tensor, words: tuple[tuple[int, ...], ...], past: list[int]) -> torch.Tensor:
    """vLLM v1's `_apply_bad_words_single_batch` (vllm/v1/sample/ops/bad_words.py), on one row's copy: a word longer
    than the output + 1 is skipped; otherwise its last token is -inf where the output ends with its other tokens."""
    logits = logits.clone()
    for word in words:
        if len(word) > len(past) + 1:
            continue
        prefix = list(word[:-1])
        if (past[-len(prefix):] if prefix else []) == prefix:
            logits[word[-1]] = -INF
    return logits


def test_bad_words_mask_the_end_of_a_word_the_output_ends_in():
    """Row 0's words: (4,) always; (1, 2, 3) where the output ends [1, 2]; (0, 3) where it ends [0]. Its output is
    [5, 1] on the host and its latest token on the device (in flight). Row 1 has no words and is untouched; a word
    longer than the output made so far is not matched in the prompt."""
    logits = torch.arange(12, dtype=torch.float32).view(2, 6)
    words = SamplingParams(bad_words_ids=((4,), (1, 2, 3), (0, 3)))
    rows = [words, SamplingParams()]

    def masked(recent: list[int], output: list[int] = [5, 1]) -> list[int]:
        got = processed(logits, rows, outputs=[output, [7, 7]], recent=torch.tensor(recent))
        assert torch.equal(got[1], logits[1])
        return [t for t in range(6) if got[0, t] == -INF]

    assert masked([2, 9]) == [3, 4]  # [.., 1, 2]: the end of (1, 2, 3)
    assert masked([0, 9]) == [3, 4]  # [.., 0]: (0, 3)
    assert masked([5, 2]) == [4]  # a neighbour's latest token is not this row's
    assert masked([2, 9], output=[]) == [4]  # [2] alone: (1, 2, 3) needs two tokens made, the prompt is not read
    host = processed(logits, rows, outputs=[[5, 1, 2], []])  # every token on the host (no step in flight)
    assert [t for t in range(6) if host[0, t] == -INF] == [3, 4]
    first = processed(logits, rows)  # a prefill: no output yet, one-token words only
    assert [t for t in range(6) if first[0, t] == -INF] == [4]


@settings(max_examples=300, deadline=None)
@given(words=st.lists(st.lists(st.integers(0, 4), min_size=1, max_size=3).map(tuple), min_size=1, max_size=4),
       past=st.lists(st.integers(0, 4), max_size=5), in_flight=st.booleans())
def test_bad_words_equal_vllms_rule(words, past, in_flight):
    """Any words over 5 tokens (two ending in one token, repeats) and any output, its last token on the host or in
    flight: the masked logits are vLLM's."""
    logits = torch.randn(2, 5, generator=torch.Generator().manual_seed(len(past)))
    want = vllm_bad_words(logits[0], tuple(words), past)
    split = in_flight and bool(past)
    history = dict(outputs=[past[:-1], []], recent=torch.tensor([past[-1], 0])) if split else dict(outputs=[past, []])
    got = processed(logits, [SamplingParams(bad_words_ids=tuple(words)), SamplingParams()], **history)
    assert torch.equal(got[0], want) and torch.equal(got[1], logits[1])


def test_bad_words_encode_as_vllm():
    """vLLM's update_from_tokenizer: each word stripped of leading spaces, encoded alone and after a space; the second
    form kept where it is another sequence of the same length (a word-start token, as byte-level BPE's 'Ġ' ones)."""
    vocab = {"Rome": [10], " Rome": [11], "capital of": [12, 13], " capital of": [14, 13], "xy": [15, 16],
             " xy": [17], "ab": [18], " ab": [18], " ": [19], "": []}
    encode = vocab.__getitem__
    assert bad_word_ids(("Rome", "  capital of", "xy", "ab"), encode) == ((10,), (11,), (12, 13), (14, 13), (15, 16),
                                                                          (18,))
    with pytest.raises(SamplingError, match="'   ' encodes to no token"):
        bad_word_ids(("   ",), encode)
    many = {f"w{i}": [i] for i in range(129)} | {f" w{i}": [] for i in range(129)}
    with pytest.raises(SamplingError, match=f"129 token sequences.*at most {MAX_BAD_WORD_SEQUENCES}"):
        bad_word_ids(tuple(f"w{i}" for i in range(129)), many.__getitem__)
    long = {"w": list(range(MAX_BAD_WORD_TOKENS + 1)), " w": []}
    with pytest.raises(SamplingError, match=f"1025 tokens in all; at most {MAX_BAD_WORD_TOKENS}"):
        bad_word_ids(("w",), long.__getitem__)
    params = SamplingParams(bad_words=("Rome", "Rome", "ab"))  # repeats dropped, as vLLM's
    assert params.bad_words == ("Rome", "ab")
    assert params.with_bad_words_ids(encode).bad_words_ids == ((10,), (11,), (18,))
    assert SamplingParams().with_bad_words_ids(encode).bad_words_ids is None  # no words: nothing encoded
    with pytest.raises(SamplingError, match=r"bad_words: token ids \[200\] are outside the vocabulary 0-127"):
        SamplingParams(bad_words=("w",), bad_words_ids=((3, 200),)).check_model(128, frozenset())


@pytest.mark.parametrize("overlap", [False, True], ids=["stepwise", "overlapped"])
def test_bad_words_rows_in_a_batch_equal_their_solo_runs(tiny_engine, overlapped_engine, overlap):
    """Rows with a three-token word, a one-token word, both with a repetition penalty, and plain neighbours, decoded
    together (some joining while a step is in flight): each row's tokens are those it gets alone (step by step), its
    words never end in its output, and it differs from its plain run (the words were there to be masked)."""
    engine = overlapped_engine if overlap else tiny_engine
    prompt = [5, 6, 7]
    plain = tiny_engine.generate([prompt], params=SamplingParams(max_tokens=16, ignore_eos=True))[0].token_ids
    three, one = tuple(plain[4:7]), (plain[2],)
    rows = [SamplingParams(max_tokens=16, ignore_eos=True, bad_words_ids=(three,)),
            SamplingParams(max_tokens=16, ignore_eos=True),
            SamplingParams(max_tokens=16, ignore_eos=True, bad_words_ids=(one, three), repetition_penalty=1.3),
            SamplingParams(max_tokens=16, ignore_eos=True, temperature=1.0, seed=3, bad_words_ids=(three,)),
            SamplingParams(max_tokens=16, ignore_eos=True, temperature=1.0, seed=4)]
    alone = [tiny_engine.generate([prompt], params=p)[0].token_ids for p in rows]
    seqs = [engine.new_sequence(prompt, p, engine.compile("full")) for p in rows]
    batch = engine.new_batch(max_len=32, num_blocks=64)
    batch.add(seqs[:2])
    batch.step()
    batch.add(seqs[2:])
    while batch.filter() is not None and batch.sequences:
        batch.step()
    assert [s.result().token_ids for s in seqs] == alone
    ngrams = lambda ids, n: {tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)}  # noqa: E731
    assert three not in ngrams(alone[0], 3) | ngrams(alone[2], 3) | ngrams(alone[3], 3)
    assert one[0] not in alone[2] and alone[0] != plain and alone[1] == plain


def test_penalties_read_each_requests_own_prompt_copied_once(tiny_engine):
    """The penalties' prompts stay on the device for as long as their request runs (`PromptCache`): requests with
    other prompts, joining and leaving, each read their own (their tokens equal their solo runs, and differ from an
    unpenalized run), only the rows that read a prompt hold one, the same tensor from step to step, and none is
    left once they have all left, by finishing or by being removed."""
    rows = [([5, 9, 17, 5, 9, 17], SamplingParams(max_tokens=12, ignore_eos=True, repetition_penalty=1.5)),
            ([30, 31, 30, 31], SamplingParams(max_tokens=6, ignore_eos=True, repetition_penalty=2.0)),
            ([5, 9, 17, 5, 9, 17], SamplingParams(max_tokens=12, ignore_eos=True, frequency_penalty=1.0,
                                                   frequency_of="sequence")),
            ([40, 41], SamplingParams(max_tokens=12, ignore_eos=True, presence_penalty=1.0))]
    alone = [tiny_engine.generate([p], params=params)[0].token_ids for p, params in rows]
    unpenalized = tiny_engine.generate([rows[0][0]], params=SamplingParams(max_tokens=12, ignore_eos=True))[0]
    assert alone[0] != unpenalized.token_ids
    seqs = [tiny_engine.new_sequence(p, params, tiny_engine.compile("full")) for p, params in rows]
    batch = tiny_engine.new_batch(max_len=32, num_blocks=64)
    batch.add(seqs[1:])
    batch.step()
    held = batch.prompts.get(seqs[1].id, ())
    assert len(batch.prompts) == 2 and held.tolist() == rows[1][0]  # not the presence row: it reads no prompt
    batch.add(seqs[:1])
    while batch.filter() is not None and batch.sequences:
        batch.step()
        if not seqs[1].finished:
            assert batch.prompts.get(seqs[1].id, ()) is held
    assert [s.result().token_ids for s in seqs] == alone and len(batch.prompts) == 0
    gone = tiny_engine.new_sequence(rows[0][0], rows[0][1], tiny_engine.compile("full"))
    batch.add([gone])
    batch.step()
    assert len(batch.prompts) == 1
    batch.remove(gone.id)
    assert len(batch.prompts) == 0


# -- every accepted value samples ------------------------------------------------------------------------------------

INF = float("inf")
HUGE = torch.finfo(torch.float32).max
LOGITS = torch.tensor([1.0, 3.0, -INF, 2.0, 0.5])  # argmax 1; token 2 can never be drawn


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, top_p=5e-324),  # rounds to 0 in float32
    SamplingParams(temperature=1.0, top_p=1e-9),
    SamplingParams(temperature=1e-300),  # 1/t overflows float32
    SamplingParams(temperature=1e-6),  # below MIN_TEMPERATURE: greedy
    SamplingParams(temperature=1.0, top_k=1),
], ids=["top_p=5e-324", "top_p=1e-9", "temperature=1e-300", "temperature=1e-6", "top_k=1"])
def test_degenerate_parameters_choose_the_argmax(params):
    assert draws(LOGITS, params, 0, n=50) == {1}


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0, top_k=TOP_K.hi), SamplingParams(temperature=100.0),
                                    SamplingParams(temperature=MIN_TEMPERATURE, top_p=0.5, top_k=3)])
def test_huge_top_k_and_extreme_temperatures_draw_valid_tokens(params):
    got = draws(LOGITS, params, 0, n=200)
    assert got and got <= {0, 1, 3, 4}


def test_huge_logits_at_the_lowest_sampled_temperature():
    logits = torch.tensor([HUGE, -HUGE, 0.0, HUGE])  # divided by 1e-5 they would overflow to inf
    assert draws(logits, SamplingParams(temperature=MIN_TEMPERATURE), 0, n=100) == {0, 3}


def test_infinite_and_nan_logits():
    logits = torch.tensor([INF, 0.0, INF, float("nan")])
    assert draws(logits, SamplingParams(temperature=1.0), 0) == {0, 2}  # +inf logits share the draw
    assert draws(torch.tensor([float("nan"), 1.0, 2.0]), SamplingParams(temperature=1.0), 0) == {1, 2}
    assert sample(torch.tensor([[float("nan"), 1.0, 2.0]]), [SamplingParams()], [make_generator(0, CPU)]).item() == 2


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_sampling_follows_the_softmax_of_the_tempered_logits(temperature):
    """p_i^(1/t), normalised: at 0.5 [0.78, 0.20, 0.02], at 2 [0.47, 0.33, 0.19] (each 0.1 or more from 1.0's)."""
    p = torch.tensor([0.6, 0.3, 0.1])
    want = p ** (1 / temperature) / (p ** (1 / temperature)).sum()
    g = make_generator(3, CPU)
    counts = torch.bincount(torch.stack([sample(p.log()[None], [SamplingParams(temperature=temperature)], [g])[0]
                                         for _ in range(3000)]), minlength=3)
    assert torch.allclose(counts / 3000, want, atol=0.04), counts


def finite_logit_rows(max_vocab: int = 64) -> st.SearchStrategy[list[float]]:
    """Rows of float32 logits: huge magnitudes, subnormals, -inf entries; at least one finite entry."""
    finite = st.one_of(st.sampled_from([HUGE, -HUGE]), st.floats(width=32, allow_nan=False, allow_infinity=False))
    entry = st.one_of(finite, st.just(-INF))
    return st.tuples(st.lists(entry, max_size=max_vocab - 1), finite, st.integers(0, max_vocab)).map(
        lambda t: t[0][:t[2]] + [t[1]] + t[0][t[2]:])


accepted_params = st.builds(
    SamplingParams,
    temperature=st.one_of(st.sampled_from([0.0, 5e-324, 1e-300, 1e-6, MIN_TEMPERATURE, 1.0, 100.0]),
                          st.floats(0, 100)),
    top_p=st.one_of(st.sampled_from([5e-324, 1e-9, 0.5, 1.0]), st.floats(0, 1, exclude_min=True)),
    top_k=st.one_of(st.sampled_from([0, 1, 2, TOP_K.hi]), st.integers(0, TOP_K.hi)),
    seed=st.integers(SEED.lo, SEED.hi),
    min_p=st.one_of(st.sampled_from([0.0, 5e-324, 1.0]), st.floats(0, 1)),
    typical_p=st.one_of(st.sampled_from([5e-324, 1e-9, 0.5, 1.0]), st.floats(0, 1, exclude_min=True)),
)


@settings(max_examples=300, deadline=None)
@given(rows=st.lists(finite_logit_rows(), min_size=1, max_size=4), data=st.data())
def test_any_accepted_params_on_any_finite_row_draw_a_finite_logit(rows, data):
    vocab = max(len(r) for r in rows)
    logits = torch.tensor([r + [-INF] * (vocab - len(r)) for r in rows])
    params = [data.draw(accepted_params) for _ in rows]
    tokens, errors = sample_isolated(logits, params, [make_generator(p.seed, CPU) for p in params])
    assert errors == {}
    for b, (t, p) in enumerate(zip(tokens.tolist(), params)):
        assert torch.isfinite(logits[b, t]), (b, t, logits[b])
        if p.greedy:
            assert t == int(logits[b].argmax())


# -- isolation -------------------------------------------------------------------------------------------------------


def test_a_failing_row_does_not_fail_the_others():
    logits = torch.tensor([[0.0, 1.0, 2.0], [-INF, -INF, -INF], [1.0, 1.0, 1.0], [float("nan")] * 3])
    params = [SamplingParams(temperature=1.0, seed=7)] * 4
    gens = [make_generator(7, CPU), make_generator(7, CPU), object(), make_generator(7, CPU)]  # row 2: not a generator
    tokens, errors = sample_isolated(logits, params, gens)  # type: ignore[arg-type]
    assert sorted(errors) == [1, 2, 3]
    assert "finite" in str(errors[1]) and "finite" in str(errors[3]) and isinstance(errors[2], TypeError)
    assert tokens[0] == sample(logits[:1], params[:1], [make_generator(7, CPU)])[0]
    with pytest.raises(ValueError, match="finite"):
        sample(logits[:2], params[:2], [make_generator(7, CPU)] * 2)


# -- validation ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad,says", [
    (dict(temperature=float("nan")), "[0, 100]"), (dict(temperature=INF), "[0, 100]"),
    (dict(temperature=101), "[0, 100]"), (dict(temperature=-1e-9), "[0, 100]"),
    (dict(top_p=0.0), "(0, 1]"), (dict(top_p=float("nan")), "(0, 1]"), (dict(top_p=1.0000001), "(0, 1]"),
    (dict(top_k=TOP_K.hi + 1), "[0, 1000000]"), (dict(top_k=-1), "[0, 1000000]"), (dict(top_k=2.5), "integer"),
    (dict(seed=-1), "[0, 9223372036854775807]"), (dict(seed=2**63), "[0, 9223372036854775807]"),
    (dict(logprobs=21), "[0, 20]"), (dict(max_tokens=-1), ">= 0"),
    (dict(stop=("a",) * 17), "at most 16"), (dict(stop=("a" * 257,)), "1-256"), (dict(stop=("",)), "1-256"),
    (dict(presence_penalty=2.5), "[-2, 2]"), (dict(frequency_penalty=-2.01), "[-2, 2]"),
    (dict(repetition_penalty=0.0), "(0, inf)"), (dict(repetition_penalty=float("nan")), "(0, inf)"),
    (dict(min_p=1.5), "[0, 1]"), (dict(min_p=-0.1), "[0, 1]"),
    (dict(logit_bias=((5, 100.5),)), "[-100, 100]"), (dict(logit_bias=tuple((i, 1.0) for i in range(301))), "300"),
    (dict(logit_bias=((-1, 1.0),)), ">= 0"), (dict(allowed_token_ids=()), "at least one"),
    (dict(allowed_token_ids=(3, -1)), ">= 0"),
    (dict(bad_words=("",)), "1-256"), (dict(bad_words=("w" * 257,)), "1-256"),
    (dict(bad_words=tuple(f"w{i}" for i in range(129))), "at most 128 words"),
])
def test_out_of_range_params_name_the_range(bad, says):
    with pytest.raises(SamplingError) as e:
        SamplingParams(**bad)
    assert says in str(e.value) and next(iter(bad)) in str(e.value)


def test_the_bounds_themselves_are_accepted():
    SamplingParams(temperature=100.0, top_p=5e-324, top_k=TOP_K.hi, seed=2**63 - 1, logprobs=20,
                   stop=("s" * MAX_STOP_LENGTH,) * MAX_STOP_STRINGS)
    SamplingParams(presence_penalty=-2.0, frequency_penalty=2.0, repetition_penalty=2.0, min_p=1.0,
                   logit_bias=tuple((i, 100.0 if i % 2 else -100.0) for i in range(300)), allowed_token_ids=(0,))


def test_what_needs_the_model_is_checked_against_it():
    """Token ids outside the vocabulary are named; allowed_token_ids that are all stop tokens under min_tokens
    would leave nothing to choose (every logit -inf: a failed request)."""
    eos = frozenset({2})
    SamplingParams(logit_bias=((127, 1.0),), allowed_token_ids=(0, 127)).check_model(128, eos)
    for bad, name in ((dict(logit_bias=((128, 1.0),)), "logit_bias"), (dict(allowed_token_ids=(5, 128)),
                                                                        "allowed_token_ids")):
        with pytest.raises(SamplingError, match=rf"{name}: token ids \[128\] are outside the vocabulary 0-127"):
            SamplingParams(**bad).check_model(128, eos)
    for only_stops in (SamplingParams(allowed_token_ids=(2,), min_tokens=3),
                       SamplingParams(allowed_token_ids=(2, 7), min_tokens=3, stop_token_ids=(7,)),
                       SamplingParams(allowed_token_ids=(7,), min_tokens=3, stop_token_ids=(7,), ignore_eos=True)):
        with pytest.raises(SamplingError, match=r"only stop tokens, which min_tokens \(3\)"):
            only_stops.check_model(128, eos)
    SamplingParams(allowed_token_ids=(2,), min_tokens=3, ignore_eos=True).check_model(128, eos)
    SamplingParams(allowed_token_ids=(2, 5), min_tokens=3).check_model(128, eos)
    SamplingParams(allowed_token_ids=(2,)).check_model(128, eos)


@pytest.mark.parametrize("V", [1000, 2048, 49152, 49153, 50000])
def test_blocked_argmax_is_argmax(V):
    """The CPU's greedy token (numpy's vectorised argmax) is torch's first maximum, ties and infinities included."""
    from server.engine.sampling import argmax

    x = torch.randn(8, V, generator=torch.Generator().manual_seed(V))
    x[1] = 0.0  # every token ties: index 0
    x[2, -1] = 100.0  # the maximum in the tail
    x[3, 5], x[3, V - 3] = 50.0, 50.0  # a tie across blocks: the first
    x[4] = float("-inf")
    x[5, V // 2], x[5, 7] = float("inf"), float("inf")
    assert torch.equal(argmax(x), x.argmax(-1))


@pytest.mark.parametrize("V", [1000, 49152, 49153])
def test_greedy_never_chooses_nan(V):
    """A NaN anywhere (beside the maximum, last, a whole row) is never the greedy token, and the logits handed on to
    the draw have NaN as -inf; without NaN they are the input itself (no copy on the CPU's path)."""
    from server.engine.sampling import greedy

    x = torch.randn(6, V, generator=torch.Generator().manual_seed(V))
    same = greedy(x)[2]
    assert same is x or torch.equal(same, x)
    x[1, 3] = float("nan")  # in the first block, next to the maximum
    x[1, 4] = 40.0
    x[2, -1] = float("nan")  # in the tail
    x[3] = float("nan")  # nothing to choose: the row is not alive (every value -inf once cleaned)
    x[4, V // 2] = float("nan")
    x[4, V // 2 + 1] = float("inf")
    tokens, alive, clean = greedy(x)
    inf = float("inf")
    expected = torch.nan_to_num(x, nan=-inf, posinf=inf).argmax(-1)
    assert torch.equal(tokens[[0, 1, 2, 4, 5]], expected[[0, 1, 2, 4, 5]])
    assert tokens[1] == 4 and tokens[4] == V // 2 + 1
    assert alive.tolist() == [True, True, True, False, True, True]
    assert not clean.isnan().any() and torch.equal(clean, torch.nan_to_num(x, nan=-inf, posinf=inf))
