"""`painters loadtest`: the load generator and its statistics against a real uvicorn server on the tiny model, the
pure pieces (percentiles, arrivals, prompt files, policy lists) on their own, and the command through CliRunner."""

from __future__ import annotations

import asyncio
import csv
import itertools
import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from clients.cli import register
from clients.loadtest import (
    BUILTIN_PROMPTS, Distribution, LoadtestError, LoadtestResult, PolicyResult, arrival_gaps, load_prompts, percentile,
    run_loadtest, split_policies,
)
from tests.serving import serve_tiny

PROMPTS = ["hello world", "the quick brown fox", "abc", "painters at work", "one two three four"]
PRESETS = {"fast": "skip:2", "wide": "parallel:1-4"}


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    presets = tmp_path_factory.mktemp("presets") / "presets.json"
    presets.write_text(json.dumps(PRESETS))
    with serve_tiny(policy_presets=presets) as u:
        yield u


def run(url: str, policies: list[str], **kwargs) -> dict[str, PolicyResult]:
    kwargs = {"prompts": PROMPTS, "max_tokens": 8, "warmup": 0, **kwargs}
    return asyncio.run(run_loadtest(url, policies, **kwargs))


def max_in_flight(result: PolicyResult) -> int:
    events = sorted([(r.start_s, 1) for r in result.requests] + [(r.start_s + r.e2e_s, -1) for r in result.requests])
    return max(itertools.accumulate(delta for _, delta in events))


# -- the pure pieces ----------------------------------------------------------------------------------------------


def test_percentiles_interpolate_like_numpy() -> None:
    values = [1.0, 2.0, 3.0, 4.0, 10.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 90) == pytest.approx(7.6)
    assert percentile(values, 100) == 10.0 and percentile([5.0], 99) == 5.0
    d = Distribution.of([0.004, 0.001, 0.002, 0.003])
    assert d.count == 4 and d.mean == pytest.approx(0.0025) and d.p50 == pytest.approx(0.0025)
    assert d.to_json("ttft") == pytest.approx({"mean_ttft_ms": 2.5, "p50_ttft_ms": 2.5, "p90_ttft_ms": 3.7,
                                               "p99_ttft_ms": 3.97})
    assert Distribution.of([]).to_json("itl")["p99_itl_ms"] is None


def test_poisson_arrivals() -> None:
    gaps = list(itertools.islice(arrival_gaps(20.0, seed=3), 4000))
    assert sum(gaps) / len(gaps) == pytest.approx(1 / 20, rel=0.1)  # exponential with mean 1/rate
    assert min(gaps) >= 0 and len(set(gaps)) == len(gaps)
    assert gaps[:5] == list(itertools.islice(arrival_gaps(20.0, seed=3), 5))  # seeded
    assert set(itertools.islice(arrival_gaps(math.inf, seed=0), 10)) == {0.0}
    assert set(itertools.islice(arrival_gaps(None, seed=0), 10)) == {0.0}


def test_split_policies_keeps_commas_inside_a_policy() -> None:
    assert split_policies(["full,skip:8"]) == ["full", "skip:8"]
    assert split_policies(["skip:3,5,9-11,pairs", "schedule:0-9,10+11/pairs,12-29"]) == [
        "skip:3,5,9-11", "pairs", "schedule:0-9,10+11/pairs,12-29"]
    assert split_policies(['{"kind": "skip", "count": 2},full']) == ['{"kind": "skip", "count": 2}', "full"]


def test_load_prompts(tmp_path: Path) -> None:
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a, b"}\n\n{"prompt": "c", "id": 2}\n')
    assert load_prompts(jsonl) == ["a, b", "c"]
    text = tmp_path / "p.txt"
    text.write_text("first prompt\nsecond prompt\n")
    assert load_prompts(text) == ["first prompt", "second prompt"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*\"prompt\""):
        load_prompts(bad)
    assert 15 <= len(BUILTIN_PROMPTS) <= 30 and len(set(BUILTIN_PROMPTS)) == len(BUILTIN_PROMPTS)


# -- against the server -------------------------------------------------------------------------------------------


