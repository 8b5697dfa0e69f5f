"""A pool-only cluster member for the transport tests (``tests/test_transport.py``).

Run as a script: ``python tests/kv_peer.py --name A --port P --store-port S [--host-store] ...``.
It joins the rendezvous ``TCPStore`` (hosting it with ``--host-store``), registers in the
``Registry`` (a peer that stops beating is ``forget``-ed, as in a real node), and serves the real
internal control API (``add_control_routes``: ``/internal/kv/*`` and ``/internal/check``) over a
``MemPool`` with a device and a DRAM tier (both host tensors here), without any model or engine.

Test-only routes (``POST /test/*``, JSON in and out) let a test fill blocks with seeded random
data, read their digests, drive this instance's sender side (``alloc_remote``, ``transfer``,
``transfer_with_insert``, ``free_remote``) and close *gates*: a closed ``recv`` / ``send`` gate
stops this instance's next channel receive / send just before it is posted, so a test can kill a
process at a known point of a transfer. A sender call that fails answers 200 with ``error`` set
(the test asserts on it); anything else that fails is a 4xx/5xx.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict
from datetime import timedelta
from typing import Any, TypeVar

import torch
from aiohttp import web
from torch._C._distributed_c10d import TCPStore

from memserve.mempool.distributed import DistributedMemPool, Peer, TransferStats, endpoint_from
from memserve.mempool.kv_cache import KVCache
from memserve.mempool.pool import Hold, MemPool, Tier
from memserve.server.control_api import add_control_routes, json_route
from memserve.server.errors import error_middleware
from memserve.transport.channels import Channels, Endpoint, TransferError
from memserve.transport.registry import InstanceInfo, Registry

T = TypeVar("T")
Body = dict[str, Any]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Gate:
    """Open by default; while closed, ``passage`` waits (and counts the waiters)."""

    def __init__(self) -> None:
        self._open = asyncio.Event()
        self._open.set()
        self.waiting = 0
        self.passed = 0

    def set(self, closed: bool) -> None:
        if closed:
            self._open.clear()
        else:
            self._open.set()

    async def passage(self) -> None:
        self.waiting += 1
        try:
            await self._open.wait()
        finally:
            self.waiting -= 1
        self.passed += 1


class GatedChannels(Channels):
    """``Channels`` whose sends and receives first pass a test-controlled gate."""

    def __init__(self, store: TCPStore, me: Endpoint, timeout_s: float) -> None:
        super().__init__(store, me, timeout_s)
        self.gates = {"send": Gate(), "recv": Gate()}

    async def send_parts(
        self, dst: Endpoint, gen: int, tag: int, make: Callable[[], Sequence[torch.Tensor]]
    ) -> int:
        await self.gates["send"].passage()
        return await super().send_parts(dst, gen, tag, make)

    async def recv_parts(
        self,
        src: Endpoint,
        gen: int,
        tag: int,
        outs: Sequence[torch.Tensor],
        then: Callable[[int, torch.Tensor], object],
        timeout_s: float | None = None,
    ) -> None:
        await self.gates["recv"].passage()
        await super().recv_parts(src, gen, tag, outs, then, timeout_s)


def digest(data: torch.Tensor, block_ids: list[int]) -> list[str]:
    """SHA-256 (hex, 16 digits) of each block's bytes, in order."""
    return [
        hashlib.sha256(data[b].reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16]
        for b in block_ids
    ]


