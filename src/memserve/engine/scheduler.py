"""Iteration-level scheduler: which requests compute how many tokens this step.

Works on ints only (token counts, block ids); never touches a tensor. Policy, in order:

1. Running requests, oldest first, each gets ``min(uncomputed tokens, budget left)`` — one token
   for a decode, a chunk for a long prompt (chunked prefill). When the cache has no room for a
   running request's new tokens, the newest running request is preempted (its blocks freed, its
   tokens recomputed later) until there is room; nothing crashes and no request is lost.
2. Waiting requests, first come first served, while budget, ``max_num_seqs`` and blocks allow.
   Admission attaches the request's cached prefix (``KVCacheManager.admit``), so a hit starts
   past it; the DRAM part of hits is swapped in within a per-step block budget. No waiting request is admitted in a step that had to preempt (it would only thrash).

Blocks come from the MemPool through ``KVCacheManager``, which reclaims historical (cached,
unused) blocks before the scheduler ever has to preempt.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from memserve.config import SchedulerConfig
from memserve.engine.kv_manager import KVCacheManager
from memserve.engine.request import Request, RequestStatus


@dataclass(frozen=True)
class ScheduledChunk:
    """``request`` computes ``token_ids[start : start + num_tokens]`` this step."""

    request: Request
    start: int
    num_tokens: int

    @property
    def samples(self) -> bool:
        """A token is sampled iff this chunk reaches the end of the request's known tokens."""
        return self.start + self.num_tokens == self.request.num_tokens


@dataclass(frozen=True)
class SchedulerOutput:
    chunks: tuple[ScheduledChunk, ...]
    preempted: tuple[str, ...]

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0  # counter, for metrics

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[str] = []
        for request in list(self.running):
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self._make_room(request, n, preempted):
                continue
            chunks.append(ScheduledChunk(request, request.num_computed_tokens, n))
            budget -= n
        if not preempted:
            budget = self._admit_waiting(budget, chunks)
        return SchedulerOutput(tuple(chunks), tuple(preempted))

    def _make_room(self, request: Request, num_tokens: int, preempted: list[str]) -> bool:
        """Allocate for ``request``, preempting the newest running requests as needed.

        Returns False if ``request`` itself had to be preempted.
        """
        while not self.kv.grow(request, num_tokens):
            victim = self.running[-1]
            self._preempt(victim)
            preempted.append(victim.request_id)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.release(request)  # what it computed stays cached: re-admission will hit it
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)

    def _admit_waiting(self, budget: int, chunks: list[ScheduledChunk]) -> int:
        swap_budget: int | None = None  # the first swap-in of a step may be any size
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            swapped = self.kv.admit(request, budget, swap_budget)
            if swapped is None:
                break
            if swapped:
                left = self._swap_budget() if swap_budget is None else swap_budget
                swap_budget = max(0, left - swapped)
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            chunks.append(ScheduledChunk(request, request.num_computed_tokens, n))
            budget -= n
        return budget

    def _swap_budget(self) -> int:
        """Blocks a step may swap in from DRAM: as many as its token budget fills. A copy of a
        block's KV costs far less than computing its tokens, so the swap-ins of one step delay
        the running requests by less than a step."""
        return max(1, self.config.max_num_batched_tokens // self.kv.block_size)

    def update_computed(self, output: SchedulerOutput) -> None:
        for chunk in output.chunks:
            request = chunk.request
            request.num_computed_tokens += chunk.num_tokens
            if chunk.start < request.num_prompt_tokens:
                self.kv.publish(request)  # concurrent requests share the prompt from now on

    def add_running(self, request: Request) -> None:
        """Start a request that arrives with its prompt's KV (prefilled elsewhere)."""
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def finish(self, request: Request) -> None:
        """Remove a finished or aborted request from the queues and free its blocks, or, for a
        ``keep_kv`` request that completed, hand them to a transfer (``KVCacheManager.hand_off``)."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        if request.keep_kv and request.finish_reason in ("stop", "length"):
            self.kv.hand_off(request)
        else:
            self.kv.release(request)
        request.status = RequestStatus.FINISHED
