"""Speculative decoding: the proposers and the acceptance rule on their own, then batches that verify drafts answer
token for token what decoding one token at a time answers (greedy, seeded draws, logit processors, stops, mixed
policies, overlap), on the tiny model and on SmolLM2."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from server.engine.generate import Engine
from server.engine.sampling import SamplingParams
from server.engine.speculative import Speculation, accepted, propose_ngram, room, runs_within
from server.policy.compiler import compile_schedule


# -- the pure parts ------------------------------------------------------------------------------------------------


def test_ngram_proposes_what_followed_the_latest_longest_match():
    seq = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    # the suffix [2, 3] last occurred at 6-7 (followed by 7 8 5 ...); the 3-gram [5, 2, 3] never did
    assert propose_ngram(seq, k=3, lookup_min=1, lookup_max=3) == [7, 8, 5]
    assert propose_ngram(seq, k=1, lookup_min=1, lookup_max=3) == [7]
    # a longer match wins over a later shorter one: [1, 2] ends at 6 and at 1; [9, 1, 2] only at 4-6
    assert propose_ngram([9, 1, 2, 4, 1, 2, 5, 9, 1, 2], k=2, lookup_min=1, lookup_max=3) == [4, 1]
    assert propose_ngram([9, 1, 2, 4, 1, 2, 5, 9, 1, 2], k=2, lookup_min=1, lookup_max=2) == [5, 9]
    assert propose_ngram([1, 2, 3, 4], k=3, lookup_min=1, lookup_max=4) == []  # no earlier occurrence
    assert propose_ngram([4, 4], k=3, lookup_min=2, lookup_max=4) == []  # too short for a 2-gram before it
    assert propose_ngram([4, 4, 4], k=3, lookup_min=1, lookup_max=4) == [4]  # what follows the match, up to now
    assert propose_ngram([5, 6, 5], k=0, lookup_min=1, lookup_max=2) == []


def _lookup_by_every_window(tokens, *, k, lookup_min, lookup_max):
    """The reference: every window of the history compared with the suffix, longest suffix first."""
    for n in range(min(lookup_max, len(tokens) - 1), lookup_min - 1, -1):
        hits = [h for h in range(len(tokens) - n) if tokens[h : h + n] == tokens[-n:]]
        if hits:
            return tokens[hits[-1] + n : hits[-1] + n + k]
    return []


def test_ngram_equals_comparing_every_window():
    import random

    rng = random.Random(0)
    for _ in range(2000):
        tokens = [rng.randrange(rng.choice((2, 4, 16))) for _ in range(rng.randrange(0, 40))]
        lo = rng.randrange(1, 4)
        hi = rng.randrange(lo, 6)
        k = rng.randrange(0, 6)
        want = _lookup_by_every_window(tokens, k=k, lookup_min=lo, lookup_max=hi)
        assert propose_ngram(tokens, k=k, lookup_min=lo, lookup_max=hi) == want, (tokens, lo, hi, k)


def test_acceptance_keeps_the_drafts_up_to_the_first_the_sampler_did_not_choose():
    assert accepted([4, 5, 6], [4, 5, 6, 7]) == 3
    assert accepted([4, 5, 6], [4, 9, 6, 7]) == 1
    assert accepted([4, 5, 6], [1, 5, 6, 7]) == 0
    assert accepted([], [3]) == 0


def test_room_ends_a_row_no_later_than_its_limits():
    assert room(num_tokens=4, made=1, max_tokens=100, length=10, max_len=100) == 4
    assert room(num_tokens=4, made=7, max_tokens=10, length=10, max_len=100) == 2  # 2 drafts + 1 = the 10th token
    assert room(num_tokens=4, made=9, max_tokens=10, length=10, max_len=100) == 0
    assert room(num_tokens=4, made=1, max_tokens=100, length=97, max_len=100) == 2


def test_a_draft_runs_only_on_rows_that_hold_its_slots():
    full, skip2, skip4 = (compile_schedule(p, 30) for p in ("full", "skip:2", "skip:4"))
    assert runs_within(skip4, full) and runs_within(skip4, skip2)  # centred skips nest
    assert not runs_within(skip2, skip4)  # skip:4 never wrote layers 13 and 16
    assert not runs_within(full, full)  # no cheaper: no draft
    assert runs_within(skip4, compile_schedule("pairs", 30))  # a layer of a parallel pair has its own slot
    assert runs_within(skip4, compile_schedule("loop:4-25x2", 30))  # its first pass of each layer: occurrence 0


# -- batches -------------------------------------------------------------------------------------------------------


def _speculating(e: Engine, spec: Speculation, *, overlap: bool = False) -> Engine:
    return Engine(e.model, e.tokenizer, eos_ids=e.eos_ids, config=e.config, overlap=overlap, speculation=spec)


def _serve(engine: Engine, waves, *, prefix_caching: bool = True, max_len: int = 96):
    """Each wave: (prompt, policy, params) requests added together while the earlier ones decode; every request
    run to its end. Returns the results and the batch."""
    batch = engine.new_batch(max_len=max_len, num_blocks=1200, block_size=4, prefix_caching=prefix_caching)
    seqs = []
    for wave in waves:
        new = [engine.new_sequence(p, params, engine.compile(policy)) for p, policy, params in wave]
        seqs += new
        batch.add(new)
        batch.step()
    while batch.filter() is not None and batch.busy:
        batch.step()
    return seqs, batch


def _assert_same(plain, spec):
    for a, b in zip(plain, spec):
        assert a.output_ids == b.output_ids, (a.schedule.policy, a.params)
        assert a.text == b.text and a.finish_reason == b.finish_reason
        torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs), rtol=1e-4, atol=1e-4)
        assert [list(t) for t in a.top_logprobs] == [list(t) for t in b.top_logprobs]


GREEDY = SamplingParams(max_tokens=24, ignore_eos=True, logprobs=2)
DRAWN = SamplingParams(max_tokens=24, ignore_eos=True, temperature=0.8, seed=5, logprobs=1)
PROCESSED = SamplingParams(max_tokens=20, ignore_eos=True, temperature=0.7, seed=11, repetition_penalty=1.3,
                           frequency_penalty=0.4, min_tokens=6, logprobs=0)
# bad words that the greedy loop on `loop` would end (its output repeats 98 123 and begins 47 47 47 47): a draft
# position's ban depends on the drafts before it
BANNED = SamplingParams(max_tokens=24, ignore_eos=True, bad_words_ids=((98, 123), (47, 47, 47)),
                        logit_bias=((60, 1.5),), presence_penalty=0.3)
COOL = SamplingParams(max_tokens=24, ignore_eos=True, temperature=0.05, seed=2, logprobs=1)
SPECS = [Speculation("ngram", 3, lookup_min=1), Speculation("ngram", 5, lookup_min=2, lookup_max=3),
         Speculation("layer_skip", 3, draft="skip:2")]


@pytest.mark.parametrize("overlap", [False, True], ids=["stepwise", "overlap-asked"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.method}-{s.num_tokens}")
def test_verified_drafts_answer_what_one_token_at_a_time_answers(tiny_engine, spec, overlap):
    """Mixed policies (one, skip:4, whose rows lack slots a skip:2 draft runs), greedy rows, seeded drawing rows and
    rows with penalties and min_tokens, stop strings, and limits that cut drafts short, joining while others decode:
    the same tokens, text, logprobs and ends as without drafts, nothing left in the pool, and drafts both kept and
    refused (by drawing rows too, whose generators are rewound)."""
    short = SamplingParams(max_tokens=2, ignore_eos=True)
    stopped = SamplingParams(max_tokens=30, ignore_eos=True, stop=["aa"])
    loop = [5, 6, 7, 5, 6, 7, 5, 6, 7, 5, 6]
    waves = [
        [(loop, "full", GREEDY), (list(range(5, 30)), "skip:2", DRAWN)],
        [(loop[:7] + [40, 41], "pairs", PROCESSED), ([9, 8, 7, 9, 8], "full", short), (loop, "full", BANNED)],
        [(loop, "skip:4", GREEDY), ([50, 51, 50, 51], "full", stopped), (loop[:5], "full", DRAWN),
         (loop, "full", COOL)],
    ]
    plain, _ = _serve(tiny_engine, waves)
    spec_seqs, batch = _serve(_speculating(tiny_engine, spec, overlap=overlap), waves)
    _assert_same(plain, spec_seqs)
    assert batch.kv_usage() == 0.0 and not batch.sequences
    stats = [s.speculated for s in spec_seqs]
    assert sum(s.accepted_tokens for s in stats) > 0, "no draft kept: the test would not exercise verification"
    drawn = [s.speculated for s in spec_seqs if not s.params.greedy]
    assert any(s.draft_tokens > s.accepted_tokens for s in drawn), "no drawing row refused a draft"
    assert any(s.accepted_tokens for s in drawn), "no drawing row kept a draft"
    if spec.method == "layer_skip":
        assert spec_seqs[5].speculated.drafts == 0, "skip:4 holds no KV of layers 1 and 4: no draft runs on it"
    for s in stats:
        assert 0 <= s.accepted_tokens <= s.draft_tokens <= s.drafts * spec.num_tokens


def test_kept_drafts_are_counted_only_up_to_the_token_that_ends_the_request(tiny_engine, monkeypatch):
    """A stop string completed inside a run of kept drafts ends the request there: the drafts after it are not
    output, and not counted as kept. In every verifying step the drafts counted as kept are at most the tokens it
    output, less the row's own token where the request goes on."""
    import server.engine.generate as generate

    rounds = []  # per verifying step: (kept drafts counted, tokens output, ended)
    real = generate.Batch._verify

    def verify(self, drafts):
        before = {s.id: (len(s.output_ids), s.speculated.accepted_tokens) for s in self.sequences}
        out = real(self, drafts)
        rounds.extend((s.speculated.accepted_tokens - before[s.id][1], len(s.output_ids) - before[s.id][0],
                       s.finished) for s in self.sequences if s.id in drafts)
        return out

    monkeypatch.setattr(generate.Batch, "_verify", verify)
    loop = [5, 6, 7] * 4 + [5, 6]
    for stop in ("qrqrqrqrqrq", "rqrqrqrqrqrqr"):
        params = SamplingParams(max_tokens=30, ignore_eos=True, stop=[stop])
        plain, _ = _serve(tiny_engine, [[(loop, "full", params)]])
        (s,), _ = _serve(_speculating(tiny_engine, Speculation("ngram", 8, lookup_min=1)), [[(loop, "full", params)]])
        assert s.output_ids == plain[0].output_ids and s.finish_reason == "stop"
    assert all(kept <= out - (not ended) for kept, out, ended in rounds), rounds
    assert any(ended and 0 < kept == out for kept, out, ended in rounds), "no stop inside kept drafts: not exercised"


