"""Directional point-to-point channels between instances, made on demand.

A channel carries KV from ``src`` to ``dst``: a two-rank process group (rank 0 = ``src``) built on
a ``PrefixStore`` of the shared rendezvous ``TCPStore`` under the key::

    kv/{src.instance_id}@{src.incarnation}>{dst.instance_id}@{dst.incarnation}/{gen}

so no fixed world is needed: any two instances pair whenever both ask, late joiners included, and
a restarted instance (new incarnation) or a broken channel (next ``gen``) pairs afresh. Gloo for
CPU tensors, NCCL for CUDA tensors (same construction).

Caveat (untested, no GPU yet): NCCL point-to-point ignores tags and matches messages in posting
order, so with ``backend="nccl"`` concurrent transfers on one channel must be posted in the same
order on both sides, which the one-thread-per-operation design below does not guarantee.

Who decides what: the **receiver** owns a channel's generation and the tags of the messages on it
(it answers a transfer handshake with them; see ``mempool/distributed.py``). Any failure on a
channel (peer died, timeout) drops it on this side; the receiver then moves to ``gen + 1``.

Threading (measured on torch 2.13): gloo's ``send``/``recv`` only *post* an operation, its I/O
thread moves the bytes once both sides have posted, and ``Work`` has no ``get_future()``. So every
operation (connect, gather, post, ``wait``) runs in a worker thread of this object's executor and
completes an asyncio future; the event loop never blocks. Each operation gets its own thread
rather than one thread per peer: messages carry unique tags, so they cannot be mismatched, and no
operation can wait behind another whose counterpart the peer has not posted yet (a per-peer FIFO
deadlocks when two transfers are announced in one order and sent in the other). Connecting blocks
until the peer connects too; each connect uses its own ``store.clone()`` because one TCPStore
client serialises its blocking calls.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import PrefixStore, Store

T = TypeVar("T")

_Backend = Any  # a two-rank ProcessGroupGloo / ProcessGroupNCCL (torch's stubs lack send/recv)


class TransferError(RuntimeError):
    """A transfer failed: the peer died, timed out, refused, or the data did not arrive."""


@dataclass(frozen=True)
class Endpoint:
    """An instance as the data plane knows it: a stable id and the incarnation of its process."""

    instance_id: str
    incarnation: str

    @property
    def key(self) -> str:
        return f"{self.instance_id}@{self.incarnation}"


class _Group:
    """One connected two-rank process group, or the error that stopped it connecting."""

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.pg: _Backend | None = None
        self.error: BaseException | None = None


class Channels:
    """This instance's channels to its peers. Thread-safe; ``close`` once at shutdown."""

    def __init__(
        self,
        store: Store,
        me: Endpoint,
        timeout_s: float = 30.0,
        max_threads: int = 64,
        backend: str = "gloo",
    ) -> None:
        """``backend``: ``gloo`` (CPU tensors) or ``nccl`` (CUDA tensors, on the current device)."""
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be gloo or nccl, got {backend!r}")
        self.backend = backend
        self.store = store
        self.me = me
        self.timeout = timedelta(seconds=timeout_s)
        self._groups: dict[str, _Group] = {}
        self._retired: set[str] = set()  # keys of failed or dropped channels: never reused
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_threads, thread_name_prefix="kv-channel")
        self.num_connects = 0  # counter: process groups built

    # ---- async operations -----------------------------------------------------------------

    async def send_parts(
        self, dst: Endpoint, gen: int, tag: int, make: Callable[[], Sequence[torch.Tensor]]
    ) -> int:
        """Send each tensor of ``make()`` (built in the worker thread: a gather, or zero-copy
        slices) to ``dst`` on channel ``me > dst`` generation ``gen`` with tag ``tag + i``, all
        posted at once, and wait for all. Returns the bytes sent; raises ``TransferError``."""
        return await self._run(lambda: self._send_parts(dst, gen, tag, make))

    async def recv(
        self,
        src: Endpoint,
        gen: int,
        tag: int,
        out: torch.Tensor,
        then: Callable[[torch.Tensor], T],
        timeout_s: float | None = None,
    ) -> T:
        """Receive into ``out`` from ``src`` on channel ``src > me`` generation ``gen``, then run
        ``then(out)`` in the same worker thread (e.g. scatter into cache blocks)."""
        results: list[T] = []
        await self.recv_parts(src, gen, tag, [out], lambda _, o: results.append(then(o)), timeout_s)
        return results[0]

    async def recv_parts(
        self,
        src: Endpoint,
        gen: int,
        tag: int,
        outs: Sequence[torch.Tensor],
        then: Callable[[int, torch.Tensor], object],
        timeout_s: float | None = None,
    ) -> None:
        """Receive ``outs[i]`` with tag ``tag + i`` (all posted at once, so the sender may send
        them in any order and as soon as it has each), running ``then(i, outs[i])`` as each
        arrives, in order."""
        await self._run(lambda: self._recv_parts(src, gen, tag, outs, then, timeout_s))

    def post_send(self, dst: Endpoint, gen: int, tag: int, tensor: torch.Tensor) -> Any:
        """Post a send without waiting (callable from any thread; the channel must be
        connected already, see ``connect``). Returns the ``Work``: keep ``tensor`` alive and
        pass both to ``wait_sends``."""
        key = self._key(dst, gen, outgoing=True)
        with self._lock:
            group = self._groups.get(key)
        if group is None or group.pg is None:
            raise TransferError(f"channel {key} is not connected")
        return group.pg.send([tensor], 1, tag)

    async def wait_sends(self, dst: Endpoint, gen: int, works: Sequence[Any]) -> None:
        """Wait for posted sends; on failure the channel is dropped."""
        key = self._key(dst, gen, outgoing=True)
        await self._run(lambda: self._wait_sends(key, works))

    async def connect(self, peer: Endpoint, gen: int, outgoing: bool) -> None:
        """Build the channel ``me > peer`` (``outgoing``) or ``peer > me`` ahead of its use."""
        key = self._key(peer, gen, outgoing)
        await self._run(lambda: self._group(key, 0 if outgoing else 1))

    def drop(self, peer: Endpoint) -> None:
        """Forget every channel to and from ``peer`` (it left; its process groups are dead)."""
        with self._lock:
            for key in list(self._groups):
                if peer.key in key.split("/")[1].split(">"):
                    del self._groups[key]
                    self._retired.add(key)

    def close(self) -> None:
        with self._lock:
            self._groups.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ---- worker-thread side ---------------------------------------------------------------

    async def _run(self, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn)
        except TransferError:
            raise
        except RuntimeError as e:  # gloo: connection closed, timeout, ...
            raise TransferError(str(e).splitlines()[0][:300]) from e

    def _send_parts(
        self, dst: Endpoint, gen: int, tag: int, make: Callable[[], Sequence[torch.Tensor]]
    ) -> int:
        key = self._key(dst, gen, outgoing=True)
        pg = self._group(key, rank=0)
        tensors = [t.contiguous() for t in make()]
        try:
            works = [pg.send([t], 1, tag + i) for i, t in enumerate(tensors)]
        except RuntimeError:
            self._forget(key)
            raise
        self._wait_sends(key, works)
        return sum(t.numel() * t.element_size() for t in tensors)

    def _wait_sends(self, key: str, works: Sequence[Any]) -> None:
        """Wait for posted sends; a failure drops (and retires) the channel."""
        try:
            for work in works:
                work.wait(self.timeout)
        except RuntimeError:
            self._forget(key)
            raise

    def _recv_parts(
        self,
        src: Endpoint,
        gen: int,
        tag: int,
        outs: Sequence[torch.Tensor],
        then: Callable[[int, torch.Tensor], object],
        timeout_s: float | None,
    ) -> None:
        key = self._key(src, gen, outgoing=False)
        pg = self._group(key, rank=1)
        timeout = self.timeout if timeout_s is None else timedelta(seconds=timeout_s)
        try:
            works = [pg.recv([out], 0, tag + i) for i, out in enumerate(outs)]
            for i, (work, out) in enumerate(zip(works, outs, strict=True)):
                work.wait(timeout)
                then(i, out)
        except RuntimeError:
            self._forget(key)
            raise

    def _key(self, peer: Endpoint, gen: int, outgoing: bool) -> str:
        src, dst = (self.me, peer) if outgoing else (peer, self.me)
        return f"kv/{src.key}>{dst.key}/{gen}"

    def _group(self, key: str, rank: int) -> _Backend:
        """The connected group for ``key``, connecting it (once, whoever asks first) if new."""
        with self._lock:
            if key in self._retired:
                raise TransferError(f"channel {key} failed before; pair on a new generation")
            group = self._groups.get(key)
            owner = group is None
            if group is None:
                group = self._groups[key] = _Group()
        if owner:
            try:
                store = PrefixStore(key, self.store.clone())  # type: ignore[attr-defined]
                group.pg = self._connect(store, rank)
                self.num_connects += 1
            except BaseException as e:
                group.error = e
                self._forget(key)
            finally:
                group.ready.set()
        elif not group.ready.wait(self.timeout.total_seconds() + 5):
            raise TransferError(f"channel {key} is still connecting")
        if group.pg is None:
            raise TransferError(f"cannot connect channel {key}: {group.error}")
        return group.pg

    def _connect(self, store: Store, rank: int) -> _Backend:
        if self.backend == "nccl":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = self.timeout
            return dist.ProcessGroupNCCL(store, rank, 2, options)
        return dist.ProcessGroupGloo(store, rank, 2, self.timeout)

    def _forget(self, key: str) -> None:
        """A channel failed: never build that key again (the store still holds its old
        rendezvous entries; a rebuilt group could connect to a stale pair)."""
        with self._lock:
            self._groups.pop(key, None)
            self._retired.add(key)
