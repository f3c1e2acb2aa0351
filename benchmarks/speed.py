"""Performance benchmarks against references measured in the same run (``python -m benchmarks.speed``).

1. sampler math per step with a zero-cost identity denoiser: ours (``schedulers.sample_tcd``) vs
   diffusers ``TCDScheduler.step`` vs the peer ComfyUI-TCD pack's loop (``peer_tcd``);
2. whole sampling vs the sum of the UNet calls alone (the floor), ours and a diffusers-style loop;
3. one training step vs a diffusers train_lcm_distill_lora_sd.py-style LCM-LoRA step, and vs the
   sum of each step's UNet passes alone; peak RSS of each in a fresh subprocess (``speed_train.py``);
4. import time outside ComfyUI (``import schedulers``) and inside it (ComfyUI's import-times line).

Every figure is the median of repeats; ratios compare numbers from the same process and run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.peer_tcd import peer_abar_s, peer_sample_tcd
from benchmarks.report import machine_info, write_atomic_text
from benchmarks.speed_train import train_one, training_step
from schedulers import DiscreteDenoiser, sample_tcd, scaled_linear_alphas_cumprod, tcd_sigmas

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_medians(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """Median time of each fn, timed round-robin (one call of each per round, order rotated every
    round) so that load changes on a shared machine hit every variant alike."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times = {n: [] for n in names}
    for i in range(repeats):
        order = names[i % len(names):] + names[:i % len(names)]
        for n in order:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return {n: (statistics.median(v), min(v)) for n, v in times.items()}


