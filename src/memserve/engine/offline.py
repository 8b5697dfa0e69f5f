"""Offline batch generation (``LLM.generate``): all prompts in, completions out, no server."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from memserve.config import EngineConfig
from memserve.engine.llm_engine import LLMEngine
from memserve.engine.types import FinishReason, RequestOutput, SamplingParams, TokenLogprob


@dataclass
class Completion:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    num_cached_tokens: int = 0

    def add(self, out: RequestOutput) -> None:
        self.token_ids.extend(out.new_token_ids)
        self.text += out.new_text
        self.logprobs.extend(out.new_logprobs or ())
        if out.finished:
            self.finish_reason = out.finish_reason
            self.num_cached_tokens = out.num_cached_tokens


class LLM:
    """Wraps an ``LLMEngine``; ``generate`` runs steps until every prompt has finished."""

    def __init__(self, config: EngineConfig) -> None:
        self.engine = LLMEngine(config)
        self._counter = 0

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams],
    ) -> list[Completion]:
        per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(per_prompt) != len(prompts):
            raise ValueError("one SamplingParams per prompt, or one for all")
        results: dict[str, Completion] = {}
        for prompt, p in zip(prompts, per_prompt, strict=True):
            request_id = f"offline-{self._counter}"
            self._counter += 1
            self.engine.add_request(request_id, prompt, p)
            results[request_id] = Completion(request_id, list(prompt))
        while self.engine.has_unfinished():
            for out in self.engine.step():
                results[out.request_id].add(out)
        return list(results.values())
