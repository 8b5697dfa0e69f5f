"""The public OpenAI-compatible HTTP API (the front door), as vLLM's server presents it to users.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``,
``GET /health``, ``GET /metrics`` (Prometheus). The app depends only on an ``EngineClient``.

A request's life: parse and validate the body (``protocol``) → check the model → tokenize →
fan out one engine request per (prompt, choice) → merge their output streams → answer
(``responses``) with one JSON object, or an SSE stream of chunks ending with ``data: [DONE]``.

Ownership: every engine stream is consumed by a task owned by ``merge_streams``; closing the merged
stream (always done by the handler, on success, error, timeout, client disconnect or cancellation)
cancels and awaits those tasks, which closes each engine generator and so aborts its request.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import orjson
import structlog
from aiohttp import web

from memserve.engine.client import SESSION_ID, EngineClient
from memserve.engine.types import RequestOutput, SamplingParams
from memserve.logging import AccessLogger
from memserve.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from memserve.model.tokenizer import Tokenizer
from memserve.server.errors import APIError, bad_request, error_middleware, to_api_error
from memserve.server.protocol import (
    JSON,
    GenerationOptions,
    PromptInput,
    check_token_ids,
    nth_seed,
    params_for_prompt,
    parse_chat_request,
    parse_completion_request,
)
from memserve.server.responses import (
    ChatResponseBuilder,
    Choice,
    CompletionResponseBuilder,
    ResponseBuilder,
    usage,
)

log = structlog.stdlib.get_logger(__name__)

T = TypeVar("T")

MAX_BODY_BYTES = 64 * 1024 * 1024
"""Long prompts sent as token-id lists are large; aiohttp's default limit is 1 MiB."""

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


@dataclass(frozen=True)
class ServerSettings:
    """``request_timeout_s``: a request still running after this long is aborted (None: never)."""

    request_timeout_s: float | None = None


ENGINE = web.AppKey[EngineClient]("engine")
SETTINGS = web.AppKey("settings", ServerSettings)


def build_app(engine: EngineClient, *, request_timeout_s: float | None = None) -> web.Application:
    """The OpenAI API app; serve it with ``run_server`` (any runner with handler_cancellation)."""
    app = web.Application(middlewares=[error_middleware], client_max_size=MAX_BODY_BYTES)
    app[ENGINE] = engine
    app[SETTINGS] = ServerSettings(request_timeout_s)
    app.router.add_post("/v1/completions", create_completion)
    app.router.add_post("/v1/chat/completions", create_chat_completion)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    return app


async def run_server(
    app: web.Application, host: str, port: int, *, shutdown_timeout_s: float = 10.0
) -> None:
    """Serve ``app`` on ``host:port`` until cancelled.

    Shutdown order on cancellation (``AppRunner.cleanup``): stop accepting (close the listening
    socket) → let in-flight requests finish for up to ``shutdown_timeout_s``, then cancel their
    handlers (which aborts their engine requests) and close the connections → run the app's
    cleanup contexts. Handlers are cancelled when their client disconnects.
    """
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        access_log_class=AccessLogger,
        shutdown_timeout=shutdown_timeout_s,
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        log.info("serving", addresses=[str(a) for a in runner.addresses])
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


# --- handlers -----------------------------------------------------------------------------------


async def create_completion(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    body = await read_json_object(request)
    parsed = parse_completion_request(body, engine.max_model_len)
    set_session(request, body)
    check_model(engine, parsed.options.model)
    prompts = [completion_prompt_ids(p, engine.tokenizer) for p in parsed.prompts]
    builder = CompletionResponseBuilder(
        engine.tokenizer,
        parsed.options.model,
        with_logprobs=parsed.options.params.logprobs is not None,
        with_token_ids=parsed.options.return_token_ids,
    )
    return await generate(request, parsed.options, prompts, builder, param="prompt")


async def create_chat_completion(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    body = await read_json_object(request)
    parsed = parse_chat_request(body, engine.max_model_len)
    set_session(request, body)
    check_model(engine, parsed.options.model)
    text = engine.tokenizer.apply_chat_template(parsed.messages, parsed.add_generation_prompt)
    # The template already holds BOS and friends.
    prompt = engine.tokenizer.encode(text, add_special_tokens=False)
    builder = ChatResponseBuilder(
        engine.tokenizer,
        parsed.options.model,
        with_logprobs=parsed.options.params.logprobs is not None,
        with_token_ids=parsed.options.return_token_ids,
    )
    return await generate(request, parsed.options, [prompt], builder, param="messages")


def set_session(request: web.Request, body: dict[str, object]) -> None:
    """Name the request's session for the router: ``X-Session-Id``, else the ``user`` field."""
    user = body.get("user")
    SESSION_ID.set(request.headers.get("X-Session-Id") or (user if isinstance(user, str) else None))


async def list_models(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    model: JSON = {
        "id": engine.model_name,
        "object": "model",
        "created": 0,
        "owned_by": "memserve",
        "root": engine.model_name,
        "parent": None,
        "max_model_len": engine.max_model_len,
    }
    return json_response({"object": "list", "data": [model]})


async def health(request: web.Request) -> web.Response:
    if not request.app[ENGINE].is_healthy():
        raise APIError(503, "The engine is not healthy", type="server_error", code="unhealthy")
    return web.Response(status=200)


async def metrics(request: web.Request) -> web.Response:
    body = request.app[ENGINE].render_metrics()
    # Set the header directly: aiohttp's content_type= argument rejects a charset parameter.
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})


# --- request preparation ------------------------------------------------------------------------


async def read_json_object(request: web.Request) -> dict[str, object]:
    """The body as a JSON object; 400 for malformed JSON or any other JSON value."""
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"Malformed JSON body: {exc}") from exc
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object")
    return body


