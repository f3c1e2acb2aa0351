"""Full-size training-step benchmark: the trainer's TSCD, feedback (ReFL) and DMD stages on real-architecture
SD1.5 (UNet 860M parameters) and SDXL (UNet 2.6B) networks with random weights, LoRA rank 64 and the
shipped configs' settings (training/configs/sd15.yaml, sdxl.yaml), beside diffusers' LCM-LoRA recipe step
on the same UNet; step time and peak memory of each, an explicit memory model checked against the
measurements and projected to 24 GB / 80 GB GPUs (benchmarks/full_size_memory.py).

    python -m benchmarks.full_size                      # the CPU plan (about an hour on 1 thread)
    python -m benchmarks.full_size --memory             # one exact-memory step per configuration (~40 min)
    python -m benchmarks.full_size --only 'sd15-256px'  # the configurations whose name matches
    python -m benchmarks.full_size --device cuda        # the GPU plan: 512 px SD1.5, 1024 px SDXL (ran on an H200)
    python -m benchmarks.full_size --report             # rebuild the JSON summary + Markdown from the runs

Nothing is downloaded. Each configuration runs in a fresh process (benchmarks/full_size_step.py) with
large allocations mmap-ed, so its sampled peak RSS is its own; results are appended to
`<out>.runs.json` as they finish, so an interrupted plan resumes where it stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from benchmarks.report import RESULTS, log, machine_info, write_atomic_text

ROOT = Path(__file__).resolve().parent.parent
OURS = ["tscd", "feedback", "dmd_fake", "dmd_gen"]


def spec(family, px, mode, ckpt, variant, batch=1, steps=2, warmup=1, lean=False):
    """lean: the stage's own LoRA group only (full_size_step.attach_ours), for SDXL on a 23 GB machine."""
    name = f"{family}-{px}px-b{batch}-{mode}-{'ckpt' if ckpt else 'nockpt'}-{variant}" + ("-lean" if lean else "")
    return {"name": name, "family": family, "px": px, "latent": px // 8, "batch": batch, "mode": mode,
            "checkpointing": ckpt, "variant": variant, "steps": steps, "warmup": warmup, "lean": lean}


def cpu_plan() -> list[dict]:
    """Cheap first; sized for about 100 minutes on a shared 2-core machine. fp32 = fp32 weights; amp =
    fp32 weights + bf16 autocast (the shipped configs as the trainer runs them); bf16 = bf16 weights +
    autocast (the diffusers recipe's mixed precision, and the activations a GPU run keeps). SD1.5 at
    256 px (512 px in bf16), SDXL in bf16 at 256 / 512 px (its fp32 UNet alone is 10.3 GB; 1024 px is
    projected)."""
    plan = [spec("sd15", 256, "fp32", c, v) for c in [True, False] for v in ["tscd", "lcm"]]
    plan += [spec("sd15", 256, "bf16", True, v, steps=1 if v == "dmd_gen" else 2) for v in ["tscd", "lcm", *OURS[1:]]]
    plan += [spec("sd15", 256, "amp", True, "tscd"), spec("sd15", 256, "fp32", True, "tscd", batch=2)]
    plan += [spec("sd15", 512, "bf16", c, v, steps=1) for c, v in [(True, "tscd"), (True, "lcm"), (False, "tscd")]]
    plan += [spec("sdxl", 256, "bf16", c, v) for c, v in [(True, "tscd"), (True, "lcm"), (False, "tscd")]]
    plan += [spec("sdxl", 512, "bf16", True, v, steps=1) for v in ["tscd", "lcm"]]
    # SDXL's later stages with all four adapters, AdamW states and the EMA would pass 14 GB here: lean
    plan += [spec("sdxl", 512, "bf16", True, v, steps=1, lean=True) for v in ["dmd_fake", "feedback"]]
    # about 27 UNet passes a step: one step, no warm-up (its first step also allocates the AdamW state)
    plan += [spec("sdxl", 512, "bf16", True, "dmd_gen", steps=1, warmup=0, lean=True)]
    return plan


def memory_plan() -> list[dict]:
    """One step each under full_size_step.TensorPeak (exact transient bytes): the bf16 configurations (what
    the GPU projection uses) and the product's amp, at two sizes where the fit needs them."""
    def mem(*a, **k):
        s = spec(*a, **k, steps=0, warmup=0)
        return dict(s, name=s["name"] + "-mem", track=True)
    plan = [mem("sd15", 256, "bf16", c, v) for c in [True, False] for v in ["tscd", "lcm"]]
    plan += [mem("sd15", 256, "bf16", True, v) for v in OURS[1:]] + [mem("sd15", 256, "amp", True, "tscd")]
    plan += [mem("sd15", 512, "bf16", c, v) for c in [True, False] for v in ["tscd", "lcm"]]
    plan += [mem("sdxl", 256, "bf16", c, "tscd") for c in [True, False]] + [mem("sdxl", 256, "bf16", True, "lcm")]
    plan += [mem("sdxl", 512, "bf16", True, v) for v in ["tscd", "lcm"]] + [mem("sdxl", 512, "bf16", False, "tscd")]
    plan += [mem("sdxl", 512, "bf16", True, v, lean=True) for v in ["dmd_fake", "feedback", "dmd_gen"]]
    return plan


