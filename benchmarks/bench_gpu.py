"""Every figure of issue #14's GPU targets in one run, one table and one JSON (`docs/results/bench-gpu.json`).

For a GPU machine with torch, transformers and triton but no web stack: imports only the engine. Random weights of
the Llama-2-7B shape in bf16 (speed depends on shapes, not values). Each figure is measured in its own section with
its own time budget; a section that fails records its error and the others still run, and the JSON is rewritten after
every section, so a run cut short keeps what it measured.

    python benchmarks/bench_gpu.py                       # on the GPU machine (make bench-gpu runs it)
    python benchmarks/bench_gpu.py --smoke --out /tmp/x.json   # the same code path on the CPU, tiny shapes, seconds

Figures (peak: the card's memory bandwidth, `benchmarks/peaks.py`; the issue's targets are the H200's 4.8 TB/s):
  full_bs1_bandwidth_fraction  weight bytes x tok/s / peak, `full`, batch 1
  skip8_speedup_over_ideal     (skip:8 tok/s / full tok/s) / ((L + h) / (L - 8 + h)), h = LM head in layers
  pairs_over_full              `pairs` tok/s / `full` tok/s, batch 1
  p8_mixed_over_full           12 rows (4 full + 4 skip:8 + 4 pairs) tok/s / 12 rows `full` tok/s; beside it
                               p8_weight_bound, the most a step that streams its weights allows this mix (full
                               bytes / mix bytes: the plan re-reads the attentions `pairs` and `full` order apart)
  bs64_bandwidth_fraction      64 rows `full` at ~512-token contexts: (weight + KV bytes per step) / step time / peak
  attn_4k_over_bound           decode attention, 16 rows x 4,096 tokens: time / (KV bytes / peak), the fastest of
                               gathered + SDPA, FlexAttention in place and the Triton kernel in place (each is
                               reported, with the Triton kernel's tilings)
the P8 mix under churn (requests arriving and leaving: `churn_*`, groups padded to one shared bucket against one
bucket each, captures and seconds capturing included), the engine again with its layer math fused by torch.compile
inside the captured step (`fused_*`), with decode attention in place (`triton_*`: the Triton kernel; `in_place_*`:
FlexAttention) and gathered (`gathered_*`), speculative decoding's cost (`verify_forward_ms`: a forward over 1, 2,
3 and 5 new positions of one row, what verifying 0-4 drafts costs; `spec_ngram_*`: a speculating engine's greedy
tokens against the headline's, `spec_ngram_same_tokens` of `spec_ngram_of_tokens`), and transformers' generate
(static cache, compiled) at batch 1 and 64 beside ours.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import bench_attention, bench_layouts  # noqa: E402
from benchmarks.peaks import H200_BYTES_S, peak_bytes_s  # noqa: E402
from server.engine.bench import SHAPES, _IdTokenizer, _time_parts  # noqa: E402
from server.engine.executor import Executor, Row  # noqa: E402
from server.engine.generate import Engine  # noqa: E402
from server.engine.sampling import SamplingParams  # noqa: E402
from server.engine.speculative import Speculation  # noqa: E402
from server.model import measure, triton_attention  # noqa: E402

log = logging.getLogger("bench_gpu")
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=10, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False)
SECTIONS = ("batch1", "mixed", "bs64", "churn", "attention", "profile", "fused", "reduce_overhead", "gathered",
            "triton", "in_place", "speculative", "transformers", "transformers64")
MIX = ["full"] * 4 + ["skip:8"] * 4 + ["pairs"] * 4


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _hf_model(config: dict, *, device: torch.device, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**config), dtype=dtype)
    return model.eval().requires_grad_(False)


def decode_tok_s(engine: Engine, policies: list[str], *, prompt_len: int, new_tokens: int) -> dict[str, Any]:
    """One batch (one prompt per policy) decoded twice in the same KV pool, the second call timed: its aggregate
    decode tok/s and decode step in seconds, by the wall clock from the last first token to the call's end over
    the new_tokens - 1 decode steps (every host part of a step included: the per-token times leave out each
    step's update, which is a few per cent at 64 rows), greedy tokens, and what the captured steps did in each call
    (the first captures). `timings_step_s`: the median step by the engine's own per-token times (the wall time between a request's tokens),
    for comparison."""
    prompts = [[10 + (i + j) % 200 for j in range(prompt_len)] for i in range(len(policies))]
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    max_len = prompt_len + new_tokens
    blocks = sum(-(-max_len // engine.block_size) * engine.compile(p).num_slots for p in policies)
    batch = engine.new_batch(max_len=max_len, num_blocks=blocks + 1)
    graphs = batch.executor.graphs
    engine.generate(prompts, policy=policies, params=params, batch=batch)  # compiles, captures
    warm = graphs.stats() if graphs else None
    _sync(engine.model.device)
    t0 = time.perf_counter()
    results = engine.generate(prompts, policy=policies, params=params, batch=batch)
    _sync(engine.model.device)
    wall = time.perf_counter() - t0
    first = max(r.timings.ttft_s for r in results)  # from each request's arrival, made inside the call
    step = (wall - first) / max(1, new_tokens - 1)
    got = {"tok_s": len(policies) / step, "step_s": step, "tokens": [r.token_ids for r in results],
           "drafted": sum(r.speculated.draft_tokens for r in results),
           "kept": sum(r.speculated.accepted_tokens for r in results),
           "timings_step_s": statistics.median(r.timings.decode_s / max(1, len(r.timings.per_token_s))
                                               for r in results)}
    if graphs:
        timed = graphs.stats()
        got["graphs"] = {"warm_up": warm, "timed_captures": timed["captures"] - warm["captures"],
                         "timed_replays": timed["replays"] - warm["replays"], "pinned_mb": timed["pinned_bytes"] / 2**20}
        if engine.model.device.type == "cuda":  # the last step's graph alone: kernel time without the host's
            got["graphs"]["replay_ms"] = graphs.replay_s() * 1e3
    return got


def weight_reads(model: Any, schedules: list[Any]) -> int:
    """Weight bytes one decode step reads for rows of `schedules`: the engine's plan (each application reads its
    layers' units once, re-reads included) plus the LM head."""
    from server.policy.planner import plan_step

    attn, mlp = model.unit_bytes()
    units = plan_step(tuple(dict.fromkeys(schedules)), attn_cost=attn, mlp_cost=mlp).units_read(attn_cost=attn,
                                                                                              mlp_cost=mlp)
    return (units + model.lm_head.numel()) * model.lm_head.element_size()


