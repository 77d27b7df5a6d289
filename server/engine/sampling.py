"""Next-token choice for a whole batch at once: greedy, temperature, top-k, top-p, min-p, per-request seeded
generators, and the logit processors before them (a structured output's grammar, allowed tokens, bad words, logit
bias, min_tokens' mask, penalties), in vLLM's order. Every value `SamplingParams` (in `server.engine.sampling_params`)
accepts samples without inf or NaN reaching the draw."""

from __future__ import annotations

import secrets

import numpy as np
import torch
from torch import Tensor

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from server.engine.sampling_params import (
    LOGPROBS, MAX_STOP_LENGTH, MAX_STOP_STRINGS, MIN_TEMPERATURE, SEED, TEMPERATURE, TOP_K, TOP_P, Interval, SamplingError, SamplingParams, check_stop,
)
from server.engine.transfer import to_device

__all__ = ["LOGPROBS", "MAX_STOP_LENGTH", "MAX_STOP_STRINGS", "MIN_TEMPERATURE", "SEED", "TEMPERATURE", "TOP_K",
           "TOP_P", "BadWords", "Interval", "Penalties", "PromptCache", "SamplingBatch", "SamplingError",
           "SamplingParams", "check_stop", "make_generator", "process_logits", "sample", "sample_batch",
           "rewind", "sample_isolated", "unpack_bitmask"]


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A generator seeded with `seed`, or without one with a random seed that a request may send (within SEED's
    range, which `torch.Generator.seed()`'s 64 bits are not), so the seed a result reports draws the same again."""
    g = torch.Generator(device=device)
    g.manual_seed(secrets.randbelow(int(SEED.hi) + 1) if seed is None else seed)
    return g


class PromptCache:
    """The prompts that penalties read (`SamplingParams.reads_prompt`), on the device: a request's is copied there
    when it first samples, not at every step. One per batch, which drops a request's when the request leaves it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._held: dict[str, Tensor] = {}

    def get(self, request_id: str, prompt: Sequence[int]) -> Tensor:
        """[L] long on the device: the prompt's tokens (copied the first time)."""
        held = self._held.get(request_id)
        if held is None:
            held = to_device(torch.tensor(list(prompt), dtype=torch.long), self.device)
            self._held[request_id] = held
        return held

    def drop(self, request_id: str) -> None:
        self._held.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._held)


