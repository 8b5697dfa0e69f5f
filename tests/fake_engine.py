"""A deterministic ``EngineClient`` for server tests: no model, no scheduler, exact outputs.

Output token i (0-based) of a request is ``(last prompt token + i + 1 + (seed or 0)) % vocab_size``;
each increment carries one token whose text is ``tokenizer.decode`` of the tokens so far minus the
text already sent. Fake logprobs: the sampled token has ``-0.5``; alternative j (0-based) is token
``(token + j) % vocab_size`` with ``-0.5 - j``.

Metrics (``render_metrics``): the fake has no memory, so every block of its two fixed-size tiers is
free; its counters count accepted requests, and latencies are observed as outputs are yielded.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field

from memserve.engine.types import (
    EngineOverloadedError,
    FinishReason,
    RequestError,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
)
from memserve.metrics import EngineMetrics, EngineSnapshot, TierSnapshot
from memserve.model.tokenizer import Tokenizer

NUM_DEVICE_BLOCKS = 64
NUM_DRAM_BLOCKS = 256


def fake_token_ids(prompt_token_ids: Sequence[int], num_tokens: int, vocab_size: int) -> list[int]:
    """The tokens the fake generates for an unseeded request (ignoring stops)."""
    last = prompt_token_ids[-1]
    return [(last + i + 1) % vocab_size for i in range(num_tokens)]


def fake_logprob(token_id: int, num_top: int, vocab_size: int) -> TokenLogprob:
    top = tuple(((token_id + j) % vocab_size, -0.5 - j) for j in range(num_top))
    return TokenLogprob(token_id, -0.5, top)


@dataclass
class FakeEngine:
    """Knobs: ``overloaded`` (generate raises ``EngineOverloadedError``), ``healthy``,
    ``token_delay_s`` (sleep before each token, so disconnects can happen mid-stream),
    ``final_finish_reason`` (force e.g. "abort" / "error" on the last increment),
    ``num_cached_tokens`` and ``num_cached_tokens_dram`` (reported on every increment; the
    latter is the part of the former that came from DRAM).

    Records: ``requests`` (every accepted call), ``aborted`` (ids closed before finishing),
    ``finished`` (ids that ran to completion), ``num_running`` (generate calls in flight),
    ``num_hit_tokens_*`` (cached tokens reported, per tier), ``metrics`` (over ``snapshot()``).
    """

    tokenizer: Tokenizer
    model_name: str = "fake-model"
    max_model_len: int = 64
    overloaded: bool = False
    healthy: bool = True
    token_delay_s: float = 0.0
    final_finish_reason: FinishReason | None = None
    num_cached_tokens: int = 0
    num_cached_tokens_dram: int = 0
    requests: list[tuple[str, tuple[int, ...], SamplingParams]] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    num_running: int = 0
    num_hit_tokens_dram: int = 0  # counters: the cached tokens reported, by tier
    num_hit_tokens_device: int = 0
    metrics: EngineMetrics = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = EngineMetrics(self.snapshot)

    def is_healthy(self) -> bool:
        return self.healthy

    def render_metrics(self) -> bytes:
        return self.metrics.render()

    def snapshot(self) -> EngineSnapshot:
        num_prompt_tokens = sum(len(prompt) for _, prompt, _ in self.requests)
        device_hits, dram_hits = self.num_hit_tokens_device, self.num_hit_tokens_dram
        return EngineSnapshot(
            num_running=self.num_running,
            num_waiting=0,
            device=TierSnapshot(NUM_DEVICE_BLOCKS, NUM_DEVICE_BLOCKS, 0, 0, device_hits, 0),
            dram=TierSnapshot(NUM_DRAM_BLOCKS, NUM_DRAM_BLOCKS, 0, 0, dram_hits, 0),
            prefix_query_tokens=num_prompt_tokens,
            prompt_tokens_computed=num_prompt_tokens - device_hits - dram_hits,
            swap_out_blocks=0,
            swap_in_blocks=0,
            num_preemptions=0,
        )

    def _validate(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        if not prompt_token_ids:
            raise RequestError("empty prompt", "prompt")
        if len(prompt_token_ids) + params.max_tokens > self.max_model_len:
            raise RequestError("prompt too long", "prompt")
        if self.overloaded:
            raise EngineOverloadedError("fake engine is overloaded")

    async def generate(
        self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        self._validate(prompt_token_ids, params)
        self.requests.append((request_id, tuple(prompt_token_ids), params))
        self.num_running += 1
        self.num_hit_tokens_dram += self.num_cached_tokens_dram
        self.num_hit_tokens_device += self.num_cached_tokens - self.num_cached_tokens_dram
        done = False
        start = last = time.monotonic()
        try:
            async with contextlib.aclosing(
                self._outputs(request_id, prompt_token_ids, params)
            ) as outs:
                async for output in outs:
                    last = self._observe(output, start, last)
                    done = output.finished
                    yield output
        finally:
            self.num_running -= 1
            (self.finished if done else self.aborted).append(request_id)

    def _observe(self, output: RequestOutput, start: float, last: float) -> float:
        """Record the latencies of one increment (one token); returns its time."""
        now = time.monotonic()
        if output.num_output_tokens == 1:
            self.metrics.observe_ttft(now - start)
        else:
            self.metrics.observe_itl(now - last)
        if output.finished:
            self.metrics.observe_e2e(now - start)
        return now

    async def _outputs(
        self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> AsyncGenerator[RequestOutput, None]:
        vocab_size = self.tokenizer.vocab_size
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= self.tokenizer.eos_token_ids
        generated: list[int] = []
        text = ""
        for i in range(params.max_tokens):
            await asyncio.sleep(self.token_delay_s)
            token = (prompt_token_ids[-1] + i + 1 + (params.seed or 0)) % vocab_size
            generated.append(token)
            stopped = token in stop_ids and len(generated) > params.min_tokens
            finished = stopped or len(generated) == params.max_tokens
            full_text = self.tokenizer.decode(generated, params.skip_special_tokens)
            reason: FinishReason | None = None
            if finished:
                reason = self.final_finish_reason or ("stop" if stopped else "length")
            yield RequestOutput(
                request_id=request_id,
                new_token_ids=(token,),
                new_text=full_text[len(text) :],
                finished=finished,
                finish_reason=reason,
                stop_reason=token
                if stopped and token not in self.tokenizer.eos_token_ids
                else None,
                new_logprobs=None
                if params.logprobs is None
                else (fake_logprob(token, params.logprobs, vocab_size),),
                num_prompt_tokens=len(prompt_token_ids),
                num_cached_tokens=self.num_cached_tokens,
                num_cached_tokens_dram=self.num_cached_tokens_dram,
                num_output_tokens=len(generated),
            )
            text = full_text
            if finished:
                return
