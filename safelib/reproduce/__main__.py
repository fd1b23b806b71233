"""``python -m safelib.reproduce GRID.yaml --out DIR``: every case of a grid, one papermill execution each.

    python -m safelib.reproduce notebooks/grids/miniworld.yaml --out results-tmp           # all cases
    python -m safelib.reproduce notebooks/grids/paper-rn50.yaml --out /scratch/rn50 --shard 3/40
    python -m safelib.reproduce notebooks/grids/paper-rn50.yaml --out x --dry-run           # list them

Rerunning the same command resumes: finished cases are skipped, cases killed mid-run are rerun
from scratch, failed cases are skipped unless ``--retry-failed``. The exit code is 0 only when
every selected case has finished (1 if any failed, 2 for a bad grid or command line).
"""
from __future__ import annotations

import argparse
import fnmatch
import sys
import tempfile
import time

from tqdm.auto import tqdm

from .case import Case
from .execute import FAILED, FINISHED, Layout, ensure_kernel, is_finished, read_status, run_case
from .grid import GridError, load_grid
from .report import TABLE_CSV, TABLE_MD, record_invocation, write_tables


def shard_of(cases: list[Case], index: int, count: int) -> list[Case]:
    """Shard ``index`` of ``count`` (1-based): every ``count``-th case of the cases sorted by key."""
    ordered = sorted(cases, key=lambda c: c.key)
    return [case for i, case in enumerate(ordered) if i % count == index - 1]


def parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard takes I/N with integers, e.g. 3/8; got {text!r}") from None
    if not 1 <= index <= count:
        raise argparse.ArgumentTypeError(f"--shard {text}: I must be between 1 and N")
    return index, count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m safelib.reproduce", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grid", help="a grid file, e.g. notebooks/grids/smoke.yaml")
    parser.add_argument("--out", required=True, help="results folder (records/, notebooks/, status/, cache/)")
    parser.add_argument("--shard", type=parse_shard, default=(1, 1), metavar="I/N",
                        help="run shard I of N (1-based): a deterministic, disjoint 1/N of the cases")
    parser.add_argument("--dry-run", action="store_true", help="list the cases (and their state) and stop")
    parser.add_argument("--only", metavar="PATTERN", help="only cases whose <notebook>/<case id> matches this glob")
    parser.add_argument("--retry-failed", action="store_true", help="rerun cases that failed before")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)

    try:
        grid = load_grid(args.grid)
    except GridError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    cases = list(grid.cases)
    if args.only:
        cases = [c for c in cases if fnmatch.fnmatch(c.key, args.only) or fnmatch.fnmatch(c.id, args.only)]
    index, count = args.shard
    selected = shard_of(cases, index, count)
    layout = Layout(args.out)

    if args.dry_run:
        for case in selected:
            status = read_status(layout, case)
            state = "finished" if is_finished(layout, case) else (status or {}).get("status", "to run")
            print(f"{case.key}  [{state}]  {_short(case.parameters)}")
        print(f"{len(selected)} case(s) in shard {index}/{count} of {len(grid.cases)} in {args.grid}"
              + (f" ({len(cases)} matching --only)" if args.only else ""))
        return 0

    start = time.perf_counter()
    outcomes: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="safelib-kernel-") as prefix:
        ensure_kernel(prefix)
        if selected:
            record_invocation(layout.records, args.shard, argv)
        bar = tqdm(selected, desc=f"shard {index}/{count}", unit="case", file=sys.stderr)
        for case in bar:
            bar.set_postfix_str(case.key, refresh=True)
            outcome = run_case(grid, case, layout, retry_failed=args.retry_failed)
            outcomes.setdefault(outcome, []).append(case.key)
        bar.close()

    summary = write_tables(layout.root)
    if not summary.empty:
        print(summary.to_string())
    counts = ", ".join(f"{len(v)} {k}" for k, v in sorted(outcomes.items()))
    print(f"\n{len(selected)} case(s) in shard {index}/{count}: {counts or 'none'}; "
          f"wall time {time.perf_counter() - start:.1f} s")
    print(f"records under {layout.records}; table in {layout.root / TABLE_CSV} and {layout.root / TABLE_MD}")
    failed = outcomes.get(FAILED, []) + outcomes.get("skipped-failed", [])
    for key in failed:
        case = next(c for c in selected if c.key == key)
        error = (read_status(layout, case) or {}).get("error") or {}
        print(f"FAILED {key}: {error.get('ename')}: {error.get('evalue')} (status: {layout.status(case)})",
              file=sys.stderr)
    if failed:
        print(f"{len(failed)} case(s) failed; rerun with --retry-failed after fixing them", file=sys.stderr)
        return 1
    busy = outcomes.get("busy", [])
    if busy:
        print(f"{len(busy)} case(s) were being run by another process (another shard); not waited for")
    return 0 if all(o in (FINISHED, "skipped", "busy") for o in outcomes) else 1


def _short(parameters: dict) -> str:
    text = ", ".join(f"{k}={v}" for k, v in parameters.items())
    return text if len(text) < 120 else text[:117] + "..."


if __name__ == "__main__":
    sys.exit(main())
