"""Model runner: the one place where scheduled ints become tensors, then logits, then tokens.

Contract: ``execute`` reads the requests of a ``SchedulerOutput`` (never mutates them or any queue),
runs one forward pass over all scheduled tokens and samples one token for every chunk that
``samples``. Decode chunks (one query token) are packed first so attention batches them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from memserve.attention.base import AttentionMetadata, PrefillSpan, build_decode_batches
from memserve.engine.sampler import Sampler, SampleRow
from memserve.engine.scheduler import ScheduledChunk, SchedulerOutput
from memserve.engine.types import TokenLogprob
from memserve.mempool.kv_cache import KVCache
from memserve.model.llama import LlamaModel


@dataclass(frozen=True)
class RunnerOutput:
    """Sampled token (and logprobs when asked) per request id, for chunks that sample."""

    token_ids: dict[str, int]
    logprobs: dict[str, TokenLogprob]


@dataclass(frozen=True)
class _Batch:
    input_ids: torch.Tensor  # [N]
    positions: torch.Tensor  # [N]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [S]
    sampled: tuple[ScheduledChunk, ...]  # the S chunks that sample, in logits order


class ModelRunner:
    def __init__(self, model: LlamaModel, cache: KVCache, sampler: Sampler) -> None:
        self.model = model
        self.cache = cache
        self.sampler = sampler
        self.device = model.device

    @torch.inference_mode()
    def execute(self, output: SchedulerOutput) -> RunnerOutput:
        if not output.chunks:
            return RunnerOutput({}, {})
        batch = self._prepare(output.chunks)
        logits = self.model.forward(
            batch.input_ids,
            batch.positions,
            self.cache,
            batch.meta,
            batch.logits_indices,
            self._layer_hook(batch.sampled),
        )
        rows = [self._sample_row(c) for c in batch.sampled]
        tokens, logprobs = self.sampler.sample(logits, rows)
        ids = [c.request.request_id for c in batch.sampled]
        return RunnerOutput(
            dict(zip(ids, tokens, strict=True)),
            {i: lp for i, lp in zip(ids, logprobs, strict=True) if lp is not None},
        )

    @staticmethod
    def _layer_hook(sampled: Sequence[ScheduledChunk]) -> Callable[[int], None] | None:
        """Streams each layer to the sinks of requests whose prompt ends in this step."""
        sinks = [
            (c.request.layer_sink, c.request.block_ids)
            for c in sampled
            if c.request.layer_sink is not None and c.start < c.request.num_prompt_tokens
        ]
        if not sinks:
            return None

        def on_layer(layer: int) -> None:
            for sink, block_ids in sinks:
                sink.layer_done(layer, block_ids)

        return on_layer

    @staticmethod
    def _sample_row(chunk: ScheduledChunk) -> SampleRow:
        r = chunk.request
        banned = tuple(r.stop_token_ids) if r.min_tokens_pending() else ()
        return SampleRow(r.params, r.generator, banned)

    def _prepare(self, chunks: Sequence[ScheduledChunk]) -> _Batch:
        decodes = sorted((c for c in chunks if c.num_tokens == 1), key=lambda c: c.start)
        prefills = [c for c in chunks if c.num_tokens > 1]
        bs = self.cache.block_size
        per_block = self.cache.pages_per_block * bs  # rows per block
        input_ids: list[int] = []
        positions: list[int] = []
        slot_rows: list[int] = []
        logits_indices: list[int] = []
        sampled: list[ScheduledChunk] = []
        for c in (*decodes, *prefills):
            table = c.request.block_ids
            for pos in range(c.start, c.start + c.num_tokens):
                slot_rows.append(table[pos // bs] * per_block + pos % bs)
            positions.extend(range(c.start, c.start + c.num_tokens))
            input_ids.extend(c.request.token_ids[c.start : c.start + c.num_tokens])
            if c.samples:
                logits_indices.append(len(input_ids) - 1)
                sampled.append(c)
        meta = AttentionMetadata(
            slot_rows=self._tensor(slot_rows),
            num_decodes=len(decodes),
            decodes=build_decode_batches(
                [c.request.block_ids for c in decodes],
                [c.start + 1 for c in decodes],
                bs,
                self.cache.pages_per_block,
                self.device,
            ),
            prefills=self._prefill_spans(prefills, start=len(decodes)),
        )
        return _Batch(
            self._tensor(input_ids),
            self._tensor(positions),
            meta,
            self._tensor(logits_indices),
            tuple(sampled),
        )

    def _prefill_spans(
        self, prefills: Sequence[ScheduledChunk], start: int
    ) -> tuple[PrefillSpan, ...]:
        ppb = self.cache.pages_per_block
        spans = []
        for c in prefills:
            context_len = c.start + c.num_tokens
            num_blocks = -(-context_len // self.cache.block_size)
            pages = [b * ppb for b in c.request.block_ids[:num_blocks]]
            spans.append(PrefillSpan(start, c.num_tokens, context_len, self._tensor(pages)))
            start += c.num_tokens
        return tuple(spans)

    def _tensor(self, values: Sequence[int] | Sequence[Sequence[int]]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)
