"""``memserve-node cluster`` (what ``bin/serve`` runs): a whole local cluster in one command.

Starts a scheduler on ``--host:--port`` (the OpenAI API) and ``--prefill N --decode M
--colocated K`` instances on free local ports, each its own process joined to the scheduler
with ``--scheduler-url``. On a CPU each instance gets its share of the cores (``--num-threads``
= cores // instances unless given). Every other flag goes to every process (``memserve-node
--help``), so ``--model``, ``--pd-caching`` or ``--policy`` work as for a single node.

Shutdown on SIGINT/SIGTERM: the scheduler first (it stops accepting, then drains in-flight
requests), then the instances (each stops its engine and closes its transports), and last the
scheduler's rendezvous store, which it keeps up until the instances have left through it; a
process not gone after ``--stop-timeout`` seconds is killed. If the scheduler dies, the cluster stops; an
instance that dies is logged (the scheduler drops it and serves on the others).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from memserve.bench.launch import NODE_COMMAND, free_port, stop, wait_healthy


@dataclass(frozen=True)
class Member:
    name: str
    proc: subprocess.Popen[bytes]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="memserve-node cluster",
        description="Run a scheduler and its instances on this machine; other flags go to every "
        "process (see memserve-node --help).",
    )
    p.add_argument("--prefill", type=int, default=1, help="prefill instances")
    p.add_argument("--decode", type=int, default=1, help="decode instances")
    p.add_argument("--colocated", type=int, default=0, help="colocated instances")
    p.add_argument("--host", default="127.0.0.1", help="the scheduler's (OpenAI API) address")
    p.add_argument("--port", type=int, default=8000, help="the scheduler's port")
    p.add_argument("--num-threads", type=int, default=None, help="torch threads per instance")
    p.add_argument("--stop-timeout", type=float, default=30.0, help="seconds before SIGKILL")
    p.add_argument(
        "--ready-timeout", type=float, default=600.0, help="seconds to wait for the cluster"
    )
    return p


def plan(args: argparse.Namespace, rest: Sequence[str]) -> list[tuple[str, list[str]]]:
    """(name, argv) of every process: the scheduler first."""
    shape = {"prefill": args.prefill, "decode": args.decode, "colocated": args.colocated}
    if min(shape.values()) < 0:
        raise ValueError("instance counts must be >= 0")
    if not shape["colocated"] and not (shape["prefill"] and shape["decode"]):
        raise ValueError("need a colocated instance, or at least one prefill and one decode")
    if bool(shape["prefill"]) != bool(shape["decode"]):
        raise ValueError("prefill and decode instances come together")
    num_instances = sum(shape.values())
    threads = args.num_threads or max(1, (os.cpu_count() or 1) // num_instances)
    url = f"http://127.0.0.1:{args.port}"
    procs = [
        (
            "scheduler",
            ["--role", "scheduler", "--host", args.host, "--port", str(args.port), *rest],
        )
    ]
    for role, count in shape.items():
        for i in range(count):
            name = f"{role}-{i}"
            argv = ["--role", role, "--scheduler-url", url, "--port", str(free_port())]
            argv += ["--instance-id", name, "--num-threads", str(threads), *rest]
            procs.append((name, argv))
    return procs


def main(argv: Sequence[str]) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        processes = plan(args, rest)
    except ValueError as e:
        parser.exit(2, f"memserve-node cluster: {e}\n")
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    # Own sessions: a terminal's Ctrl-C reaches only this process, which stops them in order.
    members = [
        Member(name, subprocess.Popen([*NODE_COMMAND, *cmd], start_new_session=True))
        for name, cmd in processes
    ]
    url = f"http://{args.host if args.host != '0.0.0.0' else '127.0.0.1'}:{args.port}"
    status = 1
    try:
        wait_healthy(url, members[0].proc, args.ready_timeout)
        print(f"[cluster] ready: {url}/v1 ({', '.join(m.name for m in members)})", flush=True)
        watch(members)
        print("[cluster] the scheduler exited", file=sys.stderr, flush=True)
    except (RuntimeError, TimeoutError) as e:
        print(f"[cluster] not ready: {e}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        status = 0
    finally:
        shutdown(members, url, args.stop_timeout)
    return status


def _interrupt(signum: int, _: object) -> None:
    raise KeyboardInterrupt


def watch(members: list[Member]) -> None:
    """Until the scheduler exits; instances that exit are reported and forgotten."""
    while members[0].proc.poll() is None:
        time.sleep(0.2)
        for m in [m for m in members[1:] if m.proc.poll() is not None]:
            print(f"[cluster] {m.name} exited with {m.proc.returncode}", flush=True)
            members.remove(m)


def shutdown(members: Sequence[Member], url: str, timeout_s: float) -> None:
    """The scheduler first (it stops accepting and drains; its rendezvous store stays up until
    the instances have left), then the instances, then wait for the scheduler."""
    scheduler = members[0].proc
    if scheduler.poll() is None:
        scheduler.send_signal(signal.SIGINT)
    deadline = time.monotonic() + timeout_s
    while scheduler.poll() is None and _accepting(url) and time.monotonic() < deadline:
        time.sleep(0.1)
    for m in members[1:]:
        if m.proc.poll() is None:
            m.proc.send_signal(signal.SIGINT)
    for m in members[1:]:
        stop(m.proc, timeout_s)
    stop(scheduler, timeout_s)


def _accepting(url: str) -> bool:
    """The scheduler's HTTP port still takes connections (it has not finished draining)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False