def check_model(engine: EngineClient, model: str) -> None:
    if model != engine.model_name:
        raise APIError(
            404, f"The model `{model}` does not exist.", param="model", code="model_not_found"
        )


def completion_prompt_ids(prompt: PromptInput, tokenizer: Tokenizer) -> list[int]:
    """Text is encoded with the model's special tokens (BOS); token ids are used as given."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    check_token_ids(prompt, tokenizer.vocab_size, "prompt")
    return list(prompt)


@dataclass(frozen=True)
class SubRequest:
    """One engine request: choice ``choice_index`` (= prompt_index * n + i) of the response."""

    request_id: str
    choice_index: int
    prompt_index: int
    prompt_token_ids: list[int]
    params: SamplingParams


def plan_sub_requests(
    response_id: str,
    options: GenerationOptions,
    prompts: Sequence[list[int]],
    max_model_len: int,
    param: str,
) -> list[SubRequest]:
    """Fan out n engine requests per prompt; with a seed, choice i samples with ``seed + i``."""
    subs: list[SubRequest] = []
    for prompt_index, prompt in enumerate(prompts):
        params = params_for_prompt(options, len(prompt), max_model_len, param)
        for i in range(options.n):
            seed = None if params.seed is None else nth_seed(params.seed, i)
            seeded = dataclasses.replace(params, seed=seed)
            index = prompt_index * options.n + i
            subs.append(SubRequest(f"{response_id}-{index}", index, prompt_index, prompt, seeded))
    return subs


# --- generation ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Generation:
    """What one HTTP request's answer is built from."""

    builder: ResponseBuilder
    choices: list[Choice]
    prompt_lens: list[int]
    include_usage: bool
    deadline: float | None  # loop time, for asyncio.timeout_at

    def usage(self) -> JSON:
        return usage(self.prompt_lens, self.choices)


async def generate(
    request: web.Request,
    options: GenerationOptions,
    prompts: list[list[int]],
    builder: ResponseBuilder,
    *,
    param: str,
) -> web.StreamResponse:
    """Run all sub-requests of one HTTP request and answer (streaming or not)."""
    engine = request.app[ENGINE]
    subs = plan_sub_requests(builder.response_id, options, prompts, engine.max_model_len, param)
    timeout_s = request.app[SETTINGS].request_timeout_s
    job = Generation(
        builder,
        [Choice(s.choice_index, s.prompt_index, prompt_token_ids=s.prompt_token_ids) for s in subs],
        [len(p) for p in prompts],
        options.include_usage,
        None if timeout_s is None else asyncio.get_running_loop().time() + timeout_s,
    )
    streams = [
        functools.partial(engine.generate, s.request_id, s.prompt_token_ids, s.params) for s in subs
    ]
    async with contextlib.aclosing(merge_streams(streams)) as outputs:
        if options.stream:
            return await stream_response(request, job, outputs)
        return await collect_response(job, outputs)


def _timeout_error() -> APIError:
    return APIError(504, "The request timed out", type="timeout_error", code="request_timeout")


async def collect_response(
    job: Generation, outputs: AsyncIterator[tuple[int, RequestOutput]]
) -> web.Response:
    try:
        async with asyncio.timeout_at(job.deadline):
            async for index, output in outputs:
                job.choices[index].add(output)
    except TimeoutError:
        raise _timeout_error() from None
    if any(c.finish_reason == "abort" for c in job.choices):
        # We never see our own aborts (we close the stream); this one came from the engine.
        raise APIError(
            503, "The request was aborted by the server", type="server_error", code="aborted"
        )
    if any(c.finish_reason == "error" for c in job.choices):
        # An engine failure is a bug on our side: say so loudly rather than return partial text.
        raise APIError(
            500,
            "The engine failed while generating; see the server log",
            type="internal_server_error",
            code="engine_error",
        )
    return json_response(job.builder.response(job.choices, job.usage()))


