"""Incremental detokenization: the text of a growing token sequence, decoding only the last few tokens per step."""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"  # what a decoder gives for bytes that do not (yet) form a character


class IncrementalDetokenizer:
    """Text of the tokens passed to `add`, one token at a time, at a cost independent of the sequence's length.

    Each step decodes a short window twice: ids[prefix:read] (already returned; context for the new token's spacing)
    and ids[prefix:]. The difference is the new text, returned unless it ends in U+FFFD, which usually means a
    multi-byte character split across tokens: then it waits for more tokens. The window technique is vLLM's
    `detokenize_incrementally` and TGI's `decode_token`. The concatenation of `add`'s returns and then `flush`'s equals
    `tokenizer.decode(ids, skip_special_tokens=...)` for decoders where decode(a + b) starts with decode(a) at
    character boundaries (byte-level BPE, SentencePiece); a `clean_up_tokenization_spaces=True` tokenizer can differ
    where the clean-up joins across a step.

    spaces_between_special_tokens=False is passed to a slow (Python) tokenizer's `decode`, the one kind that writes
    spaces around added tokens; a fast tokenizer's decoder writes none either way (transformers ignores the option
    there), so it changes nothing on those.
    """

    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool = True,
                 spaces_between_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # only when asked: the option's default is the tokenizer's own, and a tokenizer without it takes no such kwarg
        self._options = {} if spaces_between_special_tokens else {"spaces_between_special_tokens": False}
        self._backend = _backend(tokenizer)
        self.ids: list[int] = []
        self.text = ""  # all text returned so far
        self._prefix = 0  # ids[_prefix:_read] decode the context of the next step
        self._read = 0  # ids[:_read] are in `text`

    def add(self, token_id: int) -> str:
        """Append one token; the text it completes (often "" while a character is incomplete)."""
        self.ids.append(token_id)
        return self._advance(hold_incomplete=True)

    def flush(self) -> str:
        """The text held back at the end (an incomplete character as U+FFFD); afterwards `text` is the decode of all
        ids. Call it when the sequence ends."""
        return self._advance(hold_incomplete=False)

    def _advance(self, *, hold_incomplete: bool) -> str:
        if self._read == len(self.ids):
            return ""
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) <= len(before) or (hold_incomplete and after.endswith(REPLACEMENT)):
            return ""
        new = after[len(before) :]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += new
        return new

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens, **self._options)


def _backend(tokenizer: Any) -> Any:
    """A fast tokenizer's Rust `tokenizers.Tokenizer`, when decoding through it gives what `tokenizer.decode` gives
    (no clean-up pass): a few microseconds per call instead of transformers' per-call argument handling, which was
    most of an engine step's host time at 16 rows."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", True) or not hasattr(backend, "decode"):
        return None
    return backend
