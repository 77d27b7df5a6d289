"""benchmarks/serve_shape.py (the real server on random weights of a shape, a tokenizer from a directory) answers a
streamed completion over real HTTP, and benchmarks/bench_gpu_http.py's load client measures it: what a GPU session
runs on the SmolLM2 and Llama-2-7B shapes, here on the `tiny` shape on the CPU."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import httpx
import pytest

from tests.serving import HOST, ROOT, free_port, wait_until

pytestmark = pytest.mark.slow
VOCAB = 512  # serve_shape's `tiny` shape


def _module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer of 291 tokens (fewer than the tiny shape's 512), saved as a GPU session gets
    SmolLM2's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
                            ).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def server(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    info, log = tmp_path_factory.mktemp("serve") / "info.json", tokenizer_dir.parent / "serve.log"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "serve_shape.py"), "--shape", "tiny", "--tokenizer",
           str(tokenizer_dir), "--device", "cpu", "--threads", "1", "--host", HOST, "--port", str(port),
           "--max-num-seqs", "4", "--max-model-len", "128", "--info-json", str(info)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://{HOST}:{port}"
    try:
        wait_until(lambda: httpx.get(f"{url}/ready", timeout=2).status_code == 200, timeout=60, what="serve_shape",
                   alive=lambda: None if proc.poll() is None else log.read_text(errors="replace")[-2000:])
        built = json.loads(info.read_text())
        assert (built["shape"], built["vocab_size"], built["layers"], built["device"]) == ("tiny", VOCAB, 4, "cpu")
        assert built["tokenizer_vocab"] == 291
        assert (built["attention"], built["fuse_decode"], built["cuda_graphs"]) == ("gathered", False, False)  # CPU
        yield url
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0, log.read_text(errors="replace")[-2000:]  # SIGTERM drains, exits 0


def test_streamed_completion(server: str) -> None:
    body = {"model": "tiny", "prompt": "the quick brown fox", "max_tokens": 5, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}, "policy": "skip:1"}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    steps = [c for c in chunks if c["choices"]]
    assert len(steps) == 5  # one chunk per decoded token
    assert [c["choices"][0]["finish_reason"] for c in steps] == [None] * 4 + ["length"]
    assert steps[-1]["painters"]["policy"].startswith("skip:")
    assert chunks[-1]["usage"]["completion_tokens"] == 5
    plain = {k: v for k, v in body.items() if k != "stream_options"}  # only allowed with stream=true
    r = httpx.post(f"{server}/v1/completions", json={**plain, "stream": False}, timeout=60)
    assert r.json()["choices"][0]["text"] == "".join(c["choices"][0]["text"] for c in steps)  # greedy: the same


def test_token_ids_beyond_the_shape_vocabulary_get_400(server: str) -> None:
    r = httpx.post(f"{server}/v1/completions", json={"model": "tiny", "prompt": [5, VOCAB], "max_tokens": 2},
                   timeout=60)
    assert r.status_code == 400
    assert f"0-{VOCAB - 1}" in r.json()["error"]["message"]


def test_bench_http_load_client(server: str) -> None:
    """bench_gpu_http's clients: token-id prompts below the vocabulary, every token counted, mixed policies split."""
    bench = _module("bench_gpu_http")
    assert all(10 <= t < VOCAB for c in range(0, 3000, 7) for t in bench.prompt_ids(64, VOCAB, c))
    assert bench.prompt_ids(64, VOCAB, 0)[:16] != bench.prompt_ids(64, VOCAB, 1000)[:16]  # no shared first block
    wall, stats = asyncio.run(bench.load(server, model="tiny", policies=["full", "skip:1", "full"], tokens=4,
                                         prompt_len=20, vocab=VOCAB, first_client=0))
    assert [s.tokens for s in stats] == [4, 4, 4]
    assert all(0 < s.ttft_s <= s.e2e_s <= wall and s.tpot_s > 0 for s in stats)
    run = bench.summarize("mix x3", wall, stats)
    assert run.tokens == 12 and run.tok_s == pytest.approx(12 / wall)
    assert run.per_policy["full"]["clients"] == 2 and run.per_policy["skip:1"]["clients"] == 1
    # the churning mix: lengths over a quarter to all of the tokens, starts spread, every token still counted
    tokens, delays = bench.churn(8, 8, 0.5)
    assert tokens == [2, 4, 6, 8, 2, 4, 6, 8] and delays == sorted(delays) and all(0 <= d <= 0.5 for d in delays)
    wall, stats = asyncio.run(bench.load(server, model="tiny", policies=["full", "skip:1"] * 4, tokens=tokens,
                                         prompt_len=20, vocab=VOCAB, first_client=100, delays=delays))
    assert [s.tokens for s in stats] == tokens and wall >= delays[-1]
    assert [label for label, _ in bench.plan(4, ["full", "skip:1"])][-2:] == ["mix x4", "churn x4"]


def test_bench_http_reads_the_servers_graph_counters(server: str) -> None:
    """bench_gpu_http's capture figures come from the server's own /metrics: none on the CPU (no captured steps),
    and from a metrics module that holds them, the timed run's captures, replays and hit rate, kept graphs, MB."""
    from server.metrics import Metrics, QueueStats

    bench = _module("bench_gpu_http")
    assert asyncio.run(bench.graph_stats(server)) == {}
    assert bench.timed_graphs({}, {}) == {}

    def exposition(**graphs: float) -> str:
        m = Metrics(model="tiny")
        m.observe_queue(QueueStats(0, 0, 0.0, decode_graphs=graphs))
        return m.render()[0].decode()

    before = bench.decode_graph_counters(exposition(graphs=3, captures=3, replays=10, hit_rate=0.77, failures=0,
                                                    evictions=0, pinned_bytes=2**20, capture_s=1.0,
                                                    kept_bytes=2**20))
    assert before["captures"] == 3 and before["pinned_bytes"] == 2**20
    after = bench.decode_graph_counters(exposition(graphs=4, captures=4, replays=109, hit_rate=0.96, failures=0,
                                                   evictions=0, pinned_bytes=3 * 2**20, capture_s=1.5,
                                                   kept_bytes=2 * 2**20))
    got = bench.timed_graphs(before, after)
    assert got == {"captures": 1, "replays": 99, "evictions": 0, "failures": 0, "capture_s": 0.5, "hit_rate": 0.99,
                   "graphs": 4, "pinned_mb": 3.0, "kept_mb": 2.0}


def test_text_outside_the_vocabulary_is_refused():
    """A tokenizer larger than the model's vocabulary (a GPU bench pairs SmolLM2's with the 7B shape's 32000): text
    that encodes past it gets a 400 naming the range, not an out-of-bounds lookup in the engine."""
    from server.api.errors import APIError
    from server.api.pipeline import _tokenize

    from server.engine.generate import Engine
    from tests.conftest import CharTokenizer, tiny_llama

    eng = Engine.from_hf(tiny_llama(vocab_size=50), CharTokenizer(), device="cpu")
    assert _tokenize(eng, ["!!"], 50)[0].ids == CharTokenizer().encode("!!")  # ids 36: inside
    with pytest.raises(APIError) as e:
        _tokenize(eng, ["hello"], 50)  # 'h' is id 107
    assert e.value.status == 400 and "0-49" in e.value.message
