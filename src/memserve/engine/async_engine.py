"""``AsyncEngine``: the ``EngineClient`` of a local ``LLMEngine``, driven from asyncio.

Ownership and threading: one background task (``_loop``, started by ``start`` and cancelled and
awaited by ``stop``) owns the engine. It runs each ``step`` in a worker thread so the event loop
stays responsive (torch releases the GIL), and applies queued adds and aborts *between* steps, in
the event loop, so the engine is never touched by two threads at once. Outputs are routed to one
``asyncio.Queue`` per request. Whenever the engine falls idle (and stays so for
``IDLE_CHECK_DELAY_S``) the loop runs ``check_integrity()`` in a worker thread; a violation is a
bug and fails the engine like any other (logged, every request answered with an error,
``is_healthy()`` False so ``/health`` says 503).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog

from memserve.engine.kv_manager import hand_off_key
from memserve.engine.llm_engine import LLMEngine
from memserve.engine.request import LayerSink
from memserve.engine.types import EngineOverloadedError, Prefilled, RequestOutput, SamplingParams
from memserve.model.tokenizer import Tokenizer

log = structlog.get_logger(__name__)

IDLE_CHECK_DELAY_S = 0.05

T = TypeVar("T")


@dataclass(frozen=True)
class _Add:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    keep_kv: bool = False
    prefilled: Prefilled | None = None
    layer_sink: LayerSink | None = None


@dataclass(frozen=True)
class _Call:
    """Run ``fn(engine)`` between steps and complete ``future`` with its result."""

    fn: Callable[[LLMEngine], Any]
    future: asyncio.Future[Any] | None  # None: nobody waits (the result is dropped)


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._pending: list[_Add | _Call | str] = []  # adds, calls, and request ids to abort
        self._queues: dict[str, asyncio.Queue[RequestOutput]] = {}
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failed: BaseException | None = None
        self._idle = asyncio.Event()

    # ---- EngineClient -----------------------------------------------------------------

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
        return self._failed is None and self._task is not None and not self._task.done()

    def render_metrics(self) -> bytes:
        return self.engine.metrics.render()

    @property
    def num_waiting(self) -> int:
        return self.engine.num_waiting + sum(isinstance(p, _Add) for p in self._pending)

    def generate(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        keep_kv: bool = False,
        layer_sink: LayerSink | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """``EngineClient.generate``; ``keep_kv``, ``layer_sink``: see ``LLMEngine.add_request``."""
        item = _Add(request_id, tuple(prompt_token_ids), params, keep_kv, layer_sink=layer_sink)
        return self._stream(item)

    def generate_prefilled(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        prefilled: Prefilled,
    ) -> AsyncIterator[RequestOutput]:
        """Decode a request whose prompt KV arrived in a hold (``LLMEngine.add_prefilled``).
        The hold is the engine's from the moment this is called: if the stream is closed before
        the request starts, the hold is released."""
        item = _Add(request_id, tuple(prompt_token_ids), params, prefilled.keep_kv, prefilled)
        return self._stream(item)

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run ``fn(engine)`` in the event loop between two steps (the engine's one owner), so
        it may use the pool and the tree; returns its result or raises its exception."""
        if not self.is_healthy():
            raise EngineOverloadedError("engine is not running")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._submit(_Call(fn, future))
        return await future

    def release_soon(self, hold_key: str) -> None:
        """Release an in-flight hold between the next two steps. Synchronous, so a caller
        being cancelled (a ``finally`` in a handler) cannot drop it, unlike an awaited ``call``."""
        self._submit(_Call(lambda e: e.pool.release(hold_key), None))

    async def _stream(self, item: _Add) -> AsyncIterator[RequestOutput]:
        request_id, params = item.request_id, item.params
        prompt_token_ids = item.prompt_token_ids
        self.engine.validate(prompt_token_ids, params)
        if not self.is_healthy():
            raise EngineOverloadedError("engine is not running")
        if self.num_waiting >= self.engine.config.scheduler.max_waiting_requests:
            raise EngineOverloadedError("too many waiting requests")
        if request_id in self._queues:
            raise ValueError(f"duplicate request id {request_id!r}")
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._queues[request_id] = queue
        self._submit(item)
        finished = False
        try:
            while not finished:
                out = await queue.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self._submit(request_id)  # abort: blocks are freed before the next step
            else:
                self._queues.pop(request_id, None)

    # ---- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="engine-loop")

    async def stop(self) -> None:
        """Abort everything still running, then cancel and await the loop task."""
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        for request_id, queue in list(self._queues.items()):
            queue.put_nowait(RequestOutput(request_id, (), "", True, "abort"))
            self._abort_now(request_id)

    async def wait_idle(self) -> None:
        """Return once no request is queued or running (tests, graceful drain)."""
        while self._pending or self.engine.has_unfinished():
            self._idle.clear()
            await self._idle.wait()

    async def _rest(self) -> None:
        """The engine has nothing to do: check the block conservation law once it has rested for
        ``IDLE_CHECK_DELAY_S`` (in a worker thread, so the event loop keeps serving; it costs
        ~10 ms per 16k blocks), then wait for work. Work that arrives sooner skips the check: a
        burst of arrivals never queues behind it."""
        self._wakeup.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), IDLE_CHECK_DELAY_S)
            return
        await asyncio.to_thread(self.engine.check_integrity)
        self._idle.set()
        await self._wakeup.wait()

    def _submit(self, item: _Add | _Call | str) -> None:
        self._pending.append(item)
        self._wakeup.set()

    async def _loop(self) -> None:
        try:
            while True:
                self._apply_pending()
                if not self.engine.has_unfinished():
                    await self._rest()
                    continue
                outputs = await asyncio.to_thread(self.engine.step)
                self._dispatch(outputs)
        except asyncio.CancelledError:
            raise
        except (
            Exception
        ) as e:  # an engine bug (incl. a broken invariant): fail loudly, stay unhealthy
            log.exception("engine step failed")
            self._failed = e
            for request_id in list(self._queues):
                self._fail(request_id, f"internal engine error: {e}")
            self._idle.set()

    def _apply_pending(self) -> None:
        pending, self._pending = self._pending, []
        for item in pending:
            if isinstance(item, str):
                self._abort_now(item)
            elif isinstance(item, _Call):
                self._call_now(item)
            else:
                self._add_now(item)

    def _call_now(self, item: _Call) -> None:
        future = item.future
        if future is not None and future.cancelled():
            return
        try:
            result = item.fn(self.engine)
        except Exception as e:  # the caller's to handle (e.g. no room for a transfer)
            if future is None:
                raise  # nobody to tell: an engine bug
            future.set_exception(e)
        else:
            if future is not None:
                future.set_result(result)

    def _add_now(self, item: _Add) -> None:
        engine = self.engine
        if item.request_id not in self._queues:  # aborted before it was added
            if item.prefilled is not None:
                engine.pool.release(item.prefilled.hold_key)
            return
        try:
            if item.prefilled is None:
                engine.add_request(
                    item.request_id,
                    item.prompt_token_ids,
                    item.params,
                    item.keep_kv,
                    item.layer_sink,
                )
            else:
                out = engine.add_prefilled(
                    item.request_id, item.prompt_token_ids, item.params, item.prefilled
                )
                self._dispatch([out])
        except Exception as e:  # validated already; anything here is a bug, reported to the caller
            log.exception("add_request failed", request_id=item.request_id)
            self._fail(item.request_id, str(e))

    def _abort_now(self, request_id: str) -> None:
        self._queues.pop(request_id, None)
        self.engine.abort_request(request_id)
        # A keep_kv request that finished in the step during which its consumer left: nobody
        # saw its final output, so nobody will release its hand-off.
        self.engine.pool.release(hand_off_key(request_id))

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            queue = self._queues.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)

    def _fail(self, request_id: str, message: str) -> None:
        queue = self._queues.get(request_id)
        if queue is not None:
            queue.put_nowait(RequestOutput(request_id, (), "", True, "error", error=message))
