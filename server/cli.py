"""The `painters` command line: generate, bench, serve, the conversion cache, and the HTTP clients."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from clients.cli import register as register_client_commands

from server.model.loader import DEFAULT_MODEL

if TYPE_CHECKING:
    from server.settings import Settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Painters: per-request layer policies for frozen LLMs.")
console = Console()
err = Console(stderr=True)

ModelOpt = Annotated[str, typer.Option("--model", "-m",
                                        help="alias (smollm2-135m, gemma3-270m), HF directory, .gguf file or hub id")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda or cuda:N; default: cuda when present")]


def _device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def _fail(message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/] {escape(message)}")
    return typer.Exit(2)


@app.command()
def generate(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="prompt text")],
    model: ModelOpt = DEFAULT_MODEL,
    policy: Annotated[str, typer.Option(help="layer policy, e.g. full, skip:10, pairs:4-25, loop:8-22x3")] = "full",
    max_tokens: Annotated[int, typer.Option(help="new tokens at most")] = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: Optional[int] = None,
    stop: Annotated[Optional[list[str]], typer.Option(help="stop string (repeatable)")] = None,
    ignore_eos: bool = False,
    logprobs: Annotated[int, typer.Option(help="top-n alternatives per token")] = 0,
    echo: Annotated[bool, typer.Option(help="also score the prompt tokens")] = False,
    chat: Annotated[bool, typer.Option(help="wrap the prompt in the model's chat template")] = False,
    device: DeviceOpt = None,  # type: ignore[assignment]
    group_mode: Annotated[str, typer.Option(help="parallel groups as 'batched' matmuls or CUDA 'streams'")] = "batched",
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Generate text from a prompt under a layer policy."""
    from server.engine.generate import Engine
    from server.model.loader import ModelLoadError, load_model
    from server.policy.policy import PolicyError, as_policy
    from server.engine.sampling import SamplingError, SamplingParams

    try:
        parsed = as_policy(policy)
        params = SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
            stop=tuple(stop or ()), ignore_eos=ignore_eos, logprobs=logprobs, echo=echo,
        )
        if group_mode not in ("batched", "streams"):
            raise PolicyError(f"--group-mode must be 'batched' or 'streams', got {group_mode!r}")
        loaded = load_model(model, device=_device(device))
        engine = Engine.from_loaded(loaded, group_mode=group_mode, name=model)  # type: ignore[arg-type]
        engine.compile(parsed)
    except (PolicyError, SamplingError, ModelLoadError, ValueError) as e:
        raise _fail(str(e)) from None
    inputs: str | list[int] = prompt
    if chat:  # the template writes its special tokens (a BOS) itself: encode it without adding them again
        inputs = engine.encode(loaded.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                                  tokenize=False, add_generation_prompt=True),
                             add_special_tokens=False)
    result = engine.generate([inputs], policy=parsed, params=params)[0]
    if as_json:
        t = result.timings
        out = asdict(result)
        out["timings"] = {"queue_s": t.queue_s, "prefill_s": t.prefill_s, "decode_s": t.decode_s, "ttft_s": t.ttft_s,
                          "tpot_s": t.tpot_s, "per_token_s": t.per_token_s,
                          "tokens_per_s": len(t.per_token_s) / t.decode_s if t.decode_s else None}
        out["model"] = model
        print(json.dumps(out))
        return
    console.print(result.text, markup=False, highlight=False)
    t = result.timings
    rate = f", {len(t.per_token_s) / t.decode_s:.1f} tok/s" if t.decode_s else ""
    err.print(f"[dim]policy {result.policy} | {len(result.token_ids)} tokens, finish {result.finish_reason} | "
              f"prefill {t.prefill_s * 1e3:.0f} ms, decode {t.decode_s * 1e3:.0f} ms{rate}[/]")


