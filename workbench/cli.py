"""The command line: ``workbench tour`` (the headless main job: the headline study on the shipped zoo,
written as one HTML page; see ``workbench.experiments.tour``) and ``workbench reproduce EXPERIMENT
[--budget quick|paper] [--out DIR]`` (one of the paper's experiments on the zoo, resumable, written as
JSON plus a generated page)."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _log_to_stderr(quiet: bool) -> None:
    """Progress lines, ``[  12.3s] message``, for the workbench loggers (the library itself never
    configures logging)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_seconds)
    handler.setFormatter(logging.Formatter("[%(seconds)6.1fs] %(message)s"))
    logger = logging.getLogger("workbench")
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)


def _seconds(record: logging.LogRecord) -> bool:
    record.seconds = record.relativeCreated / 1000  # since the program started
    return True


def tour(out: Path, seed: int = 0, progress: bool = True) -> Path:
    """Run the tour (``workbench.experiments.tour``) and write ``out/index.html`` and ``out/summary.json``."""
    from .experiments.tour import tour as run

    return run(out, seed=seed, progress=progress)


def _positive_int(text: str) -> int:
    """``--threads``: a whole number ≥ 1 (torch refuses 0 and negatives with its own traceback)."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ 1, got {text!r}")
    return n


def main(argv=None) -> int:
    """The command line; a workbench error (a bad ``--part``, an unwritable ``--out``) is one line of our own text
    on stderr and exit status 2, as argparse answers a bad argument, not a traceback."""
    parser = argparse.ArgumentParser(prog="workbench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("tour", help="run the headless tour and write an HTML report")
    p.add_argument("--out", type=Path, default=Path("report"), help="folder for the report (default: report/)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress output")
    from .experiments import BUDGETS, EXPERIMENTS

    r = sub.add_parser("reproduce", help="run one of the paper's experiments on the zoo (resumable) and write its "
                                         "JSON and page")
    r.add_argument("experiment", choices=EXPERIMENTS)
    r.add_argument("--budget", choices=BUDGETS, default="quick",
                   help="quick (seconds to minutes, the default), paper (the paper's protocol at CPU scale: hours) or smoke")
    r.add_argument("--out", type=Path, default=None,
                   help="folder for <experiment>.json/.md (default: docs/results for paper, report/reproduce-<budget> else)")
    r.add_argument("--runs", type=Path, default=None, help="folder of the per-run records (default: <out>/.runs)")
    r.add_argument("--part", default=None, help="'i/n': run every n-th job from the i-th (n processes share one experiment)")
    r.add_argument("--threads", type=_positive_int, default=None, help="torch threads (default: torch's own choice)")
    r.add_argument("--report-only", action="store_true", help="run nothing; write the JSON and page from finished runs")
    r.add_argument("--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    _log_to_stderr(args.quiet)
    from ._errors import WorkbenchError

    try:
        return _run(args)
    except WorkbenchError as exc:
        print(f"workbench {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _run(args) -> int:
    if args.command == "tour":
        tour(args.out, seed=args.seed, progress=not args.quiet)
    elif args.command == "reproduce":
        import torch

        from .experiments import reproduce

        if args.threads:
            torch.set_num_threads(args.threads)
        path = reproduce(args.experiment, args.budget, args.out, runs=args.runs, part=args.part,
                         progress=not args.quiet, report_only=args.report_only,
                         log=(lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True)))
        return 0 if path is not None or args.part else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
