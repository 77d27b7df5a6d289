"""Beam search (server/api/beam_search.py): the search as plain data with hand-made logprobs; refusals and "nothing
left behind" on the tiny in-process server; and on the real SmolLM2 over HTTP, with the `openai` client's extra_body,
against an independent beam search over transformers' own logits, under the full model and a skip policy."""

from __future__ import annotations

import asyncio
import json
import math
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
import torch

from server.api import beam_search
from server.api import openai as openai_api
from server.api.beam_search import Beam, Search, score
from server.api.pipeline import Job
from server.api.protocol import CompletionRequest
from server.engine.grammar import Grammars, bitmask
from server.engine.sampling import unpack_bitmask
from server.engine.sampling_params import StructuredOutput
from server.policy.compiler import compile_schedule
from tests import reliability as rel
from tests.conftest import bos_word_tokenizer
from tests.reference import reference_logits
from tests.serving import Process, metric_value, painters_server, serving, settings, tiny_engine, wait_until

MODEL = "smollm2-135m"
EOS = frozenset({2})


def _chat_prompt(text: str) -> str:
    """SmolLM2's chat template around one user message, as a completions prompt."""
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


# -- the search, with hand-made logprobs --------------------------------------------------------------------------


def test_an_eos_among_the_likeliest_ends_a_copy_and_the_width_likeliest_others_live_on():
    s = Search(prompt_len=4, max_tokens=3, width=2, eos_ids=EOS)
    s.advance([{7: -0.1, 2: -0.5, 8: -1.0, 9: -3.0, 10: -4.0}])  # 2 x width = 4 looked at: 10 is not
    assert [b.tokens for b in s.live] == [[7], [8]] and [b.tokens for b in s.ended] == [[2]]
    assert s.ended[0].finish_reason == "stop" and s.ended[0].cum_logprob == -0.5
    s.advance([{5: -2.0, 6: -2.1}, {5: -0.2, 6: -0.3}])  # beam [8] overtakes beam [7]
    assert [b.tokens for b in s.live] == [[8, 5], [8, 6]]
    assert [b.cum_logprob for b in s.live] == pytest.approx([-1.2, -1.3])
    assert not s.done
    s.advance([{1: -0.1}, {1: -0.1}])
    assert s.done and s.steps == 3


def test_a_beam_ends_once_on_its_likeliest_eos():
    """A model with several EOS tokens (SmolLM2's 0 and 2): two among a beam's likeliest end one copy of it, on the
    likelier, not the same text twice; the other is no candidate either."""
    s = Search(prompt_len=4, max_tokens=3, width=2, eos_ids=frozenset({0, 2}))
    s.advance([{0: -0.4, 7: -0.1, 2: -0.3, 8: -1.0}])
    assert [(b.tokens, b.cum_logprob) for b in s.ended] == [([2], -0.3)]
    assert [b.tokens for b in s.live] == [[7], [8]]


def test_each_continuation_follows_a_grammar_of_its_own_and_ends_where_it_is_complete():
    """A choice of "hello" and "catsat" on the word tokenizer (hello 3, cat 6, sat 7; EOS 2): each live beam
    holds its own fork of its parent's matcher, advanced by its token (the parent's stays put); once complete, its
    grammar allows the EOS alone, which ends it "stop" though ignore_eos is on (a grammar ends there)."""
    grammar = Grammars(bos_word_tokenizer(), vocab_size=128, stop_ids=EOS).compile(
        StructuredOutput("choice", ("hello", "catsat")))
    root = grammar.matcher()
    s = Search(prompt_len=4, max_tokens=4, width=2, eos_ids=EOS, ignore_eos=True, structured=True,
               live=[Beam(grammar=root)])
    s.advance([{3: -0.5, 6: -0.1}])  # what the engine's mask leaves
    assert [b.tokens for b in s.live] == [[6], [3]]
    cat, hello = (b.grammar for b in s.live)
    assert len({id(root), id(cat), id(hello)}) == 3
    assert [_allowed(m) for m in (root, cat, hello)] == [[3, 6], [7], [2]]
    s.advance([{7: -0.2}, {2: -0.3}])
    assert [(b.tokens, b.finish_reason) for b in s.ended] == [([3, 2], "stop")]
    assert [b.tokens for b in s.live] == [[6, 7]] and _allowed(s.live[0].grammar) == [2]
    assert _allowed(cat) == [7] and _allowed(root) == [3, 6]  # a child's token moved its own fork only
    s.advance([{2: -0.1}])
    assert s.done and [(b.tokens, b.finish_reason) for b in s.best()] == [([6, 7, 2], "stop"), ([3, 2], "stop")]


def _allowed(matcher: Any) -> list[int]:
    """The tokens a matcher allows next."""
    return unpack_bitmask(bitmask([matcher], 128), 128)[0].nonzero().flatten().tolist()