def test_two_policies_at_fixed_concurrency(url: str) -> None:
    results = run(url, ["full", "skip:2"], concurrency=2, requests=6, warmup=1)
    assert list(results) == ["full", "skip:2-3"]  # keyed by the server's canonical name, in the order given
    for name, r in results.items():
        assert r.completed == 6 and r.failed == 0 and not r.errors
        assert [q.output_tokens for q in r.requests] == [8] * 6  # ignore_eos: exactly max_tokens each
        assert {q.policy for q in r.requests} == {name}
        assert r.output_tokens == 48 and r.input_tokens == sum(q.prompt_tokens for q in r.requests)
        assert sorted(q.prompt_tokens for q in r.requests[:5]) == sorted(len(p) for p in PROMPTS)  # each prompt once
        # One gap per text chunk after the first: 7 a request, fewer where a token decodes to no text (bos/eos/pad).
        assert r.itl.count == sum(len(q.itl_s) for q in r.requests) and all(len(q.itl_s) <= 7 for q in r.requests)
        assert r.itl.count > 6 * 4 and r.ttft.count == r.tpot.count == r.e2e.count == 6
        for d in (r.ttft, r.tpot, r.itl, r.e2e):
            assert 0 < d.p50 <= d.p90 <= d.p99
        assert r.ttft.p99 <= r.e2e.p99
        assert max_in_flight(r) == 2
        assert r.request_throughput == pytest.approx(6 / r.duration_s)
        assert r.output_throughput == pytest.approx(48 / r.duration_s)
    assert results["skip:2-3"].requested == "skip:2"
    out = json.loads(json.dumps(LoadtestResult(results).to_json()))
    assert set(out) == {"full", "skip:2-3"}
    row = out["skip:2-3"]
    assert row["completed"] == 6 and row["failed"] == 0 and row["errors"] == {}
    assert all(isinstance(v, (int, float)) for k, v in row.items() if k not in ("policy", "requested", "errors"))
    assert row["p99_e2e_ms"] == pytest.approx(results["skip:2-3"].e2e.p99 * 1e3)


def test_poisson_request_rate(url: str) -> None:
    rate = 40.0
    r = run(url, ["pairs"], request_rate=rate, requests=5)["pairs:1-4"]
    assert r.completed == 5 and r.failed == 0
    # Each request leaves no earlier than the seeded Poisson schedule says.
    due = list(itertools.accumulate(itertools.islice(arrival_gaps(rate, seed=0), 4)))
    starts = [q.start_s for q in r.requests]
    assert starts == sorted(starts)
    assert all(s >= d - 1e-3 for s, d in zip(starts[1:], due))
    at_once = run(url, ["pairs"], request_rate=math.inf, requests=4)["pairs:1-4"]
    assert at_once.completed == 4 and max(q.start_s for q in at_once.requests) < 0.5 and max_in_flight(at_once) > 1


def test_duration_stops_issuing(url: str) -> None:
    r = run(url, ["full"], concurrency=2, duration=0.5, max_tokens=4)["full"]
    assert r.completed >= 2 and r.failed == 0
    assert all(q.start_s < 0.5 for q in r.requests)
    assert r.duration_s >= max(q.start_s + q.e2e_s for q in r.requests) - 1e-6
    first = run(url, ["full"], concurrency=2, duration=60, requests=3, max_tokens=4)["full"]
    assert first.completed == 3 and first.duration_s < 60  # whichever limit comes first


def test_bad_policy_fails_fast(url: str) -> None:
    with pytest.raises(LoadtestError, match=r"policy 'bogus' was rejected by the server \(HTTP 400\).*allowed forms"):
        run(url, ["full", "bogus"], concurrency=2, requests=50)
    with pytest.raises(LoadtestError, match="max_model_len 128"):
        run(url, ["full"], concurrency=1, requests=1, prompts=["x" * 100], max_tokens=64)
    with pytest.raises(LoadtestError, match="cannot reach the server"):
        run("http://127.0.0.1:9", ["full"], concurrency=1, requests=1, timeout=2)
    with pytest.raises(ValueError, match="concurrency"):
        run(url, ["full"], requests=1)


