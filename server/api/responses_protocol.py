"""OpenAI's Responses API bodies (POST /v1/responses), as vLLM serves them (vllm/entrypoints/openai/responses/
protocol.py): the request, which is a chat conversation in other words (`ResponsesRequest.chat_request`), the
response object, its output items, and the server-sent events a stream is made of. The shapes are openai-python's
(src/openai/types/responses/); what this server cannot do is refused with a 400 naming what is allowed."""

from __future__ import annotations

import copy
import json
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator, BaseModel, BeforeValidator, Discriminator, Field, Tag, field_validator, model_validator,
)

from server.api.protocol import (
    CACHE_SALT_DOC, FAIL_FAST, POLICY_DOC, PRIORITY_DOC, CacheSalt, ChatCompletionRequest, Logprobs, OpenAITopK,
    PaintersInfo, PolicyField, Positive, Priority, Seed, Temperature, Texts, TopP, _Body, _check_stop,
)
from server.api.tools import FunctionDefinition, _function_name

# -- the request -------------------------------------------------------------------------------------------------------

ITEM_TYPES = ("message", "function_call", "function_call_output")
PART_TYPES = ("input_text", "output_text")
TOOL_CHOICES = '"none", "auto", "required" or {"type": "function", "name": ...}'
METADATA_KEYS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512  # OpenAI's limits


class TextPart(_Body):
    """A text part of a message's content: the user's (`input_text`) or an earlier answer's (`output_text`)."""

    type: Literal["input_text", "output_text"]
    text: str


def _text_or(kind: Any, *, tag: str) -> Any:
    """Text, or `kind` (a list): an error names only the form that was sent, not both."""
    return Annotated[Annotated[str, Tag("text")] | Annotated[kind, Tag(tag)],
                     Discriminator(lambda v: "text" if isinstance(v, str) else tag)]


Content = _text_or(Annotated[list[TextPart], FAIL_FAST], tag="parts")


def _text(content: Content) -> str | list[dict[str, str]]:
    """Content as chat's messages hold it: the text, or its parts as chat's text parts (joined as chat joins them)."""
    return content if isinstance(content, str) else [{"type": "text", "text": p.text} for p in content]


class MessageItem(_Body):
    """A message of the conversation (OpenAI's EasyInputMessage, Message, or an earlier output message)."""

    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: Content


class FunctionCallItem(_Body):
    """An earlier answer's call to a function (an output `function_call` item, sent back)."""

    type: Literal["function_call"]
    call_id: str
    name: Annotated[str, AfterValidator(_function_name)]
    arguments: str = Field(description="the arguments as JSON text")

    @field_validator("arguments")
    @classmethod
    def _json(cls, v: str) -> str:
        if v:
            try:
                json.loads(v)
            except json.JSONDecodeError as e:
                raise ValueError(f"must be JSON text (the call's arguments), got {v[:40]!r}: {e}") from None
        return v


class FunctionCallOutputItem(_Body):
    """What a function call returned, for the call `call_id`."""

    type: Literal["function_call_output"]
    call_id: str
    output: Content


Item = MessageItem | FunctionCallItem | FunctionCallOutputItem
InputItem = Annotated[Item, Field(discriminator="type")]