def test_tokens_a_beam_may_not_take_are_no_candidates():
    """A step limited to fewer allowed tokens than 2 x width returns the rest at -inf (`top_from_allowed`)."""
    s = Search(prompt_len=4, max_tokens=3, width=2, eos_ids=EOS)
    s.advance([{7: -2.0, 8: -3.0, 9: -math.inf, 10: -math.inf}])
    assert [b.tokens for b in s.live] == [[7], [8]] and all(-math.inf not in b.tops[0].values() for b in s.live)


def test_ignore_eos_makes_the_eos_a_token_like_any_other():
    s = Search(prompt_len=4, max_tokens=2, width=1, eos_ids=EOS, ignore_eos=True)
    s.advance([{2: -0.1, 7: -0.5}])
    assert [b.tokens for b in s.live] == [[2]] and s.ended == []


def test_length_penalty_ranks_as_vllms_score_counting_the_prompt_and_not_the_eos():
    short = Beam([5, 2], [-1.0, -1.0], [{}, {}], -2.0, "stop")  # length 10 + 1 (the EOS is not counted)
    long = Beam([5, 6, 7, 8], [-0.7] * 4, [{}] * 4, -2.8)  # length 14
    for lp, best in ((0.0, short), (1.0, short), (2.0, long)):
        assert score(short, prompt_len=10, eos_ids=EOS, length_penalty=lp) == pytest.approx(-2.0 / 11 ** lp)
        assert score(long, prompt_len=10, eos_ids=EOS, length_penalty=lp) == pytest.approx(-2.8 / 14 ** lp)
        search = Search(prompt_len=10, max_tokens=4, width=2, eos_ids=EOS, length_penalty=lp, live=[long],
                        ended=[short])
        assert search.best()[0] is best


def test_an_aborted_search_ends_its_live_beams_as_they_are_and_keeps_the_ended_ones():
    """vLLM's `_beam_search_step` on an aborted step: the live beams join the ended ones with finish_reason
    "abort"; the ranking is the usual one."""
    s = Search(prompt_len=4, max_tokens=5, width=2, eos_ids=EOS)
    s.advance([{7: -0.1, 2: -0.2, 8: -3.0}])
    s.abort()
    assert s.done and s.aborted and s.live == []
    assert [(b.tokens, b.finish_reason) for b in s.best()] == [([7], "abort"), ([2], "stop")]


# -- the tiny in-process server: refusals, nothing left behind -------------------------------------------------------


@pytest.fixture(scope="module")
def tiny() -> Iterator[Any]:
    """The tiny model with a word-level tokenizer that has a chat template."""
    with serving(settings(), tiny_engine(bos_word_tokenizer())) as c:
        yield c


def _beams(**body: Any) -> dict[str, Any]:
    return {"model": "tiny", "prompt": "hello world", "max_tokens": 4, "use_beam_search": True, "n": 2, **body}


@pytest.mark.parametrize("field, value, param", [
    ("stop", ["x"], "stop"), ("stop_token_ids", [5], "stop_token_ids"), ("min_tokens", 1, "min_tokens"),
    ("presence_penalty", 0.5, "presence_penalty"), ("frequency_penalty", 0.5, "frequency_penalty"),
    ("repetition_penalty", 1.2, "repetition_penalty"), ("logit_bias", {"5": 1}, "logit_bias"),
    ("bad_words", ["hello"], "bad_words"), ("prompt_logprobs", 1, "prompt_logprobs"),
    ("n", 11, "n"), ("max_tokens", 0, "max_tokens"),
])
def test_what_beam_search_cannot_honour_is_a_400_naming_it(tiny, field, value, param):
    r = tiny.post("/v1/completions", json=_beams(**{field: value}))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and "use_beam_search" in error["message"]


@pytest.mark.parametrize("body, param, says", [
    ({"guided_regex": "hello("}, "guided_regex", "does not compile"),  # as any request's compile error
    ({"structured_outputs": {"grammar": "root ::= nope"}}, "structured_outputs.grammar", "does not compile"),
    ({"guided_choice": ["hello", "cat", "hello"], "n": 3}, "guided_choice", "at least n (3) distinct choices, got 2"),
    # two outputs only, as tokens: found once the search ends
    ({"guided_regex": "hello|cat", "n": 3}, "guided_regex", "admits only 2 outputs"),
    ({"guided_choice": ["hello", "cat"], "allowed_token_ids": [3, 6]}, "allowed_token_ids", "takes no allowed"),
    ({"guided_regex": "hello", "bad_words": ["cat"]}, "bad_words", "use_beam_search"),
])
def test_a_structured_output_beam_search_cannot_serve_is_a_400_naming_it(tiny, body, param, says):
    r = tiny.post("/v1/completions", json=_beams(**body))
    assert r.status_code == 400 and r.json()["error"]["param"] == param and says in r.json()["error"]["message"], \
        r.text


