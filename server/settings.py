"""Server settings (environment variables PAINTERS_*, CLI flags override) and the policy-preset file."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PAINTERS_", env_file=".env", extra="ignore")

    model: str = Field("smollm2-135m", description="alias, HF directory, .gguf file or hub id")
    served_model_name: str | None = Field(None, description="name clients use; default: the alias or directory name")
    device: str | None = Field(None, description="cpu, cuda, cuda:N; default cuda when present")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    group_mode: Literal["batched", "streams"] = "batched"
    host: str = "127.0.0.1"
    port: int = 8000
    max_num_seqs: int = Field(16, ge=1, description="sequences decoded at once, over all policies")
    max_model_len: int = Field(2048, ge=16, description="prompt + generated tokens per sequence")
    queue_capacity: int = Field(256, ge=1, description="waiting requests before 429")
    kv_budget_tokens: int | None = Field(
        None, ge=1, description="KV cache size in slot-tokens (one token in one attention slot); default: what "
        "max_num_seqs full-length sequences of the full model need, capped by a quarter of free memory")
    kv_block_size: int = Field(16, ge=1, le=1024, description="tokens per KV-cache block")
    probe_max_prompts: int = Field(64, ge=1, description="prompts in one POST /v1/probe")
    probe_max_tokens: int = Field(4096, ge=1, description="tokens over all prompts of one POST /v1/probe")
    default_policy: str = "full"
    api_key: str | None = None
    policy_presets: Path | None = Field(None, description="YAML or JSON file: name -> policy")
    allowed_policies: list[str] | None = Field(
        None, description="if set, only these policies (canonical strings or preset names) are accepted"
    )
    max_policy_labels: int = Field(32, ge=1, description="distinct policy labels in metrics; the rest are 'other'")
    threads: int | None = Field(None, description="torch CPU threads (default: torch's choice)")


@lru_cache
def get_settings() -> Settings:
    return Settings()


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
