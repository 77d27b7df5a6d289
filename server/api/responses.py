"""POST /v1/responses: OpenAI's Responses API, as vLLM serves it (vllm/entrypoints/openai/responses/serving.py). A
thin adapter over the chat path (`openai.start_chat`): the request becomes a chat completion, and the chat answer (its
text read as tool calls by the request's tool plan) becomes output items: a `message` of `output_text`, then a
`function_call` per call. Streamed, OpenAI's event sequence, each event numbered: response.created,
response.in_progress, then per item output_item.added, its content (content_part.added, output_text.delta...,
output_text.done, content_part.done) or arguments (function_call_arguments.delta..., .done), output_item.done, and
last response.completed (response.incomplete when max_output_tokens cut it, as OpenAI sends it). Kept responses
(PAINTERS_RESPONSES_STORE) are got, deleted, listed by input item, and with background: true run on after the answer,
polled, cancelled, and streamed again (responses_background.py)."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from server.api import openai, pipeline, tool_parsers
from server.api.errors import APIError, CODES
from server.api.pipeline import Running, painters_info, timing_headers
from server.api.protocol import ChatCompletionRequest, ErrorResponse
from server.api.responses_background import Recording
from server.api.responses_protocol import (
    INCLUDABLE, LIVE, ArgumentsDeltaEvent, ArgumentsDoneEvent, ContentPartEvent, DeletedResponse, ErrorEvent,
    IncompleteDetails, InputItemList, InputTokensDetails, LifecycleEvent, ListedItem, OutputFunctionCall,
    OutputItemEvent, OutputMessage, OutputText, ResponseError, ResponseObject, ResponsesRequest, ResponseUsage, Status,
    StreamEvent, TextDeltaEvent, TextDoneEvent, as_items, chat_messages, listed_items,
)
from server.api.responses_store import ResponseStore, Stored
from server.api.state import AppState
from server.api.tools import DeltaToolCall, ToolPlan
from server.engine.request import GenerationResult

if TYPE_CHECKING:
    from server.engine.served import ServedModel

log = logging.getLogger(__name__)
router = APIRouter(tags=["openai"])
EVENTS = pipeline.sse_responses("JSON, or server-sent events (`event:` the type, `data:` the event) when stream=true")
NOT_KEPT = {404: {"model": ErrorResponse, "description": "no response kept under that id (never stored, deleted, "
                  "evicted, or the server keeps none: PAINTERS_RESPONSES_STORE)"}}


def _chat(body: ResponsesRequest, conversation: list[dict[str, Any]]) -> ChatCompletionRequest:
    """The request as chat's; a value chat refuses is a 400 in this request's terms (its input, its text.format)."""
    try:
        return body.chat_request(conversation)
    except ValidationError as e:
        errors = []
        for err in e.errors():
            loc = tuple("input" if part == "messages" else part for part in err.get("loc", ()))
            errors.append({**err, "loc": ("body", *loc), "msg": str(err.get("msg")).replace("response_format",
                                                                                          "text.format")})
        raise RequestValidationError(errors) from None


def _previous(state: AppState, previous_response_id: str | None) -> Stored | None:
    """The kept response a request continues (its conversation, input and output, as chat messages); None without
    one."""
    if previous_response_id is None:
        return None
    if state.responses is None:
        raise APIError(400, "previous_response_id needs the server to keep responses, and this one keeps none (start "
                            "it with PAINTERS_RESPONSES_STORE=true); send the whole conversation as input instead",
                       param="previous_response_id")
    stored = state.responses.get(previous_response_id)
    if stored is None:  # vLLM's answer: 404
        raise APIError(404, f"Response with id {previous_response_id[:100]!r} not found (never stored, deleted, or "
                            "evicted: the server keeps a bounded number)", param="previous_response_id")
    if stored.response.status in LIVE:
        raise APIError(400, f"Response {previous_response_id[:100]!r} is still {stored.response.status} (a background "
                            "response): continue it once it has finished (poll GET /v1/responses/{id})",
                       param="previous_response_id")
    return stored


def _check_background(state: AppState, body: ResponsesRequest) -> None:
    """Background needs the response kept (vLLM: a 400 naming background, where the server keeps none), and room."""
    if state.responses is None:
        raise APIError(400, "background needs the server to keep responses, and this one keeps none (start it with "
                            "PAINTERS_RESPONSES_STORE=true); send background false", param="background")
    if not body.store:
        raise APIError(400, "background needs store true (the response is polled from the store); send store true, "
                            "or background false", param="background")
    assert state.background is not None  # create_app's
    state.background.check_room()


def _stored(state: AppState, response_id: str) -> Stored:
    stored = state.responses.get(response_id) if state.responses is not None else None
    if stored is None:
        why = "" if state.responses is not None else " (this server keeps none: PAINTERS_RESPONSES_STORE)"
        raise APIError(404, f"Response with id {response_id[:100]!r} not found{why}", param="response_id")
    return stored


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _status(finish_reason: str) -> Status:
    """An answer cut by max_output_tokens is incomplete; one the server aborted (a drain) is cancelled."""
    return {"length": "incomplete", "abort": "cancelled"}.get(finish_reason, "completed")  # type: ignore[return-value]


def _item_status(status: Status) -> Any:
    return "completed" if status == "completed" else "incomplete"


class _Answer:
    """What one answer says so far, as output items, and the response object around them."""

    def __init__(self, body: ResponsesRequest, run: Running, *, served: ServedModel, model: str,
                 conversation: list[dict[str, Any]], items: list[ListedItem], store: ResponseStore | None) -> None:
        self.body, self.run, self.served, self.model, self.conversation = body, run, served, model, conversation
        self.items = items  # the input items, as input_items lists them
        self.store = store if body.store else None  # where it is kept when done
        self.id, self.created = _new_id("resp"), int(time.time())
        self.output: list[OutputMessage | OutputFunctionCall] = []
        self.events: list[dict[str, str]] = []  # a background stream's, kept with it

    def logprobs(self, ids: list[int], lps: list[float], tops: list[dict[int, float]] | None) -> list[Any]:
        """With include message.output_text.logprobs, the tokens' logprobs: chat's entries, which are Responses'
        (token, logprob, bytes, top_logprobs); else none."""
        if not self.body.logprobs:
            return []
        return list(openai.chat_logprobs(self.served, ids, lps, tops or None, as_ids=False).content)

    def done(self, status: Status, result: GenerationResult) -> ResponseObject:
        """The finished response, kept where the request and the server keep responses."""
        return self.keep(self.response(status, result))

    def keep(self, response: ResponseObject) -> ResponseObject:
        """`response` kept (in place of what was kept under its id), where the request and the server keep
        responses; its `store` says whether it was."""
        if self.store is not None:
            response.store = True
            messages = chat_messages(as_items(self.output), after=self.conversation)
            response.store = self.store.put(response, messages, items=self.items, events=self.events)
        return response

    def cancelled(self) -> None:
        """Cancelled in the background (or the server stopped): its engine request aborted (as a client that left
        aborts it), and it is kept as cancelled unless it had already ended."""
        for s in self.run.streams:
            s.abort()
        if self.status() in LIVE:
            self.keep(self.response("cancelled"))

    def stored(self) -> Stored | None:
        return self.store.get(self.id) if self.store is not None else None

    def status(self) -> Status | None:
        """The kept response's status (a background one's, which a cancel may have ended); None when not kept."""
        stored = self.stored()
        return stored.response.status if stored is not None else None

    def response(self, status: Status, result: GenerationResult | None = None) -> ResponseObject:
        body = self.body
        usage = None
        if result is not None:
            prompt, generated = len(self.run.prompts[0].ids), len(result.token_ids)
            usage = ResponseUsage(input_tokens=prompt, output_tokens=generated, total_tokens=prompt + generated,
                                  input_tokens_details=InputTokensDetails(cached_tokens=result.cached_tokens or 0))
        return ResponseObject(
            id=self.id, created_at=self.created, completed_at=int(time.time()) if status == "completed" else None,
            status=status, background=body.background, incomplete_details=IncompleteDetails(reason="max_output_tokens")
            if status == "incomplete" else None, instructions=body.instructions,
            max_output_tokens=body.max_output_tokens, max_tool_calls=body.max_tool_calls, metadata=body.metadata or {},
            model=self.model, output=list(self.output), parallel_tool_calls=body.parallel_tool_calls,
            previous_response_id=body.previous_response_id,
            temperature=body.temperature, text=body.text, tool_choice=body.tool_choice or "auto", tools=body.tools,
            top_logprobs=body.top_logprobs or 0, top_p=body.top_p, usage=usage, user=body.user,
            painters=painters_info(self.run.schedule, result) if result is not None else None)


@router.post("/v1/responses", response_model=ResponseObject, responses=EVENTS)
async def create_response(body: ResponsesRequest, request: Request) -> Any:
    state = openai.get_state(request)
    served, _ = state.require()
    if body.background:
        _check_background(state, body)
    previous = _previous(state, body.previous_response_id)
    conversation = chat_messages(body.items(), after=previous.messages if previous is not None else [])
    # OpenAI lists a continued response's input as its whole context: the previous ones' items and output, then its
    # own (as llama-stack stores them: ogx-ai/ogx#2299)
    before = [*previous.items, *previous.response.output] if previous is not None else []
    run, plan = await openai.start_chat(state, _chat(body, conversation))
    answer = _Answer(body, run, served=served, model=body.model or state.model_name, conversation=conversation,
                     items=before + listed_items(body.items(), new_id=_new_id), store=state.responses)
    if body.background:
        return _in_background(state, answer, plan)
    if body.stream:
        return pipeline.event_source(state, _stream(answer, plan), policy=run.schedule.policy)
    [result] = await pipeline.collect(run.streams, request)
    response = _collected(answer, plan, result).model_dump(mode="json", by_alias=True)
    return JSONResponse(response, headers=timing_headers(run.schedule, [result]))


def _collected(answer: _Answer, plan: ToolPlan, result: GenerationResult) -> ResponseObject:
    """The finished answer's output items (its text read as tool calls by `plan`), kept: the unstreamed response."""
    status = _status(result.finish_reason)
    parsed = tool_parsers.parse(plan, result.text)
    if plan.mode == "none" or parsed.content:  # vLLM's: with tools, a message only where there is content
        answer.output.append(OutputMessage(id=_new_id("msg"), status="completed",
                                           content=[OutputText(text=parsed.content or "", logprobs=answer.logprobs(
                                               result.token_ids, result.logprobs, result.top_logprobs))]))
    answer.output += [OutputFunctionCall(id=_new_id("fc"), call_id=c.id, name=c.function.name,
                                         arguments=c.function.arguments, status="completed") for c in parsed.calls]
    if answer.output:
        answer.output[-1].status = _item_status(status)
    return answer.done(status, result)


