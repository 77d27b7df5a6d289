"""Checkpoint streaming: load_checkpoint equals copying from transformers' model, in one copy of the weights."""

from __future__ import annotations

import copy
import json
import math
import struct
import sys
from pathlib import Path

import pytest
import torch

from server.model.weights import CheckpointError, ModelWeights, load_checkpoint, weights_from_hf_model
from tests.conftest import assert_same_weights, peak_rss_growth
from tests.reference import tiny_model, tiny_multimodal_gemma

VARIANTS = ["llama", "llama_rope3", "llama_bias", "llama_tied", "qwen2", "qwen3", "mistral", "gemma3", "gemma3_rope"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_checkpoint_equals_the_copied_model(tmp_path, variant):
    hf = tiny_model(variant)
    hf.save_pretrained(tmp_path)
    got = load_checkpoint(tmp_path, hf.config, dtype=torch.float32, device="cpu")
    assert_same_weights(got, weights_from_hf_model(hf, dtype=torch.float32, device="cpu"))


def test_sharded_checkpoint(tmp_path):
    hf = tiny_model("qwen2")
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and len(list(tmp_path.glob("*.safetensors"))) > 3
    got = load_checkpoint(tmp_path, hf.config, dtype=torch.float32, device="cpu")
    assert_same_weights(got, weights_from_hf_model(hf, dtype=torch.float32, device="cpu"))


def test_optional_stacks_follow_the_architecture(tmp_path):
    def load(variant: str) -> ModelWeights:
        hf = tiny_model(variant)
        hf.save_pretrained(tmp_path / variant)
        return load_checkpoint(tmp_path / variant, hf.config, dtype=torch.float32, device="cpu")

    llama, qwen2, qwen3 = load("llama").layers, load("qwen2").layers, load("qwen3").layers
    assert llama.bqkv is None and llama.q_norm is None and llama.b_gate_up is None
    assert qwen2.bqkv is not None and qwen2.bqkv.shape == (8, 64 + 2 * 32) and qwen2.bo is None
    assert qwen3.q_norm is not None and qwen3.q_norm.shape == (8, 24) and qwen3.wqkv.shape == (8, 64, 4 * 24 + 2 * 48)


def test_tied_head_is_a_view_counted_once(tmp_path):
    hf = tiny_model("llama_tied")
    hf.save_pretrained(tmp_path)
    got = load_checkpoint(tmp_path, hf.config, dtype=torch.float32, device="cpu")
    assert got.lm_head.shape == (64, 96) and got.lm_head.data_ptr() == got.embed.data_ptr()
    copied = weights_from_hf_model(hf, dtype=torch.float32, device="cpu")
    assert copied.lm_head.data_ptr() == copied.embed.data_ptr()
    untied = got.layers.nbytes() + sum(t.numel() * 4 for t in (got.embed, got.lm_head, got.final_norm, got.inv_freq))
    assert got.nbytes() == untied - got.embed.numel() * 4


def test_checkpoint_without_head_ties_it(tmp_path):
    hf = tiny_model("llama_tied")
    hf.save_pretrained(tmp_path)
    config = type(hf.config).from_dict({**hf.config.to_dict(), "tie_word_embeddings": False})
    got = load_checkpoint(tmp_path, config, dtype=torch.float32, device="cpu")
    assert got.lm_head.data_ptr() == got.embed.data_ptr()


def test_llama3_rope_scaling_matches_transformers(tmp_path):
    hf = tiny_model("llama_rope3")
    hf.save_pretrained(tmp_path)
    got = load_checkpoint(tmp_path, hf.config, dtype=torch.float32, device="cpu")
    torch.testing.assert_close(got.inv_freq, hf.model.rotary_emb.inv_freq, rtol=0, atol=0)
    plain = load_checkpoint(tmp_path, tiny_model("llama").config, dtype=torch.float32, device="cpu")
    assert not torch.equal(got.inv_freq, plain.inv_freq)  # the scaling really changed the low frequencies


def test_longrope_past_its_original_length_is_refused(tmp_path):
    """transformers switches longrope's factors once a sequence passes original_max_position_embeddings; a fixed
    table ran the short ones at every length, and greedy decoding left transformers' at the first token past it."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    def config(original: int) -> LlamaConfig:
        return LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                            "original_max_position_embeddings": original, "short_factor": [1.0] * 8,
                                            "long_factor": [1.0 + i for i in range(8)]})

    AutoModelForCausalLM.from_config(config(16)).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="longrope.*16 < max_position_embeddings 256"):
        load_checkpoint(tmp_path, config(16), dtype=torch.float32, device="cpu")
    load_checkpoint(tmp_path, config(256), dtype=torch.float32, device="cpu")  # never past it: one table is right


def test_hub_downloads_fetch_the_chat_template_and_skip_consolidated_weights(tmp_path):
    """transformers saves the chat template as chat_template.jinja: a hub download without it served no chat.
    Mistral repos ship consolidated.safetensors beside the shards the index names: fetched, never read (~14.5 GB)."""
    from huggingface_hub.utils import filter_repo_objects

    from server.model.loader import HUB_FILES, HUB_SKIP

    repo = ["chat_template.jinja", "config.json", "tokenizer.json", "tokenizer_config.json",
            "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
            "consolidated.safetensors", "pytorch_model.bin", "tokenizer.model"]
    fetched = set(filter_repo_objects(repo, allow_patterns=HUB_FILES, ignore_patterns=HUB_SKIP))
    assert fetched == set(repo) - {"consolidated.safetensors", "pytorch_model.bin"}


def test_gemma_norms_carry_their_one_and_layer_kinds_their_rope(tmp_path):
    """Gemma's (1 + w) norms are stored as 1 + w (float32, as transformers computes it); its post-norms are stacks of
    their own; global layers get the scaled RoPE frequencies, windowed layers their own base."""
    hf = tiny_model("gemma3_rope")
    hf.save_pretrained(tmp_path)
    got = load_checkpoint(tmp_path, hf.config, dtype=torch.float32, device="cpu")
    layer = hf.model.layers[3]
    for ours, theirs in [(got.layers.attn_norm[3], layer.input_layernorm),
                         (got.layers.mlp_norm[3], layer.pre_feedforward_layernorm),
                         (got.layers.post_attn_norm[3], layer.post_attention_layernorm),
                         (got.layers.post_mlp_norm[3], layer.post_feedforward_layernorm),
                         (got.layers.q_norm[3], layer.self_attn.q_norm), (got.final_norm, hf.model.norm)]:
        assert torch.equal(ours, 1.0 + theirs.weight)
    rotary = hf.model.rotary_emb
    assert torch.equal(got.inv_freq, rotary.full_attention_inv_freq)
    assert torch.equal(got.local_inv_freq, rotary.sliding_attention_inv_freq)
    assert not torch.equal(got.inv_freq, got.local_inv_freq)


def test_multimodal_gemma3_checkpoint_loads_its_language_model(tmp_path):
    """A `gemma3` (image-text) checkpoint: the decoder under its language_model prefix, the text_config's facts."""
    mm = tiny_multimodal_gemma()
    mm.save_pretrained(tmp_path)
    got = load_checkpoint(tmp_path, mm.config, dtype=torch.float32, device="cpu")
    assert_same_weights(got, weights_from_hf_model(tiny_model("gemma3"), dtype=torch.float32, device="cpu"))
    assert_same_weights(got, weights_from_hf_model(mm, dtype=torch.float32, device="cpu"))


def test_dtype_converts_per_tensor(tmp_path):
    hf = tiny_model("qwen3")
    copy.deepcopy(hf).to(torch.bfloat16).save_pretrained(tmp_path)  # a bf16 checkpoint (tiny_model is shared)
    as_bf16 = load_checkpoint(tmp_path, hf.config, dtype=torch.bfloat16, device="cpu")
    assert_same_weights(as_bf16, weights_from_hf_model(hf, dtype=torch.bfloat16, device="cpu"))
    as_f32 = load_checkpoint(tmp_path, hf.config, dtype=torch.float32, device="cpu")
    assert as_f32.layers.wqkv.dtype == torch.float32 and torch.equal(as_f32.layers.wqkv.bfloat16(), as_bf16.layers.wqkv)


def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = tiny_model("llama")
    hf.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.3.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor.*model\.layers\.3\.mlp\.up_proj\.weight"):
        load_checkpoint(tmp_path, hf.config, dtype=torch.float32, device="cpu")


def test_config_that_disagrees_with_the_checkpoint(tmp_path):
    hf = tiny_model("llama")
    hf.save_pretrained(tmp_path)
    config = type(hf.config).from_dict({**hf.config.to_dict(), "intermediate_size": 128})
    with pytest.raises(CheckpointError, match=r"_proj\.weight in model\.safetensors has shape .*96.*config\.json implies .*128"):
        load_checkpoint(tmp_path, config, dtype=torch.float32, device="cpu")


def test_directory_without_safetensors(tmp_path):
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*safetensors"):
        load_checkpoint(tmp_path, tiny_model("llama").config, dtype=torch.float32, device="cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_checkpoint_stays_bf16_on_cuda(tmp_path):
    hf = tiny_model("qwen2")
    copy.deepcopy(hf).to(torch.bfloat16).save_pretrained(tmp_path)
    got = load_checkpoint(tmp_path, hf.config, dtype=torch.bfloat16, device="cuda")
    assert got.embed.device.type == "cuda" and got.layers.wqkv.dtype == torch.bfloat16
    want = weights_from_hf_model(hf, dtype=torch.bfloat16, device="cpu")
    assert torch.equal(got.layers.wqkv.cpu(), want.layers.wqkv) and torch.equal(got.lm_head.cpu(), want.lm_head)


# -- peak memory ----------------------------------------------------------------------------------------------

BIG = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
           num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)


def write_random_checkpoint(directory: Path, **config: int | bool) -> int:
    """A float32 Llama model.safetensors with random weights, written one tensor at a time (no model, no dict of all
    tensors: safetensors' layout is an 8-byte header size, a JSON header, then the raw bytes). Returns its size."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(**config)
    cfg.save_pretrained(directory)
    d, ff, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    layer = {"self_attn.q_proj.weight": (q, d), "self_attn.k_proj.weight": (kv, d), "self_attn.v_proj.weight": (kv, d),
             "self_attn.o_proj.weight": (d, q), "mlp.gate_proj.weight": (ff, d), "mlp.up_proj.weight": (ff, d),
             "mlp.down_proj.weight": (d, ff), "input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,)}
    shapes = {"model.embed_tokens.weight": (V, d), "model.norm.weight": (d,), "lm_head.weight": (V, d)}
    for i in range(cfg.num_hidden_layers):
        shapes.update({f"model.layers.{i}.{k}": s for k, s in layer.items()})
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = math.prod(shape) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    gen = torch.Generator().manual_seed(0)
    with open(directory / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for shape in shapes.values():
            f.write(torch.randn(shape, generator=gen).numpy().data)
    return offset


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")
def test_peak_memory_is_the_weights_plus_one_tensor(tmp_path):
    size = write_random_checkpoint(tmp_path, **BIG)
    assert size > 0.9e9
    grew, nbytes = peak_rss_growth(
        setup=f"""
            import torch
            from transformers import AutoConfig
            from server.model.weights import load_checkpoint
            import safetensors, transformers.modeling_rope_utils
            config = AutoConfig.from_pretrained({str(tmp_path)!r})
        """,
        work=f"result = load_checkpoint({str(tmp_path)!r}, config, dtype=torch.float32, device='cpu').nbytes()",
    )
    assert nbytes >= size  # it really loaded all of it (plus inv_freq)
    # the final weights + the tensor being copied (at most the 131 MB embedding, 13%); two copies would be 2.0
    assert grew <= 1.3 * size, f"loading grew peak RSS by {grew / size:.2f}x the checkpoint"
