"""Incremental detokenization: the pieces concatenate to the full decode, split characters wait, each step is cheap."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.engine.detokenizer import REPLACEMENT, IncrementalDetokenizer
from tests.conftest import CharTokenizer

# Multi-byte characters of 2, 3 and 4 UTF-8 bytes. The tokenizers below learn some of them whole and split the rest.
MULTIBYTE = "éñüçà日本語中文😀🎉🎨👍🏽"
CORPUS = ["the quick brown fox jumps over the lazy dog", "café naïve résumé señor", "日本語のテキスト", "emoji 😀 and 🎉"]


@pytest.fixture(scope="module")
def byte_level():
    """A GPT-2-style byte-level BPE tokenizer trained in memory: any id sequence is a byte string."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def sentencepiece_style():
    """Llama-2's layout built by hand: "▁" for spaces, the first space stripped on decode, bytes as <0xNN> tokens for
    characters outside the vocabulary."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for piece in ["▁", "a", "b", "c", "é", "本", "▁a", "ab", "▁ab"]:
        vocab[piece] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("▁", "a"), ("a", "b"), ("▁a", "b")], byte_fallback=True,
                               unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """The embedded SmolLM2's tokenizer from its converted cache directory, without loading the weights."""
    from transformers import AutoTokenizer

    from server.model.loader import converted_dir, resolve_gguf

    gguf = resolve_gguf("smollm2-135m")
    assert gguf is not None
    return AutoTokenizer.from_pretrained(str(converted_dir(gguf, alias="smollm2-135m")))


def pieces(tokenizer: Any, ids: list[int], *, skip_special_tokens: bool = True,
           spaces_between_special_tokens: bool = True) -> tuple[list[str], str]:
    """What `add` returned for each id, and what `flush` returned at the end."""
    d = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens,
                               spaces_between_special_tokens=spaces_between_special_tokens)
    parts = [d.add(i) for i in ids]
    tail = d.flush()
    assert d.text == "".join(parts) + tail
    return parts, tail


def assert_incremental(tokenizer: Any, ids: list[int], *, skip_special_tokens: bool = True,
                       spaces_between_special_tokens: bool = True) -> list[str]:
    parts, tail = pieces(tokenizer, ids, skip_special_tokens=skip_special_tokens,
                         spaces_between_special_tokens=spaces_between_special_tokens)
    spaces = {} if spaces_between_special_tokens else {"spaces_between_special_tokens": False}
    assert "".join(parts) + tail == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, **spaces)
    assert not any(p.endswith(REPLACEMENT) for p in parts), parts  # incomplete tails are held back
    return parts


@settings(max_examples=300, deadline=None)
@given(data=st.data(), skip=st.booleans())
def test_byte_level_any_ids_concatenate_to_the_full_decode(byte_level, data, skip):
    ids = data.draw(st.lists(st.integers(0, len(byte_level) - 1), max_size=40))
    assert_incremental(byte_level, ids, skip_special_tokens=skip)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), text=st.text(alphabet=MULTIBYTE + "abc \n", max_size=30))
def test_text_streams_without_replacement_characters(byte_level, sentencepiece_style, data, text):
    for tokenizer in (byte_level, sentencepiece_style):
        ids = tokenizer.encode(text, add_special_tokens=False)
        parts = assert_incremental(tokenizer, ids)
        assert REPLACEMENT not in "".join(parts)


def test_a_character_split_across_tokens_waits_for_its_last_byte(byte_level, sentencepiece_style):
    for tokenizer in (byte_level, sentencepiece_style):
        ids = tokenizer.encode("a🎨b", add_special_tokens=False)
        assert len(ids) >= 4, tokenizer.convert_ids_to_tokens(ids)  # 🎨 is split in both
        assert pieces(tokenizer, ids) == (["a"] + [""] * (len(ids) - 3) + ["🎨", "b"], "")


def test_flush_gives_an_unfinished_character_as_the_full_decode_does(byte_level):
    ids = byte_level.encode("x🎨", add_special_tokens=False)[:-1]  # the emoji's last byte never comes
    parts, tail = pieces(byte_level, ids)
    assert parts == ["x", "", ""] and tail == byte_level.decode(ids)[1:] and REPLACEMENT in tail


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_sentencepiece_style_ids_concatenate_to_the_full_decode(sentencepiece_style, data):
    # Any id but a lone byte token: tokenizers' ByteFallback decoder turns a whole run of byte tokens into U+FFFDs when
    # the run is invalid UTF-8, rewriting text already streamed, which no incremental decoder can match.
    tokens = sentencepiece_style.convert_ids_to_tokens(list(range(len(sentencepiece_style))))
    words = [i for i, t in enumerate(tokens) if not t.startswith("<0x")]
    assert_incremental(sentencepiece_style, data.draw(st.lists(st.sampled_from(words), max_size=30)))