def profile_decode(engine: Engine, *, policy: str = "full", prompt_len: int = 24, steps: int = 8,
                   top: int = 20) -> dict[str, Any]:
    """Where an eager batch-1 decode forward spends the device's time: torch.profiler over `steps` forwards of the
    executor alone (no sampling, no host loop), every kernel launched. On the CPU (the smoke) the same over CPU ops.
    -> `_kernel_summary`."""
    model = engine.model
    schedule = engine.compile(policy)
    max_len = prompt_len + steps + 2
    ex = Executor(model, num_blocks=-(-max_len // engine.block_size) * schedule.num_slots + 1, max_len=max_len,
                  attention=engine.attention, graphs=False)
    tokens = torch.arange(10, 10 + prompt_len, device=model.device)[None]
    ex.forward(tokens, [Row(0, schedule, 0, prompt_len)], logits_at=torch.tensor([prompt_len - 1], device=model.device))
    one = torch.tensor([[11]], device=model.device)
    at = torch.zeros(1, dtype=torch.long, device=model.device)
    ex.forward(one, [Row(0, schedule, prompt_len, 1)], logits_at=at)  # warm: lazy compiles and tables
    steps_done = iter(range(steps))
    return _kernel_summary(model.device, lambda: ex.forward(one, [Row(0, schedule, prompt_len + 1 + next(steps_done), 1)],
                                                           logits_at=at), steps=steps, top=top)


def profile_captured(engine: Engine, *, policies: tuple[str, ...] = ("full",), prompt_len: int = 24,
                     steps: int = 8, top: int = 20) -> dict[str, Any]:
    """The same for whole engine steps of one row per policy (`Batch.step`: the captured step's replay, sampling,
    the copy back), after warm-up steps have captured the layout: the kernels a replay runs, where the profiler sees
    inside CUDA graphs (CUPTI reports graph kernels on recent drivers; zero kernels would say it does not here)."""
    params = SamplingParams(max_tokens=steps + 4, ignore_eos=True)
    max_len = prompt_len + steps + 4
    batch = engine.new_batch(max_len=max_len, num_blocks=sum(-(-max_len // engine.block_size)
                                                             * engine.compile(p).num_slots for p in policies) + 1)
    batch.add([engine.new_sequence([10 + i + j for j in range(prompt_len)], params, engine.compile(p))
               for i, p in enumerate(policies)])
    for _ in range(3):
        batch.step()  # captures this layout (and, fused, compiles its units)
    return _kernel_summary(engine.model.device, batch.step, steps=steps, top=top)


def _kernel_summary(device: torch.device, step: Any, *, steps: int, top: int) -> dict[str, Any]:
    """torch.profiler over `steps` calls of `step` -> kernels per step, their summed time per step, and the `top`
    kernels by time: [name, launches per step, ms per step] (CPU ops on the CPU)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    _sync(device)
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    wanted = DeviceType.CUDA if cuda else DeviceType.CPU

    def self_us(e: Any) -> float:
        return getattr(e, "self_device_time_total", 0.0) if cuda else e.self_cpu_time_total

    events = [e for e in prof.key_averages() if e.device_type == wanted and self_us(e) > 0]
    events.sort(key=self_us, reverse=True)
    return {"kernels_per_step": sum(e.count for e in events) / steps,
            "kernel_ms_per_step": sum(map(self_us, events)) / steps / 1e3,
            "top": [[e.key[:80], e.count / steps, self_us(e) / steps / 1e3] for e in events[:top]]}


def _wall_s(fn: Any, device: torch.device = torch.device("cpu"), *, repeats: int = 20) -> float:
    """Seconds per call of fn: CUDA events on a GPU, the wall clock on the CPU (after 2 untimed calls)."""
    if device.type == "cuda":
        return measure.cuda_ms(fn, repeats=repeats) / 1e3
    for _ in range(2):
        fn()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats


def _same_prefix(a: list[list[int]], b: list[list[int]]) -> bool:
    """Each row's greedy tokens agree over the shorter run's length."""
    return all(x[: min(len(x), len(y))] == y[: min(len(x), len(y))] for x, y in zip(a, b, strict=True))


def hf_generate_tok_s(hf_model: Any, *, rows: int, prompt_len: int, new_tokens: int, compiled: bool) -> float:
    """transformers' own generate, static cache (compiled unless `compiled` is False), greedy: rows x new tokens /
    time of the whole call after a warm-up call (prefill included, as a user of generate sees it)."""
    ids = torch.tensor([[10 + (i + j) % 200 for j in range(prompt_len)] for i in range(rows)], device=hf_model.device)
    kwargs = dict(do_sample=False, pad_token_id=0, cache_implementation="static", disable_compile=not compiled)
    with torch.inference_mode():
        for n in (new_tokens, new_tokens):  # the first call compiles (same shapes as the timed one)
            _sync(hf_model.device)
            t = time.perf_counter()
            hf_model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
            _sync(hf_model.device)
    return rows * new_tokens / (time.perf_counter() - t)


class Run:
    """Sections, each timed and guarded; results and errors go to one dict written after every section. Past the
    deadline (time.perf_counter()) no section starts: it is listed under `skipped_for_time`, and the table still
    prints."""

    def __init__(self, out: Path, base: dict, *, deadline: float = float("inf")) -> None:
        self.out, self.data, self.deadline = out, base, deadline

    def section(self, name: str, fn) -> None:  # noqa: ANN001
        t = time.perf_counter()
        if t > self.deadline:
            self.data.setdefault("skipped_for_time", []).append(name)
        else:
            try:
                self.data.update(fn())
            except Exception as e:  # noqa: BLE001 -- one failed figure must not lose the others
                log.error("section %s failed:\n%s", name, traceback.format_exc())
                self.data.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
            self.data.setdefault("section_s", {})[name] = round(time.perf_counter() - t, 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.data, indent=1, default=str) + "\n")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: checks the script runs end to end")
    ap.add_argument("--out", default=None, help="JSON path (default docs/results/bench-gpu.json; --smoke needs one)")
    ap.add_argument("--skip", default="", help=f"comma-separated sections to leave out: {', '.join(SECTIONS)}")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no section after this many seconds (the model's build included); the rest are listed "
                         "under skipped_for_time")
    a = ap.parse_args(argv)
    started = time.perf_counter()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.smoke and a.out is None:
        ap.error("--smoke needs --out: its CPU figures must not land in docs/results/bench-gpu.json")
    device = torch.device("cpu" if a.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device; use --smoke to check the script on the CPU")
    dtype = torch.float32 if a.smoke else torch.bfloat16
    shape, config = ("tiny", TINY) if a.smoke else ("llama-2-7b", SHAPES["llama-2-7b"])
    # sizes: (new tokens at batch 1, 64-row prompt length, 64-row new tokens, attention rows/context, hf tokens)
    n1, p64, n64, attn, hf_n = (4, 24, 4, (2, 64), 4) if a.smoke else (128, 480, 32, (16, 4096), 128)
    rows64 = 4 if a.smoke else 64
    out = Path(a.out or Path(__file__).resolve().parents[1] / "docs/results/bench-gpu.json")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)"
    peak, peak_card = peak_bytes_s(device_name) if device.type == "cuda" else (H200_BYTES_S, "H200 (smoke)")
    run = Run(out, {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name, "torch": torch.__version__, "shape": shape, "dtype": str(dtype).removeprefix("torch."),
        "smoke": a.smoke, "peak_bytes_s": peak, "peak_card": peak_card,
    }, deadline=started + a.budget_s if a.budget_s else float("inf"))
    hf = _hf_model(config, device=device, dtype=dtype)
    eager = Engine.from_hf(hf, _IdTokenizer(), device=device, dtype=dtype, name=shape, graphs=False)
    model = eager.model
    run.data["plain_mm"] = model._plain_mm  # one row through one layer: torch.mm measured faster than bmm at load
    # the same weights, decode steps replayed from CUDA graphs (server.engine.graphs; on the smoke's CPU the same
    # padded path runs eagerly)
    # decode attention "auto" and overlapped decoding, as served on CUDA (the smoke's CPU runs the overlap too)
    captured = Engine(model, _IdTokenizer(), name=shape, graphs=True, overlap=True)
    headline = run.data["attention"] = captured.decode_attention  # the path the figures above the table took
    stepwise = Engine(model, _IdTokenizer(), name=shape, graphs=True, overlap=False)  # each step read before the next

    def captured_with(attention: str) -> Engine:
        """The same weights, captured steps, decode attention by `attention`'s path (on the smoke's CPU the Triton
        kernel runs in Triton's interpreter: TRITON_INTERPRET=1)."""
        return Engine(model, _IdTokenizer(), name=shape, graphs=True, attention=attention, overlap=True)

    L = eager.num_layers
    weight_bytes = model.weight_bytes()
    layer_bytes = model.layers.nbytes() / L
    head_bytes = model.lm_head.numel() * model.lm_head.element_size()

    headline_tokens: dict[str, list[list[int]]] = {}  # greedy tokens of the headline engine, for the other paths

    def headline_greedy(case: str) -> list[list[int]]:
        """The headline engine's greedy tokens at batch 1 (`full`) or on the mix, from its own section when it ran."""
        if case not in headline_tokens:
            policies = ["full"] if case == "bs1" else MIX
            headline_tokens[case] = decode_tok_s(captured, policies, prompt_len=24,
                                                 new_tokens=n1 if case == "bs1" else n1 // 2)["tokens"]
        return headline_tokens[case]

    def batch1() -> dict:
        got, eager_got = {}, {}
        for policy in ("full", "skip:8", "pairs"):
            got[policy] = decode_tok_s(captured, [policy], prompt_len=24, new_tokens=n1)
            eager_got[policy] = decode_tok_s(eager, [policy], prompt_len=24, new_tokens=n1 // 2)
        step = decode_tok_s(stepwise, ["full"], prompt_len=24, new_tokens=n1)
        layer_s, head_s = _time_parts(captured, list(range(10, 34)), n1, repeats=5 if a.smoke else 50)
        h = head_s / layer_s
        ideal = (L + h) / (L - 8 + h)
        tok = {p: g["tok_s"] for p, g in got.items()}
        headline_tokens["bs1"] = got["full"]["tokens"]
        return {"full_bs1_tok_s": tok["full"], "skip8_bs1_tok_s": tok["skip:8"], "pairs_bs1_tok_s": tok["pairs"],
                "head_layers": h, "skip8_ideal": ideal,
                "full_bs1_bandwidth_fraction": weight_bytes * tok["full"] / peak,
                "skip8_speedup_over_ideal": tok["skip:8"] / tok["full"] / ideal,
                "pairs_over_full": tok["pairs"] / tok["full"],
                "skip8_bandwidth_fraction": ((L - 8) * layer_bytes + head_bytes) * tok["skip:8"] / peak,
                "eager_full_bs1_tok_s": eager_got["full"]["tok_s"], "eager_skip8_bs1_tok_s": eager_got["skip:8"]["tok_s"],
                "eager_pairs_bs1_tok_s": eager_got["pairs"]["tok_s"],
                "eager_full_bs1_bandwidth_fraction": weight_bytes * eager_got["full"]["tok_s"] / peak,
                # greedy tokens of the captured and the eager step agree over the eager run's length
                "bs1_captured_equals_eager": {p: _same_prefix(got[p]["tokens"], eager_got[p]["tokens"]) for p in got},
                "bs1_graphs": {p: g["graphs"] for p, g in got.items()},
                "full_bs1_step_ms": got["full"]["step_s"] * 1e3,
                # each step read before the next is queued: what overlapping the host's part with the device buys
                "stepwise_full_bs1_tok_s": step["tok_s"], "overlap_speedup_bs1": tok["full"] / step["tok_s"],
                "bs1_overlapped_equals_stepwise": step["tokens"] == got["full"]["tokens"],
                # the graph alone: the rest of the step is the host's (inputs, sampling, the copy back, update)
                "full_bs1_replay_ms": got["full"]["graphs"].get("replay_ms")}

    def mixed() -> dict:
        full = decode_tok_s(captured, ["full"] * 12, prompt_len=24, new_tokens=n1 // 2)
        mix = decode_tok_s(captured, MIX, prompt_len=24, new_tokens=n1 // 2)
        e_full = decode_tok_s(eager, ["full"] * 12, prompt_len=24, new_tokens=max(3, n1 // 4))
        e_mix = decode_tok_s(eager, MIX, prompt_len=24, new_tokens=max(3, n1 // 4))
        headline_tokens["mixed12"] = mix["tokens"]
        # what the mix allows a step that streams its weights: the plan re-reads the attentions whose order the
        # `pairs` rows and the `full` rows disagree on (server/policy/planner.py), so P8 <= full bytes / mix bytes
        bound = weight_reads(model, [eager.compile("full")]) / weight_reads(model, [eager.compile(p) for p in MIX])
        p8 = mix["tok_s"] / full["tok_s"]
        return {"full12_tok_s": full["tok_s"], "mixed12_tok_s": mix["tok_s"],
                "p8_mixed_over_full": p8, "p8_weight_bound": bound, "p8_over_bound": p8 / bound,
                "mixed12_graphs": mix["graphs"],
                "eager_full12_tok_s": e_full["tok_s"], "eager_mixed12_tok_s": e_mix["tok_s"],
                "eager_p8_mixed_over_full": e_mix["tok_s"] / e_full["tok_s"],
                "mixed12_captured_equals_eager": _same_prefix(mix["tokens"], e_mix["tokens"])}

    def bs64() -> dict:
        got = decode_tok_s(captured, ["full"] * rows64, prompt_len=p64, new_tokens=n64)
        e = decode_tok_s(eager, ["full"] * rows64, prompt_len=p64, new_tokens=n64 // 2)
        step = decode_tok_s(stepwise, ["full"] * rows64, prompt_len=p64, new_tokens=n64)
        a_ = model.args
        context = p64 + n64 // 2  # the mean context over the timed decode
        kv_bytes = rows64 * context * L * 2 * a_.n_kv_heads * a_.head_dim * torch.finfo(dtype).bits // 8
        # beside transformers' 64 rows (24-token prompts, hf_n new tokens): ours at those contexts too
        short = decode_tok_s(captured, ["full"] * rows64, prompt_len=24, new_tokens=hf_n)
        return {"bs64_rows": rows64, "bs64_context": context, "bs64_tok_s": got["tok_s"],
                "bs64_timings_step_ms": got["timings_step_s"] * 1e3, "bs64_short_context_tok_s": short["tok_s"],
                "bs64_step_ms": got["step_s"] * 1e3,
                "bs64_bandwidth_fraction": (weight_bytes + kv_bytes) / got["step_s"] / peak,
                "bs64_graphs": got["graphs"], "eager_bs64_tok_s": e["tok_s"], "eager_bs64_step_ms": e["step_s"] * 1e3,
                "stepwise_bs64_tok_s": step["tok_s"], "overlap_speedup_bs64": got["tok_s"] / step["tok_s"],
                "bs64_overlapped_equals_stepwise": step["tokens"] == got["tokens"]}

    def churn() -> dict:
        """The P8 mix under churn (benchmarks/bench_layouts.py's load: Poisson arrivals at ~8 rows, prompts of 4-200
        tokens, 8-160 new tokens each) through captured steps, every group padded to one shared bucket (the engine's
        rule) and each to its own: tok/s over the run (prefills and captures included), captures, hit rate and
        seconds capturing, from a cold start each."""
        got: dict[str, Any] = {}
        for rule, up_to in (("shared", None), ("own", 0)):
            r = bench_layouts.churn(captured, policies=tuple(dict.fromkeys(MIX)), rows=4 if a.smoke else 8,
                                    steps=30 if a.smoke else 400, shared_up_to=up_to)
            got[f"churn_{rule}_tok_s"], got[f"churn_{rule}_graphs"] = r["tok_s"], r["graphs"]
            got[f"churn_{rule}_decode_steps"] = r["decode_steps"]
        got["churn_shared_over_own"] = got["churn_shared_tok_s"] / got["churn_own_tok_s"]
        return got

    def reduce_overhead() -> dict:
        """The issue's other way to capture a step: torch.compile(mode="reduce-overhead") over the very step the
        engine captures by hand (batch 1, `full`, the same static buffers; the KV pool marked static, so that Inductor
        may keep CUDA graphs over a step that writes it), against the hand-captured graph's replay: ms per step of
        each, the compile's seconds, the CUDA graphs Inductor skipped, the largest logit difference and whether the
        greedy tokens agree. On the smoke's CPU nothing is captured: `hand_capture_ms` is the padded step eagerly."""
        import torch._dynamo
        from torch._dynamo.utils import counters

        policy = captured.compile("full")
        batch = captured.new_batch(max_len=64, num_blocks=-(-64 // captured.block_size) * policy.num_slots + 1)
        batch.add([captured.new_sequence(list(range(10, 34)), SamplingParams(max_tokens=16, ignore_eos=True), policy)])
        for _ in range(3):
            batch.step()  # captures the layout
        graphs = batch.executor.graphs
        step = graphs.latest()
        torch._dynamo.mark_static_address(batch.executor.cache.pool)
        skips = counters["inductor"]["cudagraph_skips"]
        with torch.inference_mode():
            want = step().clone()
            t = time.perf_counter()
            fn = torch.compile(step, mode="reduce-overhead")
            for _ in range(3):  # compiles, records, replays
                got = fn().clone()
            _sync(device)
            compile_s = time.perf_counter() - t
            hand = graphs.replay_s if device.type == "cuda" else lambda: _wall_s(step)
            return {"reduce_overhead_compile_s": compile_s, "reduce_overhead_ms": _wall_s(fn, device) * 1e3,
                    "hand_capture_ms": hand() * 1e3,
                    "reduce_overhead_cudagraph_skips": counters["inductor"]["cudagraph_skips"] - skips,
                    "reduce_overhead_max_abs_logit_diff": (got.float() - want.float()).abs().max().item(),
                    "reduce_overhead_same_top1": torch.equal(got.argmax(-1), want.argmax(-1))}

    def attention() -> dict:
        r = bench_attention.run(device=device, shape="smollm2-135m" if a.smoke else "llama-2-7b", rows=(attn[0],),
                                contexts=(attn[1],), repeats=3 if a.smoke else 20,
                                sweep=triton_attention.runnable(device))[0]
        bound_ms = r["kv_bytes"] / peak * 1e3
        paths = {p: r[f"{p}_ms"] for p in ("gathered", "in_place", "triton") if f"{p}_ms" in r}
        best = min(paths, key=paths.get)
        return {"attn_4k_in_place_ms": r["in_place_ms"], "attn_4k_gathered_ms": r["gathered_ms"],
                "attn_4k_triton_ms": r.get("triton_ms"), "attn_4k_triton_tilings_ms": r.get("triton_tilings"),
                "attn_4k_triton_tiling": r.get("triton_tiling"),
                "attn_4k_bound_ms": bound_ms, "attn_4k_over_bound": paths[best] / bound_ms, "attn_4k_path": best,
                "attn_4k_in_place_over_bound": r["in_place_ms"] / bound_ms,
                "attn_4k_gathered_over_bound": r["gathered_ms"] / bound_ms,
                "attn_4k_triton_over_bound": None if "triton_ms" not in r else r["triton_ms"] / bound_ms,
                "attn_4k_max_abs_err": r["max_abs_err"], "attn_4k_triton_max_abs_err": r.get("triton_max_abs_err")}

    def profile_() -> dict:
        """The eager decode forward's kernels (batch 1, `full`; and `pairs`) and a captured engine step's (the replay,
        sampling, the copy back), beside the replay's time (`full_bs1_replay_ms`, from batch1): what a fused kernel
        or a shorter host step would save. The fused section profiles its own steps the same way."""
        got = {f"profile_bs1_{p.replace(':', '')}": profile_decode(eager, policy=p, steps=4 if a.smoke else 8)
               for p in ("full", "pairs")}
        got["profile_captured_bs1_full"] = profile_captured(captured, steps=4 if a.smoke else 8)
        # the P8 mix's step: what its gathers, scatters and smaller matmuls add to 12 rows of `full`
        got["profile_captured_mixed12"] = profile_captured(captured, policies=tuple(MIX), steps=4 if a.smoke else 8)
        got["profile_captured_full12"] = profile_captured(captured, policies=("full",) * 12,
                                                          steps=4 if a.smoke else 8)
        return got

    def engine_figures(prefix: str, engine: Engine, *, bs1: tuple[str, ...] = ("full",)) -> dict:
        """The headline engine figures for `engine` (the same weights, another decode path), keys prefixed; greedy
        tokens compared with the headline engine's at batch 1 and on the mix."""
        t = time.perf_counter()
        one = {p: decode_tok_s(engine, [p], prompt_len=24, new_tokens=n1) for p in bs1}
        first_s = time.perf_counter() - t
        full = one["full"]
        many = decode_tok_s(engine, ["full"] * rows64, prompt_len=p64, new_tokens=n64)
        mix = decode_tok_s(engine, MIX, prompt_len=24, new_tokens=n1 // 2)
        full12 = decode_tok_s(engine, ["full"] * 12, prompt_len=24, new_tokens=n1 // 2)
        a_ = model.args
        kv_bytes = rows64 * (p64 + n64 // 2) * L * 2 * a_.n_kv_heads * a_.head_dim * torch.finfo(dtype).bits // 8
        got = {f"{prefix}_full_bs1_tok_s": full["tok_s"],
               f"{prefix}_full_bs1_bandwidth_fraction": weight_bytes * full["tok_s"] / peak,
               # batch-1 calls of every policy in `bs1`, warm-up (captures, compiles) included
               f"{prefix}_bs1_first_s": first_s,
               f"{prefix}_bs64_tok_s": many["tok_s"], f"{prefix}_bs64_step_ms": many["step_s"] * 1e3,
               f"{prefix}_bs64_bandwidth_fraction": (weight_bytes + kv_bytes) / many["step_s"] / peak,
               f"{prefix}_mixed12_tok_s": mix["tok_s"], f"{prefix}_full12_tok_s": full12["tok_s"],
               f"{prefix}_p8_mixed_over_full": mix["tok_s"] / full12["tok_s"],
               f"{prefix}_equals_headline": {"bs1": _same_prefix(full["tokens"], headline_greedy("bs1")),
                                             "mixed12": _same_prefix(mix["tokens"], headline_greedy("mixed12"))},
               f"{prefix}_graphs": {"bs1": full["graphs"], "bs64": many["graphs"], "mixed12": mix["graphs"]}}
        for p in bs1[1:]:
            got[f"{prefix}_{p.replace(':', '')}_bs1_tok_s"] = one[p]["tok_s"]
        return got

    def mode_figures(attention: str) -> dict:
        """Captured steps whose decode attention takes `attention`'s path (server.engine.executor), beside the
        headline figures (the "auto" path). Nothing for the headline's own path."""
        if attention == headline:
            return {f"{attention}_is_headline": True}
        return engine_figures(attention, captured_with(attention))

    def fused() -> dict:
        """Captured steps whose layer math runs through torch.compile (`Transformer.fused`: norms, rotary, biases
        and the gate's activation fused around the matmuls), beside the headline's unfused steps; the graph's
        replay alone is `fused_replay_ms` (against `full_bs1_replay_ms`)."""
        engine = Engine(model, _IdTokenizer(), name=shape, graphs=True, attention=headline, fuse=True)
        got = engine_figures("fused", engine, bs1=("full", "skip:8", "pairs"))
        got["fused_replay_ms"] = got["fused_graphs"]["bs1"].get("replay_ms")
        got["fused_pairs_over_full"] = got["fused_pairs_bs1_tok_s"] / got["fused_full_bs1_tok_s"]
        got["profile_fused_bs1_full"] = profile_captured(engine, steps=4 if a.smoke else 8)
        return got

    def speculative() -> dict:
        """What speculative decoding costs here: a forward over n new positions of one row (a verification of n - 1
        drafts: eager, as served) against one over a single position, at a 24-token context; and a speculating
        engine's greedy tokens at batch 1 (prompt lookup, drafting after every repeated token: with random weights
        the share kept says nothing of a real model's) against the headline's: how many leading ones agree (the
        same in float32; in bf16 up to rounding, a near tie can swap)."""
        spec = Engine(model, _IdTokenizer(), name=shape, graphs=True, overlap=True,
                      speculation=Speculation("ngram", 4, lookup_min=1))
        got = decode_tok_s(spec, ["full"], prompt_len=24, new_tokens=max(n1, 32))  # long enough to repeat itself
        batch = eager.new_batch(max_len=32, num_blocks=2 * L + 1)
        full = eager.compile("full")
        ids = torch.arange(10, 40, device=device)[None]
        batch.executor.forward(ids[:, :24], [Row("v", full, 0, 24)], logits_at=torch.tensor([23], device=device))
        ms = {n: 1e3 * _wall_s(lambda n=n: batch.executor.forward(ids[:, 24 : 24 + n], [Row("v", full, 24, n)],
                                                                  hidden=True), device) for n in (1, 2, 3, 5)}
        want = headline_greedy("bs1")[0]
        same = next((i for i, (x, y) in enumerate(zip(got["tokens"][0], want)) if x != y), min(len(want), n1))
        return {"spec_ngram_bs1_tok_s": got["tok_s"], "spec_ngram_drafted": got["drafted"],
                "spec_ngram_kept": got["kept"],
                # leading tokens equal to the headline's, of n1: all in float32; in bf16 a near tie may swap
                "spec_ngram_same_tokens": same, "spec_ngram_of_tokens": min(len(want), n1),
                "verify_forward_ms": ms, "verify5_over_verify1": ms[5] / ms[1]}

    def transformers_generate(cases: tuple[tuple[int, bool], ...]) -> dict:
        got = {}
        for rows, compiled in cases:
            compiled = compiled and not a.smoke  # the CPU smoke: eager only
            key = f"hf_static_{'compiled' if compiled else 'eager'}_bs{rows}_tok_s"
            got[key] = hf_generate_tok_s(hf, rows=rows, prompt_len=24, new_tokens=hf_n, compiled=compiled)
        return got

    # compiled at 64 rows last and on its own: it compiles again (a minute or more), the figure most likely cut
    hf_small = lambda: transformers_generate(((1, False), (1, True), (rows64, False)))  # noqa: E731
    hf_large = lambda: transformers_generate(((rows64, True),))  # noqa: E731
    skip = {x for x in a.skip.split(",") if x}
    if skip - set(SECTIONS):
        ap.error(f"unknown sections {sorted(skip - set(SECTIONS))}; there are {', '.join(SECTIONS)}")
    sections = (batch1, mixed, bs64, churn, attention, profile_, fused, reduce_overhead,
                lambda: mode_figures("gathered"),
                lambda: mode_figures("triton"), lambda: mode_figures("in_place"), speculative, hf_small, hf_large)
    for name, fn in zip(SECTIONS, sections):
        if name not in skip:
            run.section(name, fn)
    print_table(run.data)
    print(f"wrote {out}")
    return run.data


TARGETS = [  # (key, tok/s behind it, target text)
    ("full_bs1_bandwidth_fraction", "full_bs1_tok_s", ">= 0.70"),
    ("skip8_speedup_over_ideal", "skip8_bs1_tok_s", ">= 0.95"),
    ("pairs_over_full", "pairs_bs1_tok_s", "report"),
    ("p8_mixed_over_full", "mixed12_tok_s", ">= 0.95"),
    ("bs64_bandwidth_fraction", "bs64_tok_s", ">= 0.60"),
    ("attn_4k_over_bound", None, "<= 2"),
]


def print_table(d: dict) -> None:
    print(f"\nbench-gpu {d['date']} on {d['device']} ({d['shape']}, {d['dtype']}, torch {d['torch']}; fractions of "
          f"{d['peak_bytes_s'] / 1e12:.2f} TB/s: {d['peak_card']})")
    print(f"{'figure':38s} {'value':>8s} {'tok/s':>9s}  target")
    for key, tok, target in TARGETS:
        v = d.get(key)
        print(f"{key:38s} {'-' if v is None else f'{v:8.3f}':>8s} "
              f"{'' if tok is None or tok not in d else f'{d[tok]:9.1f}':>9s}  {target}")
    for key in sorted(k for k in d if k.startswith("eager_") and k.endswith(("tok_s", "fraction", "full"))):
        print(f"{key:38s} {d[key]:8.3f} {'':>9s}  eager (no captured step), the same run" if not key.endswith("tok_s")
              else f"{key:38s} {'':>8s} {d[key]:9.1f}  eager (no captured step), the same run")
    for key in sorted(k for k in d if k.endswith("_graphs")):
        print(f"{key:38s} {json.dumps(d[key], default=str)}")
    for key in ("p8_weight_bound", "p8_over_bound", "churn_shared_tok_s", "churn_own_tok_s", "churn_shared_over_own",
                "hand_capture_ms", "reduce_overhead_ms", "reduce_overhead_compile_s", "reduce_overhead_cudagraph_skips",
                "reduce_overhead_same_top1", "full_bs1_step_ms", "full_bs1_replay_ms", "fused_replay_ms",
                "fused_bs1_first_s", "bs64_step_ms", "plain_mm", "stepwise_full_bs1_tok_s", "overlap_speedup_bs1",
                "stepwise_bs64_tok_s", "overlap_speedup_bs64", "bs1_overlapped_equals_stepwise",
                "bs64_overlapped_equals_stepwise", "spec_ngram_bs1_tok_s", "spec_ngram_drafted", "spec_ngram_kept",
                "spec_ngram_same_tokens", "spec_ngram_of_tokens", "verify_forward_ms", "verify5_over_verify1"):
        if d.get(key) is not None:
            print(f"{key:38s} {d[key]}")
    for key in sorted(k for k in d if "captured_equals_eager" in k):
        print(f"{key:38s} {d[key]}")
    print(f"{'attention (the figures above)':38s} {d.get('attention')}")
    paths = {"gathered": "decode attention gathered + SDPA", "triton": "decode attention in place, the Triton kernel",
             "in_place": "decode attention in place, FlexAttention",
             "fused": "headline attention, layer math fused by torch.compile"}
    for key in sorted(k for k in d if k.startswith(tuple(paths)) and k.endswith(("tok_s", "over_full", "fraction"))):
        path = paths[next(p for p in paths if key.startswith(p + "_"))]
        print(f"{key:38s} {d[key]:8.3f} {'':>9s}  engine, {path}" if not key.endswith("tok_s") else
              f"{key:38s} {'':>8s} {d[key]:9.1f}  engine, {path}")
    for key in ("attn_4k_path", "attn_4k_gathered_over_bound", "attn_4k_in_place_over_bound",
                "attn_4k_triton_over_bound", "attn_4k_triton_tiling", "attn_4k_triton_tilings_ms",
                "gathered_equals_headline",
                "triton_equals_headline", "in_place_equals_headline", "fused_equals_headline"):
        if d.get(key) is not None:
            print(f"{key:38s} {json.dumps(d[key], default=str)}")
    for key in sorted(k for k in d if k.startswith("hf_")):
        print(f"{key:38s} {'':>8s} {d[key]:9.1f}  transformers, beside full_bs1 / bs64_short_context")
    for key in sorted(k for k in d if k.startswith("profile_")):
        p = d[key]
        print(f"{key}: {p['kernels_per_step']:.0f} kernels, {p['kernel_ms_per_step']:.3f} ms of kernel time per step")
        for name, n, ms in p["top"][:12]:
            print(f"    {ms:8.3f} ms {n:6.1f}x  {name}")
    for name, err in d.get("errors", {}).items():
        print(f"section {name} FAILED: {err}")
    if d.get("skipped_for_time"):
        print(f"sections not started, out of time (--budget-s): {', '.join(d['skipped_for_time'])}")
    print("seconds per section: " + ", ".join(f"{k} {v}" for k, v in d.get("section_s", {}).items()))


if __name__ == "__main__":
    main()