def gpu_plan() -> list[dict]:
    """Native resolutions, every variant, the trainer's mixed precision (amp) and bf16 weights."""
    plan = [dict(spec(f, px, m, c, v, steps=3, warmup=2), track=False) for f, px in [("sd15", 512), ("sdxl", 1024)]
            for m in ["amp", "bf16"] for c in [True, False] for v in ["tscd", "lcm", *OURS[1:]]]
    # the per-sample slope: a larger micro-batch of TSCD as shipped
    return plan + [dict(spec(f, px, "amp", True, "tscd", batch=b, steps=3, warmup=2), track=False)
                   for f, px, b in [("sd15", 512, 8), ("sdxl", 1024, 4)]]


def run_child(s: dict, threads: int) -> dict:
    """One configuration in a fresh process; a crash (or the RSS guard) is recorded, not raised."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               MALLOC_MMAP_THRESHOLD_="262144")  # big blocks mmap-ed: freed memory leaves RSS at once
    out = subprocess.run([sys.executable, "-m", "benchmarks.full_size", "--_child", json.dumps(s)], cwd=ROOT,
                         env=env, capture_output=True, text=True)
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines or not lines[-1].startswith("{"):
        return {**s, "error": f"exit {out.returncode}: {(out.stdout + out.stderr).strip()[-1500:]}"}
    return json.loads(lines[-1])


def child_main(s: dict, threads: int):
    import torch

    from benchmarks.full_size_step import run_config

    torch.set_num_threads(threads)
    print(json.dumps(run_config(s)), flush=True)


def run_plan(plan, runs_path: Path, args) -> dict:
    runs = json.loads(runs_path.read_text()) if runs_path.exists() else {"machine": None, "runs": {}}
    runs["machine"] = runs["machine"] or machine_description(args.device)
    for s in plan:
        if args.only and not re.search(args.only, s["name"]):
            continue
        if s["name"] in runs["runs"] and "error" not in runs["runs"][s["name"]] and not args.again:
            continue
        s.update(device=args.device, rss_limit_gb=args.rss_limit_gb)
        log(f"{s['name']}: {s['warmup']} warm-up + {s['steps']} timed steps")
        r = run_child(s, args.threads)
        runs["runs"][s["name"]] = r
        log(r.get("error") or progress_line(r))
        write_atomic_text(runs_path, json.dumps(runs, indent=1))
    return runs


def progress_line(r: dict) -> str:
    if r.get("tracked_bytes"):
        return f"  tracked step transient {r['tracked_bytes']['peak'] / 2**30:.2f} GB"
    return (f"  step {min(r['step_s']):.1f} s (cpu {min(r['step_cpu_s']):.1f} s), peak "
            f"{max(p['peak'] for p in r['steps_bytes']) / 2**30:.2f} GB")


def machine_description(device: str) -> dict:
    info = machine_info()
    with open("/proc/meminfo") as f:
        info["ram_gb"] = round(int(f.readline().split()[1]) / 2**20, 1)
    info["load_average_start"] = os.getloadavg()
    if device == "cuda":
        import torch

        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--only", help="run only the configurations whose name matches this regex")
    ap.add_argument("--again", action="store_true", help="re-run configurations that already have results")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per configuration (CPU)")
    ap.add_argument("--rss-limit-gb", type=float, default=14.0, help="a configuration that passes it is stopped")
    ap.add_argument("--out", default=None, help="results stem (default benchmarks/results/full_size[_cuda])")
    ap.add_argument("--memory", action="store_true", help="the tracked-memory plan (one exact-memory step each)")
    ap.add_argument("--report", action="store_true", help="only rebuild the summary from the recorded runs")
    ap.add_argument("--_child", dest="child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child_main(json.loads(args.child), args.threads)
    stem = Path(args.out) if args.out else RESULTS / ("full_size_cuda" if args.device == "cuda" else "full_size")
    runs_path = stem.with_name(stem.name + ".runs.json")
    if not args.report:
        plan = gpu_plan() if args.device == "cuda" else memory_plan() if args.memory else cpu_plan()
        run_plan(plan, runs_path, args)
    from benchmarks.full_size_memory import write_summary

    cpu = RESULTS / "full_size.json" if args.device == "cuda" else None  # the CPU-fitted model, to check
    write_summary(json.loads(runs_path.read_text()), stem, cpu)


if __name__ == "__main__":
    main()
