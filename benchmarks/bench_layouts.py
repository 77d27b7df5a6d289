"""How many captured decode steps a churning mixed load needs, for each unit of capture: counted on the engine's own
padded layouts, on any device (the counts are plain data; only the captures themselves need CUDA).

Issue #14 leaves the unit of capture open: a graph per padded layout (what `server.engine.graphs` captures: the
schedules present, the groups' row buckets, the context bucket) multiplies with the mixes a load produces; a graph per
layer application (kind, layers, rows bucket) is shared by every mix but replays once per application. This drives
the real engine loop (random weights, SmolLM2's 30 layers at a tiny width) with requests arriving at random, each
with a policy drawn from a mix, a random prompt and a random length, and counts over the same decode steps:

  design        layout: (schedules, the groups' buckets, context bucket) as gathering attention needs it;
                context_free: the same without the context bucket (attention in place covers every block);
                application: (kind, layers, bucket of its rows, context bucket for attention), kept without bound
  rule          how the groups are padded (`group_buckets`): own = each group to its own bucket; shared<=N = every
                group to the largest one's bucket while the step stays within N rows; shared = always;
                shared<=N+kept = the engine's own layouts: shared<=N, plus a group of padding rows kept for a
                schedule whose rows left in the last `KEEP_STEPS` steps where the step reads no more weights
  distinct      distinct keys the load produced (captures with no bound)
  captures      keys built with the engine's bound (`MAX_GRAPHS`, least recently used first): captures a GPU pays
  hit rate      graph uses whose key was kept, among all uses (what replays)
  replays/step  graph launches per step (1 for a layout; one per application otherwise)
  padded/real   rows the padded steps run per real row

    .venv/bin/python benchmarks/bench_layouts.py --json /tmp/layouts.json     # ~15 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from server.engine import graphs as graphs_module  # noqa: E402
from server.engine.bench import _IdTokenizer  # noqa: E402
from server.engine.executor import Row  # noqa: E402
from server.engine.generate import Engine  # noqa: E402
from server.engine.graphs import DecodeGraphs  # noqa: E402
from server.engine.request import Request  # noqa: E402
from server.engine.sampling import SamplingParams  # noqa: E402
from server.policy.planner import Apply  # noqa: E402

MIXES = {
    "p8": ("full", "skip:8", "pairs"),  # the mixed batch
    "wide": ("full", "skip:4", "skip:8", "skip:12", "pairs", "parallel:10-19"),
}
SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=30, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True)


# how groups are padded: `group_buckets` with these `shared_up_to` (0: each group its own bucket)
RULES = {"own": 0, f"shared<={graphs_module.SHARED_UP_TO}": graphs_module.SHARED_UP_TO, "shared": 10**9}
ENGINE = f"shared<={graphs_module.SHARED_UP_TO}+kept"  # the engine's layouts (`DecodeGraphs.layout`)


@dataclass
class Counter:
    """Keys seen over a load, with an LRU of `bound` kept keys."""

    bound: int
    kept: OrderedDict = field(default_factory=OrderedDict)
    seen: set = field(default_factory=set)
    built: int = 0
    hits: int = 0
    uses: int = 0

    def see(self, key: object) -> None:
        self.seen.add(key)
        self.uses += 1
        if key in self.kept:
            self.kept.move_to_end(key)
            self.hits += 1
            return
        self.built += 1
        self.kept[key] = None
        if len(self.kept) > self.bound:
            self.kept.popitem(last=False)

    def figures(self, steps: int) -> dict:
        return {"distinct": len(self.seen), "captures": self.built, "hit_rate": self.hits / max(1, self.uses),
                "replays_per_step": self.uses / max(1, steps)}


def keys(graphs: DecodeGraphs, rows: list[Row]) -> tuple[dict[str, tuple], list[tuple], dict[str, int]]:
    """The step's layout key under each rule (schedules, each group's bucket, context bucket), its applications'
    keys (kind, layers, bucket of the application's real rows, context bucket for attention: the engine's own plan),
    and its padded rows under each rule."""
    sizes: dict = {}
    for r in rows:
        sizes[r.schedule] = sizes.get(r.schedule, 0) + 1
    order = sorted(sizes, key=lambda s: s.key)
    engine = graphs.layout(rows)
    nb = engine.num_blocks
    layouts, padded_rows = {}, {}
    for rule, up_to in RULES.items():
        counts = graphs_module.group_buckets([sizes[s] for s in order], shared_up_to=up_to)
        layouts[rule] = (tuple(s.key for s in order), tuple(counts), nb)
        padded_rows[rule] = sum(counts)
    # the engine's own layout: shared buckets, and the groups it keeps for schedules whose rows left (KEEP_STEPS)
    layouts[ENGINE] = (tuple(dict.fromkeys(r.schedule.key for r in engine.padded)), engine.counts, nb)
    padded_rows[ENGINE] = len(engine.padded)
    plan = graphs.executor.plan([Row(graphs_module.PAD, s, 0, 1) for s in order])
    assert [s.key for s in plan.schedules] == [s.key for s in order]
    apps = []
    for e in plan.entries:
        if isinstance(e, Apply):
            n = sum(sizes[order[u.schedule]] for u in e.uses[0])
            apps.append((e.kind, e.layers, graphs_module.bucket(n), nb if e.kind == "attn" else 0))
    return layouts, apps, padded_rows


def run(mix: str, *, rows: int, steps: int, seed: int, bound: int) -> dict:
    """A load whose mean concurrency is about `rows`: Poisson arrivals, prompts of 4 to 200 tokens, 8 to 160 new
    tokens each, policies drawn uniformly from the mix. Counted over every decode step of `steps` engine steps."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from server.engine.loop import EngineLoop, QueueFullError  # imports prometheus_client: not where churn runs

    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPE))
    engine = Engine.from_hf(hf, _IdTokenizer(), device="cpu", graphs=True, attention="gathered")
    loop = EngineLoop(engine, max_num_seqs=rows * 2, max_model_len=512, queue_capacity=4 * rows,
                      kv_budget_tokens=rows * 2 * 512 * 30)
    graphs = loop.batch.executor.graphs
    assert graphs is not None
    layout = {rule: Counter(bound) for rule in (*RULES, ENGINE)}
    context_free = {rule: Counter(bound) for rule in (*RULES, ENGINE)}  # attention in place: no context bucket
    application = Counter(10**9)
    padded = dict.fromkeys((*RULES, ENGINE), 0)
    real_rows: list[int] = []
    real = DecodeGraphs.decode

    def counted(self: DecodeGraphs, tokens: torch.Tensor, rs: list[Row], **kw: bool) -> torch.Tensor:
        real_rows.append(len(rs))
        layouts, apps, padded_rows = keys(self, rs)
        for rule, key in layouts.items():
            layout[rule].see(key)
            context_free[rule].see(key[:2])
            padded[rule] += padded_rows[rule]
        for k in apps:
            application.see(k)
        return real(self, tokens, rs, **kw)

    rng = random.Random(seed)
    schedules = {p: engine.compile(p) for p in MIXES[mix]}
    DecodeGraphs.decode = counted
    try:
        for i in range(steps):
            for j, (prompt, params, policy) in enumerate(arrivals(rng, rows=rows, policies=MIXES[mix],
                                                                  vocab=SHAPE["vocab_size"])):
                try:
                    loop.submit(Request(f"r{i}.{j}", prompt, params, schedules[policy]), lambda out: None)
                except QueueFullError:  # dropped, as a server answers 503
                    pass
            loop.step()
    finally:
        DecodeGraphs.decode = real
    n, total = len(real_rows), sum(real_rows)
    return {"mix": mix, "policies": list(MIXES[mix]), "decode_steps": n, "mean_rows": total / max(1, n),
            "max_rows": max(real_rows, default=0), "bound": bound, "engine_stats": graphs.stats(),
            "layout": {rule: c.figures(n) | {"padded_over_real": padded[rule] / max(1, total)}
                       for rule, c in layout.items()},
            "context_free": {rule: c.figures(n) | {"padded_over_real": padded[rule] / max(1, total)}
                             for rule, c in context_free.items()},
            "application": application.figures(n)}


