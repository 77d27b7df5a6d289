"""Scoring over HTTP against a real uvicorn server on the tiny model, checked against the model itself, plus the
statistics (mean stderr, normalised score, acc/acc_norm) on hand-made results."""

from __future__ import annotations

import asyncio
import json
import math
import socket
from collections.abc import Iterator

import httpx
import pytest
import torch
import typer
import uvicorn
from typer.testing import CliRunner

from clients.client import KEEPALIVE_EXPIRY, AsyncPaintersClient, PaintersClient
from clients.evaluate import (
    EvalError,
    EvalResult,
    Loglikelihood,
    Scorer,
    ServerInfo,
    TaskResult,
    Tokens,
    continuation_loglikelihood,
    eval_command,
    evaluate,
    mean_stderr,
    move_trailing_space,
    multiple_choice_hits,
    normalized_score,
    resolve_policy,
    rolling_windows,
    run_task,
    with_normalized,
)
from clients.tasks import TASKS, Cloze, Document, Generation, MultipleChoice, Task
from clients.types import CompletionLogprobs
from tests.conftest import CharTokenizer, tiny_llama
from tests.serving import serve_tiny

MAX_LEN = 256
BOS = CharTokenizer.bos_token_id


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with serve_tiny(max_model_len=MAX_LEN) as u:
        yield u


@pytest.fixture(scope="module")
def hf():
    return tiny_llama()  # the same seeded weights the server runs


def encode(text: str) -> list[int]:
    return CharTokenizer().encode(text)


def reference_logprobs(hf, ids: list[int]) -> list[float]:
    """log P(ids[i] | ids[:i]) for i >= 1, straight from transformers."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    return [float(lp[i - 1, ids[i]]) for i in range(1, len(ids))]


def greedy_text(hf, context: str, n: int) -> str:
    """The model's greedy n-token continuation, as text the CharTokenizer encodes back to those ids."""
    ids, out = encode(context), []
    with torch.no_grad():
        for _ in range(n):
            out.append(int(hf(torch.tensor([ids + out])).logits[0, -1].argmax()))
    assert all(3 <= i < 128 for i in out), "greedy ids must be byte tokens for this test"
    return "".join(chr(i - 3) for i in out)


def scorer(url: str, policy: str = "full", *, max_len: int = MAX_LEN):
    client = AsyncPaintersClient(url)
    return client, Scorer(client, policy, ServerInfo(max_len=max_len, prefix_id=BOS), Tokens(client))


# -- statistics on hand-made results ---------------------------------------------------------------------------


def test_mean_stderr_is_lm_evals():
    hits = [1.0, 1.0, 0.0, 1.0, 0.0]
    assert mean_stderr(hits) == pytest.approx(math.sqrt(0.6 * 0.4 / 4))  # sqrt(p(1-p)/(n-1))
    xs = [2.0, 4.0, 9.0]
    mu = sum(xs) / 3
    assert mean_stderr(xs) == pytest.approx(math.sqrt(sum((x - mu) ** 2 for x in xs) / 2) / math.sqrt(3))
    assert mean_stderr([1.0]) is None and mean_stderr([]) is None


def test_normalized_score_is_zero_at_random_and_one_at_full():
    assert normalized_score(0.55, 0.85, 0.25) == pytest.approx(0.5)
    assert normalized_score(0.25, 0.85, 0.25) == 0.0
    assert normalized_score(0.85, 0.85, 0.25) == 1.0
    assert normalized_score(0.10, 0.85, 0.25) == pytest.approx(-0.25)  # worse than guessing
    assert normalized_score(0.5, 0.25, 0.25) is None  # the full model at chance: no scale
    # below chance the scale inverts: a variant worse than full (0.18 < 0.22) would score 2.33; no score instead
    assert normalized_score(0.18, 0.22, 0.25) is None
    assert normalized_score(None, 0.8, 0.25) is None and normalized_score(0.5, None, 0.25) is None


