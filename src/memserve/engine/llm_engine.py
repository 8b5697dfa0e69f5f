"""The synchronous engine: ``step() = schedule() → execute(batch) → update(batch, output)``.

Not thread-safe: one owner calls ``add_request`` / ``abort_request`` / ``step`` (the ``AsyncEngine``
loop, or offline code). Every request added gets exactly one ``RequestOutput`` with
``finished=True`` (stop, length, or abort), after which it holds no block.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence

import structlog
import torch

from memserve.attention import select_backend
from memserve.config import EngineConfig
from memserve.engine.detokenizer import IncrementalDetokenizer
from memserve.engine.kv_manager import KVCacheManager
from memserve.engine.model_runner import ModelRunner, RunnerOutput
from memserve.engine.request import LayerSink, Request
from memserve.engine.sampler import Sampler
from memserve.engine.scheduler import ScheduledChunk, Scheduler, SchedulerOutput
from memserve.engine.types import (
    Prefilled,
    RequestError,
    RequestOutput,
    SamplingParams,
    StepSample,
    TokenLogprob,
    check_request,
)
from memserve.hardware import keep_freed_memory
from memserve.mempool.block_allocator import BlockAllocator
from memserve.mempool.kv_cache import KVCache
from memserve.mempool.pool import MemPool, Tier
from memserve.metrics import EngineMetrics, EngineSnapshot, TierSnapshot
from memserve.model.llama import LlamaModel
from memserve.model.loader import LoadedModel, load_model, resolve_dtype

log = structlog.get_logger(__name__)

_GIB = 1 << 30
MAX_STEP_SAMPLES = 512  # steps kept for ``drain_step_samples``; older ones are dropped


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
        self.pool = MemPool(self.cache, self._make_dram_cache())
        self.kv = KVCacheManager(self.pool, config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv)
        self.runner = ModelRunner(self.model, self.cache, Sampler(mc.seed))
        self.metrics = EngineMetrics(self.snapshot)
        self.num_prompt_tokens_computed = 0  # counter, for metrics
        self.eos_token_ids = self.tokenizer.eos_token_ids
        self._requests: dict[str, Request] = {}
        self._aborted: list[Request] = []
        self._step_samples: deque[StepSample] = deque(maxlen=MAX_STEP_SAMPLES)
        # Times each step's forward pass for its StepSample. Wall time; the profiler may use
        # time.thread_time on one CPU thread, which other processes' load does not inflate.
        self.step_clock: Callable[[], float] = time.perf_counter
        log.info(
            "engine ready",
            model=mc.model,
            dtype=str(self.dtype).removeprefix("torch."),
            device=str(self.device),
            backend=backend.name,
            kv_blocks=self.cache.num_blocks,
            dram_blocks=self.pool.num_blocks(Tier.DRAM),
            prefix_caching=self.kv.enable_caching,
            block_size=self.cache.block_size,
            max_model_len=self.max_model_len,
        )

    def _bytes_per_block(self) -> int:
        a = self.arch
        return KVCache.bytes_per_block(
            a.num_layers, self.config.cache.block_size, a.num_kv_heads, a.head_dim, self.dtype
        )

    def _new_cache(self, num_blocks: int, device: torch.device, pin: bool = False) -> KVCache:
        a = self.arch
        bs = self.config.cache.block_size
        shape = (a.num_layers, bs, a.num_kv_heads, a.head_dim)
        return KVCache(num_blocks, *shape, self.dtype, device, pin_memory=pin)

    def _make_cache(self) -> KVCache:
        num_blocks = self.config.cache.num_blocks
        if num_blocks is None:
            num_blocks = max(1, int(self._kv_budget_bytes() // self._bytes_per_block()))
        return self._new_cache(num_blocks, self.device)

    def _make_dram_cache(self) -> KVCache | None:
        """The host-DRAM tier (pinned next to a GPU), or None when it is off."""
        cc = self.config.cache
        if not cc.enable_prefix_caching:
            return None
        num_blocks = cc.dram_num_blocks
        if num_blocks is None:
            default_gib = 4.0 if self.device.type == "cuda" else 0.0
            gib = default_gib if cc.dram_gib is None else cc.dram_gib
            num_blocks = int(gib * _GIB // self._bytes_per_block())
        if num_blocks == 0:
            return None
        return self._new_cache(num_blocks, torch.device("cpu"), pin=self.device.type == "cuda")

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

    @property
    def allocator(self) -> BlockAllocator:
        """The device tier's block allocator."""
        return self.pool.allocators[Tier.DEVICE]

    @property
    def num_active_blocks(self) -> int:
        """Device blocks held by requests (the rest of the used ones are historical)."""
        return self.allocator.num_used - self.pool.num_historical(Tier.DEVICE)

    def validate(self, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise ``RequestError`` if this request can never be served. Pure: safe from any thread."""
        check_request(prompt_token_ids, params, self.arch.vocab_size, self.max_model_len)
        n = len(prompt_token_ids)
        capacity = self.cache.num_blocks * self.cache.block_size
        if n + params.max_tokens > capacity:
            raise RequestError(
                f"request needs {n + params.max_tokens} tokens of KV cache but this node holds "
                f"{capacity}; reduce the prompt or max_tokens",
                "max_tokens",
            )

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        keep_kv: bool = False,
        layer_sink: LayerSink | None = None,
    ) -> None:
        """Queue a request. ``keep_kv``: when it completes, its blocks go to an in-flight hold
        (``hand_off_key(request_id)``) for a transfer instead of being freed. ``layer_sink``:
        gets each layer of the KV as the step that ends the prompt computes it."""
        request = self._new_request(request_id, prompt_token_ids, params)
        request.keep_kv = keep_kv
        request.layer_sink = layer_sink
        self.scheduler.add(request)

    def add_prefilled(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        kv: Prefilled,
    ) -> RequestOutput:
        """Start decoding a request prefilled elsewhere: its prompt's KV is in the in-flight hold
        ``kv.hold_key`` (from ``MemPool.reserve``, filled by a transfer), whose first
        ``kv.num_cached_blocks`` blocks are cached here. The request takes the hold's blocks and
        lock, publishes the prompt (so the next turn finds it here), and appends the prefill's
        first token exactly as if it had sampled it. Returns that first output."""
        request = self._new_request(request_id, prompt_token_ids, params)
        hold = self.pool.take(kv.hold_key)
        request.block_ids = hold.block_ids
        request.prefix_node = hold.node
        request.num_published_blocks = kv.num_cached_blocks
        request.num_computed_tokens = request.num_prompt_tokens
        request.num_cached_tokens = kv.num_cached_tokens
        request.num_cached_tokens_dram = kv.num_cached_tokens_dram
        request.keep_kv = kv.keep_kv
        request.arrival_time = kv.arrival_time
        if request.generator is not None and kv.generator_state is not None:
            request.generator.set_state(
                torch.frombuffer(bytearray(kv.generator_state), dtype=torch.uint8)
            )
        self.kv.publish(request)
        self.scheduler.add_running(request)
        return self._append_token(request, kv.first_token, kv.first_logprob)

    def _new_request(
        self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> Request:
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
        return request

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
        started = self.step_clock()
        result = self.runner.execute(scheduled)
        if scheduled.chunks:
            seconds = self.step_clock() - started
            self._step_samples.append(step_sample(scheduled.chunks, seconds))
        return outputs + self._update(scheduled, result)

    def drain_step_samples(self) -> list[StepSample]:
        """The steps run since the last call (the latest ``MAX_STEP_SAMPLES``), oldest first."""
        samples = list(self._step_samples)
        self._step_samples.clear()
        return samples

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
            prompt_end = min(chunk.start + chunk.num_tokens, request.num_prompt_tokens)
            self.num_prompt_tokens_computed += max(0, prompt_end - chunk.start)
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
        self._observe_latency(request, finished)
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

    def _observe_latency(self, request: Request, finished: bool) -> None:
        now = time.monotonic()
        if request.last_token_time is None:
            self.metrics.observe_ttft(now - request.arrival_time)
        else:
            self.metrics.observe_itl(now - request.last_token_time)
        request.last_token_time = now
        if finished:
            self.metrics.observe_e2e(now - request.arrival_time)

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
            num_cached_tokens_dram=request.num_cached_tokens_dram,
            num_output_tokens=request.num_output_tokens,
            sampler_state=self._sampler_state(request) if finished else None,
        )

    @staticmethod
    def _sampler_state(request: Request) -> bytes | None:
        """A seeded ``keep_kv`` request's generator state, so its sampling continues elsewhere."""
        if not request.keep_kv or request.generator is None:
            return None
        return request.generator.get_state().numpy().tobytes()

    def _abort_output(self, request: Request) -> RequestOutput:
        return self._output(request, request.detokenizer.take_new_text(True), True)

    def check_integrity(self) -> None:
        """Conservation of blocks, per tier: free + active + historical == total, where every
        reference is either the tree's or a request's (see ``MemPool.check_integrity``); and the
        tree's locks are exactly the requests' prefix locks."""
        requests = [*self.scheduler.running, *self.scheduler.waiting]
        self.pool.check_integrity(held=[b for r in requests for b in r.block_ids])
        locks = sum(r.prefix_node is not None for r in requests)
        locks += sum(h.node is not None for h in self.pool.holds.values())
        tree = self.pool.tree
        ends = tree.root.lock_ref - sum(c.lock_ref for c in tree.root.children.values())
        ends += sum(n.lock_ref - sum(c.lock_ref for c in n.children.values()) for n in tree.nodes())
        if ends != locks:
            raise AssertionError(
                f"{ends} locks in the prompt tree, {locks} held by requests and transfers"
            )

    def snapshot(self) -> EngineSnapshot:
        """Gauges and counters for ``/metrics``; plain ints, cheap enough for every scrape."""
        counters = self.pool.counters
        hits = self.kv.counters
        return EngineSnapshot(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            device=self._tier_snapshot(
                Tier.DEVICE, hits.hit_tokens_device, counters.evicted_device_blocks
            ),
            dram=self._tier_snapshot(Tier.DRAM, hits.hit_tokens_dram, counters.evicted_dram_blocks),
            prefix_query_tokens=hits.query_tokens,
            prompt_tokens_computed=self.num_prompt_tokens_computed,
            swap_out_blocks=counters.swap_out_blocks,
            swap_in_blocks=counters.swap_in_blocks,
            num_preemptions=self.scheduler.num_preemptions,
        )

    def _tier_snapshot(self, tier: Tier, hit_tokens: int, evicted: int) -> TierSnapshot:
        pool = self.pool
        total, free, historical = pool.num_blocks(tier), pool.num_free(tier), 0
        if total:
            historical = pool.num_historical(tier)
        return TierSnapshot(
            blocks_total=total,
            blocks_free=free,
            blocks_active=total - free - historical,
            blocks_historical=historical,
            prefix_hit_tokens=hit_tokens,
            evicted_blocks=evicted,
        )


def step_sample(chunks: Sequence[ScheduledChunk], seconds: float) -> StepSample:
    """The cost model's features of a step (see ``StepSample``): a chunk is a decode iff it
    computes one token at or past its request's prompt."""
    return StepSample.of_chunks(
        (
            (c.start, c.num_tokens, c.num_tokens == 1 and c.start >= c.request.num_prompt_tokens)
            for c in chunks
        ),
        seconds,
    )