def test_a_step_where_no_row_may_draft_overlaps_as_before(tiny_engine):
    """Overlapped decoding asked: while more rows decode than `up_to_rows`, or every row's limit leaves no room for
    a draft, each decode step is queued before the last one is read, as without speculation; a step where a row may
    draft reads first. The tokens are the same whichever."""
    prompts = [list(range(10 + 7 * i, 17 + 7 * i)) for i in range(2)]

    def in_flight_after_each(spec, max_tokens):
        e = _speculating(tiny_engine, spec, overlap=True)
        batch = e.new_batch(max_len=64, num_blocks=400, block_size=4)
        seqs = [e.new_sequence(p, SamplingParams(max_tokens=max_tokens, ignore_eos=True), e.compile("full"))
                for p in prompts]
        batch.add(seqs)
        queued = []
        while batch.filter() is not None and batch.busy:
            batch.decode()
            queued.append(batch._in_flight is not None)
        return queued, [s.output_ids for s in seqs]

    plain, want = in_flight_after_each(None, 8)
    crowded, got = in_flight_after_each(Speculation("ngram", 4, lookup_min=1, up_to_rows=1), 8)
    assert crowded == plain and got == want and plain[:6] == [True] * 6
    drafting, got = in_flight_after_each(Speculation("ngram", 4, lookup_min=1), 8)
    assert drafting[:6] == [False] * 6 and got == want  # then max_tokens leaves no room: overlapped again
    one_left, got = in_flight_after_each(Speculation("ngram", 4, lookup_min=1), 2)  # room: max_tokens - made - 1
    assert one_left[0] and got == in_flight_after_each(None, 2)[1]


