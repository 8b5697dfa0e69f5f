"""The global scheduler in-process: its real HTTP app (``build_scheduler_app`` over a ``Router``)
in front of fake instances, small aiohttp apps whose ``/internal/generate`` streams canned
``RequestOutput``s as NDJSON, or fails on purpose (503, 400, a stream dropped mid-way, a closed
port, a stream held open). Instances register the way real ones do: by POSTing heartbeats."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from openai import AsyncOpenAI
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from memserve.bench.launch import free_port
from memserve.engine.types import FinishReason, RequestOutput
from memserve.engine.wire import output_to_json, params_from_json, params_to_json
from memserve.model.loader import load_tokenizer
from memserve.model.tokenizer import Tokenizer
from memserve.scheduler.cost_model import OperatorCostModel
from memserve.scheduler.metrics import RouterMetrics
from memserve.scheduler.policy import make_policy
from memserve.scheduler.registry import InstanceTable
from memserve.scheduler.router import Router
from memserve.scheduler.types import make_trees
from memserve.server.scheduler_api import build_scheduler_app

Client = TestClient[web.Request, web.Application]
JSON = dict[str, Any]

MODEL = "dummy:tiny"
BLOCK_SIZE = 4
MAX_MODEL_LEN = 256
PROMPT = list(range(300, 310))  # 10 tokens: 2 whole blocks
OUTPUT_IDS = (101, 102, 103)
OUTPUT_TEXTS = (" one", " two", " three")

Mode = Literal["ok", "overloaded", "bad_request", "drop", "refused"]


@functools.cache
def tokenizer() -> Tokenizer:
    return load_tokenizer(MODEL)[1]


def canned(
    request_id: str, num_prompt: int, num_cached: int, finish_reason: FinishReason
) -> list[RequestOutput]:
    """Three one-token increments, the last finished."""
    last = len(OUTPUT_IDS) - 1
    return [
        RequestOutput(
            request_id,
            (token_id,),
            text,
            finished=i == last,
            finish_reason=finish_reason if i == last else None,
            num_prompt_tokens=num_prompt,
            num_cached_tokens=num_cached,
            num_output_tokens=i + 1,
        )
        for i, (token_id, text) in enumerate(zip(OUTPUT_IDS, OUTPUT_TEXTS, strict=True))
    ]


class FakeInstance:
    """One instance's ``/internal/generate``. ``mode``: ``ok`` streams the canned outputs;
    ``overloaded`` / ``bad_request`` answer 503 / 400 with an OpenAI error body; ``drop`` sends two
    lines then closes the connection; ``refused``: nothing listens on its port. With a ``gate``,
    the stream waits for it after the first line, or with ``gate_first`` before answering at all
    (as a real instance does while the prompt is queued or prefilling). ``bodies``: every dispatch received;
    ``cancelled``: set when a handler was cancelled (the scheduler closed the connection)."""

    def __init__(
        self,
        instance_id: str,
        role: str = "colocated",
        *,
        mode: Mode = "ok",
        keeps: bool = True,
        send_back: bool = False,
        num_cached_tokens: int = 0,
        finish_reason: FinishReason = "length",
        gate: asyncio.Event | None = None,
        gate_first: bool = False,
    ) -> None:
        self.instance_id = instance_id
        self.role = role
        self.mode = mode
        self.keeps = keeps
        self.send_back = send_back
        self.num_cached_tokens = num_cached_tokens
        self.finish_reason = finish_reason
        self.gate = gate
        self.gate_first = gate_first
        self.url = f"http://127.0.0.1:{free_port()}"  # a closed port until served
        self.bodies: list[JSON] = []
        self.cancelled = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/internal/generate", self._generate)
        return app

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body: JSON = await request.json()
        self.bodies.append(body)
        if self.mode == "overloaded":
            return _error(503, "no free KV blocks here", "server_overloaded")
        if self.mode == "bad_request":
            return _error(400, "top_k is too large here", "invalid_request_error", "top_k")
        prompt = body["prompt_token_ids"]
        outputs = canned(
            body["request_id"], len(prompt), self.num_cached_tokens, self.finish_reason
        )
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        try:
            if self.gate is not None and self.gate_first:
                await self.gate.wait()
            await response.prepare(request)
            for i, out in enumerate(outputs):
                if i == 1 and self.gate is not None and not self.gate_first:
                    await self.gate.wait()
                if i == 2 and self.mode == "drop":
                    assert request.transport is not None
                    request.transport.close()
                    await asyncio.Event().wait()  # until aiohttp cancels us (connection lost)
                await response.write(orjson.dumps(output_to_json(out)) + b"\n")
            await response.write_eof()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return response


def _error(status: int, message: str, type: str, param: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": type, "param": param, "code": None}}
    return web.json_response(body, status=status)


@dataclass
class Sched:
    """A running scheduler app: ``http`` (aiohttp) and ``oai`` (openai) clients of it; fakes
    joined through it are served until the ``stack`` closes (at the end of ``scheduler()``)."""

    router: Router
    http: Client
    oai: AsyncOpenAI
    stack: contextlib.AsyncExitStack

    async def join(self, fake: FakeInstance, **fields: Any) -> None:
        """Serve ``fake`` (unless ``refused``) and register it with one heartbeat."""
        if fake.mode != "refused":
            server = TestServer(fake.app())
            await server.start_server(shutdown_timeout=0.5)
            fake.url = str(server.make_url("")).rstrip("/")
            self.stack.push_async_callback(server.close)
            if fake.gate is not None:  # never leave a handler waiting at shutdown
                self.stack.callback(fake.gate.set)
        response = await self.beat(fake, **fields)
        assert response.status == 200, await response.text()

    async def beat(self, fake: FakeInstance, **fields: Any) -> aiohttp.ClientResponse:
        return await self.http.post("/internal/heartbeat", json=heartbeat(fake) | fields)

    async def cluster(self) -> JSON:
        response = await self.http.get("/v1/cluster")
        assert response.status == 200
        state: JSON = await response.json()
        return state

    async def instance(self, instance_id: str) -> JSON:
        instances: list[JSON] = (await self.cluster())["instances"]
        [found] = [i for i in instances if i["id"] == instance_id]
        return found

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """``/metrics`` as {(sample name, sorted labels): value}."""
        text = await (await self.http.get("/metrics")).text()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }


def heartbeat(fake: FakeInstance) -> JSON:
    return {
        "id": fake.instance_id,
        "role": fake.role,
        "url": fake.url,
        "pid": 4242,
        "model": MODEL,
        "block_size": BLOCK_SIZE,
        "incarnation": "inc-1",
        "keeps": fake.keeps,
        "send_back": fake.send_back,
        "ready": True,
        "load": {},
        "step_samples": [],
    }


@contextlib.asynccontextmanager
async def scheduler(
    policy: str = "prompt_tree", dead_after_s: float = 60.0
) -> AsyncIterator[Sched]:
    """The scheduler as ``node.run_scheduler`` assembles it, on a free local port."""
    table = InstanceTable(MODEL, BLOCK_SIZE, dead_after_s)
    trees = make_trees(BLOCK_SIZE, 300.0, 1 << 20)  # as the scheduler does: one, shared
    router = Router(
        table,
        make_policy(policy, OperatorCostModel.default(bytes_per_token=4096)),
        trees,
        tokenizer(),
        MAX_MODEL_LEN,
        RouterMetrics(table),
        model_name=MODEL,
        reap_interval_s=0.05,
    )
    async with contextlib.AsyncExitStack() as stack:
        server = TestServer(build_scheduler_app(router, "127.0.0.1:29500"))
        http: Client = await stack.enter_async_context(TestClient(server))
        oai = AsyncOpenAI(
            base_url=str(http.make_url("/v1")), api_key="unused", max_retries=0, timeout=10
        )
        stack.push_async_callback(oai.close)
        yield Sched(router, http, oai, stack)


async def eventually(predicate: Callable[[], bool], timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def complete(s: Sched, **fields: Any) -> tuple[int, JSON]:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 3} | fields
    response = await s.http.post("/v1/completions", json=body)
    payload: JSON = await response.json()
    return response.status, payload


def sse_events(text: str) -> list[JSON]:
    """The events of an SSE body, checking its framing and the final [DONE]."""
    events = text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""], text
    return [json.loads(e.removeprefix("data: ")) for e in events[:-2]]


# ---- dispatch -----------------------------------------------------------------------------------


async def test_dispatch_body_colocated() -> None:
    async with scheduler() as s:
        fake = FakeInstance("c0")
        await s.join(fake)
        out = await s.oai.completions.create(
            model=MODEL,
            prompt="hello there",
            max_tokens=3,
            temperature=0.5,
            top_p=0.9,
            seed=7,
            stop=["zz"],
        )
        [body] = fake.bodies
        assert body["prompt_token_ids"] == tokenizer().encode("hello there")
        assert body["prefill"] is None
        assert body["request_id"].startswith(out.id)
        params = params_from_json(body["params"])
        assert (params.max_tokens, params.temperature, params.top_p) == (3, 0.5, 0.9)
        assert (params.seed, params.stop) == (7, ("zz",))
        assert orjson.loads(orjson.dumps(params_to_json(params))) == body["params"]


async def test_dispatch_body_names_the_prefill_instance_for_pd() -> None:
    async with scheduler() as s:
        prefill, decode = FakeInstance("p0", "prefill"), FakeInstance("d0", "decode")
        await s.join(prefill)
        await s.join(decode)
        await s.oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3)
        assert prefill.bodies == []
        [body] = decode.bodies
        assert body["prompt_token_ids"] == PROMPT
        assert body["prefill"] == "p0"


async def test_completion_equals_the_canned_outputs() -> None:
    async with scheduler() as s:
        await s.join(FakeInstance("c0", num_cached_tokens=8))
        out = await s.oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3)
        assert out.choices[0].text == "".join(OUTPUT_TEXTS)
        assert out.choices[0].finish_reason == "length"
        assert out.usage is not None
        assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (10, 3)
        assert out.usage.prompt_tokens_details is not None
        assert out.usage.prompt_tokens_details.cached_tokens == 8
        stream = await s.oai.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
        assert [c.choices[0].text for c in chunks if c.choices] == list(OUTPUT_TEXTS)
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        usage = chunks[-1].usage
        assert usage is not None and usage.prompt_tokens_details is not None
        assert usage.prompt_tokens_details.cached_tokens == 8


# ---- failures -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["overloaded", "refused"])
async def test_redispatch_to_another_instance(mode: Mode) -> None:
    async with scheduler() as s:
        bad, good = FakeInstance("a0", mode=mode), FakeInstance("b0")
        await s.join(bad)
        await s.join(good)
        out = await s.oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3)
        assert out.choices[0].text == "".join(OUTPUT_TEXTS)
        assert len(good.bodies) == 1
        assert len(bad.bodies) == (1 if mode == "overloaded" else 0)
        assert (await s.metrics())[("memserve_router_redispatched_total", ())] >= 1
        if mode == "refused":  # suspected for a while: not healthy, not routed to
            assert not (await s.instance("a0"))["healthy"]
            await s.oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3)
            assert len(good.bodies) == 2


async def test_only_failing_instances_answer_503() -> None:
    async with scheduler() as s:
        fakes = [FakeInstance("a0", mode="overloaded"), FakeInstance("b0", mode="refused")]
        for fake in fakes:
            await s.join(fake)
        response = await s.http.post(
            "/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 3}
        )
        assert response.status == 503
        assert response.headers["Retry-After"] == "1"
        error = (await response.json())["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "server_overloaded"
        assert "a0" in error["message"] and "b0" in error["message"]
        assert len(fakes[0].bodies) == 1
        metrics = await s.metrics()
        assert metrics[("memserve_router_failed_requests_total", (("reason", "unavailable"),))] == 1


async def test_no_instance_at_all_is_503() -> None:
    async with scheduler() as s:
        with pytest.raises(openai.APIStatusError) as e:
            await s.oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3)
        assert e.value.status_code == 503


async def test_instance_400_is_passed_on_not_retried() -> None:
    async with scheduler() as s:
        bad, good = FakeInstance("a0", mode="bad_request"), FakeInstance("b0")
        await s.join(bad)
        await s.join(good)
        with pytest.raises(openai.BadRequestError) as e:
            await s.oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3)
        assert e.value.status_code == 400
        assert e.value.param == "top_k"
        assert "top_k is too large here" in e.value.message
        # streaming too: a plain HTTP error before the first chunk
        status, payload = await complete(s, stream=True)
        assert status == 400 and payload["error"]["message"] == "top_k is too large here"
        assert (len(bad.bodies), good.bodies) == (2, [])


async def test_mid_stream_failure_is_502_or_an_error_event() -> None:
    async with scheduler() as s:
        fake = FakeInstance("c0", mode="drop")
        await s.join(fake)
        status, payload = await complete(s)
        assert status == 502
        assert payload["error"]["type"] == "upstream_error"
        response = await s.http.post(
            "/v1/completions",
            json={"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "stream": True},
        )
        assert response.status == 200
        events = sse_events(await response.text())
        assert [e["choices"][0]["text"] for e in events[:-1]] == list(OUTPUT_TEXTS[:2])
        assert events[-1]["error"]["type"] == "upstream_error"
        assert len(fake.bodies) == 2  # not re-dispatched once output was sent
        failed = (await s.metrics())[
            ("memserve_router_failed_requests_total", (("reason", "instance_failed"),))
        ]
        assert failed == 2
        # the openai client raises on the error event, after the two chunks
        texts = []
        with pytest.raises(openai.APIError):
            stream = await s.oai.completions.create(
                model=MODEL, prompt=PROMPT, max_tokens=3, stream=True
            )
            async for chunk in stream:
                texts.append(chunk.choices[0].text)
        assert texts == list(OUTPUT_TEXTS[:2])


async def test_client_disconnect_cancels_the_instance_handler() -> None:
    async with scheduler() as s:
        fake = FakeInstance("c0", gate=asyncio.Event())  # holds the stream after one line
        await s.join(fake)
        response = await s.http.post(
            "/v1/completions",
            json={"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "stream": True},
        )
        first = await response.content.readline()
        assert json.loads(first.removeprefix(b"data: "))["choices"][0]["text"] == OUTPUT_TEXTS[0]
        assert (await s.instance("c0"))["load"]["inflight"] == 1
        response.close()
        await asyncio.wait_for(fake.cancelled.wait(), 2.0)
        assert (await s.instance("c0"))["load"]["inflight"] == 0
        assert s.router._streams.get("c0", set()) == set()


async def test_client_disconnect_before_the_first_token_cancels_the_instance_handler() -> None:
    async with scheduler() as s:
        fake = FakeInstance("c0", gate=asyncio.Event(), gate_first=True)  # still prefilling
        await s.join(fake)
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "stream": True}
        with contextlib.suppress(TimeoutError):  # the client gives up before any answer
            await asyncio.wait_for(s.http.post("/v1/completions", json=body), 0.3)
        assert len(fake.bodies) == 1
        await asyncio.wait_for(fake.cancelled.wait(), 2.0)
        await eventually(lambda: s.router.table.instances["c0"].inflight == 0)
        assert s.router.table.instances["c0"].queued_s == pytest.approx(0.0, abs=1e-9)


# ---- sessions -----------------------------------------------------------------------------------


async def test_session_sticks_by_header_and_by_user() -> None:
    async with scheduler("session") as s:
        gate = asyncio.Event()
        c0, c1 = FakeInstance("c0", gate=gate), FakeInstance("c1")
        await s.join(c0)
        await s.join(c1)
        # s1 starts on c0 (both idle: the lower id) and holds it; u2 then goes to the idle c1
        held = await s.http.post(
            "/v1/completions",
            json={"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "stream": True},
            headers={"X-Session-Id": "s1"},
        )
        await held.content.readline()
        await s.oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, user="u2")
        gate.set()
        assert (await held.read()).endswith(b"data: [DONE]\n\n")
        assert (len(c0.bodies), len(c1.bodies)) == (1, 1)
        # both idle now: least_load alone would pick c0 every time; the sessions stick
        for _ in range(3):
            await s.oai.completions.create(
                model=MODEL, prompt=PROMPT, max_tokens=3, extra_headers={"X-Session-Id": "s1"}
            )
            await s.oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, user="u2")
        assert (len(c0.bodies), len(c1.bodies)) == (4, 4)
        # the header wins over the user field
        await s.oai.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=3,
            user="u2",
            extra_headers={"X-Session-Id": "s1"},
        )
        assert (len(c0.bodies), len(c1.bodies)) == (5, 4)


# ---- heartbeats ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("model", "other-model", "other-model"),
        ("block_size", 16, "block-size"),
        ("role", "router", "role"),
        ("id", None, "bad heartbeat"),  # missing
    ],
)
async def test_foreign_heartbeat_is_400(field: str, value: object, words: str) -> None:
    async with scheduler() as s:
        body = heartbeat(FakeInstance("c0"))
        if value is None:
            del body[field]
        else:
            body[field] = value
        response = await s.http.post("/internal/heartbeat", json=body)
        assert response.status == 400
        error = (await response.json())["error"]
        assert words in error["message"]
        assert (await s.cluster())["instances"] == []


async def test_restarted_instance_replaces_the_old_one() -> None:
    async with scheduler() as s:
        fake = FakeInstance("c0")
        await s.join(fake)
        await s.oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3)
        now = time.monotonic()
        assert s.router.trees["colocated"].match(PROMPT, now) == {"c0": 8}
        response = await s.beat(fake, incarnation="inc-2", pid=5151)
        assert response.status == 200
        [instance] = (await s.cluster())["instances"]
        assert (instance["id"], instance["pid"]) == ("c0", 5151)
        assert s.router.table.instances["c0"].incarnation == "inc-2"
        assert s.router.trees["colocated"].match(PROMPT, now) == {}  # restarted empty
        assert (await s.metrics())[("memserve_router_instances_dropped_total", ())] == 1
        await s.oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3)
        assert len(fake.bodies) == 2


async def test_silent_instance_is_dropped_and_its_stream_ends() -> None:
    async with scheduler(dead_after_s=0.3) as s:
        fake = FakeInstance("c0", gate=asyncio.Event())
        await s.join(fake)  # and never beats again
        start = time.monotonic()
        response = await s.http.post(
            "/v1/completions",
            json={"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "stream": True},
        )
        events = sse_events(await asyncio.wait_for(response.text(), 2.0))
        assert time.monotonic() - start < 1.5
        assert events[0]["choices"][0]["text"] == OUTPUT_TEXTS[0]
        assert events[-1]["error"]["type"] == "upstream_error"
        assert (await s.cluster())["instances"] == []
        await asyncio.wait_for(fake.cancelled.wait(), 2.0)
        assert s.router._streams == {}


async def keep_beating(s: Sched, fake: FakeInstance) -> None:
    while True:
        await s.beat(fake)
        await asyncio.sleep(0.05)


async def test_instance_dropped_before_its_first_token_is_redispatched() -> None:
    """The module's contract: a failure before the first output line, "the instance dropped by
    the reaper" included, re-dispatches. A real instance sends its response headers with the
    first token, so a request waits in ``_dispatch`` through the queue and the prefill; an
    instance that hangs there (stops beating, keeps its socket open) must not hang it."""
    async with scheduler(dead_after_s=0.3) as s:
        hung = FakeInstance("a0", gate=asyncio.Event(), gate_first=True)
        good = FakeInstance("b0")
        await s.join(hung)  # and never beats again
        await s.join(good)
        beating = asyncio.create_task(keep_beating(s, good))
        try:
            status, payload = await asyncio.wait_for(complete(s), 1.5)
        finally:
            beating.cancel()
            await asyncio.gather(beating, return_exceptions=True)
        assert status == 200, payload
        assert payload["choices"][0]["text"] == "".join(OUTPUT_TEXTS)
        assert (len(hung.bodies), len(good.bodies)) == (1, 1)
        assert "a0" not in s.router.table.instances
        await asyncio.wait_for(hung.cancelled.wait(), 2.0)


@pytest.mark.parametrize(
    ("field", "value"),
    [("load", None), ("load", "busy"), ("load", {"running": "many"}), ("transfer_bytes", "lots")],
)
async def test_malformed_heartbeat_is_400_and_changes_nothing(field: str, value: object) -> None:
    async with scheduler() as s:
        fake = FakeInstance("c0")
        await s.join(fake)
        response = await s.beat(fake, incarnation="inc-2", **{field: value})
        assert response.status == 400, await response.text()
        assert s.router.table.instances["c0"].incarnation == "inc-1"
        response = await s.beat(FakeInstance("c1"), **{field: value})
        assert response.status == 400, await response.text()
        assert [i["id"] for i in (await s.cluster())["instances"]] == ["c0"]


async def test_unready_instance_is_not_routed_to() -> None:
    async with scheduler() as s:
        fake = FakeInstance("c0")
        await s.join(fake, ready=False)
        assert (await s.http.get("/health")).status == 503
        assert not (await s.cluster())["healthy"]
        status, _ = await complete(s)
        assert status == 503 and fake.bodies == []
        assert (await s.beat(fake)).status == 200  # ready now
        assert (await s.http.get("/health")).status == 200
        status, _ = await complete(s)
        assert status == 200 and len(fake.bodies) == 1


async def test_health_needs_a_whole_plan() -> None:
    async with scheduler() as s:
        await s.join(FakeInstance("p0", "prefill"))
        assert (await s.http.get("/health")).status == 503
        await s.join(FakeInstance("d0", "decode"))
        assert (await s.http.get("/health")).status == 200


# ---- global prompt trees ------------------------------------------------------------------------

CONVERSATION = PROMPT + list(OUTPUT_IDS[:-1])  # 12 tokens: what has KV after the request


@pytest.mark.parametrize("keeps", [True, False])
async def test_colocated_tree_records_prompt_and_output(keeps: bool) -> None:
    async with scheduler() as s:
        await s.join(FakeInstance("c0", keeps=keeps))
        await s.oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3)
        match = s.router.trees["colocated"].match(CONVERSATION, time.monotonic())
        assert match == ({"c0": 12} if keeps else {})
        assert s.router.trees["colocated"].num_blocks == (3 if keeps else 0)


async def test_aborted_request_records_only_the_prompt() -> None:
    async with scheduler() as s:
        await s.join(FakeInstance("c0", finish_reason="abort"))
        status, _ = await complete(s)
        assert status == 503  # an abort from the instance
        match = s.router.trees["colocated"].match(CONVERSATION, time.monotonic())
        assert match == {"c0": 8}


@pytest.mark.parametrize("send_back", [True, False])
async def test_pd_trees(send_back: bool) -> None:
    async with scheduler() as s:
        await s.join(FakeInstance("p0", "prefill"))
        await s.join(FakeInstance("d0", "decode", send_back=send_back))
        await s.oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3)
        now = time.monotonic()
        # One tree serves every role; its holders say who holds what.
        held = s.router.trees["prefill"].match(CONVERSATION, now)
        assert held == {"p0": 12 if send_back else 8, "d0": 12}
        assert s.router.trees["decode"] is s.router.trees["prefill"]


# ---- observability ------------------------------------------------------------------------------


async def test_cluster_fields() -> None:
    async with scheduler("round_robin") as s:
        fake = FakeInstance("c0")
        load = {
            "running": 2,
            "waiting": 1,
            "pending_prefill_tokens": 30,
            "device": {"total": 100, "free": 60, "active": 30, "historical": 10},
            "dram": {"total": 400, "free": 390, "active": 0, "historical": 10},
        }
        await s.join(fake, load=load, transfer_bytes=1234)
        state = await s.cluster()
        assert (state["model"], state["policy"], state["healthy"]) == (MODEL, "round_robin", True)
        assert state["tree_blocks"] == 0
        [i] = state["instances"]
        assert (i["id"], i["role"], i["url"], i["pid"]) == ("c0", "colocated", fake.url, 4242)
        assert (i["healthy"], i["ready"], i["keeps"]) == (True, True, True)
        assert i["load"] == {
            "running": 2,
            "waiting": 1,
            "pending_prefill_tokens": 30,
            "inflight": 0,
            "queued_s": 0.0,
        }
        assert i["kv_blocks"] == {"device": load["device"], "dram": load["dram"]}
        assert i["kv_transfer_bytes"] == 1234
        assert 0 <= i["last_heartbeat_s"] < 5
        info = await (await s.http.get("/internal/cluster-info")).json()
        assert info == {"model": MODEL, "rendezvous": "127.0.0.1:29500"}


async def test_metrics_count_decisions_and_prefix_hits() -> None:
    async with scheduler("round_robin") as s:
        # round_robin: turn 0 goes to the colocated instance, turn 1 to the pair
        await s.join(FakeInstance("c0", num_cached_tokens=4))
        await s.join(FakeInstance("p0", "prefill"))
        await s.join(FakeInstance("d0", "decode", num_cached_tokens=6))
        await s.oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3)
        await s.oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3)
        m = await s.metrics()

        def value(name: str, **labels: str) -> float:
            return m[(name, tuple(sorted(labels.items())))]

        decisions = "memserve_router_decisions_total"
        assert value(decisions, policy="round_robin", plan="colocated") == 1
        assert value(decisions, policy="round_robin", plan="pd") == 1
        assert value("memserve_router_prompt_tokens_total", role="colocated") == 10
        assert value("memserve_router_prompt_tokens_total", role="prefill") == 10
        assert value("memserve_router_cached_prompt_tokens_total", role="colocated") == 4
        assert value("memserve_router_cached_prompt_tokens_total", role="prefill") == 6
        assert value("memserve_router_prefix_hit_rate", role="colocated") == pytest.approx(0.4)
        assert value("memserve_router_prefix_hit_rate", role="prefill") == pytest.approx(0.6)
        assert value("memserve_router_requests_total", finish_reason="length") == 2
        assert value("memserve_instance_inflight", instance="c0", role="colocated") == 0


async def test_decisions_are_logged_at_debug_only() -> None:
    """Each routing decision is one debug event with the request id and the cost terms; with
    debug off nothing is built."""
    logger = logging.getLogger("memserve.scheduler.router")
    level = logger.level
    async with scheduler() as s:
        await s.join(FakeInstance("c0"))
        try:
            logger.setLevel(logging.INFO)
            with capture_logs() as quiet:
                assert (await complete(s))[0] == 200
            logger.setLevel(logging.DEBUG)
            with capture_logs() as events:
                assert (await complete(s))[0] == 200
        finally:
            logger.setLevel(level)
    assert [e for e in quiet if e["event"] == "route"] == []
    [event] = [e for e in events if e["event"] == "route"]
    assert event["instance"] == "c0" and event["policy"] == "prompt_tree"
    assert event["request_id"].startswith("cmpl-") and event["total_s"] > 0
