"""The quality benchmark's claims over the seeds of several runs (``python -m benchmarks.pool FILE...``).

Each `quality_<tag>.json` holds the rows of one run (one seed set). Runs of the same task, teacher and
stage budgets but different seeds (`--seeds`) can be pooled: the claims are then tested seed for seed
over every seed that has both rows of a comparison, exactly as one run with all those seeds would.
Prints the claims table (Markdown); exit code 2 if a file is missing, is not a quality result, or the
runs differ in anything but their seeds and rows.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks import claims, plans
from benchmarks.quality_report import claims_section

# config keys that may differ between pooled runs; every other key (task, teacher, budgets) must agree
PER_RUN = ("seeds", "rows")


class PoolError(ValueError):
    pass


def load_result(path: Path) -> dict:
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PoolError(f"{path}: cannot read a quality result ({e})") from None
    if not isinstance(result, dict) or result.get("benchmark") != "quality" or "rows" not in result:
        raise PoolError(f"{path}: not a quality benchmark result (expected benchmarks/quality.py's JSON)")
    return result


def pooled_rows(results: dict) -> list:
    """Student rows of every run (teacher rows once); checks the runs are poolable."""
    (first, ref), rows, seen = next(iter(results.items())), [], {}
    shared = {k: v for k, v in ref["config"].items() if k not in PER_RUN}
    for path, result in results.items():
        config = {k: v for k, v in result["config"].items() if k not in PER_RUN}
        differ = sorted(k for k in set(config) | set(shared) if config.get(k) != shared.get(k))
        if differ:
            raise PoolError(f"{path}: config differs from {first} in {differ}; only seeds and rows may differ")
        for r in result["rows"]:
            if r["seed"] is None:
                rows += [r] if path == first else []
                continue
            key = (r["row"], r["seed"], r["steps"], r["eta"])
            if key in seen:
                raise PoolError(f"{path}: row {r['row']!r} seed {r['seed']} is also in {seen[key]}; pool disjoint seeds")
            seen[key] = path
            rows.append(r)
    return rows


def pool(paths: list[Path]) -> dict:
    results = {str(p): load_result(p) for p in paths}
    rows = pooled_rows(results)
    names = plans.claim_names()
    steps = tuple(next(iter(results.values()))["config"].get("steps", claims.STEPS))
    seeds = sorted({r["seed"] for r in rows if r["seed"] is not None})
    return {"files": list(results), "seeds": seeds, "claims": claims.all_claims(rows, names, steps)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path, help="quality_<tag>.json files of runs with disjoint seeds")
    args = ap.parse_args(argv)
    try:
        pooled = pool(args.files)
    except PoolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"Pooled seeds {pooled['seeds']} from {', '.join(pooled['files'])}\n")
    print(claims_section(pooled))
    return 0


if __name__ == "__main__":
    sys.exit(main())
