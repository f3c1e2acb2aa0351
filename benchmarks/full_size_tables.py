"""Markdown tables of the full-size benchmark's summary (benchmarks/full_size_memory.summarize)."""
from __future__ import annotations


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(head, rows) -> list[str]:
    return [_row(head), _row(["---"] * len(head)), *(_row(r) for r in rows)]


def _gb(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def machine_line(m: dict) -> str:
    load = "/".join(f"{v:.1f}" for v in m.get("load_average_start") or [])
    return (f"Machine: {m['cpu']}, {m['cores']} cores, {m.get('ram_gb', '?')} GB RAM, torch {m['torch']}, "
            f"{m.get('gpu', 'no GPU')}; load average at start {load or 'n/a'} (shared machine).")


def measured_table(meas: dict) -> list[str]:
    rows = [[m["name"], f"{m['step_cpu_s']:.1f}", f"{m['step_s']:.1f}", _gb(m["peak_gb"]),
             f"{m['persistent_gb']:.2f} / {m['persistent_model_gb']:.2f}", _gb(m["rss_transient_gb"])]
            for m in meas.values()]
    return _table(["configuration", "step CPU s", "step wall s", "peak RSS GB", "persistent GB: RSS / model",
                   "step transient GB (RSS)"], rows)


def tracked_table(mem: dict) -> list[str]:
    rows = [[m["name"], _gb(m["transient_gb"]), _gb(m["loss_backward_gb"]), _gb(m["optimizer_gb"]),
             _gb(m["grads_gb"]), _gb(m["rss_transient_gb"])] for m in mem.values()]
    return _table(["configuration (one tracked step)", "transient GB (exact)", "in loss + backward",
                   "in clip + optimizer", "of which grads", "timed run's RSS transient GB"], rows)


def ratio_table(ratios: list) -> list[str]:
    rows = [[r["name"], f"{r['cpu_time_ratio']:.2f}", f"{r['wall_time_ratio']:.2f}", f"{r['peak_ratio']:.2f}",
             _gb(r.get("transient_ratio"))] for r in ratios]
    return _table(["ours (stage) vs LCM-LoRA recipe, same configuration", "CPU time", "wall time", "peak RSS",
                   "step transient (exact)"], rows)


def fit_table(fits: dict) -> list[str]:
    rows = [[k, f"{f['c0_gb']:.3f}", f"{f['c1_gb'] * 1e3:.4f}", ", ".join(str(x) for x in f["sizes"]), f["c0"]]
            for k, f in fits.items()]
    return _table(["model/precision/checkpointing/stage", "c0 GB", "c1 GB per 1000 latent px",
                   "latent px tracked", "c0"], rows)


def gpu_table(rows: list) -> list[str]:
    out = []
    for r in rows:
        p = r["batch1_parts_gb"]
        out.append([r["family"], r["px"], r["variant"], "on" if r["checkpointing"] else "off",
                    {"amp": "fp32 (as shipped)", "bf16": "bf16"}[r["weights"]], f"{r['batch1_gb']:.1f}",
                    f"{p['unet_weights'] + p['text_encoders'] + p['vae'] + p['reward']:.1f}",
                    f"{p['lora_adapters'] + p['adamw'] + p['ema']:.1f}", f"{p['transient']:.1f}",
                    r["max_batch_24gb"], r["max_batch_80gb"]])
    return _table(["model", "px", "stage", "grad ckpt", "frozen weights", "batch 1 GB", "frozen nets GB",
                   "LoRA + AdamW + EMA GB", "step transient GB", "max micro-batch 24 GB",
                   "max micro-batch 80 GB"], out)


def gpu_check_table(rows: list) -> list[str]:
    out = [[r["name"], f"{r['step_s']:.2f}", f"{r['measured_peak_gb']:.2f}", f"{r['model_gb']:.2f}",
            f"{r['measured_transient_gb']:.2f}", f"{r['transient_model_gb']:.2f}"] for r in rows]
    return _table(["configuration (GPU)", "step wall s", "peak GB (max_memory_allocated)", "model GB",
                   "transient GB: measured", "transient GB: CPU-fitted model"], out)


def gpu_plan_table(rows: list) -> list[str]:
    out = [[r["family"], r["px"], r["variant"], "on" if r["checkpointing"] else "off",
            {"amp": "fp32 (as shipped)", "bf16": "bf16"}[r["weights"]], f"{r['step_s_batch1']:.2f}",
            f"{r['t1_gb']:.2f}", f"{r['slope_gb']:.2f} ({r['slope_from']})", f"{r['batch1_gb']:.1f}",
            r["max_batch_24gb"], r["max_batch_80gb"]] for r in rows]
    return _table(["model", "px", "stage", "grad ckpt", "frozen weights", "step s (batch 1)",
                   "transient GB batch 1", "GB per extra sample", "whole-plan run, batch 1 GB",
                   "max micro-batch 24 GB", "max micro-batch 80 GB"], out)


def markdown(s: dict) -> str:
    lines = ["# Full-size training step (benchmarks/full_size.py)", "", machine_line(s["machine"]), "",
             "Random-weight SD1.5 / SDXL UNets from their published configs, LoRA rank 64, the shipped configs' "
             "settings, batch 1. Modes: fp32 = fp32 weights; amp = fp32 weights + bf16 autocast (what the trainer "
             "does with mixed_precision bf16); bf16 = bf16 weights + bf16 autocast (the diffusers recipe). "
             "CPU time = the stepping thread's CPU time (1 torch thread), the robust figure on a shared machine. "
             "'lean' = the stage's own LoRA group only (SDXL's later stages, to stay under 14 GB here).",
             "", "## Timed steps", "", *measured_table(s["measured"]), "",
             "## Exact step transients (one tracked step each)", "", *tracked_table(s["tracked"]), "",
             "## Ours / reference", "", *ratio_table(s["ratios"]), "",
             "## Transient model: c0 + c1 x batch x latent pixels", "", *fit_table(s["transient_fits"]), "",
             "## Projected to one GPU at native resolution (not measured)", "", *gpu_table(s["gpu_projection"])]
    if s.get("gpu_plan"):
        lines += ["", "## A whole shipped-plan run on one GPU, from the GPU measurements", "",
                  *gpu_plan_table(s["gpu_plan"])]
    if s.get("gpu_check"):
        lines += ["", "## Measured on the GPU vs the memory model fitted on the CPU", "", *gpu_check_table(s["gpu_check"])]
    if s["failed"]:
        lines += ["", "## Failed configurations", "", *(f"- {n}: {e[:300]}" for n, e in s["failed"].items())]
    return "\n".join(lines) + "\n"
