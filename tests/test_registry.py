"""The instance registry over a real TCPStore: joins (late ones included), clean leaves, silence."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta

from torch._C._distributed_c10d import TCPStore

from memserve.bench.launch import free_port
from memserve.transport.channels import Endpoint
from memserve.transport.registry import InstanceInfo, Registry


def info(name: str, role: str = "prefill") -> InstanceInfo:
    return InstanceInfo(Endpoint(name, "inc-" + name), role, f"http://{name}")


async def wait_for(cond: object, timeout_s: float = 10.0) -> None:
    assert callable(cond)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not cond():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


async def test_joins_leaves_and_silence() -> None:
    store = TCPStore(
        "127.0.0.1",
        free_port(),
        is_master=True,
        wait_for_workers=False,
        timeout=timedelta(seconds=10),
    )
    ghost = info("ghost")  # registered, then died before anyone started watching
    store.set(f"instances/{store.add('instances/n', 1) - 1}", ghost.to_json().decode())
    store.add(f"hb/{ghost.endpoint.key}", 7)
    a = Registry(store, info("a", "decode"), interval_s=0.05, dead_after_s=0.5)
    b = Registry(store, info("b"), interval_s=0.05, dead_after_s=0.5)
    left: list[str] = []

    async def on_leave(i: InstanceInfo) -> None:
        left.append(i.endpoint.instance_id)

    joined: list[str] = []

    async def on_join(i: InstanceInfo) -> None:
        joined.append(i.endpoint.instance_id)

    a.on_leave.append(on_leave)
    a.on_join.append(on_join)
    task_a = asyncio.create_task(a.run())
    task_b = asyncio.create_task(b.run())
    await wait_for(lambda: [p.endpoint.instance_id for p in a.live("prefill")] == ["b"])
    await wait_for(lambda: [p.endpoint.instance_id for p in b.live("decode")] == ["a"])
    # a late joiner is seen by both
    c = Registry(store, info("c"), interval_s=0.05, dead_after_s=0.5)
    task_c = asyncio.create_task(c.run())
    await wait_for(lambda: {p.endpoint.instance_id for p in a.live("prefill")} == {"b", "c"})
    # c counts a peer once it has seen its counter move: a tick or two after a saw c
    await wait_for(lambda: {p.endpoint.instance_id for p in c.peers.values()} == {"a", "b"})
    # a clean stop is noticed at the next poll
    task_b.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task_b
    await wait_for(lambda: left == ["b"], timeout_s=2.0)
    # silence: c stops beating without saying goodbye (as if killed)
    task_c.cancel()
    c._leave = lambda: None  # type: ignore[method-assign]
    with contextlib.suppress(asyncio.CancelledError):
        await task_c
    await wait_for(lambda: left == ["b", "c"], timeout_s=3.0)
    assert a.live("prefill") == []
    assert sorted(joined) == ["b", "c"]  # never the ghost
    task_a.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task_a
