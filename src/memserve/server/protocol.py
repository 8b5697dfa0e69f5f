"""The OpenAI wire format, requests side: JSON bodies in, typed requests out.

Parsing is strict about types (``true`` is not an integer, ``"1"`` is not a number) and every
failure is a ``RequestError`` naming the offending field, which the server answers with a 400.
Unknown fields are ignored, as vLLM does. Parameters we do not implement are rejected unless
they have their no-op value (``presence_penalty: 0``, ``echo: false``, ``suffix: null``, …).
Response bodies are built in ``responses``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from memserve.engine.types import RequestError, SamplingParams
from memserve.server.errors import APIError

JSON = dict[str, Any]
PromptInput = str | tuple[int, ...]
"""One completion prompt: text, or token ids used as they are."""

MAX_N = 128
MAX_STOP_STRINGS = 4
MAX_COMPLETION_LOGPROBS = 5
MAX_CHAT_TOP_LOGPROBS = 20
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


@dataclass(frozen=True)
class GenerationOptions:
    """What both endpoints share.

    ``params.max_tokens`` is a placeholder (the context length) when ``max_tokens`` is None; the
    real value is fixed per prompt by ``params_for_prompt`` once the prompt's length is known.
    """

    model: str
    params: SamplingParams
    max_tokens: int | None
    n: int
    stream: bool
    include_usage: bool
    return_token_ids: bool = False  # vLLM's extension: token ids beside the text


@dataclass(frozen=True)
class CompletionRequest:
    options: GenerationOptions
    prompts: tuple[PromptInput, ...]


@dataclass(frozen=True)
class ChatRequest:
    options: GenerationOptions
    messages: tuple[Mapping[str, object], ...]
    add_generation_prompt: bool


# --- typed field access -------------------------------------------------------------------------


def _type_error(name: str, expected: str) -> RequestError:
    return RequestError(f"'{name}' must be {expected}", name)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def opt_int(body: Mapping[str, object], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise _type_error(name, "an integer")
    return value


def opt_float(body: Mapping[str, object], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise _type_error(name, "a number")
    return float(value)


def opt_bool(body: Mapping[str, object], name: str) -> bool | None:
    value = body.get(name)
    if value is None or isinstance(value, bool):
        return value
    raise _type_error(name, "a boolean")


def opt_str(body: Mapping[str, object], name: str) -> str | None:
    value = body.get(name)
    if value is None or isinstance(value, str):
        return value
    raise _type_error(name, "a string")


def _in_range(name: str, value: int, low: int, high: int) -> int:
    if not low <= value <= high:
        raise RequestError(f"'{name}' must be between {low} and {high}, got {value}", name)
    return value


def _required_str(body: Mapping[str, object], name: str) -> str:
    value = opt_str(body, name)
    if value is None:
        raise RequestError(f"'{name}' is a required property", name)
    return value


def _max_tokens(body: Mapping[str, object], name: str) -> int | None:
    value = opt_int(body, name)
    if value is not None and value < 1:
        raise RequestError(f"'{name}' must be at least 1, got {value}", name)
    return value


def _stop(body: Mapping[str, object]) -> tuple[str, ...]:
    value = body.get("stop")
    stops = [] if value is None else [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise _type_error("stop", "a non-empty string or a list of non-empty strings")
    if len(stops) > MAX_STOP_STRINGS:
        raise RequestError(f"'stop' accepts at most {MAX_STOP_STRINGS} strings", "stop")
    return tuple(stops)


def _int_list(body: Mapping[str, object], name: str) -> tuple[int, ...]:
    value = body.get(name)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(_is_int(v) for v in value):
        raise _type_error(name, "a list of integers")
    return tuple(value)


# --- parameters we accept only with their no-op value --------------------------------------------


def _not_supported(name: str, what: str = "is not supported") -> RequestError:
    return RequestError(f"'{name}' {what}", name)


def _reject_unsupported(body: Mapping[str, object], n: int) -> None:
    for name, neutral in (("presence_penalty", 0.0), ("frequency_penalty", 0.0)):
        if opt_float(body, name) not in (None, neutral):
            raise _not_supported(name, "is not supported (only 0)")
    if opt_float(body, "repetition_penalty") not in (None, 1.0):
        raise _not_supported("repetition_penalty", "is not supported (only 1)")
    logit_bias = body.get("logit_bias")
    if logit_bias is not None and not isinstance(logit_bias, dict):
        raise _type_error("logit_bias", "an object")
    if logit_bias:
        raise _not_supported("logit_bias")
    if opt_int(body, "best_of") not in (None, 1, n):
        raise _not_supported("best_of", "is only supported equal to 1 or to n")
    opt_str(body, "user")  # accepted and ignored, but typed


def _reject_unsupported_completion(body: Mapping[str, object]) -> None:
    if opt_bool(body, "echo"):
        raise _not_supported("echo", "is not supported (only false)")
    if body.get("suffix") is not None:
        raise _not_supported("suffix")


def _reject_unsupported_chat(body: Mapping[str, object]) -> None:
    if body.get("tools") not in (None, []):
        raise _not_supported("tools", "(tool calling) is not supported")
    if body.get("tool_choice") not in (None, "none"):
        raise _not_supported("tool_choice", "is not supported (only 'none')")
    for legacy in ("functions", "function_call"):
        if body.get(legacy) is not None:
            raise _not_supported(legacy)
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise _not_supported("response_format", "is only supported as {'type': 'text'}")


# --- the shared options -------------------------------------------------------------------------


def _stream_flags(body: Mapping[str, object]) -> tuple[bool, bool]:
    """(stream, include_usage); ``stream_options`` is only allowed with ``stream: true``."""
    stream = bool(opt_bool(body, "stream"))
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise _type_error("stream_options", "an object")
    if not stream:
        raise RequestError(
            "'stream_options' is only allowed when 'stream' is true", "stream_options"
        )
    include_usage = options.get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise _type_error("stream_options", "an object with a boolean 'include_usage'")
    return stream, bool(include_usage)


def _seed(body: Mapping[str, object]) -> int | None:
    seed = opt_int(body, "seed")
    return None if seed is None else _in_range("seed", seed, INT64_MIN, INT64_MAX)


def _top_k(body: Mapping[str, object]) -> int | None:
    """vLLM's convention: 0 or -1 disables top-k."""
    top_k = opt_int(body, "top_k")
    return None if top_k in (None, 0, -1) else top_k


