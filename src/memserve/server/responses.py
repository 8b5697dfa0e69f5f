"""OpenAI response bodies: engine outputs in, JSON bodies out (one object, or stream chunks).

The handler keeps one ``Choice`` per (prompt, choice) and one ``ResponseBuilder`` per HTTP
request. For each ``RequestOutput`` it calls ``builder.delta(choice, output)`` (when streaming)
and then ``choice.add(output)``; ``usage`` with ``builder.response`` (or, streaming,
``builder.usage_chunk``) ends the answer.

``return_token_ids`` (vLLM's extension, for clients that rebuild prompts from what the model
said, e.g. multi-turn benchmarks): every choice also carries ``token_ids`` (the output ids of the
increment, or all of them) and, on its first chunk and in a whole response, ``prompt_token_ids``.
"""

from __future__ import annotations

import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from memserve.engine.types import RequestOutput, TokenLogprob
from memserve.server.protocol import JSON

if TYPE_CHECKING:
    from memserve.model.tokenizer import Tokenizer

LOGPROB_FLOOR = -9999.0
"""``-inf`` is not JSON; like vLLM we report impossible tokens at this floor."""


@dataclass
class Choice:
    """The output of one choice (one engine request) accumulated so far."""

    index: int
    prompt_index: int
    text_parts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_cached_tokens: int = 0  # the most any increment reported (any tier)
    num_cached_tokens_dram: int = 0  # of those, from DRAM (same increment, so never more)
    prompt_token_ids: Sequence[int] = ()
    token_ids: list[int] = field(default_factory=list)

    def add(self, output: RequestOutput) -> None:
        self.text_parts.append(output.new_text)
        self.token_ids.extend(output.new_token_ids)
        self.logprobs.extend(output.new_logprobs or ())
        if output.num_cached_tokens >= self.num_cached_tokens:
            self.num_cached_tokens = output.num_cached_tokens
            self.num_cached_tokens_dram = output.num_cached_tokens_dram
        if output.finished:
            self.finish_reason = output.finish_reason
            self.stop_reason = output.stop_reason

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def text(self) -> str:
        return "".join(self.text_parts)


def usage(prompt_lens: Sequence[int], choices: Sequence[Choice]) -> JSON:
    """OpenAI's ``usage``. Like ``prompt_tokens``, cached tokens count once per prompt: with n > 1
    the least any of its choices found cached (siblings may hit each other's fresh prefill). The
    tier split (``cached_tokens_device`` + ``cached_tokens_dram`` == ``cached_tokens``) is that
    same choice's."""
    least: dict[int, Choice] = {}
    for choice in choices:
        kept = least.setdefault(choice.prompt_index, choice)
        if _cached(choice) < _cached(kept):
            least[choice.prompt_index] = choice
    num_cached = sum(c.num_cached_tokens for c in least.values())
    num_cached_dram = sum(c.num_cached_tokens_dram for c in least.values())
    num_prompt_tokens = sum(prompt_lens)
    num_completion_tokens = sum(c.num_tokens for c in choices)
    return {
        "prompt_tokens": num_prompt_tokens,
        "completion_tokens": num_completion_tokens,
        "total_tokens": num_prompt_tokens + num_completion_tokens,
        "prompt_tokens_details": {
            "cached_tokens": num_cached,
            "cached_tokens_device": num_cached - num_cached_dram,
            "cached_tokens_dram": num_cached_dram,
        },
    }


def _cached(choice: Choice) -> tuple[int, int]:
    """Order of choices for ``usage``: fewest cached tokens, then fewest from DRAM."""
    return choice.num_cached_tokens, choice.num_cached_tokens_dram