def test_acc_and_acc_norm_pick_differently():
    item = MultipleChoice(contexts=("q",) * 2, continuations=(" a long right answer", " no"), gold=0,
                          choice_lengths=(19, 2))
    # raw: -10 < -5, the short wrong answer wins; per character: -10/19 > -5/2, the long right one wins
    assert multiple_choice_hits([-10.0, -5.0], item) == (0.0, 1.0)
    assert multiple_choice_hits([-3.0, -3.0], item) == (1.0, 1.0)  # ties go to the first choice (numpy argmax)


def result(policy: str, task: str, acc: float | None, *, random: float = 0.25, acc_norm: float | None = None):
    metrics = {} if acc_norm is None else {"acc_norm": acc_norm}
    return TaskResult(task=task, policy=policy, n=100, accuracy=acc, stderr=0.01, random_baseline=random,
                      metrics=metrics)


def test_with_normalized_and_the_json_shapes():
    raw = {"full": {"hellaswag": result("full", "hellaswag", 0.65, acc_norm=0.85),
                    "winogrande": result("full", "winogrande", 0.75, random=0.5)},
           "skip:8-21": {"hellaswag": result("skip:8-21", "hellaswag", 0.45, acc_norm=0.55),
                         "winogrande": result("skip:8-21", "winogrande", 0.5, random=0.5)}}
    out = with_normalized(raw)
    assert out["full"]["hellaswag"].normalized == 1.0
    assert out["skip:8-21"]["hellaswag"].normalized == pytest.approx((0.45 - 0.25) / (0.65 - 0.25))
    assert out["skip:8-21"]["hellaswag"].metrics["normalized_acc_norm"] == pytest.approx(0.5)
    assert out["skip:8-21"]["winogrande"].normalized == 0.0
    several = EvalResult(out).to_json()
    assert several["skip:8-21"]["winogrande"]["accuracy"] == 0.5
    assert set(several["full"]["hellaswag"]) >= {"task", "n", "accuracy", "stderr", "random_baseline", "normalized"}
    one = EvalResult({p: {"hellaswag": r["hellaswag"]} for p, r in out.items()}).to_json()
    assert one["skip:8-21"]["accuracy"] == 0.45 and one["skip:8-21"]["task"] == "hellaswag"
    no_full = with_normalized({"skip:8-21": raw["skip:8-21"]})
    assert no_full["skip:8-21"]["hellaswag"].normalized is None


def test_continuation_loglikelihood_on_hand_made_logprobs():
    lp = CompletionLogprobs(tokens=["a", "b", "c", "d"], token_logprobs=[None, -1.0, -2.0, -0.5],
                            top_logprobs=[None, {"x": -0.7}, {"y": -1.5}, {"d": -0.5}])
    assert continuation_loglikelihood(lp, 2) == Loglikelihood(logprob=-2.5, is_greedy=False, tokens=2)
    assert continuation_loglikelihood(lp, 3) == Loglikelihood(logprob=-0.5, is_greedy=True, tokens=1)
    assert continuation_loglikelihood(lp, 9).tokens == 1  # at least the last token
    assert continuation_loglikelihood(lp, 0).tokens == 3  # position 0 has no logprob


def test_move_trailing_space():
    assert move_trailing_space("Answer: ", "yes") == ("Answer:", " yes")
    assert move_trailing_space("Answer:", " yes") == ("Answer:", " yes")


@pytest.mark.parametrize("n", [0, 1, 3, 4, 7, 20])
def test_rolling_windows_score_every_token_once(n):
    tokens = list(range(10, 10 + n))
    windows = rolling_windows(tokens, prefix=1, max_len=4)
    scored = [t for seq, k in windows for t in seq[len(seq) - k:]]
    assert scored == tokens
    assert all(len(seq) <= 4 and 1 <= k < len(seq) for seq, k in windows)
    if windows:
        assert windows[0][0][0] == 1  # the first token is conditioned on the prefix token
    for seq, k in windows[1:]:  # later windows: the tokens right before the scored ones
        end = tokens.index(seq[-1]) + 1
        assert seq == tokens[end - len(seq):end]