def _options(
    body: Mapping[str, object], max_model_len: int, *, max_tokens: int | None, logprobs: int | None
) -> GenerationOptions:
    model = _required_str(body, "model")
    n = opt_int(body, "n")
    n = 1 if n is None else _in_range("n", n, 1, MAX_N)
    _reject_unsupported(body, n)
    stream, include_usage = _stream_flags(body)
    temperature, top_p, min_p = (opt_float(body, k) for k in ("temperature", "top_p", "min_p"))
    params = SamplingParams(
        max_tokens=max_model_len if max_tokens is None else max_tokens,
        temperature=1.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        top_k=_top_k(body),
        min_p=min_p or 0.0,
        seed=_seed(body),
        stop=_stop(body),
        stop_token_ids=_int_list(body, "stop_token_ids"),
        ignore_eos=bool(opt_bool(body, "ignore_eos")),
        min_tokens=opt_int(body, "min_tokens") or 0,
        logprobs=logprobs,
        skip_special_tokens=opt_bool(body, "skip_special_tokens") is not False,
        include_stop_str_in_output=bool(opt_bool(body, "include_stop_str_in_output")),
    )
    return_token_ids = bool(opt_bool(body, "return_token_ids"))
    return GenerationOptions(model, params, max_tokens, n, stream, include_usage, return_token_ids)


# --- the two request kinds ----------------------------------------------------------------------


def _prompts(value: object) -> tuple[PromptInput, ...]:
    """A string, a list of strings, a list of token ids, or a list of lists of token ids."""
    if value is None:
        raise RequestError("'prompt' is a required property", "prompt")
    if value == [] or value == "":
        raise RequestError("'prompt' must not be empty", "prompt")
    prompts = _prompt_list(value)
    if prompts is None:
        expected = "a string, a list of strings, a list of token ids or a list of lists of them"
        raise _type_error("prompt", expected)
    if any(len(p) == 0 for p in prompts):
        raise RequestError("'prompt' must not be empty", "prompt")
    return prompts