@app.command()
def bench(
    model: ModelOpt = DEFAULT_MODEL,
    device: DeviceOpt = None,  # type: ignore[assignment]
    new_tokens: Annotated[int, typer.Option(min=2, help="decoded tokens per timed run")] = 128,
    repeats: Annotated[int, typer.Option(min=1, help="timed runs per policy (median)")] = 3,
    random_weights: Annotated[bool, typer.Option(help="random weights of a named shape instead of a real model")] = False,
    baseline: Annotated[bool, typer.Option(help="also time transformers generate")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object with P1, P2, P3")] = False,
) -> None:
    """Decode tok/s per policy against transformers generate; ratios P1 (speed), P2 (skip efficiency), P3 (pairs)."""
    from server.engine.bench import render, run_bench

    result = run_bench(model=model, device=_device(device), new_tokens=new_tokens, repeats=repeats,
                       random_weights=random_weights, baseline=baseline)
    if as_json:
        print(json.dumps(result.to_json()))
    else:
        console.print(render(result))


@app.command()
def serve(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="alias, HF directory, .gguf or hub id")] = None,
    host: Annotated[Optional[str], typer.Option(help="bind address (default 127.0.0.1)")] = None,
    port: Annotated[Optional[int], typer.Option(help="port (default 8000)")] = None,
    policy_presets: Annotated[Optional[Path], typer.Option(help="YAML/JSON file of name: policy presets")] = None,
    default_policy: Annotated[Optional[str], typer.Option(help="policy for requests that name none")] = None,
    device: DeviceOpt = None,  # type: ignore[assignment]
    max_num_seqs: Annotated[Optional[int], typer.Option(help="sequences decoded at once")] = None,
    scheduling_policy: Annotated[Optional[str], typer.Option(
        help="which waiting request goes first: fcfs (default; every priority must be 0) or priority (lower "
        "values first, as vLLM's)")] = None,
    chunked_prefill_size: Annotated[Optional[int], typer.Option(
        min=0, help="prompt tokens prefilled per step at most; a longer prompt is computed a piece per step while "
        "the running requests decode (default 512 on the CPU, 8192 on CUDA; 0: whole prompts)")] = None,
    speculative_config: Annotated[Optional[str], typer.Option(
        help="speculative decoding as JSON, vLLM's flag: {\"method\": \"ngram\", \"num_speculative_tokens\": 4} "
        "(prompt lookup; prompt_lookup_max, prompt_lookup_min) or {\"method\": \"layer_skip\", "
        "\"draft_policy\": \"skip:8\", \"num_speculative_tokens\": 3} (the model's own layers draft); the tokens "
        "are those of decoding without it")] = None,
    enable_prompt_tokens_details: Annotated[Optional[bool], typer.Option(
        "--enable-prompt-tokens-details", help="completions' and chat's final usage says how many prompt tokens "
        "the prefix cache held (prompt_tokens_details.cached_tokens, as vLLM's flag)")] = None,
    api_key: Annotated[Optional[list[str]], typer.Option(
        help="require 'Authorization: Bearer KEY' (repeatable; or PAINTERS_API_KEY=k1,k2)")] = None,
    api_key_file: Annotated[Optional[Path], typer.Option(help="file of accepted API keys, one per line")] = None,
    metrics_require_key: Annotated[Optional[bool], typer.Option(
        "--metrics-require-key/--metrics-open", help="whether GET /metrics needs a key too")] = None,
    max_body_bytes: Annotated[Optional[int], typer.Option(help="largest request body (413 above)")] = None,
    drain_timeout: Annotated[Optional[float], typer.Option(
        help="seconds running requests may finish after SIGTERM before they are aborted")] = None,
    threads: Annotated[Optional[int], typer.Option(help="torch CPU threads (per replica under --replicas)")] = None,
    tool_call_parser: Annotated[Optional[str], typer.Option(
        help="serve tool_choice 'auto' by reading the model's tool calls in this format: hermes "
        "(<tool_call>{...}</tool_call>); without it 'auto' is refused")] = None,
    attention: Annotated[Optional[str], typer.Option(
        help="decode attention over the KV cache: auto (default: triton on CUDA where it measures faster, else "
        "gathered), gathered, in_place (FlexAttention) or triton (CUDA)")
    ] = None,
    fuse_decode: Annotated[Optional[bool], typer.Option(
        "--fuse-decode/--no-fuse-decode", help="captured decode steps run the layer math through torch.compile "
        "(CUDA; default off)")] = None,
    overlap_decode: Annotated[Optional[bool], typer.Option(
        "--overlap-decode/--no-overlap-decode", help="queue each decode step before reading the last one's tokens "
        "(default: on for CUDA, off on the CPU)")] = None,
    replicas: Annotated[Optional[int], typer.Option(
        min=1, help="serve N replicas on Ray Serve (needs painters\\[ray]); default: one process, no Ray")] = None,
    address: Annotated[Optional[str], typer.Option(
        help="with --replicas: join this Ray cluster (e.g. ray://head:10001 or auto); default: a local Ray")] = None,
    routing: Annotated[str, typer.Option(
        help="with --replicas: 'affinity' (by schedule and prefix) or Ray's 'default' (two random, less loaded)")
    ] = "affinity",
    ray_cpus: Annotated[Optional[int], typer.Option(help="with --replicas and no --address: the local Ray's CPUs")
                        ] = None,
    gpus_per_replica: Annotated[Optional[float], typer.Option(
        min=0, help="with --replicas: GPUs each replica asks Ray for (fractions share a GPU); default: this "
        "machine's GPUs shared evenly, at most 1, or 0 on the CPU")] = None,
    log_level: str = "info",
) -> None:
    """Start the HTTP server (OpenAI-compatible and native endpoints, /metrics) with uvicorn, or with --replicas on
    Ray Serve. SIGTERM drains it; it exits non-zero if the engine fails."""
    from server.app import create_app, serve as run_server
    from server.settings import Settings

    overrides = dict(model=model, host=host, port=port, policy_presets=policy_presets, default_policy=default_policy,
                     device=device, max_num_seqs=max_num_seqs, scheduling_policy=scheduling_policy,
                     chunked_prefill_size=chunked_prefill_size, enable_prompt_tokens_details=enable_prompt_tokens_details,
                     speculative_config=speculative_config,
                     api_key=",".join(api_key) if api_key else None,
                     api_key_file=api_key_file, metrics_require_key=metrics_require_key,
                     max_body_bytes=max_body_bytes, drain_timeout_s=drain_timeout, threads=threads,
                     attention=attention, fuse_decode=fuse_decode, overlap_decode=overlap_decode,
                     tool_call_parser=tool_call_parser)
    if replicas is None and (address or ray_cpus or gpus_per_replica is not None):
        raise _fail("--address, --ray-cpus and --gpus-per-replica need --replicas N")
    if replicas is not None and device is not None and device.startswith("cuda:"):
        raise _fail(f"--device {device} with --replicas: Ray gives each replica its own GPU, seen there as cuda; "
                    "use --device cuda")
    if routing not in ("affinity", "default"):
        raise _fail(f"--routing must be 'affinity' or 'default', got {routing!r}")
    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
        if replicas is not None:
            raise typer.Exit(_serve_on_ray(settings, replicas=replicas, address=address, routing=routing,
                                           ray_cpus=ray_cpus, gpus_per_replica=gpus_per_replica))
        app_ = create_app(settings)
    except (OSError, ValueError) as e:
        raise _fail(str(e)) from None
    code = run_server(app_, host=settings.host, port=settings.port, log_level=log_level)
    if code:
        raise typer.Exit(code)


