"""The public OpenAI API against a deterministic fake engine, over real HTTP (in-process)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import aiohttp
import orjson
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request
from aiohttp.web_runner import AppRunner, BaseRunner

from fake_engine import FakeEngine, fake_token_ids
from memserve.engine.types import EngineOverloadedError, RequestOutput, SamplingParams
from memserve.logging import AccessLogger, configure_logging
from memserve.model.tokenizer import Tokenizer
from memserve.server.openai_api import build_app, run_server
from memserve.server.responses import Choice, usage

Client = TestClient[web.Request, web.Application]
JSON = dict[str, Any]

MODEL = "fake-model"
MAX_MODEL_LEN = 64


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.dummy()


@pytest.fixture
def engine(tokenizer: Tokenizer) -> FakeEngine:
    return FakeEngine(tokenizer, model_name=MODEL, max_model_len=MAX_MODEL_LEN)


@pytest.fixture
async def client(engine: FakeEngine) -> AsyncIterator[Client]:
    async with TestClient(TestServer(build_app(engine))) as test_client:
        yield test_client


class NoCancelTestServer(TestServer):
    """Handlers are *not* cancelled on disconnect: the handler only learns it when a write fails."""

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        return AppRunner(self.app, **(kwargs | {"handler_cancellation": False}))


async def eventually(predicate: Callable[[], bool], timeout_s: float = 2.0) -> None:
    """Poll ``predicate`` every 5 ms for at most ``timeout_s``."""
    for _ in range(int(timeout_s / 0.005)):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not met in time")


async def post(client: Client, path: str, body: JSON, status: int = 200) -> JSON:
    response = await client.post(path, json=body)
    payload: JSON = await response.json()
    assert response.status == status, payload
    return payload


async def post_stream(client: Client, path: str, body: JSON) -> list[JSON]:
    """The SSE events of a streaming request, checking the framing and the final [DONE]."""
    response = await client.post(path, json=body | {"stream": True})
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = (await response.text()).split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(e.startswith("data: ") for e in events[:-2])
    return [json.loads(e.removeprefix("data: ")) for e in events[:-2]]


def completion(**fields: Any) -> JSON:
    return {"model": MODEL, "prompt": "hello", "max_tokens": 5} | fields


def chat(**fields: Any) -> JSON:
    messages = [{"role": "user", "content": "hi"}]
    return {"model": MODEL, "messages": messages, "max_tokens": 5} | fields


def expected_text(tokenizer: Tokenizer, prompt_ids: Sequence[int], num_tokens: int) -> str:
    return tokenizer.decode(fake_token_ids(prompt_ids, num_tokens, tokenizer.vocab_size))


def assert_error(payload: JSON, param: str | None, code: str | None = None) -> None:
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code


# --- completions --------------------------------------------------------------------------------


async def test_completion(client: Client, tokenizer: Tokenizer) -> None:
    body = await post(client, "/v1/completions", completion(user="u1"))
    prompt_ids = tokenizer.encode("hello")
    assert body["id"].startswith("cmpl-")
    assert body["object"] == "text_completion"
    assert body["model"] == MODEL
    assert isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["index"] == 0
    assert choice["text"] == expected_text(tokenizer, prompt_ids, 5)
    assert choice["finish_reason"] == "length"
    assert choice["logprobs"] is None
    assert body["usage"] == {
        "prompt_tokens": len(prompt_ids),
        "completion_tokens": 5,
        "total_tokens": len(prompt_ids) + 5,
        "prompt_tokens_details": {
            "cached_tokens": 0,
            "cached_tokens_device": 0,
            "cached_tokens_dram": 0,
        },
    }


async def test_completion_passes_sampling_params(client: Client, engine: FakeEngine) -> None:
    fields = {
        "temperature": 0,
        "top_p": 0.5,
        "top_k": 3,
        "min_p": 0.1,
        "seed": 7,
        "stop": ["x", "yz"],
        "stop_token_ids": [5],
        "ignore_eos": True,
        "min_tokens": 2,
        "skip_special_tokens": False,
        "include_stop_str_in_output": True,
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "best_of": 1,
        "echo": False,
        "suffix": None,
        "logit_bias": {},
    }
    await post(client, "/v1/completions", completion(**fields))
    [(_, _, params)] = engine.requests
    assert params == SamplingParams(
        max_tokens=5,
        temperature=0.0,
        top_p=0.5,
        top_k=3,
        min_p=0.1,
        seed=7,
        stop=("x", "yz"),
        stop_token_ids=(5,),
        ignore_eos=True,
        min_tokens=2,
        skip_special_tokens=False,
        include_stop_str_in_output=True,
    )


async def test_completion_defaults(client: Client, engine: FakeEngine) -> None:
    await post(client, "/v1/completions", {"model": MODEL, "prompt": "hello", "top_k": -1})
    [(_, _, params)] = engine.requests
    assert params == SamplingParams(max_tokens=16)


async def test_completion_stops_on_eos_and_stop_token(client: Client) -> None:
    # The fake's next token is last prompt token + 1: after <s> (1) comes </s> (2), the EOS.
    body = await post(client, "/v1/completions", completion(prompt=[1]))
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 1
    body = await post(client, "/v1/completions", completion(prompt=[100], stop_token_ids=[102]))
    assert body["choices"][0] | {"text": None} == {
        "index": 0,
        "text": None,
        "logprobs": None,
        "finish_reason": "stop",
        "stop_reason": 102,
    }
    assert body["usage"]["completion_tokens"] == 2


async def test_completion_max_tokens_null_fills_the_context(client: Client) -> None:
    body = await post(
        client, "/v1/completions", completion(prompt=[100, 101, 102], max_tokens=None)
    )
    assert body["usage"]["completion_tokens"] == MAX_MODEL_LEN - 3
    assert body["choices"][0]["finish_reason"] == "length"


async def test_completion_list_prompts_and_n(client: Client, engine: FakeEngine) -> None:
    prompts = [[100, 101], [200], [300, 301, 302]]
    body = await post(client, "/v1/completions", completion(prompt=prompts, n=2, max_tokens=3))
    choices = body["choices"]
    assert [c["index"] for c in choices] == list(range(6))
    for choice in choices:
        prompt = prompts[choice["index"] // 2]
        assert choice["text"] == expected_text(engine.tokenizer, prompt, 3)
    assert body["usage"]["prompt_tokens"] == 6  # each prompt counted once, as OpenAI does
    assert body["usage"]["completion_tokens"] == 18
    assert len({request_id for request_id, _, _ in engine.requests}) == 6


async def test_completion_string_list_prompts(client: Client, tokenizer: Tokenizer) -> None:
    body = await post(client, "/v1/completions", completion(prompt=["ab", "hello"]))
    assert [c["text"] for c in body["choices"]] == [
        expected_text(tokenizer, tokenizer.encode(p), 5) for p in ("ab", "hello")
    ]


async def test_n_with_seed_gives_different_choices(client: Client, engine: FakeEngine) -> None:
    body = await post(client, "/v1/completions", completion(n=3, seed=10, best_of=3))
    assert len({c["text"] for c in body["choices"]}) == 3
    assert sorted(p.seed or 0 for _, _, p in engine.requests) == [10, 11, 12]


async def test_n_seeds_wrap_around_int64(client: Client, engine: FakeEngine) -> None:
    await post(client, "/v1/completions", completion(n=2, seed=2**63 - 1))
    assert sorted(p.seed or 0 for _, _, p in engine.requests) == [-(2**63), 2**63 - 1]


async def test_completion_logprobs(client: Client, tokenizer: Tokenizer) -> None:
    body = await post(client, "/v1/completions", completion(prompt=[100], max_tokens=3, logprobs=2))
    logprobs = body["choices"][0]["logprobs"]
    tokens = [tokenizer.token_str(t) for t in (101, 102, 103)]
    assert logprobs["tokens"] == tokens
    assert logprobs["token_logprobs"] == [-0.5, -0.5, -0.5]
    assert logprobs["text_offset"] == [0, len(tokens[0]), len(tokens[0]) + len(tokens[1])]
    # The top alternatives (the sampled token first, then the next id) plus the sampled token.
    assert logprobs["top_logprobs"][0] == {tokens[0]: -0.5, tokens[1]: -1.5}


async def test_completion_stream(client: Client, tokenizer: Tokenizer) -> None:
    events = await post_stream(client, "/v1/completions", completion(prompt=[100], logprobs=0))
    assert all(e["object"] == "text_completion" and e["id"].startswith("cmpl-") for e in events)
    assert len({e["id"] for e in events}) == 1
    assert "".join(e["choices"][0]["text"] for e in events) == expected_text(tokenizer, [100], 5)
    assert [e["choices"][0]["finish_reason"] for e in events] == [None] * 4 + ["length"]
    offsets = [o for e in events for o in e["choices"][0]["logprobs"]["text_offset"]]
    assert offsets == [0, 1, 2, 3, 4]  # single-character tokens b..f
    assert "usage" not in events[-1]


async def test_completion_stream_include_usage(client: Client) -> None:
    body = completion(prompt=[100, 101], n=2, stream_options={"include_usage": True})
    events = await post_stream(client, "/v1/completions", body)
    *chunks, last = events
    assert last["choices"] == []
    assert last["usage"]["prompt_tokens"] == 2
    assert last["usage"]["completion_tokens"] == 10
    assert {c["choices"][0]["index"] for c in chunks} == {0, 1}
    assert all("usage" not in c for c in chunks)


async def test_completion_return_token_ids(client: Client, tokenizer: Tokenizer) -> None:
    """vLLM's ``return_token_ids``: prompt and output ids on each choice, whole or streamed."""
    prompts = [[100, 101], [7, 8, 9]]
    body = await post(client, "/v1/completions", completion(prompt=prompts, return_token_ids=True))
    for choice, prompt in zip(body["choices"], prompts, strict=True):
        assert choice["prompt_token_ids"] == prompt
        assert choice["token_ids"] == fake_token_ids(prompt, 5, tokenizer.vocab_size)
        assert tokenizer.decode(choice["token_ids"]) == choice["text"]
    events = await post_stream(
        client, "/v1/completions", completion(prompt=prompts, return_token_ids=True)
    )
    for index, prompt in enumerate(prompts):
        mine = [e["choices"][0] for e in events if e["choices"][0]["index"] == index]
        assert mine[0]["prompt_token_ids"] == prompt
        assert all("prompt_token_ids" not in c for c in mine[1:])
        streamed = [t for c in mine for t in c["token_ids"]]
        assert streamed == fake_token_ids(prompt, 5, tokenizer.vocab_size)


