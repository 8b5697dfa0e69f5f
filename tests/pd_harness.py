"""Prefill/decode clusters of real ``memserve-node`` processes (``tests/test_pd_cluster.py``).

A ``Cluster`` runs nodes with their logs under ``log_dir``; the first node of role
``store_on`` (the decode instance by default) hosts the rendezvous store. ``wait_ready`` polls
the decode front door until a request gets through (its registry sees prefill instances only
after a poll). Closing stops every node still running (SIGINT, then SIGKILL).
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import openai

from memserve.bench.launch import (
    NODE_COMMAND,
    RunningNode,
    free_port,
    stop,
    wait_healthy,
    wait_serving,
)

MODEL = "dummy:tiny"
BLOCK = 16
RECEIVED = 'memserve_kv_transfer_blocks_total{direction="received"}'
RECEIVED_BYTES = 'memserve_kv_transfer_bytes_total{direction="received"}'
SENT = 'memserve_kv_transfer_blocks_total{direction="sent"}'
SENT_BYTES = 'memserve_kv_transfer_bytes_total{direction="sent"}'
COMPUTED = "memserve_prompt_tokens_computed_total"
FAILURES = "memserve_kv_transfer_failures_total"


def metrics(url: str) -> dict[str, float]:
    """``/metrics`` as {name{labels}: value} (samples only)."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        body = r.read().decode()
    samples = (line.rsplit(" ", 1) for line in body.splitlines() if not line.startswith("#"))
    return {name: float(value) for name, value in samples}


def check(url: str) -> tuple[int, dict[str, Any]]:
    """``POST /internal/check``: (status, body)."""
    req = urllib.request.Request(
        url + "/internal/check", b"{}", {"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def wait_settled(url: str, timeout_s: float = 30) -> dict[str, Any]:
    """Poll ``/internal/check`` until nothing is in flight; every answer must be 200."""
    deadline = time.monotonic() + timeout_s
    while True:
        status, body = check(url)
        assert status == 200, body
        if body["holds"] == [] and body["running"] == 0:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} still holds {body['holds']} after {timeout_s} s: {body}")
        time.sleep(0.1)


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as r:
            return bool(r.status == 200)
    except OSError:
        return False


class Cluster:
    """One decode instance (the OpenAI front door) and prefill instances, in ``mode``. Nodes
    boot concurrently: a non-host's rendezvous connect waits (up to its ``--transfer-timeout``)
    for the store's host, which opens the store right after loading its model."""

    def __init__(self, mode: str, log_dir: Path, store_on: Literal["decode", "prefill"] = "decode"):
        self.mode = mode
        self.log_dir = log_dir
        self.store_on = store_on
        self.rendezvous_port = free_port()
        self.prefills: list[RunningNode] = []
        self._stack = ExitStack()
        self._decode: RunningNode | None = None
        self._store_up = False
        self._logs: dict[str, Path] = {}

    @property
    def decode(self) -> RunningNode:
        assert self._decode is not None
        return self._decode

    def client(self, timeout_s: float = 60) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.decode.url + "/v1", api_key="unused", max_retries=0, timeout=timeout_s
        )

    def spawn(self, role: str, *extra: str) -> RunningNode:
        """Start a node (``wait_healthy`` next); prefill ids are p0, p1, ..., decode is d0."""
        instance_id = f"p{len(self.prefills)}" if role == "prefill" else "d0"
        args = ["--role", role, "--model", MODEL, "--dtype", "float32", "--num-kv-blocks",
                "512", "--num-threads", "1", "--rendezvous", f"127.0.0.1:{self.rendezvous_port}",
                "--pd-caching", self.mode, "--instance-id", instance_id, *extra]  # fmt: skip
        if role == self.store_on and not self._store_up:
            args.append("--host-rendezvous")
            self._store_up = True
        port = free_port()
        log = self.log_dir / f"{len(self._logs) + 1}-{instance_id}.log"
        with log.open("wb") as out:
            cmd = [*NODE_COMMAND, "--port", str(port), *args]
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        self._stack.callback(stop, proc, 20)
        node = RunningNode(f"http://127.0.0.1:{port}", proc)
        self._logs[node.url] = log
        if role == "prefill":
            self.prefills.append(node)
        else:
            self._decode = node
        return node

    def wait_healthy(self, *nodes: RunningNode) -> None:
        for node in nodes:
            wait_healthy(node.url, node.proc, 60, self._logs[node.url])

    def start(self, role: str, *extra: str) -> RunningNode:
        node = self.spawn(role, *extra)
        self.wait_healthy(node)
        return node

    def wait_ready(self, timeout_s: float = 30) -> None:
        """Until a tiny completion gets through (503 while no prefill instance is seen)."""
        wait_serving(self.decode.url, MODEL, timeout_s)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stack.close()


def start_cluster(
    mode: str,
    log_dir: Path,
    decode_extra: tuple[str, ...] = (),
    prefill_extra: tuple[str, ...] = (),
    store_on: Literal["decode", "prefill"] = "decode",
    num_prefill: int = 1,
) -> Cluster:
    """A started, ready cluster of one decode and ``num_prefill`` prefill instances (close it
    when done)."""
    cluster = Cluster(mode, log_dir, store_on)
    try:
        d = cluster.spawn("decode", *decode_extra)
        ps = [cluster.spawn("prefill", *prefill_extra) for _ in range(num_prefill)]
        cluster.wait_healthy(d, *ps)
        cluster.wait_ready()
    except BaseException:
        cluster.__exit__(None, None, None)
        raise
    return cluster
