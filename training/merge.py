"""`python -m training.merge A.safetensors B.safetensors --out X.safetensors [--weights 1,1] [--rank R]`.

Merges kohya LoRAs into one: exactly (ranks concatenated) or with an SVD re-rank. The logic is
training/lora_files/merge.py.
"""
from __future__ import annotations

import argparse
import json
import sys


def input_problems(args) -> list[str]:
    """Every bad argument, checked before anything is read or written (headers only: nothing is unpickled)."""
    from training.lora_files.kohya import kohya_file_problem

    problems = [why for p in args.loras if (why := kohya_file_problem(p))]
    if args.weights is not None:
        try:
            if len([float(w) for w in args.weights.split(",")]) != len(args.loras):
                problems.append(f"--weights: {args.weights!r} has not one weight per input ({len(args.loras)})")
        except ValueError:
            problems.append(f"--weights: expected comma-separated numbers, got {args.weights!r}")
    if args.rank is not None and args.rank < 1:
        problems.append(f"--rank: must be >= 1, got {args.rank}")
    if not args.out.endswith(".safetensors"):
        problems.append(f"--out: expected a .safetensors path, got {args.out!r}")
    return problems


def main(argv=None):
    from training.errors import USER_ERRORS
    from training.lora_files.merge import merge_files

    ap = argparse.ArgumentParser(prog="python -m training.merge", description=__doc__.split("\n\n")[1])
    ap.add_argument("loras", nargs="+", help="kohya LoRA .safetensors files to merge")
    ap.add_argument("--out", required=True, help="output .safetensors path")
    ap.add_argument("--weights", default=None, help="comma-separated weight per input, e.g. 1,0.5")
    ap.add_argument("--rank", type=int, default=None, help="SVD re-rank every module to this rank")
    args = ap.parse_args(argv)
    problems = input_problems(args)
    if problems:
        print("error: " + "\n       ".join(problems), file=sys.stderr)
        sys.exit(2)  # a usage error, as argparse's own
    weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    try:
        report = merge_files(args.loras, args.out, weights, args.rank)
    except USER_ERRORS + (ValueError,) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    errors = report.pop("svd_module_rel_errors", None)
    if errors:
        worst = sorted(errors.items(), key=lambda kv: -kv[1])[:5]
        report["svd_worst_modules"] = {k: round(v, 6) for k, v in worst}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
