"""``memserve-bench matrix``: its arguments and its command (see ``memserve.bench.matrix``)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from memserve.bench import matrix as matrix_module
from memserve.bench.matrix import (
    CONFIGS,
    POLICIES,
    Cell,
    MatrixSettings,
    WorkloadSpec,
    run_matrix,
)
from memserve.bench.matrix_report import matrix_tables, plot_matrix


def add_matrix_parser(commands: Any) -> None:
    p = commands.add_parser(
        "matrix",
        help="start each configuration in turn at equal resources and run the same workloads",
        description=matrix_module.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--workload",
        action="append",
        default=[],
        metavar="NAME[:k=v,...]",
        help="a workload and its settings, e.g. sharegpt:num=40,rate=0.5,mean_turns=3 "
        "(num, rate, seed, warmup, or a generator parameter); repeatable",
    )
    p.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help=f"comma-separated, from {', '.join(CONFIGS)}",
    )
    p.add_argument("--policies", default=",".join(POLICIES), help="comma-separated policies")
    p.add_argument("--instances", type=int, default=2, help="instances per configuration")
    p.add_argument("--model", default="dummy:small", help="--model of every node")
    p.add_argument(
        "--node-args", default="", help="extra flags for every process, e.g. '--dtype float32'"
    )
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--output-dir", type=Path, default=Path("matrix-results"))
    p.add_argument("--plot", action="store_true", help="bar charts in OUTPUT_DIR/plots")
    p.add_argument(
        "--from-json",
        type=Path,
        default=None,
        help="render the tables (and plots) of an earlier matrix.json; runs nothing",
    )
    p.add_argument("--quiet", action="store_true", help="no progress line")


def matrix(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``memserve-bench matrix``: run (or re-render) the matrix, print and write the tables."""
    if args.from_json is not None:
        body = json.loads(args.from_json.read_text())
        cells = [Cell.from_json(c) for c in body["cells"]]
        out_dir = args.from_json.parent
    else:
        try:
            specs = [WorkloadSpec.parse(w) for w in args.workload]
            configs = [CONFIGS[name] for name in _names(args.configs, CONFIGS)]
            policies = _names(args.policies, POLICIES)
            for spec in specs:
                spec.make()  # bad generator parameters fail now, not after an hour
        except (TypeError, ValueError, KeyError) as exc:
            parser.error(f"matrix: {exc}")
        if not specs:
            parser.error("matrix: give at least one --workload (or --from-json)")
        out_dir = args.output_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        settings = MatrixSettings(
            model=args.model,
            instances=args.instances,
            output_dir=out_dir,
            node_args=tuple(shlex.split(args.node_args)),
            max_concurrency=args.max_concurrency,
            progress=not args.quiet,
        )
        cells = run_matrix(specs, configs, policies, settings)
    text = matrix_tables(cells)
    (out_dir / "matrix.md").write_text(text)
    print(text)
    if args.plot:
        try:
            print("plots: " + ", ".join(plot_matrix(cells, str(out_dir / "plots"))))
        except ImportError:
            print("--plot: matplotlib is not installed; no plots written", file=sys.stderr)
    return 0 if all(c.summary["completed"] for c in cells) else 1


def _names(text: str, known: Sequence[str] | dict[str, Any]) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(f"unknown or no names {unknown}; choose from {', '.join(known)}")
    return names
