"""`posttrain report RUN_DIR`: a run or pipeline directory → report.html (self-contained) and report.md.

Python: `from posttrain.report import build_report; build_report(run_dir) -> Path`. This module stays light
because the CLI imports it to build its parser; the builder is imported when used.
"""

from __future__ import annotations

from pathlib import Path


def build_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write report.html, report.md and its PNGs into `out_dir` (default: `run_dir`); return report.html's path."""
    from posttrain.report.build import build_report as build

    return build(run_dir, out_dir)


def run_report(args) -> int:
    path = build_report(args.run_dir, args.out)
    print(path)
    return 0


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", help="a run directory (config.yaml, metrics.jsonl) or a pipeline directory "
                                        "(one run directory per stage, pipeline_summary.json)")
    parser.add_argument("--out", help="where to write report.html, report.md and the PNGs (default: RUN_DIR)")
    parser.set_defaults(func=run_report)
