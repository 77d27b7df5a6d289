"""A guided_choice as token sequences, for beam search (vLLM's `ChoiceTrie`, vllm/entrypoints/.../beam_search/
choice_trie.py): each choice is the one token sequence its text encodes to, so a search's beams are distinct
choices. A grammar over the choices' text (xgrammar's, as sampling follows it) allows every way of writing them in
tokens: SmolLM2's width-3 search over four capitals returned "London" twice, as "London" and as "L" + "ondon"."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass
class _Node:
    children: dict[int, _Node] = field(default_factory=dict)
    complete: bool = False  # the tokens to here are a whole choice


@dataclass(frozen=True)
class ChoiceTrie:
    """The choices' token sequences as a prefix tree; `allowed` walks it from the root over a beam's tokens (O(its
    length): no state per beam to fork, as vLLM's)."""

    root: _Node
    stop_ids: frozenset[int]  # what ends a beam once its tokens are a whole choice

    @classmethod
    def build(cls, choices: Sequence[str], encode: Callable[[str], list[int]], *,
              stop_ids: frozenset[int]) -> ChoiceTrie:
        """encode: text -> token ids without special tokens. Each choice is encoded after a newline, whose tokens are
        then dropped (vLLM's: a tokenizer that marks a word's start, as SentencePiece does, writes a choice as it
        would follow other text); where the newline merges with the choice's first characters, alone."""
        marker = encode("\n")
        root = _Node()
        for choice in choices:
            ids = encode("\n" + choice)
            tokens = ids[len(marker):] if ids[:len(marker)] == marker else encode(choice)
            node = root
            for token in tokens:
                node = node.children.setdefault(token, _Node())
            node.complete = True
        return cls(root, stop_ids)

    def allowed(self, tokens: Sequence[int]) -> tuple[int, ...]:
        """The tokens a beam of `tokens` may take next: those that continue a choice, and the stop tokens where
        `tokens` are a choice; none off the tree."""
        node = self.root
        for token in tokens:
            child = node.children.get(token)
            if child is None:
                return ()
            node = child
        return tuple(sorted(node.children.keys() | (self.stop_ids if node.complete else set())))