@pytest.mark.parametrize("allowed, says", [([5, 5, 6], "at least n (3) distinct token ids, got 2"),
                                           ([5, 6, 128], "outside the vocabulary")])
def test_allowed_token_ids_that_cannot_fill_the_beams_or_are_outside_the_vocabulary_are_a_400(tiny, allowed, says):
    r = tiny.post("/v1/completions", json=_beams(n=3, allowed_token_ids=allowed))
    assert r.status_code == 400 and says in r.json()["error"]["message"], r.text
    assert "allowed_token_ids" in r.json()["error"]["message"] + str(r.json()["error"]["param"])


def test_every_beam_takes_only_allowed_tokens(tiny):
    """The tiny model's own choices are elsewhere: every token, and every returned alternative, is one of the
    allowed; the EOS (2) among them ends beams, and left out none does (ignore_eos off: every beam runs on)."""
    for allowed, eos in (([7, 9, 11, 2], True), ([7, 9, 11], False)):
        r = tiny.post("/v1/completions", json=_beams(n=3, max_tokens=6, logprobs=5, allowed_token_ids=allowed,
                                                     return_tokens_as_token_ids=True))
        assert r.status_code == 200, r.text
        choices = r.json()["choices"]
        assert len(choices) == 3
        for c in choices:
            tokens = [int(t.split(":")[1]) for t in c["logprobs"]["tokens"]]
            alternatives = {int(t.split(":")[1]) for top in c["logprobs"]["top_logprobs"] or [] for t in top}
            assert set(tokens) | alternatives <= set(allowed), (allowed, c)
            assert all(len(top) <= len(allowed) for top in c["logprobs"]["top_logprobs"] or [])
            assert c["finish_reason"] == "length" or eos
        if not eos:
            assert all(len(c["logprobs"]["tokens"]) == 6 for c in choices)


def test_echo_with_logprobs_is_refused_and_length_penalty_needs_beams(tiny):
    r = tiny.post("/v1/completions", json=_beams(echo=True, logprobs=1))
    assert r.status_code == 400 and r.json()["error"]["param"] == "echo"
    r = tiny.post("/v1/completions", json={"model": "tiny", "prompt": "hello world", "length_penalty": 2.0})
    assert r.status_code == 400 and "use_beam_search" in r.json()["error"]["message"]
    r = tiny.post("/v1/completions", json=_beams(length_penalty=11))
    assert r.status_code == 400 and "[-10, 10]" in r.json()["error"]["message"]


def test_a_search_whose_last_step_could_never_fit_the_kv_budget_is_refused_before_it_starts():
    """384 slot-tokens hold 64 tokens of the full 6-layer model: each step fits, the last one would not."""
    with serving(settings(kv_budget_tokens=384), tiny_engine(bos_word_tokenizer())) as c:
        r = c.post("/v1/completions", json=_beams(max_tokens=70))
        assert r.status_code == 400 and r.json()["error"]["code"] == "kv_budget_exceeded", r.text
        assert "64 tokens" in r.json()["error"]["message"]
        assert c.app.state.painters.loop.num_requests == 0
        assert c.post("/v1/completions", json=_beams(max_tokens=40)).status_code == 200


def test_beam_searches_leave_nothing_behind(tiny):
    for body in (_beams(), _beams(prompt=["hello world", "the cat sat"], n=3, logprobs=2), _beams(stream=True),
                 _beams(guided_choice=["hello", "cat", "catsat"], prompt=["hello world", "the cat sat"]),
                 _beams(guided_regex="(hello|cat)+", ignore_eos=True, max_tokens=6, stream=True)):
        r = tiny.post("/v1/completions", json=body)
        assert r.status_code == 200 and "choices" in r.text, r.text
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "use_beam_search": True, "n": 2,
            "max_tokens": 4, "logprobs": True, "top_logprobs": 3}
    r = tiny.post("/v1/chat/completions", json=chat)
    assert r.status_code == 200 and len(r.json()["choices"]) == 2, r.text
    loop = tiny.app.state.painters.loop
    wait_until(lambda: loop.num_requests == 0, timeout=10, what="every step request ended")
    assert loop.batch.kv.reserved == {} and loop.num_series == 0


def test_a_search_its_client_left_before_it_began_leaves_no_series_open(tiny):
    """Beams aborted before the search task's first step (the client gone at once) cancel a task whose body never
    ran: its series closes all the same, or a later drain would wait for it until the deadline."""
    state = tiny.app.state.painters

    async def leave_at_once() -> None:
        body = CompletionRequest(**_beams(n=2, max_tokens=30, ignore_eos=True))
        job = Job("cmpl", body.model, body.policy, openai_api._prompts(body.prompt), n=body.n,
                  max_tokens=body.max_tokens, params=openai_api._params(body, logprobs=None, echo=False))
        run = await beam_search.start(state, job, length_penalty=1.0)
        assert state.loop.num_series == 1
        for beam in run.streams:
            beam.abort()
        await asyncio.sleep(0.1)

    asyncio.run(leave_at_once())
    wait_until(lambda: state.loop.num_requests == 0, timeout=10, what="the first step ended")
    assert state.loop.num_series == 0 and state.loop.batch.kv.reserved == {}


