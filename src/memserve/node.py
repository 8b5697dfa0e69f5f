"""Start-up of one ``memserve-node`` process: ``scheduler``, ``colocated``, ``prefill`` or ``decode``.

The scheduler (``run_scheduler``) hosts the rendezvous TCPStore and serves the OpenAI API in
front of the cluster (``scheduler.router.Router``); it loads the tokenizer, never the weights.
An instance started with ``--scheduler-url`` serves ``/internal/generate`` (and, with a
distributed MemPool, ``/internal/kv/migrate``) and beats to the scheduler
(``server.instance_api``).

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
import contextlib
import os
import signal
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import TypeVar

import structlog
import torch
from aiohttp import web
from torch._C._distributed_c10d import TCPStore

from memserve.config import (
    DisaggConfig,
    EngineConfig,
    ModelConfig,
    Role,
    RouterConfig,
    ServerConfig,
)
from memserve.engine.async_engine import AsyncEngine
from memserve.engine.disagg import DecodeFront, PrefillWorker
from memserve.engine.llm_engine import LLMEngine
from memserve.logging import configure_logging
from memserve.mempool.distributed import DistributedMemPool
from memserve.mempool.pool import MemPool
from memserve.model.arch import LlamaArch
from memserve.model.loader import load_tokenizer
from memserve.scheduler.cost_model import OperatorCostModel, samples_from_rows
from memserve.scheduler.metrics import RouterMetrics
from memserve.scheduler.policy import make_policy
from memserve.scheduler.registry import Instance, InstanceTable
from memserve.scheduler.router import Router
from memserve.scheduler.types import make_trees
from memserve.server.control_api import add_control_routes
from memserve.server.instance_api import SchedulerLink, add_instance_routes
from memserve.server.openai_api import build_app, run_server
from memserve.server.scheduler_api import build_scheduler_app
from memserve.transport.channels import Channels, Endpoint
from memserve.transport.registry import InstanceInfo, Registry, wait_all_left

log = structlog.get_logger(__name__)

T = TypeVar("T")

STORE_LINGER_S = 30.0
"""How long a stopping scheduler keeps the rendezvous store up for instances still leaving."""


def run_node(
    config: EngineConfig,
    server: ServerConfig,
    num_threads: int | None = None,
    role: Role = "colocated",
    disagg: DisaggConfig | None = None,
    scheduler_url: str | None = None,
    instance_id: str | None = None,
) -> int:
    """One instance; with ``scheduler_url`` it joins that scheduler's cluster (as
    ``instance_id``; a P/D instance's id is ``disagg.instance_id``)."""
    configure_logging(server.log_format, server.log_level)
    torch.set_num_threads(num_threads or os.cpu_count() or 1)
    try:
        engine = LLMEngine(config)
    except (FileNotFoundError, ValueError) as e:
        log.error("cannot load model", error=str(e))
        return 2
    if role == "colocated" or disagg is None:
        make_app: Callable[[], web.Application] = lambda: build_node_app(  # noqa: E731
            engine, server, scheduler_url, instance_id
        )
    else:
        try:
            store = open_store(disagg)
        except (RuntimeError, TimeoutError) as e:  # torch raises DistStoreError (a RuntimeError)
            log.error("cannot reach the rendezvous store", address=disagg.rendezvous, error=str(e))
            return 2
        make_app = lambda: build_disagg_app(  # noqa: E731
            engine, role, disagg, server, store, scheduler_url
        )
    try:
        import uvloop

        uvloop.run(_serve(make_app, engine.model_name, server))
    except KeyboardInterrupt:
        pass
    log.info("stopped")
    return 0


def run_scheduler(
    model: ModelConfig, block_size: int, router: RouterConfig, server: ServerConfig
) -> int:
    """The global scheduler: rendezvous store, instance table, trees, policy, OpenAI API."""
    configure_logging(server.log_format, server.log_level)
    try:
        arch, tokenizer = load_tokenizer(model.model)
        cost = (
            OperatorCostModel.load(router.cost_profile)
            if router.cost_profile
            else OperatorCostModel.default(kv_bytes_per_token(arch, model.dtype))
        )
    except (FileNotFoundError, ValueError, OSError) as e:
        log.error("cannot start the scheduler", error=str(e))
        return 2
    host, _, port = router.rendezvous.rpartition(":")
    try:
        store = TCPStore(host, int(port), is_master=True, wait_for_workers=False)
    except RuntimeError as e:
        log.error("cannot host the rendezvous store", address=router.rendezvous, error=str(e))
        return 2
    table = InstanceTable(model.name, block_size, router.dead_after_s)
    trees = make_trees(block_size, router.tree_ttl_s, router.tree_max_blocks)
    the_router = Router(
        table,
        make_policy(router.policy, cost),
        trees,
        tokenizer,
        model.max_model_len or arch.max_position_embeddings,
        RouterMetrics(table),
        model_name=model.name,
        max_attempts=router.max_attempts,
    )

    def refine(instance: Instance, rows: list[list[float]]) -> None:
        try:
            cost.observe(samples_from_rows(rows))
        except (TypeError, ValueError) as e:
            log.warning("bad step samples", instance=instance.instance_id, error=str(e))

    the_router.on_step_samples = refine
    log.info("scheduler", policy=router.policy, rendezvous=router.rendezvous)
    try:
        import uvloop

        uvloop.run(
            _serve(lambda: build_scheduler_app(the_router, router.rendezvous), model.name, server)
        )
    except KeyboardInterrupt:
        pass
    # The rendezvous goes last: instances leave through it (their registries mark themselves
    # gone there), so it stays up until they have, or for at most STORE_LINGER_S.
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C ends the wait
    with contextlib.suppress(KeyboardInterrupt):
        if not wait_all_left(store, STORE_LINGER_S, router.dead_after_s):
            log.warning("instances still registered; closing the rendezvous store anyway")
    log.info("stopped")
    return 0