@dataclass(frozen=True)
class Penalties:
    """The penalized rows' penalties and what they have seen, on the device (vLLM's apply_penalties): counts of the
    output tokens (presence and frequency), and the prompt's tokens too (repetition)."""

    rows: Tensor  # [P] long: the rows with some penalty on
    presence: Tensor  # [P] float32
    frequency: Tensor  # [P] float32, per occurrence counted (a "sequence" row's already divided by its length)
    repetition: Tensor  # [P] float32 (1 = off)
    counted: Tensor  # [2, N] long: (index into rows, token), one per occurrence counted and known on the host
    seen: Tensor | None  # [2, M] long: (index into rows, token) seen, not counted: the prompt, for repetition
    # [P] long: each row's latest output token, which the host may not hold yet (overlapped decoding: a decode
    # step's input token is the one in flight); None in a prefill (no output yet)
    recent: Tensor | None

    @classmethod
    def of(cls, params: list[SamplingParams], prompts: Sequence[Tensor | None], outputs: Sequence[Sequence[int]],
           device: torch.device, recent: Tensor | None) -> Penalties | None:
        """prompts: per row its prompt's tokens on the device where its penalties read them (`PromptCache`), else
        None; outputs: per row its output tokens known on the host, not counting `recent`; recent [B]: each row's
        latest output token. None when no row has a penalty on. The host copies the output's tokens and the
        parameters; the prompts are on the device already."""
        rows = [b for b, p in enumerate(params) if p.penalized]
        if not rows:
            return None
        counted: list[np.ndarray] = []
        packed = []
        in_counted: list[Tensor] = []  # "sequence" rows' prompts, counted
        in_seen: list[Tensor] = []  # the other rows' prompts, seen for repetition
        for i, b in enumerate(rows):
            p, prompt, output = params[b], prompts[b], outputs[b]
            counted.append(_pairs(i, output))
            made = len(output) + (recent is not None)
            frequency, counts, sees = p.frequency_penalty, 0, 0
            if p.reads_prompt:
                assert prompt is not None, "a penalty that reads the prompt without it"
                if p.frequency_of == "sequence":  # TGI's: the share of the whole sequence that is the token
                    frequency = p.frequency_penalty / max(1, prompt.shape[0] + made)
                    in_counted.append(prompt)
                    counts = prompt.shape[0]
                else:
                    in_seen.append(prompt)
                    sees = prompt.shape[0]
            packed.append((b, p.presence_penalty, frequency, p.repetition_penalty, counts, sees))
        ids = to_device(torch.from_numpy(np.concatenate(counted, axis=1)), device)  # one copy each:
        values = to_device(torch.tensor(packed, dtype=torch.float64), device)  # pairs, then parameters
        index = torch.arange(len(rows), device=device)

        def prompt_pairs(column: int, prompts: list[Tensor]) -> Tensor:
            """[2, sum of lengths]: (index into rows, token) for each prompt token, no host sync (output_size)."""
            total = sum(t.shape[0] for t in prompts)
            which = torch.repeat_interleave(index, values[:, column].long(), output_size=total)
            return torch.stack([which, torch.cat(prompts)])

        if in_counted:
            ids = torch.cat([ids, prompt_pairs(4, in_counted)], dim=1)
        return cls(rows=values[:, 0].long(), presence=values[:, 1].float(), frequency=values[:, 2].float(),
                   repetition=values[:, 3].float(), counted=ids, seen=prompt_pairs(5, in_seen) if in_seen else None,
                   recent=None if recent is None else recent[values[:, 0].long()])

    def apply(self, logits: Tensor) -> Tensor:
        """logits [B, V] float32 -> a copy with the penalized rows penalized (vLLM's arithmetic): a token seen in
        prompt or output has its logit divided by `repetition` when positive, multiplied when not; then minus
        `frequency` x its count and `presence` once if counted at all. Only the positions seen are computed: every
        occurrence of a token gets the same new logit, so writing them all is exact (a dense pass per operation over
        [P, V] cost 5 ms a step at 16 rows on the CPU)."""
        (B, V), dev = logits.shape, logits.device
        P = self.rows.shape[0]
        local = self.counted[0] * V + self.counted[1]  # [N] into a flattened [P, V]
        if self.recent is not None:
            local = torch.cat([local, torch.arange(P, device=dev) * V + self.recent])
        # index_add, not index_put(accumulate=True): a plain atomic add on CUDA, no sorting of the indices
        counts = torch.zeros(P * V, device=dev).index_add_(0, local, torch.ones(local.shape[0], device=dev))
        if self.seen is not None:
            local = torch.cat([local, self.seen[0] * V + self.seen[1]])
        which = torch.div(local, V, rounding_mode="floor")  # [M] index into rows
        at = self.rows[which] * V + local % V  # [M] into the flattened [B, V]
        flat = logits.flatten()
        x, count, r = flat[at], counts[local], self.repetition[which]
        x = torch.where(x > 0, x / r, x * r) - self.frequency[which] * count - self.presence[which] * (count > 0)
        return flat.index_put((at,), x).view(B, V)