# -- the real SmolLM2 over HTTP ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    with painters_server(Path(tmp_path_factory.mktemp("beam"))) as p:
        yield p



def _answer(client: openai.OpenAI, prompt: str | list[int], *, policy: str = "full", **extra: Any
            ) -> list[tuple[list[int], float, str, str]]:
    """Each choice's (token ids, summed logprob, finish_reason, text); with include_stop_str_in_output an EOS that
    ended a beam is among its tokens, so the sum is the beam's cumulative logprob."""
    r = client.completions.create(model=MODEL, prompt=prompt, logprobs=0, extra_body={
        "policy": policy, "return_tokens_as_token_ids": True, **extra})
    return [([int(t.split(":")[1]) for t in c.logprobs.tokens], sum(c.logprobs.token_logprobs), c.finish_reason,
             c.text) for c in r.choices]


def _reference(hf: Any, policy: str, prompt: list[int], *, width: int, max_tokens: int, length_penalty: float,
               ignore_eos: bool = False, allowed: list[int] | None = None, grammar: Any = None,
               eos: frozenset[int] = EOS) -> list[tuple[list[int], float]]:
    """vLLM's beam search written out over transformers' logits of the whole sequence (no cache, no server code);
    with `allowed`, every other token's logprob is -inf (masked, not renormalized: a transformers logits processor
    on the log-softmax, as its beam search applies them); with `grammar` (an xgrammar CompiledGrammar), so is every
    token it does not allow, by a fresh matcher over each beam's tokens at each step (vLLM's replay) and xgrammar's
    own mask kernel. A beam ends once per step, on the likeliest of the `eos` tokens among its candidates."""
    import xgrammar as xgr

    schedule = compile_schedule(policy, hf.config.num_hidden_layers)
    live: list[tuple[list[int], float]] = [([], 0.0)]
    ended: list[tuple[list[int], float]] = []
    with torch.no_grad():
        for _ in range(max_tokens):
            ids = torch.tensor([prompt + tokens for tokens, _ in live])
            logprobs = torch.log_softmax(reference_logits(hf, schedule, ids)[:, -1].float(), -1)
            if allowed is not None:
                mask = torch.full_like(logprobs, float("-inf"))
                mask[:, allowed] = 0.0
                logprobs = logprobs + mask
            if grammar is not None:
                for row, (tokens, _) in enumerate(live):
                    matcher = xgr.GrammarMatcher(grammar)
                    assert all(matcher.accept_token(t) for t in tokens)
                    bits = xgr.allocate_token_bitmask(1, logprobs.shape[1])
                    matcher.fill_next_token_bitmask(bits)
                    xgr.apply_token_bitmask_inplace(logprobs[row:row + 1], bits)
            top = logprobs.topk(2 * width)
            candidates = []
            for (tokens, cum), values, indices in zip(live, top.values.tolist(), top.indices.tolist()):
                done = False
                for v, t in zip(values, indices):
                    if v == float("-inf"):  # fewer allowed tokens than 2 x width
                        continue
                    if t in eos and (not ignore_eos or grammar is not None):
                        if not done:
                            ended.append((tokens + [t], cum + v))
                        done = True
                    else:
                        candidates.append((tokens + [t], cum + v))
            live = sorted(candidates, key=lambda c: -c[1])[:width]
            if not live:
                break

    def rank(beam: tuple[list[int], float]) -> float:
        tokens, cum = beam
        return cum / (len(prompt) + len(tokens) - (tokens[-1] in eos)) ** length_penalty
    return sorted(ended + live, key=rank, reverse=True)[:width]


def _ids(http: httpx.Client, text: str) -> list[int]:
    return http.post("/tokenize", json={"prompt": text}).json()["tokens"]


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["full", "skip:10"])
def test_width_one_is_greedy(client, policy):
    """With ignore_eos (else an EOS second likeliest would end a beam greedy never chose), under any policy."""
    prompt = "The capital of France is Paris. The capital of Italy is"
    beams = _answer(client, prompt, policy=policy, max_tokens=12, n=1, use_beam_search=True, ignore_eos=True)
    greedy = _answer(client, prompt, policy=policy, max_tokens=12, temperature=0, ignore_eos=True)
    assert [(b[0], b[3]) for b in beams] == [(g[0], g[3]) for g in greedy]
    assert beams[0][1] == pytest.approx(greedy[0][1], abs=1e-3)


