"""Start-up of one ``memserve-node`` process (role ``colocated`` today).

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
from collections.abc import AsyncIterator

import structlog
import torch
from aiohttp import web

from memserve.config import EngineConfig, ServerConfig
from memserve.engine.async_engine import AsyncEngine
from memserve.engine.llm_engine import LLMEngine
from memserve.logging import configure_logging
from memserve.server.openai_api import build_app, run_server

log = structlog.get_logger(__name__)


def run_node(config: EngineConfig, server: ServerConfig, num_threads: int | None = None) -> int:
    configure_logging(server.log_format, server.log_level)
    torch.set_num_threads(num_threads or os.cpu_count() or 1)
    try:
        engine = LLMEngine(config)
    except (FileNotFoundError, ValueError) as e:
        log.error("cannot load model", error=str(e))
        return 2
    try:
        import uvloop

        uvloop.run(_serve(engine, server))
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


async def _serve(engine: LLMEngine, server: ServerConfig) -> None:
    app = build_node_app(engine)
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
