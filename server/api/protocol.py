"""Request and response bodies: OpenAI-compatible completions and chat, the TGI-like native shape, tokenizer calls."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import replace
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator,
    model_validator,
)

from server.api.tools import (
    FUNCTION_NAME, ChatTool, DeltaToolCall, SentToolCall, ToolCall, ToolChoice, check_choice, check_ends_at_call,
    check_one_constraint, check_tools,
)
from server.engine.sampling_params import (
    LOGIT_BIAS, LOGPROBS, MAX_BAD_WORD_LENGTH, MAX_BAD_WORD_SEQUENCES, MAX_BAD_WORD_TOKENS, MAX_BAD_WORDS,
    MAX_LOGIT_BIAS, MIN_P, PENALTY, POSITIVE, SEED, TEMPERATURE, TOP_K, TOP_P, Interval, StructuredOutput,
    check_bad_words, check_stop,
)

PolicyField = str | dict[str, Any] | None
POLICY_DOC = "layer policy: string form (e.g. 'skip:10') or JSON object; overrides a model-name suffix"


def _within(kind: type, interval: Interval) -> Any:
    """`kind` limited to `interval`: the OpenAPI schema shows the bounds, and an error names the whole range. The check
    also refuses NaN and inf (JSON bodies may carry them), so pydantic's `allow_inf_nan=False` is not needed, and would
    answer first with a message that omits the range."""
    return Annotated[kind, Field(json_schema_extra=interval.json_schema()),
                     AfterValidator(lambda v, info: interval.check(info.field_name, v))]


Temperature = _within(float, TEMPERATURE)
TopP = _within(float, TOP_P)
TopK = _within(int, TOP_K)
OpenAITopK = _within(int, Interval(-1, TOP_K.hi, integer=True))  # -1 = off, as in vLLM
Seed = _within(int, SEED)
Logprobs = _within(int, LOGPROBS)
N = _within(int, Interval(1, 16, integer=True))
Penalty = _within(float, PENALTY)
Positive = _within(float, POSITIVE)
MinP = _within(float, MIN_P)
Bias = _within(float, LOGIT_BIAS)
LengthPenalty = _within(float, Interval(-10, 10))  # bounded: length ** penalty stays a float for any context
BEAM_WIDTH = LOGPROBS.hi // 2  # each beam search step asks for 2 x width logprobs (vLLM's)

# Lists stop at their first bad item: every bad item was an error of its own, and a 1.6 MB body of them became an
# 85 MB message built in 17 s on the event loop (pydantic validates a whole list, and FastAPI expands every error).
FAIL_FAST = Field(fail_fast=True)
Texts = Annotated[list[str], FAIL_FAST]
TokenIds = Annotated[list[int], FAIL_FAST]


def _check_stop(v: str | list[str] | None) -> str | list[str] | None:
    if v is not None:
        check_stop([v] if isinstance(v, str) else v)
    return v


def _check_bad_words(v: list[str] | None) -> list[str] | None:
    check_bad_words(v or [])
    return v


def _calls_refused(calls: str, choice: str) -> Callable[[list[Any] | None, ValidationInfo], list[Any] | None]:
    """A validator refusing `calls` (completions' tools, chat's older functions) unless `choice` is "none"."""
    where = ("is not supported on /v1/completions (send tools to /v1/chat/completions)" if calls == "tools" else
             "(OpenAI's deprecated form of tools) is not supported; send tools and tool_choice instead")

    def check(v: list[Any] | None, info: ValidationInfo) -> list[Any] | None:
        if v and info.data.get(choice) != "none":
            raise ValueError(f"{calls} {where}, or leave {calls} out or send {choice} 'none'")
        return v
    return check


def _at_most_biases(v: Any) -> Any:
    """MAX_LOGIT_BIAS entries, counted before any is validated (a dict's bad values are each an error of their own;
    see FAIL_FAST)."""
    if isinstance(v, dict) and len(v) > MAX_LOGIT_BIAS:
        raise ValueError(f"at most {MAX_LOGIT_BIAS} entries (token id -> bias), got {len(v)}")
    return v


TOKEN_ID_KEY = "^[0-9]{1,10}$"  # a token id as a JSON object's key


def _token_id_keys(v: dict[str, float] | None) -> dict[str, float] | None:
    """logit_bias's keys are token ids written as JSON strings: decimal digits only (int() would also take " 5",
    "+5" and "5_0", and fail on more than 4,300 digits)."""
    for key in v or {}:
        if not re.fullmatch(TOKEN_ID_KEY, key):
            raise ValueError("keys must be token ids, decimal integers from 0 to the vocabulary size - 1; got "
                             f"{key[:24]!r}")
    return v


def _continue_or_open(v: bool, info: ValidationInfo) -> bool:
    """vLLM's continue_final_message, which only a prompt that opens no new message can take."""
    if v and info.data.get("add_generation_prompt", True):
        raise ValueError("continue_final_message needs add_generation_prompt=false (a prompt cannot both "
                         "continue the last message and open a new one)")
    return v


# vLLM's sampling extensions that Painters does not implement and that would change the answer, with the value that
# asks for nothing: each is a 400 naming it when sent otherwise, not an answer that silently ignored it (unknown
# fields are ignored, and these are what vLLM's clients send). Its structured outputs (guided_json, guided_regex,
# guided_choice, guided_grammar, structured_outputs) are served: `_Sampling.structured_output`; so is its beam search
# (use_beam_search, length_penalty: `server/api/beam_search.py`).
VLLM_REFUSED: dict[str, Any] = {
    "logits_processors": None,
}


