"""Workload generators of ``memserve-bench`` (see ``base.py`` for what a workload is).

``make_workload(name, num, seed, rate, **params)``: ``num`` is the number of sessions for
``sharegpt`` (conversations), ``loogle`` (document readers) and ``react`` (agent tasks), and the
number of requests (one-turn sessions, a contiguous window) for ``trace``. ``rate`` is the
Poisson session arrival rate (sessions/s); for ``trace`` it is the window's mean request rate
(it rescales the recorded timestamps). ``rate=None`` keeps each generator's default. Other
``params`` go to the generator's ``make`` (keyword-only; unknown ones raise ``TypeError``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from memserve.bench.workloads import loogle, react, sharegpt, trace
from memserve.bench.workloads.base import TOKEN_RANGE, Session, Turn, Workload, build_prompt

__all__ = [
    "TOKEN_RANGE",
    "WORKLOADS",
    "Session",
    "Turn",
    "Workload",
    "build_prompt",
    "make_workload",
]


# Each is ``make(num, seed, rate=<default>, *, <keyword params>) -> Workload``.
WORKLOADS: dict[str, Callable[..., Workload]] = {
    "sharegpt": sharegpt.make,
    "loogle": loogle.make,
    "react": react.make,
    "trace": trace.make,
}


def make_workload(
    name: str, num: int, seed: int, rate: float | None = None, **params: Any
) -> Workload:
    """The ``name`` workload of ``num`` sessions (``trace``: requests), from ``seed``."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose from {sorted(WORKLOADS)}")
    if rate is not None:
        params["rate"] = rate
    return WORKLOADS[name](num, seed, **params)
