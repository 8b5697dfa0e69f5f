"""``memserve-bench``: benchmark a running OpenAI-compatible server.

``memserve-bench serve --url URL --workload W ...`` generates the workload (see
``memserve.bench.workloads``), drives the server with it (``client``), prints a summary table in
the shape of vLLM's ``bench serve`` and, with ``--output``, writes a JSON of the arguments, the
summary (at the top level, under vLLM's field names) and every request record. Exit status 0,
or 1 when no measured request completed.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from memserve.bench.client import HISTORY_MODES, BenchmarkClient, ClientConfig, fetch_model
from memserve.bench.matrix import number_or_str
from memserve.bench.matrix_cli import add_matrix_parser, matrix
from memserve.bench.report import (
    RequestRecord,
    Summary,
    format_table,
    parse_slo,
    plot_cdfs,
    plot_vs_rate,
    summarize,
)
from memserve.bench.workloads import WORKLOADS, Workload, make_workload


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        rates = args.rates or [args.rate]
        try:
            params = workload_params(args)
            workloads = [
                make_workload(args.workload, args.num, args.seed, rate, **params) for rate in rates
            ]
        except (TypeError, ValueError) as exc:  # unknown or out-of-range generator parameters
            parser.error(f"{args.workload}: {exc}")
        if args.rates is None:
            return serve(args, workloads[0])
        return sweep(args, rates, workloads)
    if args.command == "matrix":
        return matrix(parser, args)
    raise AssertionError(args.command)  # argparse rejects unknown commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memserve-bench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("serve", help="run one workload against a running server")
    p.add_argument("--url", required=True, help="server address, e.g. http://127.0.0.1:8000")
    p.add_argument("--workload", required=True, choices=sorted(WORKLOADS))
    p.add_argument("--num", type=int, default=100, help="sessions (trace: requests) to generate")
    p.add_argument(
        "--rate",
        type=float,
        default=None,
        help="Poisson session arrivals per second (trace: mean request rate); default: the "
        "workload's",
    )
    p.add_argument(
        "--rates",
        type=_rates,
        default=None,
        help="a sweep instead of --rate, e.g. 0.25,0.5,1: one run per rate (OUTPUT and plot "
        "directory get a -rate<R> suffix) and, with --plot, latency vs rate",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    p.add_argument("--warmup", type=int, default=0, help="first requests left out of the stats")
    p.add_argument("--time-scale", type=float, default=None, help="trace: timestamp multiplier")
    p.add_argument(
        "--token-scale",
        type=int,
        default=None,
        help="trace: divide its 512-token blocks and lengths by this (32: 16-token blocks)",
    )
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a generator parameter, e.g. --param mean_turns=2 (repeatable)",
    )
    p.add_argument(
        "--slo", type=_slo, default=None, help="goodput SLO, e.g. ttft=0.5,tpot=0.05 (s)"
    )
    p.add_argument("--model", default=None, help="model name; default: the first of /v1/models")
    p.add_argument("--output", type=Path, default=None, help="JSON file to write")
    p.add_argument("--plot", type=Path, default=None, help="directory for latency CDF PNGs")
    p.add_argument(
        "--session-header",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="send X-Session-Id",
    )
    p.add_argument(
        "--history",
        choices=HISTORY_MODES,
        default="real",
        help="multi-turn history: the answers the server generated (via return_token_ids), or "
        "fixed stand-ins so every engine sees the same prompts",
    )
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    add_matrix_parser(commands)
    return parser


def workload_params(args: argparse.Namespace) -> dict[str, Any]:
    """Generator keyword arguments from ``--param`` and the trace flags."""
    params: dict[str, Any] = {}
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--param wants KEY=VALUE, got {item!r}")
        params[key.strip()] = number_or_str(value.strip())
    if args.time_scale is not None:
        params["time_scale"] = args.time_scale
    if args.token_scale is not None:
        params["token_scale"] = args.token_scale
    return params


def _rates(text: str) -> list[float]:
    try:
        rates = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"want comma-separated numbers, got {text!r}") from None
    if not rates or min(rates) <= 0:
        raise argparse.ArgumentTypeError("rates must be > 0")
    return rates


def _slo(text: str) -> dict[str, float]:
    try:
        return parse_slo(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def serve(args: argparse.Namespace, workload: Workload) -> int:
    """Run ``workload`` against ``args.url``, report, write the JSON and plots."""
    return 0 if run_once(args, workload)["completed"] else 1


def sweep(args: argparse.Namespace, rates: Sequence[float], workloads: Sequence[Workload]) -> int:
    """One run per rate (each with its own JSON and CDFs), then latency vs rate."""
    summaries = []
    for rate, workload in zip(rates, workloads, strict=True):
        suffix = f"-rate{rate:g}"
        one = argparse.Namespace(**vars(args))
        one.rate = rate
        if args.output is not None:
            one.output = args.output.with_name(args.output.stem + suffix + args.output.suffix)
        if args.plot is not None:
            one.plot = args.plot / f"rate{rate:g}"
        summaries.append(run_once(one, workload, title=f"rate {rate:g}/s"))
    if args.plot is not None:
        try:
            print(f"plot: {plot_vs_rate(rates, summaries, str(args.plot))}")
        except ImportError:
            print("--plot: matplotlib is not installed; no plots written", file=sys.stderr)
    return 0 if all(s["completed"] for s in summaries) else 1


def run_once(
    args: argparse.Namespace, workload: Workload, title: str = "Serving Benchmark Result"
) -> Summary:
    """One run: report, and write the JSON and CDF plots if asked; returns the summary."""
    records, model, num_stand_ins = asyncio.run(_run(args, workload))
    if num_stand_ins and args.history == "real":
        print(
            f"history: {num_stand_ins} answers replaced by stand-ins (failed turns, or a "
            "server that does not return token ids)",
            file=sys.stderr,
        )
    summary = summarize(records, args.slo)
    print(format_table(summary, title))
    if args.output is not None:
        result = {
            "date": time.strftime("%Y%m%d-%H%M%S"),
            "backend": "memserve-bench",
            "model_id": model,
            "workload": workload.name,
            "num_prompts": workload.num_requests,
            "num_sessions": len(workload.sessions),
            "request_rate": args.rate,
            "max_concurrency": args.max_concurrency,
            "num_stand_in_answers": num_stand_ins if args.history == "real" else None,
            **summary,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "requests": [dataclasses.asdict(r) for r in records],
        }
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=1))
    if args.plot is not None:
        _plot(records, args.plot)
    return summary


async def _run(
    args: argparse.Namespace, workload: Workload
) -> tuple[list[RequestRecord], str, int]:
    """The records, the model name, and how many ``real`` history answers fell back to stand-ins."""
    url = args.url.rstrip("/")
    try:
        model = args.model or await fetch_model(url)
    except (aiohttp.ClientError, KeyError, IndexError) as exc:
        raise SystemExit(
            f"memserve-bench: cannot list the models of {url}: {type(exc).__name__}: {exc}"
        ) from exc
    config = ClientConfig(
        url=url,
        model=model,
        max_concurrency=args.max_concurrency,
        warmup=args.warmup,
        session_header=args.session_header,
        request_timeout_s=args.request_timeout,
        progress=not args.quiet,
        history=args.history,
    )
    client = BenchmarkClient(workload, config)
    records = await client.run()
    return records, model, client.num_stand_in_answers


def _plot(records: Sequence[RequestRecord], out_dir: Path) -> None:
    try:
        paths = plot_cdfs(records, str(out_dir))
    except ImportError:
        print("--plot: matplotlib is not installed; no plots written", file=sys.stderr)
        return
    print(f"plots: {', '.join(paths)}")


if __name__ == "__main__":
    sys.exit(main())
