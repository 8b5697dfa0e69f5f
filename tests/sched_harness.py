"""Clusters behind the global scheduler, as real ``memserve-node`` processes
(``tests/test_cluster.py``).

``SchedCluster`` starts a scheduler (``--role scheduler``) and instances joined to it with
``--scheduler-url``; each node logs to ``log_dir``. ``wait_ready`` sends tiny requests through
the scheduler until one succeeds (a decode instance can prefill only once its own registry has
seen a prefill instance). Closing stops every node still running.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any

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
NODE_ARGS = ("--model", MODEL, "--dtype", "float32", "--num-kv-blocks", "512", "--num-threads", "1")


def cluster_state(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/v1/cluster", timeout=10) as r:
        state: dict[str, Any] = json.loads(r.read())
        return state


def instance_ids(url: str) -> set[str]:
    return {i["id"] for i in cluster_state(url)["instances"]}


class SchedCluster:
    def __init__(self, log_dir: Path, *scheduler_args: str) -> None:
        self.log_dir = log_dir
        self._stack = ExitStack()
        self._logs: dict[str, Path] = {}
        self.instances: dict[str, RunningNode] = {}
        rendezvous = f"127.0.0.1:{free_port()}"
        args = ["--role", "scheduler", "--rendezvous", rendezvous, *scheduler_args]
        self.scheduler = self._spawn("scheduler", args)
        wait_healthy_or_503(self.scheduler, self._logs["scheduler"])

    @property
    def url(self) -> str:
        return self.scheduler.url

    def client(self, timeout_s: float = 60) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=timeout_s
        )

    def _spawn(self, name: str, args: list[str]) -> RunningNode:
        port = free_port()
        log = self.log_dir / f"{len(self._logs) + 1}-{name}.log"
        with log.open("wb") as out:
            cmd = [*NODE_COMMAND, "--port", str(port), *NODE_ARGS, *args]
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        self._stack.callback(stop, proc, 20)
        self._logs[name] = log
        return RunningNode(f"http://127.0.0.1:{port}", proc)

    def spawn(self, role: str, instance_id: str, *extra: str) -> RunningNode:
        args = ["--role", role, "--scheduler-url", self.url, "--instance-id", instance_id, *extra]
        node = self._spawn(instance_id, args)
        self.instances[instance_id] = node
        return node

    def wait_joined(self, *instance_ids: str, timeout_s: float = 90) -> None:
        """Until each instance answers /health and the scheduler lists it as ready (a decode
        instance is once its own registry has seen a prefill instance)."""
        for name in instance_ids:
            node = self.instances[name]
            wait_healthy(node.url, node.proc, timeout_s, self._logs[name])
        deadline = time.monotonic() + timeout_s
        while not set(instance_ids) <= ready_ids(self.url):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{instance_ids} never ready: {ready_ids(self.url)}")
            time.sleep(0.1)

    def wait_ready(self, timeout_s: float = 30) -> None:
        """Until a tiny completion gets through (503 while no prefill instance is seen)."""
        wait_serving(self.url, MODEL, timeout_s)

    def log(self, name: str) -> str:
        return self._logs[name].read_text(errors="replace")

    def __enter__(self) -> SchedCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stack.close()


def ready_ids(url: str) -> set[str]:
    try:
        return {i["id"] for i in cluster_state(url)["instances"] if i["ready"]}
    except OSError:
        return set()


def ids_of(url: str) -> set[str]:
    try:
        return instance_ids(url)
    except OSError:
        return set()


def wait_healthy_or_503(node: RunningNode, log: Path, timeout_s: float = 60) -> None:
    """Until the scheduler answers ``/v1/cluster`` (its ``/health`` is 503 until it can serve)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if node.proc.poll() is not None:
            raise RuntimeError(f"scheduler exited: {log.read_text(errors='replace')[-3000:]}")
        try:
            cluster_state(node.url)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def start_sched_cluster(
    log_dir: Path,
    shape: dict[str, int],
    scheduler_args: tuple[str, ...] = (),
    instance_args: tuple[str, ...] = (),
) -> SchedCluster:
    """A ready cluster: ``shape`` maps roles to counts; ids are p0.., d0.., c0.."""
    cluster = SchedCluster(log_dir, *scheduler_args)
    try:
        names = []
        for role, count in shape.items():
            for i in range(count):
                names.append(f"{role[0]}{i}")
                cluster.spawn(role, names[-1], *instance_args)
        cluster.wait_joined(*names)
        cluster.wait_ready()
    except BaseException:
        cluster.__exit__(None, None, None)
        raise
    return cluster