# -- over HTTP on the tiny model --------------------------------------------------------------------------------


PAIRS = [("The cat sat on the", " mat and slept"), ("Question: why?\nAnswer:", " because"),
         ("Answer: ", "yes")]


def test_loglikelihood_over_http_equals_the_echo_of_the_full_text(url, hf):
    async def go():
        client, s = scorer(url)
        async with client:
            return await s.loglikelihoods(PAIRS)

    got = asyncio.run(go())
    with PaintersClient(url) as sync:
        for (context, continuation), ll in zip(PAIRS, got):
            context, continuation = move_trailing_space(context, continuation)
            n = len(encode(continuation))  # one token per byte
            echo = sync.completions(context + continuation, echo=True, logprobs=0, max_tokens=0)
            lps = echo.choices[0].logprobs.token_logprobs
            assert ll.tokens == n
            assert ll.logprob == pytest.approx(sum(lps[-n:]), abs=1e-5)
            # and the model itself agrees
            assert ll.logprob == pytest.approx(sum(reference_logprobs(hf, encode(context + continuation))[-n:]),
                                               abs=1e-3)


def test_the_policy_changes_the_score(url):
    async def go(policy):
        client, s = scorer(url, policy)
        async with client:
            return await s.loglikelihoods(PAIRS[:1])

    assert asyncio.run(go("full"))[0].logprob != pytest.approx(asyncio.run(go("skip:2-3"))[0].logprob, abs=1e-4)


class DropsEachPathOnce(httpx.AsyncBaseTransport):
    """A real connection to the server, but the first request to each path fails as if the server had closed the
    keep-alive connection it was sent on."""

    def __init__(self) -> None:
        self.inner, self.dropped = httpx.AsyncHTTPTransport(), []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path not in self.dropped:
            self.dropped.append(request.url.path)
            raise httpx.ReadError("connection closed", request=request)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_a_dropped_connection_is_retried_for_tokens_and_scores(url, hf):
    """A search once died on one /tokenize the server had dropped: every request a scorer sends is retried."""
    async def go():
        transport = DropsEachPathOnce()
        client = AsyncPaintersClient(url, transport=transport)
        async with client:
            s = Scorer(client, "full", ServerInfo(max_len=MAX_LEN, prefix_id=BOS), Tokens(client))
            return await s.loglikelihoods(PAIRS[:1]), transport.dropped

    (got,), dropped = asyncio.run(go())
    assert dropped == ["/tokenize", "/v1/completions"]
    context, continuation = move_trailing_space(*PAIRS[0])
    n = len(encode(continuation))  # one token per byte
    assert got.logprob == pytest.approx(sum(reference_logprobs(hf, encode(context + continuation))[-n:]), abs=1e-4)


def test_the_client_drops_idle_connections_before_the_server_closes_them(url):
    """uvicorn closes a connection idle for `timeout_keep_alive` s (the server keeps its default); a client that
    reused one at that moment would fail with ReadError, so it lets idle ones go sooner."""
    async def go():
        async with AsyncPaintersClient(url) as c:
            return c.http._transport._pool._keepalive_expiry  # httpx's pool: how long an idle connection is kept

    assert asyncio.run(go()) == KEEPALIVE_EXPIRY < uvicorn.Config(app=None).timeout_keep_alive


