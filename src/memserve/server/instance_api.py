"""An instance's side of the global scheduler: the dispatch route and the heartbeat.

Routes (internal; the scheduler calls them):

| route                     | does                                                                |
|---------------------------|---------------------------------------------------------------------|
| ``/internal/generate``    | run one request; NDJSON, one ``RequestOutput`` per line, from the  |
|                           | first token on (errors before it are plain HTTP errors: 400, 503)  |
| ``/internal/kv/migrate``  | send the KV held here of ``tokens`` to instance ``to`` (P/D roles)  |

``/internal/generate`` takes ``{request_id, prompt_token_ids, params, prefill}``; ``prefill``
names the prefill instance a decode instance should use (the scheduler's choice; others are
tried if it fails). The scheduler closing the connection cancels the handler, which aborts the
request.

``SchedulerLink.run()`` (one task, owned by the node) POSTs a heartbeat to the scheduler every
``interval_s``: identity, what this instance keeps, whether it is ``ready`` to take requests,
its ``Load`` and the engine's recent step samples (the cost model refines itself from them). An
unreachable scheduler is retried. The load is read between two engine steps, but a heartbeat never
waits for one: while a long step (seconds for a big prefill on a slow CPU) holds the report back,
the beats go on with the last load read and no samples, so liveness never depends on step time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import aiohttp
import orjson
import structlog
from aiohttp import web

from memserve.engine.async_engine import AsyncEngine
from memserve.engine.llm_engine import LLMEngine
from memserve.engine.types import RequestOutput, SamplingParams
from memserve.engine.wire import output_to_json, params_from_json
from memserve.mempool.distributed import DistributedMemPool, Peer
from memserve.scheduler.cost_model import samples_to_rows
from memserve.scheduler.registry import load_to_json
from memserve.scheduler.types import Load, TierLoad
from memserve.server.errors import APIError, bad_request
from memserve.server.openai_api import read_json_object
from memserve.transport.registry import Registry

log = structlog.get_logger(__name__)

GenerateFn = Callable[
    [str, Sequence[int], SamplingParams, str | None], AsyncIterator[RequestOutput]
]
"""``(request_id, prompt ids, params, prefill instance id or None)`` → outputs."""

NDJSON_HEADERS = {"Content-Type": "application/x-ndjson", "Cache-Control": "no-cache"}


def add_instance_routes(
    app: web.Application,
    generate: GenerateFn | None,
    dmp: DistributedMemPool | None = None,
    registry: Registry | None = None,
) -> None:
    """``/internal/generate`` where ``generate`` is given (colocated and decode instances), and
    ``/internal/kv/migrate`` where a distributed MemPool is (prefill and decode instances)."""
    if generate is not None:

        async def handle_generate(request: web.Request) -> web.StreamResponse:
            return await _generate(request, generate)

        app.router.add_post("/internal/generate", handle_generate)
    if dmp is not None and registry is not None:

        async def handle_migrate(request: web.Request) -> web.Response:
            return await _migrate(request, dmp, registry)

        app.router.add_post("/internal/kv/migrate", handle_migrate)


async def _generate(request: web.Request, generate: GenerateFn) -> web.StreamResponse:
    body = await read_json_object(request)
    try:
        request_id = str(body["request_id"])
        prompt = [int(t) for t in body["prompt_token_ids"]]  # type: ignore[attr-defined]
        params = params_from_json(body["params"])  # type: ignore[arg-type]
        prefill = body.get("prefill")
    except (KeyError, TypeError, ValueError) as e:
        raise bad_request(f"bad dispatch message: {e!r}") from e
    stream = generate(request_id, prompt, params, None if prefill is None else str(prefill))
    async with contextlib.aclosing(stream):  # type: ignore[type-var]
        first = await anext(stream)  # RequestError / EngineOverloadedError → 400 / 503
        response = web.StreamResponse(headers=NDJSON_HEADERS)
        await response.prepare(request)
        await response.write(_line(first))
        if not first.finished:
            async for out in stream:
                await response.write(_line(out))
        await response.write_eof()
    return response


def _line(out: RequestOutput) -> bytes:
    return orjson.dumps(output_to_json(out)) + b"\n"


async def _migrate(
    request: web.Request, dmp: DistributedMemPool, registry: Registry
) -> web.Response:
    body = await read_json_object(request)
    try:
        tokens = [int(t) for t in body["tokens"]]  # type: ignore[attr-defined]
        to = str(body["to"])
    except (KeyError, TypeError, ValueError) as e:
        raise bad_request(f"bad migrate message: {e!r}") from e
    peer = registry.find(to)
    if peer is None:
        raise APIError(404, f"instance {to!r} is not a live peer here", code="unknown_peer")
    num_tokens = await dmp.send_cached(Peer(peer.endpoint, peer.url), tokens)
    return web.Response(
        body=orjson.dumps({"num_tokens": num_tokens}), content_type="application/json"
    )


class SchedulerLink:
    """Heartbeats to the scheduler at ``scheduler_url``; ``identity``: id, role, url, model,
    incarnation, keeps, send_back (``pid`` is added)."""

    def __init__(
        self,
        scheduler_url: str,
        identity: dict[str, Any],
        engine: AsyncEngine,
        dmp: DistributedMemPool | None = None,
        ready: Callable[[], bool] = lambda: True,
        interval_s: float = 0.5,
    ) -> None:
        self.url = scheduler_url.rstrip("/") + "/internal/heartbeat"
        self.identity = {**identity, "pid": os.getpid()}
        self.engine = engine
        self.dmp = dmp
        self.ready = ready
        self.interval_s = interval_s

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=max(2.0, 4 * self.interval_s))
        report: asyncio.Task[dict[str, Any]] | None = None  # owned here, cancelled on exit
        last_load: dict[str, Any] = {}
        try:
            async with aiohttp.ClientSession(timeout=timeout) as http:
                warned = False
                while True:
                    if report is None:
                        report = asyncio.ensure_future(self.engine.call(_report))
                    await asyncio.wait({report}, timeout=self.interval_s)
                    body: dict[str, Any] = {"load": last_load} if last_load else {}
                    if report.done():
                        body = self._take(report) or body
                        last_load = body.get("load", last_load)
                        report = None
                    warned = await self._beat(http, body, warned)
                    await asyncio.sleep(self.interval_s)
        finally:
            if report is not None:
                report.cancel()

    @staticmethod
    def _take(report: asyncio.Task[dict[str, Any]]) -> dict[str, Any]:
        try:
            return report.result()
        except Exception:  # a bug: say so, keep beating (load and samples are extras)
            log.exception("cannot report load")
            return {}

    async def _beat(self, http: aiohttp.ClientSession, body: dict[str, Any], warned: bool) -> bool:
        """POST one heartbeat; returns whether "unreachable" has been logged (once per outage)."""
        body.update(self.identity)
        body["ready"] = self.ready()
        if self.dmp is not None:
            c = self.dmp.counters
            body["transfer_bytes"] = c.sent_bytes + c.received_bytes
        try:
            async with http.post(self.url, data=orjson.dumps(body)) as response:
                if response.status != 200:
                    log.error("scheduler refused the heartbeat", reply=await response.text())
            return False
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            if not warned:
                log.warning("scheduler unreachable", url=self.url, error=repr(e))
            return True


def _report(engine: LLMEngine) -> dict[str, Any]:
    """Load and recent step samples, read between two steps (engine thread)."""
    sched = engine.scheduler
    pending = sum(
        max(0, r.num_prompt_tokens - r.num_computed_tokens)
        for r in (*sched.waiting, *sched.running)
    )
    snap = engine.snapshot()

    def tier(t: Any) -> TierLoad:
        return TierLoad(t.blocks_total, t.blocks_free, t.blocks_active, t.blocks_historical)

    load = Load(len(sched.running), len(sched.waiting), pending, tier(snap.device), tier(snap.dram))
    samples = samples_to_rows(engine.drain_step_samples())
    return {"load": load_to_json(load), "step_samples": samples}