# vLLM's chat extensions that would change the prompt, likewise: a request's own template (vLLM refuses it too unless
# started with --trust-request-chat-template), documents, and special tokens added on top of those the template
# writes. (chat_template_kwargs are served: `ChatCompletionRequest`.)
VLLM_CHAT_REFUSED: dict[str, Any] = {"chat_template": None, "documents": None, "add_special_tokens": False}


def _vllm(name: str) -> Any:
    """The declaration of a refused vLLM field (VLLM_REFUSED, VLLM_CHAT_REFUSED): its neutral value as the default,
    and the schema says so."""
    neutral = (VLLM_REFUSED | VLLM_CHAT_REFUSED)[name]
    return Field(neutral, description="vLLM's; not supported: refused "
                                      + ("when set" if neutral is None else f"unless {json.dumps(neutral)}"))


def _refused_unless_neutral(v: Any, info: ValidationInfo) -> Any:
    neutral = (VLLM_REFUSED | VLLM_CHAT_REFUSED)[info.field_name]
    if v is not None and v != neutral and not (neutral is None and v in ([], {}, "")):
        send = "" if neutral is None else f"send {json.dumps(neutral)} or "
        raise ValueError(f"{info.field_name} (vLLM's) is not supported here; {send}leave it out")
    return v


Priority = Annotated[int, Field(ge=-2**63, le=2**63 - 1)]
PRIORITY_DOC = ("vLLM's: where the server schedules by priority (--scheduling-policy priority), waiting requests "
                "of lower values are admitted first (then the oldest first); any value but 0 is a 400 where it "
                "schedules first come, first served (the default)")
CacheSalt = Annotated[str, Field(min_length=1)]
CACHE_SALT_DOC = ("vLLM's: the prompt's cached KV blocks are shared only with requests sending the same salt (a "
                  "tenant's prompts cannot be detected by others' cache hits); a non-empty string")


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = Field(False, description="vLLM's: with include_usage, every chunk also carries "
                                         "the usage so far (its choice's completion tokens)")

    def usage(self) -> tuple[bool, bool]:
        """(a usage chunk at the end, usage on every chunk): the second only with the first, as vLLM reads them."""
        return self.include_usage, self.include_usage and self.continuous_usage_stats


def _json_schema(v: dict[str, Any] | str | None) -> dict[str, Any] | None:
    """A JSON schema sent as an object or as JSON text (vLLM's guided_json takes both) -> the object."""
    return _json_object(v, what="a JSON schema sent as a string") if isinstance(v, str) else v


