"""The synchronous engine: ``step() = schedule() → execute(batch) → update(batch, output)``.

Not thread-safe: one owner calls ``add_request`` / ``abort_request`` / ``step`` (the ``AsyncEngine``
loop, or offline code). Every request added gets exactly one ``RequestOutput`` with
``finished=True`` (stop, length, or abort), after which it holds no block.
"""

from __future__ import annotations

from collections.abc import Sequence

import structlog
import torch

from memserve.attention import select_backend
from memserve.config import EngineConfig
from memserve.engine.detokenizer import IncrementalDetokenizer
from memserve.engine.model_runner import ModelRunner, RunnerOutput
from memserve.engine.request import Request
from memserve.engine.sampler import Sampler
from memserve.engine.scheduler import KVCacheManager, Scheduler, SchedulerOutput
from memserve.engine.types import RequestError, RequestOutput, SamplingParams, TokenLogprob
from memserve.hardware import keep_freed_memory
from memserve.mempool.block_allocator import BlockAllocator
from memserve.mempool.kv_cache import KVCache
from memserve.model.llama import LlamaModel
from memserve.model.loader import LoadedModel, load_model, resolve_dtype

log = structlog.get_logger(__name__)

_GIB = 1 << 30


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.config = config
        mc = config.model
        self.device = torch.device(mc.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {mc.device} requested but CUDA is not available here")
        self.dtype = resolve_dtype(mc.dtype, self.device)
        if self.device.type == "cpu":
            keep_freed_memory()
        loaded = loaded or load_model(mc.model, self.dtype, self.device, mc.seed)
        self.arch = loaded.arch
        self.tokenizer = loaded.tokenizer
        self.max_model_len = mc.max_model_len or self.arch.max_position_embeddings
        self.model_name = mc.name
        backend = select_backend(config.attention_backend, self.device, self.dtype)
        self.model = LlamaModel(self.arch, loaded.weights, backend)
        self.cache = self._make_cache()
        self.allocator = BlockAllocator(self.cache.num_blocks)
        self.scheduler = Scheduler(
            config.scheduler, KVCacheManager(self.allocator, self.cache.block_size)
        )
        self.runner = ModelRunner(self.model, self.cache, Sampler(mc.seed))
        self.eos_token_ids = self.tokenizer.eos_token_ids
        self._requests: dict[str, Request] = {}
        self._aborted: list[Request] = []
        log.info(
            "engine ready",
            model=mc.model,
            dtype=str(self.dtype).removeprefix("torch."),
            device=str(self.device),
            backend=backend.name,
            kv_blocks=self.cache.num_blocks,
            block_size=self.cache.block_size,
            max_model_len=self.max_model_len,
        )

    def _make_cache(self) -> KVCache:
        cc = self.config.cache
        a = self.arch
        per_block = KVCache.bytes_per_block(
            a.num_layers, cc.block_size, a.num_kv_heads, a.head_dim, self.dtype
        )
        num_blocks = cc.num_blocks or max(1, int(self._kv_budget_bytes() // per_block))
        return KVCache(
            num_blocks,
            a.num_layers,
            cc.block_size,
            a.num_kv_heads,
            a.head_dim,
            self.dtype,
            self.device,
        )

    def _kv_budget_bytes(self) -> float:
        cc = self.config.cache
        if cc.memory_gib is not None:
            return cc.memory_gib * _GIB
        if self.device.type != "cuda":
            if cc.memory_fraction is not None:
                raise ValueError(
                    "--kv-cache-fraction applies to CUDA devices; use --kv-cache-memory"
                )
            return 1.0 * _GIB
        free, _ = torch.cuda.mem_get_info(self.device)
        return (cc.memory_fraction or 0.85) * free

    # ---- requests -------------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def validate(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise ``RequestError`` if this request can never be served. Pure: safe from any thread."""
        n = len(prompt_token_ids)
        if n == 0:
            raise RequestError("prompt must contain at least one token", "prompt")
        vocab = self.arch.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise RequestError(f"prompt token ids must be in [0, {vocab})", "prompt")
        if n + params.max_tokens > self.max_model_len:
            raise RequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                f"requested {n + params.max_tokens} tokens ({n} in the prompt, {params.max_tokens} "
                "for the completion). Please reduce the prompt or max_tokens.",
                "max_tokens",
            )
        capacity = self.cache.num_blocks * self.cache.block_size
        if n + params.max_tokens > capacity:
            raise RequestError(
                f"request needs {n + params.max_tokens} tokens of KV cache but this node holds "
                f"{capacity}; reduce the prompt or max_tokens",
                "max_tokens",
            )

    def add_request(
        self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> None:
        self.validate(prompt_token_ids, params)
        if request_id in self._requests:
            raise RequestError(f"duplicate request id {request_id!r}")
        detok = IncrementalDetokenizer(
            self.tokenizer,
            prompt_token_ids,
            params.stop,
            params.include_stop_str_in_output,
            params.skip_special_tokens,
        )
        request = Request(request_id, list(prompt_token_ids), params, detok, self.eos_token_ids)
        self._requests[request_id] = request
        self.scheduler.add(request)

    def abort_request(self, request_id: str) -> None:
        """Finish the request now (if it is still known); its final output comes from ``step``."""
        request = self._requests.get(request_id)
        if request is None or request.is_finished:
            return
        request.finish_reason = "abort"
        self.scheduler.finish(request)
        self._aborted.append(request)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    # ---- the step -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        outputs = [self._abort_output(r) for r in self._drain_aborted()]
        scheduled = self.scheduler.schedule()
        result = self.runner.execute(scheduled)
        return outputs + self._update(scheduled, result)

    def _drain_aborted(self) -> list[Request]:
        aborted, self._aborted = self._aborted, []
        for r in aborted:
            self._requests.pop(r.request_id, None)
        return aborted

    def _update(self, scheduled: SchedulerOutput, result: RunnerOutput) -> list[RequestOutput]:
        self.scheduler.update_computed(scheduled)
        outputs = []
        for chunk in scheduled.chunks:
            request = chunk.request
            token = result.token_ids.get(request.request_id)
            if token is None:
                continue  # a prompt chunk that does not sample yet
            outputs.append(
                self._append_token(request, token, result.logprobs.get(request.request_id))
            )
        return outputs

    def _append_token(
        self, request: Request, token: int, logprob: TokenLogprob | None
    ) -> RequestOutput:
        request.token_ids.append(token)
        if logprob is not None:
            request.pending_logprobs.append(logprob)
        self._check_stop(request, token)
        finished = request.finish_reason is not None
        text = request.detokenizer.take_new_text(finished)
        if finished:
            self.scheduler.finish(request)
            self._requests.pop(request.request_id, None)
        return self._output(request, text, finished)

    def _check_stop(self, request: Request, token: int) -> None:
        if token in request.stop_token_ids and not request.min_tokens_pending():
            # The stop token is counted but never detokenized; EOS has no stop_reason (as vLLM).
            request.finish_reason = "stop"
            request.stop_reason = token if token in request.params.stop_token_ids else None
            return
        stop_str = request.detokenizer.add(token, check_stop=not request.min_tokens_pending())
        if stop_str is not None:
            request.finish_reason, request.stop_reason = "stop", stop_str
        elif (
            request.num_output_tokens >= request.params.max_tokens
            or request.num_tokens >= self.max_model_len
        ):
            request.finish_reason = "length"

    def _output(self, request: Request, text: str, finished: bool) -> RequestOutput:
        new_ids = tuple(request.output_token_ids[request.num_emitted_tokens :])
        request.num_emitted_tokens = request.num_output_tokens
        logprobs = tuple(request.pending_logprobs) if request.params.logprobs is not None else None
        request.pending_logprobs = []
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=new_ids,
            new_text=text,
            finished=finished,
            finish_reason=request.finish_reason if finished else None,
            stop_reason=request.stop_reason if finished else None,
            new_logprobs=logprobs,
            num_prompt_tokens=request.num_prompt_tokens,
            num_cached_tokens=request.num_cached_tokens,
            num_output_tokens=request.num_output_tokens,
        )

    def _abort_output(self, request: Request) -> RequestOutput:
        return self._output(request, request.detokenizer.take_new_text(True), True)

    def check_integrity(self) -> None:
        """Conservation of blocks: free + held by requests == total, no block held twice."""
        self.allocator.check_integrity()
        held = [b for r in self.scheduler.running for b in r.block_ids]
        held += [b for r in self.scheduler.waiting for b in r.block_ids]
        if len(held) != len(set(held)):
            raise AssertionError("a block is held by two requests")
        if len(held) != self.allocator.num_used:
            raise AssertionError(f"{self.allocator.num_used} blocks used but {len(held)} held")