class ResponseBuilder(ABC):
    """Builds the JSON bodies of one response (one HTTP request): chunks, or the final object.

    One builder per request: it carries the response id, ``created`` and any per-choice streaming
    state. ``delta`` must be called for each increment before ``Choice.add`` of that increment.
    """

    id_prefix: str
    object_name: str
    chunk_object_name: str

    def __init__(
        self, tokenizer: Tokenizer, model: str, *, with_logprobs: bool, with_token_ids: bool = False
    ) -> None:
        self.tokenizer = tokenizer
        self.model = model
        self.with_logprobs = with_logprobs
        self.with_token_ids = with_token_ids
        self.response_id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _envelope(self, object_name: str, choices: list[JSON]) -> JSON:
        return {
            "id": self.response_id,
            "object": object_name,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def chunk(self, choices: list[JSON]) -> JSON:
        return self._envelope(self.chunk_object_name, choices)

    def usage_chunk(self, usage: JSON) -> JSON:
        return self._envelope(self.chunk_object_name, []) | {"usage": usage}

    def response(self, choices: Sequence[Choice], usage: JSON) -> JSON:
        return self._envelope(self.object_name, [self.final(c) for c in choices]) | {"usage": usage}

    def first_deltas(self, choices: Sequence[Choice]) -> list[JSON]:
        """Choices of the chunk sent before any token (none by default)."""
        return []

    def worth_sending(self, output: RequestOutput) -> bool:
        """Whether the chunk of ``output`` says anything (text, logprobs, ids, or the end)."""
        return bool(
            output.new_text
            or output.new_logprobs
            or output.finished
            or (self.with_token_ids and output.new_token_ids)
        )

    def token_ids(self, choice: Choice, output: RequestOutput | None) -> JSON:
        """``return_token_ids`` fields of a streamed increment (``output``) or of the whole
        ``choice`` (None); the prompt's ids go with the first increment only. Call before
        ``choice.add(output)``."""
        if not self.with_token_ids:
            return {}
        if output is None:
            return {
                "prompt_token_ids": list(choice.prompt_token_ids),
                "token_ids": choice.token_ids,
            }
        fields: JSON = {"token_ids": list(output.new_token_ids)}
        if choice.num_tokens == 0:
            fields["prompt_token_ids"] = list(choice.prompt_token_ids)
        return fields

    @abstractmethod
    def delta(self, choice: Choice, output: RequestOutput) -> JSON:
        """The streamed choice for one increment of ``choice``."""

    @abstractmethod
    def final(self, choice: Choice) -> JSON:
        """The complete choice of a non-streaming response."""


class CompletionResponseBuilder(ResponseBuilder):
    id_prefix = "cmpl"
    object_name = "text_completion"
    chunk_object_name = "text_completion"

    def __init__(
        self, tokenizer: Tokenizer, model: str, *, with_logprobs: bool, with_token_ids: bool = False
    ) -> None:
        super().__init__(
            tokenizer, model, with_logprobs=with_logprobs, with_token_ids=with_token_ids
        )
        self._text_offsets: dict[int, int] = {}  # choice index -> chars of its tokens streamed

    def delta(self, choice: Choice, output: RequestOutput) -> JSON:
        logprobs = None
        if self.with_logprobs:
            offset = self._text_offsets.get(choice.index, 0)
            entries = output.new_logprobs or ()
            logprobs, self._text_offsets[choice.index] = self._logprobs(entries, offset)
        body = self._choice(choice.index, output.new_text, logprobs, output)
        return body | self.token_ids(choice, output)

    def final(self, choice: Choice) -> JSON:
        logprobs = self._logprobs(choice.logprobs, 0)[0] if self.with_logprobs else None
        return self._choice(choice.index, choice.text, logprobs, choice) | self.token_ids(
            choice, None
        )

    @staticmethod
    def _choice(index: int, text: str, logprobs: JSON | None, end: Choice | RequestOutput) -> JSON:
        return {
            "index": index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": end.finish_reason,
            "stop_reason": end.stop_reason,
        }

    def _logprobs(self, entries: Sequence[TokenLogprob], text_offset: int) -> tuple[JSON, int]:
        """OpenAI completions logprobs; ``top_logprobs`` also holds the sampled token (like
        OpenAI, up to ``logprobs + 1`` entries). Returns the body and the next text offset."""
        tokens, token_logprobs, top_logprobs, text_offsets = [], [], [], []
        for entry in entries:
            token = self.tokenizer.token_str(entry.token_id)
            top = {self.tokenizer.token_str(t): _floor(lp) for t, lp in entry.top}
            top.setdefault(token, _floor(entry.logprob))
            tokens.append(token)
            token_logprobs.append(_floor(entry.logprob))
            top_logprobs.append(top)
            text_offsets.append(text_offset)
            text_offset += len(token)
        body: JSON = {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": text_offsets,
        }
        return body, text_offset


class ChatResponseBuilder(ResponseBuilder):
    id_prefix = "chatcmpl"
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def first_deltas(self, choices: Sequence[Choice]) -> list[JSON]:
        role = {"role": "assistant", "content": ""}
        return [
            {"index": c.index, "delta": role, "logprobs": None, "finish_reason": None}
            for c in choices
        ]

    def delta(self, choice: Choice, output: RequestOutput) -> JSON:
        return {
            "index": choice.index,
            "delta": {"content": output.new_text} if output.new_text else {},
            "logprobs": self._logprobs(output.new_logprobs or ()),
            "finish_reason": output.finish_reason,
            "stop_reason": output.stop_reason,
        } | self.token_ids(choice, output)

    def final(self, choice: Choice) -> JSON:
        return {
            "index": choice.index,
            "message": {"role": "assistant", "content": choice.text},
            "logprobs": self._logprobs(choice.logprobs),
            "finish_reason": choice.finish_reason,
            "stop_reason": choice.stop_reason,
        } | self.token_ids(choice, None)

    def _logprobs(self, entries: Sequence[TokenLogprob]) -> JSON | None:
        if not self.with_logprobs:
            return None
        content = [
            self._token(e.token_id, e.logprob) | {"top_logprobs": [self._token(*t) for t in e.top]}
            for e in entries
        ]
        return {"content": content}

    def _token(self, token_id: int, logprob: float) -> JSON:
        return {
            "token": self.tokenizer.token_str(token_id),
            "logprob": _floor(logprob),
            "bytes": list(self.tokenizer.token_bytes(token_id)),
        }


def _floor(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)