def test_greedy_choice_is_picked_and_flagged(url, hf):
    context = "The cat sat on the"
    greedy = greedy_text(hf, context, 3)
    others = [c for c in "qwxz" if c != greedy[0]][:3]
    mc = MultipleChoice(contexts=(context,) * 4, continuations=(greedy[0], *others), gold=0, choice_lengths=(1,) * 4)
    cloze_right = Cloze(context=context, continuation=greedy)
    cloze_wrong = Cloze(context=context, continuation=others[0] + greedy[1:])

    async def go():
        client, s = scorer(url)
        async with client:
            sem = asyncio.Semaphore(4)
            mc_result = await run_task(s, Task(TASKS["piqa"], [mc], "hand-made"), semaphore=sem)
            cloze = await run_task(s, Task(TASKS["lambada_openai"], [cloze_right, cloze_wrong], "hand-made"),
                                   semaphore=sem)
            return mc_result, cloze

    mc_result, cloze = asyncio.run(go())
    assert mc_result.accuracy == 1.0  # one-token choices: the argmax token has the highest loglikelihood
    assert mc_result.random_baseline == 0.25
    assert cloze.accuracy == 0.5  # the greedy continuation is greedy; one wrong first token is not
    assert cloze.stderr == pytest.approx(math.sqrt(0.25 / 1))
    assert cloze.metrics["perplexity"] > 1


def test_too_long_context_is_left_truncated_by_token_ids(url, hf):
    context = "".join(chr(97 + i % 26) for i in range(300))  # 300 tokens > max_model_len 256
    continuation = " end"

    async def go():
        client, s = scorer(url)
        async with client:
            return (await s.loglikelihoods([(context, continuation)]))[0]

    ll = asyncio.run(go())
    kept = encode(context + continuation)[-MAX_LEN:]
    assert ll.tokens == 4
    assert ll.logprob == pytest.approx(sum(reference_logprobs(hf, kept)[-4:]), abs=1e-3)


def test_rolling_perplexity_matches_the_model(url, hf):
    doc = Document("Robert is an English film , television and theatre actor . " * 2)

    async def go(max_len):
        client, s = scorer(url, max_len=max_len)
        async with client:
            return await run_task(s, Task(TASKS["wikitext"], [doc], "hand-made"), semaphore=asyncio.Semaphore(4))

    one_window, windows = asyncio.run(go(MAX_LEN)), asyncio.run(go(32))
    ids = encode(doc.text)
    ref = sum(reference_logprobs(hf, [BOS] + ids))  # one window: every token given the BOS prefix
    assert one_window.metrics["tokens"] == len(ids) and one_window.accuracy is None
    assert one_window.metrics["token_perplexity"] == pytest.approx(math.exp(-ref / len(ids)), rel=1e-4)
    assert one_window.metrics["word_perplexity"] == pytest.approx(math.exp(-ref / doc.words), rel=1e-3)
    assert one_window.metrics["bits_per_byte"] == pytest.approx(-ref / doc.bytes / math.log(2), rel=1e-4)
    # shorter windows see less context: a different (here: worse or equal) perplexity over the same tokens
    assert windows.metrics["tokens"] == len(ids)
    assert windows.metrics["token_perplexity"] != pytest.approx(one_window.metrics["token_perplexity"], rel=1e-6)


def test_generation_task_truncates_long_prompts(url):
    items = [Generation(prompt="Question: 2+2?\nAnswer:", answer="4", stop=("Question:", "\n\n")),
             Generation(prompt="x" * 300, answer="4", stop=("Question:",))]

    async def go():
        client, s = scorer(url)
        async with client:
            return await run_task(s, Task(TASKS["gsm8k"], items, "hand-made"), semaphore=asyncio.Semaphore(2), max_gen_tokens=4)

    r = asyncio.run(go())
    assert r.n == 2 and r.accuracy == 0.0  # the tiny tokenizer decodes to letters only: never a number
    assert r.metrics["truncated_prompts"] == 1.0 and r.random_baseline == 0.0


def piqa_rows(n: int) -> list[dict]:
    return [{"goal": f"How do I do thing {i}?", "sol1": "Carefully.", "sol2": "With a hammer.", "label": i % 2}
            for i in range(n)]