@pytest.mark.slow
def test_the_best_of_four_beams_is_at_least_as_likely_as_greedy(client):
    prompt = "Once upon a time, in a small village,"
    beams = _answer(client, prompt, max_tokens=10, n=4, use_beam_search=True, ignore_eos=True)
    greedy = _answer(client, prompt, max_tokens=10, temperature=0, ignore_eos=True)
    assert len(beams) == 4 and all(len(b[0]) == 10 for b in beams)
    assert [b[1] for b in beams] == sorted((b[1] for b in beams), reverse=True)  # same lengths: by cum logprob
    assert beams[0][1] >= greedy[0][1] - 1e-4 and beams[0][0] != greedy[0][0]


@pytest.mark.slow
@pytest.mark.parametrize("policy, question, length_penalty", [
    ("full", "Say hi.", 1.0), ("full", "Is the sky blue? Answer yes or no.", 3.0), ("skip:10", "Say hi.", 0.5)])
def test_beams_are_the_reference_search_over_transformers_logits(client, http, smollm2_hf, policy, question,
                                                                  length_penalty):
    """Tokens, order and cumulative logprobs of every returned beam, EOS-ended ones among them."""
    prompt = _chat_prompt(question)
    got = _answer(client, prompt, policy=policy, max_tokens=6, n=3, use_beam_search=True,
                  length_penalty=length_penalty, include_stop_str_in_output=True)
    want = _reference(smollm2_hf, policy, _ids(http, prompt), width=3, max_tokens=6, length_penalty=length_penalty)
    assert [g[0] for g in got] == [w[0] for w in want]
    assert [g[1] for g in got] == pytest.approx([w[1] for w in want], abs=2e-3)
    assert [g[2] for g in got] == ["stop" if w[0][-1] in EOS else "length" for w in want]


@pytest.mark.slow
@pytest.mark.parametrize("eos", [True, False])
def test_beams_limited_to_allowed_token_ids_are_the_reference_search_over_the_masked_logits(client, http, smollm2_hf,
                                                                                           eos):
    """The allowed words leave out the model's own answer ("No"), so the search differs from the free one; with the
    EOS allowed, beams end on it, and without, none does."""
    prompt = _chat_prompt("Is the sky blue? Answer yes or no.")
    words = ["Yes", " no", "Maybe", ".", " blue", " sky", "!"]
    allowed = sorted({t for w in words for t in _ids(http, w)} | ({2} if eos else set()))
    [(own, _, _, _)] = _answer(client, prompt, max_tokens=1, temperature=0)
    assert own[0] not in allowed  # the mask matters from the first step on
    got = _answer(client, prompt, max_tokens=4, n=3, use_beam_search=True, allowed_token_ids=allowed,
                  include_stop_str_in_output=True)
    want = _reference(smollm2_hf, "full", _ids(http, prompt), width=3, max_tokens=4, length_penalty=1.0,
                      allowed=allowed)
    assert [g[0] for g in got] == [w[0] for w in want]
    assert [g[1] for g in got] == pytest.approx([w[1] for w in want], abs=2e-3)
    assert [g[2] for g in got] == ["stop" if w[0][-1] in EOS else "length" for w in want]
    assert all(t in allowed for g in got for t in g[0])
    assert any(g[2] == "stop" for g in got) == eos


@pytest.mark.slow
def test_length_penalty_reorders_the_beams_as_the_score_says(client, http):
    prompt = _chat_prompt("Say hi.")
    prompt_len = len(_ids(http, prompt))
    firsts = []
    for lp in (0.0, 1.0, 3.0):
        beams = _answer(client, prompt, max_tokens=8, n=3, use_beam_search=True, length_penalty=lp,
                        include_stop_str_in_output=True)
        scores = [cum / (prompt_len + len(ids) - (reason == "stop")) ** lp for ids, cum, reason, _ in beams]
        assert scores == sorted(scores, reverse=True), lp
        firsts.append(beams[0])
    # no penalty favours the likelier short answer that ended; a length penalty, the longer one
    assert firsts[0][2] == "stop" and firsts[1][2] == firsts[2][2] == "length"
    assert len(firsts[1][0]) > len(firsts[0][0])


@pytest.mark.slow
def test_chat_and_a_stream_answer_the_same_beams(client, http):
    messages = [{"role": "user", "content": "Is the sky blue? Answer yes or no."}]
    extra = {"use_beam_search": True, "length_penalty": 3.0}
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, n=3, extra_body=extra)
    rendered = http.post("/tokenize", json={"messages": messages}).json()["tokens"]  # the template's own prompt
    plain = _answer(client, rendered, max_tokens=6, n=3, **extra)
    assert [c.message.content for c in chat.choices] == [p[3] for p in plain]
    assert chat.usage.completion_tokens == sum(len(p[0]) for p in plain)  # an ended beam's EOS is not counted
    streamed = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, n=3, stream=True,
                                                   stream_options={"include_usage": True}, extra_body=extra))
    texts = ["" for _ in chat.choices]
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == [c.message.content for c in chat.choices]
    assert streamed[-1].usage.completion_tokens == chat.usage.completion_tokens