async def test_token_ids_only_when_asked(client: Client) -> None:
    body = await post(client, "/v1/completions", completion(prompt=[100]))
    assert "token_ids" not in body["choices"][0]
    assert "prompt_token_ids" not in body["choices"][0]
    events = await post_stream(client, "/v1/chat/completions", chat())
    assert all("token_ids" not in c for e in events for c in e["choices"])


async def test_chat_return_token_ids(client: Client, tokenizer: Tokenizer) -> None:
    body = await post(client, "/v1/chat/completions", chat(return_token_ids=True))
    prompt = chat_prompt_ids(tokenizer)
    assert body["choices"][0]["prompt_token_ids"] == prompt
    assert body["choices"][0]["token_ids"] == fake_token_ids(prompt, 5, tokenizer.vocab_size)
    events = await post_stream(client, "/v1/chat/completions", chat(return_token_ids=True))
    streamed = [t for e in events for c in e["choices"] for t in c.get("token_ids", [])]
    assert streamed == fake_token_ids(prompt, 5, tokenizer.vocab_size)


def cached_details(cached: int, dram: int) -> JSON:
    return {
        "cached_tokens": cached,
        "cached_tokens_device": cached - dram,
        "cached_tokens_dram": dram,
    }


async def test_cached_tokens_reported(client: Client, engine: FakeEngine) -> None:
    engine.num_cached_tokens, engine.num_cached_tokens_dram = 3, 1
    body = await post(client, "/v1/completions", completion(prompt=[[100, 101, 102, 103]] * 2, n=2))
    assert body["usage"]["prompt_tokens_details"] == cached_details(6, 2)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_cached_tokens_by_tier_streamed(
    client: Client, engine: FakeEngine, path: str
) -> None:
    engine.num_cached_tokens, engine.num_cached_tokens_dram = 4, 3
    body = (completion if path == "/v1/completions" else chat)(
        n=3, stream_options={"include_usage": True}
    )
    events = await post_stream(client, path, body)
    assert events[-1]["usage"]["prompt_tokens_details"] == cached_details(4, 3)
    assert all("usage" not in e for e in events[:-1])