def test_evaluate_keys_by_canonical_policy(url, tmp_path):
    path = tmp_path / "piqa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in piqa_rows(4)))
    from clients.tasks import load_task

    task = load_task("piqa", path=path)
    out = asyncio.run(evaluate(url, [task], ["full", "skip:2,3", {"kind": "skip", "layers": [2, 3]}],  # type: ignore[list-item]
                               concurrency=4))
    assert list(out.results) == ["full", "skip:2-3"]  # the duplicate runs once
    full, skip = out.results["full"]["piqa"], out.results["skip:2-3"]["piqa"]
    assert full.n == skip.n == 4 and full.random_baseline == 0.5
    assert full.stderr == pytest.approx(mean_stderr([1.0] * round(full.accuracy * 4) + [0.0] * round(4 - full.accuracy * 4)))
    assert skip.normalized == normalized_score(skip.accuracy, full.accuracy, 0.5)


def test_the_result_cache_tells_models_by_what_they_compute_not_their_name(url, tmp_path):
    """Two servers both calling their model "tiny" (a served name is the alias or directory name: another checkpoint
    or dtype under the same name) share no cached result; the same server's results are reused."""
    from clients.evaluate import EvalSession
    from clients.tasks import load_task
    from tests.conftest import tiny_llama_with_identity_layer

    path = tmp_path / "piqa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in piqa_rows(4)))
    task, cache = load_task("piqa", path=path), tmp_path / "cache"

    async def score(u: str) -> tuple[list[float], int]:
        async with EvalSession.open(u, concurrency=4, cache_dir=cache) as s:
            return (await s.score("full", task)).soft, s.spent.requests

    first, sent = asyncio.run(score(url))
    assert sent > 0 and asyncio.run(score(url)) == (first, 0)  # the same model: from the cache
    with serve_tiny(model_factory=lambda: tiny_llama_with_identity_layer(2, hidden_size=64),
                    max_model_len=MAX_LEN) as other:
        theirs, sent = asyncio.run(score(other))
    assert sent > 0 and theirs != first


def test_resolve_policy_rejects_a_bad_policy(url):
    async def go():
        async with AsyncPaintersClient(url) as client:
            return await resolve_policy(client, "pairs:1-4"), await resolve_policy(client, "bogus:1")

    with pytest.raises(EvalError, match="policy 'bogus:1' was rejected by the server"):
        asyncio.run(go())


def test_eval_command_json_and_errors(url, tmp_path):
    path = tmp_path / "piqa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in piqa_rows(5)))
    app = typer.Typer()
    app.command("eval")(eval_command)
    app.command("other")(lambda: None)  # two commands: typer keeps the "eval" name
    runner = CliRunner()
    ok = runner.invoke(app, ["eval", "--url", url, "--task", "piqa", "--data", str(path), "--policies", "full,skip:2",
                             "--limit", "3", "--json", "--concurrency", "4"])
    assert ok.exit_code == 0, ok.output
    out = json.loads(ok.stdout)
    assert list(out) == ["full", "skip:2-3"]
    assert out["skip:2-3"]["n"] == 3 and out["skip:2-3"]["task"] == "piqa"
    assert {"accuracy", "stderr", "random_baseline", "normalized"} <= set(out["full"])
    bad = runner.invoke(app, ["eval", "--url", url, "--task", "piqa", "--data", str(path), "--policies", "bogus:1"])
    assert bad.exit_code == 2 and "rejected by the server" in bad.stderr
    missing = runner.invoke(app, ["eval", "--url", url, "--task", "piqa,hellaswag", "--data", str(path)])
    assert missing.exit_code == 2 and "one file but 2 tasks" in missing.stderr


def test_eval_command_without_a_server_says_so(tmp_path):
    path = tmp_path / "piqa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in piqa_rows(2)))
    app = typer.Typer()
    app.command("eval")(eval_command)
    app.command("other")(lambda: None)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = CliRunner().invoke(app, ["eval", "--url", f"http://127.0.0.1:{port}", "--task", "piqa", "--data", str(path)])
    assert r.exit_code == 2 and "cannot reach the server" in r.stderr
