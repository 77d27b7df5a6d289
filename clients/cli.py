"""The client-side `painters` commands (they talk to a running server over HTTP and never import it): `loadtest`
here; `eval`, `tradeoff`, `probe`, `study` and `search` in their own modules. `register(app)` adds them all to the
`painters` typer app. Each shows a progress bar and nothing else while it runs (`--verbose` adds httpx's request
logs), prints tables that never cut a policy name, and has `--json`."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Annotated

import typer

from clients.console import VerboseOpt, console, fail, progress_bar, quiet_http_logs

UrlOpt = Annotated[str, typer.Option(help="the server's base URL")]
ApiKeyOpt = Annotated[str | None, typer.Option(help="sent as 'Authorization: Bearer KEY'")]
ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="model name in the request body (default: "
                                                 "the server's)")]


def loadtest(
    url: UrlOpt = "http://127.0.0.1:8000",
    policies: Annotated[list[str] | None, typer.Option(
        "--policies", "-p", help="comma-separated policies or preset names, e.g. full,skip:8 (repeatable)")] = None,
    all_presets: Annotated[bool, typer.Option(
        help="also every preset the server lists in GET /v1/models, plus its default policy")] = False,
    concurrency: Annotated[int | None, typer.Option(
        help="requests in flight (default 8 without --request-rate; a cap with it)", min=1)] = None,
    request_rate: Annotated[float | None, typer.Option(
        help="Poisson arrivals, requests/s; inf = all at once")] = None,
    requests: Annotated[int | None, typer.Option(
        help="measured requests per policy (default 32 without --duration)", min=1)] = None,
    duration: Annotated[float | None, typer.Option(help="stop issuing after this many seconds per policy")] = None,
    prompts: Annotated[Path | None, typer.Option(
        help="JSONL with a \"prompt\" field, or one prompt per line (default: 20 built-in prompts)",
        exists=True, dir_okay=False)] = None,
    max_tokens: Annotated[int, typer.Option(help="new tokens per request", min=1)] = 128,
    warmup: Annotated[int, typer.Option(help="unmeasured requests per policy before its run", min=0)] = 2,
    ignore_eos: Annotated[bool, typer.Option(help="generate max_tokens every time, so token counts are fixed")] = True,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.0,
    seed: Annotated[int, typer.Option(help="prompt order and arrival times")] = 0,
    model: ModelOpt = None,
    api_key: ApiKeyOpt = None,
    timeout: Annotated[float, typer.Option(help="seconds per request")] = 600.0,
    csv_path: Annotated[Path | None, typer.Option("--csv", help="also write one row per policy here")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object keyed by canonical policy")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Load-test a running server: each policy in turn, streaming completions; TTFT, TPOT, ITL, E2E, throughput."""
    from clients.loadtest import (
        BUILTIN_PROMPTS, LoadtestError, LoadtestResult, list_presets, load_prompts, run_loadtest, split_policies,
    )

    quiet_http_logs(verbose=verbose)
    chosen = split_policies(policies or [])
    if not chosen and not all_presets:
        raise fail("give --policies P1,P2 (e.g. full,skip:8) or --all-presets")
    if concurrency is None and request_rate is None:
        concurrency = 8
    if requests is None and duration is None:
        requests = 32
    try:
        texts = load_prompts(prompts) if prompts else list(BUILTIN_PROMPTS)
        if all_presets:
            chosen = list(dict.fromkeys([*asyncio.run(list_presets(url, api_key=api_key)), *chosen]))
        with progress_bar() as progress:
            results = asyncio.run(run_loadtest(
                url, chosen, concurrency=concurrency, request_rate=request_rate, requests=requests,
                duration=duration, prompts=texts, max_tokens=max_tokens, warmup=warmup, model=model, api_key=api_key,
                ignore_eos=ignore_eos, temperature=temperature, seed=seed, timeout=timeout, progress=progress))
    except (LoadtestError, ValueError, OSError) as e:
        raise fail(str(e)) from None
    result = LoadtestResult(results)
    if csv_path is not None:
        result.write_csv(csv_path)
    if as_json:
        typer.echo(json.dumps(result.to_json()))
        return
    console.print(_title(url, concurrency=concurrency, request_rate=request_rate, requests=requests,
                         duration=duration, max_tokens=max_tokens), markup=False, highlight=False, soft_wrap=True)
    result.table().print(console)


def _title(url: str, *, concurrency: int | None, request_rate: float | None, requests: int | None,
           duration: float | None, max_tokens: int) -> str:
    if request_rate is None:
        load = f"concurrency {concurrency}"
    else:
        load = "all at once" if math.isinf(request_rate) else f"Poisson {request_rate:g} req/s"
        load += f", at most {concurrency} in flight" if concurrency else ""
    stop = " or ".join(([f"{requests} requests"] if requests else []) + ([f"{duration:g} s"] if duration else []))
    return f"loadtest {url}: {load}, {stop} per policy, {max_tokens} tokens each"


def register(app: typer.Typer) -> None:
    """Add the client-side commands to the `painters` app."""
    from clients.evaluate import eval_command
    from clients.probe import probe_command
    from clients.search import search_command
    from clients.study import study_command
    from clients.tradeoff import tradeoff_command

    app.command("loadtest")(loadtest)
    app.command("eval")(eval_command)
    app.command("tradeoff")(tradeoff_command)
    app.command("probe")(probe_command)
    app.command("study")(study_command)
    app.command("search")(search_command)
