"""Public engine types: what a caller puts in (``SamplingParams``) and gets back (``RequestOutput``).

These cross the boundary between the engine and its callers (the HTTP server, the offline ``LLM``
class, tests); they are frozen and hold plain Python values only, never tensors.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

FinishReason = Literal["stop", "length", "abort", "error"]


class RequestError(ValueError):
    """The request itself is invalid (maps to HTTP 400 ``invalid_request_error``)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full (maps to HTTP 503 with ``Retry-After``)."""


class UpstreamError(RuntimeError):
    """The instance serving the request failed after it had started answering (maps to HTTP 502
    ``upstream_error``; in a stream, an error event). Raised by the global scheduler."""


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation parameters, with vLLM's names where OpenAI has none.

    ``temperature == 0`` means greedy. ``top_k is None`` and ``top_p == 1`` disable those filters.
    ``logprobs``: None for no logprobs, else how many top alternatives to return per token (0 returns
    only the sampled token's logprob). Logprobs are of the model's distribution (raw logits, before
    temperature / top-k / top-p), as vLLM and OpenAI report them.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise RequestError("max_tokens must be at least 1", "max_tokens")
        if self.temperature < 0:
            raise RequestError("temperature must be >= 0", "temperature")
        if not 0 < self.top_p <= 1:
            raise RequestError("top_p must be in (0, 1]", "top_p")
        if self.top_k is not None and self.top_k < 1:
            raise RequestError("top_k must be >= 1 (or omitted)", "top_k")
        if not 0 <= self.min_p <= 1:
            raise RequestError("min_p must be in [0, 1]", "min_p")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise RequestError("min_tokens must be in [0, max_tokens]", "min_tokens")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise RequestError("logprobs must be in [0, 20]", "logprobs")
        if any(not s for s in self.stop):
            raise RequestError("stop strings must be non-empty", "stop")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass(frozen=True)
class TokenLogprob:
    """Logprob of one generated token and its ``top`` alternatives, most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class RequestOutput:
    """One increment of a request's output (a step's worth of tokens, or the final answer).

    ``new_text`` is the text that became stable in this increment: it never ends inside a multi-byte
    character and never contains (a prefix of) a stop string, so concatenating the increments gives
    the final text. ``finished`` is True exactly once, on the last increment.
    """

    request_id: str
    new_token_ids: tuple[int, ...]
    new_text: str
    finished: bool
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    new_logprobs: tuple[TokenLogprob, ...] | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (any tier)
    num_cached_tokens_dram: int = 0  # of those, tokens swapped in from host DRAM for this request
    num_output_tokens: int = 0
    error: str | None = None
    sampler_state: bytes | None = None  # last output of a seeded keep_kv request: its generator


@dataclass(frozen=True)
class Prefilled:
    """A request's prompt computed elsewhere (disaggregated prefill), ready to decode here.

    ``hold_key``: the in-flight hold holding the prompt's KV (its first ``num_cached_blocks``
    blocks were cached here, the rest arrived). ``first_token`` / ``first_logprob``: what the
    prefill sampled. ``num_cached_tokens``: prompt tokens whose prefill was skipped *there*
    (what ``usage`` reports). ``generator_state``: a seeded request's sampler state after the
    first token. ``keep_kv``: hand the blocks to a transfer when done (send-back).
    ``arrival_time``: ``time.monotonic()`` when the request arrived at this process.
    """

    hold_key: str
    num_cached_blocks: int
    first_token: int
    first_logprob: TokenLogprob | None
    num_cached_tokens: int
    arrival_time: float
    generator_state: bytes | None = None
    keep_kv: bool = False
    num_cached_tokens_dram: int = 0  # of ``num_cached_tokens``, swapped in from DRAM there


@dataclass(frozen=True)
class StepSample:
    """One engine step's work and the wall time of its forward pass: a row the cost model
    (``scheduler.cost_model``) fits on. Plain numbers, so instances can ship them in heartbeats.

    A chunk computing positions ``[s, s + n)`` is a decode chunk iff ``n == 1`` and ``s`` is at
    or past its request's prompt length; every other chunk is prefill (a prompt's last token
    alone included). Prefill attention is counted in query-key pairs, apart for its two kernels:
    a chunk with nothing before it (``s == 0``) runs causal self-attention, ``n^2 / 2`` pairs;
    one after earlier (cached or computed) context runs its queries against all ``s + n`` keys
    under a mask, ``n * (s + n)`` pairs. ``seconds``: the wall time of ``ModelRunner.execute``.
    """

    prefill_tokens: int
    prefill_chunks: int
    prefill_attn_fresh: float  # over prefill chunks with s == 0: n^2 / 2
    prefill_attn_context: float  # over prefill chunks with s > 0: n * (s + n)
    decode_seqs: int
    decode_context: int  # over decode chunks: s + 1, the keys each reads
    seconds: float

    @staticmethod
    def of_chunks(chunks: Iterable[tuple[int, int, bool]], seconds: float = 0.0) -> StepSample:
        """The features of a step computing ``(start, num_tokens, is_decode)`` chunks: the one
        place the rule above is written (the engine records steps with it, the cost model
        prices hypothetical ones)."""
        prefill_tokens = prefill_chunks = decode_seqs = decode_context = 0
        attn_fresh = attn_context = 0.0
        for s, n, is_decode in chunks:
            if is_decode:
                decode_seqs += 1
                decode_context += s + 1
                continue
            prefill_tokens += n
            prefill_chunks += 1
            if s == 0:
                attn_fresh += n * n / 2
            else:
                attn_context += n * (s + n)
        return StepSample(
            prefill_tokens,
            prefill_chunks,
            attn_fresh,
            attn_context,
            decode_seqs,
            decode_context,
            seconds,
        )


def check_request(
    prompt_token_ids: Sequence[int], params: SamplingParams, vocab_size: int, max_model_len: int
) -> None:
    """Raise ``RequestError`` if no engine of this model can serve the request (empty prompt,
    a token id out of the vocabulary, prompt + ``max_tokens`` over ``max_model_len``)."""
    n = len(prompt_token_ids)
    if n == 0:
        raise RequestError("prompt must contain at least one token", "prompt")
    if any(not 0 <= t < vocab_size for t in prompt_token_ids):
        raise RequestError(f"prompt token ids must be in [0, {vocab_size})", "prompt")
    if n + params.max_tokens > max_model_len:
        raise RequestError(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {n + params.max_tokens} tokens ({n} in the prompt, {params.max_tokens} "
            "for the completion). Please reduce the prompt or max_tokens.",
            "max_tokens",
        )