def _serve_on_ray(settings: Settings, *, replicas: int, address: str | None, routing: str, ray_cpus: int | None,
                  gpus_per_replica: float | None) -> int:
    try:
        from server.ray_serve import RayOptions, run
    except ImportError as e:
        raise _fail(f"--replicas needs Ray Serve: `make setup`, or pip install -e '.[ray]' from the checkout ({e})") from None
    gpus = gpus_per_replica
    if gpus is None:
        gpus = default_gpus_per_replica(settings.device, replicas=replicas)
    return run(settings, RayOptions(replicas=replicas, address=address, num_cpus=ray_cpus, routing=routing,
                                    cpus_per_replica=float(settings.threads or 1), gpus_per_replica=gpus))


cache_app = typer.Typer(no_args_is_help=True, help="The GGUF conversion cache: list it, prune what this environment "
                                                   "never reads. Hub downloads live in Hugging Face's cache (hf cache).")
app.add_typer(cache_app, name="cache")
CacheDirOpt = Annotated[Optional[Path], typer.Option("--cache-dir",
                                                     help="default: $PAINTERS_CACHE_DIR, else the user cache")]


@cache_app.command("ls")
def cache_ls(cache_dir: CacheDirOpt = None) -> None:
    """Every cached conversion: its size, the transformers that made it, and whether this environment reads it."""
    from rich.table import Table

    from server.model.conversions import scan
    from server.model.loader import cache_root

    root = cache_dir or cache_root()
    entries = scan(root)
    table = Table(title=f"conversions in {root}", title_justify="left")
    for column in ("conversion", "size", "transformers", "status", "why"):
        table.add_column(column, justify="right" if column == "size" else "left", no_wrap=column == "conversion")
    for e in entries:
        table.add_row(e.path.name, _mib(e.size), e.transformers or "?", e.status, e.reason)
    console.print(table)
    stale = [e for e in entries if e.status == "stale"]
    console.print(f"{len(entries)} entries, {_mib(sum(e.size for e in entries))}; `painters cache prune` removes the "
                  f"{len(stale)} stale, {_mib(sum(e.size for e in stale))}")


@cache_app.command("prune")
def cache_prune(
    cache_dir: CacheDirOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list what would go, remove nothing")] = False,
) -> None:
    """Remove the conversions this environment never reads (`painters cache ls` says why each is stale)."""
    from server.model.conversions import prune

    stale = prune(cache_dir, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for e in stale:
        console.print(f"{verb} {escape(e.path.name)} ({_mib(e.size)}): {escape(e.reason)}")
    console.print(f"{verb} {len(stale)} conversions, {_mib(sum(e.size for e in stale))}")


def _mib(size: int) -> str:
    return f"{size / 2**20:,.0f} MiB"


def default_gpus_per_replica(device: str | None, *, replicas: int, gpus: int | None = None) -> float:
    """This machine's GPUs shared evenly over the replicas, at most one each (0 on the CPU). One each whatever the
    count left a second replica on a one-GPU machine waiting for a GPU forever."""
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count()
    if not (device or "cuda").startswith("cuda") or not gpus:
        return 0.0
    return min(1.0, gpus / replicas)


register_client_commands(app)  # loadtest, eval, tradeoff: HTTP clients of a running server


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
