"""The internal control API between instances (JSON via orjson; never pickle).

Routes (all ``POST``, body and reply JSON objects; errors use the OpenAI error body):

| route                   | side     | does                                                        |
|-------------------------|----------|-------------------------------------------------------------|
| ``/internal/kv/offer``  | receiver | reserve for ``tokens`` from ``src`` → ``Ticket`` (insert)   |
| ``/internal/kv/expect`` | receiver | expect data for allocated ``dst_blocks`` → ``Ticket``       |
| ``/internal/kv/commit`` | receiver | receive ``transfer_id`` now (the sender is sending)         |
| ``/internal/kv/abort``  | receiver | the sender gave up on ``transfer_id``                       |
| ``/internal/kv/alloc``  | receiver | ``alloc_mem`` on behalf of ``src`` → hold key + block ids   |
| ``/internal/kv/free``   | receiver | free such an allocation                                     |
| ``/internal/prefill``   | prefill  | prefill a prompt and push its KV to the decode instance     |
| ``/internal/check``     | any      | ``check_integrity()`` now (between steps) + in-flight holds |

A receive that fails answers 502; no room answers 503; a malformed body 400.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import orjson
from aiohttp import web

from memserve.engine.async_engine import AsyncEngine
from memserve.engine.disagg import PrefillWorker
from memserve.engine.llm_engine import LLMEngine
from memserve.engine.types import EngineOverloadedError
from memserve.mempool.block_allocator import NoFreeBlocksError
from memserve.mempool.distributed import DistributedMemPool, endpoint_from
from memserve.mempool.pool import MemPool, Tier
from memserve.server.errors import APIError, bad_request
from memserve.server.openai_api import read_json_object
from memserve.transport.channels import TransferError

Body = dict[str, Any]
Handler = Callable[[web.Request], Awaitable[web.Response]]


def add_control_routes(
    app: web.Application,
    dmp: DistributedMemPool,
    engine: AsyncEngine | None = None,
    prefill: PrefillWorker | None = None,
) -> None:
    """The routes of ``dmp`` (and of ``prefill`` on a prefill instance). ``/internal/check`` runs
    the engine's check when ``engine`` is given, else the pool's (a pool-only process)."""
    routes: dict[str, Callable[[DistributedMemPool, Body], Awaitable[Body]]] = {
        "offer": _offer,
        "expect": _expect,
        "commit": _commit,
        "abort": _abort,
        "alloc": _alloc,
        "free": _free,
    }
    for name, fn in routes.items():
        app.router.add_post(f"/internal/kv/{name}", json_route(partial(fn, dmp)))
    app.router.add_post("/internal/check", json_route(partial(_check, dmp, engine)))
    if prefill is not None:
        app.router.add_post("/internal/prefill", json_route(prefill.prefill))


def json_route(fn: Callable[[Body], Awaitable[Body]]) -> Handler:
    """A POST handler from ``fn(body) -> reply``: JSON object in (an empty body reads as ``{}``),
    JSON out, the distributed calls' failures mapped to statuses (``_guard``)."""

    async def handle(request: web.Request) -> web.Response:
        body = await read_json_object(request) if request.can_read_body else {}
        return _reply(await _guard(fn(body)))

    return handle


async def _check(dmp: DistributedMemPool, engine: AsyncEngine | None, _: Body) -> Body:
    """Run the block conservation check between two steps (tests, operators): the in-flight
    holds and block counts, or 500 naming the violation."""

    def check(pool: MemPool, llm: LLMEngine | None) -> Body:
        if llm is not None:
            llm.check_integrity()
        else:
            pool.check_integrity()
        running = 0 if llm is None else llm.num_waiting + len(llm.scheduler.running)
        return {
            "holds": sorted(pool.holds),
            "running": running,
            "free_blocks": pool.num_free(Tier.DEVICE),
            "total_blocks": pool.num_blocks(Tier.DEVICE),
            "historical_blocks": pool.num_historical(Tier.DEVICE),
        }

    try:
        if engine is not None:
            return await engine.call(lambda e: check(e.pool, e))
        return await dmp.run(lambda pool: check(pool, None))
    except AssertionError as e:
        raise APIError(500, f"integrity check failed: {e}", type="server_error") from e


async def _guard(call: Awaitable[Body]) -> Body:
    """Map the distributed calls' failures to HTTP answers."""
    try:
        return await call
    except (KeyError, TypeError, ValueError) as e:
        raise bad_request(f"bad control message: {e!r}") from e
    except (NoFreeBlocksError, EngineOverloadedError) as e:
        raise APIError(503, str(e), type="server_overloaded", code="no_room") from e
    except TransferError as e:
        raise APIError(502, str(e), type="server_error", code="transfer_failed") from e


def _reply(body: Body) -> web.Response:
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def _offer(dmp: DistributedMemPool, body: Body) -> Body:
    tokens = [int(t) for t in body["tokens"]]
    return (await dmp.expect(endpoint_from(body["src"]), tokens, insert=True)).to_dict()


async def _expect(dmp: DistributedMemPool, body: Body) -> Body:
    src = endpoint_from(body["src"])
    blocks = [int(b) for b in body["dst_blocks"]]
    ticket = await dmp.expect_blocks(src, str(body["hold"]), blocks, Tier(body["tier"]))
    return ticket.to_dict()


async def _commit(dmp: DistributedMemPool, body: Body) -> Body:
    src_ids = body.get("src_block_ids")
    src_block_ids = None if src_ids is None else [int(b) for b in src_ids]
    num_blocks = await dmp.receive(
        endpoint_from(body["src"]), str(body["transfer_id"]), src_block_ids
    )
    return {"num_blocks": num_blocks}


async def _abort(dmp: DistributedMemPool, body: Body) -> Body:
    await dmp.abort(endpoint_from(body["src"]), str(body["transfer_id"]))
    return {}


async def _alloc(dmp: DistributedMemPool, body: Body) -> Body:
    key, ids = await dmp.alloc(
        endpoint_from(body["src"]), int(body["num_blocks"]), Tier(body["tier"])
    )
    return {"hold": key, "block_ids": ids}


async def _free(dmp: DistributedMemPool, body: Body) -> Body:
    return {"freed": await dmp.free(endpoint_from(body["src"]), str(body["hold"]))}