SMOL_EOS = frozenset({0, 2})  # SmolLM2's <|endoftext|> and <|im_end|>: the server's EOS tokens, which grammars end on
AGE = {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 999}}, "required": ["age"],
       "additionalProperties": False}
LEGS = "[0-9]{1,3} legs"
# kind: (question, the request's structured output, its xgrammar compile for the reference, what a valid text is)
STRUCTURED: dict[str, tuple[str, dict[str, Any], Any, Any]] = {
    "regex": ("How many legs does a spider have?", {"guided_regex": LEGS}, lambda c: c.compile_regex(LEGS),
              lambda text: re.fullmatch(LEGS, text)),
    "json_schema": ("How old is the Eiffel Tower? Answer in JSON with its age.",
                    {"response_format": {"type": "json_schema", "json_schema": {"name": "age", "schema": AGE}}},
                    lambda c: c.compile_json_schema(json.dumps(AGE)),
                    lambda text: jsonschema.validate(json.loads(text), AGE) is None),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(STRUCTURED))
def test_every_structured_beam_is_valid_and_ends_where_its_grammar_does(client, http, kind):
    """Every returned beam is a valid output that ended where its grammar did ("stop"), ranked by vLLM's score."""
    question, structured, _, valid = STRUCTURED[kind]
    prompt = _chat_prompt(question)
    got = _answer(client, prompt, max_tokens=16, n=3, use_beam_search=True, include_stop_str_in_output=True,
                  **structured)
    assert len(got) == 3 and all(g[2] == "stop" and valid(g[3]) for g in got), got
    prompt_len = len(_ids(http, prompt))
    scores = [cum / (prompt_len + len(ids) - 1) for ids, cum, _, _ in got]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.slow
def test_structured_beams_are_the_reference_search_under_the_grammars_mask(client, http, smollm2, smollm2_hf):
    """The beams (tokens, order, cumulative logprobs: the model's over the whole vocabulary) are the independent
    beam search over transformers' logits masked by xgrammar itself (a fresh matcher over each beam's tokens at
    each step, as vLLM's; its own mask kernel)."""
    import xgrammar as xgr

    question, structured, compile_reference, _ = STRUCTURED["regex"]
    prompt = _chat_prompt(question)
    got = _answer(client, prompt, max_tokens=8, n=2, use_beam_search=True, include_stop_str_in_output=True,
                  **structured)
    info = xgr.TokenizerInfo.from_huggingface(smollm2.tokenizer, vocab_size=smollm2_hf.config.vocab_size,
                                              stop_token_ids=sorted(SMOL_EOS))
    want = _reference(smollm2_hf, "full", _ids(http, prompt), width=2, max_tokens=8, length_penalty=1.0,
                      grammar=compile_reference(xgr.GrammarCompiler(info)), eos=SMOL_EOS)
    assert [g[0] for g in got] == [w[0] for w in want]
    assert [g[1] for g in got] == pytest.approx([w[1] for w in want], abs=2e-3)


@pytest.mark.slow
def test_a_choice_search_ranks_the_choices_as_their_own_logprobs_do(client, http, smollm2, smollm2_hf):
    """Width 4 over four choices keeps every choice (as vLLM's ChoiceTrie, each is its own token sequence: no beam
    writes one choice another way), each ending on its likelier EOS: the beams are the choices ranked by their
    summed logprobs under the prompt, EOS included, over their length (vLLM's score), from transformers' logits
    of each whole sequence."""
    capitals = ["Paris", "London", "Berlin", "Madrid"]
    prompt = _chat_prompt("What is the capital of France?")
    got = _answer(client, prompt, max_tokens=6, n=4, use_beam_search=True, include_stop_str_in_output=True,
                  guided_choice=capitals)
    ids = _ids(http, prompt)
    want = []
    with torch.no_grad():
        for choice in capitals:
            tokens = smollm2.tokenizer.encode(choice, add_special_tokens=False)
            logits = smollm2_hf(torch.tensor([ids + tokens])).logits[0, len(ids) - 1:].float()
            logprobs = torch.log_softmax(logits, -1)
            eos = max(SMOL_EOS, key=lambda t: logprobs[-1, t])
            cum = sum(logprobs[i, t].item() for i, t in enumerate(tokens + [eos]))
            want.append((choice, tokens + [eos], cum, cum / (len(ids) + len(tokens))))
    want.sort(key=lambda w: -w[3])
    assert [(g[3], g[0], g[2]) for g in got] == [(w[0], w[1], "stop") for w in want]
    assert [g[1] for g in got] == pytest.approx([w[2] for w in want], abs=2e-3)


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(STRUCTURED))
def test_width_one_is_greedy_structured_decoding(client, kind):
    """Where the grammar allows the EOS only once it is complete and then nothing else (after " legs"; a JSON
    object after its closing brace), a width-1 search keeps the likeliest allowed token at every step: greedy
    decoding under the same structured output, token for token."""
    question, structured, _, _ = STRUCTURED[kind]
    prompt = _chat_prompt(question)
    beam = _answer(client, prompt, max_tokens=20, n=1, use_beam_search=True, include_stop_str_in_output=True,
                   **structured)
    greedy = _answer(client, prompt, max_tokens=20, temperature=0, include_stop_str_in_output=True, **structured)
    assert [(b[0], b[2], b[3]) for b in beam] == [(g[0], g[2], g[3]) for g in greedy]
    assert beam[0][1] == pytest.approx(greedy[0][1], abs=1e-3)


