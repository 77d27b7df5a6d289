"""Model loading: aliases, directories, GGUF conversion cache, and clear errors for what cannot load."""

from __future__ import annotations

import pytest

from server.loader import ModelLoadError, load_model
from server.model import UnsupportedModelError
from tests.conftest import tiny_llama


def test_unsupported_architecture_lists_supported(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="llama, mistral, qwen2, qwen3"):
        load_model(str(tmp_path))


def test_model_without_tokenizer_fails_clearly(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="tokenizer"):
        load_model(str(tmp_path))


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(tmp_path))


def test_missing_gguf_file(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope.gguf"))


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="not an alias"):
        load_model("someone/not-a-model-here")


@pytest.mark.slow
def test_alias_loads_from_cache_with_tokenizer(smollm2):
    assert smollm2.hf_model.config.num_hidden_layers == 30
    assert (smollm2.source / "model.safetensors").exists()
    assert smollm2.tokenizer.decode(smollm2.tokenizer.encode("Hello world")) .strip() == "Hello world"
    assert all(not p.requires_grad for p in smollm2.hf_model.parameters())


@pytest.mark.slow
def test_local_directory_of_the_converted_model(smollm2):
    again = load_model(str(smollm2.source))
    assert again.hf_model.config.hidden_size == 576