def _in_background(state: AppState, answer: _Answer, plan: ToolPlan) -> Any:
    """Keep the response queued and answer it at once (streamed: its events as they come), while a background task
    reads its engine request and keeps its end."""
    assert state.background is not None
    try:
        state.background.check_room()  # again: others may have started while this one was tokenized
        queued = answer.keep(answer.response("queued"))
        if not queued.store:  # larger than the whole store: nothing to poll
            raise APIError(400, "this request is larger than the server keeps (responses_store_max_bytes), so it "
                                "cannot run in the background; send background false", param="background")
    except APIError:
        for s in answer.run.streams:
            s.abort()
        raise
    recording = Recording(policy=answer.run.schedule.policy) if answer.body.stream else None
    if recording is not None:
        answer.events = recording.events  # kept with the response as they come

    def cancelled() -> None:
        answer.cancelled()
        if recording is not None:  # its readers' streams end
            recording.close()
    state.background.start(answer.id, _run_in_background(answer, plan, recording), on_cancel=cancelled,
                           recording=recording)
    if recording is not None:
        return pipeline.event_source(state, recording.replay(), policy=recording.policy)
    return JSONResponse(queued.model_dump(mode="json", by_alias=True))


async def _run_in_background(answer: _Answer, plan: ToolPlan, recording: Recording | None) -> None:
    """A background response's task: in progress once its engine request answers, then kept as it ended (completed,
    incomplete, failed, or cancelled: by a cancel, which cancels this task, or by a drain's deadline)."""
    try:
        if recording is None:
            result, started = None, False
            async for _, out in pipeline.merged(answer.run.streams):  # closing it aborts the engine request
                if not started:
                    answer.keep(answer.response("in_progress"))
                    started = True
                if out.finished:
                    result = out.result
            assert result is not None  # the last output is the finished one
            _collected(answer, plan, result)
        else:
            async for event in _stream(answer, plan):
                recording.add(event)
                if event["event"] == "response.in_progress":
                    answer.keep(answer.response("in_progress"))
            if answer.status() in LIVE:  # the stream ended in an error event
                error = ErrorEvent.model_validate_json(answer.events[-1]["data"])
                answer.keep(_failed(answer, error.code or "error", error.message))
            elif (stored := answer.stored()) is not None:  # kept as it ended, before its last event: again with all
                answer.keep(stored.response)
    except APIError as e:
        answer.keep(_failed(answer, e.code or CODES.get(e.status, "error"), e.message))
    except Exception as e:  # noqa: BLE001 - a bug: the response says so, as a failed one
        log.exception("background response %s failed", answer.id)
        answer.keep(_failed(answer, "internal_error", f"{type(e).__name__}: {e}"))
    finally:
        if recording is not None:
            recording.close()


