"""Chat templates: validate OpenAI-style messages, find and compile a model's Jinja template.

- ``normalize_chat_messages`` checks a request's ``messages`` and brings them to the shape HF
  chat templates expect; every failure is ``RequestError(param="messages")`` (a 400).
- ``read_chat_template`` finds a model directory's template source the way transformers does.
- ``compile_chat_template`` compiles a source in HF's sandbox with HF's globals
  (``raise_exception``, ``strftime_now``) and HF's ``tojson``. Compiling or rendering may raise
  ``jinja2.TemplateError`` (a template's own ``raise_exception`` included); the caller,
  ``Tokenizer.apply_chat_template``, turns it into a ``RequestError``.

Nothing here holds state: the ``Tokenizer`` owns the source and caches the compiled template.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from memserve.engine.types import RequestError

CHAT_TEMPLATE_FILE = "chat_template.jinja"

CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


# ---- chat messages ---------------------------------------------------------------------------


def normalize_chat_messages(messages: object) -> list[dict[str, object]]:
    """Validate OpenAI-style chat messages and bring them to what chat templates expect.

    ``developer`` becomes ``system``; content given as a list of text parts is joined with
    newlines; keys whose value is None are dropped (as HF does). Raises
    ``RequestError(param="messages")`` on anything invalid.
    """
    if not isinstance(messages, list | tuple) or not messages:
        raise RequestError("messages must be a non-empty list", "messages")
    return [_normalize_message(i, message) for i, message in enumerate(messages)]


def _normalize_message(index: int, message: object) -> dict[str, object]:
    if not isinstance(message, Mapping):
        raise RequestError(f"messages[{index}] must be an object", "messages")
    role = message.get("role")
    if role is None:
        raise RequestError(f"messages[{index}] is missing 'role'", "messages")
    if role not in CHAT_ROLES:
        allowed = ", ".join(sorted(CHAT_ROLES))
        raise RequestError(
            f"messages[{index}].role must be one of {allowed}; got {role!r}", "messages"
        )
    normalized = {str(k): v for k, v in message.items() if v is not None}
    normalized["role"] = "system" if role == "developer" else role
    content = _normalize_content(index, message)
    if content is not None:
        normalized["content"] = content
    return normalized


def _normalize_content(index: int, message: Mapping[object, object]) -> str | None:
    """The message's content as one string, or None for an assistant message with tool calls."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if content is None and message.get("role") == "assistant" and message.get("tool_calls"):
        return None
    if isinstance(content, list):
        return "\n".join(_text_part(index, j, part) for j, part in enumerate(content))
    raise RequestError(
        f"messages[{index}].content must be a string or a list of text parts", "messages"
    )


def _text_part(index: int, part_index: int, part: object) -> str:
    where = f"messages[{index}].content[{part_index}]"
    if not isinstance(part, Mapping):
        raise RequestError(f"{where} must be an object", "messages")
    part_type = part.get("type")
    if part_type != "text":
        raise RequestError(f"{where}: content part type {part_type!r} is not supported", "messages")
    text = part.get("text")
    if not isinstance(text, str):
        raise RequestError(f"{where}.text must be a string", "messages")
    return text


# ---- templates -------------------------------------------------------------------------------


def read_chat_template(root: Path, config: Mapping[str, object]) -> str | None:
    """``chat_template.jinja`` if present (it wins in HF), else the config's ``chat_template``:
    a string, or a list of ``{"name", "template"}`` of which "default" is taken."""
    if (root / CHAT_TEMPLATE_FILE).is_file():
        return (root / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile ``source`` in the sandbox HF uses, with HF's globals and ``tojson``."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: object,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # HF's version: jinja's own tojson escapes HTML characters, which chat templates do not want.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)