async def stream_response(
    request: web.Request, job: Generation, outputs: AsyncIterator[tuple[int, RequestOutput]]
) -> web.StreamResponse:
    """Answer with SSE. Errors before the first output are plain HTTP errors; later ones become an
    ``error`` event followed by ``[DONE]``. A client disconnect just ends the handler."""
    try:
        async with asyncio.timeout_at(job.deadline):
            first = await anext(outputs, None)
    except TimeoutError:
        raise _timeout_error() from None
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    try:
        await _send_events(response, job, first, outputs)
        await response.write_eof()
    except ConnectionResetError:  # aiohttp.ClientConnectionResetError included
        log.info("client disconnected, aborting", response_id=job.builder.response_id)
    return response


async def _send_events(
    response: web.StreamResponse,
    job: Generation,
    first: tuple[int, RequestOutput] | None,
    outputs: AsyncIterator[tuple[int, RequestOutput]],
) -> None:
    builder = job.builder
    if start := builder.first_deltas(job.choices):
        await send_event(response, builder.chunk(start))
    try:
        async with asyncio.timeout_at(job.deadline):
            item = first
            while item is not None:
                choice, output = job.choices[item[0]], item[1]
                delta = builder.delta(choice, output)
                choice.add(output)
                if builder.worth_sending(output):
                    await send_event(response, builder.chunk([delta]))
                item = await anext(outputs, None)
        if job.include_usage:
            await send_event(response, builder.usage_chunk(job.usage()))
    except ConnectionResetError:
        raise
    except TimeoutError:
        await send_event(response, _timeout_error().body())
    except Exception as exc:
        error = to_api_error(exc)
        if error.status == 500:
            log.exception("error while streaming", response_id=builder.response_id)
        await send_event(response, error.body())
    await response.write(b"data: [DONE]\n\n")


async def send_event(response: web.StreamResponse, payload: JSON) -> None:
    await response.write(b"data: " + orjson.dumps(payload) + b"\n\n")


def json_response(payload: JSON) -> web.Response:
    return web.Response(body=orjson.dumps(payload), content_type="application/json")


# --- merging concurrent streams -----------------------------------------------------------------


@dataclass(frozen=True)
class _StreamEnd:
    error: Exception | None


async def merge_streams(
    streams: Sequence[Callable[[], AsyncIterator[T]]],
) -> AsyncGenerator[tuple[int, T], None]:
    """Yield ``(stream index, item)`` from all streams concurrently, in arrival order.

    Contract: each stream is opened and consumed by one task owned by this generator. The first
    exception of any stream is re-raised here. Closing this generator (``aclose``, or cancelling
    the task that consumes it) cancels and awaits every task; each task closes its stream, which
    for an engine stream aborts the request. Always close it (``contextlib.aclosing``).
    """
    queue: asyncio.Queue[tuple[int, T] | _StreamEnd] = asyncio.Queue()
    tasks = [
        asyncio.create_task(_pump(i, open_stream, queue)) for i, open_stream in enumerate(streams)
    ]
    try:
        num_open = len(tasks)
        while num_open:
            item = await queue.get()
            if not isinstance(item, _StreamEnd):
                yield item
            elif item.error is not None:
                raise item.error
            else:
                num_open -= 1
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _pump(
    index: int,
    open_stream: Callable[[], AsyncIterator[T]],
    queue: asyncio.Queue[tuple[int, T] | _StreamEnd],
) -> None:
    """Feed one stream into ``queue``; always ends with exactly one ``_StreamEnd``."""
    error: Exception | None = None
    try:
        stream = open_stream()
        try:
            async for item in stream:
                queue.put_nowait((index, item))
        finally:
            await _aclose(stream)
    except Exception as exc:
        error = exc
    except asyncio.CancelledError:
        # Normally merge_streams cancelling us (nobody reads the queue any more); if the stream
        # itself was cancelled from elsewhere, the reader must not wait for it forever.
        error = RuntimeError(f"stream {index} was cancelled")
        raise
    finally:
        queue.put_nowait(_StreamEnd(error))


async def _aclose(stream: AsyncIterator[object]) -> None:
    """Close an async generator (or anything with ``aclose``); a no-op once it has finished."""
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()
