"""KV transfer between two instances: ours vs one raw gloo send vs an unaggregated baseline.

Two processes on this machine (gloo over loopback): this one (the sender; it hosts the rendezvous
``TCPStore``) and a receiver it starts (``--serve``: a ``MemPool`` behind the real control API,
``add_control_routes``). Both join with ``Channels``; every case uses **the same two-rank process
group**, the one ``DistributedMemPool`` builds for sender > receiver, and is timed at the sender
until the receiver has the bytes. For each request size (tokens, in blocks of ``--block-size``):

- **raw**: one ``ProcessGroupGloo.send`` of one contiguous tensor of the request's size (the
  receive pre-posted; the receiver answers with a 1-element send once it has the data);
- **ours, adjacent**: ``await DistributedMemPool.transfer(...)`` of blocks adjacent on both sides
  (one slice sent and received in place: no copy), both control round trips included
  (``/internal/kv/expect``, then ``/internal/kv/commit``, whose answer says the data is in);
- **ours, scattered**: the same with random block sets on both sides: host tensors are sent as
  one zero-copy message per run of blocks adjacent on both sides (``adjacent_runs``), received
  straight into the pool (with random sets nearly every block is its own run);
- **staging**: ``transfer`` of the same scattered sets down the path ``src/`` keeps for CUDA
  tensors (and took for host tensors before): gather into a new staging tensor, one send,
  receive into a new staging tensor, scatter. Forced here by planning no runs at the sender
  (``_StagingDmp``); the receiver's code is the real one;
- **baseline**: an unaggregated layout (one page per block, layer and K/V, as with per-layer KV
  tensors): ``2 * layers * blocks`` sends of one page each, all posted at once (its best case).
  Slow, so only at ``--baseline-tokens``.

Cases are interleaved round by round (so a drifting load hits them alike), the first round is a
warm-up, and the table reports medians over ``--repeats`` rounds with the ratio raw time / case
time. A profile follows: raw's send alone, raw into a fresh tensor each time, an empty control
round trip, and the staging path's gather and scatter alone (into fresh tensors, as it does, and
into a reused buffer).

The defaults (5 rounds) take about a minute on 2 cores and need ~4 GiB of RAM (32K tokens of
16 KiB).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import orjson
import torch
from aiohttp import web
from torch._C._distributed_c10d import TCPStore

from memserve.mempool.distributed import DistributedMemPool, Peer, Ticket
from memserve.mempool.kv_cache import KVCache
from memserve.mempool.pool import MemPool, Tier, adjacent_runs
from memserve.server.control_api import add_control_routes, json_route
from memserve.server.errors import error_middleware
from memserve.transport.channels import Channels, Endpoint

T = TypeVar("T")
Body = dict[str, Any]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RAW_TAGS = 1 << 30  # raw and baseline tags start here: ours (the receiver's tickets) stay below
TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Shape:
    layers: int
    kv_heads: int
    head_dim: int
    block_size: int
    dtype: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def bytes_per_token(self) -> int:
        element = torch.empty((), dtype=self.torch_dtype).element_size()
        return self.layers * 2 * self.kv_heads * self.head_dim * element

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size

    @property
    def bytes_per_page(self) -> int:
        return self.bytes_per_block // (2 * self.layers)

    def cache(self, num_blocks: int) -> KVCache:
        return KVCache(num_blocks, self.layers, self.block_size, self.kv_heads, self.head_dim,
                       self.torch_dtype, torch.device("cpu"))  # fmt: skip

    def describe(self) -> str:
        return (f"{self.layers} layers x {self.kv_heads} KV heads x {self.head_dim} head dim, "
                f"{self.dtype}, block {self.block_size}: {self.bytes_per_token // 1024} KiB/token, "
                f"{self.bytes_per_block // 1024} KiB/block, {self.bytes_per_page // 1024} KiB/page")  # fmt: skip


def _median_ms(seconds: Sequence[float]) -> float:
    return statistics.median(seconds) * 1e3


def _page_ids(shape: Shape, blocks: Sequence[int]) -> list[int]:
    """The unaggregated layout's pages of ``blocks``: one per block, layer and K/V."""
    pages_per_block = 2 * shape.layers
    return [b * pages_per_block + p for b in blocks for p in range(pages_per_block)]


