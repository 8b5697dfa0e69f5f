"""The global scheduler's HTTP app: the public OpenAI API in front of the cluster (a ``Router``
is its ``EngineClient``), plus

| route                          | does                                                      |
|--------------------------------|-----------------------------------------------------------|
| ``GET /v1/cluster``            | every instance: id, role, url, pid, device, KV endpoint,  |
|                                | healthy, ready, load, KV                                  |
|                                | blocks per tier and state; the policy; blocks in the trees|
| ``POST /internal/heartbeat``   | an instance's heartbeat (registration is the first one)   |
| ``GET /internal/cluster-info`` | what a starting instance needs: model, rendezvous address |

``/health`` is 200 once the cluster can serve (a colocated instance, or a prefill and a decode
one). The cleanup context starts the router (its HTTP client and reaper) and stops it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiohttp import web

from memserve.scheduler.registry import load_to_json
from memserve.scheduler.router import Router
from memserve.scheduler.types import tree_blocks
from memserve.server.errors import bad_request
from memserve.server.openai_api import build_app, read_json_object


def build_scheduler_app(router: Router, rendezvous: str) -> web.Application:
    app = build_app(router)

    async def cluster(_: web.Request) -> web.Response:
        return _json(cluster_state(router))

    async def heartbeat(request: web.Request) -> web.Response:
        body = await read_json_object(request)
        try:
            return _json(router.heartbeat(body))
        except (KeyError, TypeError, ValueError) as e:
            raise bad_request(f"bad heartbeat: {e}") from e

    async def cluster_info(_: web.Request) -> web.Response:
        return _json({"model": router.model_name, "rendezvous": rendezvous})

    app.router.add_get("/v1/cluster", cluster)
    app.router.add_post("/internal/heartbeat", heartbeat)
    app.router.add_get("/internal/cluster-info", cluster_info)

    async def router_ctx(_: web.Application) -> AsyncIterator[None]:
        await router.start()
        yield
        await router.close()

    app.cleanup_ctx.append(router_ctx)
    return app


def cluster_state(router: Router) -> dict[str, Any]:
    now = time.monotonic()
    instances = []
    for i in sorted(router.table.instances.values(), key=lambda i: i.instance_id):
        load = load_to_json(i.load)
        instances.append(
            {
                "id": i.instance_id,
                "role": i.role,
                "url": i.url,
                "pid": i.pid,
                "device": i.device,
                "endpoint": i.endpoint,
                "healthy": i.suspect_until <= now,
                "ready": i.ready,
                "last_heartbeat_s": round(now - i.last_seen, 3),
                "keeps": i.keeps,
                "load": {k: load[k] for k in ("running", "waiting", "pending_prefill_tokens")}
                | {"inflight": i.inflight, "queued_s": max(0.0, i.queued_s)},
                "kv_blocks": {"device": load["device"], "dram": load["dram"]},
                "kv_transfer_bytes": i.transfer_bytes,
            }
        )
    return {
        "object": "cluster",
        "model": router.model_name,
        "policy": router.policy.name,
        "healthy": router.is_healthy(),
        "instances": instances,
        "tree_blocks": tree_blocks(router.trees),
    }


def _json(body: dict[str, Any]) -> web.Response:
    return web.Response(body=orjson.dumps(body), content_type="application/json")
