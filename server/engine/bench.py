"""Engine benchmark: decode tok/s per policy against transformers `generate`, and the P1-P3 ratios.

Imports only the engine (no HTTP layer, no pydantic), so it runs on a bare GPU machine too. Weights can be random
(`random_weights=True`): decode latency depends on shapes, not on trained values.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from server.engine.generate import Batch, Engine
from server.engine.sampling import SamplingParams

log = logging.getLogger(__name__)

PROMPT = "The history of the Roman Empire is a long story of conquest, politics and culture. In this essay"
# skip:k drops these shares of the layers: SmolLM2's 30 -> skip:6, 10, 15; Gemma 3 270M's 18 -> skip:4, 6, 9
SKIP_SHARES = (1 / 5, 1 / 3, 1 / 2)

# Config overrides for random-weight shapes (on top of transformers' LlamaConfig defaults).
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         tie_word_embeddings=True, rope_theta=100000.0),
    "llama-2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       tie_word_embeddings=False),
}


@dataclass
class PolicyRun:
    policy: str
    tok_s: float
    ms_per_token: float
    layer_runs: int
    bandwidth_gb_s: float  # weight bytes read per token x tok/s


@dataclass
class BenchResult:
    model: str
    device: str
    dtype: str
    new_tokens: int
    threads: int
    hf_generate_tok_s: float | None
    layer_ms: float
    head_ms: float
    head_layers: float  # h: LM head cost in layer equivalents
    runs: dict[str, PolicyRun] = field(default_factory=dict)
    pairs_streams_tok_s: float | None = None
    P1: float | None = None
    P2: dict[str, float] = field(default_factory=dict)
    P3: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class _IdTokenizer:
    """Stands in for a tokenizer on random-weight shapes: the benchmark feeds token ids and ignores text."""

    eos_token_id = None
    bos_token_id = 1

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warmed_batch(engine: Engine, prompts: list[list[int]], policies: list[str], new_tokens: int) -> Batch:
    """A batch for `prompts` under `policies` that has already run them to `new_tokens`: on CUDA its captured decode
    steps (one per context bucket the decode passes through) are all in it, so a timed run replays and never
    captures. `Engine.generate` without a batch makes a new one per call, whose captures a warm-up throws away."""
    schedules = [engine.compile(p) for p in policies]
    max_len = max(map(len, prompts)) + new_tokens
    blocks = sum(-(-max_len // engine.block_size) * s.num_slots for s in schedules)
    batch = engine.new_batch(max_len=max_len, num_blocks=blocks + 1)
    engine.generate(prompts, policy=policies, params=SamplingParams(max_tokens=new_tokens, ignore_eos=True),
                    batch=batch)
    return batch


def _time_decode(engine: Engine, prompt_ids: list[int], policy: str, new_tokens: int, repeats: int) -> float:
    """Median seconds per decoded token (prefill excluded) under `policy`, batch 1, greedy."""
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    batch = warmed_batch(engine, [prompt_ids], [policy], new_tokens)
    per_token = []
    for _ in range(repeats):
        _sync(engine.model.device)
        result = engine.generate([prompt_ids], policy=policy, params=params, batch=batch)[0]
        _sync(engine.model.device)
        per_token.append(result.timings.decode_s / max(1, len(result.timings.per_token_s)))
    return statistics.median(per_token)


def _time_parts(engine: Engine, prompt_ids: list[int], new_tokens: int, repeats: int = 50) -> tuple[float, float]:
    """Seconds for one decoder layer and for the LM head (final norm + matmul) at one decode token, with the
    context as long as it is on average during the timed decode (prompt + half the new tokens)."""
    from server.engine.executor import Executor, Row

    model, device = engine.model, engine.model.device
    schedule = engine.compile("full")
    context = prompt_ids + [prompt_ids[-1]] * (new_tokens // 2)
    n = len(context)
    ex = Executor(model, num_blocks=schedule.num_slots * (n // 16 + 2) + 1, max_len=n + 8)
    ex.forward(torch.tensor([context], device=device), [Row(0, schedule, 0, n)])
    token, at = torch.tensor([[5]], device=device), torch.zeros(1, dtype=torch.long, device=device)
    h = model.embed_tokens(token)
    with torch.inference_mode():
        def layers() -> None:  # one decode step (rewriting the same position), LM head included
            ex.forward(token, [Row(0, schedule, n, 1)], logits_at=at)

        def head() -> None:
            model.logits(h[:, 0])

        out = []
        for fn in (layers, head):
            for _ in range(5):
                fn()
            _sync(device)
            t = time.perf_counter()
            for _ in range(repeats):
                fn()
            _sync(device)
            out.append((time.perf_counter() - t) / repeats)
    return (out[0] - out[1]) / len(schedule.steps), out[1]


def _hf_generate_tok_s(hf_model: Any, prompt_ids: list[int], new_tokens: int, repeats: int) -> float:
    """transformers' decode tok/s, as the engine's is timed: the median of `repeats` runs (one stalled run decided P1
    alone), each over its tokens after the first, (T(N) - T(1)) / (N - 1), so the prefill stays out."""
    ids = torch.tensor([prompt_ids], device=hf_model.device)

    def seconds(n: int) -> float:
        kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        _sync(hf_model.device)
        t = time.perf_counter()
        hf_model.generate(ids, **kwargs)
        _sync(hf_model.device)
        return time.perf_counter() - t

    with torch.inference_mode():
        seconds(4)
        per_token = [(seconds(new_tokens) - seconds(1)) / (new_tokens - 1) for _ in range(repeats)]
    return 1 / statistics.median(per_token)


def random_model(shape: str, *, device: torch.device, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(**SHAPES[shape])
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval().requires_grad_(False)


def run_bench(
    *, model: str = "smollm2-135m", device: str = "cpu", dtype: torch.dtype | None = None, new_tokens: int = 128,
    repeats: int = 3, random_weights: bool = False, baseline: bool = True, pairs_policy: str = "pairs",
) -> BenchResult:
    dev = torch.device(device)
    if random_weights:
        hf_model = random_model(model, device=dev, dtype=dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32))
        tokenizer: Any = _IdTokenizer()
        prompt_ids = list(range(10, 10 + 24))
    else:
        from server.model.loader import load_model

        loaded = load_model(model, device=dev, dtype=dtype)
    if random_weights:
        engine = Engine.from_hf(hf_model, tokenizer, device=dev, dtype=dtype, name=model)
    else:
        engine = Engine.from_loaded(loaded, name=model)
        prompt_ids = engine.encode(PROMPT)  # as the server encodes it (Gemma: with its <bos>)
    L = engine.num_layers
    hf_tok_s = None
    if baseline:
        if not random_weights:
            from transformers import AutoModelForCausalLM

            hf_model = AutoModelForCausalLM.from_pretrained(str(loaded.source), dtype=engine.model.dtype).to(dev)
        hf_tok_s = _hf_generate_tok_s(hf_model, prompt_ids, new_tokens, repeats)
    hf_model = None  # the engine holds its own stacked copy
    layer_s, head_s = _time_parts(engine, prompt_ids, new_tokens)
    result = BenchResult(
        model=model, device=str(dev), dtype=str(engine.model.dtype).removeprefix("torch."), new_tokens=new_tokens,
        threads=torch.get_num_threads(), hf_generate_tok_s=hf_tok_s, layer_ms=layer_s * 1e3, head_ms=head_s * 1e3,
        head_layers=head_s / layer_s,
    )
    layer_bytes = engine.model.layers.nbytes() / L
    head_bytes = engine.model.lm_head.numel() * engine.model.lm_head.element_size()
    skips = [round(L * share) for share in SKIP_SHARES]
    for policy in ["full", *(f"skip:{k}" for k in skips), pairs_policy]:
        schedule = engine.compile(policy)
        s = _time_decode(engine, prompt_ids, policy, new_tokens, repeats)
        distinct_layers = len({i for step in schedule.steps for i in step.layers})
        bytes_per_token = distinct_layers * layer_bytes + head_bytes
        result.runs[policy] = PolicyRun(schedule.policy, 1 / s, s * 1e3, schedule.layer_runs, bytes_per_token / s / 1e9)
    full = result.runs["full"].tok_s
    if hf_tok_s:
        result.P1 = full / hf_tok_s
    h = result.head_layers
    for k in skips:
        ideal = (L + h) / (L - k + h)
        result.P2[str(k)] = (result.runs[f"skip:{k}"].tok_s / full) / ideal
    result.P3 = result.runs[pairs_policy].tok_s / full
    if dev.type == "cuda":
        engine.group_mode = "streams"
        result.pairs_streams_tok_s = 1 / _time_decode(engine, prompt_ids, pairs_policy, new_tokens, repeats)
        engine.group_mode = "batched"
    return result


def render(result: BenchResult) -> Any:
    """A rich table of one benchmark result."""
    from rich.table import Table

    table = Table(title=f"Painters engine: {result.model} on {result.device} ({result.dtype}, "
                        f"{result.threads} threads, batch 1, greedy, {result.new_tokens} new tokens)")
    for col in ("run", "tok/s", "ms/token", "layer runs", "weight GB/s", "vs full"):
        table.add_column(col, justify="right" if col != "run" else "left")
    full = result.runs["full"].tok_s
    if result.hf_generate_tok_s:
        table.add_row("transformers generate", f"{result.hf_generate_tok_s:.1f}",
                      f"{1e3 / result.hf_generate_tok_s:.2f}", "", "", f"{result.hf_generate_tok_s / full:.2f}")
    for name, run in result.runs.items():
        table.add_row(f"engine {run.policy}", f"{run.tok_s:.1f}", f"{run.ms_per_token:.2f}", str(run.layer_runs),
                      f"{run.bandwidth_gb_s:.1f}", f"{run.tok_s / full:.2f}")
    if result.pairs_streams_tok_s:
        table.add_row("engine pairs (CUDA streams)", f"{result.pairs_streams_tok_s:.1f}",
                      f"{1e3 / result.pairs_streams_tok_s:.2f}", "", "", f"{result.pairs_streams_tok_s / full:.2f}")
    table.caption = (
        f"h (LM head) = {result.head_layers:.2f} layers ({result.head_ms:.2f} ms vs {result.layer_ms:.2f} ms/layer)  |  "
        f"P1 = {result.P1 and round(result.P1, 2)} (target >= 2.0)  |  "
        f"P2 = {', '.join(f'k={k}: {v:.3f}' for k, v in result.P2.items())} (target >= 0.95)  |  "
        f"P3 = {result.P3 and round(result.P3, 3)} (target >= 1.05)"
    )
    return table


def main(argv: list[str] | None = None) -> None:
    """`python -m server.engine.bench`: the same benchmark without the CLI's imports (for bare GPU machines)."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m", help="model, or a shape name with --random-weights")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--random-weights", action="store_true", help=f"random weights of a shape: {', '.join(SHAPES)}")
    parser.add_argument("--no-baseline", action="store_true", help="skip transformers generate")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    result = run_bench(model=args.model, device=args.device, new_tokens=args.new_tokens, repeats=args.repeats,
                       random_weights=args.random_weights, baseline=not args.no_baseline)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        from rich.console import Console

        Console().print(render(result))


if __name__ == "__main__":
    main()
