"""Start-up of one ``memserve-node`` process: ``colocated``, ``prefill`` or ``decode``.

Prefill and decode instances also join the cluster: they connect to the rendezvous TCPStore
(hosting it with ``--host-rendezvous``) before the event loop starts, register there with a
fresh incarnation, beat, and watch their peers (``transport.registry``); they serve the internal
control API (``server.control_api``) next to the OpenAI one. The decode instance's OpenAI API is
the front door of a P/D pair (``engine.disagg.DecodeFront``) until the global scheduler exists.

Shutdown order on SIGINT/SIGTERM: the site stops accepting connections → in-flight handlers are
cancelled (their requests aborted) → the engine loop is cancelled and awaited (cleanup context) →
the event loop closes. The node installs its own handlers for both signals on the event loop
(``loop.add_signal_handler``) rather than relying on ``asyncio.Runner``'s SIGINT handling, which
uvloop 0.23 does not deliver reliably (measured: the main task was never cancelled).
"""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import TypeVar

import structlog
import torch
from aiohttp import web
from torch._C._distributed_c10d import TCPStore

from memserve.config import DisaggConfig, EngineConfig, Role, ServerConfig
from memserve.engine.async_engine import AsyncEngine
from memserve.engine.disagg import DecodeFront, PrefillWorker
from memserve.engine.llm_engine import LLMEngine
from memserve.logging import configure_logging
from memserve.mempool.distributed import DistributedMemPool
from memserve.mempool.pool import MemPool
from memserve.server.control_api import add_control_routes
from memserve.server.openai_api import build_app, run_server
from memserve.transport.channels import Channels, Endpoint
from memserve.transport.registry import InstanceInfo, Registry

log = structlog.get_logger(__name__)

T = TypeVar("T")


def run_node(
    config: EngineConfig,
    server: ServerConfig,
    num_threads: int | None = None,
    role: Role = "colocated",
    disagg: DisaggConfig | None = None,
) -> int:
    configure_logging(server.log_format, server.log_level)
    torch.set_num_threads(num_threads or os.cpu_count() or 1)
    try:
        engine = LLMEngine(config)
    except (FileNotFoundError, ValueError) as e:
        log.error("cannot load model", error=str(e))
        return 2
    if role == "colocated" or disagg is None:
        make_app: Callable[[], web.Application] = lambda: build_node_app(engine)  # noqa: E731
    else:
        try:
            store = open_store(disagg)
        except (RuntimeError, TimeoutError) as e:  # torch raises DistStoreError (a RuntimeError)
            log.error("cannot reach the rendezvous store", address=disagg.rendezvous, error=str(e))
            return 2
        make_app = lambda: build_disagg_app(engine, role, disagg, server, store)  # noqa: E731
    try:
        import uvloop

        uvloop.run(_serve(make_app, engine, server))
    except KeyboardInterrupt:
        pass
    log.info("stopped")
    return 0


def build_node_app(engine: LLMEngine) -> web.Application:
    """The OpenAI app with the engine loop owned by the app's cleanup context."""
    async_engine = AsyncEngine(engine)
    app = build_app(async_engine)

    async def engine_ctx(_: web.Application) -> AsyncIterator[None]:
        async_engine.start()
        yield
        await async_engine.stop()

    app.cleanup_ctx.append(engine_ctx)
    return app


def open_store(disagg: DisaggConfig) -> TCPStore:
    """Connect to (or host) the rendezvous store; blocks until its host is up or times out."""
    host, port = disagg.rendezvous_address
    return TCPStore(
        host,
        port,
        is_master=disagg.host_rendezvous,
        wait_for_workers=False,
        timeout=timedelta(seconds=disagg.transfer_timeout_s),
    )


def build_disagg_app(
    engine: LLMEngine, role: Role, disagg: DisaggConfig, server: ServerConfig, store: TCPStore
) -> web.Application:
    """A prefill or decode instance: the engine, its distributed MemPool, the registry, the
    control API, and the OpenAI API (the P/D front door on a decode instance). The cleanup
    context starts them in that order and stops them in reverse."""
    async_engine = AsyncEngine(engine)
    me = Endpoint(disagg.instance_id, uuid.uuid4().hex[:12])
    url = f"http://{server.host}:{server.port}"
    channels = Channels(store, me, disagg.transfer_timeout_s, backend=_backend(engine))

    async def run(fn: Callable[[MemPool], T]) -> T:
        return await async_engine.call(lambda e: fn(e.pool))

    caching = engine.kv.enable_caching  # what the P/D stage left on for this role (cli.py)
    dmp = DistributedMemPool(engine.pool, channels, run, disagg.transfer_timeout_s, caching)
    registry = Registry(store, InstanceInfo(me, role, url), dead_after_s=disagg.peer_timeout_s)
    registry.on_leave.append(lambda info: dmp.forget(info.endpoint))
    engine.metrics.add_transfer_counters(lambda: dmp.counters)
    front = DecodeFront(async_engine, dmp, registry, disagg, url) if role == "decode" else None
    if front is not None:
        registry.on_leave.append(front.peer_left)
    app = build_app(front or async_engine)
    worker = PrefillWorker(async_engine, dmp) if role == "prefill" else None
    add_control_routes(app, dmp, async_engine, worker)

    async def cluster_ctx(_: web.Application) -> AsyncIterator[None]:
        async_engine.start()
        await dmp.start()
        beating = asyncio.create_task(registry.run(), name="registry")
        yield
        beating.cancel()
        await asyncio.gather(beating, return_exceptions=True)
        if front is not None:
            await front.close()
        await dmp.close()
        await async_engine.stop()

    app.cleanup_ctx.append(cluster_ctx)
    return app


def _backend(engine: LLMEngine) -> str:
    return "nccl" if engine.device.type == "cuda" else "gloo"


async def _serve(
    make_app: Callable[[], web.Application], engine: LLMEngine, server: ServerConfig
) -> None:
    app = make_app()
    log.info("serving", url=f"http://{server.host}:{server.port}/v1", model=engine.model_name)
    serving = asyncio.create_task(run_server(app, server.host, server.port), name="server")
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, serving.cancel)
    try:
        await serving
    except asyncio.CancelledError:
        if not serving.cancelled():
            raise  # we were cancelled from outside, not by a signal
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