# ---- receiver process -----------------------------------------------------------------------


class Receiver:
    """The ``--serve`` process: a pool, the control API, and ``/bench/recv`` for the cases that
    are not ``transfer`` (raw, baseline), on the same process group."""

    def __init__(self, args: argparse.Namespace, shape: Shape) -> None:
        self.store = TCPStore("127.0.0.1", args.store_port, is_master=False,
                              wait_for_workers=False, timeout=timedelta(seconds=60))  # fmt: skip
        self.pool = MemPool(shape.cache(args.blocks))
        self.cache = self.pool.caches[Tier.DEVICE]
        self.channels = Channels(self.store, Endpoint("receiver", uuid.uuid4().hex[:12]), TIMEOUT_S)

        async def run(fn: Callable[[MemPool], T]) -> T:
            return fn(self.pool)

        self.dmp = DistributedMemPool(self.pool, self.channels, run, TIMEOUT_S)
        self._buffers: dict[tuple[Any, ...], torch.Tensor] = {}  # reused receive buffers

    def app(self) -> web.Application:
        app = web.Application(middlewares=[error_middleware], client_max_size=1 << 26)
        add_control_routes(app, self.dmp)
        app.router.add_post("/bench/info", json_route(self.info))
        app.router.add_post("/bench/ping", json_route(self.ping))
        app.router.add_post("/bench/recv", json_route(self.recv))
        app.cleanup_ctx.append(self._lifetime)
        return app

    async def _lifetime(self, _: web.Application) -> AsyncIterator[None]:
        await self.dmp.start()
        yield
        await self.dmp.close()

    async def info(self, _: Body) -> Body:
        me = self.channels.me
        return {"id": me.instance_id, "inc": me.incarnation}

    async def ping(self, _: Body) -> Body:
        return {}

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A receive buffer kept for the next case of the same shape (its pages are warm)."""
        key = (name, shape, dtype)
        if key not in self._buffers:
            self._buffers[key] = torch.empty(shape, dtype=dtype)
        return self._buffers[key]

    async def recv(self, body: Body) -> Body:
        """One timed receive of ``kind``: post the receives (tags ``tag + 1 ...``), say ready
        (``tag``), receive, then answer with one element (the tag after the messages).

        - ``raw``: ``nbytes`` into one tensor (a new one if ``fresh``, as ``transfer`` does);
        - ``pages``: one message per page, straight into the pool's pages."""
        src = Endpoint(str(body["src"]["id"]), str(body["src"]["inc"]))
        pg = self.channels._group(self.channels._key(src, int(body["gen"]), False), rank=1)
        tag, kind = int(body["tag"]), str(body["kind"])
        pages = self.cache.pages
        ack = torch.zeros(1, dtype=torch.uint8)
        timeout = timedelta(seconds=TIMEOUT_S)

        def post_all(outs: list[torch.Tensor]) -> Callable[[], int]:
            works = [pg.recv([out], 0, tag + 1 + j) for j, out in enumerate(outs)]

            def finish() -> int:
                for work in works:
                    work.wait(timeout)
                return len(works)

            return finish

        def receive() -> None:
            if kind == "raw":
                shape = (int(body["nbytes"]),)
                fresh = bool(body["fresh"])
                buf = torch.empty(shape, dtype=torch.uint8) if fresh else None
                finish = post_all(
                    [buf if buf is not None else self._buffer("raw", shape, torch.uint8)]
                )
            elif kind == "pages":
                finish = post_all([pages[int(p)] for p in body["pages"]])
            else:
                raise ValueError(f"unknown kind {kind!r}")
            pg.send([ack], 0, tag).wait(timeout)  # ready: every receive is posted
            num = finish()
            pg.send([ack], 0, tag + 1 + num).wait(timeout)

        await asyncio.get_running_loop().run_in_executor(None, receive)
        return {}