@dataclass(frozen=True)
class BadWords:
    """vLLM's bad_words (v1's `apply_bad_words`): a row may not choose the last token of a word whose other tokens
    its output ends with; a one-token word's token never. The prompt does not count: a word is matched in the output
    alone. A decode step's latest output token may be on the device only (in flight, overlapped): a word whose
    tokens before its next-to-last end the output on the host is a candidate, masked on the device where the
    latest token is that next-to-last one. (Not a structured row's way, reading the step in flight first: that
    stops overlap for the whole batch, and a one-token comparison needs no host.)"""

    at: Tensor  # [2, N] long: (row, token) pairs that may be masked
    hit: Tensor  # [N] bool: whether each is masked this step

    @classmethod
    def of(cls, params: list[SamplingParams], outputs: Sequence[Sequence[int]], device: torch.device,
           recent: Tensor | None) -> BadWords | None:
        """outputs: per row its output tokens known on the host, not counting `recent`; recent [B]: each row's
        latest output token (None in a prefill: no output yet). None when no word can end here."""
        pairs: list[tuple[int, int, int]] = []  # (row, token, the latest token it needs; -1: none)
        for b, p in enumerate(params):
            for *prefix, last in p.bad_words_ids or ():
                output = outputs[b]
                if len(prefix) > len(output) + (recent is not None):
                    continue  # the output is shorter than the word's other tokens
                if recent is None or not prefix:
                    if not prefix or list(output[len(output) - len(prefix):]) == prefix:
                        pairs.append((b, last, -1))
                elif len(prefix) == 1 or list(output[len(output) - len(prefix) + 1:]) == prefix[:-1]:
                    pairs.append((b, last, prefix[-1]))
        if not pairs:
            return None
        packed = to_device(torch.tensor(pairs, dtype=torch.long).T, device)  # one copy
        at, needs = packed[:2], packed[2]
        hit = needs < 0
        if recent is not None:
            hit = hit | (recent[at[0]] == needs)
        return cls(at=at, hit=hit)

    def apply(self, logits: Tensor) -> Tensor:
        """logits [B, V] -> a copy with the masked pairs at -inf. A pair may appear more than once (two words
        ending in one token), masked or not: the smallest of -inf (masked) and +inf (not) and the logit is written,
        so the order of duplicates does not matter."""
        B, V = logits.shape
        inf = torch.full((), float("inf"), device=logits.device)
        mask = torch.where(self.hit, -inf, inf)
        return logits.flatten().scatter_reduce(0, self.at[0] * V + self.at[1], mask, "amin").view(B, V)


def _pairs(row: int, tokens: Sequence[int]) -> np.ndarray:
    """[2, len(tokens)]: (row, token) for each token."""
    return np.stack([np.full(len(tokens), row, dtype=np.int64), np.asarray(tokens, dtype=np.int64).reshape(-1)])