def _failed(answer: _Answer, code: str, message: str) -> ResponseObject:
    response = answer.response("failed")
    response.error = ResponseError(code=code, message=message)
    return response


Stream = Annotated[bool, Query(description="vLLM's: stream a background stream's events (background and stream "
                                           "were true)")]
StartingAfter = Annotated[int | None, Query(ge=-1, description="with stream: only the events whose sequence_number "
                                            "is greater")]


@router.get("/v1/responses/{response_id}", response_model=ResponseObject, responses=EVENTS | NOT_KEPT)
async def get_response(response_id: str, request: Request, stream: Stream = False,
                       starting_after: StartingAfter = None) -> Any:
    """A kept response (PAINTERS_RESPONSES_STORE), as it was answered or, in the background, as it stands; 404 when
    not kept. stream=true (vLLM's): a streamed background response's events, those numbered after starting_after,
    then the rest as they come."""
    state = openai.get_state(request)
    stored = _stored(state, response_id)
    if not stream:
        return JSONResponse(stored.response.model_dump(mode="json", by_alias=True))
    assert state.background is not None
    recording = state.background.recordings.get(response_id)
    if recording is None and not stored.events:
        raise APIError(400, f"Response {response_id[:100]!r} was not streamed in the background (background and "
                            "stream true), so it has no events to stream; GET it without stream", param="stream")
    if recording is None:  # finished: what it recorded
        painters = stored.response.painters
        recording = Recording(policy=painters.policy if painters else state.settings.default_policy)
        for event in stored.events:
            recording.add(event)
        recording.close()
    return pipeline.event_source(state, recording.replay(after=starting_after), policy=recording.policy)


