"""What the HTTP layer sees of the served model: plain facts, text <-> token ids, structured outputs compiled. No
tensors, no engine, no torch.

The routers hold a `ServedModel` and the `EngineLoop` (submit / abort) and nothing else of the engine: they never
reach the `Engine`, its weights or its cache. Policies compile here with the pure compiler of `server.policy`, once
per request at the edge; the engine runs the `Schedule` it is given.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

from server.engine.grammar import Grammar, Grammars, GrammarUnavailable
from server.engine.sampling_params import SamplingParams, StructuredOutput
from server.policy.compiler import Schedule, compile_schedule
from server.policy.policy import Policy, as_policy


class TemplateKwargsError(ValueError):
    """chat_template_kwargs that would set what the request or the tokenizer sets."""


# A chat template's variables that the render call or the tokenizer set: chat_template_kwargs may not override them.
TEMPLATE_OWN = frozenset({"messages", "conversation", "add_generation_prompt", "continue_final_message", "tools",
                          "documents", "chat_template", "bos_token", "eos_token", "unk_token", "pad_token",
                          "raise_exception", "strftime_now"})


@functools.cache
def template_variables(template: Any) -> frozenset[str]:
    """The variables a Jinja chat template reads (none for a template that is not one string, or does not parse)."""
    if not isinstance(template, str):
        return frozenset()
    import jinja2
    from jinja2 import meta

    try:
        return frozenset(meta.find_undeclared_variables(jinja2.Environment().parse(template)))
    except jinja2.TemplateError:
        return frozenset()


@dataclass(frozen=True)
class TokenizerFacts:
    """The tokenizer's special tokens and template, for /tokenizer_info."""

    tokenizer_class: str
    eos_token: str | None
    eos_token_id: int | None
    bos_token: str | None
    bos_token_id: int | None
    pad_token: str | None
    pad_token_id: int | None
    chat_template: str | None