def test_a_drawing_row_whose_generator_fails_ends_alone(tiny_engine, poisoned_seed, monkeypatch):
    """A drawing row whose generator cannot be read or rewound ends with its error and its neighbours go on, as
    without speculation (the rewind is outside sample_batch's per-row isolation)."""
    import server.engine.generate as generate

    loop = [5, 6, 7, 5, 6, 7, 5, 6, 7, 5, 6]
    every = list(range(3, 60))  # every token is followed by another: ngram always drafts for this row
    drawn = SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.5, seed=9)
    waves = [[(every, "full", drawn), (loop, "full", GREEDY)]]
    plain, _ = _serve(tiny_engine, waves, max_len=128)
    calls = []

    def failing(g, state, draws, device):
        calls.append(draws)
        raise RuntimeError("generator lost")

    monkeypatch.setattr(generate, "rewind", failing)
    spec, batch = _serve(_speculating(tiny_engine, Speculation("ngram", 4, lookup_min=1)), waves, max_len=128)
    assert calls and spec[0].finish_reason == "error" and "generator lost" in spec[0].error
    assert spec[1].output_ids == plain[1].output_ids and spec[1].finish_reason == "length"
    assert batch.kv_usage() == 0.0


def test_a_verifying_step_keeps_its_logits_within_its_budget(tiny_engine, monkeypatch):
    """Drafts are capped so that a verifying step's positions x vocabulary x 4 bytes stay within
    VERIFY_LOGITS_BYTES: 3 rows at a budget of 9 positions verify 2 drafts each at most."""
    import server.engine.generate as generate

    monkeypatch.setattr(generate, "VERIFY_LOGITS_BYTES", 9 * 4 * tiny_engine.vocab_size)
    widths = []
    real = generate.Batch._verify

    def verify(self, drafts):
        widths.append(sum(len(d) + 1 for d in drafts.values()) + len(self.sequences) - len(drafts))
        return real(self, drafts)

    monkeypatch.setattr(generate.Batch, "_verify", verify)
    loop = [5, 6, 7, 5, 6, 7, 5, 6, 7, 5, 6]
    waves = [[(loop, "full", GREEDY), (loop[1:], "full", GREEDY), (loop[2:], "full", GREEDY)]]
    plain, _ = _serve(tiny_engine, waves)
    spec, _ = _serve(_speculating(tiny_engine, Speculation("ngram", 8, lookup_min=1)), waves)
    _assert_same(plain, spec)
    assert widths and max(widths) <= 9 and sum(s.speculated.accepted_tokens for s in spec) > 0


