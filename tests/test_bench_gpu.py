"""`make bench-gpu`'s script runs end to end (on the CPU, tiny shapes, without the packages the GPU image lacks), so a
GPU session can run it at once."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ("full_bs1_bandwidth_fraction", "skip8_speedup_over_ideal", "pairs_over_full", "p8_mixed_over_full",
           "bs64_bandwidth_fraction")


# What the GPU image lacks (the device notes' package list): `make bench-gpu` runs the benchmark without them, and
# carries them as wheels only for the checkpoint test and the HTTP runs.
NOT_ON_THE_GPU_IMAGE = ("fastapi", "starlette", "pydantic", "pydantic_settings", "uvicorn", "sse_starlette",
                        "httpx_sse", "platformdirs", "gguf", "xgrammar", "openai")


def _as_on_the_gpu_image(tmp_path: Path) -> dict[str, str]:
    """An environment in which importing any of NOT_ON_THE_GPU_IMAGE fails, as it would on the GPU."""
    absent = tmp_path / "not-on-the-gpu-image"
    for name in NOT_ON_THE_GPU_IMAGE:
        (absent / name).mkdir(parents=True)
        (absent / name / "__init__.py").write_text(f"raise ImportError('{name} is not on the GPU image')\n")
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(absent), os.environ.get("PYTHONPATH"))))}


def test_the_cuda_tests_collect_without_the_web_stack(tmp_path: Path) -> None:
    """`make bench-gpu`'s test phase collects the CUDA tests on an image without the web stack: a module-level import
    of openai in conftest.py had made it stop at collection, which the CPU suite could not see."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", "gpu",
                           "tests/test_gpu.py", "tests/test_weights.py", "tests/test_transfer.py", "-k", "gpu or cuda"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          # this venv's pytest plugins (hypothesis, schemathesis, ...) are not on the image either
                          env={**_as_on_the_gpu_image(tmp_path), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    collected = [line for line in proc.stdout.splitlines() if "::" in line]
    assert len(collected) >= 30, proc.stdout[-2000:]


def _smoke(tmp_path: Path, *extra: str) -> dict:
    """The script with --smoke, where importing any of NOT_ON_THE_GPU_IMAGE fails, as it would on the GPU."""
    out, env = tmp_path / "bench-gpu.json", _as_on_the_gpu_image(tmp_path)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/bench_gpu.py"), "--smoke", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bench-gpu" in proc.stdout and "full_bs1_bandwidth_fraction" in proc.stdout  # the table
    return json.loads(out.read_text())


def test_no_section_starts_past_the_budget(tmp_path: Path) -> None:
    """Out of time, the script still writes its JSON and prints its table, naming what it left out, so a GPU run cut
    by its budget keeps what it measured and says what it did not."""
    d = _smoke(tmp_path, "--budget-s", "0.001", "--skip", "transformers64")
    assert d["skipped_for_time"] == ["batch1", "mixed", "bs64", "churn", "attention", "profile", "fused",
                                     "reduce_overhead", "gathered", "triton", "in_place", "speculative",
                                     "transformers"]
    assert not any(k in d for k in FIGURES) and "section_s" not in d


@pytest.mark.slow
def test_smoke_every_section(tmp_path: Path) -> None:
    """Attention compiles FlexAttention, the Triton kernel runs in Triton's interpreter (TRITON_INTERPRET=1 from
    conftest reaches the subprocess), the decode step compiles whole (reduce_overhead) and transformers runs generate
    twice per batch size: a minute or two. One run checks the engine's sections and the attention's."""
    d = _smoke(tmp_path)
    assert not d.get("errors"), d.get("errors")
    for key in ("date", "device", *FIGURES, "full_bs1_tok_s", "skip8_bs1_tok_s", "pairs_bs1_tok_s", "mixed12_tok_s",
                "bs64_tok_s"):
        assert key in d, key
    assert all(d[k] > 0 for k in FIGURES)
    assert d["smoke"] is True and d["device"] == "cpu (smoke)" and d["peak_card"] == "H200 (smoke)"
    # the tiny shape's mix re-reads 3 of 10 attentions (13 attention reads, 10 MLP reads): 0.92 of full's bytes
    assert d["p8_weight_bound"] == pytest.approx(0.9157, abs=1e-3)
    assert d["p8_over_bound"] == pytest.approx(d["p8_mixed_over_full"] / d["p8_weight_bound"])
    # churn: both padding rules decoded tokens; on the CPU nothing is captured, but layouts are counted
    assert d["churn_shared_tok_s"] > 0 and d["churn_own_tok_s"] > 0 and d["churn_shared_over_own"] > 0
    assert d["churn_shared_graphs"]["captures"] == 0 and d["churn_shared_graphs"]["layout_hit_rate"] > 0
    # the fused section: layer math through torch.compile (Inductor's C++ here), the same greedy tokens
    assert d["fused_full_bs1_tok_s"] > 0 and d["fused_pairs_over_full"] > 0 and d["fused_p8_mixed_over_full"] > 0
    assert d["fused_equals_headline"] == {"bs1": True, "mixed12": True}
    # overlapped decoding (the headline, as served on CUDA) against each step read before the next: same tokens
    assert d["bs1_overlapped_equals_stepwise"] is True and d["bs64_overlapped_equals_stepwise"] is True
    assert d["overlap_speedup_bs1"] > 0 and d["overlap_speedup_bs64"] > 0
    assert d["attn_4k_over_bound"] > 0 and d["attn_4k_max_abs_err"] < 1e-4 and d["attn_4k_triton_max_abs_err"] < 1e-4
    assert d["attn_4k_path"] in ("gathered", "in_place", "triton") and len(d["attn_4k_triton_tilings_ms"]) == 15
    assert d["attn_4k_triton_tiling"] == "64/4"  # the default off CUDA: nothing is timed there
    assert {"hf_static_eager_bs1_tok_s", "hf_static_eager_bs4_tok_s", "in_place_full_bs1_tok_s",
            "in_place_bs64_tok_s", "triton_full_bs1_tok_s", "triton_bs64_bandwidth_fraction",
            "triton_p8_mixed_over_full"} <= set(d)
    assert d["attention"] == "gathered" and d["gathered_is_headline"]  # "auto" on the CPU
    assert d["triton_equals_headline"] == {"bs1": True, "mixed12": True}
    assert d["in_place_equals_headline"] == {"bs1": True, "mixed12": True}
    # torch.compile(mode="reduce-overhead") over the engine's own padded step: Inductor's C++ here, no CUDA graphs
    assert d["reduce_overhead_same_top1"] and d["reduce_overhead_max_abs_logit_diff"] < 1e-4
    assert d["reduce_overhead_ms"] > 0 and d["hand_capture_ms"] > 0 and d["reduce_overhead_compile_s"] > 0
    # speculative decoding: a speculating engine's greedy tokens are the headline's; a verification's cost
    assert d["spec_ngram_same_tokens"] == d["spec_ngram_of_tokens"] > 0  # float32: every token the headline's
    assert d["spec_ngram_bs1_tok_s"] > 0 and d["spec_ngram_drafted"] > 0
    assert set(d["verify_forward_ms"]) == {"1", "2", "3", "5"} and d["verify5_over_verify1"] > 0


def test_smoke_refuses_the_committed_path() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/bench_gpu.py"), "--smoke"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode != 0 and "--smoke needs --out" in proc.stderr