@pytest.mark.slow
def test_a_structured_chat_streamed_and_not_answers_the_same_beams(client, http):
    """response_format json_schema on chat, streamed and not, is the completions search over the template's own
    prompt; every beam is valid JSON under the schema."""
    messages = [{"role": "user", "content": STRUCTURED["json_schema"][0]}]
    structured = STRUCTURED["json_schema"][1]
    extra = {"use_beam_search": True}
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, n=2, extra_body=extra,
                                          **structured)
    rendered = http.post("/tokenize", json={"messages": messages}).json()["tokens"]
    plain = _answer(client, rendered, max_tokens=12, n=2, **extra, **structured)
    assert [c.message.content for c in chat.choices] == [p[3] for p in plain]
    assert all(jsonschema.validate(json.loads(c.message.content), AGE) is None for c in chat.choices)
    streamed = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, n=2, stream=True,
                                                   extra_body=extra, **structured))
    texts = ["" for _ in chat.choices]
    for chunk in streamed:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == [c.message.content for c in chat.choices]
    assert [c.finish_reason for c in chat.choices] == ["stop", "stop"]


@pytest.mark.slow
def test_a_named_tool_choice_constrains_every_beam_to_its_call(client):
    """A named tool_choice is a structured output (vLLM's): every beam is a call of that function whose arguments
    follow its parameters' schema."""
    city = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
            "required": ["city"]}
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the weather in Paris?"}], max_tokens=30, n=2,
        tools=[{"type": "function", "function": {"name": "get_weather", "parameters": city}}],
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, extra_body={"use_beam_search": True})
    assert len(chat.choices) == 2
    for c in chat.choices:
        [call] = c.message.tool_calls
        assert call.function.name == "get_weather" and c.finish_reason == "stop"
        jsonschema.validate(json.loads(call.function.arguments), city)


def _steps(http: httpx.Client) -> float:
    """Engine steps that ran (a search's steps are not requests in the metrics: it is, once)."""
    return metric_value(http.get("/metrics").text, "painters:step_duration_seconds_count", model=MODEL)


def _idle(http: httpx.Client) -> bool:
    text = http.get("/metrics").text
    return (metric_value(text, "painters:num_requests_running", model=MODEL) == 0
            and metric_value(text, "painters:num_requests_waiting", model=MODEL) == 0)


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_goes_away_stops_the_search(http, stream):
    """No step runs after the client left: the engine settles and stays idle (a search left running would submit
    a step per token for 300 tokens, a few a second)."""
    body = {"model": MODEL, "prompt": "Once upon a time,", "max_tokens": 300, "ignore_eos": True, "n": 4,
            "use_beam_search": True, "stream": stream}
    with pytest.raises(httpx.ReadTimeout):  # a beam search streams its final result only: nothing comes before
        with http.stream("POST", "/v1/completions", json=body, timeout=httpx.Timeout(60, read=3)) as r:
            for _ in r.iter_lines():
                pass

    def settled() -> bool:
        before = _steps(http)
        time.sleep(1)
        return _idle(http) and _steps(http) == before
    wait_until(settled, timeout=60, what="the engine settles once the client left")
    done = _steps(http)
    with pytest.raises(TimeoutError):  # nothing more finishes: the search is not running on
        wait_until(lambda: _steps(http) != done, timeout=3, what="another step")
    r = http.post("/v1/completions", json={**body, "max_tokens": 2, "stream": False})
    assert r.status_code == 200 and len(r.json()["choices"]) == 4


