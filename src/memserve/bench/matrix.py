"""``memserve-bench matrix``: the paper's evaluation, one configuration after another.

For each workload, each configuration and each policy, the matrix starts a local cluster
(``memserve-node cluster``, a scheduler plus ``--instances`` instances sharing this machine's
cores equally), waits until it serves, drives it with the workload (``BenchmarkClient``), stops
it, and records the summary. Every configuration gets the same instances, so the comparison is at
equal resources:

=================  ==========================  ==============================================
configuration      shape (``--instances 2``)   what is kept
=================  ==========================  ==============================================
colocated          2 colocated                 nothing (``--no-prefix-caching``): vLLM-like
colocated-cache    2 colocated                 prompt + output of every request (MemPool)
pd-basic           1 prefill + 1 decode        nothing: P sends the KV to D (Splitwise-like)
pd-caching-1       1 prefill + 1 decode        P keeps prompts (``--pd-caching prefill``)
pd-caching-2       1 prefill + 1 decode        D keeps what it got; only missing KV moves
pd-caching-3       1 prefill + 1 decode        D also sends generated KV back to P (full)
=================  ==========================  ==============================================

The workload's prompts do not depend on the configuration: with ``history=real`` the answers
come from the server, and a greedy engine gives the same answers in every configuration (our
exactness guarantee). Results: one JSON per run, ``matrix.json`` and ``matrix.md`` (the tables of
``matrix_tables``) in ``--output-dir``, and PNG plots with ``--plot``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memserve.bench.client import BenchmarkClient, ClientConfig
from memserve.bench.launch import NODE_COMMAND, free_port, local_process, wait_serving
from memserve.bench.report import RequestRecord, Summary, summarize
from memserve.bench.workloads import WORKLOADS, Workload, make_workload


@dataclass(frozen=True)
class Config:
    """One serving configuration of the matrix."""

    name: str
    paper_name: str  # as the MemServe paper calls it
    disaggregated: bool  # prefill + decode instances, else colocated ones
    node_args: tuple[str, ...]  # flags for every process of the cluster

    def shape(self, instances: int) -> tuple[int, int, int]:
        """(prefill, decode, colocated) instances out of ``instances``."""
        if self.disaggregated:
            if instances < 2:
                raise ValueError(f"{self.name} needs at least 2 instances")
            return instances // 2, instances - instances // 2, 0
        return 0, 0, instances


CONFIGS: dict[str, Config] = {
    c.name: c
    for c in (
        Config("colocated", "PD-colocated", False, ("--no-prefix-caching",)),
        Config("colocated-cache", "PD-colocated + caching", False, ()),
        Config("pd-basic", "PD-Basic", True, ("--pd-caching", "basic")),
        Config("pd-caching-1", "PD-Caching-1", True, ("--pd-caching", "prefill")),
        Config("pd-caching-2", "PD-Caching-2", True, ("--pd-caching", "both")),
        Config("pd-caching-3", "PD-Caching-3", True, ("--pd-caching", "full")),
    )
}
POLICIES = ("prompt_tree", "least_load")


@dataclass(frozen=True)
class WorkloadSpec:
    """``NAME[:key=value,...]``: ``num``, ``rate``, ``seed`` and ``warmup`` are the run's;
    other keys go to the generator (``--param`` of ``serve``)."""

    name: str
    num: int = 40
    rate: float | None = None
    seed: int = 0
    warmup: int = 0
    params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> WorkloadSpec:
        name, _, rest = text.partition(":")
        if name not in WORKLOADS:
            raise ValueError(f"unknown workload {name!r}; choose from {sorted(WORKLOADS)}")
        values: dict[str, Any] = {}
        for item in filter(None, rest.split(",")):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"{text!r}: want key=value, got {item!r}")
            values[key.strip()] = number_or_str(value.strip())
        run = {k: values.pop(k) for k in ("num", "rate", "seed", "warmup") if k in values}
        return cls(name, params=values, **run)

    def make(self) -> Workload:
        return make_workload(self.name, self.num, self.seed, self.rate, **self.params)

    def label(self) -> str:
        items = {"num": self.num, "rate": self.rate, "seed": self.seed} | self.params
        return f"{self.name} (" + ", ".join(f"{k}={v}" for k, v in items.items()) + ")"


def number_or_str(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


@dataclass(frozen=True)
class MatrixSettings:
    """What every run of one matrix shares."""

    model: str
    instances: int
    output_dir: Path
    node_args: tuple[str, ...] = ()  # extra flags for every process (e.g. --dtype)
    max_concurrency: int | None = None
    request_timeout_s: float = 600.0
    ready_timeout_s: float = 600.0
    progress: bool = True


@dataclass(frozen=True)
class Cell:
    """One finished run: a workload on a configuration under a policy."""

    workload: str
    config: str
    policy: str
    shape: tuple[int, int, int]
    summary: Summary
    wall_s: float

    def to_json(self) -> dict[str, Any]:
        return {
            "workload": self.workload,
            "config": self.config,
            "policy": self.policy,
            "shape": list(self.shape),
            "wall_s": self.wall_s,
            **self.summary,
        }

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Cell:
        """The inverse of ``to_json`` (extra keys such as ``requests`` are ignored)."""
        own = {"workload", "config", "policy", "shape", "wall_s", "requests"}
        summary = {k: v for k, v in body.items() if k not in own}
        shape = tuple(body["shape"])
        return cls(
            body["workload"],
            body["config"],
            body["policy"],
            (shape[0], shape[1], shape[2]),
            summary,
            body["wall_s"],
        )


def cluster_command(config: Config, policy: str, settings: MatrixSettings, port: int) -> list[str]:
    """``memserve-node cluster`` for one run (the scheduler on ``port``)."""
    prefill, decode, colocated = config.shape(settings.instances)
    return [
        *NODE_COMMAND,
        "cluster",
        "--port", str(port),
        "--prefill", str(prefill),
        "--decode", str(decode),
        "--colocated", str(colocated),
        "--policy", policy,
        "--model", settings.model,
        *config.node_args,
        *settings.node_args,
    ]  # fmt: skip


def run_cell(spec: WorkloadSpec, config: Config, policy: str, settings: MatrixSettings) -> Cell:
    """Start the cluster, run the workload, stop the cluster; the records go to a JSON file."""
    run_dir = settings.output_dir / spec.name
    run_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{config.name}-{policy}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    cmd = cluster_command(config, policy, settings, port)
    log_path = run_dir / f"{stem}.log"
    with local_process(cmd, url, log_path, settings.ready_timeout_s, stop_timeout_s=120):
        wait_serving(url, settings.model, settings.ready_timeout_s)
        records = asyncio.run(_drive(spec, url, settings))
    summary = summarize(records)
    cell = Cell(
        spec.name, config.name, policy, config.shape(settings.instances), summary,
        time.monotonic() - started,
    )  # fmt: skip
    body = cell.to_json() | {"requests": [r.__dict__ for r in records]}
    (run_dir / f"{stem}.json").write_text(json.dumps(body, indent=1))
    return cell


async def _drive(spec: WorkloadSpec, url: str, settings: MatrixSettings) -> list[RequestRecord]:
    config = ClientConfig(
        url=url,
        model=settings.model,
        max_concurrency=settings.max_concurrency,
        warmup=spec.warmup,
        request_timeout_s=settings.request_timeout_s,
        progress=settings.progress,
    )
    return await BenchmarkClient(spec.make(), config).run()


def run_matrix(
    specs: Sequence[WorkloadSpec],
    configs: Sequence[Config],
    policies: Sequence[str],
    settings: MatrixSettings,
) -> list[Cell]:
    """Every (workload, configuration, policy) in turn; ``matrix.json`` is rewritten after each
    run so an interrupted matrix keeps what it measured."""
    cells: list[Cell] = []
    for spec in specs:
        for config in configs:
            for policy in policies:
                print(f"[matrix] {spec.name} / {config.name} / {policy}", file=sys.stderr)
                cells.append(run_cell(spec, config, policy, settings))
                _write_json(cells, specs, settings)
    return cells


def _write_json(cells: Sequence[Cell], specs: Sequence[WorkloadSpec], s: MatrixSettings) -> None:
    body = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "model": s.model,
        "instances": s.instances,
        "node_args": list(s.node_args),
        "workloads": [spec.label() for spec in specs],
        "cells": [c.to_json() for c in cells],
    }
    (s.output_dir / "matrix.json").write_text(json.dumps(body, indent=1))
