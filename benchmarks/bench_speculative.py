"""What speculative decoding buys on the real SmolLM2, and how many drafted tokens it keeps.

Two workloads, each prompt alone (or `--batch` at a time), greedy, `--new-tokens` each, through SmolLM2's chat template:
- copy: a passage to repeat word for word (WikiText-2 test paragraphs under `--data`, else built-in ones): the case
  prompt lookup is for (quoting, extraction, editing).
- gsm8k: grade-school maths questions answered step by step (GSM8K test under `--data`, else built-in ones): free
  text that reuses the question's numbers and names now and then.
For each configuration (off; `ngram/k[/MIN]`: prompt lookup drafting k tokens; `layer_skip/POLICY/k`: the model's own
layers under POLICY drafting k) it prints tokens per second, its ratio to `off` in the same run, the share of drafted
tokens kept, the tokens a verifying forward gives, and whether every token equals `off`'s. Same model, one
configuration after the other, each warmed up on its first prompt first:

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_speculative.py --data ../shared/data
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from server.engine.generate import Engine  # noqa: E402
from server.engine.sampling import SamplingParams  # noqa: E402
from server.engine.speculative import PROMPT_LOOKUP_MIN, Speculation  # noqa: E402
from server.model.loader import load_model  # noqa: E402

CONFIGS = "off;ngram/4/1;ngram/2;ngram/4;ngram/6;ngram/8;layer_skip/skip:2/2;layer_skip/skip:4/2;layer_skip/skip:6/3"
PASSAGES = [
    "The river rises in the northern hills and flows south for two hundred miles before it reaches the sea. Its "
    "valley was settled early, and the towns along its banks grew rich on the trade in wool and grain.",
    "In 1879 the company opened its first factory in the city, making steel rails for the new railways. Within ten "
    "years it employed four thousand workers and had built houses, a school and a library for their families.",
    "The species nests on cliffs along the coast and feeds on small fish caught near the surface. Its numbers fell "
    "sharply in the twentieth century but have recovered since the islands became a protected reserve.",
]
QUESTIONS = [
    "Tom has 3 boxes of apples with 12 apples in each box. He gives 9 apples to his sister. How many apples does Tom "
    "have left?",
    "A train travels 60 miles per hour for 3 hours and then 40 miles per hour for 2 hours. How far does it travel in "
    "all?",
    "Sara buys 4 notebooks at 2 dollars each and a pen for 3 dollars. She pays with a 20 dollar bill. How much change "
    "does she get?",
]


def workloads(data: Path | None, n: int) -> dict[str, list[str]]:
    """The user messages of each workload: from the benchmark files under `data` when given, else built in."""
    passages, questions = PASSAGES, QUESTIONS
    if data is not None:
        lines = (data / "wikitext-2" / "test.txt").read_text().splitlines()
        passages = [line.strip() for line in lines  # paragraphs of a few sentences, none with <unk> or @-@
                    if 300 < len(line.strip()) < 700 and not line.startswith(" =") and "<unk>" not in line
                    and " @" not in line]
        with open(data / "gsm8k" / "test.jsonl") as f:
            questions = [json.loads(line)["question"] for line in f]
    return {"copy": [f"Repeat the following text word for word.\n\n{p}" for p in passages[:n]],
            "gsm8k": [f"{q}\nSolve it step by step." for q in questions[:n]]}


def parse(config: str) -> Speculation | None:
    """off | ngram/k | ngram/k/MIN (prompt_lookup_min, default the server's; max 4 or MIN) | layer_skip/POLICY/k"""
    parts = config.split("/")
    if parts == ["off"]:
        return None
    if parts[0] == "ngram" and len(parts) in (2, 3):
        lowest = int(parts[2]) if len(parts) == 3 else PROMPT_LOOKUP_MIN
        return Speculation("ngram", int(parts[1]), lookup_min=lowest, lookup_max=max(4, lowest))
    if parts[0] == "layer_skip" and len(parts) == 3:
        return Speculation("layer_skip", int(parts[2]), draft=parts[1])
    raise SystemExit(f"configuration {config!r}: off, ngram/k, ngram/k/MIN or layer_skip/POLICY/k")


def run(engine: Engine, prompts: list[list[int]], *, new_tokens: int, batch: int = 1) -> dict[str, Any]:
    """The prompts `batch` at a time (decoded together), greedy; the figures over all of them, and every prompt's
    tokens."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0)
    engine.generate(prompts[:batch], params=params)  # warm-up: programs compiled, caches filled
    tokens, drafts, drafted, kept, seconds = [], 0, 0, 0, 0.0
    for i in range(0, len(prompts), batch):
        t0 = time.perf_counter()
        results = engine.generate(prompts[i : i + batch], params=params)
        seconds += time.perf_counter() - t0
        for result in results:
            tokens.append(result.token_ids)
            drafts += result.speculated.drafts
            drafted += result.speculated.draft_tokens
            kept += result.speculated.accepted_tokens
    return {"tok_s": sum(map(len, tokens)) / seconds, "tokens": tokens, "kept": kept / drafted if drafted else None,
            "per_forward": (kept + drafts) / drafts if drafts else None}


def chat(engine: Engine, message: str) -> list[int]:
    text = engine.tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                                add_generation_prompt=True)
    return engine.encode(text, add_special_tokens=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", type=Path, default=None, help="../shared/data: WikiText-2 and GSM8K test items")
    parser.add_argument("--prompts", type=int, default=5, help="per workload")
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--configs", default=CONFIGS, help="';'-separated: off, ngram/k, ngram/k/MIN, "
                        "layer_skip/POLICY/k")
    parser.add_argument("--workloads", default="copy,gsm8k")
    parser.add_argument("--batch", type=int, default=1, help="prompts decoded together")
    args = parser.parse_args()
    loaded = load_model(args.model)
    base = Engine.from_loaded(loaded)
    print(f"{args.model}, batch {args.batch}, greedy, {args.new_tokens} new tokens, {torch.get_num_threads()} threads, "
          f"{args.prompts} prompts per workload ({'data: ' + str(args.data) if args.data else 'built-in prompts'})")
    print(f"{'workload':<8} {'configuration':<22} {'tok/s':>7} {'/ off':>6} {'kept':>6} {'tok/fwd':>8} {'same':>5}")
    for name, messages in workloads(args.data, args.prompts).items():
        if name not in args.workloads.split(","):
            continue
        prompts = [chat(base, m) for m in messages]
        off = None
        for config in args.configs.split(";"):
            engine = Engine(base.model, base.tokenizer, eos_ids=base.eos_ids, config=base.config,
                            speculation=parse(config))
            r = run(engine, prompts, new_tokens=args.new_tokens, batch=args.batch)
            off = off or r
            kept = "-" if r["kept"] is None else f"{r['kept']:.2f}"
            per = "-" if r["per_forward"] is None else f"{r['per_forward']:.2f}"
            print(f"{name:<8} {config:<22} {r['tok_s']:7.2f} {r['tok_s'] / off['tok_s']:6.2f} {kept:>6} {per:>8} "
                  f"{'yes' if r['tokens'] == off['tokens'] else 'NO':>5}", flush=True)


if __name__ == "__main__":
    main()
