"""Drive an OpenAI-compatible server with a ``Workload`` and record every request.

Sessions arrive open loop (session k starts ``arrival_s`` after the benchmark starts); the turns
of a session run closed loop (turn n+1 is sent when turn n has ended, successfully or not). A
semaphore caps the requests in flight at ``max_concurrency``. The first ``warmup`` requests sent
are recorded with ``warmup=True`` and left out of the summary.

Each request is ``POST {url}/v1/completions`` with the prompt as token ids, ``max_tokens``,
``temperature 0``, ``ignore_eos`` and a streamed answer with usage; its session id goes in the
``X-Session-Id`` header (for session-affine routers).

History (``ClientConfig.history``): a multi-turn prompt holds the earlier answers as token ids.

- ``real`` (default): the next turn's history holds the ids the model generated (every request
  asks for vLLM's ``return_token_ids``), as in a real chat, so a server that keeps the KV of
  its own answers (MemServe's PD-Caching-3, any colocated prefix cache) can reuse it. A greedy
  engine gives the same answers every run, so two configurations of one engine see the same
  prompts. When a server does not return the ids (or the turn failed), that turn falls back to
  its stand-in answer.
- ``stand-in``: each answer in the history is ``stand_in_answer(session, turn)``, ``max_tokens``
  pseudo-random ids fixed by the session id and turn. Every engine then sees exactly the same
  prompts whatever it generates (use this to compare different engines or weights), but a later
  turn can hit a cache only up to the end of the previous *prompt*, never through the answer.

Errors (HTTP status, an ``error`` event in the stream, connection failures, timeouts) are
recorded on the request and never stop the run.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from memserve.bench.report import RequestRecord
from memserve.bench.workloads.base import TOKEN_RANGE, Session, Workload, build_prompt

HISTORY_MODES = ("real", "stand-in")


@dataclass(frozen=True)
class ClientConfig:
    url: str  # http://host:port, without /v1
    model: str
    max_concurrency: int | None = None  # None: no cap
    warmup: int = 0  # the first requests sent, excluded from the summary
    session_header: bool = True  # send X-Session-Id
    request_timeout_s: float = 600.0
    progress: bool = True  # a progress line on stderr
    history: str = "real"  # or "stand-in" (see the module docstring)

    def __post_init__(self) -> None:
        if self.history not in HISTORY_MODES:
            raise ValueError(f"history must be one of {', '.join(HISTORY_MODES)}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        if self.warmup < 0:
            raise ValueError("warmup must be >= 0")


def stand_in_answer(session_id: str, turn_index: int, num_tokens: int) -> list[int]:
    """The ids that stand for the answer of a turn in later prompts (see the module docstring)."""
    rng = random.Random(f"answer/{session_id}/{turn_index}")  # str seeds are stable across runs
    return [rng.randrange(*TOKEN_RANGE) for _ in range(num_tokens)]


async def fetch_model(url: str) -> str:
    """The first model ``GET {url}/v1/models`` lists."""
    async with aiohttp.ClientSession() as http, http.get(url + "/v1/models") as r:
        r.raise_for_status()
        body = await r.json()
        model: str = body["data"][0]["id"]
        return model


@dataclass
class _Progress:
    total: int
    enabled: bool
    done: int = 0
    failed: int = 0
    last_print_s: float = field(default=0.0)

    def update(self, record: RequestRecord) -> None:
        """Count ``record``; rewrite the line at most twice a second on a terminal, and print
        the final count once."""
        self.done += 1
        self.failed += not record.success
        now, last = time.monotonic(), self.done == self.total
        if not self.enabled or not (
            last or (sys.stderr.isatty() and now - self.last_print_s > 0.5)
        ):
            return
        self.last_print_s = now
        line = f"[memserve-bench] {self.done}/{self.total} requests, {self.failed} failed"
        print("\r" + line, end="\n" if last else "", file=sys.stderr, flush=True)


class BenchmarkClient:
    """One run of one workload. ``run`` may be called once."""

    def __init__(self, workload: Workload, config: ClientConfig) -> None:
        self.workload = workload
        self.config = config
        self.records: list[RequestRecord] = []
        self._num_sent = 0
        self._progress = _Progress(workload.num_requests, config.progress)
        # Uncapped, in flight is at most one request per session.
        cap = config.max_concurrency or max(1, len(workload.sessions))
        self._slots = asyncio.Semaphore(cap)
        self._t0 = 0.0
        self.num_stand_in_answers = 0  # ``real`` history that fell back to a stand-in

    async def run(self) -> list[RequestRecord]:
        """Send every request of the workload; returns the records in the order they ended."""
        timeout = aiohttp.ClientTimeout(total=self.config.request_timeout_s)
        # A connection per request, as vLLM's benchmark client does: servers close idle
        # keep-alive connections on their own schedule (llama-server after 5 s), and a request
        # written into one that is closing fails for reasons that are not the server's load.
        connector = aiohttp.TCPConnector(limit=self.config.max_concurrency or 0, force_close=True)
        self._t0 = time.perf_counter()
        async with (
            aiohttp.ClientSession(timeout=timeout, connector=connector) as http,
            asyncio.TaskGroup() as tasks,
        ):
            for session in self.workload.sessions:
                tasks.create_task(self._run_session(http, session))
        return self.records

    def _now(self) -> float:
        return time.perf_counter() - self._t0

    async def _run_session(self, http: aiohttp.ClientSession, session: Session) -> None:
        await asyncio.sleep(max(0.0, session.arrival_s - self._now()))
        answers: list[list[int]] = []
        for turn_index, turn in enumerate(session.turns):
            prompt = build_prompt(session, turn_index, answers)
            stream = _Stream()
            async with self._slots:
                record = await self._request(
                    http, session.session_id, turn_index, prompt, turn.max_tokens, stream
                )
            self.records.append(record)
            self._progress.update(record)
            answers.append(self._answer(session.session_id, turn_index, turn.max_tokens, stream))

    def _answer(
        self, session_id: str, turn_index: int, max_tokens: int, stream: _Stream
    ) -> list[int]:
        """What the history holds for this turn's answer (see the module docstring)."""
        if self.config.history == "real":
            if stream.error is None and stream.token_ids and len(stream.token_ids) == max_tokens:
                return stream.token_ids
            self.num_stand_in_answers += 1
        return stand_in_answer(session_id, turn_index, max_tokens)

    async def _request(
        self,
        http: aiohttp.ClientSession,
        session_id: str,
        turn_index: int,
        prompt: list[int],
        max_tokens: int,
        stream: _Stream,
    ) -> RequestRecord:
        warmup = self._num_sent < self.config.warmup
        self._num_sent += 1
        start_s = self._now()
        try:
            await self._stream(http, session_id, prompt, max_tokens, stream)
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
            stream.error = f"{type(exc).__name__}: {exc}"
        return RequestRecord(
            session_id=session_id,
            turn_index=turn_index,
            num_prompt_tokens=stream.num_prompt_tokens or len(prompt),
            num_cached_tokens=stream.num_cached_tokens,
            num_output_tokens=stream.num_output_tokens or len(stream.chunk_times_s),
            start_s=start_s,
            chunk_times_s=tuple(stream.chunk_times_s),
            end_s=self._now(),
            error=stream.error,
            warmup=warmup,
        )

    async def _stream(
        self,
        http: aiohttp.ClientSession,
        session_id: str,
        prompt: list[int],
        max_tokens: int,
        stream: _Stream,
    ) -> None:
        body = {
            "model": self.config.model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        # Always: a server that holds back tokens with no text yet (part of a UTF-8 character;
        # random weights make many) still sends a chunk per token with their ids, so TTFT and
        # ITL are the tokens', not the text's. Servers without the extension ignore it.
        body["return_token_ids"] = True
        headers = {"X-Session-Id": session_id} if self.config.session_header else {}
        url = self.config.url + "/v1/completions"
        async with http.post(url, data=orjson.dumps(body), headers=headers | _JSON) as r:
            if r.status != 200:
                stream.error = f"HTTP {r.status}: {(await r.text())[:500]}"
                return
            async for line in r.content:
                if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
                    stream.add(orjson.loads(line[6:]), self._now())


_JSON = {"Content-Type": "application/json"}


@dataclass
class _Stream:
    """What one streamed answer has said so far."""

    chunk_times_s: list[float] = field(default_factory=list)
    num_prompt_tokens: int | None = None
    num_output_tokens: int | None = None
    num_cached_tokens: int | None = None
    error: str | None = None
    token_ids: list[int] = field(default_factory=list)  # with ``return_token_ids``

    def add(self, event: dict[str, Any], now_s: float) -> None:
        if "error" in event:
            self.error = f"stream error: {event['error']}"
        if choices := event.get("choices"):
            self.chunk_times_s.append(now_s)
            self.token_ids.extend(int(t) for t in choices[0].get("token_ids") or ())
        if usage := event.get("usage"):
            self.num_prompt_tokens = usage["prompt_tokens"]
            self.num_output_tokens = usage["completion_tokens"]
            details = usage.get("prompt_tokens_details") or {}
            self.num_cached_tokens = details.get("cached_tokens")