def _prompt_list(value: object) -> tuple[PromptInput, ...] | None:
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list):
        return None
    if all(isinstance(p, str) for p in value):
        return tuple(value)
    if all(_is_int(t) for t in value):
        return (tuple(value),)
    if all(isinstance(p, list) and all(_is_int(t) for t in p) for p in value):
        return tuple(tuple(p) for p in value)
    return None


def parse_completion_request(body: Mapping[str, object], max_model_len: int) -> CompletionRequest:
    """Validate a ``/v1/completions`` body. Raises ``RequestError`` naming the bad field."""
    _reject_unsupported_completion(body)
    logprobs = opt_int(body, "logprobs")
    if logprobs is not None:
        _in_range("logprobs", logprobs, 0, MAX_COMPLETION_LOGPROBS)
    max_tokens = _max_tokens(body, "max_tokens") if "max_tokens" in body else 16
    options = _options(body, max_model_len, max_tokens=max_tokens, logprobs=logprobs)
    return CompletionRequest(options, _prompts(body.get("prompt")))


def _messages(value: object) -> tuple[Mapping[str, object], ...]:
    if value is None:
        raise RequestError("'messages' is a required property", "messages")
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise _type_error("messages", "a list of message objects")
    if not value:
        raise RequestError("'messages' must not be empty", "messages")
    return tuple(value)


def _chat_logprobs(body: Mapping[str, object]) -> int | None:
    """The engine's ``logprobs`` (alternatives per token) from chat's logprobs / top_logprobs."""
    top_logprobs = opt_int(body, "top_logprobs")
    if top_logprobs is None:
        return 0 if opt_bool(body, "logprobs") else None
    _in_range("top_logprobs", top_logprobs, 0, MAX_CHAT_TOP_LOGPROBS)
    if not opt_bool(body, "logprobs"):
        raise RequestError("'top_logprobs' requires 'logprobs' to be true", "top_logprobs")
    return top_logprobs


def parse_chat_request(body: Mapping[str, object], max_model_len: int) -> ChatRequest:
    """Validate a ``/v1/chat/completions`` body; ``max_completion_tokens`` beats ``max_tokens``."""
    _reject_unsupported_chat(body)
    max_tokens = _max_tokens(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _max_tokens(body, "max_tokens")
    options = _options(body, max_model_len, max_tokens=max_tokens, logprobs=_chat_logprobs(body))
    add_generation_prompt = opt_bool(body, "add_generation_prompt") is not False
    return ChatRequest(options, _messages(body.get("messages")), add_generation_prompt)


def params_for_prompt(
    options: GenerationOptions, num_prompt_tokens: int, max_model_len: int, param: str
) -> SamplingParams:
    """The sampling parameters for one prompt, with ``max_tokens`` checked against the context.

    Raises ``APIError`` 400 ``context_length_exceeded`` (with both numbers, like vLLM) when
    prompt + max_tokens does not fit, or when the prompt alone fills the context.
    """
    requested = options.max_tokens
    if requested is None and num_prompt_tokens >= max_model_len:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"request has {num_prompt_tokens} input tokens. Please reduce the length of the input.",
            param=param,
            code="context_length_exceeded",
        )
    if requested is not None and num_prompt_tokens + requested > max_model_len:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {num_prompt_tokens + requested} tokens ({num_prompt_tokens} in the "
            f"{'messages' if param == 'messages' else 'prompt'}, {requested} in the completion). "
            "Please reduce the length of the input or of the completion.",
            param=param,
            code="context_length_exceeded",
        )
    max_tokens = max_model_len - num_prompt_tokens if requested is None else requested
    return dataclasses.replace(options.params, max_tokens=max_tokens)


def nth_seed(seed: int, i: int) -> int:
    """The seed of choice ``i`` (``seed + i``), wrapped to stay a valid int64 seed."""
    return (seed + i - INT64_MIN) % 2**64 + INT64_MIN


def check_token_ids(token_ids: Sequence[int], vocab_size: int, param: str) -> None:
    bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise RequestError(f"token id {bad} is out of range [0, {vocab_size})", param)