@given(ids=st.lists(st.integers(0, 300), max_size=40), skip=st.booleans())
def test_char_tokenizer(ids, skip):
    assert_incremental(CharTokenizer(), ids, skip_special_tokens=skip)


class CountingTokenizer:
    """Records how many ids each decode call sees."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.sizes = inner, []

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.sizes.append(len(ids))
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)


def test_each_step_decodes_a_window_not_the_whole_output(byte_level):
    ids = byte_level.encode("the lazy dog jumps over the quick brown fox. " * 40, add_special_tokens=False)
    counting = CountingTokenizer(byte_level)
    d = IncrementalDetokenizer(counting)
    text = "".join(d.add(i) for i in ids)
    assert len(ids) > 300 and text == byte_level.decode(ids)
    assert max(counting.sizes) <= 2  # the previous token for context, and the new one


class SpacedTokenizer(CharTokenizer):
    """Like a slow (Python) tokenizer: its special tokens read "<s>", with a space either side unless
    spaces_between_special_tokens=False."""

    def decode(self, ids, skip_special_tokens=True, spaces_between_special_tokens=True) -> str:
        special = " <s> " if spaces_between_special_tokens else "<s>"
        return "".join(special if i < 3 else CharTokenizer.decode(self, [i]) for i in ids
                       if i >= 3 or not skip_special_tokens)


@given(ids=st.lists(st.integers(0, 40), max_size=30), spaces=st.booleans())
def test_spaces_between_special_tokens_reach_a_slow_tokenizer(ids, spaces):
    assert_incremental(SpacedTokenizer(), ids, skip_special_tokens=False, spaces_between_special_tokens=spaces)
    assert "".join(pieces(SpacedTokenizer(), [5, 1, 1, 6], skip_special_tokens=False,
                          spaces_between_special_tokens=spaces)[0]) == ("c <s>  <s> d" if spaces else "c<s><s>d")


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@given(data=st.data(), skip=st.booleans())
def test_smollm2_tokenizer(smollm2_tokenizer, data, skip):
    """Any ids, its special tokens (ids 0-16: <|endoftext|>, <|im_start|>, <|im_end|>, ...) drawn often, shown or
    skipped; and any text."""
    ids = data.draw(st.lists(st.one_of(st.integers(0, 16), st.integers(0, len(smollm2_tokenizer) - 1)), max_size=40))
    assert_incremental(smollm2_tokenizer, ids, skip_special_tokens=skip)
    text = data.draw(st.text(alphabet=MULTIBYTE + "abc \n.,'", max_size=40))
    parts = assert_incremental(smollm2_tokenizer, smollm2_tokenizer.encode(text, add_special_tokens=False))
    assert "".join(parts) == text



@pytest.mark.parametrize("name", ["byte_level", "sentencepiece_style", "smollm2_tokenizer"])
def test_token_bytes_join_into_the_text_and_offsets_count_characters(request, name):
    """A token holding part of a character decoded alone to U+FFFD: logprobs' `bytes` were that sign's UTF-8, so
    joining them gave garbage; alternatives all keyed "\ufffd" collided; text_offset counted each piece as a
    character. Its bytes are now the real ones, its `token` OpenAI's "bytes:\\x.." form, and offsets count over
    the bytes, across a stream's chunks too."""
    from server.api.openai import _Offsets
    from server.engine.served import ServedModel

    tok = request.getfixturevalue(name)
    served = ServedModel(name="t", num_layers=1, vocab_size=len(tok), max_model_len=64, eos_ids=frozenset(),
                         special_ids=frozenset(), tokenizer=tok)
    partial = 0
    for text in [*CORPUS, MULTIBYTE, "a " + MULTIBYTE]:
        ids = tok.encode(text, add_special_tokens=False)
        joined = b"".join(served.token_bytes(i) for i in ids).decode()
        decoded = tok.decode(ids)
        assert joined.lstrip(" ") == decoded.lstrip(" ")  # SentencePiece's decoder drops the first space
        strings = [served.token_string(i) for i in ids]
        assert "\ufffd" not in "".join(strings)
        partial += sum(s.startswith("bytes:\\x") for s in strings)
        whole = _Offsets().of(served, ids)
        split = _Offsets()
        halves = split.of(served, ids[: len(ids) // 2]) + split.of(served, ids[len(ids) // 2:])  # two chunks
        assert whole == halves == sorted(whole) and split.pos == len(joined)
    assert partial > 0  # the texts did split characters over tokens