def test_draft_steps_leave_the_captured_layouts_of_the_batch_alone(tiny_engine):
    """With captured steps (on the CPU the same padded path runs eagerly), a layer-skip draft's forwards are not
    counted among the batch's recent schedules, so later plain steps carry no padding group for the draft; the
    draft's layouts are warmed up with the batch's."""
    e = Engine(tiny_engine.model, tiny_engine.tokenizer, eos_ids=tiny_engine.eos_ids, graphs=True,
               speculation=Speculation("layer_skip", 2, draft="skip:2", up_to_rows=1))
    batch = e.new_batch(max_len=96, num_blocks=1200, block_size=4)
    batch.warm_up(e.compile("full"))
    graphs = batch.executor.graphs
    assert {k[0] for k in graphs._steps} == {(e.compile("full"),), (e.compile("skip:2"),)}
    loop = [5, 6, 7] * 4
    one = e.new_sequence(loop, SamplingParams(max_tokens=6, ignore_eos=True), e.compile("full"))
    batch.add([one])
    while batch.filter() is not None and batch.busy:
        batch.step()
    assert one.speculated.drafts > 0
    assert e.compile("skip:2") not in graphs._last_seen
    two = [e.new_sequence(loop, SamplingParams(max_tokens=4, ignore_eos=True), e.compile("full")) for _ in range(2)]
    batch.add(two)
    graphs._steps.clear()
    while batch.filter() is not None and batch.busy:
        batch.step()  # two rows: no drafts (up_to_rows 1), plain steps
    assert {k[:2] for k in graphs._steps} == {((e.compile("full"),), (2,))}