async def test_chat_cached_tokens_by_tier(client: Client, engine: FakeEngine) -> None:
    engine.num_cached_tokens, engine.num_cached_tokens_dram = 5, 0
    body = await post(client, "/v1/chat/completions", chat(n=2))
    assert body["usage"]["prompt_tokens_details"] == cached_details(5, 0)


def test_usage_takes_the_tier_split_of_the_least_cached_choice() -> None:
    def choice(index: int, prompt_index: int, cached: int, dram: int) -> Choice:
        made = Choice(index, prompt_index)
        made.add(RequestOutput("r", (7,), "x", False, num_cached_tokens=cached))
        made.add(
            RequestOutput(
                "r", (7,), "y", True, num_cached_tokens=cached, num_cached_tokens_dram=dram
            )
        )
        made.add(RequestOutput("r", (), "", True))  # a later increment reporting 0 changes nothing
        return made

    # Prompt 0: the least cached choice (6, all from DRAM) wins as a whole; a per-field minimum
    # would pair 6 cached with 1 from DRAM. Prompt 1 has one choice.
    choices = [choice(0, 0, 10, 1), choice(1, 0, 6, 6), choice(2, 0, 6, 6), choice(3, 1, 3, 2)]
    details = usage([8, 4], choices)["prompt_tokens_details"]
    assert details == cached_details(9, 8)