def allocated_bytes(fn) -> int:
    """Bytes torch allocated on CPU while fn ran (sum of allocations, i.e. temporaries), via the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return int(sum(max(e.self_cpu_memory_usage, 0) for e in prof.key_averages()))


# --- 1. sampler math ----------------------------------------------------------------------------

def sampler_math(shape, steps=8, eta=0.3, repeats=20):
    from diffusers import TCDScheduler

    abar = scaled_linear_alphas_cumprod()
    x = torch.randn(shape)
    identity = lambda x, sigma, **kw: x  # noqa: E731  zero-cost denoiser (returns its input as x0)

    def ours():
        sigmas = tcd_sigmas(steps).float()
        return sample_tcd(identity, x * sigmas[0], sigmas, disable=True, eta=eta)

    sched = TCDScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

    def diffusers_loop():
        sched.set_timesteps(steps)
        sample = x
        for t in sched.timesteps:
            sample = sched.step(sample, t, sample, eta=eta, return_dict=False)[0]  # model output = input
        return sample

    def peer():
        sigmas = tcd_sigmas(steps).float()
        abar_s = peer_abar_s(sigmas, eta, abar)
        return peer_sample_tcd(identity, x * sigmas[0], sigmas, abar_s, eta, lambda: torch.randn_like(x))

    def ours_no_finite_check():
        """Diagnostic: ours with the per-step NaN/inf guard (``_check_finite``) stubbed out."""
        import schedulers.tcd as tcd_mod

        saved, tcd_mod._check_finite = tcd_mod._check_finite, lambda *a: None
        try:
            return ours()
        finally:
            tcd_mod._check_finite = saved

    row = {"shape": list(shape), "steps": steps, "eta": eta, "repeats": repeats, "timing": "interleaved round-robin"}
    fns = {"ours": ours, "diffusers": diffusers_loop, "peer_comfyui_tcd": peer, "ours_no_finite_check": ours_no_finite_check}
    for name, (sec, best) in interleaved_medians(fns, repeats).items():
        row[f"{name}_us_per_step"] = sec / steps * 1e6
        row[f"{name}_min_us_per_step"] = best / steps * 1e6
    row["ours_vs_diffusers_min"] = row["ours_min_us_per_step"] / row["diffusers_min_us_per_step"]
    row["ours_vs_peer_min"] = row["ours_min_us_per_step"] / row["peer_comfyui_tcd_min_us_per_step"]
    row["finite_check_share_of_ours"] = 1 - row["ours_no_finite_check_us_per_step"] / row["ours_us_per_step"]
    for name, fn in (item for item in fns.items() if item[0] != "ours_no_finite_check"):
        row[f"{name}_alloc_bytes_per_step"] = allocated_bytes(fn) // steps
    row["ours_vs_diffusers"] = row["ours_us_per_step"] / row["diffusers_us_per_step"]
    row["ours_vs_peer"] = row["ours_us_per_step"] / row["peer_comfyui_tcd_us_per_step"]
    return row


# --- 2. whole sampling vs model floor ------------------------------------------------------------

def small_unet(sample_size):
    from training.models.tiny import tiny_unet

    return tiny_unet(sample_size=sample_size).eval()


class TimedUNet:
    """Calls the UNet and accumulates the time spent inside it."""

    def __init__(self, unet):
        self.unet, self.seconds = unet, 0.0

    def __call__(self, *args, **kw):
        t0 = time.perf_counter()
        out = self.unet(*args, **kw)
        self.seconds += time.perf_counter() - t0
        return out


@torch.no_grad()
def sampling_vs_floor(size=32, steps=4, eta=0.3, repeats=5):
    from diffusers import TCDScheduler

    unet = small_unet(size)
    x = torch.randn(1, 4, size, size)
    ehs = torch.randn(1, 77, 32)
    timed = TimedUNet(unet)
    model = DiscreteDenoiser(lambda xv, t, ehs: timed(xv, t, ehs).sample)

    def ours():
        sigmas = tcd_sigmas(steps).float()
        return sample_tcd(model, x * (1 + sigmas[0] ** 2).sqrt(), sigmas, extra_args={"ehs": ehs}, disable=True, eta=eta)

    sched = TCDScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

    def diffusers_loop():
        sched.set_timesteps(steps)
        sample = x
        for t in sched.timesteps:
            eps = timed(sched.scale_model_input(sample, t), t, ehs).sample
            sample = sched.step(eps, t, sample, eta=eta, return_dict=False)[0]
        return sample

    row = {"latent": [1, 4, size, size], "steps": steps}
    for name, fn in (("ours", ours), ("diffusers", diffusers_loop)):
        totals, floors = [], []
        fn()
        for _ in range(repeats):
            timed.seconds = 0.0
            t0 = time.perf_counter()
            fn()
            totals.append(time.perf_counter() - t0)
            floors.append(timed.seconds)
        total, floor = statistics.median(totals), statistics.median(floors)
        row[f"{name}_total_ms"] = total * 1e3
        row[f"{name}_unet_ms"] = floor * 1e3
        row[f"{name}_total_over_unet"] = total / floor
        row[f"{name}_overhead_ms"] = (total - floor) * 1e3
    return row


# --- 3. training step: benchmarks/speed_train.py ---------------------------------------------------


# --- 4. import time ------------------------------------------------------------------------------

def import_time_outside(repeats=5):
    code = ("import time, torch; t = time.perf_counter(); import schedulers; "
            "print(time.perf_counter() - t)")
    secs = [float(subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                                 check=True).stdout.split()[-1]) for _ in range(repeats)]
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import torch; import schedulers"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stderr
    heavy = [ln.split("|")[-1].strip() for ln in out.splitlines()
             if any(f"| {m}" in ln for m in (" diffusers", " peft", " transformers", " accelerate"))]
    return {"import_schedulers_after_torch_ms": statistics.median(secs) * 1e3, "heavy_modules_imported": heavy}


def import_time_inside_comfyui():
    comfy = Path(os.environ.get("COMFYUI_PATH", "/work/ComfyUI"))
    python = os.environ.get("COMFYUI_PYTHON", "/work/comfy-venv/bin/python")
    if not (comfy / "READY").exists() and not (comfy / "main.py").exists():
        return {"measured": False, "reason": f"no ComfyUI at {comfy}"}
    sys.path.insert(0, str(ROOT / "tests" / "comfyui"))
    from harness import ComfyServer

    with tempfile.TemporaryDirectory() as tmp:
        with ComfyServer(comfy, python, tmp, pack_dir=ROOT) as server:
            entry = server.pack_import()
            startup = server.startup_seconds
            heavy = [ln for ln in server.log().splitlines() if "IMPORT FAILED" in ln and "hyper" in ln.lower()]
    if entry is None:
        return {"measured": False, "reason": "pack missing from ComfyUI's import-times block"}
    return {"measured": True, "comfyui_import_seconds": entry.seconds, "failed": entry.failed,
            "resolution_s": 0.1, "comfyui_startup_s": startup, "failure_lines": heavy}


# --- main ----------------------------------------------------------------------------------------

def run(quick: bool):
    t0 = time.time()
    shapes = [(1, 4, 64, 64)] if quick else [(1, 4, 64, 64), (4, 4, 128, 128)]
    result = {"benchmark": "speed", "mode": "quick" if quick else "full", "machine": machine_info(),
              "gpu_rows": "not measured (no GPU on this machine)", "load_average_start": os.getloadavg()}
    result["sampler_math"] = [sampler_math(s, repeats=3 if quick else (200 if s[0] == 1 else 30)) for s in shapes]
    print(json.dumps(result["sampler_math"], indent=1), flush=True)
    result["sampling_vs_unet_floor"] = [sampling_vs_floor(size, repeats=2 if quick else 7) for size in ((32,) if quick else (32, 64))]
    print(json.dumps(result["sampling_vs_unet_floor"], indent=1), flush=True)
    if not quick:
        result["training_step"] = training_step()
        print(json.dumps(result["training_step"], indent=1), flush=True)
    result["import_outside_comfyui"] = import_time_outside(2 if quick else 7)
    result["import_inside_comfyui"] = {"measured": False, "reason": "skipped in --quick"} if quick else import_time_inside_comfyui()
    result["load_average_end"] = os.getloadavg()
    result["total_s"] = round(time.time() - t0, 1)
    return result


def fmt_load(load) -> str:
    return "n/a" if not load else "/".join(f"{v:.1f}" for v in load)


def markdown(r) -> str:
    m = r["machine"]
    out = [f"# Speed benchmark ({r['mode']})", "", f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, "
           f"torch threads {m['torch_threads']}. GPU rows: {r['gpu_rows']}.",
           f"Load average (1/5/15 min) at start {fmt_load(r.get('load_average_start'))}, at end "
           f"{fmt_load(r.get('load_average_end'))}: the machine is shared, absolute times are inflated; ratios "
           "come from interleaved repeats in the same run.", "",
           "## Sampler math per step (identity denoiser, TCD 8 steps, eta 0.3; median of interleaved repeats)", "",
           "| latent | ours us/step | diffusers TCDScheduler.step us/step | peer ComfyUI-TCD us/step | ours/diffusers | ours/peer | alloc B/step ours / diffusers / peer |",
           "|---|---|---|---|---|---|---|"]
    for s in r["sampler_math"]:
        out.append(f"| {tuple(s['shape'])} | {s['ours_us_per_step']:.0f} | {s['diffusers_us_per_step']:.0f} | "
                   f"{s['peer_comfyui_tcd_us_per_step']:.0f} | {s['ours_vs_diffusers']:.2f} | {s['ours_vs_peer']:.2f} | "
                   f"{s['ours_alloc_bytes_per_step']} / {s['diffusers_alloc_bytes_per_step']} / {s['peer_comfyui_tcd_alloc_bytes_per_step']} |")
    out += ["", "Ratios on the fastest repeat of each variant (less sensitive to load bursts): " + "; ".join(
        f"{tuple(s['shape'])} ours/diffusers {s['ours_vs_diffusers_min']:.2f}, ours/peer {s['ours_vs_peer_min']:.2f}"
        for s in r["sampler_math"] if "ours_vs_diffusers_min" in s) + "."]
    out += ["", "Diagnostic: ours with the per-step NaN/inf guard stubbed out: " + "; ".join(
        f"{tuple(s['shape'])} {s['ours_no_finite_check_us_per_step']:.0f} us/step "
        f"(guard = {100 * s['finite_check_share_of_ours']:.0f}% of ours)" for s in r["sampler_math"]
        if "ours_no_finite_check_us_per_step" in s) + "."]
    out += ["", "## Whole sampling vs the UNet calls alone (tiny SD-shaped UNet, 4 TCD steps, batch 1)", "",
            "| latent | ours total ms | ours UNet ms | ours total/UNet | diffusers-loop total ms | diffusers UNet ms | diffusers total/UNet |",
            "|---|---|---|---|---|---|---|"]
    for s in r["sampling_vs_unet_floor"]:
        out.append(f"| {tuple(s['latent'])} | {s['ours_total_ms']:.1f} | {s['ours_unet_ms']:.1f} | {s['ours_total_over_unet']:.3f} | "
                   f"{s['diffusers_total_ms']:.1f} | {s['diffusers_unet_ms']:.1f} | {s['diffusers_total_over_unet']:.3f} |")
    if "training_step" in r:
        t = r["training_step"]
        out += ["", f"## Training step (tiny UNet, LoRA r{t['config']['rank']}, batch {t['config']['batch']}, "
                f"{t['config']['size']}x{t['config']['size']} latents, fp32)", "",
                "| variant | step ms | peak RSS growth MiB |", "|---|---|---|"]
        for k in ("ours_tscd", "reference_lcm_lora", "ours_unet_floor", "reference_unet_floor"):
            out.append(f"| {k} | {t[k]['step_ms']:.0f} | {t[k]['peak_rss_growth_mib']:.1f} |")
        out += ["", f"ours/reference = {t['ours_vs_reference']:.2f} (on the fastest step of each: "
                f"{t.get('ours_vs_reference_min', float('nan')):.2f}); ours/own UNet floor = {t['ours_over_own_unet_floor']:.2f}; "
                f"reference/own UNet floor = {t['reference_over_own_unet_floor']:.2f}"]
    io, ii = r["import_outside_comfyui"], r["import_inside_comfyui"]
    out += ["", "## Import time", "", f"- `import schedulers` after torch: {io['import_schedulers_after_torch_ms']:.1f} ms; "
            f"heavy modules pulled in: {io['heavy_modules_imported'] or 'none'}",
            f"- inside ComfyUI: {json.dumps(ii)}", "", f"Total run {r['total_s']} s."]
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("HYPERSD_BENCH_THREADS", "0")) or None)
    ap.add_argument("--_train-one", dest="train_one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["HYPERSD_BENCH_THREADS"] = str(args.threads)
    if args.train_one:
        print(json.dumps(train_one(args.train_one)))
        return
    r = run(args.quick)
    tag = r["mode"]
    write_atomic_text(args.out / f"speed_{tag}.json", json.dumps(r, indent=1))
    write_atomic_text(args.out / f"speed_{tag}.md", markdown(r))
    print(markdown(r))


if __name__ == "__main__":
    main()
