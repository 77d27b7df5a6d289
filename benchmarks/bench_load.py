"""Load benchmark: peak RSS of loading a model the old way against `server.model.loader.load_model`, each measured in a
fresh interpreter as its peak (VmHWM) above the RSS after imports.

old = config + tokenizer + transformers' from_pretrained (float32), then its weights copied into our stacks (the
      loader and Transformer before server/model/weights.py; the LM head copied even when tied, as it was)
new = load_model(name): config + tokenizer + the checkpoint streamed into the stacks
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
app = typer.Typer(add_completion=False)

PROBE = """
def _status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
"""
IMPORTS = """
import json, sys, torch
import transformers, safetensors.torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from server.model.loader import load_model
from server.model.weights import weights_from_hf_model
"""
OLD = """
src = sys.argv[1]
config, tokenizer = AutoConfig.from_pretrained(src), AutoTokenizer.from_pretrained(src)
hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval().requires_grad_(False)
weights = weights_from_hf_model(hf, dtype=torch.float32, device="cpu")
head = hf.lm_head.weight.detach().T.contiguous()
nbytes = weights.nbytes()
"""
NEW = """
nbytes = load_model(sys.argv[2], device="cpu", dtype=torch.float32).weights.nbytes()
"""


@dataclass
class LoadBench:
    model: str
    weights_mib: float  # the stacks as loaded (float32, tied head counted once)
    old_peak_mib: float
    new_peak_mib: float
    ratio: float  # old / new


def peak_mib(work: str, source: Path, name: str) -> tuple[float, float]:
    """(peak RSS growth over the post-import baseline, weight bytes loaded), both in MiB."""
    code = "\n".join([PROBE, IMPORTS, "_base = _status('VmRSS')", work,
                      "print(json.dumps([_status('VmHWM') - _base, nbytes]))"])
    out = subprocess.run([sys.executable, "-c", code, str(source), name], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    grew, nbytes = json.loads(out.stdout.strip().splitlines()[-1])
    return grew / 2**20, nbytes / 2**20


@app.command()
def main(
    model: Annotated[str, typer.Option(help="alias, directory, .gguf or hub id")] = "smollm2-135m",
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Peak RSS of loading `model` the old way and with load_model."""
    from server.model.loader import local_source

    console = Console(stderr=as_json)
    console.print("[dim]resolving (converts a GGUF once)…[/]")
    source = local_source(model)
    console.print("[dim]old way…[/]")
    old, weights = peak_mib(OLD, source, model)
    console.print("[dim]load_model…[/]")
    new, _ = peak_mib(NEW, source, model)
    result = LoadBench(model=model, weights_mib=round(weights, 1), old_peak_mib=round(old, 1), new_peak_mib=round(new, 1),
                       ratio=round(old / new, 2))
    if as_json:
        print(json.dumps(asdict(result)))
        return
    t = Table(title=f"peak RSS while loading {model} (float32, CPU)")
    for col in ("weights MiB", "old peak MiB", "new peak MiB", "old / new"):
        t.add_column(col, justify="right")
    t.add_row(f"{result.weights_mib:.1f}", f"{result.old_peak_mib:.1f}", f"{result.new_peak_mib:.1f}", f"{result.ratio:.2f}")
    console.print(t)


if __name__ == "__main__":
    app()
