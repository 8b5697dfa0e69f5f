"""An instance's heartbeats go on while its engine is inside a long step."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

from aiohttp import web
from aiohttp.test_utils import TestServer

from memserve.engine.async_engine import AsyncEngine
from memserve.server.instance_api import SchedulerLink


class SlowEngine:
    """``call`` answers only when the test opens the gate (a step that takes as long as it
    likes); each answer is a distinct load and one step sample."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.num_reports = 0

    async def call(self, fn: Callable[[Any], Any]) -> dict[str, Any]:
        await self.gate.wait()
        self.gate.clear()
        self.num_reports += 1
        return {"load": {"running": self.num_reports}, "step_samples": [[self.num_reports]]}


async def test_heartbeats_do_not_wait_for_a_long_step() -> None:
    beats: list[dict[str, Any]] = []

    async def heartbeat(request: web.Request) -> web.Response:
        beats.append(await request.json())
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/internal/heartbeat", heartbeat)
    engine = SlowEngine()
    async with TestServer(app) as server:
        link = SchedulerLink(
            str(server.make_url("")), {"instance_id": "p-0"}, cast(AsyncEngine, engine),
            interval_s=0.05,
        )  # fmt: skip
        task = asyncio.create_task(link.run())
        try:
            await asyncio.sleep(0.5)  # the engine is "in a step" the whole time
            assert len(beats) >= 4 and engine.num_reports == 0
            assert all(b["instance_id"] == "p-0" and "load" not in b for b in beats)
            engine.gate.set()  # the step ends: the next beat carries the report
            await asyncio.sleep(0.3)  # and the next step is long again
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    assert engine.num_reports == 1
    with_samples = [b for b in beats if "step_samples" in b]
    assert [b["step_samples"] for b in with_samples] == [[[1]]]  # sent once, never repeated
    later = beats[beats.index(with_samples[0]) :]
    assert len(later) >= 3 and all(b["load"] == {"running": 1} for b in later)
