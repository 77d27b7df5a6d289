"""Check that lm-evaluation-harness's own `local-completions` model scores a task against a Painters server, with
the policy chosen by the model name (`smollm2-135m@POLICY`), and compare with `painters eval` on the same items.

Needs `pip install lm-eval` and data files (default: ARC-Easy from ../shared/data), so it is a benchmark script,
not a test. Runs offline: lm-eval reads the JSONL through `datasets`' json loader and tokenizes through the server's
/tokenize, /detokenize and /tokenizer_info endpoints (tokenizer_backend=remote).

    python benchmarks/lm_eval_check.py --policy skip:4 --limit 100
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import typer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_server import free_port, start_server  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "arc" / "arc_easy_test_olmes.jsonl"
app = typer.Typer(add_completion=False)


def task_yaml(data: Path) -> str:
    import lm_eval

    builtin = Path(lm_eval.__file__).parent / "tasks" / "arc" / "arc_easy.yaml"
    return f"""include: {builtin}
task: arc_easy_painters
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    test: {data.resolve()}
training_split: null
validation_split: null
test_split: test
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
should_decontaminate: false
"""


@app.command()
def main(policy: str = "skip:4", limit: int = 100, data: Path = DEFAULT_DATA, url: str | None = None,
         concurrent: int = 8) -> None:
    if not data.exists():
        raise SystemExit(f"no data at {data}; pass --data PATH (ARC-Easy in the OLMES JSONL form)")
    proc = None
    if url is None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_server(port, "smollm2-135m", max_num_seqs=16, prefix_caching=True)  # as `make serve`
    try:
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "arc_easy_painters.yaml").write_text(task_yaml(data))
            env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
            model_args = (f"model=smollm2-135m@{policy},base_url={url}/v1/completions,tokenizer_backend=remote,"
                          f"num_concurrent={concurrent},max_retries=3")
            cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", model_args,
                   "--tasks", "arc_easy_painters", "--include_path", tmp, "--limit", str(limit),
                   "--output_path", str(Path(tmp, "out"))]
            subprocess.run(cmd, env=env, check=True)
            result_file = next(Path(tmp, "out").rglob("results_*.json"))
            harness = json.loads(result_file.read_text())["results"]["arc_easy_painters"]
        ours = subprocess.run(
            [sys.executable, "-m", "server.cli", "eval", "--url", url, "--task", "arc_easy", "--data", str(data),
             "--policies", policy, "--limit", str(limit), "--json"], check=True, capture_output=True, text=True)
        painters = json.loads(ours.stdout.strip().splitlines()[-1])
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    (key, row), = painters.items()
    print(json.dumps({"policy": key, "limit": limit,
                      "lm_eval_local_completions": {"acc": harness.get("acc,none"),
                                                    "acc_stderr": harness.get("acc_stderr,none"),
                                                    "acc_norm": harness.get("acc_norm,none")},
                      "painters_eval": row}, indent=2))


if __name__ == "__main__":
    app()
