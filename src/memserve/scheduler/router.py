"""The global scheduler's ``EngineClient``: each request goes to the instance(s) a policy picks.

A request's life here (``Router.generate``; the OpenAI app in front already tokenized it)::

    1. route   the policy picks a colocated instance, or a prefill + decode pair, from the live
               instances and the global prompt trees (what each holds of this prompt).
    2. move    (optional) the route says another instance holds more of the prefix and moving its
               KV is cheaper than recomputing it: ask that instance to send it to the prefiller
               (``/internal/kv/migrate``). A failed move only costs the recompute.
    3. dispatch POST /internal/generate {prompt ids, params, prefill} to the colocated or decode
               instance; it answers NDJSON, one ``RequestOutput`` per line, from the first token.
    4. stream  lines are yielded as they come. The first output ends the request's queued
               prefill (``queued_s``) and records the prompt in the prefiller's tree; the last
               records prompt + output where the instances keep it (TTL-bounded beliefs).

Failures: anything before the first output line (refused connection, 503, the instance dropped
by the reaper, the stream closed early) re-dispatches to another instance, up to
``max_attempts``, then answers 503. After the first line, a failure ends the request with
``UpstreamError`` (502, or an error event in a stream). A 400 from the instance is the client's
mistake and is passed on. Closing the generator (client disconnect) closes the connection to the
instance, whose handler is cancelled and aborts the request there.

Ownership: the reaper task belongs to the router (``start`` / ``close``); in-flight responses
are registered per instance so that dropping an instance closes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import aiohttp
import orjson
import structlog

from memserve.engine.client import SESSION_ID
from memserve.engine.types import (
    EngineOverloadedError,
    RequestError,
    RequestOutput,
    SamplingParams,
    UpstreamError,
    check_request,
)
from memserve.engine.wire import output_from_json, params_to_json
from memserve.model.tokenizer import Tokenizer
from memserve.scheduler.metrics import RouterMetrics
from memserve.scheduler.registry import Instance, InstanceTable
from memserve.scheduler.types import NoInstanceError, Policy, Route, RouteRequest, Trees

log = structlog.get_logger(__name__)
_std_log = logging.getLogger(__name__)

JSON_HEADERS = {"Content-Type": "application/json"}


class _Retry(Exception):
    """Nothing was streamed: offer the request to other instances (excluding ``exclude``)."""

    def __init__(self, message: str, exclude: set[str]) -> None:
        super().__init__(message)
        self.exclude = exclude


class Router:
    def __init__(
        self,
        table: InstanceTable,
        policy: Policy,
        trees: Trees,
        tokenizer: Tokenizer,
        max_model_len: int,
        metrics: RouterMetrics,
        *,
        model_name: str,
        max_attempts: int = 3,
        reap_interval_s: float = 0.5,
    ) -> None:
        self.table = table
        self.policy = policy
        self.trees = trees
        self._tokenizer = tokenizer
        self._max_model_len = max_model_len
        self._model_name = model_name
        self.metrics = metrics
        self.max_attempts = max_attempts
        self.reap_interval_s = reap_interval_s
        self._http: aiohttp.ClientSession | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._streams: dict[str, set[aiohttp.ClientResponse]] = {}  # reading outputs
        self._waiting: dict[str, set[asyncio.Timeout]] = {}  # waiting for the first token
        # Heartbeats' step samples ([prefill tokens, prefill attention, decode seqs, decode
        # context, seconds] rows) go here: the cost model refines itself online.
        self.on_step_samples: Callable[[Instance, list[list[float]]], None] | None = None

    # ---- EngineClient -----------------------------------------------------------------------

    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    def is_healthy(self) -> bool:
        return self.table.can_serve()

    def render_metrics(self) -> bytes:
        return self.metrics.render()

    async def generate(
        self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        prompt = list(prompt_token_ids)
        check_request(prompt, params, self._tokenizer.vocab_size, self._max_model_len)
        request = RouteRequest(prompt, SESSION_ID.get(), params.max_tokens)
        excluded: set[str] = set()
        errors: list[str] = []
        for attempt in range(self.max_attempts):
            now = time.monotonic()
            try:
                routable = self.table.routable(now, frozenset(excluded))
                route = self.policy.choose(request, routable, self.trees, now)
            except NoInstanceError as e:
                errors.append(str(e))
                break
            self._log_decision(request_id, route, attempt)
            try:
                async for out in self._run(route, request_id, prompt, params):
                    yield out
                return
            except _Retry as e:
                log.warning("re-dispatching", request_id=request_id, reason=str(e))
                self.metrics.redispatched.inc()
                errors.append(str(e))
                excluded |= e.exclude
        self.metrics.failed.labels("unavailable").inc()
        raise EngineOverloadedError("no instance could take the request: " + "; ".join(errors))

    # ---- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
        self._http = aiohttp.ClientSession(timeout=timeout, read_bufsize=1 << 20)
        self._reaper = asyncio.create_task(self._reap_forever(), name="router-reaper")

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
        if self._http is not None:
            await self._http.close()

    def heartbeat(self, body: dict[str, Any]) -> dict[str, Any]:
        """One instance's heartbeat (route handler); ``ValueError`` if it does not belong here."""
        now = time.monotonic()
        instance, replaced = self.table.heartbeat(body, now)
        if replaced is not None:
            self._drop(replaced, "restarted")
        if instance.joined_at == now:
            log.info("instance joined", instance=instance.instance_id, role=instance.role)
        samples = body.get("step_samples")
        if samples and self.on_step_samples is not None:
            self.on_step_samples(instance, samples)
        return {"ok": True}

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self.reap_interval_s)
            for instance in self.table.reap(time.monotonic()):
                self._drop(instance, "missed heartbeats")

    def _drop(self, instance: Instance, why: str) -> None:
        """Forget an instance: its tree entries, and its streams (their readers fail now)."""
        log.warning("instance dropped", instance=instance.instance_id, reason=why)
        self.metrics.dropped.inc()
        for tree in self.trees.values():
            tree.forget(instance.instance_id)
        for response in self._streams.pop(instance.instance_id, set()):
            response.close()
        now = asyncio.get_running_loop().time()
        for scope in self._waiting.pop(instance.instance_id, set()):
            scope.reschedule(now)

    # ---- one attempt ------------------------------------------------------------------------

    async def _run(
        self, route: Route, request_id: str, prompt: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Steps 2-4 on ``route``; raises ``_Retry`` if it failed before any output. The
        prefilling instance counts the request (``inflight``, ``queued_s``) until the first
        token; the instance that decodes, until the end."""
        target = self.table.instances.get(route.instance_id)
        prefiller = self.table.instances.get(route.prefilling_id)
        if target is None or prefiller is None:
            raise _Retry(f"{route.instance_id} left before dispatch", {route.instance_id})
        split = prefiller is not target
        target.inflight += 1
        prefiller.inflight += split
        prefiller.queued_s += route.predicted_prefill_s
        queued = True
        generated: list[int] = []
        response: aiohttp.ClientResponse | None = None
        finished = False
        try:
            if route.move_from is not None:
                await self._move(route, prompt)
            response = await self._dispatch(route, target, request_id, prompt, params)
            async for out in self._read(response, target):
                if queued:
                    queued = False
                    prefiller.queued_s -= route.predicted_prefill_s
                    prefiller.inflight -= split
                    self._on_first(route, prefiller, prompt, out)
                generated.extend(out.new_token_ids)
                if out.finished:
                    finished = True
                    self._on_finished(route, prompt + generated[:-1], out)
                yield out
                if finished:
                    return
        finally:
            if queued:
                prefiller.queued_s -= route.predicted_prefill_s
                prefiller.inflight -= split
            target.inflight -= 1
            if response is not None:
                self._streams.get(target.instance_id, set()).discard(response)
                if finished:
                    response.release()
                else:
                    response.close()  # the instance's handler is cancelled: the request aborts

    async def _dispatch(
        self,
        route: Route,
        target: Instance,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
    ) -> aiohttp.ClientResponse:
        body = {
            "request_id": request_id,
            "prompt_token_ids": prompt,
            "params": params_to_json(params),
            "prefill": route.prefill_id,
        }
        assert self._http is not None, "Router.start() was not called"
        waiting = self._waiting.setdefault(target.instance_id, set())
        try:
            # The instance answers its headers with the first token: until then only the
            # reaper can tell that it is gone, by expiring this scope (``_drop``).
            async with asyncio.timeout(None) as scope:
                waiting.add(scope)
                response = await self._http.post(
                    target.url + "/internal/generate", data=orjson.dumps(body), headers=JSON_HEADERS
                )
        except TimeoutError as e:
            raise _Retry(f"{target.instance_id} was dropped", {target.instance_id}) from e
        except (aiohttp.ClientError, OSError) as e:
            target.suspect_until = time.monotonic() + self.table.dead_after_s
            raise _Retry(f"{target.instance_id} unreachable: {e!r}", {target.instance_id}) from e
        finally:
            waiting.discard(scope)
        if response.status == 200:
            self._streams.setdefault(target.instance_id, set()).add(response)
            return response
        message, param = await _error_of(response)
        if response.status == 400:
            raise RequestError(message, param)
        # 503 (no room, no prefill instance) or a failure there: try the others. (A decode
        # instance has tried other prefill instances itself: the prefill one stays eligible.)
        raise _Retry(f"{target.instance_id}: {response.status} {message}", {target.instance_id})

    async def _read(
        self, response: aiohttp.ClientResponse, target: Instance
    ) -> AsyncIterator[RequestOutput]:
        """The NDJSON outputs; a broken stream is ``_Retry`` before the first one and
        ``UpstreamError`` after."""
        first = True
        while True:
            error: BaseException | None = None
            try:
                line = await response.content.readline()
            except (aiohttp.ClientError, OSError, asyncio.IncompleteReadError) as e:
                line, error = b"", e
            if not line:
                why = f"{target.instance_id} failed mid-request ({error!r})"
                if first:
                    raise _Retry(why, {target.instance_id})
                self.metrics.failed.labels("instance_failed").inc()
                raise UpstreamError(why)
            first = False
            yield output_from_json(orjson.loads(line))

    async def _move(self, route: Route, prompt: list[int]) -> None:
        """Step 2: ask ``route.move_from`` to push the prefix's KV to the prefiller."""
        source = self.table.instances.get(route.move_from or "")
        if source is None or self._http is None:
            return
        body = {"tokens": prompt[: route.move_tokens], "to": route.prefilling_id}
        try:
            async with self._http.post(
                source.url + "/internal/kv/migrate", data=orjson.dumps(body), headers=JSON_HEADERS
            ) as response:
                reply = await response.json(loads=orjson.loads)
            if response.status == 200:
                self.metrics.moved_tokens.inc(int(reply.get("num_tokens", 0)))
                return
            log.info("KV move refused", source=source.instance_id, reply=reply)
        except (aiohttp.ClientError, OSError, ValueError) as e:
            log.info("KV move failed", source=source.instance_id, error=repr(e))
        self.metrics.failed_moves.inc()

    # ---- bookkeeping ------------------------------------------------------------------------

    def _on_first(
        self, route: Route, prefiller: Instance, prompt: list[int], out: RequestOutput
    ) -> None:
        self.metrics.prompt(prefiller.role, out.num_prompt_tokens, out.num_cached_tokens)
        if prefiller.keeps:
            self.trees[prefiller.role].insert(prompt, prefiller.instance_id, time.monotonic())

    def _on_finished(self, route: Route, tokens: list[int], out: RequestOutput) -> None:
        """``tokens``: prompt + output but the last token (never fed back, so it has no KV)."""
        self.metrics.finished(out)
        if out.finish_reason not in ("stop", "length"):
            return
        target = self.table.instances.get(route.instance_id)
        if target is None:
            return
        now = time.monotonic()
        if target.keeps:
            self.trees[target.role].insert(tokens, target.instance_id, now)
        prefiller = self.table.instances.get(route.prefill_id or "")
        if prefiller is not None and target.send_back and prefiller.keeps:
            self.trees["prefill"].insert(tokens, prefiller.instance_id, now)

    def _log_decision(self, request_id: str, route: Route, attempt: int) -> None:
        self.metrics.decision(self.policy.name, route)
        if not _std_log.isEnabledFor(logging.DEBUG):  # cached check: nothing built when off
            return
        log.debug(
            "route",
            request_id=request_id,
            policy=self.policy.name,
            instance=route.instance_id,
            prefill=route.prefill_id,
            move_from=route.move_from,
            attempt=attempt,
            **route.cost,
        )


async def _error_of(response: aiohttp.ClientResponse) -> tuple[str, str | None]:
    """(message, param) of an OpenAI error body; the raw text if it is not one."""
    with contextlib.closing(response):
        text = await response.text()
    try:
        error = orjson.loads(text)["error"]
        return str(error["message"]), error.get("param")
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return text[:500] or response.reason or "error", None
