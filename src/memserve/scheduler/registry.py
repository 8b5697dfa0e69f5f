"""The scheduler's instance table: who serves, with what load, and who stopped answering.

Instances register with their first heartbeat (``POST /internal/heartbeat`` every 0.5 s, see
``server.instance_api.SchedulerLink``) and are dropped after ``dead_after_s`` without one. A
heartbeat carries the instance's identity (id, role, url, pid, incarnation), what it keeps
(``keeps``: prefix caching on; ``send_back``: a decode instance returning generated KV to the
prefill instance), its ``Load``, and whether it is ``ready`` (a decode instance is not until its
own registry has seen a prefill instance; it is not routed to until then). An instance that restarts under the same id comes back with
a new incarnation: the table reports the old one gone and the new one joined.

Besides reported load, the table holds the router's own bookkeeping per instance: ``queued_s``
(predicted prefill seconds dispatched there and not started) and ``inflight`` requests. Single
owner: the scheduler's event loop.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from memserve.scheduler.types import INSTANCE_ROLES, InstanceView, Load, TierLoad


@dataclass
class Instance:
    instance_id: str
    role: str
    url: str
    pid: int
    incarnation: str
    keeps: bool  # prefix caching on: what it computed stays cached
    send_back: bool  # decode: generated KV goes back to the prefill instance
    load: Load = field(default_factory=Load)
    last_seen: float = 0.0
    joined_at: float = 0.0
    queued_s: float = 0.0
    inflight: int = 0
    transfer_bytes: int = 0  # KV bytes it sent + received (its own counters)
    ready: bool = True  # it can take requests (a decode instance sees a prefill instance)
    device: str = ""  # e.g. cpu, cuda:0
    endpoint: str | None = None  # KV transport endpoint in the rendezvous store (P/D roles)
    suspect_until: float = -math.inf  # not routed to until then (it refused a connection)
    extra: dict[str, Any] = field(default_factory=dict)

    def view(self) -> InstanceView:
        return InstanceView(
            self.instance_id, self.role, self.load, max(0.0, self.queued_s), self.inflight
        )


class InstanceTable:
    def __init__(self, model: str, block_size: int, dead_after_s: float = 3.0) -> None:
        self.model = model
        self.block_size = block_size
        self.dead_after_s = dead_after_s
        self.instances: dict[str, Instance] = {}

    def heartbeat(self, body: Mapping[str, Any], now: float) -> tuple[Instance, Instance | None]:
        """Record one heartbeat → (the instance, the one it replaced if it restarted, else None).
        A new instance is ``joined_at == now``. Raises ``KeyError`` / ``TypeError`` /
        ``ValueError`` on a malformed or foreign heartbeat (another model or block size, an
        unknown role), changing nothing: every field is parsed before the table changes."""
        role = str(body["role"])
        if role not in INSTANCE_ROLES:
            raise ValueError(f"unknown instance role {role!r}")
        if str(body["model"]) != self.model:
            raise ValueError(f"instance serves {body['model']!r}, the scheduler {self.model!r}")
        if int(body["block_size"]) != self.block_size:
            raise ValueError(
                f"instance uses --block-size {body['block_size']}, the scheduler {self.block_size}"
            )
        fresh = Instance(
            str(body["id"]),
            role,
            str(body["url"]),
            int(body["pid"]),
            str(body["incarnation"]),
            bool(body.get("keeps", False)),
            bool(body.get("send_back", False)),
            load=load_from_json(body.get("load", {})),
            last_seen=now,
            joined_at=now,
            transfer_bytes=int(body.get("transfer_bytes", 0)),
            ready=bool(body.get("ready", True)),
            device=str(body.get("device", "")),
            endpoint=None if body.get("endpoint") is None else str(body["endpoint"]),
        )
        old = self.instances.get(fresh.instance_id)
        if old is None or old.incarnation != fresh.incarnation:
            self.instances[fresh.instance_id] = fresh
            return fresh, old
        old.load, old.transfer_bytes, old.ready = fresh.load, fresh.transfer_bytes, fresh.ready
        old.last_seen = now
        return old, None

    def reap(self, now: float) -> list[Instance]:
        """Drop the instances silent for ``dead_after_s``; returns them."""
        gone = [i for i in self.instances.values() if now - i.last_seen > self.dead_after_s]
        for instance in gone:
            del self.instances[instance.instance_id]
        return gone

    def remove(self, instance_id: str) -> Instance | None:
        return self.instances.pop(instance_id, None)

    def routable(self, now: float, exclude: frozenset[str] = frozenset()) -> list[InstanceView]:
        """Views of the instances a request may go to now, in id order."""
        return [
            i.view()
            for _, i in sorted(self.instances.items())
            if i.ready and i.instance_id not in exclude and i.suspect_until <= now
        ]

    def can_serve(self) -> bool:
        roles = {i.role for i in self.instances.values() if i.ready}
        return "colocated" in roles or {"prefill", "decode"} <= roles


def load_from_json(d: object) -> Load:
    """A ``Load`` from its JSON object; ``TypeError`` / ``ValueError`` if it is not one."""
    if not isinstance(d, Mapping):
        raise TypeError(f"load must be an object, got {d!r}")

    def tier(t: object) -> TierLoad:
        t = {} if t is None else t
        if not isinstance(t, Mapping):
            raise TypeError(f"a KV tier must be an object, got {t!r}")
        return TierLoad(
            int(t.get("total", 0)),
            int(t.get("free", 0)),
            int(t.get("active", 0)),
            int(t.get("historical", 0)),
        )

    return Load(
        int(d.get("running", 0)),
        int(d.get("waiting", 0)),
        int(d.get("pending_prefill_tokens", 0)),
        tier(d.get("device")),
        tier(d.get("dram")),
    )


def load_to_json(load: Load) -> dict[str, Any]:
    def tier(t: TierLoad) -> dict[str, int]:
        return {"total": t.total, "free": t.free, "active": t.active, "historical": t.historical}

    return {
        "running": load.running,
        "waiting": load.waiting,
        "pending_prefill_tokens": load.pending_prefill_tokens,
        "device": tier(load.device),
        "dram": tier(load.dram),
    }
