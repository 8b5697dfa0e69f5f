"""The instance registry: who is in the cluster, and who is still alive.

It lives in the rendezvous ``TCPStore`` (hosted by the scheduler, or by the first instance), so it
needs no other service. TCPStore cannot list keys, so entries are numbered:

- ``instances/n``: how many instances ever registered (``add``), and ``instances/{i}`` the i-th
  one's ``InstanceInfo`` as JSON. A restarted instance registers again under a new incarnation.
- ``hb/{instance_id}@{incarnation}``: a counter its owner bumps every ``interval_s``. A peer whose
  counter has not moved for ``dead_after_s`` is gone; a clean stop drives it negative, which every
  watcher reads as gone at its next poll.

``Registry.run()`` is one task (owned by the node) that registers, beats, polls, and calls
``on_join`` / ``on_leave`` from the event loop. Store calls block, so they run in one worker
thread with its own ``store.clone()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import orjson
import structlog
from torch._C._distributed_c10d import Store

from memserve.transport.channels import Endpoint

log = structlog.get_logger(__name__)

_GONE = -(1 << 40)


@dataclass(frozen=True)
class InstanceInfo:
    endpoint: Endpoint
    role: str
    url: str  # http://host:port of its control (and, for serving roles, OpenAI) API

    def to_json(self) -> bytes:
        e = self.endpoint
        return orjson.dumps(
            {"id": e.instance_id, "inc": e.incarnation, "role": self.role, "url": self.url}
        )

    @staticmethod
    def from_json(raw: bytes) -> InstanceInfo:
        d = orjson.loads(raw)
        return InstanceInfo(Endpoint(d["id"], d["inc"]), d["role"], d["url"])


class Registry:
    def __init__(
        self,
        store: Store,
        me: InstanceInfo,
        interval_s: float = 0.5,
        dead_after_s: float = 3.0,
    ) -> None:
        self.me = me
        self.interval_s = interval_s
        self.dead_after_s = dead_after_s
        self._store: Store = store.clone()  # type: ignore[attr-defined]  # torch's stub lacks it
        self._seen = 0  # entries of instances/* read so far
        self._beats: dict[str, tuple[int, float]] = {}  # endpoint key -> (counter, when it moved)
        self.peers: dict[str, InstanceInfo] = {}  # live peers by endpoint key
        self.on_join: list[Callable[[InstanceInfo], Awaitable[None]]] = []
        self.on_leave: list[Callable[[InstanceInfo], Awaitable[None]]] = []

    def live(self, role: str) -> list[InstanceInfo]:
        """Live peers with ``role``, in registration order."""
        return [p for p in self.peers.values() if p.role == role]

    def find(self, instance_id: str) -> InstanceInfo | None:
        return next((p for p in self.peers.values() if p.endpoint.instance_id == instance_id), None)

    async def run(self) -> None:
        """Register, then beat and poll until cancelled; on cancellation mark this instance gone."""
        await asyncio.to_thread(self._register)
        try:
            while True:
                try:
                    joined, left = await asyncio.to_thread(self._tick, list(self.peers.values()))
                except RuntimeError as e:  # the store is unreachable: keep what we know, retry
                    log.warning("rendezvous store unreachable", error=str(e))
                    await asyncio.sleep(self.interval_s)
                    continue
                for info in joined:
                    self.peers[info.endpoint.key] = info
                for info in left:
                    self.peers.pop(info.endpoint.key, None)
                for info in joined:
                    await self._notify(self.on_join, info, "instance joined")
                for info in left:
                    await self._notify(self.on_leave, info, "instance left")
                await asyncio.sleep(self.interval_s)
        finally:
            await asyncio.shield(asyncio.to_thread(self._leave))

    async def _notify(
        self,
        callbacks: list[Callable[[InstanceInfo], Awaitable[None]]],
        info: InstanceInfo,
        what: str,
    ) -> None:
        log.info(what, instance=info.endpoint.instance_id, role=info.role, url=info.url)
        for callback in callbacks:
            await callback(info)

    def _register(self) -> None:
        index = self._store.add("instances/n", 1) - 1
        self._store.set(f"instances/{index}", self.me.to_json().decode())
        self._store.add(self._hb(self.me), 1)

    def _leave(self) -> None:
        with contextlib.suppress(RuntimeError):  # the store's host is gone already
            self._store.add(self._hb(self.me), _GONE)

    def _tick(self, known: list[InstanceInfo]) -> tuple[list[InstanceInfo], list[InstanceInfo]]:
        """Beat once, read new registrations and the ``known`` peers' counters (worker thread:
        touches only the store and ``_beats``; the event loop applies the result to ``peers``)."""
        store = self._store
        store.add(self._hb(self.me), 1)
        joined: list[InstanceInfo] = []
        for index in range(self._seen, store.add("instances/n", 0)):
            info = InstanceInfo.from_json(store.get(f"instances/{index}"))
            self._seen = index + 1
            if info.endpoint != self.me.endpoint and store.add(self._hb(info), 0) >= 0:
                self._beats[info.endpoint.key] = (-1, time.monotonic())
                joined.append(info)
        left = [info for info in known if not self._alive(info)]
        for info in left:
            del self._beats[info.endpoint.key]
        return joined, left

    def _alive(self, info: InstanceInfo) -> bool:
        count = self._store.add(self._hb(info), 0)
        now = time.monotonic()
        last, since = self._beats[info.endpoint.key]
        if count != last:
            self._beats[info.endpoint.key] = (count, now)
            since = now
        return count >= 0 and now - since < self.dead_after_s

    @staticmethod
    def _hb(info: InstanceInfo) -> str:
        return f"hb/{info.endpoint.key}"