@dataclass(frozen=True)
class SamplingBatch:
    """The drawing rows' sampling parameters as tensors on the device, plus host facts that fix the step's shapes
    (which rows draw, how many alternatives to return), so sampling needs no host sync. An all-greedy batch carries
    no tensors: it costs no host-to-device copy."""

    generators: tuple[Any, ...]  # one per row (torch.Generator; anything else fails that row's draw)
    sampled: tuple[int, ...]  # rows that draw (not greedy)
    filtered: bool  # some drawing row uses top-k or top-p
    num_top: int  # alternatives to return per row (max over rows)
    logprobs: bool = True  # some row wants its token's logprob (otherwise no pass over the vocabulary computes any)
    top_k_cap: int = 0  # every drawing row keeps at most this many tokens (0: some row keeps all)
    rows: Tensor | None = None  # [S] long: `sampled` on the device (None when no row draws)
    temperature: Tensor | None = None  # [S] float32, per drawing row
    top_k: Tensor | None = None  # [S] long, 0 = off
    top_p: Tensor | None = None  # [S] float32
    # [2, N] long: (row, token) pairs that row may not choose this step (a stop token before min_tokens, as vLLM's
    # MinTokensLogitsProcessor); None when no row bans any
    banned: Tensor | None = None
    grammar_rows: Tensor | None = None  # [G] long: the structured rows (None when the batch has none)
    grammar: Tensor | None = None  # [G, ceil(V / 32)] int32: each one's allowed tokens as bits (`unpack_bitmask`)
    allowed: Tensor | None = None  # [2, N] long: (row, token) pairs a row limited by allowed_token_ids may choose
    top_from_allowed: Tensor | None = None  # [B] bool: rows whose alternatives are chosen from those (`alternatives`)
    bias_at: Tensor | None = None  # [2, N] long: (row, token) pairs with a logit bias
    bias: Tensor | None = None  # [N] float32: their biases
    bad_words: BadWords | None = None  # None when no row's bad word can end this step
    penalties: Penalties | None = None  # None when no row has a penalty on
    min_p: Tensor | None = None  # [S] float32, per drawing row (None when every drawing row's is 0)
    typical_p: Tensor | None = None  # [S] float32, per drawing row (None when every drawing row's is 1)

    @classmethod
    def of(cls, params: list[SamplingParams], generators: list[Any], device: torch.device,
           banned: list[tuple[int, int]] | None = None, outputs: Sequence[Sequence[int]] | None = None,
           prompts: Sequence[Tensor | None] | None = None, recent: Tensor | None = None,
           grammar: tuple[Sequence[int], Tensor] | None = None) -> SamplingBatch:
        """banned: (row, token) pairs, each row's tokens it may not choose this step. outputs, prompts and recent:
        what the penalties count and bad words match (`Penalties.of`, `BadWords.of`); without them, no row has
        made or read any token. grammar: the structured rows and their bitmask on the host
        (`server.engine.grammar.bitmask`). A batch whose rows use none of allowed_token_ids, bad_words, logit_bias,
        penalties, min_p and structured outputs carries no tensor for them."""
        sampled = tuple(b for b, p in enumerate(params) if not p.greedy)
        tensors: dict[str, Any] = {}
        if banned:
            tensors["banned"] = to_device(torch.tensor(banned, dtype=torch.long).T, device)
        if grammar is not None:
            rows, mask = grammar
            tensors.update(grammar_rows=to_device(torch.tensor(rows, dtype=torch.long), device),
                           grammar=to_device(mask, device))
        allowed = [(b, t) for b, p in enumerate(params) if p.allowed_token_ids is not None
                   for t in p.allowed_token_ids]
        if allowed:
            tensors["allowed"] = to_device(torch.tensor(allowed, dtype=torch.long).T, device)
        if any(p.top_from_allowed for p in params):
            tensors["top_from_allowed"] = to_device(torch.tensor([p.top_from_allowed for p in params]), device)
        bias = [(b, t, v) for b, p in enumerate(params) for t, v in p.logit_bias]
        if bias:  # one copy: token ids are exact in float64
            packed = to_device(torch.tensor(bias, dtype=torch.float64).T, device)
            tensors.update(bias_at=packed[:2].long(), bias=packed[2].float())
        outputs = outputs or [()] * len(params)
        tensors["bad_words"] = BadWords.of(params, outputs, device, recent)
        tensors["penalties"] = Penalties.of(params, prompts or [None] * len(params), outputs, device, recent)
        min_p = any(params[b].min_p > 0 for b in sampled)
        typical = any(params[b].typical_p < 1 for b in sampled)
        if sampled:  # one copy: rows and parameters packed together
            packed = to_device(torch.tensor([(b, params[b].temperature, params[b].top_k, params[b].top_p,
                                              params[b].min_p, params[b].typical_p) for b in sampled],
                                            dtype=torch.float64), device)
            tensors.update(rows=packed[:, 0].long(), temperature=packed[:, 1].float(), top_k=packed[:, 2].long(),
                           top_p=packed[:, 3].float(), min_p=packed[:, 4].float() if min_p else None,
                           typical_p=packed[:, 5].float() if typical else None)
        return cls(
            generators=tuple(generators), sampled=sampled,
            filtered=any(params[b].top_k > 0 or params[b].top_p < 1.0 for b in sampled),
            num_top=max((p.logprobs or 0 for p in params), default=0),
            logprobs=any(p.logprobs is not None for p in params),
            top_k_cap=max((params[b].top_k for b in sampled), default=0) if all(params[b].top_k > 0 for b in sampled)
            else 0,
            **tensors,
        )