def kv_bytes_per_token(arch: LlamaArch, dtype: str) -> int:
    """K and V of every layer for one token (``auto`` counts 2-byte elements)."""
    return 2 * arch.num_layers * arch.kv_size * (4 if dtype == "float32" else 2)


def advertised_url(server: ServerConfig) -> str:
    """How other processes reach this one: ``--host``, or this machine's name for 0.0.0.0."""
    host = server.host if server.host not in ("0.0.0.0", "", "::") else socket.getfqdn()
    return f"http://{host}:{server.port}"


def build_node_app(
    engine: LLMEngine,
    server: ServerConfig | None = None,
    scheduler_url: str | None = None,
    instance_id: str | None = None,
) -> web.Application:
    """The OpenAI app with the engine loop owned by the app's cleanup context; with a
    ``scheduler_url``, also the dispatch route and the heartbeat to that scheduler."""
    async_engine = AsyncEngine(engine)
    app = build_app(async_engine)
    link = None
    if scheduler_url is not None and server is not None:
        add_instance_routes(app, lambda rid, p, params, _: async_engine.generate(rid, p, params))
        name = instance_id or f"colocated-{server.port}"
        identity = _identity(engine, name, "colocated", server, False)
        link = SchedulerLink(scheduler_url, identity, async_engine)

    async def engine_ctx(_: web.Application) -> AsyncIterator[None]:
        async_engine.start()
        beating = None if link is None else asyncio.create_task(link.run(), name="heartbeat")
        yield
        if beating is not None:
            beating.cancel()
            await asyncio.gather(beating, return_exceptions=True)
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


def _identity(
    engine: LLMEngine,
    instance_id: str,
    role: str,
    server: ServerConfig,
    send_back: bool,
    endpoint: str | None = None,
) -> dict[str, object]:
    """What an instance tells the scheduler about itself (``endpoint``: its KV transport
    endpoint, ``id@incarnation`` in the rendezvous store, for P/D instances)."""
    return {
        "id": instance_id,
        "role": role,
        "url": advertised_url(server),
        "model": engine.model_name,
        "block_size": engine.pool.block_size,
        "incarnation": uuid.uuid4().hex[:12],
        "keeps": engine.kv.enable_caching,
        "send_back": send_back,
        "device": str(engine.device),
        "endpoint": endpoint,
    }


def build_disagg_app(
    engine: LLMEngine,
    role: Role,
    disagg: DisaggConfig,
    server: ServerConfig,
    store: TCPStore,
    scheduler_url: str | None = None,
) -> web.Application:
    """A prefill or decode instance: the engine, its distributed MemPool, the registry, the
    control API, and the OpenAI API (the P/D front door on a decode instance). The cleanup
    context starts them in that order and stops them in reverse."""
    async_engine = AsyncEngine(engine)
    me = Endpoint(disagg.instance_id, uuid.uuid4().hex[:12])
    url = advertised_url(server)
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
    link = None
    if scheduler_url is not None:
        # The scheduler dispatches whole requests to decode instances only.
        add_instance_routes(app, None if front is None else front.generate, dmp, registry)
        identity = _identity(engine, disagg.instance_id, role, server, disagg.send_back, me.key)
        ready = (lambda: bool(registry.live("prefill"))) if front is not None else (lambda: True)
        link = SchedulerLink(scheduler_url, identity, async_engine, dmp, ready)

    async def cluster_ctx(_: web.Application) -> AsyncIterator[None]:
        async_engine.start()
        await dmp.start()
        tasks = [asyncio.create_task(registry.run(), name="registry")]
        if link is not None:
            tasks.append(asyncio.create_task(link.run(), name="heartbeat"))
        yield
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if front is not None:
            await front.close()
        await dmp.close()
        await async_engine.stop()

    app.cleanup_ctx.append(cluster_ctx)
    return app


def _backend(engine: LLMEngine) -> str:
    return "nccl" if engine.device.type == "cuda" else "gloo"


async def _serve(make_app: Callable[[], web.Application], model: str, server: ServerConfig) -> None:
    app = make_app()
    log.info("serving", url=f"http://{server.host}:{server.port}/v1", model=model)
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


if __name__ == "__main__":  # `torchrun ... -m memserve.node --layout ...`
    import sys

    from memserve.cli import main

    sys.exit(main())
