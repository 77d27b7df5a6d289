"""Shared fixtures: tiny random-weight models built in memory, and the real embedded SmolLM2 (slow)."""

from __future__ import annotations

import pytest
import torch


def tiny_llama(**overrides):
    """A 6-layer random Llama (transformers' own implementation, eager attention, float32)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg.update(overrides)
    return AutoModelForCausalLM.from_config(LlamaConfig(**cfg), attn_implementation="eager").eval()


class CharTokenizer:
    """A tiny tokenizer for tiny models: one token per byte (ids 3..), 0 pad, 1 bos, 2 eos."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [3 + (b % 125) for b in text.encode()]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(97 + (i - 3) % 26) for i in ids if i >= 3 or not skip_special_tokens)


@pytest.fixture(scope="session")
def tiny_engine():
    from server.generate import Engine

    return Engine(tiny_llama(), CharTokenizer(), device="cpu")


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded model (converted once into the user cache)."""
    from server.loader import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_engine(smollm2):
    from server.generate import Engine

    return Engine(smollm2.hf_model, smollm2.tokenizer, device="cpu", name="smollm2-135m")
