"""Start and stop ``memserve-node`` processes on this machine (benchmarks, end-to-end tests).

``local_process(cmd, url)`` runs any server command, waits until ``url/health`` answers 200
(failing fast, with the log's tail, if the process exits first), and on exit stops it with
SIGINT, then SIGKILL after ``stop_timeout_s``. ``local_node(args)`` does that for
``python -m memserve.cli --port <free port> *args`` and yields a ``RunningNode``.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

NODE_COMMAND = (sys.executable, "-m", "memserve.cli")


@dataclass(frozen=True)
class RunningNode:
    url: str  # http://127.0.0.1:<port>, without /v1
    proc: subprocess.Popen[bytes]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_healthy(
    url: str, proc: subprocess.Popen[bytes], timeout_s: float = 180, log_path: Path | None = None
) -> None:
    """Return once ``url/health`` answers 200; raise if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:] if log_path else ""
            raise RuntimeError(f"node exited early with {proc.returncode}\n{tail}".rstrip())
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"node did not become healthy in {timeout_s} s")


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    """SIGINT, then SIGKILL if it has not exited after ``timeout_s``."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def local_process(
    cmd: Sequence[str],
    url: str,
    log_path: Path | None = None,
    healthy_timeout_s: float = 180,
    stop_timeout_s: float = 30,
) -> Iterator[subprocess.Popen[bytes]]:
    """``cmd`` (its stdout and stderr to ``log_path``, else inherited), once ``url/health``
    answers 200; stopped on exit (SIGINT, then SIGKILL after ``stop_timeout_s``)."""
    if log_path is None:
        proc = subprocess.Popen(cmd)
    else:
        with log_path.open("wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(url, proc, healthy_timeout_s, log_path)
        yield proc
    finally:
        stop(proc, stop_timeout_s)


@contextmanager
def local_node(
    args: Sequence[str],
    log_path: Path | None = None,
    healthy_timeout_s: float = 180,
    stop_timeout_s: float = 30,
) -> Iterator[RunningNode]:
    """A node process with ``args`` (its stdout and stderr to ``log_path``, else inherited)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [*NODE_COMMAND, "--port", str(port), *args]
    with local_process(cmd, url, log_path, healthy_timeout_s, stop_timeout_s) as proc:
        yield RunningNode(url, proc)


def wait_serving(url: str, model: str, timeout_s: float = 30) -> None:
    """Until a one-token completion gets through ``url`` (a cluster answers 503 while its decode
    instances have not yet seen a prefill instance); other errors raise at once."""
    body = json.dumps({"model": model, "prompt": [5, 6, 7], "max_tokens": 1}).encode()
    deadline = time.monotonic() + timeout_s
    while True:
        req = urllib.request.Request(
            url + "/v1/completions", body, {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=10):
                return
        except urllib.error.HTTPError as e:
            if e.code != 503 or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
