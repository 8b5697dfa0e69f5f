"""Logging setup: structlog for our own loggers, with stdlib ``logging`` routed through it.

``configure_logging`` is called once by the entry point (never at import). Every record, whether
from ``structlog.stdlib.get_logger`` or from a library's stdlib logger (aiohttp, torch), is rendered
by one handler on stderr: a console line, or one JSON object per line (orjson), each with
``timestamp`` (ISO 8601, UTC), ``level``, ``logger`` and the event's fields.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal

import orjson
import structlog
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

LogFormat = Literal["console", "json"]

QUIET_ACCESS_PATHS = frozenset({"/health", "/metrics"})
"""Paths whose access-log lines are at debug level (load balancers probe them constantly), as are
successful calls of the internal API (``/internal/*``: heartbeats, dispatch, transfers)."""


def _orjson_dumps(event: Any, **kwargs: Any) -> str:
    return orjson.dumps(event, default=repr).decode()


def _shared_processors() -> list[structlog.typing.Processor]:
    """Applied to structlog events and to stdlib records alike."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.ExtraAdder(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]


def _renderer(fmt: LogFormat) -> list[structlog.typing.Processor]:
    if fmt == "json":
        return [
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=_orjson_dumps),
        ]
    return [structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())]


def configure_logging(fmt: LogFormat, level: str) -> None:
    """Route all logging through structlog to stderr at ``level`` (e.g. "info", "DEBUG").

    Replaces the root logger's handlers, so calling it again reconfigures. Raises ``ValueError``
    for an unknown format or level.
    """
    if fmt not in ("console", "json"):
        raise ValueError(f"log format must be console or json, got {fmt!r}")
    numeric_level = logging.getLevelNamesMapping().get(level.upper())
    if numeric_level is None:
        raise ValueError(f"unknown log level {level!r}")
    shared = _shared_processors()
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Module-level loggers may be used before this call; caching would pin the old config.
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *_renderer(fmt)],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(numeric_level)


class AccessLogger(AbstractAccessLogger):
    """aiohttp access log: one structured line per request, at debug for ``QUIET_ACCESS_PATHS``.

    Pass as ``AppRunner(app, access_log_class=AccessLogger)``.
    """

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        quiet = request.path in QUIET_ACCESS_PATHS or (
            request.path.startswith("/internal/") and response.status < 400
        )
        level = logging.DEBUG if quiet else logging.INFO
        if not self.logger.isEnabledFor(level):
            return
        fields = {
            "method": request.method,
            "path": request.path,
            "status": response.status,
            "duration_ms": round(time * 1000, 1),
            "remote": request.remote,
        }
        self.logger.log(level, "http request", extra=fields)

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)  # DEBUG enabled implies INFO enabled
