"""The client's own response types (it never imports the server): OpenAI-shaped completions plus the `painters`
extension object that says which policy ran and how long each phase took."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")


class Timings(_Model):
    queue_s: float
    prefill_s: float
    decode_s: float
    time_to_first_token_s: float
    time_per_output_token_s: float
    e2e_s: float


class PaintersInfo(_Model):
    policy: str
    schedule: str
    timings: Timings | None = None


class Usage(_Model):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(_Model):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int] = []


class CompletionChoice(_Model):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(_Model):
    id: str
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    painters: PaintersInfo | None = None


class ChatMessage(_Model):
    role: str
    content: str | None = None


class ChatChoice(_Model):
    index: int
    message: ChatMessage | None = None
    delta: dict[str, Any] | None = None
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None


class ChatResponse(_Model):
    id: str
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    painters: PaintersInfo | None = None


class Token(_Model):
    id: int
    text: str
    logprob: float | None = None
    special: bool = False


class GenerateDetails(_Model):
    finish_reason: str
    generated_tokens: int
    seed: int | None = None
    tokens: list[Token] = []
    prefill: list[Token] = []


class GenerateResponse(_Model):
    generated_text: str
    details: GenerateDetails | None = None
    painters: PaintersInfo | None = None


class StreamEvent(_Model):
    """One native /generate_stream event."""

    index: int = 0
    token: Token | None = None
    generated_text: str | None = None
    details: GenerateDetails | None = None
    painters: PaintersInfo | None = None


class APIErrorBody(_Model):
    message: str
    type: str | None = None
    param: str | None = None
    code: Any = None


class ProbeResponse(_Model):
    """POST /v1/probe: how alike the hidden states entering each of the schedule's S steps (and its output) are.

    similarity: [S + 1][S + 1], cosine of each sequence's states flattened over positions, averaged over sequences;
    block_influence: [S], 1 - mean over tokens of cos(x_i, x_{i+1}); angular_distance: row n - 1 (n = 1 .. S // 2)
    holds arccos(cos(x_i, x_{i+n})) / pi on the last token for i = 0 .. S - n, averaged over sequences."""

    object: str = "probe"
    model: str
    policy: str
    schedule: str
    steps: list[str]
    num_sequences: int
    num_tokens: int
    similarity: list[list[float]]
    block_influence: list[float]
    angular_distance: list[list[float]]