def _json_object(text: str, *, what: str) -> dict[str, Any]:
    """`text` parsed as JSON, which must be an object; else a ValueError saying so of `what`."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} must be JSON text ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


JsonSchema = Annotated[dict[str, Any] | str, AfterValidator(_json_schema)]
Choices = Annotated[list[str], FAIL_FAST, Field(max_length=1024)]


class _Body(BaseModel):
    """A request body in which an explicit null means the field's default where the field takes no null itself:
    OpenAI's API marks its optional fields nullable, and clients (and SDKs) send null for what they leave unset.
    (Where a field takes null, it means what it says: TGI's max_new_tokens null is the rest of the context.)
    Unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            fields = cls.model_fields
            return {k: v for k, v in data.items()
                    if v is not None or k not in fields or _takes_null(fields[k].annotation)}
        return data


def _takes_null(annotation: Any) -> bool:
    return annotation is Any or type(None) in get_args(annotation)


# -- structured outputs: OpenAI's response_format, vLLM's guided_* and structured_outputs ------------------------------


class JsonSchemaFormat(_Body):
    """OpenAI's response_format.json_schema."""

    name: str = ""
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema", description="the JSON schema the output is valid against")
    strict: bool | None = Field(None, description="accepted; the output always follows the schema strictly (no "
                                "property the schema does not name)")


class StructureFormat(_Body):
    """One structure of vLLM's older structural_tag response_format: JSON valid against `schema` between `begin`
    and `end`."""

    begin: str
    schema_: dict[str, Any] = Field(alias="schema", description="the JSON schema of what comes between begin and end")
    end: str


class ResponseFormat(_Body):
    """OpenAI's response_format: text, any JSON object, or JSON valid against a schema; and vLLM's structural_tag
    (xgrammar's structural tag: its `format`, or the older `structures` and `triggers`)."""

    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JsonSchemaFormat | None = None
    format: dict[str, Any] | None = Field(None, description="structural_tag: xgrammar's structural tag format")
    structures: list[StructureFormat] | None = Field(None, description="structural_tag (older form): each a begin, "
                                                     "a JSON schema and an end")
    triggers: list[str] | None = Field(None, description="structural_tag (older form): the text that begins a "
                                       "structure (a prefix of its begin)")

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs json_schema: {\"name\": ..., \"schema\": {...}}")
        if self.type == "structural_tag" and self.format is None and (self.structures is None or self.triggers is None):
            raise ValueError("type 'structural_tag' needs format: {\"type\": ...} (xgrammar's structural tag), or "
                             "structures: [{\"begin\": ..., \"schema\": {...}, \"end\": ...}] and triggers: [...]")
        return self

    def structural_tag(self) -> str:
        """The structural tag as JSON text, as vLLM hands it to xgrammar."""
        if self.format is not None:
            return json.dumps({"type": "structural_tag", "format": self.format})
        assert self.structures is not None and self.triggers is not None  # _schema_given
        return json.dumps({"type": "structural_tag", "triggers": self.triggers, "structures": [
            {"begin": s.begin, "schema": s.schema_, "end": s.end} for s in self.structures]})


STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
STRUCTURED_OPTIONS = ("disable_any_whitespace", "disable_fallback")
# vLLM's older per-request option string, "<backend>[:<option>,...]" (its GuidedDecodingParams' backend options)
GUIDED_BACKENDS = ("xgrammar", "auto")
GUIDED_BACKEND_OPTIONS = ("disable-any-whitespace", "no-fallback")


GRAMMAR_DOC = ("a grammar whose outputs are the whole output: EBNF (xgrammar's GBNF-like dialect; rule root) or, "
               "when no line defines a rule with '::=', Lark (rule start)")


def _guided_backend(v: str | None) -> str | None:
    """vLLM's guided_decoding_backend, "<backend>[:<option>,...]": the one backend here, and its known options."""
    if v is None:
        return v
    name, _, options = v.partition(":")
    if name.strip() not in GUIDED_BACKENDS:
        raise ValueError(f"this server's one structured-output backend is xgrammar; send {' or '.join(GUIDED_BACKENDS)}"
                         f" (with options, e.g. 'xgrammar:disable-any-whitespace'), or leave it out")
    unknown = sorted({o.strip() for o in options.split(",") if o.strip()} - set(GUIDED_BACKEND_OPTIONS))
    if unknown:
        raise ValueError(f"unknown option {', '.join(unknown)}; the options are {', '.join(GUIDED_BACKEND_OPTIONS)}")
    return v


class StructuredOutputs(_Body):
    """vLLM's structured_outputs (its StructuredOutputsParams): one kind, with the meaning of the guided_* fields."""

    json_: JsonSchema | None = Field(None, alias="json", description="a JSON schema, or its JSON text")
    regex: str | None = None
    choice: Choices | None = None
    grammar: str | None = Field(None, description=GRAMMAR_DOC)
    json_object: bool | None = Field(None, description="true: any JSON object")
    structural_tag: str | None = Field(None, description="xgrammar's structural tag as JSON text, as vLLM takes it "
                                      "(what response_format type structural_tag holds, type included)")
    disable_any_whitespace: bool = Field(False, description="true: JSON (json, json_object, or response_format's) "
                                         "with no whitespace between its tokens but xgrammar's separators ', ' and "
                                         "': '")
    disable_fallback: bool = Field(False, description="accepted: one backend (xgrammar), nothing to fall back to")

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(k for k in data if k not in (*STRUCTURED_KINDS, *STRUCTURED_OPTIONS))
            if unknown:
                raise ValueError(f"{', '.join(map(str, unknown))} {'is' if len(unknown) == 1 else 'are'} not "
                                 f"supported; structured_outputs takes one of {', '.join(STRUCTURED_KINDS)} (and "
                                 f"the options {', '.join(STRUCTURED_OPTIONS)})")
        return data

    def asked(self) -> list[StructuredOutput]:
        out = [_structured(kind, getattr(self, "json_" if kind == "json" else kind), f"structured_outputs.{kind}")
               for kind in STRUCTURED_KINDS]
        return [s for s in out if s is not None]


def _structured(kind: str, value: Any, param: str) -> StructuredOutput | None:
    """The structured output a field asks for; None when it asks for none (unset, or empty: vLLM's test)."""
    if not value:
        return None
    if kind == "json":
        return StructuredOutput("json", json.dumps(value), param=param)
    if kind == "json_object":
        return StructuredOutput("json_object", param=param)
    if kind == "structural_tag":
        _json_object(value, what=param)
    return StructuredOutput(kind, tuple(value) if kind == "choice" else value, param=param)  # type: ignore[arg-type]


class _Sampling(_Body):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: OpenAITopK = Field(0, description="0 or -1: off (vLLM extension)")
    seed: Seed | None = None
    stop: str | Texts | None = None
    n: N = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0, description="vLLM's: until this many tokens, the EOS may not be chosen (it is "
                            "masked) and stop strings do not match")
    policy: PolicyField = Field(None, description=POLICY_DOC)
    priority: Priority = Field(0, description=PRIORITY_DOC)
    cache_salt: CacheSalt | None = Field(None, description=CACHE_SALT_DOC)
    request_id: str | None = Field(None, description="vLLM's: the answer's id is cmpl-<request_id> (chatcmpl- on "
                                   "chat), unless an X-Request-Id header names it; at most 256 characters")
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, max_length=256, description="vLLM's: token ids that end the request (the token is kept)")
    presence_penalty: Penalty = Field(0.0, description="subtracted once from the logit of every token the output "
                                      "holds so far (the prompt's are not counted, as in vLLM)")
    frequency_penalty: Penalty = Field(0.0, description="subtracted from the logit of every token the output holds "
                                       "so far, once per occurrence")
    logit_bias: Annotated[dict[str, Bias], Field(json_schema_extra={
                              "propertyNames": {"pattern": TOKEN_ID_KEY}, "maxProperties": MAX_LOGIT_BIAS}),
                          BeforeValidator(_at_most_biases), AfterValidator(_token_id_keys)] | None = (
        Field(None, description=f"token id (a JSON string) -> added to that token's logit, in {LOGIT_BIAS}; at most "
              f"{MAX_LOGIT_BIAS} entries, ids within the vocabulary"))
    repetition_penalty: Positive = Field(1.0, description="vLLM's: a token seen in prompt or output has its "
                                                  "logit divided by this when positive, multiplied when not; 1: off")
    min_p: MinP = Field(0.0, description="vLLM's: when sampling, tokens less likely than min_p x the most likely "
                        "one (after temperature) are dropped; 0: off")
    allowed_token_ids: Annotated[list[Annotated[int, Field(ge=0)]], FAIL_FAST] | None = Field(
        None, min_length=1, description="vLLM's: only these token ids may be chosen (each within the vocabulary)")
    bad_words: Annotated[Texts, Field(max_length=MAX_BAD_WORDS)] | None = Field(
        None, description=f"vLLM's: words the output may not complete (a word's last token is never chosen where the "
        "output ends with its other tokens), as written and after a space; at most "
        f"{MAX_BAD_WORDS} words of 1-{MAX_BAD_WORD_LENGTH} characters, encoding to at most {MAX_BAD_WORD_SEQUENCES} "
        f"token sequences and {MAX_BAD_WORD_TOKENS} tokens")
    # vLLM's output shaping
    include_stop_str_in_output: bool = Field(False, description="vLLM's: a stop string (or stop token) that ends "
                                             "the request stays at the end of its text")
    skip_special_tokens: bool = Field(True, description="vLLM's: false keeps special tokens' text in the output")
    spaces_between_special_tokens: bool = Field(True, description="vLLM's: false joins added tokens without spaces "
                                                "(a slow tokenizer's option; fast tokenizers write none either way)")
    truncate_prompt_tokens: int | None = Field(None, ge=1, description="vLLM's: keep only the last k prompt tokens "
                                               "(at most the context length); usage counts what is kept")
    return_tokens_as_token_ids: bool = Field(False, description="vLLM's: logprobs name tokens 'token_id:<id>'")
    prompt_logprobs: Logprobs | None = Field(None, description="vLLM's: each prompt token's logprob and rank, with "
                                             "this many alternatives (not with stream=true)")
    # vLLM's beam search (server/api/beam_search.py)
    use_beam_search: bool = Field(False, description=f"vLLM's: n (the beam width, up to {BEAM_WIDTH}) beams, kept "
                                  "by cumulative logprob, ended at an EOS and ranked with length_penalty; answered "
                                  "whole (a stream carries the final result only)")
    length_penalty: LengthPenalty = Field(1.0, description="vLLM's, with use_beam_search: beams rank by cumulative "
                                          "logprob / length ** length_penalty, the length counting the prompt")
    # VLLM_REFUSED: each refused unless it asks for nothing
    logits_processors: Any = _vllm("logits_processors")
    # structured outputs, at most one per request: the output matches it, and the request ends where it does
    response_format: ResponseFormat | None = Field(None, description="OpenAI's: json_object (any JSON object) or "
                                                   "json_schema (JSON valid against json_schema.schema); vLLM's "
                                                   "structural_tag (format, or structures and triggers)")
    guided_json: JsonSchema | None = Field(None, description="vLLM's: JSON valid against this schema (or its text)")
    guided_regex: str | None = Field(None, description="vLLM's: text that fully matches this regular expression")
    guided_choice: Choices | None = Field(None, description="vLLM's: exactly one of these strings")
    guided_grammar: str | None = Field(None, description=f"vLLM's: {GRAMMAR_DOC}")
    structured_outputs: StructuredOutputs | None = Field(None, description="vLLM's newer form of the guided_* fields")
    guided_decoding_backend: Annotated[str | None, AfterValidator(_guided_backend)] = Field(
        None, description="vLLM's older per-request options: 'xgrammar' (or 'auto'), optionally with "
        "':disable-any-whitespace' (as structured_outputs.disable_any_whitespace) and 'no-fallback', comma-separated")
    _structured: StructuredOutput | None = PrivateAttr(None)
    # not supported: each refused when asked for, with a 400 naming it, rather than silently ignored
    best_of: int | None = None

    _stop_limits = field_validator("stop")(_check_stop)
    _bad_words_limits = field_validator("bad_words")(_check_bad_words)
    _vllm_refused = field_validator(*VLLM_REFUSED)(_refused_unless_neutral)

    @field_validator("length_penalty")
    @classmethod
    def _only_beams(cls, v: float, info: ValidationInfo) -> float:
        if v != 1.0 and not info.data.get("use_beam_search"):
            raise ValueError("only applies with use_beam_search=true; send use_beam_search true, or leave "
                             "length_penalty out")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, v: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n", 1)
        if v is not None and v != n:
            raise ValueError(f"best_of is not supported apart from best_of = n (here {n}); use n for several choices")
        return v

    @model_validator(mode="after")
    def _one_structured_output(self) -> _Sampling:
        asked = []
        form = self.response_format
        if form is not None and form.type == "json_object":
            asked.append(StructuredOutput("json_object", param="response_format"))
        elif form is not None and form.type == "structural_tag":
            asked.append(StructuredOutput("structural_tag", form.structural_tag(), param="response_format"))
        elif form is not None and form.type == "json_schema":
            assert form.json_schema is not None  # ResponseFormat's check
            # compiled even when empty: {} is the schema every JSON value is valid against
            asked.append(StructuredOutput("json", json.dumps(form.json_schema.schema_), param="response_format"))
        asked += [_structured(kind, getattr(self, f"guided_{kind}"), f"guided_{kind}")
                  for kind in ("json", "regex", "choice", "grammar")]
        if self.structured_outputs is not None:
            asked += self.structured_outputs.asked()
        asked = [s for s in asked if s is not None]
        if len(asked) > 1:
            raise ValueError(f"at most one structured output per request, got {' and '.join(s.param for s in asked)}; "
                             "send one")
        self._structured = asked[0] if asked else None
        if self._structured is not None and self._structured.kind in ("json", "json_object") and self._compact_json:
            self._structured = replace(self._structured, any_whitespace=False)
        return self

    @property
    def _compact_json(self) -> bool:
        """Whether JSON is asked for without whitespace: vLLM's per-request structured_outputs.disable_any_whitespace
        (its server-wide --structured-outputs-config.disable_any_whitespace, per request; it applies to whichever
        field asks for JSON, as vLLM merges response_format into structured_outputs), or its older
        guided_decoding_backend option string."""
        options = (self.guided_decoding_backend or "").partition(":")[2]
        return (self.structured_outputs is not None and self.structured_outputs.disable_any_whitespace) or (
            "disable-any-whitespace" in {o.strip() for o in options.split(",")})

    @property
    def structured_output(self) -> StructuredOutput | None:
        """What the output must match (response_format, guided_*, structured_outputs), if anything."""
        return self._structured

    @field_validator("stream_options")
    @classmethod
    def _only_streaming(cls, v: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if v is not None and not info.data.get("stream"):
            raise ValueError("only allowed with stream=true")
        return v

    @field_validator("prompt_logprobs")
    @classmethod
    def _not_streamed(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and info.data.get("stream"):
            raise ValueError("prompt_logprobs are not available with stream=true (as in vLLM); send stream=false or "
                             "leave prompt_logprobs out")
        return v

    @field_validator("min_tokens")
    @classmethod
    def _within_max_tokens(cls, v: int, info: ValidationInfo) -> int:
        cap = info.data.get("max_tokens")
        if cap is not None and v > cap:
            raise ValueError(f"must be at most max_tokens ({cap})")
        return v

    @property
    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(_Sampling):
    prompt: str | Texts | TokenIds | Annotated[list[TokenIds], FAIL_FAST]
    logprobs: Logprobs | None = None
    echo: bool = False
    suffix: str | None = Field(None, description="not supported (no fill-in-the-middle): refused when not empty")
    # tool calling is chat's (ChatCompletionRequest)
    tool_choice: Any = Field(None, description="chat's: not supported here (only 'none', with tools)")
    tools: list[Any] | None = Field(None, description="chat's (send them to /v1/chat/completions): refused here "
                                    "unless tool_choice is 'none'")

    _no_tools = field_validator("tools")(_calls_refused("tools", "tool_choice"))

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("suffix (fill-in-the-middle) is not supported; leave it out")
        return v

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be an empty list")
        return v


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | Annotated[list[dict[str, Any]], FAIL_FAST] | None = None
    name: str | None = None
    tool_calls: Annotated[list[SentToolCall], FAIL_FAST] | None = Field(
        None, description="an assistant message's calls (content may then be null)")
    tool_call_id: str | None = Field(None, description="a tool message's: the call it answers")

    def for_template(self) -> dict[str, Any]:
        """The message as the chat template reads it (vLLM's): content text ("" for null), an assistant's calls with
        their arguments as objects, a tool message's tool_call_id, a name. Raises ValueError for non-text content."""
        out: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.role == "assistant" and self.tool_calls is not None:
            out["tool_calls"] = [c.for_template() for c in self.tool_calls]
        if self.role == "tool" and self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise ValueError(f"only text content parts are supported, got {part.get('type')!r}")
            parts.append(str(part.get("text", "")))
        return "\n".join(parts)  # as vLLM joins text parts


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, fail_fast=True)
    logprobs: bool = False
    top_logprobs: Logprobs | None = None
    max_completion_tokens: int | None = Field(None, ge=0)
    # vLLM's extensions: end the prompt inside the last (assistant) message, to continue it
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    # OpenAI's tool calling (server/api/tools.py): the functions the model may call, and whether it must
    tools: Annotated[list[ChatTool], FAIL_FAST, AfterValidator(check_tools)] | None = Field(
        None, max_length=128, description="OpenAI's function tools; names unique, each matching " + FUNCTION_NAME)
    tool_choice: ToolChoice | None = Field(None, description='"none", "auto" (the default with tools; needs the '
                                           'server\'s --tool-call-parser), "required" or {"type": "function", '
                                           '"function": {"name": ...}}')
    parallel_tool_calls: bool | None = Field(None, description="false: only the first call is answered (vLLM's)")
    # OpenAI's deprecated form of tools: refused, pointing at tools
    function_call: Any = None
    functions: list[Any] | None = None
    echo: bool = Field(False, description="vLLM's chat echo; not supported: refused unless false (completions take "
                       "echo)")
    # VLLM_CHAT_REFUSED, each refused unless it asks for nothing: the model's own template renders the messages
    chat_template: Any = _vllm("chat_template")
    documents: Any = _vllm("documents")
    add_special_tokens: Any = _vllm("add_special_tokens")
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="vLLM's: variables for the model's chat template (e.g. enable_thinking); those it does not "
        "read are ignored, as in vLLM")

    _continues = field_validator("continue_final_message")(_continue_or_open)
    _vllm_chat_refused = field_validator(*VLLM_CHAT_REFUSED)(_refused_unless_neutral)

    _no_functions = field_validator("functions")(_calls_refused("functions", "function_call"))

    @field_validator("tool_choice")
    @classmethod
    def _choice_among_tools(cls, v: ToolChoice | None, info: ValidationInfo) -> ToolChoice | None:
        if "tools" in info.data:  # (tools that failed are an error of their own)
            check_choice(info.data["tools"], v)
        return v

    @model_validator(mode="after")
    def _one_constraint(self) -> ChatCompletionRequest:
        structured = self.structured_output
        check_one_constraint(self.tool_choice, structured=None if structured is None else structured.param)
        check_ends_at_call(self.tool_choice, ignore_eos=self.ignore_eos)
        return self

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported on chat completions; send false or leave it out (POST "
                             "/v1/completions takes echo)")
        return v

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("needs logprobs=true")
        return v

    @field_validator("max_completion_tokens")
    @classmethod
    def _at_least_min_tokens(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and v < info.data.get("min_tokens", 0):
            raise ValueError(f"must be at least min_tokens ({info.data['min_tokens']})")
        return v


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = Field(
        None, exclude_if=lambda v: v is None, description="where the server enables it (vLLM's "
        "--enable-prompt-tokens-details): the prompt tokens found in the prefix cache, on the final usage")


class Timings(BaseModel):
    """Seconds, as the client sees them (vLLM's definitions): decode and time per token count every wait between a
    request's tokens, another request's prefill included."""

    queue_s: float = Field(description="arrival -> its prefill began")
    prefill_s: float
    decode_s: float = Field(description="first token -> last token")
    time_to_first_token_s: float
    time_per_output_token_s: float = Field(description="decode_s / (tokens - 1): the mean inter-token latency")
    e2e_s: float = Field(description="arrival -> last token")


class PaintersInfo(BaseModel):
    """The `painters` extension object on every response: which policy ran and how long each phase took. A streamed
    chunk before the last carries the timings so far (time to first token, decode time and time per token up to it)."""

    policy: str
    schedule: str
    timings: Timings | None = None


class TGIGrammar(BaseModel):
    """TGI's `grammar` parameter: output valid against a JSON schema (`value` the schema, or its JSON text) or fully
    matching a regular expression (`value` the expression)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["json", "regex"]
    value: dict[str, Any] | str

    @model_validator(mode="after")
    def _value_fits_type(self) -> TGIGrammar:
        if self.type == "regex" and not isinstance(self.value, str):
            raise ValueError("a regex grammar's value is the regular expression, a string")
        if self.type == "json" and isinstance(self.value, str):
            try:
                schema = json.loads(self.value)
            except json.JSONDecodeError as e:
                raise ValueError(f"a json grammar's value is a JSON schema, an object or its JSON text: {e}") from None
            if not isinstance(schema, dict):
                raise ValueError("a json grammar's value is a JSON schema, an object or its JSON text")
            self.value = schema
        return self

    @property
    def structured_output(self) -> StructuredOutput:
        if self.type == "json":
            return StructuredOutput("json", json.dumps(self.value), param="grammar")
        assert isinstance(self.value, str)
        return StructuredOutput("regex", self.value, param="grammar")


TGI_NEUTRAL: dict[str, Any] = {"best_of": 1}


class GenerateParameters(_Body):
    max_new_tokens: int | None = Field(20, ge=0)
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    do_sample: bool = False
    seed: Seed | None = None
    stop: list[str] = Field(default_factory=list, fail_fast=True)
    details: bool = False
    decoder_input_details: bool = False
    top_n_tokens: Logprobs | None = None
    return_full_text: bool = False
    ignore_eos: bool = False
    policy: PolicyField = Field(None, description=POLICY_DOC)
    repetition_penalty: Positive | None = Field(None, description="TGI's: a token seen in prompt or output has its "
                                                "logit divided by this when positive, multiplied when not; 1: off")
    frequency_penalty: Penalty | None = Field(None, description="TGI's: subtracted from each token's logit, times "
                                              "the share of prompt and output so far that is that token")
    grammar: TGIGrammar | None = Field(None, description="TGI's: {\"type\": \"json\", \"value\": <JSON schema>} or "
                                       "{\"type\": \"regex\", \"value\": <regular expression>}, compiled by xgrammar")
    # TGI's parameters this server cannot honour: refused (422) when set to anything but their neutral value
    # (TGI_NEUTRAL; best_of's is /info's max_best_of)
    typical_p: float | None = Field(None, gt=0, le=1, description="TGI's typical decoding: sample among the tokens "
                                    "whose surprise is closest to the entropy, until they hold this much of the "
                                    "probability (1: off)")
    best_of: int | None = None
    watermark: bool = False
    adapter_id: str | None = None
    truncate: int | None = Field(None, ge=1, description="TGI's: keep only the input's last this many tokens (1 "
                                 "to the context length)")

    _stop_limits = field_validator("stop")(_check_stop)

    @field_validator("best_of", "watermark", "adapter_id")
    @classmethod
    def _neutral(cls, v: Any, info: ValidationInfo) -> Any:
        if v is not None and v is not False and v != TGI_NEUTRAL.get(info.field_name or "", object()):
            raise ValueError(f"{info.field_name} is not supported; leave it out")
        return v


class GenerateRequest(_Body):
    inputs: str = Field(min_length=1)
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    model: str | None = None
    stream: bool = False


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, fail_fast=True)
    add_special_tokens: bool = Field(True, description="prompt: add the special tokens the tokenizer adds by default, "
                                     "as completions do; messages never get them (their chat template writes them)")
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # as chat's
    chat_template_kwargs: dict[str, Any] | None = None  # as chat's
    tools: Annotated[list[ChatTool], FAIL_FAST, AfterValidator(check_tools)] | None = Field(
        None, max_length=128, description="messages: the tools the chat template describes, as chat's (vLLM's "
        "tokenize takes them), so the count is the chat's prompt_tokens")
    return_token_strs: bool = Field(False, description="vLLM's: also answer token_strs, each token as the "
                                    "vocabulary spells it")

    _continues = field_validator("continue_final_message")(_continue_or_open)


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: TokenIds


class ProbeRequest(BaseModel):
    """POST /v1/probe: one forward pass of `prompts` under `policy`; layer statistics instead of tokens."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompts: list[str | TokenIds] = Field(min_length=1, fail_fast=True, description="texts or token ids (bounded by "
                                          "the server's probe_max_prompts and probe_max_tokens settings)")
    policy: PolicyField = Field(None, description=POLICY_DOC)


class ProbeResponse(BaseModel):
    object: Literal["probe"] = "probe"
    model: str
    policy: str = Field(description="canonical policy that ran")
    schedule: str = Field(description="canonical schedule key")
    steps: list[str] = Field(description="one label per executed step: a layer '7' or a group '4+5/pairs'")
    num_sequences: int
    num_tokens: int
    similarity: list[list[float]] = Field(
        description="(S+1)x(S+1) cosine similarity between the states entering steps i and j (the last is the "
        "final output), each sequence's states flattened over positions, averaged over sequences")
    block_influence: list[float] = Field(
        description="per step: 1 - mean over tokens of cos(x_i, x_{i+1}) (ShortGPT's block influence)")
    angular_distance: list[list[float]] = Field(
        description="row n-1, n = 1..S//2: arccos(cos(x_i, x_{i+n}))/pi on the last token, averaged over sequences")


class EmbeddingRequest(_Body):
    """POST /v1/embeddings (OpenAI's; vLLM's EmbeddingCompletionRequest): one vector per input, from one forward pass
    under `policy`."""

    model: str | None = None
    input: str | Texts | TokenIds | Annotated[list[TokenIds], FAIL_FAST] = Field(
        description="a text, texts, token ids or lists of token ids (bounded by the server's probe_max_prompts and "
        "probe_max_tokens settings)")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="'float': lists of numbers; 'base64': each vector's little-endian float32 bytes")
    dimensions: int | None = Field(None, description="only the model's hidden size (vLLM refuses other sizes for a "
                                   "model without matryoshka training)")
    user: str | None = None
    truncate_prompt_tokens: int | None = Field(None, description="vLLM's: keep only the last k tokens of each input "
                                               "(1 to the context length); -1: the context length")
    add_special_tokens: bool = Field(True, description="vLLM's: texts get the special tokens their tokenizer adds by "
                                     "default (Gemma's <bos>; none for SmolLM2); false: only their own tokens")
    policy: PolicyField = Field(None, description=POLICY_DOC)
    priority: Priority = Field(0, description=PRIORITY_DOC)

    @field_validator("input")
    @classmethod
    def _non_empty(cls, v: Any) -> Any:
        # OpenAI refuses an empty input (vLLM would embed the BOS token alone); a 400 naming what is allowed
        if v == "" or v == [] or (isinstance(v, list) and any(x == "" or x == [] for x in v)):
            raise ValueError("input must be a non-empty text, a non-empty list of non-empty texts, or token ids")
        return v


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int = Field(description="the input's position in `input`")
    embedding: list[float] | str = Field(description="floats, or base64 of little-endian float32 (encoding_format)")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


