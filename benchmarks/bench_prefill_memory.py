"""Memory of a long prefill: the peak RSS a prefill adds on SmolLM2 under `full`; under one parallel group of the
middle layers, run a few members at a time (`MAX_GROUP_TOKENS`, the server's) and all at once (the executor before
that bound); and scoring the prompt (echo with 20 top logprobs), its logits computed a few positions at a time
(`SCORE_LOGITS_BYTES`, the server's) and all at once (before that bound). Each run is a fresh interpreter; the figure
is its peak (VmHWM) above the peak after loading and one short warm-up generation of the same kind.

    python benchmarks/bench_prefill_memory.py --tokens 2000
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
app = typer.Typer(add_completion=False)

RUN = """
import json, sys, time, torch
from server.engine import executor, generate
from server.engine.generate import Engine
from server.engine.sampling import SamplingParams
from server.model.loader import load_model

def hwm():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

policy, tokens, rows, bound, echo = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
if bound:
    executor.MAX_GROUP_TOKENS = bound
if echo == "at-once":
    generate.SCORE_LOGITS_BYTES = 2**62
torch.set_num_threads(1)
engine = Engine.from_loaded(load_model("smollm2-135m"), name="smollm2-135m")
prompt = [100 + i % 1000 for i in range(tokens)]
params = SamplingParams(max_tokens=1, echo=echo != "no", logprobs=20 if echo != "no" else None)
engine.generate([prompt[:8]], policy="full", params=params)
before, t = hwm(), time.perf_counter()
engine.generate([prompt] * rows, policy=policy, params=params)
print(json.dumps({"added_mib": (hwm() - before) / 2**20, "seconds": time.perf_counter() - t}))
"""


def measure(policy: str, tokens: int, rows: int, bound: int = 0, echo: str = "no") -> dict[str, float]:
    """echo: "no", "chunked" (the server's) or "at-once"."""
    out = subprocess.run([sys.executable, "-c", RUN, policy, str(tokens), str(rows), str(bound), echo], cwd=ROOT,
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@app.command()
def main(tokens: Annotated[int, typer.Option(help="prompt tokens per row")] = 2000,
         rows: Annotated[int, typer.Option(help="prompts prefilled together")] = 1,
         group: Annotated[str, typer.Option(help="the wide group's policy")] = "parallel:1-28",
         as_json: bool = typer.Option(False, "--json")) -> None:
    from server.engine.executor import MAX_GROUP_TOKENS
    from server.engine.generate import SCORE_LOGITS_BYTES

    runs = {"full": measure("full", tokens, rows),
            f"{group}, {MAX_GROUP_TOKENS} (layer, position) pairs at once": measure(group, tokens, rows),
            f"{group}, every member at once (before)": measure(group, tokens, rows, bound=2**62),
            f"full, echo, logits within {SCORE_LOGITS_BYTES / 2**20:.0f} MiB at once": measure("full", tokens, rows,
                                                                                              echo="chunked"),
            "full, echo, every position's logits at once (before)": measure("full", tokens, rows, echo="at-once")}
    if as_json:
        print(json.dumps({"tokens": tokens, "rows": rows, "runs": runs}))
        return
    t = Table(title=f"peak RSS a prefill of {rows} x {tokens} tokens adds (SmolLM2-135M, float32, CPU, 1 thread)")
    for col in ("policy", "added MiB", "x full", "seconds"):
        t.add_column(col)
    full = runs["full"]["added_mib"]
    for name, r in runs.items():
        t.add_row(name, f"{r['added_mib']:.0f}", f"{r['added_mib'] / full:.1f}", f"{r['seconds']:.1f}")
    Console().print(t)


if __name__ == "__main__":
    app()