def sample(logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> Tensor:
    """logits [B, V] -> next tokens [B]. Each row uses its own parameters and generator, so a sequence draws the same
    tokens whether it runs alone or in a batch. Raises the first row's error if any row cannot be sampled."""
    tokens, errors = sample_isolated(logits, params, generators)
    if errors:
        raise errors[min(errors)]
    return tokens


def sample_isolated(logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator]
                    ) -> tuple[Tensor, dict[int, Exception]]:
    """logits [B, V] -> (next tokens [B], {row: the error that row raised}). A failed row's token is arbitrary and the
    other rows are unaffected, so one bad sequence can be finished with its error while the batch goes on."""
    assert logits.dim() == 2 and logits.shape[0] == len(params) == len(generators), (logits.shape, len(params))
    tokens, alive, errors = sample_batch(logits, SamplingBatch.of(params, generators, logits.device))
    for b, ok in enumerate(alive.tolist()):
        if not ok:
            errors[b] = ValueError(f"row {b} has no token with a finite logit (all are -inf or NaN)")
    return tokens, errors


def sample_batch(logits: Tensor, batch: SamplingBatch) -> tuple[Tensor, Tensor, dict[int, Exception]]:
    """logits [B, V] -> (next tokens [B], alive [B] bool, {row: error of its draw}), all rows at once on the device.

    All greedy rows are one argmax. NaN logits are never chosen; a row whose logits are all -inf or NaN is not alive
    (its token is arbitrary). A drawing row takes one uniform number from its own generator (so it draws the same
    token alone or in any batch) and inverts the cumulative distribution of its filtered, tempered probabilities.

    Before either, the logit processors (`process_logits`); the caller's logits (which logprobs are computed
    from) are unchanged."""
    tokens, alive, logits = greedy(process_logits(logits, batch))
    errors: dict[int, Exception] = {}
    if not batch.sampled:
        return tokens, alive, errors
    rows = list(batch.sampled)
    draws: list[Tensor] = []  # 0-d, on the device: stacked, never read back here
    for b in rows:
        try:
            draws.append(_uniform(batch.generators[b], logits.device))
        except Exception as e:  # isolation is the point: whatever failed, only this row is lost
            errors[b] = e
            draws.append(torch.zeros((), dtype=torch.float64, device=logits.device))
    assert batch.rows is not None and batch.temperature is not None and batch.top_k is not None
    assert batch.top_p is not None
    drawn = _draw(logits[batch.rows], batch.temperature, batch.top_k, batch.top_p, torch.stack(draws),
                  filtered=batch.filtered, cap=batch.top_k_cap, min_p=batch.min_p, typical_p=batch.typical_p)
    return tokens.index_copy(0, batch.rows, drawn), alive, errors


