"""Prefill/decode disaggregation with caching: one workflow, configured by ``DisaggConfig``.

A request's life (until the global scheduler exists, the decode instance is the front door)::

    client ─▶ DecodeFront.generate (decode instance D)
      1. D reserves blocks for the prompt's KV (``DistributedMemPool.expect``): what D holds
         already (caching ``both``/``full``) is matched and locked, the rest allocated. → Ticket
      2. D ─ POST /internal/prefill {prompt, params, ticket} ─▶ PrefillWorker (instance P)
      3. P prefills (reusing its own cache when ``prefill_keeps``), samples the first token, and
         pushes exactly the ticket's blocks to D (one send); D receives them into the hold.
      4. P answers {first token, logprob, cached tokens, sampler state}; D starts decoding with
         the hold's blocks (``AsyncEngine.generate_prefilled``), publishing the prompt there
         when ``decode_keeps``, and streams tokens.
      5. ``send_back``: when the request completes, D ``transfer_with_insert``-s prompt + output
         to P, which receives only what it lacks, so the next turn hits there too. A next turn
         that arrives while that send-back is still on its way (a chat client answers at once)
         waits for it before its prefill is asked for, up to ``SEND_BACK_WAIT_S``: the KV is
         already computed, so waiting for it is cheaper than P computing it again.

``usage.prompt_tokens_details.cached_tokens`` is P's hit: prompt tokens whose prefill was
skipped, not blocks D already held (those only shrink the transfer).

Failures: if P fails or leaves before step 4 completes (nothing was streamed yet), D releases
its reservation and retries on another prefill instance, then answers 503. Every in-flight
hold has one owner that releases it on every path.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import itertools
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import structlog

from memserve.config import DisaggConfig
from memserve.engine.async_engine import AsyncEngine
from memserve.engine.kv_manager import hand_off_key
from memserve.engine.types import (
    EngineOverloadedError,
    Prefilled,
    RequestOutput,
    SamplingParams,
)
from memserve.engine.wire import (
    logprob_from_json,
    logprob_to_json,
    params_from_json,
    params_to_json,
)
from memserve.mempool.block_allocator import NoFreeBlocksError
from memserve.mempool.distributed import (
    DistributedMemPool,
    LayerSender,
    Peer,
    Ticket,
    endpoint_from,
    endpoint_json,
)
from memserve.mempool.pool import MemPool
from memserve.model.tokenizer import Tokenizer
from memserve.transport.channels import TransferError
from memserve.transport.registry import InstanceInfo, Registry

log = structlog.get_logger(__name__)

MAX_PREFILL_ATTEMPTS = 2
SEND_BACK_WAIT_S = 5.0
"""The longest a next turn waits for its conversation's send-back (a step or two of P, plus
the transfer); past it, P computes what has not arrived."""


def prefill_params(params: SamplingParams) -> SamplingParams:
    """What the prefill instance runs: exactly one sampled token; stop rules are the decode
    instance's job (it checks them on the first token like on every other)."""
    return dataclasses.replace(
        params, max_tokens=1, min_tokens=0, stop=(), stop_token_ids=(), ignore_eos=True
    )


class PrefillWorker:
    """The prefill role: ``/internal/prefill`` runs the prompt and pushes its KV to the caller."""

    def __init__(self, engine: AsyncEngine, dmp: DistributedMemPool) -> None:
        self.engine = engine
        self.dmp = dmp

    async def prefill(self, body: dict[str, Any]) -> dict[str, Any]:
        decode = Peer(endpoint_from(body["decode"]), str(body["decode"]["url"]))
        ticket = Ticket.from_dict(body["ticket"])
        params = params_from_json(body["params"])
        prompt = [int(t) for t in body["prompt_token_ids"]]
        request_id = f"{decode.endpoint.instance_id}/{body['request_id']}"
        sink = None
        if ticket.num_parts > 1:  # by layer: the decode side is receiving already
            try:
                await self.dmp.channels.connect(decode.endpoint, ticket.gen, outgoing=True)
            except TransferError:
                self.dmp.counters.failed += 1
                raise
            sink = LayerSender(self.dmp, decode.endpoint, ticket)
        final: RequestOutput | None = None
        stream = self.engine.generate(request_id, prompt, prefill_params(params), True, sink)
        async for out in stream:
            final = out
        key = hand_off_key(request_id)  # a completed request handed its blocks off to it
        try:
            if final is None or final.finish_reason != "length" or not final.new_token_ids:
                raise TransferError(f"prefill of {request_id} ended with {final and final.error}")
            if sink is not None:
                stats = await sink.wait()
            else:
                hold = await self.engine.call(lambda e: e.pool.holds[key])
                stats = await self.dmp.push(decode, ticket, hold.block_ids)
        finally:
            self.engine.release_soon(key)
        self.dmp.counters.exposed_seconds += stats.seconds
        self.dmp.counters.exposed_transfers += 1
        state = final.sampler_state
        return {
            "first_token": final.new_token_ids[0],
            "first_logprob": logprob_to_json(final.new_logprobs[0] if final.new_logprobs else None),
            "num_cached_tokens": final.num_cached_tokens,
            "num_cached_tokens_dram": final.num_cached_tokens_dram,
            "sampler_state": None if state is None else base64.b64encode(state).decode(),
            "sent_blocks": stats.num_blocks,
            "sent_bytes": stats.num_bytes,
        }


