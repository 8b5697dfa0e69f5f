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
        self._all: dict[str, InstanceInfo] = {}  # every other registered, not cleanly gone
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
                    alive = await asyncio.to_thread(self._tick)
                except RuntimeError as e:  # the store is unreachable: keep what we know, retry
                    log.warning("rendezvous store unreachable", error=str(e))
                    await asyncio.sleep(self.interval_s)
                    continue
                joined = [info for key, info in alive.items() if key not in self.peers]
                left = [info for key, info in self.peers.items() if key not in alive]
                self.peers = alive
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

    def _tick(self) -> dict[str, InstanceInfo]:
        """Beat once, read new registrations and every peer's counter; return the live peers.
        A peer is live while its counter moved within ``dead_after_s`` (and is not negative):
        one first seen counts only once its counter moves, so an instance that died before we
        started is never reported, and one silent for a while comes back when it beats again.
        Worker thread: touches only the store, ``_all`` and ``_beats``."""
        store = self._store
        store.add(self._hb(self.me), 1)
        for index in range(self._seen, store.add("instances/n", 0)):
            info = InstanceInfo.from_json(store.get(f"instances/{index}"))
            self._seen = index + 1
            if info.endpoint != self.me.endpoint:
                self._all[info.endpoint.key] = info
        now = time.monotonic()
        alive: dict[str, InstanceInfo] = {}
        for key, info in list(self._all.items()):
            count = store.add(self._hb(info), 0)
            if count < 0:  # left cleanly: never comes back under this incarnation
                del self._all[key]
                self._beats.pop(key, None)
                continue
            last = self._beats.get(key)
            if last is None:  # first sight: wait for a move
                self._beats[key] = (count, float("-inf"))
            elif count != last[0]:
                self._beats[key] = (count, now)
            if now - self._beats[key][1] < self.dead_after_s:
                alive[key] = info
        return alive

    @staticmethod
    def _hb(info: InstanceInfo) -> str:
        return f"hb/{info.endpoint.key}"


def wait_all_left(store: Store, timeout_s: float, silent_s: float = 3.0) -> bool:
    """Block until every instance registered in ``store`` has left (cleanly, or silent for
    ``silent_s``), at most ``timeout_s``; True if they all did. The store's host calls it
    before closing the store, so that leaving instances still reach it."""
    store = store.clone()  # type: ignore[attr-defined]  # torch's stub lacks it
    deadline = time.monotonic() + timeout_s
    last: dict[str, tuple[int, float]] = {}
    while True:
        now = time.monotonic()
        alive = 0
        for index in range(store.add("instances/n", 0)):
            info = InstanceInfo.from_json(store.get(f"instances/{index}"))
            key = f"hb/{info.endpoint.key}"
            count = store.add(key, 0)
            if count < 0:
                continue
            seen = last.get(key)
            if seen is None or seen[0] != count:
                last[key] = (count, now)
            if now - last[key][1] < silent_s:
                alive += 1
        if alive == 0:
            return True
        if now > deadline:
            return False
        time.sleep(0.1)