# --- chat ---------------------------------------------------------------------------------------


def chat_prompt_ids(tokenizer: Tokenizer) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    return tokenizer.encode(text, add_special_tokens=False)


async def test_chat(client: Client, engine: FakeEngine, tokenizer: Tokenizer) -> None:
    body = await post(client, "/v1/chat/completions", chat(user="u", tool_choice="none"))
    prompt_ids = chat_prompt_ids(tokenizer)
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    [choice] = body["choices"]
    assert choice["message"] == {
        "role": "assistant",
        "content": expected_text(tokenizer, prompt_ids, 5),
    }
    assert choice["finish_reason"] == "length"
    assert choice["logprobs"] is None
    assert body["usage"]["prompt_tokens"] == len(prompt_ids)
    assert engine.requests[0][1] == tuple(prompt_ids)


async def test_chat_max_completion_tokens_wins(client: Client) -> None:
    body = await post(client, "/v1/chat/completions", chat(max_tokens=2, max_completion_tokens=4))
    assert body["usage"]["completion_tokens"] == 4
    body = await post(client, "/v1/chat/completions", chat(max_tokens=None))
    assert body["usage"]["total_tokens"] == MAX_MODEL_LEN


async def test_chat_stream(client: Client, tokenizer: Tokenizer) -> None:
    body = chat(n=2, response_format={"type": "text"}, stream_options={"include_usage": True})
    events = await post_stream(client, "/v1/chat/completions", body)
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    first, *chunks, usage = events
    assert [c["delta"] for c in first["choices"]] == [{"role": "assistant", "content": ""}] * 2
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        text = "".join(c["delta"].get("content", "") for c in mine)
        assert text == expected_text(tokenizer, chat_prompt_ids(tokenizer), 5)
        assert [c["finish_reason"] for c in mine][-1] == "length"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 10