def test_a_search_is_one_request_per_prompt_in_the_metrics(tiny):
    """Its one-token steps are not requests a Prometheus user sent: each prompt's search is counted once, with its
    prompt once, the tokens generated for its beams, one latency sample, and its best beam's finish reason."""
    def seen() -> dict[str, float]:
        text = tiny.get("/metrics").text
        return {name: metric_value(text, f"painters:{name}", policy="full") for name in (
            "request_success_total", "prompt_tokens_total", "generation_tokens_total",
            "e2e_request_latency_seconds_count", "time_to_first_token_seconds_count",
            "time_per_output_token_seconds_count")}
    before = seen()
    r = tiny.post("/v1/completions", json=_beams(prompt=["hello world", "the cat sat"], n=3, max_tokens=5,
                                                 ignore_eos=True))
    assert r.status_code == 200, r.text
    after = seen()
    grew = {name: after[name] - before[name] for name in after}
    # 2 prompts of 3 and 4 tokens (BOS included); steps 1 + 3 + 3 + 3 + 3 beams each; 4 inter-step times each
    assert grew == {"request_success_total": 2, "prompt_tokens_total": 7, "generation_tokens_total": 2 * 13,
                    "e2e_request_latency_seconds_count": 2, "time_to_first_token_seconds_count": 2,
                    "time_per_output_token_seconds_count": 2 * 4}, grew
    assert r.json()["usage"]["prompt_tokens"] == 7


def test_a_beam_answer_has_openais_shape_and_painters_timings(tiny):
    r = tiny.post("/v1/completions", json=_beams(n=3, logprobs=2, policy="skip:2", return_tokens_as_token_ids=True))
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert all(len(top) == 2 for c in body["choices"] for top in c["logprobs"]["top_logprobs"])
    assert body["usage"]["completion_tokens"] == sum(len(c["logprobs"]["tokens"]) for c in body["choices"])
    assert r.headers["x-painters-policy"] == body["painters"]["policy"] == "skip:2-3"
    timings = body["painters"]["timings"]
    assert 0 < timings["time_to_first_token_s"] <= timings["e2e_s"] and timings["decode_s"] > 0


# -- a drain that begins mid-search (a real server process, SIGTERM) ----------------------------------------------------


def _search_in_thread(url: str, *, stream: bool, into: dict[str, Any]) -> threading.Thread:
    """A width-2, 60-token search (ignore_eos: no beam ends early) from a client thread; `into[stream]` gets each
    choice's (finish_reason, token count), or the status / error that ended it otherwise."""
    body = {"model": "tiny", "prompt": "long", "max_tokens": 60, "n": 2, "use_beam_search": True, "ignore_eos": True,
            "logprobs": 0, "stream": stream}

    def run() -> None:
        try:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
                if r.status_code != 200:
                    into[stream] = r.status_code
                    return
                if stream:
                    frames = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
                else:
                    frames = [json.loads(r.read())]
            if any("error" in f for f in frames):
                into[stream] = [f["error"] for f in frames if "error" in f]
                return
            choices = [c for f in frames for c in f["choices"]]
            into[stream] = sorted((c["index"], c["finish_reason"], len(c["logprobs"]["tokens"])) for c in choices)
        except httpx.HTTPError as e:
            into[stream] = type(e).__name__
    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.slow
@pytest.mark.parametrize("drain_s, step_s, finished", [(60, 0.05, "length"), (3, 0.1, "abort")])
def test_a_search_begun_before_a_drain_runs_on_as_a_running_request(tmp_path, drain_s, step_s, finished):
    """100 ms per forward against the short drain: a search's 60 steps take 6 s or more, and SIGTERM comes
    mid-search with more than the drain's 3 s left (time, on a loaded machine too, to see the refusals below before
    the server exits; at 20 ms and 1 s it failed once beside a CI run); 50 ms against the long one, which waits for
    the searches to finish anyway. Between two steps the engine holds none of its requests; the drain still waits for
    it and admits its next steps (they were a 503). A long drain lets it finish; at a short one's deadline it ends as
    running requests do, its beams so far with finish_reason "abort". Streamed and not; the server exits 0 either
    way."""
    with rel.tiny_process(tmp_path, step_delay=step_s, env={"PAINTERS_DRAIN_TIMEOUT_S": str(drain_s)}) as p:
        got: dict[bool, Any] = {}
        steps = rel.engine_steps(p.url)
        clients = [_search_in_thread(p.url, stream=stream, into=got) for stream in (False, True)]
        wait_until(lambda: rel.engine_steps(p.url) >= steps + 12, timeout=60, what="both searches under way")
        p.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: httpx.get(f"{p.url}/ready", timeout=2).status_code == 503, timeout=5, what="/ready 503")
        assert httpx.post(f"{p.url}/v1/completions", json=_beams(model="tiny"), timeout=10).status_code == 503
        for t in clients:
            t.join(timeout=120)
        assert p.proc.wait(timeout=30) == 0
    assert ("series (beam searches) cut" in p.log.read_text()) == (finished == "abort")
    for stream in (False, True):
        answer = got[stream]
        assert isinstance(answer, list) and [a[:2] for a in answer] == [(0, finished), (1, finished)], (stream, answer)
        lengths = {n for _, _, n in answer}
        assert lengths == {60} if finished == "length" else 0 < max(lengths) < 60, (stream, answer)
