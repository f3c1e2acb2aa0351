"""`python -m training.merge A.safetensors B.safetensors --out X.safetensors [--weights 1,1] [--rank R]`.

Merges kohya LoRAs into one: exactly (ranks concatenated) or with an SVD re-rank. The logic is
training/lora_files/merge.py.
"""
from __future__ import annotations

import argparse
import json


def main(argv=None):
    from training.lora_files.merge import merge_files

    ap = argparse.ArgumentParser(prog="python -m training.merge", description=__doc__.split("\n\n")[1])
    ap.add_argument("loras", nargs="+", help="kohya LoRA .safetensors files to merge")
    ap.add_argument("--out", required=True, help="output .safetensors path")
    ap.add_argument("--weights", default=None, help="comma-separated weight per input, e.g. 1,0.5")
    ap.add_argument("--rank", type=int, default=None, help="SVD re-rank every module to this rank")
    args = ap.parse_args(argv)
    weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    report = merge_files(args.loras, args.out, weights, args.rank)
    errors = report.pop("svd_module_rel_errors", None)
    if errors:
        worst = sorted(errors.items(), key=lambda kv: -kv[1])[:5]
        report["svd_worst_modules"] = {k: round(v, 6) for k, v in worst}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