async def test_chat_logprobs(client: Client, tokenizer: Tokenizer) -> None:
    body = await post(client, "/v1/chat/completions", chat(logprobs=True, top_logprobs=2))
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == 5
    token_id = fake_token_ids(chat_prompt_ids(tokenizer), 1, tokenizer.vocab_size)[0]
    token = tokenizer.token_str(token_id)
    assert content[0] | {"top_logprobs": None} == {
        "token": token,
        "logprob": -0.5,
        "bytes": list(tokenizer.token_bytes(token_id)),
        "top_logprobs": None,
    }
    assert [t["logprob"] for t in content[0]["top_logprobs"]] == [-0.5, -1.5]
    assert set(content[0]["top_logprobs"][1]) == {"token", "logprob", "bytes"}
    body = await post(client, "/v1/chat/completions", chat(logprobs=True))
    assert all(c["top_logprobs"] == [] for c in body["choices"][0]["logprobs"]["content"])


async def test_chat_stream_logprobs(client: Client) -> None:
    events = await post_stream(client, "/v1/chat/completions", chat(logprobs=True, top_logprobs=1))
    tokens = [e["choices"][0]["logprobs"] for e in events[1:]]
    assert all(len(t["content"]) == 1 and len(t["content"][0]["top_logprobs"]) == 1 for t in tokens)


# --- models, health -----------------------------------------------------------------------------


async def test_models(client: Client) -> None:
    response = await client.get("/v1/models")
    body = await response.json()
    assert body["object"] == "list"
    [model] = body["data"]
    assert model["id"] == MODEL
    assert model["object"] == "model"
    assert model["owned_by"] == "memserve"
    assert model["max_model_len"] == MAX_MODEL_LEN


async def test_health(client: Client, engine: FakeEngine) -> None:
    assert (await client.get("/health")).status == 200
    engine.healthy = False
    response = await client.get("/health")
    assert response.status == 503
    assert_error(await response.json(), None)


# --- client errors ------------------------------------------------------------------------------

BAD_COMPLETIONS: list[tuple[JSON, str | None]] = [
    ({"model": MODEL}, "prompt"),
    ({"prompt": "hello"}, "model"),
    ({"model": 3, "prompt": "hello"}, "model"),
    (completion(prompt=""), "prompt"),
    (completion(prompt=[]), "prompt"),
    (completion(prompt=[[]]), "prompt"),
    (completion(prompt=[1, "a"]), "prompt"),
    (completion(prompt=[True]), "prompt"),
    (completion(prompt={"a": 1}), "prompt"),
    (completion(prompt=[-1]), "prompt"),
    (completion(prompt=[[5], [32000]]), "prompt"),
    (completion(max_tokens=0), "max_tokens"),
    (completion(max_tokens="5"), "max_tokens"),
    (completion(max_tokens=True), "max_tokens"),
    (completion(max_tokens=2.0), "max_tokens"),
    (completion(temperature=-1), "temperature"),
    (completion(temperature="hot"), "temperature"),
    (completion(top_p=0), "top_p"),
    (completion(top_p=False), "top_p"),
    (completion(top_k=-5), "top_k"),
    (completion(min_p=2), "min_p"),
    (completion(n=0), "n"),
    (completion(n=1.5), "n"),
    (completion(n=1000), "n"),
    (completion(seed="1"), "seed"),
    (completion(seed=2**63), "seed"),
    (completion(stream="yes"), "stream"),
    (completion(stream_options={"include_usage": True}), "stream_options"),
    (completion(stream=True, stream_options=[]), "stream_options"),
    (completion(stream=True, stream_options={"include_usage": 1}), "stream_options"),
    (completion(logprobs=6), "logprobs"),
    (completion(logprobs=-1), "logprobs"),
    (completion(logprobs=True), "logprobs"),
    (completion(echo=True), "echo"),
    (completion(echo="no"), "echo"),
    (completion(stop=""), "stop"),
    (completion(stop=[""]), "stop"),
    (completion(stop=["a", "b", "c", "d", "e"]), "stop"),
    (completion(stop=5), "stop"),
    (completion(stop_token_ids=[1.5]), "stop_token_ids"),
    (completion(suffix="end"), "suffix"),
    (completion(best_of=2), "best_of"),
    (completion(logit_bias={"5": 1}), "logit_bias"),
    (completion(logit_bias=[1]), "logit_bias"),
    (completion(presence_penalty=0.5), "presence_penalty"),
    (completion(frequency_penalty=-1), "frequency_penalty"),
    (completion(ignore_eos="true"), "ignore_eos"),
    (completion(min_tokens=10), "min_tokens"),
    (completion(skip_special_tokens=0), "skip_special_tokens"),
    (completion(user=5), "user"),
]