MAX_PROMPT, MAX_NEW = 200, 160


def arrivals(rng: random.Random, *, rows: int, policies: tuple[str, ...], vocab: int,
             ) -> list[tuple[list[int], SamplingParams, str]]:
    """One step's new requests for a load whose mean concurrency is about `rows`: Poisson arrivals, prompts of 4 to
    `MAX_PROMPT` random ids below `vocab`, 8 to `MAX_NEW` new tokens (greedy, no stop), a policy drawn uniformly."""
    rate = rows / ((8 + MAX_NEW) / 2)  # arrivals per step that keep `rows` running (Little's law)
    got = []
    for _ in range(_poisson(rng, rate)):
        prompt = [rng.randrange(2, vocab) for _ in range(rng.randint(4, MAX_PROMPT))]
        params = SamplingParams(max_tokens=rng.randint(8, MAX_NEW), ignore_eos=True, temperature=0.0)
        got.append((prompt, params, rng.choice(policies)))
    return got


def churn(engine: Engine, *, policies: tuple[str, ...], rows: int, steps: int, seed: int = 0,
          shared_up_to: int | None = None) -> dict:
    """Decode throughput under churn: the same arrivals as `run`, fed straight to one engine batch (no HTTP, no
    engine loop: it runs where the web stack and prometheus_client are missing, as on the GPU machine), up to
    2 x `rows` at once (later arrivals wait). shared_up_to: the captured steps' padding rule (`group_buckets`; None:
    the engine's). -> tokens per second over the whole run (prefills, captures and waits included) and what the
    captured steps did."""
    device = engine.model.device
    max_len = MAX_PROMPT + MAX_NEW
    slots = max(engine.compile(p).num_slots for p in policies)
    batch = engine.new_batch(max_len=max_len, num_blocks=2 * rows * -(-max_len // engine.block_size) * slots + 1)
    graphs = batch.executor.graphs
    if graphs is not None and shared_up_to is not None:
        graphs.shared_up_to = shared_up_to
    schedules = {p: engine.compile(p) for p in policies}
    rng = random.Random(seed)
    waiting: list = []
    tokens = decode_steps = 0
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        waiting += arrivals(rng, rows=rows, policies=policies, vocab=engine.vocab_size)
        room = 2 * rows - len(batch.sequences)
        new, waiting = waiting[:room], waiting[room:]
        batch.add([engine.new_sequence(prompt, params, schedules[p]) for prompt, params, p in new])
        decode_steps += bool(batch.sequences)
        batch.step()
        tokens += sum(len(s.output_ids) for s in batch.filter())
    _sync(device)
    wall = time.perf_counter() - t
    tokens += sum(len(s.output_ids) for s in batch.sequences)
    return {"tok_s": tokens / wall, "tokens": tokens, "wall_s": wall, "decode_steps": decode_steps,
            "graphs": None if graphs is None else graphs.stats()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _poisson(rng: random.Random, lam: float) -> int:
    n, p, limit = 0, 1.0, math.exp(-lam)
    while True:
        p *= rng.random()
        if p <= limit:
            return n
        n += 1


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--rows", default="8,32,64", help="mean concurrencies to load at, comma-separated")
    ap.add_argument("--mixes", default=",".join(MIXES), help=f"comma-separated: {', '.join(MIXES)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    for mix in a.mixes.split(","):
        if mix not in MIXES:
            ap.error(f"unknown mix {mix!r}; there are {', '.join(MIXES)}")
    results = []
    print(f"{'mix':>5} {'rows':>5} {'design':>13} {'rule':>10} {'distinct':>9} {'captures':>9} {'hit rate':>9} "
          f"{'replays/step':>12} {'padded/real':>11}")
    for mix in a.mixes.split(","):
        for rows in (int(r) for r in a.rows.split(",")):
            r = run(mix, rows=rows, steps=a.steps, seed=a.seed, bound=graphs_module.MAX_GRAPHS)
            results.append(r)
            lines = [(d, rule, f) for d in ("layout", "context_free") for rule, f in r[d].items()]
            lines.append(("application", "", r["application"]))
            for design, rule, f in lines:
                print(f"{mix:>5} {r['mean_rows']:5.1f} {design:>13} {rule:>10} {f['distinct']:9d} {f['captures']:9d} "
                      f"{f['hit_rate']:9.3f} {f['replays_per_step']:12.1f} {f.get('padded_over_real', 1.0):11.2f}")
            if a.json:
                a.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