# -- responses ---------------------------------------------------------------------------------------------------------
# Logprobs are `float | None`: a token the model gives probability 0 has logprob -inf, which JSON cannot carry; it is
# sent as null.


def _absent_when_none(v: Any) -> bool:
    return v is None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every 4xx and 5xx answer, in OpenAI's shape."""

    error: ErrorDetail


class TGIErrorResponse(BaseModel):
    """Every 4xx and 5xx answer of TGI's routes (/generate, /generate_stream), in TGI's shape."""

    error: str
    error_type: str = Field(description="validation, generation, overloaded, incomplete_generation, authentication, "
                                        "cancelled or unavailable")


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float | None] | None] | None = None
    text_offset: list[int]


class PromptLogprob(BaseModel):
    """vLLM's `Logprob`, one entry of a prompt position's `prompt_logprobs`."""

    logprob: float | None
    rank: int | None = Field(description="1 + how many tokens were likelier at that position")
    decoded_token: str | None = None


# vLLM's prompt_logprobs: per prompt token, null for the first (nothing predicts it), then token id -> its Logprob,
# the prompt's own token first, then the likeliest alternatives
PromptLogprobs = list[dict[int, PromptLogprob] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    prompt_logprobs: PromptLogprobs | None = Field(None, exclude_if=_absent_when_none)


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    painters: PaintersInfo | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = Field(None, exclude_if=_absent_when_none)


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float | None
    bytes: list[int]


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    painters: PaintersInfo
    prompt_logprobs: PromptLogprobs | None = Field(None, exclude_if=_absent_when_none)  # vLLM's, as on completions


class ChatDelta(BaseModel):
    """What a chunk adds; an unset field is left out of the frame (OpenAI's deltas)."""

    role: Literal["assistant"] | None = Field(None, exclude_if=_absent_when_none)
    content: str | None = Field(None, exclude_if=_absent_when_none)
    tool_calls: list[DeltaToolCall] | None = Field(None, exclude_if=_absent_when_none)


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    """One `data:` frame of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None
    painters: PaintersInfo | None = None


class TokenInfo(BaseModel):
    id: int
    text: str
    logprob: float | None = None
    special: bool


class StreamDetails(BaseModel):
    finish_reason: str
    generated_tokens: int
    seed: int | None = None


class GenerateDetails(StreamDetails):
    tokens: list[TokenInfo]
    prefill: list[TokenInfo]
    top_tokens: list[list[TokenInfo]] | None = None


class GenerateResponse(BaseModel):
    generated_text: str
    details: GenerateDetails | None = None
    painters: PaintersInfo


class GenerateStreamEvent(BaseModel):
    """One `data:` frame of /generate_stream: a token, and on the last one the whole text and details."""

    index: int
    token: TokenInfo | None
    top_tokens: list[TokenInfo] | None = None
    generated_text: str | None = None
    details: StreamDetails | None = None
    painters: PaintersInfo | None = None


class ModelPermission(BaseModel):
    """vLLM's model permission, with vLLM's values: a client may sample, read logprobs and view the model."""

    id: str
    object: Literal["model_permission"] = "model_permission"
    created: int
    allow_create_engine: bool = False
    allow_sampling: bool = True
    allow_logprobs: bool = True
    allow_search_indices: bool = False
    allow_view: bool = True
    allow_fine_tuning: bool = False
    organization: str = "*"
    group: str | None = None
    is_blocking: bool = False


class ModelCard(BaseModel):
    """OpenAI's model object with vLLM's fields (max_model_len, root: the weights' path, parent: the base model of a
    derived name, permission) and the policy the name runs."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "painters"
    policy: str = Field(description="the policy this name runs when the request names none")
    max_model_len: int | None = None
    root: str | None = None
    parent: str | None = None
    permission: list[ModelPermission] = Field(default_factory=list)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TGIInfo(BaseModel):
    """TGI's GET /info (its router's `Info`, router/src/lib.rs, as of TGI 3: model_dtype and model_device_type left it
    in 2.3), filled with the limits this server enforces."""

    model_id: str = Field(description="the served model name, as /v1/models lists it")
    model_sha: str | None = Field(description="the weights' revision: null, this server loads files, not hub revisions")
    model_pipeline_tag: str | None
    max_concurrent_requests: int = Field(description="sequences held at once before a 429: max_num_seqs decoding "
                                         "plus queue_capacity waiting")
    max_best_of: int = Field(description="TGI's best_of: 1, the only value /generate takes")
    max_stop_sequences: int = Field(description="stop strings per request")
    max_input_tokens: int = Field(description="prompt tokens per request (max_model_len)")
    max_total_tokens: int = Field(description="prompt + generated tokens per request (max_model_len)")
    validation_workers: int = Field(description="threads that tokenize and check requests")
    max_client_batch_size: int = Field(description="prompts in one generation request (times n, on completions): "
                                       "queue_capacity; /v1/embeddings and /v1/probe take at most "
                                       "probe_max_prompts inputs")
    router: str = Field(description="the server: painters")
    version: str
    sha: str | None
    docker_label: str | None


class VersionInfo(BaseModel):
    """vLLM's GET /version."""

    version: str


class PolicyKind(BaseModel):
    kind: str
    syntax: str


class PoliciesInfo(BaseModel):
    kinds: list[PolicyKind]
    num_layers: int | None
    layer_range: str | None
    default_range: str | None
    default_policy: str
    presets: dict[str, str]
    allowed_policies: list[str] | None
    examples: list[str]
    max_policy_chars: int
    max_schedule_steps: int


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int
    token_strs: list[str] | None = Field(None, exclude_if=lambda v: v is None,
                                         description="with return_token_strs: each token as the vocabulary spells it")


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    tokenizer_class: str
    eos_token: str | None = None
    eos_token_id: int | None = None
    bos_token: str | None = None
    bos_token_id: int | None = None
    pad_token: str | None = None
    pad_token_id: int | None = None
    chat_template: str | None = None
    model_max_length: int
    vocab_size: int


class HealthStatus(BaseModel):
    status: str = Field(description="'ok', or why the process should be restarted")


class ReadyStatus(BaseModel):
    status: str = Field(description="'ready', 'loading', 'draining' or 'failed: ...'")
    model: str | None = None
