"""The full-size benchmark's memory model, checked against its measurements and projected to a GPU.

    peak       = persistent + transient
    persistent = UNet weights (4 or 2 bytes a parameter) + LoRA adapters (fp32) + AdamW state (2 x fp32
                 per trained parameter) + EMA (fp32 copy of the TSCD LoRA) + VAE and reward (fp32, feedback)
    transient  = c0 + c1 x, x = batch x latent pixels: what one step allocates on top (activations,
                 temporaries, the trainable LoRA's grads, optimizer temporaries)

Measured on the CPU: persistent = RSS before a timed step minus the process's RSS before the UNet was
built (checks the arithmetic); transient = the exact peak of the tensor storages a step allocates
(full_size_step.TensorPeak, the "-mem" runs, one step each), checked against the sampled RSS peak of
the timed step. c0, c1 are fitted per (model, precision, checkpointing, stage) where two sizes were
tracked; with one size, c0 is borrowed from the same model's TSCD fit (grads + optimizer temporaries
scale with the LoRA, not the image; same precision and checkpointing where tracked) and c1 follows.
Where the activations are smaller than the grads (small sizes, checkpointing) the grads set the peak;
such a point lies above the activations' line, so a fit through it and a larger size has a smaller
slope (SDXL without checkpointing: docs/benchmarks.md gives the range).

The GPU projection takes the bf16-mode transients (bf16 autocast saves what a GPU run saves; CPU and
GPU attention are both memory-efficient kernels) and the persistent memory of a whole shipped-plan run:
every group's adapter from step 0, AdamW state of every group trained so far, the EMA, the text
encoders and the VAE in fp32 (the trainer loads them so), the reward model from the start.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from benchmarks.report import write_atomic_text

GB = 1024**3
WEIGHT_BYTES = {"fp32": 4, "amp": 4, "bf16": 2}
NATIVE_PX = {"sd15": 512, "sdxl": 1024}
# parameters of the networks a run holds (benchmarks.full_size_models.meta_counts; tests check them)
UNET_PARAMS = {"sd15": 859_520_964, "sdxl": 2_567_463_684}
TEXT_ENCODERS = {"sd15": 123_060_480, "sdxl": 123_060_480 + 694_659_840}
VAE_PARAMS, REWARD_PARAMS = 83_653_863, 304_894_177  # SD VAE; CLIP ViT-L/14 vision + the aesthetic MLP
GPU_OVERHEAD_GB = 1.0  # CUDA context + allocator slack, outside max_memory_allocated (an assumption)


def key(r) -> str:
    return f"{r['family']}/{r['mode']}/{'ckpt' if r['checkpointing'] else 'nockpt'}/{r['variant']}"


def persistent_model(r) -> int:
    """Bytes held before a timed step; without a warm-up step the AdamW state is made during the step."""
    adam = 8 * r["adam_params"] if r["warmup"] > 0 else 0
    return (WEIGHT_BYTES[r["mode"]] * r["unet_params"] + 4 * r["lora_params_all"] + adam
            + 4 * r["ema_params"] + 4 * r["extra_params"])


def measured(r) -> dict:
    """A timed run: step times, sampled RSS (persistent, peak, transient) and the persistent model."""
    ph, steps = r["phases_bytes"], r["steps_bytes"]
    before = min(s["before"] for s in steps)
    return {"step_s": statistics.median(r["step_s"]), "step_s_all": r["step_s"],
            "step_cpu_s": statistics.median(r["step_cpu_s"]), "step_cpu_s_all": r["step_cpu_s"],
            "weights_gb": (ph["weights"] - ph["start"]) / GB,
            "weights_model_gb": WEIGHT_BYTES[r["mode"]] * r["unet_params"] / GB,
            "persistent_gb": (before - ph["start"]) / GB, "persistent_model_gb": persistent_model(r) / GB,
            "peak_gb": max(s["peak"] for s in steps) / GB,
            "rss_transient_gb": max(s["peak"] - s["before"] for s in steps) / GB}


def tracked(r) -> dict:
    t = r["tracked_bytes"]
    return {"x": r["batch"] * r["latent"] ** 2, "transient_gb": t["peak"] / GB,
            "loss_backward_gb": t["loss_backward"] / GB, "optimizer_gb": t["optimizer"] / GB,
            "grads_gb": 4 * r["lora_params_trainable"] / GB}


def fit(rows: list[dict], c0_default: float | None = None) -> dict:
    """transient = c0 + c1 x (least squares) over the tracked runs of one key; one size: c0 = c0_default."""
    pts = [(m["x"], m["transient_gb"]) for m in rows]
    xs = sorted({x for x, _ in pts})
    if len(xs) == 1:
        c0 = c0_default if c0_default is not None else 0.0
        return {"c0_gb": c0, "c1_gb": (statistics.mean(a for _, a in pts) - c0) / xs[0], "sizes": xs,
                "c0": "borrowed" if c0_default is not None else "zero"}
    mx, my = statistics.mean(x for x, _ in pts), statistics.mean(a for _, a in pts)
    c1 = sum((x - mx) * (a - my) for x, a in pts) / sum((x - mx) ** 2 for x, _ in pts)
    return {"c0_gb": my - c1 * mx, "c1_gb": c1, "sizes": xs, "c0": "fitted"}


def fits(mem: dict) -> dict:
    groups = {}
    for m in mem.values():
        groups.setdefault(m["key"], []).append(m)
    out = {k: fit(v) for k, v in groups.items() if len({m["x"] for m in v}) > 1}
    for k, v in groups.items():
        if k not in out:
            family, mode, ckpt, _ = k.split("/")
            other = "nockpt" if ckpt == "ckpt" else "ckpt"
            tscd = out.get(f"{family}/{mode}/{ckpt}/tscd") or out.get(f"{family}/bf16/{ckpt}/tscd") \
                or out.get(f"{family}/{mode}/{other}/tscd")
            out[k] = fit(v, tscd["c0_gb"] if tscd else None)
    return out


def plan_state(variant: str) -> tuple[int, int]:
    """(LoRA groups with AdamW state, adapters on the UNet) in a run of the shipped plan at this stage:
    TSCD 1 group trained; feedback 2; DMD 3 + the fake score's own AdamW. A run holds 4 adapters (default,
    feedback, dmd, fake) from step 0 (engine/setup.attach_trainables); the LCM recipe 1."""
    return {"tscd": (1, 4), "feedback": (2, 4), "dmd_fake": (4, 4), "dmd_gen": (4, 4), "lcm": (1, 1)}[variant]


def project_gpu(family, variant, weights, f, lora, batch) -> dict:
    """GB on one GPU at the native resolution for a micro-batch, by component."""
    trained, adapters = plan_state(variant)
    ours = variant != "lcm"
    te_bytes = 4 if ours or weights != "bf16" else 2  # the LCM script casts its encoders to the weight dtype
    parts = {"unet_weights": WEIGHT_BYTES[weights] * UNET_PARAMS[family],
             "text_encoders": te_bytes * TEXT_ENCODERS[family], "vae": 4 * VAE_PARAMS,
             "reward": 4 * REWARD_PARAMS if ours else 0,
             "lora_adapters": 4 * lora * adapters, "adamw": 8 * lora * trained, "ema": 4 * lora if ours else 0}
    parts = {k: v / GB for k, v in parts.items()}
    parts["transient"] = f["c0_gb"] + f["c1_gb"] * batch * (NATIVE_PX[family] // 8) ** 2
    parts["cuda_overhead"] = GPU_OVERHEAD_GB
    return {"total_gb": sum(parts.values()), "parts_gb": parts}


def max_batch(family, variant, weights, f, lora, budget_gb, limit=256) -> int:
    b = 0
    while b < limit and project_gpu(family, variant, weights, f, lora, b + 1)["total_gb"] <= budget_gb:
        b += 1
    return b


def gpu_table(runs: dict, fitted: dict) -> list[dict]:
    """Per model / stage / checkpointing, from the bf16 transients: batch 1 with the trainer's fp32 frozen
    weights (as shipped) and with bf16 weights, and the largest micro-batch that fits 24 / 80 GB."""
    lora = {(r["family"], r["variant"] == "lcm"): r["lora_params_trainable"] for r in runs.values()
            if r["variant"] in ("tscd", "lcm")}
    rows = []
    for k, f in fitted.items():
        family, mode, ckpt, variant = k.split("/")
        n = lora.get((family, variant == "lcm"))
        if mode != "bf16" or not n:
            continue
        for weights in (["bf16"] if variant == "lcm" else ["amp", "bf16"]):
            p1 = project_gpu(family, variant, weights, f, n, 1)
            rows.append({"family": family, "variant": variant, "checkpointing": ckpt == "ckpt", "weights": weights,
                         "px": NATIVE_PX[family], "batch1_gb": p1["total_gb"], "batch1_parts_gb": p1["parts_gb"],
                         "max_batch_24gb": max_batch(family, variant, weights, f, n, 24),
                         "max_batch_80gb": max_batch(family, variant, weights, f, n, 80)})
    return rows


def ratios(meas: dict, mem: dict) -> list[dict]:
    """ours / LCM recipe in the same configuration (model, size, batch, precision, checkpointing)."""
    out = []
    for name, m in meas.items():
        base = name.split("-lean")[0].rsplit("-", 1)[0]
        ref = meas.get(base + "-lcm")
        if m["variant"] == "lcm" or not ref:
            continue
        row = {"name": name, "cpu_time_ratio": m["step_cpu_s"] / ref["step_cpu_s"],
               "wall_time_ratio": m["step_s"] / ref["step_s"], "peak_ratio": m["peak_gb"] / ref["peak_gb"]}
        mine, theirs = mem.get(name + "-mem"), mem.get(base + "-lcm-mem")
        if mine and theirs:
            row["transient_ratio"] = mine["transient_gb"] / theirs["transient_gb"]
        out.append(row)
    return out


def summarize(runs: dict) -> dict:
    ok = {n: r for n, r in runs["runs"].items() if "error" not in r}
    info = ("family", "px", "batch", "mode", "checkpointing", "variant")
    meas = {n: {"name": n, **{k: r[k] for k in info}, **measured(r)} for n, r in ok.items() if r["steps"] > 0}
    mem = {n: {"name": n, "key": key(r), **{k: r[k] for k in info}, **tracked(r)} for n, r in ok.items()
           if r.get("tracked_bytes")}
    for n, m in mem.items():  # the check: the exact transient beside the sampled RSS one of the timed run
        timed = meas.get(n[: -len("-mem")])
        m["rss_transient_gb"] = timed["rss_transient_gb"] if timed else None
    fitted = fits(mem)
    return {"machine": runs["machine"], "measured": meas, "tracked": mem, "ratios": ratios(meas, mem),
            "transient_fits": fitted, "gpu_projection": gpu_table(ok, fitted),
            "failed": {n: r["error"] for n, r in runs["runs"].items() if "error" in r}}


def gpu_check(runs: dict, cpu_fits: dict) -> list[dict]:
    """Measured GPU peaks (max_memory_allocated) beside the model: the run's own persistent arithmetic plus
    the transient fitted on the CPU (bf16 autocast, same model / checkpointing / stage) at its size."""
    rows = []
    for name, r in runs["runs"].items():
        f = cpu_fits.get(f"{r['family']}/bf16/{'ckpt' if r['checkpointing'] else 'nockpt'}/{r['variant']}")
        if "error" in r or not f:
            continue
        peak = max(st["peak"] for st in r["steps_bytes"]) / GB
        persistent = persistent_model(r) / GB
        transient = f["c0_gb"] + f["c1_gb"] * r["batch"] * r["latent"] ** 2
        rows.append({"name": name, "measured_peak_gb": peak, "model_gb": persistent + transient,
                     "persistent_model_gb": persistent, "transient_model_gb": transient,
                     "measured_transient_gb": peak - persistent, "step_s": statistics.median(r["step_s"])})
    return rows


def gpu_plan_table(runs: dict) -> list[dict]:
    """From GPU measurements (as shipped: fp32 frozen weights, bf16 autocast): a whole shipped-plan run's
    memory at micro-batch B = its persistent arithmetic (every adapter, AdamW of the groups trained so far,
    EMA, text encoders, VAE, reward; 1 GB CUDA context and slack) + t1 + slope x (B - 1), where t1 is the
    measured batch-1 transient (peak minus the run's own persistent arithmetic) and slope the measured
    per-sample growth (TSCD: from its larger-batch run; other stages: t1 minus TSCD's batch-independent
    part, i.e. all the rest taken as per-sample). Also with bf16 frozen weights (UNet 2 bytes a parameter)."""
    ok = [r for r in runs["runs"].values() if "error" not in r and r["mode"] == "amp"]

    def t(r):
        return max(st["peak"] for st in r["steps_bytes"]) / GB - persistent_model(r) / GB
    one = {(r["family"], r["checkpointing"], r["variant"]): r for r in ok if r["batch"] == 1}
    big = {(r["family"], r["checkpointing"], r["variant"]): r for r in ok if r["batch"] > 1}
    rows = []
    for k, r in one.items():
        family, ckpt, variant = k
        t1 = t(r)
        ref = big.get((family, ckpt, "tscd")) or big.get((family, True, "tscd"))
        tscd1 = one.get((family, ref["checkpointing"], "tscd")) if ref else None
        tscd_slope = (t(ref) - t(tscd1)) / (ref["batch"] - 1) if ref and tscd1 else None
        if k in big:
            slope, how = (t(big[k]) - t1) / (big[k]["batch"] - 1), f"measured at batch {big[k]['batch']}"
        elif tscd_slope is not None and ckpt == ref["checkpointing"]:
            slope, how = t1 - (t(tscd1) - tscd_slope), "batch-1 transient minus TSCD's fixed part"
        else:
            slope, how = t1, "all of the batch-1 transient"
        lora = r["lora_params_trainable"] if variant in ("tscd", "lcm") else None
        lora = lora or next((o["lora_params_trainable"] for o in ok if o["family"] == family and o["variant"] == "tscd"), 0)
        for weights in (["bf16"] if variant == "lcm" else ["amp", "bf16"]):  # the recipe keeps bf16 weights
            base = project_gpu(family, variant, weights, {"c0_gb": 0.0, "c1_gb": 0.0}, lora, 1)
            fixed = base["total_gb"] + t1 - slope  # everything but the per-sample part
            fits = [int((budget - fixed) // slope) if slope > 0 else 0 for budget in (24, 80)]
            rows.append({"family": family, "variant": variant, "checkpointing": ckpt, "weights": weights,
                         "px": r["px"], "t1_gb": t1, "slope_gb": slope, "slope_from": how,
                         "batch1_gb": fixed + slope, "max_batch_24gb": max(0, fits[0]),
                         "max_batch_80gb": max(0, fits[1]), "step_s_batch1": statistics.median(r["step_s"])})
    return rows


def write_summary(runs: dict, stem: Path, cpu_summary: Path | None = None) -> dict:
    from benchmarks.full_size_tables import markdown

    s = summarize(runs)
    if cpu_summary is not None and cpu_summary.exists():
        s["gpu_check"] = gpu_check(runs, json.loads(cpu_summary.read_text())["transient_fits"])
        s["gpu_plan"] = gpu_plan_table(runs)
    write_atomic_text(stem.with_suffix(".json"), json.dumps(s, indent=1))
    write_atomic_text(stem.with_suffix(".md"), markdown(s))
    return s
