"""Print the GPU benchmark JSONs as one table: tok/s, weight bandwidth against the H200's 4.8 TB/s, streams vs
batched for `pairs`."""

import json
import sys

PEAK_GB_S = 4800.0
for path in sys.argv[1:]:
    with open(path) as f:
        lines = [line for line in f if line.strip().startswith("{")]
    if not lines:
        print(f"{path}: no result")
        continue
    r = json.loads(lines[-1])
    print(f"\n{r['model']} ({r['dtype']}, {r['device']}): transformers generate {r['hf_generate_tok_s'] or 0:.1f} tok/s")
    for name, run in r["runs"].items():
        print(f"  {name:12s} {run['tok_s']:8.1f} tok/s  {run['bandwidth_gb_s']:8.1f} GB/s "
              f"({100 * run['bandwidth_gb_s'] / PEAK_GB_S:5.1f}% of 4.8 TB/s)")
    streams = r.get("pairs_streams_tok_s")
    batched = r["runs"].get("pairs", {}).get("tok_s")
    if streams and batched:
        print(f"  pairs: batched {batched:.1f} tok/s vs CUDA streams {streams:.1f} tok/s")
    print(f"  P1={r['P1']}  P2={r['P2']}  P3={r['P3']}")
