"""``memserve-node``: the command line, turned into frozen configs (nothing else reads argv).

Usage::

    memserve-node --role colocated --model dummy:tiny [--host 127.0.0.1] [--port 8000] ...
    memserve-node --role scheduler --port 8000 [--policy prompt_tree] ...
    memserve-node --role prefill|decode|colocated --scheduler-url http://HOST:8000 --port 8100 ...
    torchrun ... -m memserve.node --layout scheduler:1,prefill:2,decode:2 [flags for all]
    memserve-node cluster [--prefill 1 --decode 1 --colocated 0] [flags for all]
    memserve-node profile --model dummy:small --out profile.json
    memserve-node export-hf dummy:small DIR
    memserve-node export-gguf dummy:small OUT.gguf [--seed 0] [--dtype f16|f32]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.request
from collections.abc import Sequence

import orjson

from memserve.config import (
    DTYPES,
    PD_CACHING,
    ROLES,
    TRANSFER_MODES,
    CacheConfig,
    DisaggConfig,
    EngineConfig,
    ModelConfig,
    RouterConfig,
    SchedulerConfig,
    ServerConfig,
)

POLICIES = ("round_robin", "least_load", "session", "prompt_tree")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="memserve-node",
        description="Run one MemServe process (one per accelerator), or a utility subcommand "
        "(`memserve-node export-hf dummy:<preset> DIR`, "
        "`memserve-node export-gguf dummy:<preset> OUT.gguf`).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--role",
        choices=ROLES,
        default="colocated",
        help="what this process does: scheduler (the OpenAI API in front of the cluster; "
        "routes requests), colocated (prefill and decode), prefill, decode (without a "
        "scheduler, the decode instance is the front door of its P/D pair)",
    )
    p.add_argument(
        "--scheduler-url",
        default=None,
        help="instances: join the cluster of the scheduler at this URL (http://HOST:PORT); "
        "prefill/decode instances take its rendezvous address unless --rendezvous is given",
    )
    p.add_argument(
        "--policy",
        choices=POLICIES,
        default="prompt_tree",
        help="scheduler: routing policy (prompt_tree: least predicted queueing + execution "
        "time given the prefix each instance holds)",
    )
    p.add_argument(
        "--tree-ttl",
        type=float,
        default=300.0,
        help="scheduler: seconds a global prompt tree believes an instance holds a prefix",
    )
    p.add_argument(
        "--tree-max-blocks",
        type=int,
        default=1 << 20,
        help="scheduler: blocks the global prompt trees index before LRU pruning",
    )
    p.add_argument(
        "--cost-profile",
        default=None,
        help="scheduler: a `memserve-node profile` JSON file (default: rough built-in "
        "coefficients, refined online from the instances' step times)",
    )
    p.add_argument(
        "--layout",
        default=None,
        help="under torchrun: ranks to roles, e.g. scheduler:1,prefill:2,decode:2 (rank 0 is "
        "the scheduler on --port; instances listen on --port+2+LOCAL_RANK)",
    )
    p.add_argument(
        "--pd-caching",
        choices=PD_CACHING,
        default="full",
        help="P/D caching stage: basic (nothing kept), prefill (P keeps prompts), both (D keeps "
        "too; only missing KV moves), full (D also sends generated KV back to P)",
    )
    p.add_argument(
        "--transfer-mode",
        choices=TRANSFER_MODES,
        default="by-request",
        help="P->D KV transfer: by-request (one send after prefill) or by-layer (stream each "
        "layer while the prefill computes; best at low load)",
    )
    p.add_argument(
        "--rendezvous",
        default=None,
        help="host:port of the TCPStore every prefill/decode instance pairs through (the "
        "scheduler hosts it; default there: its host and --port + 1)",
    )
    p.add_argument(
        "--host-rendezvous",
        action="store_true",
        help="this instance hosts the rendezvous TCPStore (the first one started)",
    )
    p.add_argument(
        "--instance-id", default=None, help="unique name in the cluster (default: ROLE-PORT)"
    )
    p.add_argument(
        "--transfer-timeout",
        type=float,
        default=30.0,
        help="seconds before a KV send/receive or control call to a peer fails",
    )
    p.add_argument(
        "--peer-timeout",
        type=float,
        default=3.0,
        help="seconds without a heartbeat before a peer (or, at the scheduler, an instance) "
        "counts as gone (its blocks are freed; its requests fail or are re-dispatched)",
    )
    p.add_argument(
        "--model",
        default="dummy:tiny",
        help="a local Hugging Face directory (config.json, *.safetensors, tokenizer.json) "
        "or dummy:<preset> (tiny, small, llama2-13b, llama3-8b) for random weights",
    )
    p.add_argument(
        "--served-model-name", default=None, help="model id clients use (default: --model)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="auto: bfloat16 on CUDA or a CPU with bf16 matrix instructions, else float32",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of dummy weights and of unseeded sampling"
    )
    p.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="longest prompt + output in tokens (default: the model's max positions)",
    )
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    p.add_argument(
        "--kv-cache-memory",
        type=float,
        default=None,
        help="KV cache size in GiB (default: 1 GiB on CPU; on CUDA see --kv-cache-fraction)",
    )
    p.add_argument(
        "--kv-cache-fraction",
        type=float,
        default=None,
        help="CUDA only: fraction of free device memory for the KV cache (default 0.85)",
    )
    p.add_argument(
        "--num-kv-blocks", type=int, default=None, help="exact KV block count (overrides memory)"
    )
    p.add_argument(
        "--no-prefix-caching",
        action="store_true",
        help="free every request's KV when it finishes (no reuse; the baseline)",
    )
    p.add_argument(
        "--dram-cache-memory",
        type=float,
        default=None,
        help="host-DRAM tier for cold cached KV, in GiB (default: 4 on CUDA, 0 on CPU)",
    )
    p.add_argument("--num-dram-blocks", type=int, default=None, help="exact DRAM-tier block count")
    p.add_argument(
        "--max-num-batched-tokens", type=int, default=2048, help="token budget of one step"
    )
    p.add_argument("--max-num-seqs", type=int, default=64, help="requests running at once")
    p.add_argument(
        "--max-waiting-requests",
        type=int,
        default=1024,
        help="queued requests past which new ones get 503 + Retry-After",
    )
    p.add_argument(
        "--attention-backend",
        choices=("auto", "torch", "xformers"),
        default="auto",
        help="paged-attention implementation",
    )
    p.add_argument(
        "--num-threads", type=int, default=None, help="CPU threads for torch (default: all cores)"
    )
    p.add_argument(
        "--log-format", choices=("console", "json"), default="console", help="log output format"
    )
    p.add_argument("--log-level", default="info", help="debug, info, warning or error")
    return p


def build_export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="memserve-node export-hf",
        description="Write a dummy preset as a Hugging Face model directory (fp32 safetensors, "
        "config.json, tokenizer.json), so other engines can load the same weights.",
    )
    p.add_argument("model", help="dummy:<preset>")
    p.add_argument("out_dir", help="directory to write")
    p.add_argument("--seed", type=int, default=0)
    return p


def build_export_gguf_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="memserve-node export-gguf",
        description="Write a dummy preset as a llama.cpp GGUF file (needs the gguf package: "
        "pip install 'memserve[peer]'), so llama-server can serve the same weights.",
    )
    p.add_argument("model", help="dummy:<preset>")
    p.add_argument("out_path", help="GGUF file to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("f16", "f32"), default="f16", help="dtype of the matrices")
    return p


def disagg_config(args: argparse.Namespace) -> DisaggConfig | None:
    if args.role not in ("prefill", "decode"):
        return None
    rendezvous = args.rendezvous
    if rendezvous is None and args.scheduler_url is not None:
        rendezvous = str(cluster_info(args.scheduler_url)["rendezvous"])
    if rendezvous is None:
        raise ValueError(f"--role {args.role} needs --scheduler-url URL or --rendezvous HOST:PORT")
    return DisaggConfig(
        rendezvous=rendezvous,
        instance_id=args.instance_id or f"{args.role}-{args.port}",
        host_rendezvous=args.host_rendezvous,
        pd_caching=args.pd_caching,
        transfer_mode=args.transfer_mode,
        transfer_timeout_s=args.transfer_timeout,
        peer_timeout_s=args.peer_timeout,
    )


def engine_config(args: argparse.Namespace, disagg: DisaggConfig | None = None) -> EngineConfig:
    caching = not args.no_prefix_caching
    if disagg is not None:  # the P/D stage decides who keeps KV
        caching = caching and (
            disagg.prefill_keeps if args.role == "prefill" else disagg.decode_keeps
        )
    return EngineConfig(
        model=ModelConfig(
            model=args.model,
            dtype=args.dtype,
            device=args.device,
            seed=args.seed,
            max_model_len=args.max_model_len,
            served_model_name=args.served_model_name,
        ),
        cache=CacheConfig(
            block_size=args.block_size,
            memory_gib=args.kv_cache_memory,
            memory_fraction=args.kv_cache_fraction,
            num_blocks=args.num_kv_blocks,
            enable_prefix_caching=caching,
            dram_gib=args.dram_cache_memory,
            dram_num_blocks=args.num_dram_blocks,
        ),
        scheduler=SchedulerConfig(
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_num_seqs=args.max_num_seqs,
            max_waiting_requests=args.max_waiting_requests,
        ),
        attention_backend=args.attention_backend,
    )


def cluster_info(scheduler_url: str, timeout_s: float = 120.0) -> dict[str, object]:
    """``GET /internal/cluster-info`` of the scheduler, retried until it is up (under torchrun
    the instances may start first)."""
    deadline = time.monotonic() + timeout_s
    url = scheduler_url.rstrip("/") + "/internal/cluster-info"
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                info: dict[str, object] = orjson.loads(r.read())
                return info
        except OSError as e:
            if time.monotonic() > deadline:
                raise ValueError(f"scheduler at {scheduler_url} unreachable: {e}") from e
            time.sleep(0.5)


def apply_layout(args: argparse.Namespace, env: dict[str, str]) -> None:
    """Under torchrun: this rank's role, ports, scheduler address and device from ``--layout``
    and torchrun's environment (RANK, LOCAL_RANK, LOCAL_WORLD_SIZE, WORLD_SIZE, MASTER_ADDR)."""
    roles: list[str] = []
    for part in args.layout.split(","):
        role, _, count = part.partition(":")
        if role not in ROLES or not count.isdigit():
            raise ValueError(f"--layout entries are ROLE:COUNT, got {part!r}")
        roles += [role] * int(count)
    if roles.count("scheduler") != 1 or roles[0] != "scheduler":
        raise ValueError("--layout must start with scheduler:1 (rank 0 hosts the scheduler)")
    rank, world = int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1"))
    if len(roles) != world:
        raise ValueError(f"--layout names {len(roles)} processes, torchrun started {world}")
    local_rank = int(env.get("LOCAL_RANK", "0"))
    master = env.get("MASTER_ADDR", "127.0.0.1")
    base = args.port
    args.role = roles[rank]
    args.scheduler_url = f"http://{master}:{base}"
    args.rendezvous = args.rendezvous or f"{master}:{base + 1}"
    if args.role != "scheduler":
        args.port = base + 2 + local_rank
        args.instance_id = args.instance_id or f"{args.role}-{rank}"
        if args.device == "cuda":
            args.device = f"cuda:{local_rank}"
        elif args.device == "cpu" and args.num_threads is None:
            share = (os.cpu_count() or 1) // max(1, int(env.get("LOCAL_WORLD_SIZE", "1")))
            args.num_threads = max(1, share)