# ---- sender process -------------------------------------------------------------------------


@dataclass
class Row:
    tokens: int
    blocks: int
    mib: float
    num_runs: int  # runs of blocks adjacent on both sides in the scattered sets
    ms: dict[str, float]  # median per case: raw, raw_fresh, adjacent, scattered, ...
    calls: dict[str, int]  # send calls per request, per case (ours: as ``transfer`` reports)
    runs_ms: dict[str, list[float]]  # every timed run per case
    raw_send_ms: float  # the sender's send().wait() alone (the receiver may still be reading)
    ping_ms: float
    gather_ms: float
    gather_reused_ms: float
    scatter_ms: float

    @property
    def raw_gb_s(self) -> float:
        return self.mib * 2**20 / self.ms["raw"] / 1e6

    def ratio(self, case: str) -> float | None:
        """raw time / case time: the fraction of raw throughput the case reaches."""
        return self.ms["raw"] / self.ms[case] if case in self.ms else None


class _StagingDmp(DistributedMemPool):
    """``transfer`` that plans no runs when ``staging`` is set: the sender gathers into one
    staging tensor and the receiver (real code) receives into staging and scatters, the path
    ``src/`` keeps for CUDA tensors."""

    staging = False

    def _plan_runs(
        self, blocks: list[int], ticket: Ticket, tier: Tier
    ) -> list[tuple[int, int, int]] | None:
        return None if self.staging else super()._plan_runs(blocks, ticket, tier)


