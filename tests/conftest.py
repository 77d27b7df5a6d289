"""Shared fixtures: tiny random-weight models built in memory, the real embedded SmolLM2 (slow), clients of a real
server, a peak-RSS probe, fake model aliases for the conversion cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels (server/model/triton_attention.py) run in Triton's interpreter on the CPU. Triton reads the
    # switch when triton.language is imported, which torch._dynamo does: it must be set before anything imports that.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def tiny_llama(**overrides):
    """A 6-layer random Llama (transformers' own implementation, eager attention, float32)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg.update(overrides)
    return AutoModelForCausalLM.from_config(LlamaConfig(**cfg), attn_implementation="eager").eval()


def tiny_llama_with_identity_layer(layer: int, **overrides):
    """`tiny_llama` whose layer `layer` adds nothing (attention output and MLP down projections zeroed): a layer that is
    truly removable, for the probe and the policy search."""
    model = tiny_llama(**overrides)
    block = model.model.layers[layer]
    with torch.no_grad():
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()
    return model


class CharTokenizer:
    """A tiny tokenizer for tiny models: one token per byte (ids 3..), 0 pad, 1 bos, 2 eos."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [3 + (b % 125) for b in text.encode()]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(97 + (i - 3) % 26) for i in ids if i >= 3 or not skip_special_tokens)


def bos_word_tokenizer():
    """A Hugging Face word-level tokenizer that, like Gemma's, adds <bos> by default, with a chat template that writes
    <bos> itself: ids 0 pad, 1 bos, 2 eos, 3.. the words below (fits tiny_llama's vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    names = "hello world the cat sat user assistant hi there :".split()
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{w: i + 3 for i, w in enumerate(names)}}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=words, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}assistant :{% endif %}")
    return tok


@pytest.fixture(scope="session")
def tiny_engine():
    from server.engine.generate import Engine

    return Engine.from_hf(tiny_llama(), CharTokenizer(), device="cpu")


@pytest.fixture(scope="session")
def overlapped_engine(tiny_engine):
    """`tiny_engine`'s model and tokenizer, decoding overlapped (each step queued before the last is read: the
    engine's default on CUDA, run here on the CPU)."""
    from server.engine.generate import Engine

    e = tiny_engine
    return Engine(e.model, e.tokenizer, eos_ids=e.eos_ids, config=e.config, overlap=True)


def assert_same_weights(got: Any, want: Any) -> None:
    """Two ModelWeights hold equal tensors of equal dtypes, and the same rotary scaling."""
    for f in fields(got.layers):
        a, b = getattr(got.layers, f.name), getattr(want.layers, f.name)
        assert (a is None) == (b is None), f.name
        if a is not None:
            assert a.dtype == b.dtype and torch.equal(a, b), f.name
    for name in ("embed", "lm_head", "final_norm", "inv_freq", "local_inv_freq"):
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), name
    assert got.rope_scale == want.rope_scale and got.local_rope_scale == want.local_rope_scale


_PEAK_RSS = """
import json

def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

_base = _status("VmRSS")
result = None
"""


def peak_rss_growth(*, setup: str, work: str, timeout: float = 300) -> tuple[int, Any]:
    """Run `setup`, then `work`, in a fresh interpreter at the repository root (Linux: reads /proc/self/status).
    Returns how far peak RSS rose above the RSS after `setup` (bytes), and the JSON value `work` left in `result`.
    Peak is VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child of a big pytest would report
    the parent's size."""
    end = 'print(json.dumps({"grew": _status("VmHWM") - _base, "result": result}))'
    code = "\n".join([textwrap.dedent(setup), _PEAK_RSS, textwrap.dedent(work), end])
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    return got["grew"], got["result"]


def load_hf_model(source):
    """transformers' own float32 model of a checkpoint directory: the reference for parity tests."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32).eval().requires_grad_(False)


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded model (converted once into the user cache), float32 on the CPU."""
    from server.model.loader import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_hf(smollm2):
    """transformers' model of the same converted checkpoint (a second copy: only parity tests ask for it)."""
    return load_hf_model(smollm2.source)


@pytest.fixture(scope="session")
def smollm2_engine(smollm2):
    from server.engine.generate import Engine

    return Engine.from_loaded(smollm2, name="smollm2-135m")