@router.post("/v1/responses/{response_id}/cancel", response_model=ResponseObject, responses=NOT_KEPT)
async def cancel_response(response_id: str, request: Request) -> Any:
    """Cancel a background response while it is queued or in progress (vLLM's cancel_responses): its engine request
    is aborted and it is kept as cancelled. A response answered in the foreground, or one that already finished, is
    a 400 (cancelling a cancelled one answers it again: OpenAI's is idempotent)."""
    state = openai.get_state(request)
    stored = _stored(state, response_id)
    status = stored.response.status
    if not stored.response.background:
        raise APIError(400, f"Response {response_id[:100]!r} was not created in the background; only a background "
                            "response (background true) can be cancelled", param="response_id")
    if status in LIVE:
        assert state.background is not None
        await state.background.cancel(response_id)
        stored = _stored(state, response_id)
    elif status != "cancelled":
        raise APIError(400, f"Response {response_id[:100]!r} is already {status}; only a queued or in_progress "
                            "response can be cancelled", param="response_id")
    return JSONResponse(stored.response.model_dump(mode="json", by_alias=True))


Limit = Annotated[int, Query(ge=1, le=100, description="items per page, 1-100")]
Order = Annotated[Literal["asc", "desc"], Query(description="asc: as sent, oldest first; desc: newest first")]
After = Annotated[str | None, Query(description="an item id (a page's last_id): the page begins after it")]
Include = Annotated[list[str] | None, Query(description="OpenAI's includables (sent as include or include[]); none "
                                            "adds to these items")]


