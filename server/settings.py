"""Server settings (environment variables PAINTERS_*, CLI flags override) and the policy-preset file."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.engine.speculative import MAX_SPECULATIVE_TOKENS, PROMPT_LOOKUP_MIN, Method


class SpeculativeConfig(BaseModel):
    """vLLM's --speculative-config, for the proposers Painters has (`server.engine.speculative`): 'ngram', prompt
    lookup as vLLM's; 'layer_skip', the served model's own layers under `draft_policy` (say skip:8)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Method
    num_speculative_tokens: int = Field(ge=1, le=MAX_SPECULATIVE_TOKENS, description="tokens drafted per row and "
                                        "step at most; a verifying forward computes one more position than that")
    prompt_lookup_max: int = Field(4, ge=1, description="ngram: the longest suffix of a row's tokens looked up "
                                   "(default 4, or prompt_lookup_min where that is larger)")
    prompt_lookup_min: int = Field(PROMPT_LOOKUP_MIN, ge=1, description="ngram: the shortest (default 2, or "
                                   "prompt_lookup_max where that is smaller: a single token matched drafted too "
                                   "often to pay, docs/results/speculative.md)")
    draft_policy: str | None = Field(None, description="layer_skip: the policy that drafts (a skip of middle "
                                     "layers, say, or a preset's name); it runs on the rows whose policy holds "
                                     "every layer it runs")

    disable_by_batch_size: int | None = Field(None, ge=1, description="vLLM's: no request drafts while more than "
                                              "this many decode (a verifying forward costs more as the batch "
                                              "fills); unset: at any batch size")

    @model_validator(mode="before")
    @classmethod
    def _one_lookup_bound(cls, data: object) -> object:
        """One bound given: the other's default follows it where it would cross it (vLLM fills a missing bound
        from the other)."""
        if not isinstance(data, dict):
            return data
        lo, hi = data.get("prompt_lookup_min"), data.get("prompt_lookup_max")
        if isinstance(hi, int) and lo is None:
            data = {**data, "prompt_lookup_min": min(PROMPT_LOOKUP_MIN, hi)}
        if isinstance(lo, int) and hi is None:
            data = {**data, "prompt_lookup_max": max(4, lo)}
        return data

    @model_validator(mode="after")
    def _method_options(self) -> SpeculativeConfig:
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"prompt_lookup_min ({self.prompt_lookup_min}) is above prompt_lookup_max "
                             f"({self.prompt_lookup_max})")
        if self.method == "layer_skip" and not self.draft_policy:
            raise ValueError("method 'layer_skip' needs a draft_policy (a cheaper policy of the model's own "
                             "layers, e.g. 'skip:8')")
        if self.method == "ngram" and self.draft_policy is not None:
            raise ValueError("draft_policy is layer_skip's; method 'ngram' drafts by prompt lookup")
        return self


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PAINTERS_", env_file=".env", extra="ignore")

    model: str = Field("smollm2-135m", description="alias, HF directory, .gguf file or hub id")
    served_model_name: str | None = Field(None, description="name clients use; default: the alias or directory name")
    device: str | None = Field(None, description="cpu, cuda, cuda:N; default cuda when present")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    group_mode: Literal["batched", "streams"] = "batched"
    cuda_graphs: bool = Field(True, description="on CUDA, replay decode steps from captured graphs "
                              "(server/engine/graphs.py); no effect on the CPU")
    attention: Literal["auto", "gathered", "in_place", "triton"] = Field(
        "auto", description="how decode attention reads the paged KV cache: 'gathered' copies each row's context out "
        "and runs SDPA; 'in_place' reads it where it lies through FlexAttention; 'triton' through Painters' Triton "
        "kernel (CUDA; see server/model/triton_attention.py); 'auto': 'triton' where it measures faster at load, "
        "else 'gathered'")
    fuse_decode: bool = Field(False, description="captured decode steps run the layer math through torch.compile "
                              "(fewer kernels per layer; compiles on each new layout's first step); needs cuda_graphs; "
                              "no effect on the CPU")
    overlap_decode: bool | None = Field(
        None, description="queue each decode step before reading the last one's tokens, so the device runs while the "
        "host emits (as SGLang's overlap scheduler, vLLM's async scheduling); default: on for CUDA, off on the CPU "
        "(where it gains nothing)")
    host: str = "127.0.0.1"
    port: int = 8000
    max_num_seqs: int = Field(16, ge=1, description="sequences decoded at once, over all policies")
    max_model_len: int = Field(2048, ge=16, description="prompt + generated tokens per sequence")
    queue_capacity: int = Field(256, ge=1, description="waiting requests before 429")
    scheduling_policy: Literal["fcfs", "priority"] = Field(
        "fcfs", description="which waiting request is admitted first: 'fcfs', the oldest (a request's priority must "
        "be 0); 'priority', the lowest priority value, then the oldest (vLLM's --scheduling-policy; running requests "
        "are never preempted)")
    kv_budget_tokens: int | None = Field(
        None, ge=1, description="KV cache size in slot-tokens (one token in one attention slot); default: what "
        "max_num_seqs full-length sequences of the full model need, capped by a quarter of free memory")
    kv_block_size: int = Field(16, ge=1, le=1024, description="tokens per KV-cache block")
    enable_prefix_caching: bool = Field(
        True, description="reuse the KV (and prompt logprobs) of prompt blocks already computed under the same policy")
    chunked_prefill_size: int | None = Field(
        None, ge=0, description="prompt tokens prefilled per engine step at most (SGLang's option of that name; vLLM's "
        "chunked prefill): a longer prompt is computed a piece per step, so running requests keep decoding between "
        "its pieces instead of waiting for all of it; 0: whole prompts at once; default: 512 on the CPU, 8192 on "
        "CUDA")
    speculative_config: SpeculativeConfig | None = Field(
        None, description="speculative decoding, as vLLM's --speculative-config (JSON): rows draft up to "
        "num_speculative_tokens tokens a step and one forward verifies them, the tokens the same as without; "
        "method 'ngram' (prompt lookup: prompt_lookup_max, prompt_lookup_min) or 'layer_skip' (the model's own "
        "layers under draft_policy); a structured output's rows draft nothing; unset: off")
    enable_prompt_tokens_details: bool = Field(
        False, description="answers' final usage carries prompt_tokens_details.cached_tokens: the prompt tokens "
        "found in the prefix cache (vLLM's option of that name)")
    prefix_cache_blocks: int | None = Field(
        None, ge=0, description="KV blocks kept only for prefix reuse (held by no request); least recently used ones "
        "beyond it are evicted; default: a quarter of the KV budget's blocks")
    probe_max_prompts: int = Field(64, ge=1, description="prompts in one POST /v1/probe or inputs in one "
                                   "POST /v1/embeddings")
    probe_max_tokens: int = Field(4096, ge=1, description="tokens over all prompts of one POST /v1/probe "
                                  "or /v1/embeddings")
    default_policy: str = "full"
    api_key: SecretStr | None = Field(
        None, description="require 'Authorization: Bearer KEY' on every endpoint but /health, /ready, /ping and "
        "/version; several keys separated by commas")
    api_key_file: Path | None = Field(None, description="file of accepted API keys, one per line ('#' comments)")
    metrics_require_key: bool = Field(False, description="also require a key on GET /metrics (scrapers send one)")
    max_body_bytes: int = Field(2 * 2**20, ge=1024, description="request body size; larger bodies get 413 before "
                                "they are read whole")
    body_timeout_s: float = Field(60.0, gt=0, description="how long a request body may take to arrive; a slower one "
                                  "gets 408 and its connection is closed (a body trickled in held it forever)")
    max_policy_chars: int = Field(4096, ge=16, description="characters in a policy string (or model@policy suffix)")
    max_schedule_steps: int = Field(1024, ge=1, description="steps in a compiled schedule (explicit schedules, loops)")
    stream_send_timeout_s: float = Field(
        60.0, gt=0, description="a streamed answer whose client takes no data for this long is closed and its "
        "requests aborted (its unread frames were held in memory for as long as the connection stayed open)")
    drain_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM: how long running requests may finish "
                                   "before the rest end with finish_reason 'abort'")
    policy_presets: Path | None = Field(None, description="YAML or JSON file: name -> policy")
    allowed_policies: list[str] | None = Field(
        None, description="if set, only these policies (canonical strings or preset names) are accepted"
    )
    max_policy_labels: int = Field(32, ge=1, description="distinct policy labels in metrics; the rest are 'other'")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice)")
    tool_call_parser: Literal["hermes"] | None = Field(
        None, description="how chat answers write tool calls, read for tool_choice 'auto' (the default when a request "
        "sends tools): 'hermes' (<tool_call>{...}</tool_call>, vLLM's parser of that name); unset: 'auto' is refused, "
        "as vLLM refuses it without --enable-auto-tool-choice --tool-call-parser")
    responses_store: bool = Field(
        False, description="keep /v1/responses answers sent with store=true in memory, for previous_response_id, "
        "GET/DELETE /v1/responses/{id}, its input_items and background responses (vLLM's "
        "VLLM_ENABLE_RESPONSES_API_STORE); off: store is ignored, as vLLM's, and background refused")
    responses_store_max: int = Field(1000, ge=1, description="responses kept at most; the least recently used go")
    responses_store_max_bytes: int = Field(64 * 2**20, ge=1024, description="bytes (their JSON) the kept responses "
                                           "and conversations take at most; the least recently used go")
    responses_background_max: int = Field(64, ge=1, description="background responses (background: true) running at "
                                          "once, queued or in progress; more is a 429, as a full queue's")

    @field_validator("speculative_config", mode="before")
    @classmethod
    def _json_text(cls, v: object) -> object:
        """A JSON string, as a KubeRay serveConfigV2 argument or a CLI flag gives it (the environment's is parsed
        already)."""
        if isinstance(v, str):
            try:
                return json.loads(v)
            except json.JSONDecodeError as e:
                raise ValueError(f"not JSON ({e}); e.g. '{{\"method\": \"ngram\", \"num_speculative_tokens\": 4}}'"
                                 ) from None
        return v

    @field_validator("served_model_name")
    @classmethod
    def _no_policy_suffix(cls, v: str | None) -> str | None:
        if v is not None and (not v or "@" in v):
            raise ValueError(f"served_model_name {v!r} must be non-empty and without '@' (clients write "
                             "NAME@POLICY to choose a policy)")
        return v

    @model_validator(mode="after")
    def _fusing_needs_graphs(self) -> Settings:
        if self.fuse_decode and not self.cuda_graphs:
            raise ValueError("fuse_decode needs cuda_graphs: only captured decode steps run the fused layer math")
        return self