def router_config(args: argparse.Namespace) -> RouterConfig:
    host = args.host if args.host not in ("0.0.0.0", "", "::") else "127.0.0.1"
    return RouterConfig(
        rendezvous=args.rendezvous or f"{host}:{args.port + 1}",
        policy=args.policy,
        tree_ttl_s=args.tree_ttl,
        tree_max_blocks=args.tree_max_blocks,
        cost_profile=args.cost_profile,
        dead_after_s=args.peer_timeout,
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["export-hf"]:
        return _export(build_export_parser().parse_args(argv[1:]))
    if argv[:1] == ["export-gguf"]:
        return _export_gguf(build_export_gguf_parser().parse_args(argv[1:]))
    if argv[:1] == ["profile"]:
        from memserve.scheduler.profile import main as profile_main

        return profile_main(argv[1:])
    if argv[:1] == ["cluster"]:
        from memserve.launch import main as cluster_main

        return cluster_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.layout is not None:
            apply_layout(args, dict(os.environ))
        server = ServerConfig(
            host=args.host, port=args.port, log_format=args.log_format, log_level=args.log_level
        )
        if args.role == "scheduler":
            return _run_scheduler(args, server)
        disagg = disagg_config(args)
        config = engine_config(args, disagg)
    except ValueError as e:
        parser.exit(2, f"memserve-node: {e}\n")
    from memserve.node import run_node

    return run_node(
        config, server, args.num_threads, args.role, disagg, args.scheduler_url, args.instance_id
    )


def _run_scheduler(args: argparse.Namespace, server: ServerConfig) -> int:
    model = engine_config(args).model
    router = router_config(args)
    from memserve.node import run_scheduler

    return run_scheduler(model, args.block_size, router, server)


def _export(args: argparse.Namespace) -> int:
    from memserve.model.loader import export_hf

    try:
        out = export_hf(args.model, args.out_dir, seed=args.seed)
    except ValueError as e:
        print(f"memserve-node export-hf: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.model} to {out}")
    return 0


def _export_gguf(args: argparse.Namespace) -> int:
    from memserve.model.gguf_export import export_gguf

    try:
        out = export_gguf(args.model, args.out_path, seed=args.seed, dtype=args.dtype)
    except (ValueError, ImportError) as e:
        print(f"memserve-node export-gguf: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.model} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