@dataclass(frozen=True)
class ServedModel:
    name: str
    num_layers: int
    vocab_size: int
    max_model_len: int  # the model's own position limit (the server may set a lower one)
    eos_ids: frozenset[int]
    special_ids: frozenset[int]  # every special token (EOS among them): TGI's `special` flag
    tokenizer: Any  # read only through the methods below
    grammars: Grammars | None = None  # the engine's compiler of structured outputs (None: none served)
    hidden_size: int | None = None  # the size of its hidden states, and so of its embeddings (None: not known)

    @classmethod
    def of(cls, engine: Any) -> ServedModel:
        """The facts of a loaded `server.engine.generate.Engine` (its tensors stay behind)."""
        ids = frozenset(getattr(engine.tokenizer, "all_special_ids", ()) or ())
        return cls(name=engine.name, num_layers=engine.num_layers, vocab_size=engine.vocab_size,
                   max_model_len=engine.max_model_len, eos_ids=frozenset(engine.eos_ids),
                   special_ids=ids | frozenset(engine.eos_ids), tokenizer=engine.tokenizer, grammars=engine.grammars,
                   hidden_size=engine.hidden_size)

    def compile_grammar(self, spec: StructuredOutput) -> Grammar:
        """A structured output compiled for this model's tokenizer (cached), whose matchers its requests carry.
        Raises GrammarError naming what failed (or that it took too long), GrammarBusy, GrammarUnavailable where
        none can be served. Waits up to the grammars' compile_timeout: call it off the event loop."""
        if self.grammars is None:
            raise GrammarUnavailable("this server serves no structured outputs")
        return self.grammars.compile_within(spec)

    def with_bad_words_ids(self, params: list[SamplingParams]) -> list[SamplingParams]:
        """`params` (a request's choices) with their bad_words encoded (vLLM's `update_from_tokenizer`), each text
        once; a SamplingError naming the bound they pass."""
        encoded = functools.cache(functools.partial(encode_word, self.tokenizer))
        return [p.with_bad_words_ids(encoded) for p in params]

    def compile(self, policy: Policy | str | dict | None) -> Schedule:
        """Parse and compile a policy for this model's depth (raises `PolicyError` naming what is allowed)."""
        return compile_schedule(as_policy(policy), self.num_layers)

    def encode(self, prompt: str | list[int], *, add_special_tokens: bool = True) -> list[int]:
        return encode(self.tokenizer, prompt, add_special_tokens=add_special_tokens)

    def tokenize(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """The tokenizer's own ids of a text (/tokenize: an empty text gives none; `encode` gives a prompt)."""
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], *, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """One token's own text, special tokens included (U+FFFD where it holds part of a character). A SentencePiece
        word piece keeps its space: Llama-2-style decoders strip a text's first space, which alone is the token's."""
        text = self.tokenizer.decode([token_id], skip_special_tokens=False)
        if not text.startswith(" ") and isinstance(piece := self._piece(token_id), str) and piece.startswith("\u2581"):
            return " " + text
        return text

    def pieces(self, ids: list[int]) -> list[str]:
        """Each token as the vocabulary spells it ('Ġhello', '▁the'; vLLM's /tokenize token_strs), or its text where
        the tokenizer has no vocabulary strings."""
        return [p if isinstance(p := self._piece(t), str) else self.token_text(t) for t in ids]

    def _piece(self, token_id: int) -> str | None:
        """The token as the vocabulary spells it (None for a tokenizer without one)."""
        convert = getattr(self.tokenizer, "convert_ids_to_tokens", None)
        return None if convert is None else convert(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes a token stands for: its text's, or, for a token holding part of a character (an emoji's
        first bytes in byte-level BPE, SentencePiece's <0xF0>), those bytes themselves, which decode to U+FFFD alone
        but join with their neighbours' into the text (OpenAI's `bytes`)."""
        text = self.token_text(token_id)
        if REPLACEMENT not in text:
            return text.encode()
        piece = self._piece(token_id)
        if isinstance(piece, str):
            if (byte := re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)) is not None:  # SentencePiece's byte fallback
                return bytes([int(byte[1], 16)])
            alphabet = _byte_level()  # GPT-2's byte-level BPE: each byte is one printable character
            if all(c in alphabet for c in piece):
                return bytes(alphabet[c] for c in piece)
        return text.encode()

    def token_string(self, token_id: int) -> str:
        """A token as the logprobs' `token` field shows it: its text, or, for bytes that are not whole characters,
        OpenAI's form "bytes:\\xf0\\x9f" (so alternatives stay distinct, where each would read U+FFFD)."""
        text = self.token_text(token_id)
        if REPLACEMENT not in text:
            return text
        raw = self.token_bytes(token_id)
        try:
            return raw.decode()
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def render_chat(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool,
                    continue_final_message: bool = False, template_kwargs: dict[str, Any] | None = None,
                    tools: list[dict[str, Any]] | None = None) -> str:
        """The prompt text of chat messages under the model's template (which writes its own special tokens).
        template_kwargs (vLLM's chat_template_kwargs, e.g. enable_thinking): those the template reads are passed to
        it, the others ignored, as vLLM does; one that would set what the call or the tokenizer sets (the messages,
        tools, the special tokens, ...) raises TemplateKwargsError."""
        variables = template_variables(self.tokenizer.chat_template)
        kwargs = {k: v for k, v in (template_kwargs or {}).items() if k in variables}
        taken = sorted(set(kwargs) & TEMPLATE_OWN)
        if taken:
            raise TemplateKwargsError(f"chat_template_kwargs may not set {', '.join(taken)}: the request or the "
                                      "tokenizer sets them")
        if continue_final_message:
            kwargs["continue_final_message"] = True  # transformers' (vLLM's) option
        template = self.tokenizer.chat_template
        if tools and (not isinstance(template, str) or "tools" in variables):
            # as vLLM passes a request's tools (to a template that reads them; a set of templates picks tool_use)
            kwargs["tools"] = tools
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                  **kwargs)

    def tokenizer_facts(self) -> TokenizerFacts:
        tok = self.tokenizer

        def text(name: str) -> str | None:
            value = getattr(tok, name, None)
            return value if isinstance(value, str) else None

        def ident(name: str) -> int | None:
            value = getattr(tok, name, None)
            return value if isinstance(value, int) else None

        return TokenizerFacts(
            tokenizer_class=type(tok).__name__, eos_token=text("eos_token"), eos_token_id=ident("eos_token_id"),
            bos_token=text("bos_token"), bos_token_id=ident("bos_token_id"), pad_token=text("pad_token"),
            pad_token_id=ident("pad_token_id"), chat_template=text("chat_template"))


REPLACEMENT = "\ufffd"


@functools.cache
def _byte_level() -> dict[str, int]:
    """GPT-2 byte-level BPE's character -> the byte it stands for."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def encode(tokenizer: Any, prompt: str | list[int], *, add_special_tokens: bool = True) -> list[int]:
    """Token ids of a prompt: text gets the special tokens its tokenizer adds by default (Gemma's <bos>; none for
    SmolLM2), as vLLM's completions do; a rendered chat template already holds them (add_special_tokens=False).
    Token ids pass through as they are. Text that encodes to nothing becomes the BOS token (or id 0)."""
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        if ids:
            return list(ids)
        bos = getattr(tokenizer, "bos_token_id", None)
        return [bos if bos is not None else 0]
    return list(prompt)


def encode_word(tokenizer: Any, text: str) -> tuple[int, ...]:
    """A text's own token ids, no special tokens: a bad word's forms (`bad_word_ids`)."""
    return tuple(tokenizer.encode(text, add_special_tokens=False))