class DecodeFront:
    """The decode role's ``EngineClient``: each request is prefilled on a prefill instance."""

    def __init__(
        self,
        engine: AsyncEngine,
        dmp: DistributedMemPool,
        registry: Registry,
        config: DisaggConfig,
        url: str,
    ) -> None:
        self.engine = engine
        self.dmp = dmp
        self.registry = registry
        self.config = config
        self.url = url
        self._round_robin = itertools.count()
        self._tasks: set[asyncio.Future[Any]] = set()  # send-backs, abandoned receives
        self._calls: dict[str, set[asyncio.Future[dict[str, Any]]]] = {}  # prefills, by peer
        # Send-backs in flight, by peer: the task and the tokens it sends.
        self._sending: dict[str, dict[asyncio.Future[None], tuple[int, ...]]] = {}

    # ---- EngineClient ---------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def is_healthy(self) -> bool:
        return self.engine.is_healthy()

    def render_metrics(self) -> bytes:
        return self.engine.render_metrics()

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        prefill_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """``prefill_id``: the prefill instance to try first (the global scheduler's choice);
        else they take turns."""
        self.engine.engine.validate(prompt_token_ids, params)
        prefilled, peer = await self._prefill(
            request_id, list(prompt_token_ids), params, prefill_id
        )
        stream = self.engine.generate_prefilled(request_id, prompt_token_ids, params, prefilled)
        tokens = list(prompt_token_ids)
        async for out in stream:
            tokens.extend(out.new_token_ids)
            if out.finished and prefilled.keep_kv:
                self._send_back_later(request_id, peer, out, tokens)
            yield out

    async def close(self) -> None:
        """Wait for the send-backs and abandoned receives still in flight (shutdown)."""
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # ---- steps ----------------------------------------------------------------------------

    def _prefill_peers(self, first: str | None) -> list[Peer]:
        live = self.registry.live("prefill")
        if not live:
            return []
        start = next(self._round_robin) % len(live)
        order = live[start:] + live[:start]
        order.sort(key=lambda p: p.endpoint.instance_id != first)  # stable: ``first`` first
        return [Peer(p.endpoint, p.url) for p in order[:MAX_PREFILL_ATTEMPTS]]

    async def _prefill(
        self, request_id: str, prompt: list[int], params: SamplingParams, first: str | None
    ) -> tuple[Prefilled, Peer]:
        """Steps 1-4 on the first prefill instance that succeeds; 503 if none does."""
        arrival = time.monotonic()
        errors: list[str] = []
        for peer in self._prefill_peers(first):
            try:
                return await self._prefill_on(peer, request_id, prompt, params, arrival), peer
            except TransferError as e:
                log.warning("prefill failed", request_id=request_id, peer=peer.url, error=str(e))
                errors.append(str(e))
        reason = "; ".join(errors) or "no prefill instance is registered"
        raise EngineOverloadedError(f"prefill unavailable: {reason}")

    async def _prefill_on(
        self, peer: Peer, request_id: str, prompt: list[int], params: SamplingParams, arrival: float
    ) -> Prefilled:
        await self._sent_back_before(peer, prompt)
        key = f"req/{request_id}/{peer.endpoint.instance_id}"  # one hold per attempt
        by_layer = self.config.transfer_mode == "by-layer"
        try:
            ticket = await self.dmp.expect(peer.endpoint, prompt, False, key, by_layer)
        except NoFreeBlocksError as e:
            raise EngineOverloadedError(f"no KV room for the prompt here: {e}") from e
        receiving = None
        if by_layer and ticket.num_blocks:  # post the receives now: layers arrive as computed
            receiving = asyncio.ensure_future(self.dmp.receive(peer.endpoint, ticket.transfer_id))
        body = {
            "request_id": request_id,
            "prompt_token_ids": prompt,
            "params": params_to_json(params),
            "ticket": ticket.to_dict(),
            "decode": {**endpoint_json(self.dmp.me), "url": self.url},
        }
        try:
            reply = await self._call_prefill(peer, body)
            if receiving is not None:
                await receiving
        except BaseException:
            if receiving is not None:
                # Its receives may wait up to the transfer timeout for a prefill that will never
                # send; ``receive`` keeps the hold until its thread returns, then releases it.
                # The caller does not wait for that (owned here until then).
                receiving.cancel()
                self._own(receiving)
            await self.dmp.abandon(ticket.transfer_id, key)  # the hold is released either way
            raise
        state = reply.get("sampler_state")
        return Prefilled(
            hold_key=key,
            num_cached_blocks=ticket.num_cached_blocks,
            first_token=int(reply["first_token"]),
            first_logprob=logprob_from_json(reply.get("first_logprob")),
            num_cached_tokens=int(reply["num_cached_tokens"]),
            num_cached_tokens_dram=int(reply.get("num_cached_tokens_dram", 0)),
            arrival_time=arrival,
            generator_state=None if state is None else base64.b64decode(state),
            keep_kv=self.config.send_back,
        )

    async def _call_prefill(self, peer: Peer, body: dict[str, Any]) -> dict[str, Any]:
        """POST /internal/prefill; no time limit (the prefill may queue), but if the registry
        sees ``peer`` leave meanwhile (``peer_left``), the call fails with ``TransferError``
        even when the connection does not (a machine that vanished sends no reset)."""
        call = asyncio.ensure_future(self.dmp.post(peer, "/internal/prefill", body, timeout_s=0))
        calls = self._calls.setdefault(peer.endpoint.key, set())
        calls.add(call)
        try:
            return await asyncio.shield(call)
        except asyncio.CancelledError:
            if not call.cancelled():  # we are cancelled, not the call
                call.cancel()
                raise
            raise TransferError(f"{peer.endpoint.instance_id} left during the prefill") from None
        finally:
            calls.discard(call)

    async def peer_left(self, info: InstanceInfo) -> None:
        """Registry callback: fail the prefill calls in flight to an instance that left."""
        for call in self._calls.pop(info.endpoint.key, set()):
            call.cancel()

    def _send_back_later(
        self, request_id: str, peer: Peer, out: RequestOutput, tokens: Sequence[int]
    ) -> None:
        if out.finish_reason not in ("stop", "length"):
            return  # aborted or failed: the engine freed the blocks, nothing was handed off
        task = asyncio.create_task(self._send_back(request_id, peer))
        self._own(task)
        sending = self._sending.setdefault(peer.endpoint.key, {})
        sending[task] = tuple(tokens)
        task.add_done_callback(lambda t: sending.pop(t, None))

    async def _sent_back_before(self, peer: Peer, prompt: Sequence[int]) -> None:
        """Wait (at most ``SEND_BACK_WAIT_S``) for the send-backs in flight to ``peer`` of
        conversations that ``prompt`` continues (what they send is a prefix of it)."""
        sending = self._sending.get(peer.endpoint.key, {})
        ours = [t for t, tokens in sending.items() if _continues(prompt, tokens)]
        if ours:
            await asyncio.wait(ours, timeout=SEND_BACK_WAIT_S)  # never cancels them

    def _own(self, task: asyncio.Future[Any]) -> None:
        """Keep a background task until it ends (``close`` waits for the rest)."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_back(self, request_id: str, peer: Peer) -> None:
        """Step 5: the whole blocks of prompt + output go to P (only what P lacks moves)."""
        key = hand_off_key(request_id)
        try:
            tokens, blocks = await self.engine.call(lambda e: _whole_blocks(e.pool, key))
            if blocks:
                await self.dmp.transfer_with_insert(peer, tokens, blocks)
        except (TransferError, EngineOverloadedError) as e:
            log.warning("send-back failed", request_id=request_id, peer=peer.url, error=str(e))
        finally:
            self.engine.release_soon(key)


def _continues(prompt: Sequence[int], sent: Sequence[int]) -> bool:
    """``prompt`` starts with ``sent`` but its last token (which never has KV), whole."""
    n = len(sent) - 1
    return 0 < n <= len(prompt) and tuple(prompt[:n]) == tuple(sent[:n])


def _whole_blocks(pool: MemPool, key: str) -> tuple[list[int], list[int]]:
    hold = pool.holds[key]
    num_blocks = len(hold.tokens) // pool.block_size
    return list(hold.tokens[: num_blocks * pool.block_size]), hold.block_ids[:num_blocks]
