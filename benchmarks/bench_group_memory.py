"""Memory of a wide parallel group: the peak RSS a prefill adds on SmolLM2 under `full` and under one parallel group
of the middle layers, with the group run a few members at a time (`MAX_GROUP_TOKENS`, the server's) and all at once
(the executor before the bound). Each run is a fresh interpreter; the figure is its peak (VmHWM) above the peak
after loading and one short warm-up generation.

    python benchmarks/bench_group_memory.py --tokens 2000
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
from server.engine import executor
from server.engine.generate import Engine
from server.engine.sampling import SamplingParams
from server.model.loader import load_model

def hwm():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

policy, tokens, rows, bound = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
if bound:
    executor.MAX_GROUP_TOKENS = bound
torch.set_num_threads(1)
engine = Engine.from_loaded(load_model("smollm2-135m"), name="smollm2-135m")
prompt = [100 + i % 1000 for i in range(tokens)]
engine.generate([prompt[:8]], policy="full", params=SamplingParams(max_tokens=1))
before, t = hwm(), time.perf_counter()
engine.generate([prompt] * rows, policy=policy, params=SamplingParams(max_tokens=1))
print(json.dumps({"added_mib": (hwm() - before) / 2**20, "seconds": time.perf_counter() - t}))
"""


def measure(policy: str, tokens: int, rows: int, bound: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", RUN, policy, str(tokens), str(rows), str(bound)], cwd=ROOT,
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@app.command()
def main(tokens: Annotated[int, typer.Option(help="prompt tokens per row")] = 2000,
         rows: Annotated[int, typer.Option(help="prompts prefilled together")] = 1,
         group: Annotated[str, typer.Option(help="the wide group's policy")] = "parallel:1-28",
         as_json: bool = typer.Option(False, "--json")) -> None:
    from server.engine.executor import MAX_GROUP_TOKENS

    runs = {"full": measure("full", tokens, rows, 0),
            f"{group}, {MAX_GROUP_TOKENS} (layer, position) pairs at once": measure(group, tokens, rows, 0),
            f"{group}, every member at once (before)": measure(group, tokens, rows, 2**62)}
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