def test_same_canonical_policy_runs_once(url: str) -> None:
    results = run(url, ["skip:2", "fast", "skip:2-3"], concurrency=1, requests=1)
    assert list(results) == ["skip:2-3"] and results["skip:2-3"].requested == "skip:2"


def test_failed_requests_are_counted_not_fatal() -> None:
    # One sequence at a time and one waiting: a burst of 8 gets 429s for most of them.
    with serve_tiny(max_num_seqs=1, queue_capacity=1) as busy:
        r = run(busy, ["full"], request_rate=math.inf, requests=8, max_tokens=16)["full"]
    assert r.completed + r.failed == 8 and r.completed >= 1 and r.failed >= 1
    assert all("HTTP 429" in message for message in r.errors) and sum(r.errors.values()) == r.failed
    assert r.ttft.count == r.e2e.count == r.completed and r.output_tokens == 16 * r.completed


# -- the command ----------------------------------------------------------------------------------------------------


@pytest.fixture
def cli() -> typer.Typer:
    app = typer.Typer()
    app.callback()(lambda: None)  # a group, so `loadtest` stays a subcommand as in `painters`
    register(app)
    return app


def test_cli_json_and_csv(cli: typer.Typer, url: str, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    table = tmp_path / "out.csv"
    result = CliRunner().invoke(cli, [
        "loadtest", "--url", url, "--policies", "full,skip:2", "--concurrency", "2", "--requests", "3",
        "--max-tokens", "4", "--warmup", "1", "--prompts", str(prompts), "--json", "--csv", str(table)])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert set(out) == {"full", "skip:2-3"}
    assert out["full"]["completed"] == 3 and out["full"]["total_output_tokens"] == 12
    rows = list(csv.DictReader(table.open()))
    assert [row["policy"] for row in rows] == ["full", "skip:2-3"]
    assert float(rows[1]["p99_ttft_ms"]) == pytest.approx(out["skip:2-3"]["p99_ttft_ms"])


def test_cli_table_and_all_presets(cli: typer.Typer, url: str, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    result = CliRunner().invoke(cli, ["loadtest", "--url", url, "--all-presets", "--concurrency", "2", "--requests",
                                      "2", "--max-tokens", "4", "--warmup", "0", "--prompts", str(prompts), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert set(out) == {"full", "skip:2-3", "parallel:1-4"}
    assert out["skip:2-3"]["requested"] == "fast" and out["parallel:1-4"]["requested"] == "wide"
    table = CliRunner().invoke(cli, ["loadtest", "--url", url, "-p", "pairs", "--request-rate", "inf", "--requests",
                                     "2", "--max-tokens", "4", "--warmup", "0", "--prompts", str(prompts)])
    assert table.exit_code == 0, table.output
    assert "all at once, 2 requests per policy, 4 tokens each" in table.stdout
    lines = table.stdout.splitlines()
    # not a terminal: the plain layout, every name whole, no box drawing
    assert any(line.split() == ["metric", "pairs:1-4"] for line in lines)
    assert any(line.split() == ["as", "given", "pairs"] for line in lines)
    assert "TTFT p99 (ms)" in table.stdout and "┃" not in table.stdout


def test_cli_errors_exit_2(cli: typer.Typer, url: str, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    bad = CliRunner().invoke(cli, ["loadtest", "--url", url, "--policies", "full,bogus", "--requests", "2",
                                   "--prompts", str(prompts)])
    assert bad.exit_code == 2 and "'bogus' was rejected" in bad.stderr
    # The built-in prompts are longer than the tiny server's 128-token context: caught before anything runs.
    long = CliRunner().invoke(cli, ["loadtest", "--url", url, "--policies", "full", "--requests", "2"])
    assert long.exit_code == 2 and "HTTP 400" in long.stderr and "max_model_len" in long.stderr \
        and "rejected" not in long.stderr
    none = CliRunner().invoke(cli, ["loadtest", "--url", url])
    assert none.exit_code == 2 and "--policies" in none.stderr


def test_clients_never_import_the_server() -> None:
    import subprocess
    import sys

    code = ("import sys, clients.cli, clients.loadtest, clients.client\n"
            "bad = sorted(m for m in sys.modules if m == 'server' or m.startswith('server.'))\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- the client's own timing, against a scripted server (a fixed service time, exact token counts) -------------------


def _scripted(*, service_s: float, tokens: int, finish: str = "length", texts: list[str] | None = None):
    """An httpx transport answering every streamed completion like the server: `tokens` chunks over `service_s`
    seconds, the last with `finish`, then the usage chunk. texts: each chunk's text (default "x")."""
    import httpx

    class Stream(httpx.AsyncByteStream):
        async def __aiter__(self):
            for i in range(tokens):
                await asyncio.sleep(service_s / tokens)
                text = texts[i] if texts else "x"
                choice = {"index": 0, "text": text, "finish_reason": finish if i == tokens - 1 else None}
                yield f"data: {json.dumps({'choices': [choice], 'painters': {'policy': 'full'}})}\n\n".encode()
            usage = {"prompt_tokens": 3, "completion_tokens": tokens}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode()
            yield b"data: [DONE]\n\n"

    return httpx.MockTransport(lambda request: httpx.Response(
        200, headers={"content-type": "text/event-stream"}, stream=Stream()))


def _measure(transport, **kwargs) -> PolicyResult:
    from clients.client import AsyncPaintersClient
    from clients.loadtest import _measure as measure

    async def go() -> PolicyResult:
        async with AsyncPaintersClient("http://scripted", transport=transport) as client:
            results, wall = await measure(client, "full", ["a", "b", "c"], options={"max_tokens": 4}, seed=0,
                                          on_done=lambda r: None, **kwargs)
        return PolicyResult.from_requests("full", "full", results, wall)

    return asyncio.run(go())


def test_a_chunk_with_empty_text_is_a_token() -> None:
    """The server streams a chunk per token even when its text is empty (held back as a possible stop string, a
    partial character, a special token). Counting only chunks with text moved TTFT to the first visible text and
    dropped inter-token gaps: TPOT read low, and a policy faster than it is."""
    r = _measure(_scripted(service_s=0.08, tokens=8, texts=["", "", "", "a", "b", "c", "d", "e"]),
                 requests=1, duration=None, concurrency=1, request_rate=None)
    [q] = r.requests
    # every chunk after the first is a gap (counting only those with text: 4); no bound on the times themselves,
    # which a loaded machine stretches
    assert len(q.itl_s) == 7 and q.output_tokens == 8 and q.ttft_s is not None, q


def test_a_request_the_server_aborted_is_a_failure() -> None:
    r = _measure(_scripted(service_s=0.01, tokens=2, finish="abort"), requests=3, duration=None, concurrency=1,
                 request_rate=None)
    assert r.completed == 0 and r.failed == 3 and "abort" in r.requests[0].error


def test_paced_arrivals_keep_their_schedule_while_requests_wait_for_a_slot() -> None:
    """At a rate with a concurrency cap, a request due while every slot is busy waits in its own task: the arrivals
    after it keep the seeded schedule. Waiting in the issuing loop (and sleeping each gap from the loop's last turn)
    pushed every later arrival back: the run issued below the asked rate."""
    rate, service, n = 8.0, 0.1, 24
    r = _measure(_scripted(service_s=service, tokens=2), requests=n, duration=None, concurrency=1,
                 request_rate=rate)
    due = [0.0, *itertools.accumulate(itertools.islice(arrival_gaps(rate, seed=0), n - 1))]
    runs = sorted((q.start_s, q.start_s + q.e2e_s) for q in r.requests)
    # one slot: each should start when it is due or when the one before it ended, whichever is later
    late = [start - max(d, prev_end) for d, (start, _), (_, prev_end) in zip(due[1:], runs[1:], runs)]
    assert all(x >= -1e-3 for x in late)
    assert sum(late) / len(late) < 0.01, late  # 0.5 ms here; 67 ms when arrivals drifted
