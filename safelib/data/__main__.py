"""``python -m safelib.data [--root DIR] [--verbose]``: the registry, present or missing, and how to get each."""
from __future__ import annotations

import argparse

from . import data_root, dataset_spec, list_datasets


def registry_table(root: str | None = None, verbose: bool = False) -> str:
    """One line per dataset (name, kind, present/missing, where); with ``verbose``, how to get the missing."""
    lines = [f"data root: {data_root(root).resolve()}  (--root, else $SAFELIB_DATA, else ./data)", ""]
    names = list_datasets()
    width = max(len(n) for n in names) + 1
    lines.append(f"{'name':<{width}} {'kind':<13} {'status':<8} where")
    for name in names:
        spec = dataset_spec(name)
        missing = spec.missing_files(root)
        where = str(spec.dataset_dir(root)) if spec.folder else (
            "(generated in memory)" if spec.kind == "generated" else "(installed Python package)")
        lines.append(f"{name:<{width}} {spec.kind:<13} {'missing' if missing else 'present':<8} {where}")
        if missing and verbose:
            lines += [f"    missing: {m}" for m in missing]
            lines += ["    " + h for h in spec.how_to_get.strip().splitlines()]
    if not verbose:
        lines += ["", "--verbose says what is missing and how to get it."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m safelib.data", description=__doc__)
    parser.add_argument("--root", default=None, help="data root (default: $SAFELIB_DATA, else ./data)")
    parser.add_argument("--verbose", "-v", action="store_true", help="say how to get each missing dataset")
    args = parser.parse_args(argv)
    print(registry_table(args.root, args.verbose))


if __name__ == "__main__":
    main()