def fill(data: torch.Tensor, block_ids: list[int], seed: int) -> None:
    """Overwrite the blocks with seeded normal noise (distinct per block)."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(block_ids), *data.shape[1:]), generator=gen)
    data[torch.tensor(block_ids, dtype=torch.long)] = noise.to(data.dtype)


class PeerApp:
    def __init__(self, args: argparse.Namespace, store: TCPStore) -> None:
        dtype = DTYPES[args.dtype]
        shape = (
            args.layers,
            args.block_size,
            args.heads,
            args.head_dim,
            dtype,
            torch.device("cpu"),
        )
        device = KVCache(args.device_blocks, *shape)
        dram = KVCache(args.dram_blocks, *shape) if args.dram_blocks else None
        self.pool = MemPool(device, dram)
        self.me = Endpoint(args.name, uuid.uuid4().hex[:12])
        self.url = f"http://127.0.0.1:{args.port}"
        self.channels = GatedChannels(store, self.me, args.timeout)
        self.dmp = DistributedMemPool(self.pool, self.channels, self._run, args.timeout)
        self.registry = Registry(
            store, InstanceInfo(self.me, "pool", self.url), 0.25, args.dead_after
        )
        self.registry.on_leave.append(lambda info: self.dmp.forget(info.endpoint))
        self.left: list[str] = []  # endpoint keys the registry reported gone
        self.registry.on_leave.append(self._note_leave)
        self.run_gate = Gate()
        self._seed = 1 << 20

    async def _run(self, fn: Callable[[MemPool], T]) -> T:
        await self.run_gate.passage()
        return fn(self.pool)

    async def _note_leave(self, info: InstanceInfo) -> None:
        self.left.append(info.endpoint.key)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[error_middleware], client_max_size=1 << 26)
        add_control_routes(app, self.dmp)
        routes: dict[str, Callable[[Body], Awaitable[Body]]] = {
            "info": self.info,
            "hold": self.hold,
            "release": self.release,
            "fill": self.fill,
            "scramble": self.scramble,
            "digest": self.digest,
            "match": self.match,
            "gate": self.gate,
            "alloc_remote": self.alloc_remote,
            "transfer": self.transfer,
            "transfer_with_insert": self.transfer_with_insert,
            "free_remote": self.free_remote,
            "offer_only": self.offer_only,
            "forget": self.forget,
        }
        for name, fn in routes.items():
            app.router.add_post(f"/test/{name}", json_route(fn))
        app.cleanup_ctx.append(self._lifetime)
        return app

    async def _lifetime(self, _: web.Application) -> AsyncIterator[None]:
        await self.dmp.start()
        beating = asyncio.create_task(self.registry.run(), name="registry")
        yield
        beating.cancel()
        await asyncio.gather(beating, return_exceptions=True)
        await self.dmp.close()

    # ---- state --------------------------------------------------------------------------

    async def info(self, _: Body) -> Body:
        pool = self.pool
        return {
            "id": self.me.instance_id,
            "inc": self.me.incarnation,
            "url": self.url,
            "counters": asdict(self.dmp.counters),
            "num_connects": self.channels.num_connects,
            "channels": sorted(self.channels._groups),  # kv/{src}>{dst}/{gen}, connected now
            "holds": sorted(pool.holds),
            "free": {t.value: pool.num_free(t) for t in Tier},
            "gates": {
                name: {"waiting": g.waiting, "passed": g.passed}
                for name, g in {**self.channels.gates, "run": self.run_gate}.items()
            },
            "peers": sorted(self.registry.peers),
            "left": self.left,
        }

    async def hold(self, body: Body) -> Body:
        """Allocate ``n`` blocks of ``tier`` held under ``key`` (a sender's source blocks)."""
        tier = Tier(body["tier"])
        ids = self.pool.alloc_mem(int(body["n"]), tier)
        self.pool.hold(str(body["key"]), Hold(ids, tier))
        return {"block_ids": ids}

    async def release(self, body: Body) -> Body:
        return {"released": self.pool.release(str(body["key"]))}

    async def fill(self, body: Body) -> Body:
        data = self.pool.caches[Tier(body["tier"])].data
        fill(data, [int(b) for b in body["blocks"]], int(body["seed"]))
        return {}

    async def scramble(self, _: Body) -> Body:
        """Overwrite every free block of both tiers with fresh noise, so a destination block
        that a transfer fails to write cannot hold the expected bytes by chance."""
        for tier, allocator in self.pool.allocators.items():
            free = [b for b in range(allocator.num_blocks) if allocator.refcount(b) == 0]
            if free:
                self._seed += 1
                fill(self.pool.caches[tier].data, free, self._seed)
        return {}

    async def digest(self, body: Body) -> Body:
        data = self.pool.caches[Tier(body["tier"])].data
        return {"digests": digest(data, [int(b) for b in body["blocks"]])}

    async def match(self, body: Body) -> Body:
        """What the prompt tree holds of ``tokens``: matched tokens and the blocks' digests."""
        m = self.pool.match([int(t) for t in body["tokens"]])
        digests = [digest(self.pool.caches[ref.tier].data, [ref.block_id])[0] for ref in m.blocks]
        return {"num_tokens": m.num_tokens, "digests": digests}

    async def gate(self, body: Body) -> Body:
        name = str(body["name"])
        gate = self.run_gate if name == "run" else self.channels.gates[name]
        gate.set(bool(body["closed"]))
        return {}

    # ---- sender side --------------------------------------------------------------------

    async def alloc_remote(self, body: Body) -> Body:
        hold, ids = await self.dmp.alloc_remote(
            _peer(body["peer"]), int(body["n"]), Tier(body["tier"])
        )
        return {"hold": hold, "block_ids": ids}

    async def transfer(self, body: Body) -> Body:
        return await _sender_call(
            self.dmp.transfer(
                _peer(body["peer"]),
                [int(b) for b in body["src_blocks"]],
                str(body["hold"]),
                [int(b) for b in body["dst_blocks"]],
                Tier(body["src_tier"]),
                Tier(body["dst_tier"]),
            )
        )

    async def transfer_with_insert(self, body: Body) -> Body:
        return await _sender_call(
            self.dmp.transfer_with_insert(
                _peer(body["peer"]),
                [int(t) for t in body["tokens"]],
                [int(b) for b in body["blocks"]],
            )
        )

    async def free_remote(self, body: Body) -> Body:
        await self.dmp.free_remote(_peer(body["peer"]), str(body["hold"]))
        return {}

    async def forget(self, body: Body) -> Body:
        """What the registry does when a peer stops beating (here: on demand, peer alive)."""
        await self.dmp.forget(endpoint_from(body["peer"]))
        return {}

    async def offer_only(self, body: Body) -> Body:
        """The first half of ``transfer_with_insert``: the offer, never followed by a commit."""
        tokens = [int(t) for t in body["tokens"]]
        src = {"id": self.me.instance_id, "inc": self.me.incarnation}
        return await self.dmp.post(
            _peer(body["peer"]), "/internal/kv/offer", {"src": src, "tokens": tokens}
        )


async def _sender_call(call: Awaitable[TransferStats]) -> Body:
    t0 = time.monotonic()
    try:
        stats = await call
    except TransferError as e:
        return {"error": str(e), "seconds": time.monotonic() - t0}
    return {"error": None, "stats": asdict(stats), "seconds": time.monotonic() - t0}


def _peer(d: dict[str, Any]) -> Peer:
    return Peer(endpoint_from(d), str(d["url"]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--name", required=True, help="instance id (kept across restarts)")
    p.add_argument("--port", type=int, required=True, help="HTTP port of the control API")
    p.add_argument("--store-port", type=int, required=True, help="rendezvous TCPStore port")
    p.add_argument("--host-store", action="store_true", help="host the TCPStore")
    p.add_argument("--device-blocks", type=int, default=64)
    p.add_argument("--dram-blocks", type=int, default=32, help="0: no DRAM tier")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=8)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--timeout", type=float, default=2.0, help="transfer/channel timeout, s")
    p.add_argument("--dead-after", type=float, default=1.5, help="registry: peer gone after, s")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    store = TCPStore(
        "127.0.0.1",
        args.store_port,
        is_master=args.host_store,
        wait_for_workers=False,
        timeout=timedelta(seconds=30),
    )
    peer = PeerApp(args, store)
    web.run_app(peer.app(), host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