BAD_CHATS: list[tuple[JSON, str | None]] = [
    ({"model": MODEL}, "messages"),
    (chat(messages=[]), "messages"),
    (chat(messages="hi"), "messages"),
    (chat(messages=["hi"]), "messages"),
    (chat(messages=[{"role": "robot", "content": "hi"}]), "messages"),
    (chat(messages=[{"content": "hi"}]), "messages"),
    (chat(max_completion_tokens=0), "max_completion_tokens"),
    (chat(max_tokens=-1), "max_tokens"),
    (chat(max_completion_tokens="1"), "max_completion_tokens"),
    (chat(logprobs=1), "logprobs"),
    (chat(top_logprobs=2), "top_logprobs"),
    (chat(logprobs=True, top_logprobs=21), "top_logprobs"),
    (chat(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
    (chat(tool_choice="auto"), "tool_choice"),
    (chat(response_format={"type": "json_object"}), "response_format"),
    (chat(temperature=None, top_p=1.5), "top_p"),
    (chat(stop=["x"] * 5), "stop"),
]


@pytest.mark.parametrize(("body", "param"), BAD_COMPLETIONS)
async def test_completion_bad_request(
    client: Client, engine: FakeEngine, body: JSON, param: str | None
) -> None:
    assert_error(await post(client, "/v1/completions", body, status=400), param)
    assert engine.requests == []


@pytest.mark.parametrize(("body", "param"), BAD_CHATS)
async def test_chat_bad_request(
    client: Client, engine: FakeEngine, body: JSON, param: str | None
) -> None:
    assert_error(await post(client, "/v1/chat/completions", body, status=400), param)
    assert engine.requests == []


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("data", [b"{not json", b"", b"[1, 2]", b'"text"', b"null"])
async def test_malformed_body(client: Client, path: str, data: bytes) -> None:
    response = await client.post(path, data=data, headers={"Content-Type": "application/json"})
    assert response.status == 400
    assert_error(await response.json(), None)


@pytest.mark.parametrize("stream", [False, True])
async def test_unknown_model(client: Client, stream: bool) -> None:
    body = completion(model="gpt-4", stream=stream)
    payload = await post(client, "/v1/completions", body, status=404)
    assert_error(payload, "model", code="model_not_found")
    assert "gpt-4" in payload["error"]["message"]


async def test_prompt_too_long(client: Client) -> None:
    body = completion(prompt=list(range(100, 150)), max_tokens=20)
    payload = await post(client, "/v1/completions", body, status=400)
    assert_error(payload, "prompt", code="context_length_exceeded")
    message = payload["error"]["message"]
    assert "maximum context length is 64 tokens" in message
    assert "you requested 70 tokens (50 in the prompt, 20 in the completion)" in message
    body = completion(prompt=list(range(100, 100 + MAX_MODEL_LEN)), max_tokens=None)
    payload = await post(client, "/v1/completions", body, status=400)
    assert "has 64 input tokens" in payload["error"]["message"]


async def test_chat_prompt_too_long(client: Client, tokenizer: Tokenizer) -> None:
    num_prompt_tokens = len(chat_prompt_ids(tokenizer))
    payload = await post(client, "/v1/chat/completions", chat(max_tokens=60), status=400)
    assert_error(payload, "messages", code="context_length_exceeded")
    total = num_prompt_tokens + 60
    assert (
        f"requested {total} tokens ({num_prompt_tokens} in the messages"
        in (payload["error"]["message"])
    )


async def test_unknown_route_and_method(client: Client) -> None:
    response = await client.get("/v1/nothing")
    assert response.status == 404
    assert_error(await response.json(), None)
    response = await client.get("/v1/completions")
    assert response.status == 405
    assert "POST" in response.headers["Allow"]
    assert_error(await response.json(), None)


# --- server-side failures -----------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_overloaded(client: Client, engine: FakeEngine, stream: bool) -> None:
    engine.overloaded = True
    response = await client.post("/v1/completions", json=completion(stream=stream))
    assert response.status == 503
    assert int(response.headers["Retry-After"]) >= 1
    assert_error(await response.json(), None)


async def test_engine_abort_is_503(client: Client, engine: FakeEngine) -> None:
    engine.final_finish_reason = "abort"
    assert_error(await post(client, "/v1/completions", completion(), status=503), None)


async def test_engine_error_is_a_loud_500_or_error_finish_in_stream(
    client: Client, engine: FakeEngine
) -> None:
    engine.final_finish_reason = "error"
    body = await post(client, "/v1/chat/completions", chat(), status=500)
    assert body["error"]["code"] == "engine_error"
    assert body["error"]["type"] == "internal_server_error"
    events = await post_stream(client, "/v1/chat/completions", chat())
    assert events[-1]["choices"][0]["finish_reason"] == "error"


class BrokenEngine(FakeEngine):
    def generate(
        self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        raise KeyError("a bug")


async def test_internal_error_is_500(tokenizer: Tokenizer) -> None:
    engine = BrokenEngine(tokenizer, model_name=MODEL)
    async with TestClient(TestServer(build_app(engine))) as client:
        payload = await post(client, "/v1/completions", completion(), status=500)
    assert_error(payload, None)
    assert "a bug" not in payload["error"]["message"]


class LateFailureEngine(FakeEngine):
    """Choice 1 fails after choice 0 has started streaming."""

    async def generate(
        self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        if request_id.endswith("-1"):
            await asyncio.sleep(0.05)
            raise EngineOverloadedError("late")
        async for output in super().generate(request_id, prompt_token_ids, params):
            yield output


async def test_error_mid_stream_becomes_an_event(tokenizer: Tokenizer) -> None:
    engine = LateFailureEngine(tokenizer, model_name=MODEL, token_delay_s=0.01)
    async with TestClient(TestServer(build_app(engine))) as client:
        events = await post_stream(client, "/v1/completions", completion(n=2, max_tokens=50))
    assert events[0]["choices"][0]["index"] == 0
    assert events[-1]["error"]["type"] == "server_overloaded"
    await eventually(lambda: len(engine.aborted) == 1)


async def test_request_timeout(tokenizer: Tokenizer) -> None:
    engine = FakeEngine(tokenizer, model_name=MODEL, token_delay_s=0.02)
    async with TestClient(TestServer(build_app(engine, request_timeout_s=0.1))) as client:
        payload = await post(client, "/v1/completions", completion(max_tokens=40), status=504)
        assert_error(payload, None, code="request_timeout")
        events = await post_stream(client, "/v1/completions", completion(max_tokens=40))
    assert events[-1]["error"]["code"] == "request_timeout"
    assert len(engine.aborted) == 2


# --- cancellation -------------------------------------------------------------------------------


async def test_disconnect_mid_stream_aborts(client: Client, engine: FakeEngine) -> None:
    engine.token_delay_s = 0.01
    body = completion(prompt=[[100], [200]], n=2, max_tokens=50, stream=True)
    response = await client.post("/v1/completions", json=body)
    assert (await response.content.readline()).startswith(b"data: ")
    response.close()
    await eventually(lambda: len(engine.aborted) == 4)
    assert engine.finished == []


async def test_disconnect_detected_by_failed_write(engine: FakeEngine) -> None:
    engine.token_delay_s = 0.01
    async with TestClient(NoCancelTestServer(build_app(engine))) as client:
        response = await client.post("/v1/chat/completions", json=chat(max_tokens=40, stream=True))
        assert (await response.content.readline()).startswith(b"data: ")
        response.close()
        await eventually(lambda: len(engine.aborted) == 1)
    assert engine.finished == []


@pytest.mark.parametrize("stream", [False, True])
async def test_disconnect_before_first_token_aborts(
    client: Client, engine: FakeEngine, stream: bool
) -> None:
    engine.token_delay_s = 10.0
    request = asyncio.create_task(client.post("/v1/completions", json=completion(stream=stream)))
    await eventually(lambda: len(engine.requests) == 1)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    await eventually(lambda: len(engine.aborted) == 1)


# --- compatibility and serving -----------------------------------------------------------------


async def test_official_openai_client(engine: FakeEngine) -> None:
    openai = pytest.importorskip("openai")
    async with (
        TestServer(build_app(engine)) as server,
        openai.AsyncOpenAI(
            base_url=str(server.make_url("/v1")), api_key="unused", max_retries=0
        ) as client,
    ):
        completion_ = await client.completions.create(
            model=MODEL, prompt=["hello", "abc"], max_tokens=4, logprobs=1, n=2
        )
        assert [c.index for c in completion_.choices] == [0, 1, 2, 3]
        details = completion_.usage.prompt_tokens_details
        assert details.cached_tokens == 0
        assert details.model_extra == {"cached_tokens_device": 0, "cached_tokens_dram": 0}
        engine.num_cached_tokens, engine.num_cached_tokens_dram = 2, 1
        messages = [{"role": "user", "content": "hi"}]
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_completion_tokens=4,
            logprobs=True,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-2].choices[0].finish_reason == "length"
        assert chunks[-1].usage.completion_tokens == 4
        details = chunks[-1].usage.prompt_tokens_details
        assert details.cached_tokens == 2
        assert details.model_extra == {"cached_tokens_device": 1, "cached_tokens_dram": 1}
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="nope", messages=messages)
        engine.overloaded = True
        with pytest.raises(openai.InternalServerError) as overloaded:
            await client.chat.completions.create(model=MODEL, messages=messages)
        assert overloaded.value.status_code == 503


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_run_server_shutdown_aborts_in_flight(engine: FakeEngine) -> None:
    cleaned_up: list[bool] = []

    async def cleanup_ctx(app: web.Application) -> AsyncIterator[None]:
        yield
        cleaned_up.append(True)

    app = build_app(engine)
    app.cleanup_ctx.append(cleanup_ctx)
    engine.token_delay_s = 0.01
    port = free_port()
    server = asyncio.create_task(run_server(app, "127.0.0.1", port, shutdown_timeout_s=0.05))
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as session:
            for _ in range(200):
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    async with session.get("/health") as response:
                        assert response.status == 200
                        break
                await asyncio.sleep(0.01)
            async with session.post(
                "/v1/completions", json=completion(max_tokens=40, stream=True)
            ) as response:
                assert (await response.content.readline()).startswith(b"data: ")
                server.cancel()
                await asyncio.gather(server, return_exceptions=True)
    finally:
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)
    assert engine.aborted == [engine.requests[0][0]]
    assert cleaned_up == [True]


# --- logging ------------------------------------------------------------------------------------


def test_json_logging_and_quiet_health(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        configure_logging("json", "info")
        access = AccessLogger(logging.getLogger("aiohttp.access"), "")
        for path in ("/health", "/v1/models"):
            access.log(make_mocked_request("GET", path), web.Response(), 0.0015)
        structlog.stdlib.get_logger("memserve.test").info("hello", answer=42)
        lines = [orjson.loads(line) for line in capsys.readouterr().err.splitlines()]
    finally:
        root.handlers = saved_handlers
        root.setLevel(saved_level)
        structlog.reset_defaults()
    access_line, event_line = lines
    assert access_line["event"] == "http request"
    assert access_line["path"] == "/v1/models"
    assert access_line["level"] == "info"
    assert access_line["logger"] == "aiohttp.access"
    assert access_line["duration_ms"] == 1.5
    assert event_line["answer"] == 42
    assert event_line["logger"] == "memserve.test"
    assert "timestamp" in event_line


def test_configure_logging_rejects_unknown_level() -> None:
    with pytest.raises(ValueError, match="log level"):
        configure_logging("console", "chatty")