def process_logits(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """logits [B, V] -> float32 logits for greedy choice and temperature, as vLLM's sampler processes them: a row's
    tokens outside its grammar's allowed ones, outside its allowed_token_ids, the end of a bad word
    (`BadWords.apply`) and a banned (row, token) pair are -inf; logit biases are added; then the penalties
    (`Penalties.apply`). A copy wherever anything applies: the caller's logits are unchanged."""
    logits = logits.float()
    if batch.grammar is not None:
        assert batch.grammar_rows is not None
        rows = batch.grammar_rows
        masked = logits[rows].masked_fill(~unpack_bitmask(batch.grammar, logits.shape[1]), float("-inf"))
        logits = logits.index_copy(0, rows, masked)
    # fills, not torch.tensor(..., device=...): that is a blocking host-to-device copy, a sync in the step
    if batch.allowed is not None:
        keep, limited = _allowed(batch.allowed, logits)
        logits = logits.masked_fill(limited[:, None] & ~keep, float("-inf"))
    if batch.bad_words is not None:
        logits = batch.bad_words.apply(logits)
    if batch.bias is not None:
        assert batch.bias_at is not None
        V = logits.shape[1]
        logits = logits.flatten().index_add(0, batch.bias_at[0] * V + batch.bias_at[1], batch.bias).view(logits.shape)
    if batch.banned is not None:
        logits = logits.index_put(tuple(batch.banned), torch.full((), float("-inf"), device=logits.device))
    if batch.penalties is not None:
        logits = batch.penalties.apply(logits)
    return logits


def alternatives(logprobs: Tensor, batch: SamplingBatch) -> Tensor:
    """logprobs [B, V] -> what each row's top alternatives are chosen from: for a row that asks
    (`SamplingParams.top_from_allowed`) the logprobs of the tokens it may choose, those of its allowed_token_ids and
    its grammar's mask, the others' -inf; for the rest every token's. The caller's logprobs are unchanged."""
    if batch.top_from_allowed is None:
        return logprobs
    asks = batch.top_from_allowed
    if batch.allowed is not None:
        keep, limited = _allowed(batch.allowed, logprobs)
        logprobs = logprobs.masked_fill((asks & limited)[:, None] & ~keep, float("-inf"))
    if batch.grammar is not None:
        assert batch.grammar_rows is not None
        rows = batch.grammar_rows
        keep = unpack_bitmask(batch.grammar, logprobs.shape[1]) | ~asks[rows][:, None]
        logprobs = logprobs.index_copy(0, rows, logprobs[rows].masked_fill(~keep, float("-inf")))
    return logprobs


def _allowed(pairs: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """(row, token) pairs [2, N] -> (keep [B, V] bool: the tokens each row may choose, limited [B] bool: the rows
    with a list), shaped as `like` [B, V]; by fills on its device (no host copy, no sync)."""
    (B, V), dev = like.shape, like.device
    row, token = pairs
    keep = torch.zeros(B * V, dtype=torch.bool, device=dev).index_fill_(0, row * V + token, True).view(B, V)
    return keep, torch.zeros(B, dtype=torch.bool, device=dev).index_fill_(0, row, True)


def unpack_bitmask(mask: Tensor, V: int) -> Tensor:
    """mask [R, ceil(V / 32)] int32, bit t % 32 of word t // 32 set when token t is allowed (xgrammar's layout) ->
    allowed [R, V] bool."""
    bits = torch.arange(32, dtype=torch.int32, device=mask.device)
    return ((mask[:, :, None] >> bits) & 1).bool().flatten(1)[:, :V]


def greedy(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x [B, V] float -> (each row's greedy token [B], alive [B] bool, x with NaN as -inf). A NaN is never chosen: the
    token is the first index of the row's largest non-NaN value (+inf included), as `nan_to_num(x).argmax(-1)`; a row
    is alive when that value is finite or +inf.

    On CUDA that is what runs (no host sync). On the CPU both torch passes are slow, `argmax` a scalar loop (0.3-0.7 ms
    over [16, 49152] on this project's CPU) and `nan_to_num` a full copy (0.24 ms), while numpy's `argmax` is
    vectorised (0.05 ms) and shares the tensor's memory. It takes a NaN for the maximum, so the value at each token
    tells whether the cleaned copy is needed at all: only then is it made."""
    if x.device.type != "cpu":
        clean = _clean(x)
        tokens = clean.argmax(-1)
        return tokens, clean.gather(-1, tokens[:, None])[:, 0] > -float("inf"), clean
    values = x.detach().numpy()
    tokens = values.argmax(-1)  # the first maximum, or the first NaN
    top = values[np.arange(len(tokens)), tokens]
    if np.isnan(top).any():  # rare: the cleaned copy has no NaN, so this recursion ends
        clean = _clean(x)
        return *greedy(clean)[:2], clean
    return torch.from_numpy(tokens), torch.from_numpy(top > -np.inf), x


def argmax(x: Tensor) -> Tensor:
    """x [B, V] -> the greedy token of each row: `x.argmax(-1)` where x has no NaN (see `greedy`)."""
    return greedy(x)[0]


def _clean(x: Tensor) -> Tensor:
    inf = float("inf")
    return torch.nan_to_num(x, nan=-inf, posinf=inf, neginf=-inf)


def _typical(x: Tensor, mass: Tensor) -> Tensor:
    """x [S, V] (rows' logits, -inf where filtered out), mass [S] in (0, 1] -> [S, V] True where typical decoding
    drops the token (transformers' TypicalLogitsWarper, TGI's typical_p): ranked by how far its surprise -log p is
    from the row's entropy, the tokens are kept until they hold `mass` of the probability, the one that reaches it
    included; a row whose mass is 1 drops nothing."""
    logp = x.log_softmax(-1)
    p = logp.exp()
    entropy = -(logp * p).nansum(-1, keepdim=True)  # -inf x 0 is nan: a filtered token adds nothing
    shifted = (-logp - entropy).abs()  # inf for filtered tokens: ranked last
    ranked, order = shifted.sort(-1)
    last = ((p.gather(-1, order).cumsum(-1) < mass[:, None]).sum(-1)).clamp(max=x.shape[-1] - 1)
    return (shifted > ranked.gather(-1, last[:, None])) & (mass < 1)[:, None]


def _uniform(g: Any, device: torch.device) -> Tensor:
    """One draw in [0, 1) from a row's generator (which lives on `device`)."""
    return torch.rand((), generator=g, dtype=torch.float64, device=device)


def rewind(g: torch.Generator, state: Tensor, draws: int, device: torch.device) -> None:
    """Put a row's generator where `draws` of `sample_batch`'s draws from `state` leave it (a verifying step drew
    for positions whose tokens the row does not keep)."""
    g.set_state(state)
    for _ in range(draws):
        _uniform(g, device)


def _draw(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, u: Tensor, *, filtered: bool,
          cap: int = 0, min_p: Tensor | None = None, typical_p: Tensor | None = None) -> Tensor:
    """logits [S, V] float32 without NaN; temperature, top_p [S]; top_k [S] (0 off); u [S] in [0, 1); min_p [S] or
    None -> tokens [S]. Shifting each row's maximum to 0 before dividing keeps every scaled logit in [-inf, 0], so
    softmax never sees inf - inf; +inf logits become 0 and share the draw.

    min_p (vLLM's, after temperature) drops a token whose probability is below min_p x the largest: with the
    maximum at 0, exp(x) is that ratio, so the most likely token always stays.

    Filtering (top-k, then top-p) finds each row's smallest kept logit on its sorted logits, then keeps every token
    at or above it, in vocabulary order (a token tied with the last kept one stays, as in HF's warpers). The draw
    inverts the cumulative distribution in vocabulary order whatever the batch: inverted in sorted order when some
    row of the batch filtered, a seeded row drew another token beside a top-p neighbour than alone. With `cap`
    (every row's top_k <= cap), only the cap largest logits are sorted, not the vocabulary. typical_p [S] or None
    (1: off) then keeps the tokens of typical decoding (`_typical`)."""
    x = torch.nan_to_num(logits - logits.max(-1, keepdim=True).values, nan=0.0, neginf=float("-inf"))
    x = x / temperature[:, None]
    if min_p is not None:
        x = x.masked_fill(x.exp() < min_p[:, None], float("-inf"))
    if filtered:
        V = x.shape[-1]
        ranked = torch.topk(x, cap, dim=-1).values if 0 < cap < V else torch.sort(x, dim=-1, descending=True).values
        k = torch.where((top_k > 0) & (top_k < ranked.shape[-1]), top_k, ranked.shape[-1])
        kth = ranked.gather(-1, (k - 1)[:, None])
        ranked = ranked.masked_fill(ranked < kth, float("-inf"))
        # top-p's mass is that of every token top-k keeps: ties with the k-th past `cap` are not in `ranked`
        probs = (ranked - x.masked_fill(x < kth, float("-inf")).logsumexp(-1, keepdim=True)).exp()
        drop = probs.cumsum(-1) - probs >= top_p[:, None]  # keep the smallest prefix reaching top_p
        drop[:, 0] = False  # the most likely token always stays, however small top_p rounds in float32
        ranked = ranked.masked_fill(drop & (top_p < 1.0)[:, None], float("-inf"))
        lowest = ranked.masked_fill(ranked == float("-inf"), float("inf")).min(-1, keepdim=True).values
        x = x.masked_fill(x < lowest, float("-inf"))
    if typical_p is not None:
        x = x.masked_fill(_typical(x, typical_p), float("-inf"))
    probs = x.softmax(-1).double()
    cdf = probs.cumsum(-1)
    at = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).to(torch.uint8).argmax(-1)  # the last token with mass
    return torch.minimum(at, last)
