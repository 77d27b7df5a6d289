"""What the search's bound kept out: each searched policy that passed screening beside the paper's centred skip of as
many layers, on the held-out items of the search in docs/results/search (items 44-91 of each task), paired per task.

    OMP_NUM_THREADS=1 .venv/bin/python docs/results/search/heldout_check.py http://127.0.0.1:PORT out/search-smol/cache
"""

import asyncio
import sys
from pathlib import Path

from clients.evaluate import FULL, EvalSession
from clients.search import compare, load_splits, mean_estimate

TASKS = ["arc_easy", "hellaswag", "lambada_openai", "piqa"]
PAIRS = [("skip:18-20", "skip:13-15"), ("skip:14,17", "skip:14-15")]  # (searched, centred skip of as many layers)


async def main(url: str, cache: Path) -> None:
    splits = load_splits(TASKS, data=None, data_dir=Path("../shared/data"), screen=12, select=32, heldout=48)
    async with EvalSession.open(url, concurrency=16, cache_dir=cache) as s:
        async def held(policy: str):
            return {sp.name: await s.score(policy, sp.heldout) for sp in splits}

        full = await held(FULL)
        print("| policy | " + " | ".join(TASKS) + " | mean normalised | difference |")
        print("| --- | " + " | ".join("---" for _ in TASKS) + " | --- | --- |")
        print("| `full` | " + " | ".join(f"{full[t].accuracy:.3f} ± {full[t].stderr:.3f}" for t in TASKS) + " | 1 | |")
        for mine, base in PAIRS:
            c = compare(await held(mine), await held(base), full, baseline=base, baseline_speedup=None)
            for policy, acc, norm in ((mine, c.accuracy, c.finalist), (base, c.base_accuracy, c.base)):
                m = mean_estimate(list(norm.values()))
                diff = c.mean_difference
                print(f"| `{policy}` | " + " | ".join(f"{acc[t][0]:.3f} ± {acc[t][1]:.3f} ({norm[t].value:.2f})"
                                                    for t in TASKS)
                      + f" | {m.value:.3f} ± {m.se:.3f} | "
                      + (f"{diff.value:+.3f} ± {diff.se:.3f} vs `{base}`" if policy == mine else "") + " |")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], Path(sys.argv[2])))