@router.get("/v1/responses/{response_id}/input_items", response_model=InputItemList, responses=NOT_KEPT)
async def list_input_items(response_id: str, request: Request, limit: Limit = 20, order: Order = "desc",
                           after: After = None, include: Include = None) -> Any:
    """The items a kept response was answered from (OpenAI's input_items): its input, after a previous response's
    whole context (its items and its output) where it continued one; instructions are not items."""
    for value in [*(include or ()), *request.query_params.getlist("include[]")]:  # openai-python sends include[]
        if value not in INCLUDABLE:
            raise APIError(400, f"include value {value[:60]!r} is not one of OpenAI's: {', '.join(INCLUDABLE)}",
                           param="include")
    items = list(_stored(openai.get_state(request), response_id).items)
    if order == "desc":
        items.reverse()
    start = 0
    if after is not None:
        ids = [i.id for i in items]
        if after not in ids:
            raise APIError(400, f"after {after[:100]!r} is not an item of response {response_id[:100]!r}; send the id "
                                "of an item it listed (its last_id)", param="after")
        start = ids.index(after) + 1
    page = items[start:start + limit]
    out = InputItemList(data=page, first_id=page[0].id if page else None, last_id=page[-1].id if page else None,
                        has_more=start + limit < len(items))
    return JSONResponse(out.model_dump(mode="json", by_alias=True))


@router.delete("/v1/responses/{response_id}", response_model=DeletedResponse, responses=NOT_KEPT)
async def delete_response(response_id: str, request: Request) -> DeletedResponse:
    """Forget a kept response; a background one still running is cancelled first (else its end would keep it
    again)."""
    state = openai.get_state(request)
    if _stored(state, response_id).response.status in LIVE:
        assert state.background is not None
        await state.background.cancel(response_id)
    assert state.responses is not None  # _stored
    state.responses.delete(response_id)
    return DeletedResponse(id=response_id)


