"""A request's state inside the engine (owned by the scheduler; the runner only reads it)."""

from __future__ import annotations

import enum
import time
from typing import Protocol

import torch

from memserve.engine.detokenizer import IncrementalDetokenizer
from memserve.engine.types import FinishReason, SamplingParams, TokenLogprob
from memserve.tree.radix import NodeHandle


class LayerSink(Protocol):
    """Receives each layer of a request's KV as soon as the step computing the end of its prompt
    has written it (``ModelRunner`` calls it from the step's thread, in layer order)."""

    def layer_done(self, layer: int, block_ids: list[int]) -> None: ...


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Request:
    """``token_ids`` is prompt + output so far; ``num_computed_tokens`` of them have KV in the cache.

    Scheduling tokens, not phases: every step a request computes some of
    ``token_ids[num_computed_tokens:]`` (a prompt chunk, or the one token sampled last step); it
    samples a new token only in the step that catches ``num_computed_tokens`` up with
    ``num_tokens``. Preemption resets ``num_computed_tokens`` to 0 (recompute).
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        detokenizer: IncrementalDetokenizer,
        eos_token_ids: frozenset[int],
    ) -> None:
        self.request_id = request_id
        self.params = params
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens found cached at first admission
        self.num_cached_tokens_dram = 0  # of those, swapped in from DRAM
        self.block_ids: list[int] = []
        self.prefix_node: NodeHandle | None = None  # the tree node this request keeps locked
        self.num_published_blocks = 0  # leading blocks of block_ids that are in the tree
        self.status = RequestStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.stop_reason: str | int | None = None
        self.detokenizer = detokenizer
        self.stop_token_ids = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else eos_token_ids
        )
        self.generator = (
            torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        )
        self.num_emitted_tokens = 0
        self.pending_logprobs: list[TokenLogprob] = []
        self.num_preemptions = 0
        # On finish, hand the blocks to a transfer (``Hold``) instead of freeing them.
        self.keep_kv = False
        self.layer_sink: LayerSink | None = None  # by-layer KV streaming of the prompt's end
        self.arrival_time = time.monotonic()
        self.last_token_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def min_tokens_pending(self) -> bool:
        """True while stop tokens must not be sampled (``min_tokens`` not reached yet)."""
        return self.num_output_tokens < self.params.min_tokens