class Sender:
    def __init__(self, args: argparse.Namespace, shape: Shape, peer: Peer) -> None:
        self.args = args
        self.shape = shape
        self.peer = peer
        self.store = TCPStore("127.0.0.1", args.store_port, is_master=False,
                              wait_for_workers=False, timeout=timedelta(seconds=60))  # fmt: skip
        self.pool = MemPool(shape.cache(args.blocks))
        self.data = self.pool.caches[Tier.DEVICE].data
        self.data.fill_(0.5)  # touch every page
        self.channels = Channels(self.store, Endpoint("sender", uuid.uuid4().hex[:12]), TIMEOUT_S)

        async def run(fn: Callable[[MemPool], T]) -> T:
            return fn(self.pool)

        self.dmp = _StagingDmp(self.pool, self.channels, run, TIMEOUT_S)
        self.rng = random.Random(args.seed)
        self._tag = RAW_TAGS
        self._gen = 0
        self._session: aiohttp.ClientSession | None = None

    async def post(self, path: str, body: Body) -> Body:
        assert self._session is not None
        async with self._session.post(self.peer.url + path, data=orjson.dumps(body)) as r:
            assert r.status == 200, await r.text()
            reply: Body = orjson.loads(await r.read())
            return reply

    async def run(self, tokens: Sequence[int], baseline_tokens: set[int]) -> list[Row]:
        await self.dmp.start()
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT_S * 4))
        try:
            self._gen = await self._connect()
            rows = []
            for n in tokens:
                rows.append(await self._measure(n, n in baseline_tokens))
                print(f"# {n} tokens done", file=sys.stderr, flush=True)
            return rows
        finally:
            await self._session.close()
            await self.dmp.close()

    async def _connect(self) -> int:
        """One small transfer builds the channel; returns its generation."""
        hold, ids = await self.dmp.alloc_remote(self.peer, 1)
        await self.dmp.transfer(self.peer, [0], hold, ids)
        await self.dmp.free_remote(self.peer, hold)
        keys = [k for k in self.channels._groups if k.startswith(f"kv/{self.channels.me.key}>")]
        assert len(keys) == 1, keys
        return int(keys[0].rsplit("/", 1)[1])

    async def _measure(self, num_tokens: int, baseline: bool) -> Row:
        """Every case once per round, round after round (so drifting load hits all alike);
        the first round warms up and is not counted."""
        shape = self.shape
        n = -(-num_tokens // shape.block_size)
        nbytes = n * shape.bytes_per_block
        hold, ids = await self.dmp.alloc_remote(self.peer, 2 * n)
        adjacent_dst, adjacent_src = _adjacent(ids, n), list(range(n))
        scattered_dst = self.rng.sample(ids, n)
        scattered_src = self.rng.sample(range(self.args.blocks), n)
        runs = adjacent_runs(scattered_src, scattered_dst)
        tensor = torch.full((nbytes,), 7, dtype=torch.uint8)
        raw_send: list[float] = []

        async def raw(fresh: bool) -> float:
            body = {"kind": "raw", "nbytes": nbytes, "fresh": fresh}
            total, send = await self._gloo(body, [tensor])
            if not fresh:
                raw_send.append(send)
            return total

        calls = {"raw": 1, "raw_fresh": 1, "baseline": 2 * shape.layers * n}

        async def ours(case: str, src: list[int], dst: list[int], staging: bool = False) -> float:
            self.dmp.staging = staging
            try:
                t0 = time.perf_counter()
                stats = await self.dmp.transfer(self.peer, src, hold, dst)
                took = time.perf_counter() - t0
            finally:
                self.dmp.staging = False
            assert stats.num_blocks == n and stats.num_bytes == nbytes, stats
            assert calls.setdefault(case, stats.num_send_calls) == stats.num_send_calls
            return took

        async def pages() -> float:
            pages = self.pool.caches[Tier.DEVICE].pages
            body = {"kind": "pages", "pages": _page_ids(shape, scattered_dst)}
            sends = [pages[p] for p in _page_ids(shape, scattered_src)]
            return (await self._gloo(body, sends))[0]

        cases: dict[str, Callable[[], Awaitable[float]]] = {
            "raw": lambda: raw(False),
            "raw_fresh": lambda: raw(True),
            "adjacent": lambda: ours("adjacent", adjacent_src, adjacent_dst),
            "scattered": lambda: ours("scattered", scattered_src, scattered_dst),
            "staging": lambda: ours("staging", scattered_src, scattered_dst, staging=True),
        }
        if baseline:
            cases["baseline"] = pages
        times: dict[str, list[float]] = {case: [] for case in cases}
        for round_ in range(self.args.repeats + 1):
            for case, measure in cases.items():
                took = await measure()
                if round_:
                    times[case].append(took)
        await self.dmp.free_remote(self.peer, hold)
        assert calls["adjacent"] == 1 and calls["staging"] == 1, calls
        assert calls["scattered"] == len(runs), (calls, len(runs))
        gather, gather_reused, scatter = self._copies(scattered_src, scattered_dst)
        return Row(
            tokens=num_tokens, blocks=n, mib=nbytes / 2**20, num_runs=len(runs),
            ms={case: _median_ms(t) for case, t in times.items()},
            calls={case: calls[case] for case in times},
            runs_ms={case: [x * 1e3 for x in t] for case, t in times.items()},
            raw_send_ms=_median_ms(raw_send[1:]), ping_ms=await self._ping(),
            gather_ms=gather, gather_reused_ms=gather_reused, scatter_ms=scatter,
        )  # fmt: skip

    def _tags(self, n: int) -> int:
        tag, self._tag = self._tag, self._tag + n
        return tag

    async def _gloo(self, body: Body, tensors: Sequence[torch.Tensor]) -> tuple[float, float]:
        """One timed case on the process group: the receiver posts its receives and says ready;
        then (timed) post every send, wait for them, and for the receiver's answer. Returns
        (until the answer, until the sends completed)."""
        num = len(tensors)
        tag = self._tags(num + 2)
        me = self.channels.me
        body = {**body, "src": {"id": me.instance_id, "inc": me.incarnation},
                "gen": self._gen, "tag": tag}  # fmt: skip
        receiving = asyncio.ensure_future(self.post("/bench/recv", body))
        pg = self.channels._group(self.channels._key(self.peer.endpoint, self._gen, True), 0)
        ack = torch.empty(1, dtype=torch.uint8)
        timeout = timedelta(seconds=TIMEOUT_S)

        def timed() -> tuple[float, float]:
            pg.recv([ack], 1, tag).wait(timeout)  # the receiver is ready
            t0 = time.perf_counter()
            works = [pg.send([t], 1, tag + 1 + j) for j, t in enumerate(tensors)]
            for work in works:
                work.wait(timeout)
            t1 = time.perf_counter()
            pg.recv([ack], 1, tag + 1 + num).wait(timeout)
            return time.perf_counter() - t0, t1 - t0

        took = await asyncio.get_running_loop().run_in_executor(None, timed)
        await receiving
        return took

    async def _ping(self) -> float:
        """Median round trip of an empty control call (what ours pays twice)."""
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            await self.post("/bench/ping", {})
            times.append(time.perf_counter() - t0)
        return _median_ms(times)

    def _copies(self, src: list[int], dst: list[int]) -> tuple[float, float, float]:
        """Medians (ms) of: the sender's gather into a fresh tensor (what staging does),
        the same into a reused buffer, and the receiver's scatter (measured here, on this
        pool's blocks: same machine, same sizes)."""
        data = self.data
        index, dst_index = torch.tensor(src), torch.tensor(dst)
        out = data.index_select(0, index)
        fresh, reused, scatter = [], [], []
        for _ in range(3):
            t0 = time.perf_counter()
            staging = data.index_select(0, index)
            fresh.append(time.perf_counter() - t0)
            del staging
            t0 = time.perf_counter()
            torch.index_select(data, 0, index, out=out)
            reused.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            data.index_copy_(0, dst_index, out)
            scatter.append(time.perf_counter() - t0)
        return _median_ms(fresh), _median_ms(reused), _median_ms(scatter)


def _adjacent(ids: Sequence[int], n: int) -> list[int]:
    """``n`` adjacent ascending ids out of ``ids`` (a fresh allocation has such a run)."""
    have = set(ids)
    for b in sorted(ids):
        if all(b + k in have for k in range(n)):
            return list(range(b, b + n))
    raise RuntimeError(f"no run of {n} adjacent blocks in the allocation")


# ---- driver ---------------------------------------------------------------------------------


def _receiver_command(args: argparse.Namespace, port: int) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--serve", "--port", str(port),
            "--store-port", str(args.store_port), "--blocks", str(args.blocks),
            "--layers", str(args.layers), "--kv-heads", str(args.kv_heads),
            "--head-dim", str(args.head_dim), "--block-size", str(args.block_size),
            "--dtype", args.dtype, "--threads", str(args.threads)]  # fmt: skip