@pytest.fixture(scope="session")
def gemma3():
    """The second embedded model, Gemma 3 270M (assembled from its part packages and converted once), float32."""
    from server.model.loader import load_model

    return load_model("gemma3-270m")


@pytest.fixture(scope="session")
def gemma3_hf(gemma3):
    """transformers' Gemma3ForCausalLM of the same converted checkpoint (parity tests only)."""
    return load_hf_model(gemma3.source)


@pytest.fixture(scope="session")
def gemma3_engine(gemma3):
    from server.engine.generate import Engine

    return Engine.from_loaded(gemma3, name="gemma3-270m")


@pytest.fixture
def parts_alias(monkeypatch):
    """An alias `fake-1m` whose GGUF a (fake) package assembles from parts; the conversion is stubbed (it has its own
    tests). Returns the calls made: assembled paths and converted GGUFs."""
    import types

    import server.model.loader as loader

    calls: dict[str, list] = {"assembled": [], "converted": []}

    def assemble(path):
        path.write_bytes(b"GGUF")
        calls["assembled"].append(path)
        return path

    def convert(gguf, out):
        assert gguf.read_bytes() == b"GGUF"
        calls["converted"].append(gguf)
        (out / "model.safetensors").write_bytes(b"")

    module = types.ModuleType("fake_gguf_parts")
    module.EXPECTED_SHA256, module.assemble = "ab" * 32, assemble
    monkeypatch.setitem(sys.modules, "fake_gguf_parts", module)
    monkeypatch.setitem(loader.ALIASES, "fake-1m", loader.Alias("fake-gguf", "1.0.0", assembler="fake_gguf_parts",
                                                                 parts=("fake-gguf-part1", "fake-gguf-part2")))
    monkeypatch.setattr(loader, "_convert_gguf", convert)
    return calls


@pytest.fixture
def file_alias(monkeypatch):
    """An alias `fake-file` whose GGUF is one file of the distribution `fake-gguf-file`, and install(where, *,
    hashed=True), which installs that distribution into the folder `where` and puts it first on sys.path, as another
    virtual environment would. The conversion is stubbed. Returns (install, the GGUFs converted)."""
    import base64
    import hashlib

    import server.model.loader as loader

    converted: list[Path] = []

    def convert(gguf, out):
        converted.append(gguf)
        (out / "model.safetensors").write_bytes(gguf.read_bytes())

    def install(where: Path, *, hashed: bool = True) -> Path:
        content = b"GGUF fake-file"
        gguf = where / "fake_gguf_file" / "model.gguf"
        gguf.parent.mkdir(parents=True)
        gguf.write_bytes(content)
        info = where / "fake_gguf_file-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-gguf-file\nVersion: 1.0\n")
        digest = base64.urlsafe_b64encode(hashlib.sha256(content).digest()).rstrip(b"=").decode()
        (info / "RECORD").write_text(f"fake_gguf_file/model.gguf,{'sha256=' + digest if hashed else ''},"
                                     f"{len(content) if hashed else ''}\nfake_gguf_file-1.0.dist-info/RECORD,,\n")
        monkeypatch.syspath_prepend(str(where))
        return gguf

    monkeypatch.setitem(loader.ALIASES, "fake-file", loader.Alias("fake-gguf-file", "1.0",
                                                                  file="fake_gguf_file/model.gguf"))
    monkeypatch.setattr(loader, "_convert_gguf", convert)
    return install, converted


@pytest.fixture
def poisoned_seed(monkeypatch):
    """A seed whose rows' sampler raises (as torch.multinomial does on a broken distribution); other rows sample
    normally. Returns the seed."""
    import server.engine.sampling as sampling

    real = sampling._uniform

    def poisoned(g, device):
        if g.initial_seed() == 666:
            raise RuntimeError("probability tensor contains inf, nan or element < 0")
        return real(g, device)

    monkeypatch.setattr(sampling, "_uniform", poisoned)
    return 666


# -- clients of a real server: a module that starts one (its own `server` fixture, a tests.serving.Process, e.g.
# `painters_server`) gets the official openai client and plain HTTP on it.


@pytest.fixture(scope="module")
def client(server: Any) -> openai.OpenAI:
    import openai  # here, not above: the GPU machine runs the CUDA tests without the openai package (nor pydantic)

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="any", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def http(server: Any) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=300) as c:
        yield c