def chat_messages(items: list[Item], *, after: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`after` (an earlier conversation, left as it is) and then `items` as chat messages (vLLM's
    construct_input_messages): a function_call joins the assistant message before it (or opens one), a
    function_call_output is a tool message."""
    out = copy.deepcopy(after)
    for item in items:
        if isinstance(item, MessageItem):
            out.append({"role": item.role, "content": _text(item.content)})
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": _text(item.output)})
    return out


def _typed_items(v: Any) -> Any:
    """A message item may leave out its type (OpenAI's EasyInputMessage): it is a message when it has a role. An item
    whose type is not served is refused naming those that are (the discriminator's own error names them too, but not
    why)."""
    if not isinstance(v, list):
        return v
    out = []
    for i, item in enumerate(v):
        if isinstance(item, dict):
            if "type" not in item and "role" in item:
                item = {**item, "type": "message"}
            elif item.get("type") not in ITEM_TYPES:
                raise ValueError(f"item {i} has type {str(item.get('type'))[:40]!r}, which is not supported; items are "
                                 f"{', '.join(ITEM_TYPES)} (item_reference, reasoning, images and built-in tools' "
                                 "items are not served)")
        out.append(item)
    return out


class FunctionTool(_Body, FunctionDefinition):
    """Responses' function tool: chat's function definition (name, description, parameters, strict) at the top
    level, beside its type (chat nests it in `function`)."""

    type: Literal["function"]


def _function_tools(v: Any) -> Any:
    if isinstance(v, list):
        for i, tool in enumerate(v):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind != "function":
                raise ValueError(f"tool {i} has type {str(kind)[:40]!r}; only function tools are served "
                                 '({"type": "function", "name": ..., "parameters": {...}}): built-in tools '
                                 "(web_search, file_search, code_interpreter, mcp, ...) are not")
    return v


class FunctionChoice(_Body):
    type: Literal["function"]
    name: str


def _served_choice(v: Any) -> Any:
    if isinstance(v, dict) and v.get("type") != "function":
        raise ValueError(f"tool_choice of type {str(v.get('type'))[:40]!r} is not supported; send {TOOL_CHOICES}")
    return v


def _absent(v: Any) -> bool:
    return v is None


class TextFormat(_Body):
    """text.format: plain text, any JSON object, or JSON valid against `schema` (Responses' flat json_schema)."""

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, exclude_if=_absent)
    description: str | None = Field(None, exclude_if=_absent)
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="json_schema: the JSON schema",
                                           exclude_if=_absent)
    strict: bool | None = Field(None, exclude_if=_absent)

    @model_validator(mode="after")
    def _schema_given(self) -> TextFormat:
        if self.type == "json_schema" and self.schema_ is None:
            raise ValueError('type "json_schema" needs schema: {"type": "json_schema", "name": ..., "schema": {...}}')
        return self


class TextConfig(_Body):
    format: TextFormat = Field(default_factory=lambda: TextFormat(type="text"))
    verbosity: Literal["medium"] | None = Field(None, exclude_if=_absent, description="only medium (the default): "
                                                "a verbosity of its own is not served")


def _metadata(v: dict[str, str] | None) -> dict[str, str] | None:
    if v is not None:
        if len(v) > METADATA_KEYS:
            raise ValueError(f"at most {METADATA_KEYS} keys, got {len(v)}")
        for key, value in v.items():
            if len(key) > METADATA_KEY_CHARS or len(value) > METADATA_VALUE_CHARS:
                raise ValueError(f"keys are at most {METADATA_KEY_CHARS} characters and values at most "
                                 f"{METADATA_VALUE_CHARS} (OpenAI's limits); {key[:40]!r} is longer")
    return v


LOGPROBS = "message.output_text.logprobs"  # the one `include` value that applies here


def _served_includes(v: list[str]) -> list[str]:
    for value in v:
        if value != LOGPROBS:
            raise ValueError(f"{value[:60]!r} does not apply here (no reasoning, no built-in tools, no images or "
                             f"files); the one value served is {LOGPROBS!r}")
    return v


def _nothing(what: str) -> Any:
    """A validator refusing what this server does not serve, unless sent at a value that asks for nothing (false,
    empty, or an object of nulls: clients send {"effort": null} for no reasoning)."""
    def check(v: Any) -> Any:
        if isinstance(v, dict) and all(x is None for x in v.values()):
            return v
        if v not in (None, False, [], {}, ""):
            raise ValueError(f"{what} is not supported here; leave it out")
        return v
    return AfterValidator(check)


class ResponsesRequest(_Body):
    """POST /v1/responses. OpenAI's fields that apply to a chat model without built-in tools; vLLM's sampling
    extensions that the chat path takes as they are; Painters' policy."""

    model: str | None = None
    input: _text_or(Annotated[list[InputItem], FAIL_FAST, BeforeValidator(_typed_items), Field(min_length=1)],
                    tag="items") = Field(
        description="the user's text, or the conversation: messages (roles user, system, developer, assistant; content "
                    "text or input_text/output_text parts), function_call and function_call_output items")
    instructions: str | None = Field(None, description="a system message put first")
    max_output_tokens: int | None = Field(None, ge=1, description="at most this many tokens (default: the rest of the "
                                          "context); an answer cut by it is status incomplete")
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    stream: bool = False
    metadata: Annotated[dict[str, str] | None, AfterValidator(_metadata)] = None
    user: str | None = None
    text: TextConfig = Field(default_factory=TextConfig)
    tools: Annotated[list[FunctionTool], FAIL_FAST, BeforeValidator(_function_tools)] = Field(
        default_factory=list, max_length=128)
    tool_choice: Annotated[Literal["none", "auto", "required"] | FunctionChoice,
                           BeforeValidator(_served_choice)] | None = Field(None, description=TOOL_CHOICES)
    parallel_tool_calls: bool = True
    store: bool = Field(True, description="keep the response for previous_response_id and GET /v1/responses/{id}, "
                        "where the server keeps responses (PAINTERS_RESPONSES_STORE; off by default, as vLLM's: then "
                        "ignored)")
    background: bool = Field(False, description="answer at once (status queued) and run on: poll GET "
                             "/v1/responses/{id}, or POST /v1/responses/{id}/cancel; needs store and the server's "
                             "store (PAINTERS_RESPONSES_STORE). With stream, the events stream as they come, and GET "
                             "/v1/responses/{id}?stream=true&starting_after=N streams them again")
    truncation: Literal["disabled"] | None = Field(None, description="only disabled: a conversation too long for the "
                                                   "context is a 400")
    max_tool_calls: int | None = Field(None, ge=1, description="limits built-in tools' calls, of which there are none")
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    policy: PolicyField = Field(None, description=POLICY_DOC)
    # vLLM's extensions of ResponsesRequest, which the chat path takes as they are
    top_k: OpenAITopK = Field(0, description="vLLM's: 0 or -1: off")
    priority: Priority = Field(0, description=PRIORITY_DOC)
    cache_salt: CacheSalt | None = Field(None, description=CACHE_SALT_DOC)
    seed: Seed | None = None
    stop: str | Texts | None = None
    ignore_eos: bool = False
    repetition_penalty: Positive = 1.0
    logit_bias: dict[str, float] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_outputs: dict[str, Any] | None = Field(None, description="vLLM's, as on chat (not beside text.format)")
    previous_response_id: str | None = Field(None, description="continue a stored response's conversation (needs "
                                             "the server's store: PAINTERS_RESPONSES_STORE); its instructions do not "
                                             "carry over")
    # not served: refused unless they ask for nothing
    conversation: Annotated[Any, _nothing("conversation")] = None
    reasoning: Annotated[Any, _nothing("reasoning (this model does not reason)")] = None
    include: Annotated[list[str], FAIL_FAST, AfterValidator(_served_includes)] | None = Field(
        None, description=f"only {LOGPROBS!r}: each output token's logprob (and top_logprobs alternatives)")
    top_logprobs: Logprobs | None = Field(None, description=f"with include {LOGPROBS!r}: this many alternatives "
                                          "per token")
    prompt: Annotated[Any, _nothing("prompt (stored prompt templates)")] = None

    _stop_limits = field_validator("stop")(_check_stop)

    @model_validator(mode="after")
    def _format_or_structured(self) -> ResponsesRequest:
        if self.structured_outputs and self.text.format.type != "text":
            raise ValueError("text.format and structured_outputs both constrain the output; send one")
        if self.top_logprobs and not self.logprobs:
            raise ValueError(f"top_logprobs needs include [{LOGPROBS!r}] (the logprobs it adds alternatives to)")
        if self.logprobs and self.tools and self.tool_choice != "none":
            raise ValueError(f"include {LOGPROBS!r} is served on text answers: not with tools (unless tool_choice "
                             "is 'none')")
        return self

    @property
    def logprobs(self) -> bool:
        return LOGPROBS in (self.include or ())

    def items(self) -> list[Item]:
        return [MessageItem(role="user", content=self.input)] if isinstance(self.input, str) else list(self.input)

    def chat_request(self, conversation: list[dict[str, Any]]) -> ChatCompletionRequest:
        """The same request as a chat completion of `conversation` (`chat_messages`; the instructions go first, as a
        system message): what runs. Raises pydantic's ValidationError where the chat path refuses a value."""
        form = self.text.format
        instructions = [{"role": "system", "content": self.instructions}] if self.instructions else []
        body: dict[str, Any] = {
            "model": self.model, "messages": instructions + conversation,
            "max_completion_tokens": self.max_output_tokens, "temperature": self.temperature, "top_p": self.top_p,
            "top_k": self.top_k, "seed": self.seed,
            "stop": self.stop, "ignore_eos": self.ignore_eos, "repetition_penalty": self.repetition_penalty,
            "logit_bias": self.logit_bias, "skip_special_tokens": self.skip_special_tokens,
            "include_stop_str_in_output": self.include_stop_str_in_output,
            "structured_outputs": self.structured_outputs, "policy": self.policy, "stream": self.stream,
            "parallel_tool_calls": self.parallel_tool_calls, "priority": self.priority, "cache_salt": self.cache_salt,
        }
        if self.logprobs:
            body.update(logprobs=True, top_logprobs=self.top_logprobs or 0)
        if form.type == "json_object":
            body["response_format"] = {"type": "json_object"}
        elif form.type == "json_schema":
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": form.name or "", "schema": form.schema_, "strict": form.strict}}
        if self.tools:
            body["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, by_alias=True)}
                             for t in self.tools]
        choice = self.tool_choice
        if isinstance(choice, FunctionChoice):
            body["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
        elif choice is not None:
            body["tool_choice"] = choice
        return ChatCompletionRequest.model_validate(body)


# -- the response ------------------------------------------------------------------------------------------------------


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


ItemStatus = Literal["in_progress", "completed", "incomplete"]


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: ItemStatus
    content: list[OutputText]


class OutputFunctionCall(BaseModel):
    id: str
    type: Literal["function_call"] = "function_call"
    call_id: str = Field(description="the id a function_call_output item answers")
    name: str
    arguments: str = Field(description="the arguments as JSON text")
    status: ItemStatus


OutputItem = Annotated[OutputMessage | OutputFunctionCall, Field(discriminator="type")]


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


Status = Literal["completed", "incomplete", "in_progress", "cancelled", "failed", "queued"]
LIVE: tuple[Status, ...] = ("queued", "in_progress")  # a background response still running: cancellable


class ResponseError(BaseModel):
    """Why a response failed (OpenAI's ResponseError)."""

    code: str
    message: str


class ResponseObject(BaseModel):
    """The response (OpenAI's `Response`): the output items, and the request's settings echoed."""

    id: str = Field(description="resp_...")
    object: Literal["response"] = "response"
    created_at: int
    completed_at: int | None = None
    status: Status
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    background: bool = Field(False, description="run on after the answer (POST with background: true)")
    instructions: str | None
    max_output_tokens: int | None
    max_tool_calls: int | None
    metadata: dict[str, str]
    model: str
    output: list[OutputItem]
    parallel_tool_calls: bool
    previous_response_id: str | None
    reasoning: None = None
    store: bool = Field(False, description="whether the server kept it (for previous_response_id and GET)")
    temperature: float
    text: TextConfig
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice
    tools: list[FunctionTool]
    top_logprobs: int = 0
    top_p: float
    truncation: Literal["disabled"] = "disabled"
    usage: ResponseUsage | None = None
    user: str | None
    painters: PaintersInfo | None = None


def as_items(output: list[OutputMessage | OutputFunctionCall]) -> list[Item]:
    """Output items as the input items that would send them back (a next turn's history)."""
    return [MessageItem(role="assistant", content=[TextPart(type="output_text", text=p.text) for p in i.content])
            if isinstance(i, OutputMessage) else FunctionCallItem(type="function_call", call_id=i.call_id,
                                                                  name=i.name, arguments=i.arguments)
            for i in output]


# -- input items: what GET /v1/responses/{id}/input_items lists ------------------------------------------------------


class InputText(BaseModel):
    type: Literal["input_text"] = "input_text"
    text: str


class InputMessage(BaseModel):
    """A message sent as input (OpenAI's ResponseInputMessageItem); an assistant one is listed as an output message."""

    id: str
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer"]
    status: Literal["completed"] = "completed"
    content: list[InputText]


class FunctionCallOutput(BaseModel):
    """A function's result sent as input (OpenAI's ResponseFunctionToolCallOutputItem)."""

    id: str
    type: Literal["function_call_output"] = "function_call_output"
    call_id: str
    output: str | list[InputText]
    status: Literal["completed"] = "completed"


ListedItem = InputMessage | OutputMessage | OutputFunctionCall | FunctionCallOutput
INCLUDABLE = ("file_search_call.results", "web_search_call.results", "web_search_call.action.sources",
              "message.input_image.image_url", "computer_call_output.output.image_url", "code_interpreter_call.outputs",
              "reasoning.encrypted_content", LOGPROBS)  # OpenAI's ResponseIncludable


def listed_items(items: list[Item], *, new_id: Any) -> list[ListedItem]:
    """Input items as OpenAI lists them, each given an id by `new_id(prefix)`: text content as input_text parts, an
    assistant message as an output message."""
    def parts(content: Content) -> list[InputText]:
        return [InputText(text=content)] if isinstance(content, str) else [InputText(text=p.text) for p in content]

    out: list[ListedItem] = []
    for item in items:
        if isinstance(item, MessageItem) and item.role == "assistant":
            out.append(OutputMessage(id=new_id("msg"), status="completed",
                                     content=[OutputText(text=p.text) for p in parts(item.content)]))
        elif isinstance(item, MessageItem):
            out.append(InputMessage(id=new_id("msg"), role=item.role, content=parts(item.content)))
        elif isinstance(item, FunctionCallItem):
            out.append(OutputFunctionCall(id=new_id("fc"), call_id=item.call_id, name=item.name,
                                          arguments=item.arguments, status="completed"))
        else:
            out.append(FunctionCallOutput(id=new_id("fco"), call_id=item.call_id, output=item.output
                                          if isinstance(item.output, str) else parts(item.output)))
    return out


class InputItemList(BaseModel):
    """GET /v1/responses/{id}/input_items: a page of the items the response was answered from (OpenAI's
    ResponseItemList)."""

    object: Literal["list"] = "list"
    data: list[ListedItem]
    first_id: str | None
    last_id: str | None
    has_more: bool


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: bool = True


# -- stream events: each `data:` frame of a streamed response, its `event:` its type ----------------------------------


class _Event(BaseModel):
    sequence_number: int = 0


class LifecycleEvent(_Event):
    type: Literal["response.created", "response.in_progress", "response.completed", "response.incomplete",
                  "response.failed"]
    response: ResponseObject


class OutputItemEvent(_Event):
    type: Literal["response.output_item.added", "response.output_item.done"]
    output_index: int
    item: OutputItem


class ContentPartEvent(_Event):
    type: Literal["response.content_part.added", "response.content_part.done"]
    item_id: str
    output_index: int
    content_index: int = 0
    part: OutputText


class _TextEvent(_Event):
    """Where in the output a text event belongs, and the logprobs of its tokens."""

    item_id: str
    output_index: int
    content_index: int = 0
    logprobs: list[Any] = Field(default_factory=list)


class TextDeltaEvent(_TextEvent):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    delta: str


class TextDoneEvent(_TextEvent):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    text: str


class ArgumentsDeltaEvent(_Event):
    type: Literal["response.function_call_arguments.delta"] = "response.function_call_arguments.delta"
    item_id: str
    output_index: int
    delta: str


class ArgumentsDoneEvent(_Event):
    type: Literal["response.function_call_arguments.done"] = "response.function_call_arguments.done"
    item_id: str
    output_index: int
    name: str
    arguments: str


class ErrorEvent(_Event):
    """A failure after the stream began (OpenAI's ResponseErrorEvent)."""

    type: Literal["error"] = "error"
    code: str | None
    message: str
    param: str | None


StreamEvent = (LifecycleEvent | OutputItemEvent | ContentPartEvent | TextDeltaEvent | TextDoneEvent
               | ArgumentsDeltaEvent | ArgumentsDoneEvent | ErrorEvent)