def _wait_up(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 120) -> Body:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the receiver exited with {proc.returncode}")
        try:
            req = urllib.request.Request(url + "/bench/info", b"{}", method="POST")
            with urllib.request.urlopen(req, timeout=2) as r:
                reply: Body = json.loads(r.read())
                return reply
        except OSError:
            time.sleep(0.2)
    raise TimeoutError("the receiver did not come up")


LABELS = {
    "adjacent": "ours, adjacent",
    "scattered": "ours, scattered (per run)",
    "staging": "staging (gather + scatter, the CUDA path)",
    "baseline": "baseline (per page)",
}


def _table(rows: Sequence[Row], shape: Shape) -> str:
    """Markdown: ms (ratio to raw) per case, send calls per request, then the profile."""
    head = "| tokens | MiB | raw ms (GB/s) | " + " | ".join(LABELS.values()) + " |"
    out = [
        f"KV shape: {shape.describe()}",
        "",
        "Median ms per request, (throughput as a fraction of raw), [send calls]:",
        "",
        head,
        "|---:|---:|---:|" + "---:|" * len(LABELS),
    ]
    for r in rows:
        cells = []
        for case in LABELS:
            ratio = r.ratio(case)
            if ratio is None:
                cells.append("-")
                continue
            bold = "**" if case in ("adjacent", "scattered") else ""
            calls = r.calls[case]
            cells.append(f"{r.ms[case]:.1f} ({bold}{ratio:.2f}{bold}) [{calls}]")
        out.append(f"| {r.tokens} | {r.mib:g} | {r.ms['raw']:.1f} ({r.raw_gb_s:.2f}) | "
                   + " | ".join(cells) + " |")  # fmt: skip
    out += [
        "",
        "Profile (ms): raw's send alone (without the answer), raw into a new tensor each time,",
        "an empty control round trip, what ours adds, and the copies alone in one process:",
        "",
        "| tokens | raw: send alone | raw into a fresh tensor | control round trip "
        "| adjacent - raw | scattered - adjacent | staging - adjacent | gather (fresh tensor) "
        "| gather (reused buffer) | scatter |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        out.append(
            f"| {r.tokens} | {r.raw_send_ms:.1f} | {r.ms['raw_fresh']:.1f} | {r.ping_ms:.2f} "
            f"| {r.ms['adjacent'] - r.ms['raw']:.1f} | {r.ms['scattered'] - r.ms['adjacent']:.1f} "
            f"| {r.ms['staging'] - r.ms['adjacent']:.1f} "
            f"| {r.gather_ms:.1f} | {r.gather_reused_ms:.1f} | {r.scatter_ms:.1f} |"
        )
    return "\n".join(out)


