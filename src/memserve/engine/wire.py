"""Engine types as JSON (orjson-ready dicts and lists) for the control plane between processes.

Never pickle on the wire: every value here is a plain number, string, list or dict. Round trips
are exact (``from_json(to_json(x)) == x``); tests check it.
"""

from __future__ import annotations

import base64
import dataclasses
from typing import Any

from memserve.engine.types import RequestOutput, SamplingParams, TokenLogprob


def params_to_json(params: SamplingParams) -> dict[str, Any]:
    return dataclasses.asdict(params)


def params_from_json(d: dict[str, Any]) -> SamplingParams:
    d = dict(d)
    d["stop"] = tuple(d.get("stop", ()))
    d["stop_token_ids"] = tuple(d.get("stop_token_ids", ()))
    return SamplingParams(**d)


def logprob_to_json(lp: TokenLogprob | None) -> list[Any] | None:
    return None if lp is None else [lp.token_id, lp.logprob, [list(t) for t in lp.top]]


def logprob_from_json(v: list[Any] | None) -> TokenLogprob | None:
    if v is None:
        return None
    return TokenLogprob(int(v[0]), float(v[1]), tuple((int(t), float(p)) for t, p in v[2]))


def output_to_json(out: RequestOutput) -> dict[str, Any]:
    """One ``RequestOutput`` increment; ``sampler_state`` travels as base64."""
    d: dict[str, Any] = {
        "request_id": out.request_id,
        "new_token_ids": list(out.new_token_ids),
        "new_text": out.new_text,
        "finished": out.finished,
        "finish_reason": out.finish_reason,
        "stop_reason": out.stop_reason,
        "num_prompt_tokens": out.num_prompt_tokens,
        "num_cached_tokens": out.num_cached_tokens,
        "num_cached_tokens_dram": out.num_cached_tokens_dram,
        "num_output_tokens": out.num_output_tokens,
        "error": out.error,
    }
    if out.new_logprobs is not None:
        d["new_logprobs"] = [logprob_to_json(lp) for lp in out.new_logprobs]
    if out.sampler_state is not None:
        d["sampler_state"] = base64.b64encode(out.sampler_state).decode()
    return d


def output_from_json(d: dict[str, Any]) -> RequestOutput:
    logprobs = d.get("new_logprobs")
    state = d.get("sampler_state")
    return RequestOutput(
        request_id=str(d["request_id"]),
        new_token_ids=tuple(int(t) for t in d["new_token_ids"]),
        new_text=str(d["new_text"]),
        finished=bool(d["finished"]),
        finish_reason=d.get("finish_reason"),
        stop_reason=d.get("stop_reason"),
        new_logprobs=None
        if logprobs is None
        else tuple(lp for lp in map(logprob_from_json, logprobs) if lp is not None),
        num_prompt_tokens=int(d.get("num_prompt_tokens", 0)),
        num_cached_tokens=int(d.get("num_cached_tokens", 0)),
        num_cached_tokens_dram=int(d.get("num_cached_tokens_dram", 0)),
        num_output_tokens=int(d.get("num_output_tokens", 0)),
        error=d.get("error"),
        sampler_state=None if state is None else base64.b64decode(state),
    )
