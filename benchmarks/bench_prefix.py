"""Prefix reuse for evaluation (make bench-prefix): `painters eval --task hellaswag` wall time against a server with
prefix reuse, and against one without it (target: with / without <= 0.5), the scores of both (they must agree), and
lm-evaluation-harness's in-process `hf` model on the same items and model, where lm-eval is installed.

HellaSwag sends each context with 4 endings: the context's KV (and its prompt logprobs) is computed once. Also prints
the share of prompt tokens that reuse leaves to compute (the bound on the ratio, before fixed per-request costs).
lm-eval's process imports and loads its model before it scores, while painters' server is already warm, so both are
also given less a one-item run of the same command (the fixed costs), and those are the figures to compare.
`--task arc_easy --data ...` measures ARC-Easy instead (questions long, answers short; no lm-eval run).

    python benchmarks/bench_prefix.py --limit 200 --data ../shared/data/hellaswag/hellaswag_val.jsonl.gz
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import typer
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_server import free_port, start_server  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hellaswag" / "hellaswag_val.jsonl.gz"
app = typer.Typer(add_completion=False)


def timed_eval(url: str, data: Path, limit: int, task: str) -> tuple[float, dict]:
    """Wall seconds and the JSON scores of `painters eval` (a separate process, as a user runs it)."""
    cmd = [str(Path(sys.executable).parent / "painters"), "eval", "--url", url, "--task", task,
           "--data", str(data), "--policies", "full", "--limit", str(limit), "--json"]
    t = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t
    scores = json.loads(out.stdout.strip().splitlines()[-1])
    for result in scores.values():
        result.pop("seconds", None)  # the wall time, not a score
    return wall, scores


def warm_up(url: str) -> None:
    """The eval's request shape (echoed prompt logprobs, 4 prompts at once) on text that is in no task's items: the
    server's first requests pay one-off costs, and warming on the timed items would leave them in the prefix cache."""
    words = "the painter mixed a new colour before the light changed over the harbour".split()
    for n in (4, 12, 24):
        prompts = [" ".join(words[i % len(words)] for i in range(k, k + n)) for k in range(4)]
        r = httpx.post(f"{url}/v1/completions", timeout=120, json={
            "model": "smollm2-135m", "prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": 0})
        r.raise_for_status()


def served(prefix_caching: bool) -> tuple[subprocess.Popen, str]:
    port = free_port()
    return (start_server(port, "smollm2-135m", max_num_seqs=16, prefix_caching=prefix_caching),
            f"http://127.0.0.1:{port}")


def lm_eval_hf(data: Path, limit: int) -> tuple[float, float, float] | None:
    """lm-eval's own hellaswag task (local file) with its in-process `hf` model on the converted SmolLM2:
    (wall seconds, wall seconds of the same run on one item, acc_norm), or None when lm-eval is not installed."""
    try:
        import lm_eval
    except ImportError:
        return None
    from server.model.loader import local_source

    source = local_source("smollm2-135m")
    builtin = Path(lm_eval.__file__).parent / "tasks" / "hellaswag" / "hellaswag.yaml"
    tasks = Path(tempfile.mkdtemp())
    (tasks / "hellaswag_local.yaml").write_text(
        f"include: {builtin}\ntask: hellaswag_local\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {data.resolve()}\ntraining_split: null\n"
        "validation_split: validation\n")

    def run(items: int) -> tuple[float, float]:
        out = Path(tempfile.mkdtemp(dir=tasks))
        cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
               f"pretrained={source},dtype=float32", "--tasks", "hellaswag_local", "--include_path", str(tasks),
               "--limit", str(items), "--batch_size", "16", "--device", "cpu", "--output_path", str(out)]
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, text=True,
                       env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
        wall = time.perf_counter() - t
        result = json.loads(next(out.rglob("results_*.json")).read_text())
        return wall, result["results"]["hellaswag_local"]["acc_norm,none"]

    fixed, _ = run(1)
    wall, acc_norm = run(limit)
    return wall, fixed, acc_norm


def token_share(task: str, data: Path, limit: int) -> float:
    """Prompt tokens left to compute with reuse to the token (each item's choices share their common prefix, and an
    echo request recomputes the last shared token) / prompt tokens without reuse."""
    from transformers import AutoTokenizer

    from clients.tasks import load_task
    from server.model.loader import local_source

    tokenizer = AutoTokenizer.from_pretrained(local_source("smollm2-135m"))
    total = left = 0
    for item in load_task(task, path=data, limit=limit).items:
        ids = [tokenizer.encode(c + x) for c, x in zip(item.contexts, item.continuations)]
        shared = len(os.path.commonprefix(ids))
        total += sum(map(len, ids))
        left += sum(map(len, ids)) - (len(ids) - 1) * max(shared - 1, 0)
    return left / total


@app.command()
def main(limit: int = 200, data: Path = DEFAULT_DATA, hf: bool = typer.Option(True, help="also run lm-eval's hf"),
         task: str = typer.Option("hellaswag", help="hellaswag or arc_easy (lm-eval's hf only for hellaswag)"),
         ) -> None:
    if not data.exists():
        raise SystemExit(f"no data at {data}; pass --data PATH (hellaswag_val.jsonl.gz)")
    console = Console()
    runs, fixed = {}, {}
    for reuse in (True, False):
        proc, url = served(reuse)
        try:
            warm_up(url)
            runs[reuse] = timed_eval(url, data, limit, task)
            fixed[reuse] = timed_eval(url, data, 1, task)[0]  # after: the timed run found nothing of it cached
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    harness = lm_eval_hf(data, limit) if hf and task == "hellaswag" else None
    share = token_share(task, data, limit)
    t = Table(title=f"painters eval --task {task} --limit {limit} (SmolLM2-135M, this CPU)")
    for col in ("run", "wall s", "scores"):
        t.add_column(col)
    for reuse, (wall, scores) in runs.items():
        t.add_row("prefix reuse on" if reuse else "prefix reuse off", f"{wall:.1f}", json.dumps(scores)[:120])
    ratio = runs[True][0] / runs[False][0]
    t.add_row("with / without (target <= 0.5)", f"{ratio:.2f}", "same scores: " + str(runs[True][1] == runs[False][1]))
    t.add_row("prompt tokens left to compute", f"{share:.2f}", "the bound on the ratio")
    if harness is not None:
        wall, lm_fixed, acc_norm = harness
        t.add_row("lm-eval hf (in-process, same items)", f"{wall:.1f}", f"acc_norm {acc_norm:.3f}")
        t.add_row("lm-eval hf less a 1-item run", f"{wall - lm_fixed:.1f}", f"imports, model load: {lm_fixed:.1f} s")
        ours = runs[True][0] - fixed[True]
        t.add_row("painters with reuse / lm-eval hf, each less a 1-item run", f"{ours / (wall - lm_fixed):.2f}",
                  f"painters eval's process: {fixed[True]:.1f} s")
    console.print(t)
    print(json.dumps({"task": task, "with_s": runs[True][0], "without_s": runs[False][0], "ratio": ratio,
                      "one_item_with_s": fixed[True], "one_item_without_s": fixed[False],
                      "token_share": share,
                      "scores_equal": runs[True][1] == runs[False][1],
                      "lm_eval_hf_s": harness[0] if harness else None,
                      "lm_eval_hf_one_item_s": harness[1] if harness else None,
                      "lm_eval_hf_acc_norm": harness[2] if harness else None}))


if __name__ == "__main__":
    app()
