"""The interface between the HTTP front door and whatever generates tokens.

The OpenAI server (``server/``) depends only on this protocol: a local ``AsyncEngine`` implements it
today; the global scheduler's dispatcher will implement it when instances live in other processes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextvars import ContextVar
from typing import Protocol

from memserve.engine.types import RequestOutput, SamplingParams
from memserve.model.tokenizer import Tokenizer

SESSION_ID: ContextVar[str | None] = ContextVar("memserve_session_id", default=None)
"""The session a request belongs to (``X-Session-Id`` header, else the OpenAI ``user`` field),
set by the HTTP handler for the scheduler's ``session`` policy; engines ignore it."""


class EngineClient(Protocol):
    """Contract.

    - ``generate`` is an async generator. Before the first yield it raises ``RequestError`` (invalid
      prompt: empty, token id out of range, longer than ``max_model_len`` together with
      ``params.max_tokens``) or ``EngineOverloadedError`` (queue full). After that it yields
      ``RequestOutput`` increments until one with ``finished=True``, then stops.
    - Closing the generator early (``aclose()``, or the consuming task being cancelled, e.g. by a
      client disconnect) aborts the request; its KV blocks are freed before the next engine step.
    - ``request_id`` must be unique among running requests.
    - ``render_metrics`` returns the Prometheus text exposition (``memserve.metrics.CONTENT_TYPE``)
      of the engine's metrics; it is cheap, never blocks on an engine step, and may be called at
      any time from the event loop.
    """

    @property
    def model_name(self) -> str: ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def tokenizer(self) -> Tokenizer: ...

    def generate(
        self, request_id: str, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]: ...

    def is_healthy(self) -> bool: ...

    def render_metrics(self) -> bytes: ...