@lru_cache
def get_settings() -> Settings:
    return Settings()


def api_keys(settings: Settings) -> tuple[str, ...]:
    """Every accepted key: those of `api_key` (comma-separated) and of `api_key_file` (one per line). A key setting
    or file that holds no key is an error, not an open server: a blank secret (`PAINTERS_API_KEY=`, `--api-key ""`,
    a file of comments only) used to turn authentication off without a word."""
    keys = [k.strip() for k in (settings.api_key.get_secret_value() if settings.api_key else "").split(",")]
    if settings.api_key_file is not None:
        for line in Path(settings.api_key_file).read_text().splitlines():
            if not line.strip().startswith("#"):
                keys.append(line.strip())
    found = tuple(k for k in keys if k)
    if not found and (settings.api_key is not None or settings.api_key_file is not None):
        where = "api_key_file " + str(settings.api_key_file) if settings.api_key_file is not None else "api_key"
        raise ValueError(f"{where} holds no API key (blank, or only commas or comments); give a key, or leave the "
                         "setting out to serve without keys")
    return found


def load_presets(path: Path | None) -> dict[str, str | dict]:
    """Read a preset file ({name: policy}); policies are string or JSON forms, validated by the caller."""
    if path is None:
        return {}
    import json

    import yaml

    text = Path(path).read_text()
    data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ValueError(f"preset file {path} must map names to policies, e.g. 'fast: skip:10'")
    for name in data:
        if "@" in name or ":" in name:
            raise ValueError(f"preset name {name!r} may not contain '@' or ':'")
    return data