def test_no_row_drafts_while_more_rows_decode_than_allowed(tiny_engine):
    """vLLM's disable_by_batch_size: at most one row may draft; while two decode, neither does, and once the short
    one ended the other drafts; both answer as without drafts."""
    loop = [5, 6, 7, 5, 6, 7, 5, 6, 7, 5, 6]
    waves = [[(loop, "full", SamplingParams(max_tokens=4, ignore_eos=True)), (loop, "full", GREEDY)]]
    plain, _ = _serve(tiny_engine, waves)
    seqs, _ = _serve(_speculating(tiny_engine, Speculation("ngram", 3, lookup_min=1, up_to_rows=1)), waves)
    _assert_same(plain, seqs)
    short, long = seqs
    assert short.speculated.drafts == 0 and long.speculated.drafts > 0
    alone, _ = _serve(_speculating(tiny_engine, Speculation("ngram", 3, lookup_min=1)), waves)
    assert alone[0].speculated.drafts > 0 and alone[1].speculated.drafts > long.speculated.drafts


def test_the_servers_config_becomes_the_engines_terms(tiny_engine, caplog):
    """`speculative_config` -> `Speculation`: the draft policy canonical for the model, a warning where it cannot
    run under the default policy, and an invalid one an error (the start fails, naming it)."""
    from server.app import speculation
    from server.policy.policy import PolicyError
    from server.settings import SpeculativeConfig

    config = SpeculativeConfig(method="layer_skip", draft_policy="skip:2", num_speculative_tokens=2,
                               disable_by_batch_size=8)
    assert speculation(config, tiny_engine, default="full") == Speculation("layer_skip", 2, draft="skip:2-3",
                                                                            up_to_rows=8)
    assert speculation(None, tiny_engine, default="full") is None
    with caplog.at_level("WARNING"):
        speculation(config, tiny_engine, default="skip:4")
    assert "will not draft" in caplog.text
    with pytest.raises(PolicyError, match="skip at most 5"):
        speculation(config.model_copy(update={"draft_policy": "skip:9"}), tiny_engine, default="full")
    preset = config.model_copy(update={"draft_policy": "cheap"})
    assert speculation(preset, tiny_engine, default="full", presets={"cheap": "skip:2-3"}).draft == "skip:2-3"
    ngram = SpeculativeConfig(method="ngram", num_speculative_tokens=4)
    assert speculation(ngram, tiny_engine, default="full") == Speculation("ngram", 4, lookup_max=4, lookup_min=2)


def test_speculation_on_smollm2_keeps_copied_text_and_structured_rows_exact(smollm2_engine):
    """On the real model: a prompt whose answer copies it keeps most of ngram's drafts, the answer equal to
    decoding one token at a time; a JSON-schema row beside it drafts nothing and answers the same."""
    from server.engine.sampling_params import StructuredOutput

    e = smollm2_engine
    spec = _speculating(e, Speculation("ngram", 4, lookup_min=1))
    copy = e.encode("Text: The committee approved the new budget for the city library on Monday.\n"
                    "Repeat the text word for word: The committee")
    schema = SamplingParams(max_tokens=24, structured=StructuredOutput(
        "json", '{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}'))
    waves = [[(copy, "full", SamplingParams(max_tokens=16)), ("Give me JSON:", "full", schema)]]
    plain, _ = _serve(e, waves, max_len=256)
    spec_seqs, batch = _serve(spec, waves, max_len=256)
    _assert_same(plain, spec_seqs)
    copied = spec_seqs[0].speculated
    assert copied.accepted_tokens >= 6, dataclasses.asdict(copied)
    assert spec_seqs[1].speculated.drafts == 0 and spec_seqs[1].text.startswith("{")


