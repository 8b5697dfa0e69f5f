"""KV transfer between real processes over real gloo channels (``mempool.distributed``).

Four pool-only peers (``tests/kv_peer.py``: a ``MemPool`` with a device and a DRAM tier, the real
``/internal/kv/*`` control API, a ``Registry``) share one rendezvous ``TCPStore`` hosted by A:
A and B (float32, tiny blocks) for the data-path tests, C and D (bfloat16, larger blocks) for a
second dtype and for the failure tests, which kill C or D with SIGKILL. Every peer runs with a
2 s transfer timeout, so a failure must surface within a few seconds.

Bytes are compared through SHA-256 digests of whole blocks (each source block holds distinct
seeded noise; free destination blocks are overwritten with fresh noise before each round, so a
block that a transfer did not write cannot match by chance).
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from memserve.bench.launch import free_port
from memserve.mempool.pool import adjacent_runs

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
PEER_SCRIPT = ROOT / "tests" / "kv_peer.py"
TIMEOUT_S = 2.0  # every peer's transfer/channel timeout
DEAD_AFTER_S = 1.5  # registry: a peer silent this long is gone
REAP_INTERVAL_S = 1.0  # DistributedMemPool's reaper period
BLOCK = 16
SMALL = ["--layers", "2", "--heads", "2", "--head-dim", "8", "--dtype", "float32",
         "--device-blocks", "64", "--dram-blocks", "32"]  # fmt: skip
SMALL_BLOCK_BYTES = 2 * 2 * BLOCK * 2 * 8 * 4  # L * (K, V) * block * H * D * fp32 = 4 KiB
LARGE = ["--layers", "4", "--heads", "4", "--head-dim", "32", "--dtype", "bfloat16",
         "--device-blocks", "256", "--dram-blocks", "64"]  # fmt: skip
LARGE_BLOCK_BYTES = 4 * 2 * BLOCK * 4 * 32 * 2  # 32 KiB

Body = dict[str, Any]


@dataclass
class PeerProc:
    name: str
    args: list[str]
    proc: subprocess.Popen[bytes]
    url: str
    log: Path
    inc: str = ""

    @property
    def peer(self) -> Body:
        """How a sender names this peer in ``/test/*`` calls."""
        return {"id": self.name, "inc": self.inc, "url": self.url}

    @property
    def key(self) -> str:
        return f"{self.name}@{self.inc}"

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@dataclass
class Cluster:
    log_dir: Path
    store_port: int = field(default_factory=free_port)
    procs: dict[str, PeerProc] = field(default_factory=dict)
    _starts: int = 0

    def start(self, name: str, args: Sequence[str], host_store: bool = False) -> PeerProc:
        """Launch a peer (not waiting for it); ``args`` are kept for ``restart``."""
        port = free_port()
        cmd = [sys.executable, str(PEER_SCRIPT), "--name", name, "--port", str(port),
               "--store-port", str(self.store_port), "--timeout", str(TIMEOUT_S),
               "--dead-after", str(DEAD_AFTER_S), *args]  # fmt: skip
        if host_store:
            cmd.append("--host-store")
        self._starts += 1
        log = self.log_dir / f"{name}-{self._starts}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        peer = PeerProc(name, list(args), proc, f"http://127.0.0.1:{port}", log)
        self.procs[name] = peer
        return peer

    def wait_ready(self, timeout_s: float = 60) -> None:
        """Wait until every started peer answers ``/test/info`` (and learn its incarnation)."""
        deadline = time.monotonic() + timeout_s
        for peer in self.procs.values():
            while not peer.inc:
                if peer.proc.poll() is not None:
                    raise RuntimeError(f"{peer.name} exited early:\n{peer.log_tail()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{peer.name} did not start:\n{peer.log_tail()}")
                try:
                    req = urllib.request.Request(peer.url + "/test/info", b"{}", method="POST")
                    with urllib.request.urlopen(req, timeout=2) as r:
                        peer.inc = json.loads(r.read())["inc"]
                except OSError:
                    time.sleep(0.1)

    def kill(self, name: str) -> float:
        """SIGKILL the peer; returns when it is gone (the monotonic time of the kill)."""
        proc = self.procs[name].proc
        t = time.monotonic()
        proc.kill()
        proc.wait()
        return t

    def restart(self, name: str) -> PeerProc:
        """A new process for the same instance id (a new incarnation), ready."""
        old = self.procs[name]
        if old.proc.poll() is None:
            self.kill(name)
        peer = self.start(name, old.args)
        self.wait_ready()
        return peer

    def close(self) -> None:
        for peer in self.procs.values():
            if peer.proc.poll() is None:
                peer.proc.send_signal(signal.SIGTERM)
        for peer in self.procs.values():
            try:
                peer.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                peer.proc.kill()
                peer.proc.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("kv_peers"))
    try:
        c.start("A", SMALL, host_store=True)
        c.start("B", SMALL)
        c.start("C", LARGE)
        c.start("D", LARGE)
        c.wait_ready()
        yield c
    finally:
        c.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


class Client:
    """``/test/*`` and ``/internal/check`` calls to the peers of a cluster."""

    def __init__(self, session: aiohttp.ClientSession, cluster: Cluster) -> None:
        self.session = session
        self.cluster = cluster

    async def raw(self, name: str, path: str, body: Body | None = None) -> tuple[int, Body]:
        peer = self.cluster.procs[name]
        async with self.session.post(peer.url + path, json=body or {}) as resp:
            return resp.status, await resp.json()

    async def __call__(self, name: str, path: str, body: Body | None = None) -> Body:
        status, reply = await self.raw(name, path, body)
        peer = self.cluster.procs[name]
        assert status == 200, f"{name}{path}: {status} {reply}\n{peer.log_tail()}"
        return reply

    async def info(self, name: str) -> Body:
        return await self(name, "/test/info")

    async def check(self, name: str) -> Body:
        """``/internal/check`` (the pool's integrity check, between steps) must pass."""
        return await self(name, "/internal/check")

    async def digests(self, name: str, tier: str, blocks: Sequence[int]) -> list[str]:
        reply = await self(name, "/test/digest", {"tier": tier, "blocks": list(blocks)})
        return list(reply["digests"])

    async def source(self, name: str, key: str, tier: str, n: int, seed: int) -> list[int]:
        """Hold ``n`` blocks of ``tier`` on ``name`` under ``key``, filled with seeded noise."""
        ids = (await self(name, "/test/hold", {"key": key, "tier": tier, "n": n}))["block_ids"]
        await self(name, "/test/fill", {"tier": tier, "blocks": ids, "seed": seed})
        return list(ids)

    async def wait_for(
        self, what: str, poll: Callable[[], Awaitable[bool]], timeout_s: float
    ) -> float:
        """Poll until true; returns the time it took. Fails after ``timeout_s``."""
        t0 = time.monotonic()
        while not await poll():
            assert time.monotonic() - t0 < timeout_s, f"timed out waiting for {what}"
            await asyncio.sleep(0.05)
        return time.monotonic() - t0


@dataclass(frozen=True)
class Move:
    """One ``transfer``: ``src_blocks`` of ``src`` to ``pick`` (indices into the ``alloc``
    blocks that ``alloc_remote`` returns) of ``dst``."""

    src: str
    dst: str
    src_tier: str
    dst_tier: str
    src_blocks: tuple[int, ...]
    alloc: int
    pick: tuple[int, ...] | None = None  # None: an adjacent ascending run if there is one


def _is_run(ids: Sequence[int]) -> bool:
    return list(ids) == list(range(ids[0], ids[0] + len(ids)))


def _adjacent_pick(ids: Sequence[int], n: int) -> list[int]:
    """Indices into ``ids`` of ``n`` adjacent ascending block ids (else the first ``n``)."""
    where = {b: i for i, b in enumerate(ids)}
    for b in sorted(ids):
        if all(b + k in where for k in range(n)):
            return [where[b + k] for k in range(n)]
    return list(range(n))


async def move(client: Client, m: Move, block_bytes: int) -> Body:
    """Allocate at the destination, transfer, compare digests, free; returns what happened."""
    src, dst = client.cluster.procs[m.src], client.cluster.procs[m.dst]
    alloc = await client(m.src, "/test/alloc_remote",
                         {"peer": dst.peer, "n": m.alloc, "tier": m.dst_tier})  # fmt: skip
    ids = alloc["block_ids"]
    assert len(ids) == len(set(ids)) == m.alloc
    pick = m.pick if m.pick is not None else _adjacent_pick(ids, len(m.src_blocks))
    dst_blocks = [ids[i] for i in pick]
    reply = await client(m.src, "/test/transfer", {
        "peer": dst.peer, "src_blocks": list(m.src_blocks), "hold": alloc["hold"],
        "dst_blocks": dst_blocks, "src_tier": m.src_tier, "dst_tier": m.dst_tier,
    })  # fmt: skip
    assert reply["error"] is None, f"{m}: {reply['error']}\n{src.log_tail()}\n{dst.log_tail()}"
    stats = reply["stats"]
    n = len(m.src_blocks)
    calls = len(adjacent_runs(m.src_blocks, dst_blocks))  # one zero-copy send per run
    assert stats == {
        **stats,
        "num_blocks": n,
        "num_bytes": n * block_bytes,
        "num_send_calls": calls,
    }
    sent = await client.digests(m.src, m.src_tier, m.src_blocks)
    got = await client.digests(m.dst, m.dst_tier, dst_blocks)
    assert got == sent, f"{m} -> {dst_blocks}: destination differs from source"
    await client(m.src, "/test/free_remote", {"peer": dst.peer, "hold": alloc["hold"]})
    zero_copy = _is_run(m.src_blocks) and _is_run(dst_blocks)
    return {"move": m, "dst_blocks": dst_blocks, "zero_copy": zero_copy, "calls": calls}


def _moves(rng: random.Random, src: str, dst: str, dev: list[int], dram: list[int]) -> list[Move]:
    """A mix of one direction's transfers: scattered (random order) and adjacent block sets,
    every tier pair, a single block."""

    def scattered(ids: list[int], n: int) -> tuple[int, ...]:
        return tuple(rng.sample(ids, n))

    def run(ids: list[int], n: int) -> tuple[int, ...]:
        start = rng.randrange(len(ids) - n + 1)
        return tuple(ids[start : start + n])

    return [
        Move(src, dst, "device", "device", scattered(dev, 6), 10, tuple(rng.sample(range(10), 6))),
        Move(src, dst, "device", "device", run(dev, 7), 7),
        Move(src, dst, "device", "dram", scattered(dev, 5), 8, tuple(rng.sample(range(8), 5))),
        Move(src, dst, "dram", "device", scattered(dram, 5), 5, tuple(rng.sample(range(5), 5))),
        Move(src, dst, "dram", "dram", run(dram, 4), 4),
        Move(src, dst, "dram", "device", scattered(dram, 1), 3, (2,)),
    ]


async def _assert_settled(client: Client, name: str, holds: Sequence[str] = ()) -> Body:
    """Integrity holds and exactly ``holds`` are in flight."""
    check = await client.check(name)
    assert check["holds"] == sorted(holds), f"{name}: {check}"
    return check


async def test_random_block_sets_are_byte_exact_both_ways(
    cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    client = Client(http, cluster)
    free = {name: (await client.info(name))["free"] for name in "AB"}
    sources: dict[str, tuple[list[int], list[int]]] = {}
    for i, name in enumerate("AB"):
        dev = await client.source(name, "src/dev", "device", 24, seed=100 + i)
        dram = await client.source(name, "src/dram", "dram", 12, seed=200 + i)
        sources[name] = dev, dram
    before = {name: (await client.info(name))["counters"] for name in "AB"}
    all_digests = [d for n, (dev, dram) in sources.items()
                   for d in [*await client.digests(n, "device", dev),
                             *await client.digests(n, "dram", dram)]]  # fmt: skip
    assert len(set(all_digests)) == len(all_digests)  # every source block is distinct

    rng = random.Random(7)
    done: list[Body] = []
    for _ in range(2):  # the second round reuses blocks the first freed (fresh noise in them)
        await asyncio.gather(client("A", "/test/scramble"), client("B", "/test/scramble"))
        moves = _moves(rng, "A", "B", *sources["A"]) + _moves(rng, "B", "A", *sources["B"])
        done += await asyncio.gather(*(move(client, m, SMALL_BLOCK_BYTES) for m in moves))
    assert any(d["zero_copy"] for d in done)  # one send for a whole run, and many runs too
    assert any(d["calls"] > 1 for d in done)

    for name in "AB":
        await _assert_settled(client, name, ["src/dev", "src/dram"])
        after = (await client.info(name))["counters"]
        sent = sum(len(d["move"].src_blocks) for d in done if d["move"].src == name)
        assert after["sent_blocks"] - before[name]["sent_blocks"] == sent
        assert after["send_calls"] - before[name]["send_calls"] == sum(
            d["calls"] for d in done if d["move"].src == name
        )
        received = after["received_blocks"] - before[name]["received_blocks"]
        assert received == sum(len(d["move"].src_blocks) for d in done if d["move"].dst == name)
        assert after["failed"] == before[name]["failed"]
        for key in ("src/dev", "src/dram"):
            assert (await client(name, "/test/release", {"key": key}))["released"]
        await _assert_settled(client, name)
        assert (await client.info(name))["free"] == free[name]  # every block came back


async def test_transfer_with_insert_moves_only_missing_blocks(
    cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    client = Client(http, cluster)
    b = cluster.procs["B"]
    rng = random.Random(11)
    tokens = [rng.randrange(32000) for _ in range(9 * BLOCK + 5)]  # 10 blocks, the last partial
    short = tokens[: 5 * BLOCK + 7]  # 6 blocks, the last partial
    blocks = await client.source("A", "tokens", "device", 10, seed=300)
    a_digests = await client.digests("A", "device", blocks)

    async def insert(toks: list[int], expect_blocks: int) -> None:
        received = (await client.info("B"))["counters"]["received_blocks"]
        reply = await client("A", "/test/transfer_with_insert",
                             {"peer": b.peer, "tokens": toks, "blocks": blocks[: -(-len(toks) // BLOCK)]})  # fmt: skip
        assert reply["error"] is None, reply["error"]
        stats = reply["stats"]
        assert stats["num_blocks"] == expect_blocks
        assert stats["num_bytes"] == expect_blocks * SMALL_BLOCK_BYTES
        assert 1 <= stats["num_send_calls"] <= expect_blocks or expect_blocks == 0
        counters = (await client.info("B"))["counters"]
        assert counters["received_blocks"] - received == expect_blocks
        whole = len(toks) // BLOCK
        match = await client("B", "/test/match", {"tokens": toks})
        assert match["num_tokens"] == whole * BLOCK
        assert match["digests"] == a_digests[:whole]  # B's tree holds A's bytes
        await _assert_settled(client, "B")

    assert (await client("B", "/test/match", {"tokens": tokens}))["num_tokens"] == 0
    await insert(short, 6)  # B has nothing: every block moves
    await insert(tokens, 10 - 5)  # B has the 5 whole blocks of the short prompt
    await insert(tokens, 1)  # B has the 9 whole blocks: only the partial last one moves
    assert (await client("A", "/test/release", {"key": "tokens"}))["released"]
    await _assert_settled(client, "A")


async def test_channel_failure_then_repairing_with_the_next_generation(
    cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    """B stalls a receive until A's send times out: the channel fails on both sides, yet the
    next transfer between the same two live processes works (a new channel generation)."""
    client = Client(http, cluster)
    b = cluster.procs["B"]
    src = await client.source("A", "src/gen", "device", 6, seed=400)
    await move(client, Move("A", "B", "device", "device", tuple(src), 6), SMALL_BLOCK_BYTES)
    before = (await client.info("B"))["counters"]["failed"]
    info = await client.info("B")
    connects = info["num_connects"]
    channels = [k for k in info["channels"] if k.startswith(f"kv/{cluster.procs['A'].key}>")]
    assert len(channels) == 1
    gen = int(channels[0].rsplit("/", 1)[1])

    alloc = await client("A", "/test/alloc_remote", {"peer": b.peer, "n": 6, "tier": "device"})
    await client("B", "/test/gate", {"name": "recv", "closed": True})
    stalled = asyncio.ensure_future(client("A", "/test/transfer", {
        "peer": b.peer, "src_blocks": src, "hold": alloc["hold"], "dst_blocks": alloc["block_ids"],
        "src_tier": "device", "dst_tier": "device",
    }))  # fmt: skip

    async def receiving() -> bool:
        return bool((await client.info("B"))["gates"]["recv"]["waiting"] == 1)

    await client.wait_for("B's receive", receiving, 5)
    reply = await stalled
    assert reply["error"] is not None
    assert reply["seconds"] < TIMEOUT_S + 3
    await client("B", "/test/gate", {"name": "recv", "closed": False})

    async def failed() -> bool:
        return bool((await client.info("B"))["counters"]["failed"] > before)

    await client.wait_for("B to fail the receive", failed, TIMEOUT_S + 3)
    await client("A", "/test/free_remote", {"peer": b.peer, "hold": alloc["hold"]})
    await client("A", "/test/scramble")
    await client("B", "/test/scramble")
    await move(client, Move("A", "B", "device", "device", tuple(src[::-1]), 8), SMALL_BLOCK_BYTES)
    info = await client.info("B")
    assert info["num_connects"] == connects + 1  # paired afresh ...
    a_to_b = f"kv/{cluster.procs['A'].key}>{b.key}/"
    gens = [int(k.rsplit("/", 1)[1]) for k in info["channels"] if k.startswith(a_to_b)]
    assert gens == [gen + 1]  # ... on the next generation (the failed one is dropped)
    assert (await client("A", "/test/release", {"key": "src/gen"}))["released"]
    for name in "AB":
        await _assert_settled(client, name)


async def test_bfloat16_blocks_are_byte_exact(
    cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    client = Client(http, cluster)
    for name in "CD":
        if cluster.procs[name].proc.poll() is not None:
            cluster.restart(name)
    rng = random.Random(13)
    dev = await client.source("C", "src/dev", "device", 40, seed=500)
    dram = await client.source("C", "src/dram", "dram", 20, seed=501)
    moves = _moves(rng, "C", "D", dev, dram)
    moves.append(Move("C", "D", "device", "device", tuple(rng.sample(dev, 32)), 64))
    await asyncio.gather(*(move(client, m, LARGE_BLOCK_BYTES) for m in moves))
    back = await client.source("D", "src/dev", "device", 16, seed=502)
    await move(client, Move("D", "C", "device", "dram", tuple(back), 16), LARGE_BLOCK_BYTES)
    for name in "CD":
        assert (await client(name, "/test/release", {"key": "src/dev"}))["released"]
    assert (await client("C", "/test/release", {"key": "src/dram"}))["released"]
    for name in "CD":
        await _assert_settled(client, name)


async def test_receiver_killed_during_a_transfer(
    cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    """C is killed while D's send of 4 MiB is posted and C has taken the commit but not yet
    posted its receive: D's transfer fails promptly and D's pool is intact."""
    client = Client(http, cluster)
    for name in "CD":
        if cluster.procs[name].proc.poll() is not None:
            cluster.restart(name)
    c = cluster.procs["C"]
    src = await client.source("D", "src/big", "device", 128, seed=600)
    await move(client, Move("D", "C", "device", "device", tuple(src[:4]), 4), LARGE_BLOCK_BYTES)
    failed = (await client.info("D"))["counters"]["failed"]

    alloc = await client("D", "/test/alloc_remote", {"peer": c.peer, "n": 128, "tier": "device"})
    await client("C", "/test/gate", {"name": "recv", "closed": True})
    transfer = asyncio.ensure_future(client("D", "/test/transfer", {
        "peer": c.peer, "src_blocks": src[::-1], "hold": alloc["hold"],
        "dst_blocks": alloc["block_ids"], "src_tier": "device", "dst_tier": "device",
    }))  # fmt: skip

    async def receiving() -> bool:
        return bool((await client.info("C"))["gates"]["recv"]["waiting"] == 1)

    await client.wait_for("C's receive", receiving, 5)
    await asyncio.sleep(0.2)  # D's send is posted on the connected channel by now
    killed = cluster.kill("C")
    reply = await transfer
    took = time.monotonic() - killed
    assert reply["error"] is not None
    assert took < TIMEOUT_S + 3, f"the sender noticed after {took:.1f} s"
    assert (await client.info("D"))["counters"]["failed"] == failed + 1
    await _assert_settled(client, "D", ["src/big"])
    assert (await client("D", "/test/release", {"key": "src/big"}))["released"]
    await _assert_settled(client, "D")


async def test_restarted_peer_pairs_afresh(cluster: Cluster, http: aiohttp.ClientSession) -> None:
    """C comes back as a new process (same id, new incarnation): D pairs with it both ways, and
    D's registry saw the old incarnation leave."""
    client = Client(http, cluster)
    old = cluster.procs["C"].key
    c = cluster.restart("C")
    assert c.key != old
    if cluster.procs["D"].proc.poll() is not None:
        cluster.restart("D")
    src = await client.source("D", "src", "device", 12, seed=700)
    back = await client.source("C", "src", "dram", 12, seed=701)
    rng = random.Random(17)
    await asyncio.gather(
        move(client, Move("D", "C", "device", "device", tuple(rng.sample(src, 9)), 12),
             LARGE_BLOCK_BYTES),
        move(client, Move("C", "D", "dram", "device", tuple(back), 12), LARGE_BLOCK_BYTES),
    )  # fmt: skip

    async def registry_caught_up() -> bool:
        info = await client.info("D")
        return old in info["left"] and c.key in info["peers"] and old not in info["peers"]

    await client.wait_for("D's registry", registry_caught_up, DEAD_AFTER_S + 5)
    for name in "CD":
        assert (await client(name, "/test/release", {"key": "src"}))["released"]
        await _assert_settled(client, name)


async def test_offer_never_committed_is_reaped(
    cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    """D offers and never commits (as if it died in between, unnoticed): C releases the
    reserved blocks once the offer expires, and refuses a commit that comes after that."""
    client = Client(http, cluster)
    for name in "CD":
        if cluster.procs[name].proc.poll() is not None:
            cluster.restart(name)
    c, d = cluster.procs["C"], cluster.procs["D"]
    tokens = [random.Random(23).randrange(32000) for _ in range(5 * BLOCK + 1)]
    t0 = time.monotonic()
    ticket = await client("D", "/test/offer_only", {"peer": c.peer, "tokens": tokens})
    assert ticket["num_cached_blocks"] == 0 and ticket["num_blocks"] == 6
    held = (await client.check("C"))["holds"]
    assert len(held) == 1 and held[0].startswith("in/")

    async def reaped() -> bool:
        return not (await client.check("C"))["holds"]

    await client.wait_for("the reaper", reaped, TIMEOUT_S + REAP_INTERVAL_S + 3)
    took = time.monotonic() - t0
    assert TIMEOUT_S - 0.2 < took < TIMEOUT_S + REAP_INTERVAL_S + 1.5
    late = {"src": {"id": "D", "inc": d.inc}, "transfer_id": ticket["transfer_id"]}
    status, reply = await client.raw("C", "/internal/kv/commit", late)
    assert status == 502, reply
    assert (await client("C", "/test/match", {"tokens": tokens}))["num_tokens"] == 0
    await _assert_settled(client, "C")


async def test_sender_killed_receiver_releases_everything(
    cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    """D dies holding three things at C: an offer it never committed, a commit whose data never
    came (C's receive fails), and an ``alloc_remote`` allocation. C releases all three (the
    registry reports D gone after ``DEAD_AFTER_S``, before the offer would expire, and
    ``forget`` drops what D held) and ends intact, with nothing of D's prompts in its tree."""
    client = Client(http, cluster)
    for name in "CD":
        if cluster.procs[name].proc.poll() is not None:
            cluster.restart(name)
    c, d = cluster.procs["C"], cluster.procs["D"]
    rng = random.Random(19)
    offered = [rng.randrange(32000) for _ in range(3 * BLOCK)]
    committed = [rng.randrange(32000) for _ in range(4 * BLOCK + 3)]
    blocks = await client.source("D", "tokens", "device", 5, seed=800)
    info = await client.info("C")
    before, passed = info["counters"], info["gates"]["recv"]["passed"]

    ticket = await client("D", "/test/offer_only", {"peer": c.peer, "tokens": offered})
    assert ticket["num_blocks"] == 3
    await client("D", "/test/alloc_remote", {"peer": c.peer, "n": 4, "tier": "dram"})
    await client("D", "/test/gate", {"name": "send", "closed": True})
    commit = asyncio.ensure_future(client("D", "/test/transfer_with_insert",
                                          {"peer": c.peer, "tokens": committed, "blocks": blocks}))  # fmt: skip

    async def receiving() -> bool:
        info = await client.info("C")
        return bool(info["gates"]["recv"]["passed"] > passed and len(info["holds"]) == 3)

    await client.wait_for("C's receive", receiving, 5)
    holds = (await client.info("C"))["holds"]
    assert sorted(h.split("/")[0] for h in holds) == ["alloc", "in", "in"]
    assert f"alloc/{d.key}/" in " ".join(holds)
    cluster.kill("D")
    with pytest.raises(aiohttp.ClientError):
        await commit

    async def released() -> bool:
        return not (await client.check("C"))["holds"]

    took = await client.wait_for("C to release D's holds", released, 10)
    assert took < max(TIMEOUT_S + REAP_INTERVAL_S, DEAD_AFTER_S + 0.5) + 2
    info = await client.info("C")
    assert info["counters"]["failed"] == before["failed"] + 1  # the committed receive
    assert info["counters"]["received_blocks"] == before["received_blocks"]
    assert d.key in info["left"]
    for toks in offered, committed:
        assert (await client("C", "/test/match", {"tokens": toks}))["num_tokens"] == 0
    await _assert_settled(client, "C")