def _drive(args: argparse.Namespace, shape: Shape) -> list[Row]:
    """Host the store, start the receiver, run the sender; stop the receiver."""
    tokens = [int(t) for t in args.tokens.split(",")]
    baseline = {int(t) for t in args.baseline_tokens.split(",") if t}
    port = _free_port()
    store = TCPStore("127.0.0.1", args.store_port, is_master=True, wait_for_workers=False,
                     timeout=timedelta(seconds=60))  # fmt: skip
    proc = subprocess.Popen(_receiver_command(args, port))
    try:
        url = f"http://127.0.0.1:{port}"
        info = _wait_up(url, proc)
        peer = Peer(Endpoint(str(info["id"]), str(info["inc"])), url)
        return asyncio.run(Sender(args, shape, peer).run(tokens, baseline))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        del store


def _free_port() -> int:
    from memserve.bench.launch import free_port

    return free_port()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="KV transfer between two processes (gloo, loopback): ours vs raw vs "
        "an unaggregated per-page baseline.",
    )
    p.add_argument("--tokens", default="1024,2048,4096,8192,16384,32768",
                   help="request sizes in tokens (comma-separated)")  # fmt: skip
    p.add_argument("--baseline-tokens", default="1024,4096",
                   help="sizes at which to run the per-page baseline ('' for none)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=5, help="timed runs per case (after 1 warm-up)")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads per process")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--quick", action="store_true",
                   help="toy sizes (a smoke test): 256,512 tokens, 2 layers, 2 repeats")  # fmt: skip
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--store-port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--blocks", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.baseline_tokens, args.repeats, args.layers = "256,512", "256", 2, 2
    if not args.blocks:  # room for a scattered pick: twice the largest request
        largest = max(int(t) for t in args.tokens.split(","))
        args.blocks = 2 * -(-largest // args.block_size) + 2
    if not args.store_port:
        args.store_port = _free_port()
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = Shape(args.layers, args.kv_heads, args.head_dim, args.block_size, args.dtype)
    if args.serve:
        web.run_app(Receiver(args, shape).app(), host="127.0.0.1", port=args.port, print=None)
        return
    print(f"# {shape.describe()}; {args.repeats} repeats; {args.threads} torch threads",
          flush=True)  # fmt: skip
    rows = _drive(args, shape)
    print(_table(rows, shape))
    if args.json:
        payload = [{**asdict(r), "ratio": {case: r.ratio(case) for case in r.ms}}
                   for r in rows]  # fmt: skip
        args.json.write_text(json.dumps({"shape": asdict(shape), "rows": payload}, indent=1))


if __name__ == "__main__":
    main()