def test_drafts_are_counted_each_step_not_when_the_request_ends(tiny_engine):
    """The engine loop hands each step's drafts to the metrics (vLLM counts per step): a long request's counters
    move while it runs, and equal its own tally."""
    from server.engine.loop import EngineLoop
    from server.engine.request import Request
    from server.metrics import Metrics
    from tests.serving import metric_value

    metrics = Metrics(model="m")
    loop = EngineLoop(_speculating(tiny_engine, Speculation("ngram", 3, lookup_min=1)), max_num_seqs=2,
                      max_model_len=96, queue_capacity=4, kv_budget_tokens=96 * 6 * 4, metrics=metrics)
    r = Request("r", [5, 6, 7] * 4, SamplingParams(max_tokens=60, ignore_eos=True), tiny_engine.compile("full"))
    loop.submit(r, lambda out: None)
    for _ in range(8):
        loop.step()  # on this thread: the loop is not started
    assert not r.finished and r.speculated.drafts > 0
    text = metrics.render()[0].decode()
    for counter, mine in (("drafts", r.speculated.drafts), ("draft_tokens", r.speculated.draft_tokens),
                          ("accepted_tokens", r.speculated.accepted_tokens)):
        assert metric_value(text, f"painters:spec_decode_num_{counter}_total", policy="full") == mine, counter


# -- served --------------------------------------------------------------------------------------------------------


def _stream(url: str, body: dict) -> tuple[list[dict], str]:
    """The streamed completion's events, then the server's /metrics text."""
    import json

    import httpx

    chunks = []
    with httpx.Client(base_url=url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks.append(json.loads(line[6:]))
        metrics = c.get("/metrics").text
    return chunks, metrics


def test_a_speculating_server_streams_several_tokens_a_step_and_counts_its_drafts():
    """Through uvicorn: the same streamed text and token logprobs with `--speculative-config` ngram as without;
    some events carry several tokens (one verifying forward kept drafts), and /metrics counts the drafts as vLLM's
    spec-decode counters do."""
    from tests.serving import metric_value, serve_tiny

    body = {"prompt": "abcabcabcabcabc", "max_tokens": 40, "temperature": 0, "ignore_eos": True, "logprobs": 1,
            "policy": "full"}
    with serve_tiny() as url:
        plain, _ = _stream(url, body)
    with serve_tiny(speculative_config={"method": "ngram", "num_speculative_tokens": 4}) as url:
        spec, metrics = _stream(url, body)

    def tokens(chunks):
        return [t for c in chunks for t in c["choices"][0]["logprobs"]["tokens"]]

    def logprobs(chunks):
        return [x for c in chunks for x in c["choices"][0]["logprobs"]["token_logprobs"]]

    assert "".join(c["choices"][0]["text"] for c in spec) == "".join(c["choices"][0]["text"] for c in plain)
    assert tokens(spec) == tokens(plain) and len(tokens(spec)) == 40
    torch.testing.assert_close(torch.tensor(logprobs(spec)), torch.tensor(logprobs(plain)), rtol=1e-4, atol=1e-4)
    assert max(len(c["choices"][0]["logprobs"]["tokens"]) for c in spec) > 1
    drafted = metric_value(metrics, "painters:spec_decode_num_draft_tokens_total", policy="full")
    kept = metric_value(metrics, "painters:spec_decode_num_accepted_tokens_total", policy="full")
    forwards = metric_value(metrics, "painters:spec_decode_num_drafts_total", policy="full")
    assert 0 < kept <= drafted <= 4 * forwards
    assert forwards < 40, "a verifying forward that keeps drafts gives more than one token"