class _Events:
    """The stream's events as the answer's items open, grow and close; each numbered in order."""

    def __init__(self, answer: _Answer) -> None:
        self.answer = answer
        self.count = 0
        self.message: OutputMessage | None = None  # open, growing
        self.call: OutputFunctionCall | None = None
        self.calls: dict[int, OutputFunctionCall] = {}  # by the call's index in the chat path's deltas
        self.pending: list[Any] = []  # logprobs of tokens whose text has not come out yet (a held-back tail)

    def frame(self, event: StreamEvent) -> dict[str, str]:
        event.sequence_number = self.count
        self.count += 1
        return {"event": event.type, "data": event.model_dump_json(by_alias=True)}

    def _index(self) -> int:
        return len(self.answer.output) - 1

    def text(self, delta: str, logprobs: list[Any] = ()) -> list[dict[str, str]]:  # type: ignore[assignment]
        out = self.close_call("completed") if self.call is not None else []
        if self.message is None:
            self.message = OutputMessage(id=_new_id("msg"), status="in_progress", content=[])
            self.answer.output.append(self.message)
            out.append(self.frame(OutputItemEvent(type="response.output_item.added", output_index=self._index(),
                                                  item=self.message.model_copy(deep=True))))
            self.message.content.append(OutputText(text=""))
            out.append(self.frame(ContentPartEvent(type="response.content_part.added", item_id=self.message.id,
                                                   output_index=self._index(), part=OutputText(text=""))))
        part = self.message.content[0]
        part.logprobs += logprobs
        self.pending += logprobs
        if delta:
            part.text += delta
            out.append(self.frame(TextDeltaEvent(item_id=self.message.id, output_index=self._index(), delta=delta,
                                                 logprobs=self.pending)))
            self.pending = []
        return out

    def call_piece(self, piece: DeltaToolCall) -> list[dict[str, str]]:
        out = self.close_message("completed") if self.message is not None else []
        call = self.calls.get(piece.index)
        if call is None:
            if self.call is not None:
                out += self.close_call("completed")
            assert piece.id is not None and piece.function.name is not None  # a call's first piece names it
            call = self.call = self.calls[piece.index] = OutputFunctionCall(
                id=_new_id("fc"), call_id=piece.id, name=piece.function.name, arguments="", status="in_progress")
            self.answer.output.append(call)
            out.append(self.frame(OutputItemEvent(type="response.output_item.added", output_index=self._index(),
                                                  item=call.model_copy())))
        if piece.function.arguments:
            call.arguments += piece.function.arguments
            out.append(self.frame(ArgumentsDeltaEvent(item_id=call.id, output_index=self.answer.output.index(call),
                                                      delta=piece.function.arguments)))
        return out

    def close_message(self, status: Any) -> list[dict[str, str]]:
        message, index = self.message, self._index()
        assert message is not None
        self.message = None
        part = message.content[0]
        message.status = status
        tail = [self.frame(TextDeltaEvent(item_id=message.id, output_index=index, delta="", logprobs=self.pending))
                ] if self.pending else []  # tokens without text of their own (an EOS) have their logprobs too
        self.pending = []
        return tail + [self.frame(TextDoneEvent(item_id=message.id, output_index=index, text=part.text,
                                         logprobs=part.logprobs)),
                self.frame(ContentPartEvent(type="response.content_part.done", item_id=message.id,
                                            output_index=index, part=part)),
                self.frame(OutputItemEvent(type="response.output_item.done", output_index=index,
                                           item=message.model_copy(deep=True)))]

    def close_call(self, status: Any) -> list[dict[str, str]]:
        call, index = self.call, self._index()
        assert call is not None
        self.call = None
        call.status = status
        return [self.frame(ArgumentsDoneEvent(item_id=call.id, output_index=index, name=call.name,
                                              arguments=call.arguments)),
                self.frame(OutputItemEvent(type="response.output_item.done", output_index=index,
                                           item=call.model_copy()))]

    def close(self, status: Any) -> list[dict[str, str]]:
        if self.message is not None:
            return self.close_message(status)
        if self.call is not None:
            return self.close_call(status)
        return []


async def _stream(answer: _Answer, plan: ToolPlan) -> AsyncIterator[dict[str, str]]:
    events = _Events(answer)
    created = "queued" if answer.body.background else "in_progress"  # OpenAI's background stream opens queued
    yield events.frame(LifecycleEvent(type="response.created", response=answer.response(created)))
    yield events.frame(LifecycleEvent(type="response.in_progress", response=answer.response("in_progress")))
    reader = tool_parsers.stream_reader(plan) if plan.mode != "none" else None
    result = None
    try:
        if reader is None:  # plain text: the message opens at once, as OpenAI's does, whatever the answer
            for frame in events.text(""):
                yield frame
        async for _, out in pipeline.merged(answer.run.streams):
            if reader is None:
                logprobs = answer.logprobs(out.token_ids, out.logprobs, out.top_logprobs)
                frames = events.text(out.text, logprobs) if out.text or logprobs else []
            else:
                piece = reader.feed(out.text, finished=out.finished)
                frames = events.text(piece.content) if piece.content else []
                for call in piece.tool_calls:
                    frames += events.call_piece(call)
            for frame in frames:
                yield frame
            if out.finished:
                result = out.result
    except APIError as e:
        yield events.frame(ErrorEvent(code=e.code or CODES.get(e.status), message=e.message, param=e.param))
        return
    assert result is not None  # the stream's last output is its finished one
    status = _status(result.finish_reason)
    for frame in events.close(_item_status(status)):
        yield frame
    final = "response.incomplete" if status == "incomplete" else "response.completed"
    yield events.frame(LifecycleEvent(type=final, response=answer.done(status, result)))
